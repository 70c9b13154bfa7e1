//! The queue: run the worker, enqueue sources, see job states and dead letters, retry, prune.

use std::process::ExitCode;

use anyhow::Context;

use embed_worker::config::Settings;
use embed_worker::db;
use embed_worker::source::SourceType;

/// `embed-worker run`.
pub(crate) async fn run(settings: Settings, until_empty: bool) -> anyhow::Result<ExitCode> {
    let worker = embed_worker::worker::Worker::build(settings).await?;
    let shutdown = embed_worker::worker::shutdown_signal();
    let mut index = None;
    if until_empty {
        let pool = worker.pool.clone();
        let queue = worker.settings.queue.name.clone();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let drained = async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                if let Ok(0) = embed_worker::queue::open_jobs(&pool, &queue).await {
                    break;
                }
            }
        };
        let signalled = tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut stop = stop_rx.clone();
        worker
            .run(async move {
                tokio::select! { _ = stop.wait_for(|v| *v) => {}, _ = drained => {} }
            })
            .await?;
        // Drained, not stopped: the backlog's deferred index is built now, as `run` would.
        if !*stop_rx.borrow() {
            index = Some(
                embed_worker::model_index::build::run_check(
                    &worker.pool,
                    &worker.settings,
                    Some(stop_rx.clone()),
                )
                .await?,
            );
            if let Some(p) =
                embed_worker::model_index::lifecycle::promote_if_due(&worker.pool, &worker.settings)
                    .await?
            {
                println!("{p}");
            }
        }
        signalled.abort();
    } else {
        worker.run(shutdown).await?;
    }
    let st = &worker.pipeline.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "api requests: {}, tokens embedded: {}, tokens saved: {}, chunks written: {}, rate limited: {}",
        load(&st.api_requests),
        load(&st.tokens_embedded),
        load(&st.tokens_saved),
        load(&st.chunks_written),
        load(&st.rate_limited)
    );
    if let Some(outcome) = index {
        println!("{outcome}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `embed-worker enqueue`.
pub(crate) async fn enqueue(
    settings: &Settings,
    all: bool,
    source_type: Option<SourceType>,
    id: Vec<uuid::Uuid>,
) -> anyhow::Result<ExitCode> {
    let pool = db::connect(&settings.database).await?;
    let sources = if all {
        embed_worker::queue::all_sources(&pool).await?
    } else {
        let ty = source_type.context("--source-type is required with --id")?;
        id.into_iter()
            .map(|source_id| embed_worker::source::EmbedSource {
                source_type: ty,
                source_id,
            })
            .collect()
    };
    let n = embed_worker::queue::enqueue_many(
        &pool,
        &settings.queue.name,
        settings.queue.max_attempts,
        &sources,
    )
    .await?;
    println!(
        "{} sources, {n} jobs queued (the rest already had a pending job)",
        sources.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// `embed-worker status`.
pub(crate) async fn status(settings: &Settings, failures: i64) -> anyhow::Result<ExitCode> {
    // Only reads: from search.database_url when set (a standby), as the worker's role.
    let pool = db::connect_reads(settings, true).await?;
    let queue = &settings.queue.name;
    println!("queue {queue}: jobs by state");
    for (state, n) in embed_worker::queue::counts_by_state(&pool, queue).await? {
        println!("  {state:<10} {n}");
    }
    // The models' line as /readyz shows it (coverage: sources covered of those with text).
    println!(
        "{}",
        embed_worker::model_index::lifecycle::sample(&pool).await?
    );
    if let Some(line) = db::adopt::status(&pool).await.unwrap_or(None) {
        println!("{line}");
    }
    println!(
        "reading: the {}",
        embed_worker::replica::describe(&pool).await?
    );
    let replicas = embed_worker::replica::lag(&pool).await.unwrap_or_else(|e| {
        println!("replicas: unknown ({e:#}; `embed-worker migrate` adds the lag function)");
        Vec::new()
    });
    for r in replicas {
        let secs = r
            .replay_lag_seconds
            .map_or("unknown".into(), |s| format!("{s:.2} s"));
        let bytes = r
            .lag_bytes
            .map_or("unknown".into(), |b| format!("{b:.0} bytes"));
        println!(
            "replica {} {}: replay lag {secs}, {bytes} behind",
            r.application_name, r.state
        );
    }
    // Connections are the primary's, whichever server the rest was read from.
    let primary = if settings.search.url(&settings.database) == settings.database.url {
        pool.clone()
    } else {
        db::connect(&embed_worker::config::DatabaseSettings {
            max_connections: 1,
            ..settings.database.clone()
        })
        .await?
    };
    print_connections(&embed_worker::db::connections::usage(&primary).await?);
    let (spent, budget) = embed_worker::guard::budget::month(&pool).await?;
    if budget > 0.0 {
        println!(
            "spend this month: ${spent:.4} of ${budget:.2} budget ({:.1}%)",
            spent * 100.0 / budget
        );
    } else {
        println!("spend this month: ${spent:.4} (no budget set)");
    }
    let open = embed_worker::bulk::records::open(&pool).await?;
    if !open.is_empty() {
        println!(
            "open batches ({}; `embed-worker batches` for all):",
            open.len()
        );
        for b in &open {
            println!(
                "  batch {} {} provider={} items={} failures={}{}",
                b.id,
                b.state,
                b.provider_status.as_deref().unwrap_or("-"),
                b.inputs,
                b.failures,
                b.last_error
                    .as_deref()
                    .map(|e| format!(" last_error={e}"))
                    .unwrap_or_default()
            );
        }
    }
    let dead = embed_worker::queue::failed_jobs(&pool, queue, failures).await?;
    println!("dead letters (latest {}):", dead.len());
    for f in dead {
        println!(
            "  {} {} {}/{} attempts={}/{} at={} reason={}",
            f.id,
            f.status,
            f.source_type.as_deref().unwrap_or("?"),
            f.source_id.as_deref().unwrap_or("?"),
            f.attempts,
            f.max_attempts,
            f.failed_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
            f.last_error.as_deref().unwrap_or("")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The server's connection budget and each process of ours against it.
fn print_connections(u: &embed_worker::db::connections::Usage) {
    println!(
        "connections: {} open of max_connections {} ({} reserved, {} usable); workers' pools add up to {}",
        u.open,
        u.max,
        u.reserved,
        u.usable,
        u.worker_pools()
    );
    for p in &u.processes {
        println!(
            "  embed-worker/{} {}: {} open of pool {}",
            p.kind, p.id, p.open, p.pool
        );
    }
    if let Some(why) = embed_worker::db::connections::overcommitted(u) {
        println!("  warning: {why}");
    }
}

/// `embed-worker retry-failed`.
pub(crate) async fn retry_failed(
    settings: &Settings,
    source_type: Option<SourceType>,
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> anyhow::Result<ExitCode> {
    let pool = db::connect(&settings.database).await?;
    let q = &settings.queue.name;
    let n = embed_worker::queue::retry_failed(&pool, q, source_type, since).await?;
    // Into the lane the current bulk.mode reads: in sync mode nothing reads `<queue>.batch`.
    if settings.bulk.mode == embed_worker::config::BulkMode::Sync {
        embed_worker::queue::move_batch_lane_to_sync(&pool, q, settings.bulk.priority).await?;
    }
    println!("{n} dead letters re-queued");
    Ok(ExitCode::SUCCESS)
}

/// `embed-worker prune-jobs`.
pub(crate) async fn prune_jobs(settings: &Settings) -> anyhow::Result<ExitCode> {
    let pool = db::connect(&settings.database).await?;
    let r = &settings.retention;
    let (done, failed) = embed_worker::queue::prune_finished(
        &pool,
        &settings.queue.name,
        r.done_age(),
        r.failed_age(),
    )
    .await?;
    println!("deleted {done} finished and {failed} dead-letter jobs");
    Ok(ExitCode::SUCCESS)
}

/// `embed-worker batches`.
pub(crate) async fn batches(
    settings: &Settings,
    action: Option<super::BatchesAction>,
    limit: i64,
) -> anyhow::Result<ExitCode> {
    let pool = embed_worker::db::connect(&settings.database).await?;
    match action {
        None => print!(
            "{}",
            embed_worker::bulk::BatchTable(embed_worker::bulk::records::list(&pool, limit).await?)
        ),
        Some(super::BatchesAction::Cancel { id }) => {
            let status = embed_worker::bulk::cancel(&pool, settings, id).await?;
            println!("batch {id}: {status}");
        }
        Some(super::BatchesAction::Abandon { id }) => {
            println!(
                "{}",
                embed_worker::bulk::abandon(&pool, settings, id).await?
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
