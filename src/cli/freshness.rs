//! Freshness: what is stale or not yet embedded, what it would cost, and queueing it — with
//! the terminal's share (the confirmation prompt, progress bars on stderr), which the library
//! leaves to its callers.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sqlx::PgPool;

use embed_worker::config::Settings;
use embed_worker::db;
use embed_worker::freshness::{self, Scope};
use embed_worker::source::SourceType;

/// `embed-worker enqueue-stale`.
pub(crate) async fn enqueue_stale(
    settings: &Settings,
    dry_run: bool,
    limit: Option<i64>,
    source_type: Option<SourceType>,
) -> anyhow::Result<ExitCode> {
    let pool = db::connect(&settings.database).await?;
    refuse_unless_writing(&pool, settings).await?;
    let scope = Scope {
        source_type,
        limit,
        max_age_days: Some(settings.freshness.max_age_days),
        ..Default::default()
    };
    if dry_run {
        let survey =
            freshness::survey(&pool, settings, &settings.model.name, &scope, |_| false).await?;
        for (reason, n) in survey.counts {
            println!("{reason:<12} {n}");
        }
        println!("dry run: nothing queued");
    } else {
        let q = freshness::enqueue_stale(&pool, settings, &settings.model.name, &scope).await?;
        print_queued(&q);
    }
    Ok(ExitCode::SUCCESS)
}

/// Queueing for a model that is not the writing one is refused, having queued nothing: its
/// jobs would be a backfill of the writing model (a job naming a model is, migration 25), not
/// of the configured one. The way is `migrate` with this configuration first.
async fn refuse_unless_writing(pool: &PgPool, settings: &Settings) -> anyhow::Result<()> {
    let writing: Option<String> =
        sqlx::query_scalar("SELECT name::text FROM embed_worker.models WHERE writing")
            .fetch_optional(pool)
            .await?;
    if let Some(writing) = writing.filter(|w| *w != settings.model.name) {
        anyhow::bail!(
            "refusing to queue for model.name = {}: the writing model is {writing}; run \
             `embed-worker migrate` with this configuration first (it makes {} the writing \
             model); nothing was queued",
            settings.model.name,
            settings.model.name
        );
    }
    Ok(())
}

/// `embed-worker backfill`.
pub(crate) async fn backfill(
    settings: &Settings,
    source_type: Option<SourceType>,
    since: Option<chrono::DateTime<chrono::Utc>>,
    yes: bool,
    wait: bool,
) -> anyhow::Result<ExitCode> {
    let pool = db::connect(&settings.database).await?;
    refuse_unless_writing(&pool, settings).await?;
    let scope = embed_worker::freshness::Scope {
        source_type,
        since,
        ..Default::default()
    };
    run_backfill(&pool, settings, &scope, yes, wait).await?;
    Ok(ExitCode::SUCCESS)
}

