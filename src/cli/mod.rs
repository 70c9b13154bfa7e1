//! The subcommands: one function per operator task, grouped by what it touches.
//!
//! Why here and not in `main`: `main` only parses, configures, sets up telemetry once and
//! dispatches; each task opens what it needs and prints its own answer (as River's CLI does,
//! one `run` per command).

mod admin;
mod freshness;
mod queue;
mod search;
mod seed;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use embed_worker::config::Settings;
use embed_worker::telemetry::LogFormat;

#[derive(Parser, Debug)]
#[command(
    name = "embed-worker",
    version,
    about = "Keeps pgvector embeddings in step with the app's text"
)]
pub(crate) struct Cli {
    /// Extra configuration file layered over config/default.toml.
    #[arg(long, global = true, env = "EMBED_WORKER_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Log format (default from config `log.format`).
    #[arg(long, global = true, value_enum)]
    pub(crate) log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Print the effective configuration (file + environment), secrets redacted.
    Config,
    /// Apply apalis-postgres's and embed-worker's migrations (idempotent), after printing the
    /// plan read from the catalog; refuses, changing nothing, when the database conflicts.
    Migrate {
        /// Print the plan (and any conflicts) and change nothing; exits 1 on a conflict.
        #[arg(long)]
        plan: bool,
    },
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
    /// Batch API batches (bulk.mode = "batch"): state, progress, age, tokens, cost; or cancel one.
    Batches {
        #[command(subcommand)]
        action: Option<BatchesAction>,
        /// How many of the newest batches to list.
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
    /// Per model: role (writing, serving, retired), rows, sources covered, % complete, index
    /// present and valid; promote one to serving, or prune one.
    Models {
        #[command(subcommand)]
        action: Option<ModelsAction>,
    },
    /// The smallest hnsw.ef_search (and max_scan_tuples for users under RLS) that meets a
    /// recall target on the serving model's own vectors, stored for the model; with
    /// --candidate, other HNSW parameters compared with today's on a sample copy.
    Tune {
        /// Recall@k to meet (default: search.recall_target).
        #[arg(long)]
        target: Option<f64>,
        /// k (default: search.probe_k).
        #[arg(long)]
        k: Option<u32>,
        /// Queries per scope (default: search.probe_queries).
        #[arg(long)]
        queries: Option<u32>,
        /// Print the sweep and store nothing.
        #[arg(long)]
        dry_run: bool,
        /// HNSW parameters to compare with today's (m=16, ef_construction=64), e.g. 'm=32'.
        #[arg(long)]
        candidate: Option<String>,
        /// Rows copied for --candidate.
        #[arg(long, default_value_t = 20_000)]
        sample: i64,
    },
    /// Semantic search with the serving model (as an app user under RLS with --as-user).
    Search {
        text: String,
        #[arg(long, default_value_t = 5)]
        k: i64,
        #[arg(long)]
        source_type: Option<embed_worker::source::SourceType>,
        #[arg(long)]
        as_user: Option<uuid::Uuid>,
        /// hnsw.ef_search for this search (default: the model's tuned one, else search.ef_search).
        #[arg(long)]
        ef_search: Option<u32>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum BudgetAction {
    /// Set the monthly budget in USD (0 = none); every replica sees it within budget.recheck_secs.
    Set { usd: f64 },
}

#[derive(Subcommand, Debug)]
pub(crate) enum ModelsAction {
    /// Drop a retired model: its partition detached (CONCURRENTLY) and dropped, rows and index
    /// with it; refused for the serving and the writing model.
    Prune { model: String },
    /// Make MODEL the serving model (what searches read), in one transaction: refused with the
    /// reason while it covers less than 100% of the sources or its index is not valid. Rolling
    /// back is promoting the old model while its partition exists.
    Promote {
        model: String,
        /// Promote even below 100% coverage or without a valid index.
        #[arg(long)]
        force: bool,
    },
    /// Build the active model's HNSW index now (CONCURRENTLY), as the table's owner; also drops
    /// a dead build's invalid leftover and the model's superseded indexes.
    BuildIndex {
        /// Only if due: no open jobs and the model has rows (what `run` does on its own); for a
        /// CronJob running as the owner when the worker's login is not.
        #[arg(long)]
        when_due: bool,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum BatchesAction {
    /// Ask the provider to cancel a batch (by the id `batches` lists); its unanswered jobs go
    /// back to the queue when the lane sees it cancelled.
    Cancel { id: i64 },
    /// End a batch here whatever the provider says (stuck, gone, unreadable): its unanswered
    /// jobs go back to the queue with no attempt used; the batch is cancelled at the provider
    /// and its files deleted where the provider still answers.
    Abandon { id: i64 },
}

/// Runs one subcommand.
pub(crate) async fn dispatch(
    command: Command,
    settings: Settings,
    file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    match command {
        Command::Config => admin::config(&settings, file).await,
        Command::Migrate { plan } => admin::migrate(&settings, plan).await,
        Command::Verify => admin::verify(&settings).await,
        Command::Run { until_empty } => queue::run(settings, until_empty).await,
        Command::Enqueue {
            all,
            source_type,
            id,
        } => queue::enqueue(&settings, all, source_type, id).await,
        Command::Status { failures } => queue::status(&settings, failures).await,
        Command::RetryFailed { source_type, since } => {
            queue::retry_failed(&settings, source_type, since).await
        }
        Command::EnqueueStale {
            dry_run,
            limit,
            source_type,
        } => freshness::enqueue_stale(&settings, dry_run, limit, source_type).await,
        Command::Backfill {
            source_type,
            since,
            yes,
            wait,
        } => freshness::backfill(&settings, source_type, since, yes, wait).await,
        Command::Estimate => freshness::estimate(&settings).await,
        Command::Batches { action, limit } => queue::batches(&settings, action, limit).await,
        Command::Models { action } => admin::models(&settings, action).await,
        Command::Search {
            text,
            k,
            source_type,
            as_user,
            ef_search,
        } => search::search(&settings, text, k, source_type, as_user, ef_search).await,
        Command::Tune {
            target,
            k,
            queries,
            dry_run,
            candidate,
            sample,
        } => {
            search::tune(
                &settings,
                search::TuneArgs {
                    target,
                    k,
                    queries,
                    dry_run,
                    candidate,
                    sample,
                },
            )
            .await
        }
        Command::Budget { action } => admin::budget(&settings, action).await,
        Command::PruneJobs => queue::prune_jobs(&settings).await,
        Command::SeedSessions { count } => seed::seed_sessions(&settings, count).await,
        Command::SeedTemplates { file } => seed::seed_templates(&settings, file).await,
    }
}
