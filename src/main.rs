//! The `embed-worker` command line. Each subcommand is one operator task; `--help` lists them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use embed_worker::config::Settings;
use embed_worker::telemetry::{self, LogFormat};
use embed_worker::{db, models, seed};

#[derive(Parser, Debug)]
#[command(
    name = "embed-worker",
    version,
    about = "Keeps pgvector embeddings in step with the app's text"
)]
struct Cli {
    /// Extra configuration file layered over config/default.toml.
    #[arg(long, global = true, env = "EMBED_WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// Log format (default from config `log.format`).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the effective configuration (file + environment), secrets redacted.
    Config,
    /// Apply apalis-postgres's and embed-worker's migrations (idempotent).
    Migrate,
    /// Check the schema: vector indexes (HNSW, m=16, ef_construction=64), RLS, source trigger.
    Verify,
    /// Load the question templates from a TOML file (idempotent).
    SeedTemplates {
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/config/templates.toml"))]
        file: PathBuf,
    },
    /// Insert about N demo practice sessions for three demo users (once).
    SeedSessions {
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
    /// Consume the embed queue until SIGTERM/SIGINT (or, with --until-empty, until it drains).
    Run {
        /// Exit 0 once no job is pending or running (demo, batch use).
        #[arg(long)]
        until_empty: bool,
    },
    /// Queue embed jobs: every session and template (--all), or the given sources.
    Enqueue {
        #[arg(long)]
        all: bool,
        /// session or template, with --id.
        #[arg(long)]
        source_type: Option<embed_worker::source::SourceType>,
        #[arg(long)]
        id: Vec<uuid::Uuid>,
    },
    /// Job counts by state and the latest dead letters with their reasons.
    Status {
        /// How many dead letters to list.
        #[arg(long, default_value_t = 10)]
        failures: i64,
    },
    /// Re-queue dead letters (optionally only of one source type, or failed since a time).
    RetryFailed {
        #[arg(long)]
        source_type: Option<embed_worker::source::SourceType>,
        /// RFC 3339 time, e.g. 2026-11-26T00:00:00Z.
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Show this month's spend against the budget, or set the budget live (USD, 0 = none).
    Budget {
        #[command(subcommand)]
        action: Option<BudgetAction>,
    },
    /// Delete finished jobs past their retention (also done periodically by `run`).
    PruneJobs,
    /// Queue sources whose embeddings are missing, outdated, of another model, or too old.
    EnqueueStale {
        /// Print counts per reason; queue nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        limit: Option<i64>,
        #[arg(long)]
        source_type: Option<embed_worker::source::SourceType>,
    },
    /// Queue existing data not yet embedded by the active model, after an estimate and a prompt.
    Backfill {
        #[arg(long)]
        source_type: Option<embed_worker::source::SourceType>,
        /// Only sources updated since this RFC 3339 time.
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
        /// Show embedding progress until the queue drains.
        #[arg(long)]
        wait: bool,
    },
    /// Tokens and cost to embed everything not yet embedded by the active model.
    Estimate,
    /// Per model: rows, sources covered, % complete, index present and valid; or prune one.
    Models {
        #[command(subcommand)]
        action: Option<ModelsAction>,
    },
    /// Semantic search with the active model (as an app user under RLS with --as-user).
    Search {
        text: String,
        #[arg(long, default_value_t = 5)]
        k: i64,
        #[arg(long)]
        source_type: Option<embed_worker::source::SourceType>,
        #[arg(long)]
        as_user: Option<uuid::Uuid>,
        #[arg(long, default_value_t = 100)]
        ef_search: u32,
    },
}

#[derive(Subcommand, Debug)]
enum BudgetAction {
    /// Set the monthly budget in USD (0 = none); every replica sees it within budget.recheck_secs.
    Set { usd: f64 },
}

#[derive(Subcommand, Debug)]
enum ModelsAction {
    /// Drop an old model's rows and index (refused while the active model is below 100%).
    Prune { model: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    embed_worker::init_tls();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "embed-worker: {}",
                embed_worker::redact::secrets(&format!("{e:#}"), None)
            );
            return ExitCode::from(2);
        }
    };
    telemetry::init(cli.log_format.unwrap_or(settings.log.format));
    let json_logs = cli.log_format.unwrap_or(settings.log.format) == LogFormat::Json;
    match run(cli.command, settings).await {
        Ok(code) => code,
        Err(e) => {
            // Once: as a JSON log event where logs are JSON, else as a plain line.
            let message = embed_worker::redact::secrets(&format!("{e:#}"), None);
            if json_logs {
                tracing::error!(error = %message, "command failed");
            } else {
                eprintln!("embed-worker: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Config => {
            println!("{settings:#?}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let pool = db::connect_admin(&settings.database.url).await?;
            db::migrate(&pool).await?;
            db::apply_capture(&pool, settings.capture.sessions, settings.capture.templates).await?;
            embed_worker::guard::budget::set(&pool, settings.budget.monthly_usd).await?;
            models::ensure_model_index(&pool, &settings.model.name, settings.model.dimensions)
                .await?;
            println!(
                "migrations applied; change capture sessions={} templates={}; index {} ready",
                settings.capture.sessions,
                settings.capture.templates,
                models::index_name(&settings.model.name)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify => {
            let pool = db::connect_admin(&settings.database.url).await?;
            let report = db::verify(&pool, &models::index_name(&settings.model.name)).await?;
            println!(
                "{:<56} {:<8} {:<32} valid",
                "vector index", "method", "options"
            );
            for ix in &report.indexes {
                println!(
                    "{:<56} {:<8} {:<32} {}",
                    ix.name,
                    ix.access_method,
                    ix.options.join(","),
                    ix.valid
                );
            }
            if report.problems.is_empty() {
                println!("verify: OK");
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &report.problems {
                    println!("verify: FAIL: {p}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Run { until_empty } => {
            let worker = embed_worker::worker::Worker::build(settings).await?;
            let shutdown = embed_worker::worker::shutdown_signal();
            if until_empty {
                let pool = worker.pool.clone();
                let queue = worker.settings.queue.name.clone();
                let drained = async move {
                    loop {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                        if let Ok(0) = embed_worker::queue::open_jobs(&pool, &queue).await {
                            break;
                        }
                    }
                };
                worker
                    .run(async move {
                        tokio::select! { _ = shutdown => {}, _ = drained => {} }
                    })
                    .await?;
            } else {
                worker.run(shutdown).await?;
            }
            let st = &worker.pipeline.stats;
            let load =
                |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            println!(
                "api requests: {}, tokens embedded: {}, tokens saved: {}, chunks written: {}, rate limited: {}",
                load(&st.api_requests),
                load(&st.tokens_embedded),
                load(&st.tokens_saved),
                load(&st.chunks_written),
                load(&st.rate_limited)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Enqueue {
            all,
            source_type,
            id,
        } => {
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
        Command::Status { failures } => {
            let pool = db::connect(&settings.database).await?;
            let queue = &settings.queue.name;
            println!("queue {queue}: jobs by state");
            for (state, n) in embed_worker::queue::counts_by_state(&pool, queue).await? {
                println!("  {state:<10} {n}");
            }
            let (spent, budget) = embed_worker::guard::budget::month(&pool).await?;
            if budget > 0.0 {
                println!(
                    "spend this month: ${spent:.4} of ${budget:.2} budget ({:.1}%)",
                    spent * 100.0 / budget
                );
            } else {
                println!("spend this month: ${spent:.4} (no budget set)");
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
        Command::RetryFailed { source_type, since } => {
            let pool = db::connect(&settings.database).await?;
            let n =
                embed_worker::queue::retry_failed(&pool, &settings.queue.name, source_type, since)
                    .await?;
            println!("{n} dead letters re-queued");
            Ok(ExitCode::SUCCESS)
        }
        Command::EnqueueStale {
            dry_run,
            limit,
            source_type,
        } => {
            let pool = db::connect(&settings.database).await?;
            let scope = embed_worker::freshness::Scope {
                source_type,
                limit,
                max_age_days: Some(settings.freshness.max_age_days),
                ..Default::default()
            };
            let stale =
                embed_worker::freshness::find_stale(&pool, &settings.model.name, &scope).await?;
            for (reason, n) in embed_worker::freshness::counts(&stale) {
                println!("{reason:<12} {n}");
            }
            if dry_run {
                println!("dry run: nothing queued");
            } else {
                let sources: Vec<_> = stale.iter().map(|s| s.source).collect();
                let n = embed_worker::freshness::enqueue_all(
                    &pool,
                    &settings.queue.name,
                    settings.queue.max_attempts,
                    &sources,
                    |_, _| {},
                )
                .await?;
                println!(
                    "{n} jobs queued ({} already pending)",
                    sources.len() as i64 - n
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Backfill {
            source_type,
            since,
            yes,
            wait,
        } => {
            let pool = db::connect(&settings.database).await?;
            let scope = embed_worker::freshness::Scope {
                source_type,
                since,
                ..Default::default()
            };
            embed_worker::ops::backfill(&pool, &settings, &scope, yes, wait).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Estimate => {
            let pool = db::connect(&settings.database).await?;
            let stale = embed_worker::freshness::find_stale(
                &pool,
                &settings.model.name,
                &embed_worker::freshness::Scope::default(),
            )
            .await?;
            let todo: Vec<_> = stale
                .iter()
                .filter(|s| s.reason != "outdated")
                .map(|s| s.source)
                .collect();
            let e = embed_worker::ops::estimate(&pool, &settings, &todo).await?;
            println!(
                "not yet embedded by {}: {} sources, {} tokens, ${:.4} at ${}/1M tokens",
                settings.model.name,
                e.sources,
                e.tokens,
                e.usd,
                settings.model.usd_per_million_tokens
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Models { action } => {
            let pool = db::connect_admin(&settings.database.url).await?;
            match action {
                None => {
                    println!(
                        "{:<32} {:>6} {:>9} {:>9} {:>7}  index",
                        "model", "active", "rows", "sources", "done"
                    );
                    for m in models::status(&pool, &settings.model.name).await? {
                        println!(
                            "{:<32} {:>6} {:>9} {:>9} {:>6.1}%  {}",
                            m.model,
                            if m.active { "yes" } else { "" },
                            m.rows,
                            m.sources,
                            m.percent,
                            match (&m.index, m.index_valid) {
                                (Some(ix), true) => format!("{ix} (valid)"),
                                (Some(ix), false) => format!("{ix} (INVALID)"),
                                (None, _) => "MISSING".to_string(),
                            }
                        );
                    }
                }
                Some(ModelsAction::Prune { model }) => {
                    let n = models::prune(&pool, &model, &settings.model.name).await?;
                    println!("pruned {model}: {n} rows deleted, index dropped");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Search {
            text,
            k,
            source_type,
            as_user,
            ef_search,
        } => {
            let pool = db::connect_admin(&settings.database.url).await?;
            let embedder =
                embed_worker::embed::Embedder::from_settings(&settings.api, &settings.model)?;
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
                ..Default::default()
            };
            let started = std::time::Instant::now();
            let hits = embed_worker::search::search(
                &pool,
                &settings.model.name,
                settings.model.dimensions,
                query,
                &opts,
            )
            .await?;
            let took = started.elapsed();
            let labels = embed_worker::search::labels(&pool, &hits).await?;
            for h in &hits {
                let label = labels
                    .get(&h.source_id)
                    .cloned()
                    .unwrap_or_else(|| format!("{} {}", h.source_type, h.source_id));
                println!("{:.4}  {label}", 1.0 - h.distance);
            }
            println!(
                "{} hits in {:.1} ms",
                hits.len(),
                took.as_secs_f64() * 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Budget { action } => {
            if let Some(BudgetAction::Set { usd }) = action {
                anyhow::ensure!(
                    usd.is_finite() && usd >= 0.0,
                    "budget set {usd}: the monthly budget must be a finite number of USD >= 0 (0 = none)"
                );
            }
            let pool = db::connect_admin(&settings.database.url).await?;
            if let Some(BudgetAction::Set { usd }) = action {
                embed_worker::guard::budget::set(&pool, usd).await?;
            }
            let (spent, budget) = embed_worker::guard::budget::month(&pool).await?;
            println!("spend this month: ${spent:.4}; budget: ${budget:.2} (0 = none)");
            Ok(ExitCode::SUCCESS)
        }
        Command::PruneJobs => {
            let pool = db::connect(&settings.database).await?;
            let r = &settings.retention;
            let (done, failed) = embed_worker::queue::prune_finished(
                &pool,
                &settings.queue.name,
                std::time::Duration::from_secs(r.done_after_hours * 3600),
                std::time::Duration::from_secs(r.failed_after_hours * 3600),
            )
            .await?;
            println!("deleted {done} finished and {failed} dead-letter jobs");
            Ok(ExitCode::SUCCESS)
        }
        Command::SeedSessions { count } => {
            let pool = db::connect_admin(&settings.database.url).await?;
            let n = seed::seed_demo_sessions(&pool, count).await?;
            println!("demo sessions: {n} inserted");
            Ok(ExitCode::SUCCESS)
        }
        Command::SeedTemplates { file } => {
            let seeds = seed::read_templates(&file)?;
            let pool = db::connect_admin(&settings.database.url).await?;
            let (inserted, updated) = seed::seed_templates(&pool, &seeds)
                .await
                .context("seeding templates")?;
            println!(
                "templates: {} in file, {inserted} inserted, {updated} updated",
                seeds.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
