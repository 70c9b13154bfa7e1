//! Typed configuration: `config/default.toml`, then an optional `--config` file, then the
//! environment (`EMBED_WORKER__SECTION__KEY`, plus `DATABASE_URL`).
//!
//! Why typed and layered: a pod gets its settings from env and Secrets (12-factor) while a
//! developer edits one file; either way a typo fails at start-up, not at 3 a.m. The API key is
//! never part of this file-backed struct's serialised form: it is read from `OPENAI_API_KEY` or
//! `OPENAI_API_KEY_FILE` and kept in a [`SecretString`] whose `Debug` prints `[REDACTED]`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use secrecy::SecretString;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// Everything the worker reads at start, section by section as in `config/default.toml`.
pub struct Settings {
    /// `[database]`: where and as whom.
    pub database: DatabaseSettings,
    /// `[queue]`: the apalis queue and how jobs are claimed.
    pub queue: QueueSettings,
    /// `[batch]`: how jobs are grouped into batches.
    pub batch: BatchSettings,
    /// `[api]`: the provider's endpoint and per-request limits.
    pub api: ApiSettings,
    /// `[model]`: which model, its size and price.
    pub model: ModelSettings,
    /// `[render]`: how a source becomes text.
    pub render: RenderSettings,
    /// `[shutdown]`: graceful stop.
    pub shutdown: ShutdownSettings,
    /// `[log]`: log format.
    pub log: LogSettings,
    /// `[rate_limit]`: requests and tokens per minute.
    pub rate_limit: RateLimitSettings,
    /// `[retry]`: backoff of requests and jobs.
    pub retry: RetrySettings,
    /// `[retention]`: how long finished jobs are kept.
    pub retention: RetentionSettings,
    /// `[http]`: metrics and probes.
    pub http: HttpSettings,
    /// `[capture]`: change-capture triggers.
    pub capture: CaptureSettings,
    /// `[freshness]`: stale scans.
    pub freshness: FreshnessSettings,
    /// `[budget]`: the monthly spend limit.
    pub budget: BudgetSettings,
    /// `[index]`: each model's HNSW index: precision and when it is built.
    pub index: IndexSettings,
    /// `[bulk]`: the lane of backfills and stale re-embeds (sync, or the Batch API).
    pub bulk: BulkSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[bulk]`.
pub struct BulkSettings {
    /// How bulk jobs are embedded: `sync` (the embeddings endpoint, after every interactive job)
    /// or `batch` (OpenAI's Batch API: half price, results within 24 hours).
    pub mode: BulkMode,
    /// Queue priority of bulk jobs (interactive jobs have 0; apalis claims higher first).
    pub priority: i32,
    /// Sources claimed into one batch at most.
    pub max_sources_per_batch: usize,
    /// Requests (lines) per batch file (OpenAI: 50,000).
    pub max_requests_per_batch: usize,
    /// Embedding inputs per batch, all requests together (OpenAI: 50,000).
    pub max_inputs_per_batch: usize,
    /// Batch file size in MB (OpenAI: 200).
    pub max_file_mb: usize,
    /// How often `run` polls open batches and submits new ones.
    pub poll_secs: u64,
    /// Batches open at the provider at once at most.
    pub max_open_batches: usize,
}

/// `bulk.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BulkMode {
    /// The embeddings endpoint, at a lower queue priority than interactive jobs.
    Sync,
    /// OpenAI's Batch API (`/v1/files`, `/v1/batches`).
    Batch,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[index]`.
pub struct IndexSettings {
    /// `auto` (full up to 2,000 dimensions, half above), `full` (`vector`) or `half` (`halfvec`).
    pub precision: IndexPrecision,
    /// `backfill` and `enqueue-stale` defer the active model's index (drop it while the model has
    /// no rows; built once the backlog drains) when they queue at least this many sources
    /// (0 = never defer).
    pub defer_min_sources: usize,
    /// How often `run` checks whether a missing index can be built (one builder across replicas).
    pub check_interval_secs: u64,
    /// Upper bound of `maintenance_work_mem` for a build, in MB (sized to the graph below it).
    pub max_build_memory_mb: u64,
    /// Parallel workers a build may use (`max_parallel_maintenance_workers`).
    pub build_parallel_workers: u32,
}

/// The type the HNSW index stores (`index.precision`); the column always keeps full precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexPrecision {
    /// `full` up to 2,000 dimensions (pgvector's `vector` HNSW limit), `half` above.
    Auto,
    /// `vector(d)`, 4 bytes a dimension, up to 2,000 dimensions.
    Full,
    /// `halfvec(d)`, 2 bytes a dimension, up to 4,000 dimensions.
    Half,
}

impl IndexPrecision {
    /// pgvector's HNSW limit for `vector`.
    pub const MAX_FULL_DIMS: usize = 2000;
    /// pgvector's HNSW limit for `halfvec`.
    pub const MAX_HALF_DIMS: usize = 4000;
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[budget]`.
pub struct BudgetSettings {
    /// Monthly budget in USD for all replicas (0 = none).
    pub monthly_usd: f64,
    /// While stopped at the budget, check again this often.
    pub recheck_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[capture]`: which change-capture triggers `migrate` enables.
pub struct CaptureSettings {
    /// Queue a job when a session's embedded text changes.
    pub sessions: bool,
    /// Queue a job when a template's embedded text changes.
    pub templates: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[freshness]`.
pub struct FreshnessSettings {
    /// Re-embed rows older than this many days (0 = never).
    pub max_age_days: u64,
    /// Periodic stale scan interval, one scanner across replicas (0 = off).
    pub scan_interval_secs: u64,
    /// Rows one scan queues at most (0 = no limit).
    pub scan_limit: i64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[http]`.
pub struct HttpSettings {
    /// Address for /metrics, /healthz, /readyz (empty disables).
    pub addr: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[retention]`.
pub struct RetentionSettings {
    /// `Done` jobs are deleted after this long.
    pub done_after_hours: u64,
    /// Dead letters (and staged chunks) are deleted after this long.
    pub failed_after_hours: u64,
    /// How often `run` prunes.
    pub interval_secs: u64,
}

impl RetentionSettings {
    /// How long `Done` jobs are kept.
    pub fn done_age(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.done_after_hours * 3600)
    }
    /// How long dead letters (and staged chunks of sources that never completed) are kept.
    pub fn failed_age(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.failed_after_hours * 3600)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[rate_limit]`: the provider's limits for this organisation (0 = unlimited).
pub struct RateLimitSettings {
    /// Requests per "minute" (`period_secs`).
    pub requests_per_minute: u32,
    /// Tokens per "minute" (`period_secs`).
    pub tokens_per_minute: u32,
    /// Length of the "minute" in seconds (tests shorten it).
    pub period_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[retry]`.
pub struct RetrySettings {
    /// Retries of a transient API error in place, before the job retries later.
    pub request_retries: u32,
    /// First in-place backoff, in ms (full jitter, doubling).
    pub base_ms: u64,
    /// Longest in-place backoff, in ms.
    pub cap_ms: u64,
    /// First backoff of a retried job, in seconds (doubling by attempt).
    pub job_backoff_base_secs: u64,
    /// Longest backoff of a retried job, in seconds.
    pub job_backoff_cap_secs: u64,
    /// After `insufficient_quota` or a refused key, one probe after this long.
    pub quota_recheck_secs: u64,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[database]`.
pub struct DatabaseSettings {
    /// `DATABASE_URL`: where to connect.
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// Role to `SET ROLE` to after connecting; empty means the login role.
    pub role: String,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &crate::redact::url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("role", &self.role)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[queue]`.
pub struct QueueSettings {
    /// The queue (apalis `job_type`).
    pub name: String,
    /// Jobs claimed per poll.
    pub fetch_batch: usize,
    /// Jobs held at once by one process.
    pub concurrency: usize,
    /// Poll interval besides LISTEN/NOTIFY.
    pub poll_interval_ms: u64,
    /// Attempts before a retried job is a dead letter.
    pub max_attempts: i32,
    /// Worker heartbeat interval.
    pub heartbeat_secs: u64,
    /// Missed heartbeats after which a worker's jobs are re-queued.
    pub missed_heartbeats: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[batch]`.
pub struct BatchSettings {
    /// A batch flushes at this many jobs...
    pub max_jobs: usize,
    /// ...or when its oldest job has waited this long.
    pub linger_ms: u64,
    /// Batches (and API requests) at once.
    pub max_in_flight: usize,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[api]`.
pub struct ApiSettings {
    /// The OpenAI-compatible endpoint.
    pub base_url: String,
    /// A request with no answer after this long is a transient error.
    pub timeout_secs: u64,
    /// Inputs per request (OpenAI: 2,048).
    pub max_inputs_per_request: usize,
    /// Budgeted tokens per request (OpenAI: 300,000).
    pub max_tokens_per_request: usize,
    /// Never from the file: filled from the environment by [`Settings::load`].
    #[serde(skip)]
    pub api_key: Option<SecretString>,
}

impl std::fmt::Debug for ApiSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSettings")
            .field("base_url", &self.base_url)
            .field("timeout_secs", &self.timeout_secs)
            .field("max_inputs_per_request", &self.max_inputs_per_request)
            .field("max_tokens_per_request", &self.max_tokens_per_request)
            .field("api_key", &self.api_key.as_ref().map(|_| "[REDACTED]"))
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[model]`.
pub struct ModelSettings {
    /// `openai` (any OpenAI-compatible API) or `local` (all-MiniLM-L6-v2 in-process).
    pub provider: Provider,
    /// The local model's folder (config.json, tokenizer.json, model.safetensors).
    pub local_path: String,
    /// The model's name as the provider knows it (and `embedding_model`).
    pub name: String,
    /// Vector dimensions.
    pub dimensions: usize,
    /// Send `dimensions` to the API (only text-embedding-3-* accept it).
    pub send_dimensions: bool,
    /// Longest chunk, in the model's tokens.
    pub max_input_tokens: usize,
    /// Overlap between chunks of a split text, in tokens.
    pub chunk_overlap_tokens: usize,
    /// Price, for cost metrics and the budget.
    pub usd_per_million_tokens: f64,
    /// Price through the Batch API (OpenAI: half the synchronous price).
    pub batch_usd_per_million_tokens: f64,
    /// A source longer than this (in tokens, all chunks) is a dead letter with its size, never
    /// embedded: one 50 MB paste would otherwise take the whole token quota.
    pub max_source_tokens: usize,
}

/// Who computes the embeddings (`model.provider`); anything else is refused when the
/// configuration is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Any OpenAI-compatible `/v1/embeddings` (OpenAI, Azure, vLLM, TEI, Ollama, the fake).
    Openai,
    /// all-MiniLM-L6-v2 in-process (needs the `local` cargo feature).
    Local,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[render]`: `{field}` placeholders; empty lines are dropped.
pub struct RenderSettings {
    /// How a session becomes text.
    pub session: String,
    /// How a template becomes text.
    pub template: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[shutdown]`.
pub struct ShutdownSettings {
    /// In-flight batches get this long after SIGTERM.
    pub grace_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
/// `[log]`.
pub struct LogSettings {
    /// `human` or `json`; anything else is refused when the configuration is read.
    pub format: crate::telemetry::LogFormat,
}

/// `EMBED_WORKER_CONFIG_DIR`, else the source tree's `config/` (development), else `./config`.
fn config_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EMBED_WORKER_CONFIG_DIR") {
        return PathBuf::from(dir);
    }
    let source_tree = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    if source_tree.join("default.toml").exists() {
        source_tree
    } else {
        PathBuf::from("config")
    }
}

impl Settings {
    /// Defaults file, optional extra file, environment. Reads the API key from the environment.
    pub fn load(extra_file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from(config_dir().join("default.toml")).required(true));
        if let Some(path) = extra_file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("EMBED_WORKER")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        if let Ok(url) = std::env::var("DATABASE_URL") {
            builder = builder.set_override("database.url", url)?;
        }
        let mut settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("invalid configuration")?;
        settings.api.api_key = api_key_from_env()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Every value against its allowed range, so no configuration reaches a panic, a worker that
    /// silently does nothing, or a heartbeat shorter than a request. One line per bad key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut bad = Vec::new();
        let mut check = |ok: bool, key: &str, value: &dyn std::fmt::Display, allowed: &str| {
            if !ok {
                bad.push(format!(
                    "{key} = {value} is out of range (allowed: {allowed})"
                ));
            }
        };
        let d = &self.database;
        check(
            !d.url.trim().is_empty(),
            "database.url",
            &"\"\"",
            "a postgres:// URL",
        );
        check(
            (1..=1000).contains(&d.max_connections),
            "database.max_connections",
            &d.max_connections,
            "1..=1000",
        );
        let q = &self.queue;
        check(
            !q.name.is_empty()
                && q.name.len() <= 64
                && q.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c)),
            "queue.name",
            &format!("{:?}", q.name),
            "1-64 characters of A-Z a-z 0-9 _ . : -",
        );
        check(
            (1..=10_000).contains(&q.fetch_batch),
            "queue.fetch_batch",
            &q.fetch_batch,
            "1..=10000",
        );
        check(
            (1..=100_000).contains(&q.concurrency),
            "queue.concurrency",
            &q.concurrency,
            "1..=100000",
        );
        check(
            (10..=60_000).contains(&q.poll_interval_ms),
            "queue.poll_interval_ms",
            &q.poll_interval_ms,
            "10..=60000",
        );
        check(
            (1..=100).contains(&q.max_attempts),
            "queue.max_attempts",
            &q.max_attempts,
            "1..=100",
        );
        check(
            (1..=3600).contains(&q.heartbeat_secs),
            "queue.heartbeat_secs",
            &q.heartbeat_secs,
            "1..=3600",
        );
        check(
            (2..=100).contains(&q.missed_heartbeats),
            "queue.missed_heartbeats",
            &q.missed_heartbeats,
            "2..=100",
        );
        let b = &self.batch;
        check(
            (1..=10_000).contains(&b.max_jobs),
            "batch.max_jobs",
            &b.max_jobs,
            "1..=10000",
        );
        check(
            b.linger_ms <= 60_000,
            "batch.linger_ms",
            &b.linger_ms,
            "0..=60000",
        );
        check(
            (1..=256).contains(&b.max_in_flight),
            "batch.max_in_flight",
            &b.max_in_flight,
            "1..=256",
        );
        let a = &self.api;
        check(
            a.base_url.starts_with("http://") || a.base_url.starts_with("https://"),
            "api.base_url",
            &format!("{:?}", a.base_url),
            "an http:// or https:// URL",
        );
        check(
            (1..=3600).contains(&a.timeout_secs),
            "api.timeout_secs",
            &a.timeout_secs,
            "1..=3600",
        );
        check(
            (1..=2048).contains(&a.max_inputs_per_request),
            "api.max_inputs_per_request",
            &a.max_inputs_per_request,
            "1..=2048",
        );
        check(
            (self.model.max_input_tokens.max(1)..=300_000).contains(&a.max_tokens_per_request),
            "api.max_tokens_per_request",
            &a.max_tokens_per_request,
            &format!(
                "model.max_input_tokens ({})..=300000",
                self.model.max_input_tokens
            ),
        );
        let m = &self.model;
        check(
            cfg!(feature = "local") || m.provider != Provider::Local,
            "model.provider",
            &"\"local\"",
            "\"openai\" (this build has no `local` feature)",
        );
        check(
            !m.name.is_empty() && m.name.len() <= 100,
            "model.name",
            &format!("{:?}", m.name),
            "1-100 characters (rag_embeddings.embedding_model is varchar(100))",
        );
        check(
            (1..=IndexPrecision::MAX_HALF_DIMS).contains(&m.dimensions),
            "model.dimensions",
            &m.dimensions,
            "1..=4000: pgvector's HNSW indexes `vector` up to 2,000 and `halfvec` up to 4,000 dimensions",
        );
        check(
            self.index.precision != IndexPrecision::Full
                || m.dimensions <= IndexPrecision::MAX_FULL_DIMS,
            "index.precision",
            &format!("\"full\" with model.dimensions = {}", m.dimensions),
            "\"half\" or \"auto\" over 2,000 dimensions (pgvector's HNSW `vector` limit)",
        );
        check(
            (16..=1_000_000).contains(&m.max_input_tokens),
            "model.max_input_tokens",
            &m.max_input_tokens,
            "16..=1000000",
        );
        check(
            m.chunk_overlap_tokens < m.max_input_tokens / 2,
            "model.chunk_overlap_tokens",
            &m.chunk_overlap_tokens,
            &format!(
                "0..{} (below half of model.max_input_tokens)",
                m.max_input_tokens / 2
            ),
        );
        check(
            m.usd_per_million_tokens.is_finite() && m.usd_per_million_tokens >= 0.0,
            "model.usd_per_million_tokens",
            &m.usd_per_million_tokens,
            "a finite number >= 0",
        );
        check(
            m.max_source_tokens >= m.max_input_tokens,
            "model.max_source_tokens",
            &m.max_source_tokens,
            &format!(">= model.max_input_tokens ({})", m.max_input_tokens),
        );
        check(
            self.shutdown.grace_secs <= 3600,
            "shutdown.grace_secs",
            &self.shutdown.grace_secs,
            "0..=3600",
        );
        let r = &self.rate_limit;
        check(
            (1..=3600).contains(&r.period_secs),
            "rate_limit.period_secs",
            &r.period_secs,
            "1..=3600",
        );
        let t = &self.retry;
        check(
            t.request_retries <= 20,
            "retry.request_retries",
            &t.request_retries,
            "0..=20",
        );
        check(
            (1..=60_000).contains(&t.base_ms),
            "retry.base_ms",
            &t.base_ms,
            "1..=60000",
        );
        check(
            (t.base_ms..=600_000).contains(&t.cap_ms),
            "retry.cap_ms",
            &t.cap_ms,
            "retry.base_ms..=600000",
        );
        check(
            (1..=86_400).contains(&t.job_backoff_base_secs),
            "retry.job_backoff_base_secs",
            &t.job_backoff_base_secs,
            "1..=86400",
        );
        check(
            (t.job_backoff_base_secs..=604_800).contains(&t.job_backoff_cap_secs),
            "retry.job_backoff_cap_secs",
            &t.job_backoff_cap_secs,
            "retry.job_backoff_base_secs..=604800",
        );
        check(
            (1..=86_400).contains(&t.quota_recheck_secs),
            "retry.quota_recheck_secs",
            &t.quota_recheck_secs,
            "1..=86400",
        );
        let n = &self.retention;
        check(
            n.done_after_hours >= 1,
            "retention.done_after_hours",
            &n.done_after_hours,
            ">= 1",
        );
        check(
            n.failed_after_hours >= 1,
            "retention.failed_after_hours",
            &n.failed_after_hours,
            ">= 1",
        );
        check(
            n.interval_secs >= 1,
            "retention.interval_secs",
            &n.interval_secs,
            ">= 1",
        );
        check(
            self.http.addr.is_empty() || self.http.addr.parse::<std::net::SocketAddr>().is_ok(),
            "http.addr",
            &format!("{:?}", self.http.addr),
            "host:port (an IP address and a port), or empty to disable",
        );
        let f = &self.freshness;
        check(
            f.scan_limit >= 0,
            "freshness.scan_limit",
            &f.scan_limit,
            ">= 0 (0 = no limit)",
        );
        let g = &self.budget;
        check(
            g.monthly_usd.is_finite() && g.monthly_usd >= 0.0,
            "budget.monthly_usd",
            &g.monthly_usd,
            "a finite number >= 0 (0 = none)",
        );
        check(
            (1..=86_400).contains(&g.recheck_secs),
            "budget.recheck_secs",
            &g.recheck_secs,
            "1..=86400",
        );
        let b = &self.bulk;
        check(
            (-100..=-1).contains(&b.priority),
            "bulk.priority",
            &b.priority,
            "-100..=-1 (below interactive jobs' 0)",
        );
        check(
            (1..=50_000).contains(&b.max_sources_per_batch),
            "bulk.max_sources_per_batch",
            &b.max_sources_per_batch,
            "1..=50000",
        );
        check(
            (1..=50_000).contains(&b.max_requests_per_batch),
            "bulk.max_requests_per_batch",
            &b.max_requests_per_batch,
            "1..=50000 (OpenAI's limit)",
        );
        check(
            (1..=50_000).contains(&b.max_inputs_per_batch),
            "bulk.max_inputs_per_batch",
            &b.max_inputs_per_batch,
            "1..=50000 (OpenAI's limit)",
        );
        check(
            (1..=200).contains(&b.max_file_mb),
            "bulk.max_file_mb",
            &b.max_file_mb,
            "1..=200 (OpenAI's limit)",
        );
        check(
            (1..=3600).contains(&b.poll_secs),
            "bulk.poll_secs",
            &b.poll_secs,
            "1..=3600",
        );
        check(
            (1..=1000).contains(&b.max_open_batches),
            "bulk.max_open_batches",
            &b.max_open_batches,
            "1..=1000",
        );
        check(
            m.batch_usd_per_million_tokens.is_finite() && m.batch_usd_per_million_tokens >= 0.0,
            "model.batch_usd_per_million_tokens",
            &m.batch_usd_per_million_tokens,
            "a finite number >= 0",
        );
        let ix = &self.index;
        check(
            (1..=86_400).contains(&ix.check_interval_secs),
            "index.check_interval_secs",
            &ix.check_interval_secs,
            "1..=86400",
        );
        check(
            (64..=65_536).contains(&ix.max_build_memory_mb),
            "index.max_build_memory_mb",
            &ix.max_build_memory_mb,
            "64..=65536",
        );
        check(
            ix.build_parallel_workers <= 64,
            "index.build_parallel_workers",
            &ix.build_parallel_workers,
            "0..=64",
        );
        if bad.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("invalid configuration:\n  {}", bad.join("\n  "))
        }
    }
}

/// `OPENAI_API_KEY`, or the trimmed contents of the file named by `OPENAI_API_KEY_FILE`.
fn api_key_from_env() -> anyhow::Result<Option<SecretString>> {
    if let Ok(path) = std::env::var("OPENAI_API_KEY_FILE") {
        let key = std::fs::read_to_string(&path)
            .with_context(|| format!("reading OPENAI_API_KEY_FILE {path}"))?;
        return Ok(Some(SecretString::from(key.trim().to_string())));
    }
    Ok(std::env::var("OPENAI_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(SecretString::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_in_url() {
        assert_eq!(
            crate::redact::url("postgres://u:hunter2@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(crate::redact::url("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn api_key_never_in_debug() {
        let api = ApiSettings {
            base_url: "http://x".into(),
            timeout_secs: 1,
            max_inputs_per_request: 1,
            max_tokens_per_request: 1,
            api_key: Some(SecretString::from("sk-supersecret".to_string())),
        };
        let printed = format!("{api:?}");
        assert!(!printed.contains("sk-supersecret"), "{printed}");
        assert!(printed.contains("[REDACTED]"));
    }
}
