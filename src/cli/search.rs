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

/// `embed-worker tune`'s arguments.
pub(crate) struct TuneArgs {
    pub target: Option<f64>,
    pub k: Option<u32>,
    pub queries: Option<u32>,
    pub dry_run: bool,
    pub candidate: Option<String>,
    pub sample: i64,
}

/// `embed-worker tune`: the sweep on the serving model, the chosen setting stored (unless
/// --dry-run); with --candidate, the index comparison on a sample copy.
pub(crate) async fn tune(settings: &Settings, a: TuneArgs) -> anyhow::Result<ExitCode> {
    use embed_worker::search::{probe, tune};
    let s = &settings.search;
    let target = a.target.unwrap_or(s.recall_target);
    anyhow::ensure!(
        (0.0..=1.0).contains(&target),
        "--target {target} is not a recall (0 to 1)"
    );
    let candidate: Option<tune::IndexParams> = a
        .candidate
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("--candidate")?;
    // Before anything is measured: a bad argument changes nothing and costs nothing.
    let pool = db::connect_as_login(&settings.database.url).await?;
    let spec = embed_worker::model_index::lifecycle::serving_spec(&pool).await?;
    let p = probe::Probe {
        spec: spec.clone(),
        k: a.k.unwrap_or(s.probe_k).max(1) as i64,
        queries: a.queries.unwrap_or(s.probe_queries).max(1) as i64,
        seed: 1,
        ef_search: None,
        max_scan_tuples: None,
    };
    println!(
        "tuning {} for recall@{} >= {target} ({} queries per scope: its own stored vectors)",
        spec.model, p.k, p.queries
    );
    let tuned = tune::sweep(&pool, &p, target).await?;
    for step in &tuned.steps {
        println!("  {}", step.line());
    }
    let code = match tuned.chosen.map(|i| &tuned.steps[i]) {
        Some(step) if a.dry_run => {
            println!("would store {} (--dry-run: nothing stored)", step.line());
            ExitCode::SUCCESS
        }
        Some(step) => {
            tune::store(&pool, &spec.model, step).await?;
            println!(
                "stored for {}: ef_search={}{}; embed_worker.search uses it from its next call",
                spec.model,
                step.ef_search,
                step.max_scan_tuples
                    .map_or(String::new(), |t| format!(", max_scan_tuples={t}"))
            );
            ExitCode::SUCCESS
        }
        None => {
            println!(
                "no setting met {target}: nothing stored (a denser index may: --candidate 'm=32')"
            );
            ExitCode::FAILURE
        }
    };
    if let Some(c) = candidate {
        let ef = tuned
            .chosen
            .map(|i| tuned.steps[i].ef_search)
            .unwrap_or(s.ef_search);
        let (rows, built) = tune::candidate(&pool, &spec, &c, a.sample, p.queries, p.k, ef).await?;
        println!(
            "indexes on a sample copy of {rows} rows (ef_search={ef}, k={}):",
            p.k
        );
        for b in &built {
            println!(
                "  {}: build {:.1} s, {:.1} MB, recall@{} {:.3}, p50/p95 {:.2}/{:.2} ms",
                b.params,
                b.build_secs,
                b.bytes as f64 / 1_048_576.0,
                p.k,
                b.recall,
                b.p50_ms,
                b.p95_ms
            );
        }
    }
    Ok(code)
}
