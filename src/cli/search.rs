//! Search: embed a query with the serving model (`embed_worker.models`, not the config's) and
//! rank through its index.

use std::process::ExitCode;

use anyhow::Context;

use embed_worker::config::Settings;
use embed_worker::db;
use embed_worker::source::SourceType;

/// `embed-worker search`.
pub(crate) async fn search(
    settings: &Settings,
    text: String,
    k: i64,
    source_type: Option<SourceType>,
    as_user: Option<uuid::Uuid>,
    ef_search: Option<u32>,
) -> anyhow::Result<ExitCode> {
    // The read URL (a standby, say) when one is configured; nothing here writes.
    let pool = db::connect_reads(settings, false).await?;
    let server = embed_worker::replica::describe(&pool).await?;
    let spec = embed_worker::model_index::lifecycle::serving_spec(&pool).await?;
    let model = settings.model.for_model(&spec.model, spec.dimensions);
    let embedder = embed_worker::embed::Embedder::from_settings(&settings.api, &model)?;
    let query = embedder
        .embed(vec![text.clone()])
        .await?
        .vectors
        .pop()
        .context("no vector for the query")?;
    let opts = embed_worker::search::SearchOptions {
        k,
        source_type,
        as_user,
        ef_search,
        max_scan_tuples: None,
    };
    let started = std::time::Instant::now();
    let found = embed_worker::search::search_serving(&pool, query, &opts).await?;
    let hits = found.hits;
    let took = started.elapsed();
    let labels = embed_worker::search::labels(&pool, &settings.render, &hits).await?;
    for h in &hits {
        let label = labels
            .get(&h.source_id)
            .cloned()
            .unwrap_or_else(|| format!("{} {}", h.source_type, h.source_id));
        println!("{:.4}  {label}", 1.0 - h.distance);
    }
    // The timing last: CI compares two demo runs with their trailing timings stripped.
    println!(
        "{} hits, {}, from the {server}, in {:.1} ms",
        hits.len(),
        found.path,
        took.as_secs_f64() * 1000.0
    );
    Ok(ExitCode::SUCCESS)
}
