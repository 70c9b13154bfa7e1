//! Operator commands that span stages: estimate, backfill with progress, stale scans.
//!
//! Why here and not in main: they are library functions the tests and the CronJob path call
//! the same way the CLI does; main only parses arguments and prints.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use crate::config::Settings;
use crate::freshness::{self, Scope, Stale};
use crate::pipeline::chunk::Chunker;
use crate::source::EmbedSource;

/// Tokens the sources would cost to embed now with the active model, and that in USD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Sources to embed.
    pub sources: usize,
    /// Their tokens.
    pub tokens: u64,
    /// Their cost at the synchronous price.
    pub usd: f64,
    /// Their cost through the Batch API.
    pub batch_usd: f64,
}

impl std::fmt::Display for Estimate {
    /// `N sources, T tokens, $S sync / $B batch (saves $D)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sources, {} tokens, ${:.4} sync / ${:.4} through the Batch API (saves ${:.4})",
            self.sources,
            self.tokens,
            self.usd,
            self.batch_usd,
            self.usd - self.batch_usd
        )
    }
}

/// Renders and counts the sources' chunks, 1,000 sources at a time.
pub async fn estimate(
    pool: &PgPool,
    settings: &Settings,
    sources: &[EmbedSource],
) -> anyhow::Result<Estimate> {
    let m = &settings.model;
    let chunker = Chunker::for_model(m)?;
    let mut tokens = 0u64;
    for chunk in sources.chunks(1000) {
        let loaded = crate::pipeline::load::load(pool, &settings.render, chunk).await?;
        for l in loaded.values() {
            tokens += chunker
                .chunks(&l.text, &m.name, m.dimensions)
                .iter()
                .map(|c| c.tokens as u64)
                .sum::<u64>();
        }
    }
    Ok(Estimate {
        sources: sources.len(),
        tokens,
        usd: tokens as f64 * m.usd_per_million_tokens / 1e6,
        batch_usd: tokens as f64 * m.batch_usd_per_million_tokens / 1e6,
    })
}

/// A one-line progress bar on stderr: `label [#####.....] 50% 500/1000 extra`.
pub fn progress_line(label: &str, done: usize, total: usize, extra: &str) {
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
pub fn confirm(question: &str) -> anyhow::Result<bool> {
    if !std::io::stdin().is_terminal() {
        anyhow::bail!("{question} — not a terminal: pass --yes to proceed");
    }
    eprint!("{question} [y/N] ");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    Ok(matches!(line.trim(), "y" | "Y" | "yes"))
}

/// What a backfill did.
#[derive(Debug, Clone)]
pub struct Backfill {
    /// The estimate shown.
    pub estimate: Estimate,
    /// Jobs created.
    pub queued: i64,
    /// What the scan found.
    pub stale: Vec<Stale>,
}

/// Finds the stale sources in `scope`, prints the estimate, asks (unless `yes`), queues them
/// with a progress bar. `wait`: then shows embedding progress with rate and ETA until the
/// queue drains.
pub async fn backfill(
    pool: &PgPool,
    settings: &Settings,
    scope: &Scope,
    yes: bool,
    wait: bool,
) -> anyhow::Result<Option<Backfill>> {
    let stale = freshness::find_stale(pool, &settings.model.name, scope).await?;
    let sources: Vec<EmbedSource> = stale.iter().map(|s| s.source).collect();
    let est = estimate(pool, settings, &sources).await?;
    eprintln!(
        "backfill: {:?}; {est} ({}; bulk.mode = {})",
        freshness::counts(&stale)
            .iter()
            .map(|(r, n)| (r.as_str(), *n))
            .collect::<std::collections::BTreeMap<_, _>>(),
        settings.model.name,
        match settings.bulk.mode {
            crate::config::BulkMode::Sync => "sync",
            crate::config::BulkMode::Batch => "batch",
        }
    );
    if !yes && !confirm("queue them?")? {
        eprintln!("backfill: nothing queued");
        return Ok(None);
    }
    let queue = &settings.queue.name;
    let queued = freshness::enqueue_stale(pool, settings, &stale, |d, t| {
        progress_line("queueing ", d, t, "")
    })
    .await?;
    eprintln!(
        "\nbackfill: {queued} jobs queued ({} already pending)",
        sources.len() as i64 - queued
    );
    if wait {
        wait_for_queue(pool, queue).await?;
        wait_for_index(pool, settings).await?;
    }
    Ok(Some(Backfill {
        estimate: est,
        queued,
        stale,
    }))
}

/// After a backfill drains: the active model's index until it is ready (a deferred build runs
/// now), with PostgreSQL's build progress where this login may see it. Gives up with a hint when
/// no build starts (a worker login that is not the table's owner cannot build).
pub async fn wait_for_index(pool: &PgPool, settings: &Settings) -> anyhow::Result<()> {
    use crate::model_index::{self, IndexState};
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
            IndexState::Invalid(name) => {
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
pub async fn wait_for_queue(pool: &PgPool, queue: &str) -> anyhow::Result<()> {
    let initial = crate::queue::open_jobs(pool, queue).await?.max(0) as usize;
    let started = Instant::now();
    loop {
        let open = crate::queue::open_jobs(pool, queue).await?.max(0) as usize;
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