/// `embed-worker estimate`.
pub(crate) async fn estimate(settings: &Settings) -> anyhow::Result<ExitCode> {
    // Before `migrate` on the app's database: what adopting its rag_embeddings saves.
    let login = db::connect_as_login(&settings.database.url).await?;
    if db::adopt::pending(&mut *login.acquire().await?).await? {
        let a = freshness::adoption_estimate(&login, settings).await?;
        println!(
            "the app's rag_embeddings, adopted in place by `migrate`: its vectors of sources \
             unchanged since are kept at no cost: {}",
            a.kept
        );
        println!(
            "to embed (never embedded, or changed since): {}",
            a.to_embed
        );
        return Ok(ExitCode::SUCCESS);
    }
    let pool = db::connect(&settings.database).await?;
    // Not yet embedded by the active model: what changed since is not counted here.
    let survey = freshness::survey(
        &pool,
        settings,
        &settings.model.name,
        &Scope::default(),
        |r| {
            !matches!(
                r,
                freshness::StaleReason::Outdated | freshness::StaleReason::Adopted
            )
        },
    )
    .await?;
    println!(
        "not yet embedded by {}: {}",
        settings.model.name, survey.estimate
    );
    let adopted = survey
        .counts
        .get(&freshness::StaleReason::Adopted)
        .copied()
        .unwrap_or(0);
    if adopted > 0 {
        println!(
            "adopted with the app's table, not yet verified: {adopted} sources (kept at no cost \
             by the next run where unchanged)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Per reason: stale sources, of which with an open job already; then the jobs created.
fn print_queued(q: &freshness::Queued) {
    for (reason, n, open) in &q.by_reason {
        println!("{reason:<12} {n} ({open} with an open job)");
    }
    println!(
        "{} jobs queued ({} already pending)",
        q.created,
        q.found() - q.created
    );
}

/// A one-line progress bar on stderr: `label [#####.....] 50% 500/1000 extra`.
fn progress_line(label: &str, done: usize, total: usize, extra: &str) {
    let width = 30;
    let frac = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = (frac * width as f64).round() as usize;
    let mut err = std::io::stderr();
    let _ = write!(
        err,
        "\r{label} [{}{}] {:>3.0}% {done}/{total} {extra}   ",
        "#".repeat(filled.min(width)),
        ".".repeat(width - filled.min(width)),
        frac * 100.0
    );
    let _ = err.flush();
}

/// Asks "proceed?" on a terminal; without one, only `--yes` proceeds.
fn confirm(question: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{question} — not a terminal: pass --yes to proceed");
    }
    eprint!("{question} [y/N] ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

/// Finds the stale sources in `scope`, prints the estimate, asks (unless `yes`), queues them
/// with a progress bar. `wait`: then shows embedding progress with rate and ETA until the
/// queue drains.
async fn run_backfill(
    pool: &PgPool,
    settings: &Settings,
    scope: &Scope,
    yes: bool,
    wait: bool,
) -> anyhow::Result<()> {
    let survey = freshness::survey(pool, settings, &settings.model.name, scope, |_| true).await?;
    let est = survey.estimate;
    eprintln!(
        "backfill: {:?}; {est} ({}; bulk.mode = {})",
        survey
            .counts
            .iter()
            .map(|(r, n)| (r.as_str(), *n))
            .collect::<std::collections::BTreeMap<_, _>>(),
        settings.model.name,
        match settings.bulk.mode {
            embed_worker::config::BulkMode::Sync => "sync",
            embed_worker::config::BulkMode::Batch => "batch",
        }
    );
    if !yes && !confirm("queue them?")? {
        eprintln!("backfill: nothing queued");
        return Ok(());
    }
    let queue = &settings.queue.name;
    let started = Instant::now();
    let q = freshness::enqueue_stale(pool, settings, &settings.model.name, scope).await?;
    eprintln!(
        "backfill: {} jobs queued ({} already pending) in {:.2} s",
        q.created,
        q.found() - q.created,
        started.elapsed().as_secs_f64()
    );
    if wait {
        wait_for_queue(pool, queue).await?;
        wait_for_index(pool, settings).await?;
    }
    Ok(())
}

/// After a backfill drains: the active model's index until it is ready (a deferred build runs
/// now), with PostgreSQL's build progress where this login may see it. Gives up with a hint when
/// no build starts (a worker login that is not the table's owner cannot build).
async fn wait_for_index(pool: &PgPool, settings: &Settings) -> anyhow::Result<()> {
    use embed_worker::model_index::{self, IndexState};
    let spec = model_index::IndexSpec::from_settings(settings)?;
    let started = Instant::now();
    let patience = Duration::from_secs(settings.index.check_interval_secs * 2 + 10);
    let mut seen_build = false;
    loop {
        match model_index::state(pool, &spec).await? {
            IndexState::Ready(name) => {
                if seen_build || started.elapsed() > Duration::from_secs(1) {
                    eprintln!();
                }
                eprintln!("index {name} ({}) ready", spec.index_type());
                return Ok(());
            }
            IndexState::Building(name) | IndexState::Invalid(name) => {
                seen_build = true;
                let p = model_index::progress(pool).await.unwrap_or_default();
                match p.iter().find(|p| p.index == name) {
                    Some(p) => progress_line(
                        "indexing ",
                        p.tuples_done.max(0) as usize,
                        p.tuples_total.max(0) as usize,
                        &format!("{} {:.0}s", p.phase, p.secs),
                    ),
                    None => {
                        progress_line("indexing ", 0, 0, "(progress not visible to this login)")
                    }
                }
            }
            IndexState::Missing if !seen_build && started.elapsed() > patience => {
                eprintln!(
                    "index {} not built: is `run` up, and its login the owner of rag_embeddings? \
                     `embed-worker models build-index` builds it",
                    spec.name()
                );
                return Ok(());
            }
            IndexState::Missing => progress_line("indexing ", 0, 0, "waiting for the build"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Progress of the queue until no job is open: done/total, rate, ETA.
async fn wait_for_queue(pool: &PgPool, queue: &str) -> anyhow::Result<()> {
    let initial = embed_worker::queue::open_jobs(pool, queue).await?.max(0) as usize;
    let started = Instant::now();
    loop {
        let open = embed_worker::queue::open_jobs(pool, queue).await?.max(0) as usize;
        let total = initial.max(open);
        let done = total - open;
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            format!("{:.0}s", open as f64 / rate)
        } else {
            "?".into()
        };
        progress_line("embedding", done, total, &format!("{rate:.1}/s ETA {eta}"));
        if open == 0 {
            eprintln!();
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
