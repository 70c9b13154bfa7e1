//! Freshness: what is stale or not yet embedded, what it would cost, and queueing it.

use std::process::ExitCode;

use embed_worker::config::Settings;
use embed_worker::db;
use embed_worker::source::SourceType;

/// `embed-worker enqueue-stale`.
pub(crate) async fn enqueue_stale(
    settings: &Settings,
    dry_run: bool,
    limit: Option<i64>,
    source_type: Option<SourceType>,
) -> anyhow::Result<ExitCode> {
    let pool = db::connect(&settings.database).await?;
    let scope = embed_worker::freshness::Scope {
        source_type,
        limit,
        max_age_days: Some(settings.freshness.max_age_days),
        ..Default::default()
    };
    let stale = embed_worker::freshness::find_stale(&pool, &settings.model.name, &scope).await?;
    for (reason, n) in embed_worker::freshness::counts(&stale) {
        println!("{reason:<12} {n}");
    }
    if dry_run {
        println!("dry run: nothing queued");
    } else {
        let n = embed_worker::freshness::enqueue_stale(&pool, settings, &stale, |_, _| {}).await?;
        println!(
            "{n} jobs queued ({} already pending)",
            stale.len() as i64 - n
        );
    }
    Ok(ExitCode::SUCCESS)
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
    let scope = embed_worker::freshness::Scope {
        source_type,
        since,
        ..Default::default()
    };
    embed_worker::ops::backfill(&pool, settings, &scope, yes, wait).await?;
    Ok(ExitCode::SUCCESS)
}

/// `embed-worker estimate`.
pub(crate) async fn estimate(settings: &Settings) -> anyhow::Result<ExitCode> {
    let pool = db::connect(&settings.database).await?;
    let stale = embed_worker::freshness::find_stale(
        &pool,
        &settings.model.name,
        &embed_worker::freshness::Scope::default(),
    )
    .await?;
    let todo: Vec<_> = stale
        .iter()
        .filter(|s| s.reason != embed_worker::freshness::StaleReason::Outdated)
        .map(|s| s.source)
        .collect();
    let e = embed_worker::ops::estimate(&pool, settings, &todo).await?;
    println!("not yet embedded by {}: {e}", settings.model.name);
    Ok(ExitCode::SUCCESS)
}
