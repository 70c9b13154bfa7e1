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
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// `[models]`: the serving model's cutover.
    pub models: ModelsSettings,
    /// `[search]`: where searches and read-only reports read.
    pub search: SearchSettings,
    /// `[alerts]`: thresholds the worker exports for the alert rules.
    pub alerts: AlertsSettings,
    /// `[write]`: how a batch's rows reach `rag_embeddings`.
    pub write: WriteSettings,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[search]`: reads past the primary.
pub struct SearchSettings {
    /// Where `search` and the read-only reports (`models`, `status`) connect: a streaming standby,
    /// say (`EMBED_WORKER__SEARCH__DATABASE_URL`). Empty: the primary (`database.url`). The
    /// worker's writes, queue and locks always stay on the primary.
    #[serde(serialize_with = "redacted_url")]
    pub database_url: String,
    /// `hnsw.ef_search` of a model `tune` has not tuned (`embed_worker.search_settings`).
    pub ef_search: u32,
    /// `hnsw.max_scan_tuples` of an untuned model: how far an iterative scan walks for a
    /// filtered search.
    pub max_scan_tuples: u32,
    /// A caller who sees at most this many rows has them ranked exactly, not through the index.
    pub exact_below: u32,
    /// The recall probe runs every this many minutes (on the leader); 0: never.
    pub probe_minutes: u64,
    /// Queries per probe scope: stored vectors of the serving model, each ranked exactly too.
    pub probe_queries: u32,
    /// Recall@k the probe and `tune` hold the index to (alert `EmbedWorkerSearchRecallLow`).
    pub recall_target: f64,
    /// k of the probe and of `tune`.
    pub probe_k: u32,
}

impl SearchSettings {
    fn check(&self, c: &mut Checks) {
        c.within("search.ef_search", self.ef_search, 1, 1000);
        c.within(
            "search.max_scan_tuples",
            self.max_scan_tuples,
            1,
            100_000_000,
        );
        c.within("search.exact_below", self.exact_below, 0, 1_000_000);
        c.within("search.probe_minutes", self.probe_minutes, 0, 10_080);
        c.within("search.probe_queries", self.probe_queries, 1, 1000);
        c.within("search.recall_target", self.recall_target, 0.0, 1.0);
        c.within("search.probe_k", self.probe_k, 1, 100);
    }
}

/// The setting that names the primary, as errors cite it.
pub const PRIMARY_URL_KEY: &str = "database.url / DATABASE_URL";

impl SearchSettings {
    /// The URL reads go to: `database_url`, or the primary's.
    pub fn url<'a>(&'a self, primary: &'a DatabaseSettings) -> &'a str {
        self.source(primary).0
    }

    /// The URL reads go to and the setting it came from, as errors name it.
    pub fn source<'a>(&'a self, primary: &'a DatabaseSettings) -> (&'a str, &'static str) {
        if self.database_url.is_empty() {
            (&primary.url, PRIMARY_URL_KEY)
        } else {
            (
                &self.database_url,
                "search.database_url / EMBED_WORKER__SEARCH__DATABASE_URL",
            )
        }
    }
}

impl std::fmt::Debug for SearchSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SearchSettings")
            .field("database_url", &crate::redact::url(&self.database_url))
            .field("ef_search", &self.ef_search)
            .field("max_scan_tuples", &self.max_scan_tuples)
            .field("exact_below", &self.exact_below)
            .field("probe_minutes", &self.probe_minutes)
            .field("probe_queries", &self.probe_queries)
            .field("recall_target", &self.recall_target)
            .field("probe_k", &self.probe_k)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[write]`: how a batch's rows reach `rag_embeddings`.
pub struct WriteSettings {
    /// Connections one batch's new rows are written over at once, split by source (each a
    /// transaction of whole sources): HNSW insertion is one backend's work per connection.
    pub streams: usize,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[alerts]`: exported as gauges, so the shipped alert rules follow the configuration.
pub struct AlertsSettings {
    /// A streaming replica more than this many seconds behind the primary is alerted on
    /// (`embed_worker_replica_lag_alert_seconds`).
    pub replica_lag_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[models]`: how the serving model follows the writing one (`embed_worker.models`).
pub struct ModelsSettings {
    /// Promote the writing model to serving by itself once it covers every source and its index
    /// is valid; false: only `embed-worker models promote`.
    pub auto_promote: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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

impl BulkSettings {
    /// `[bulk]`'s ranges.
    fn check(&self, c: &mut Checks) {
        c.within_because(
            "bulk.priority",
            self.priority,
            -100,
            -1,
            "below interactive jobs' 0",
        );
        c.within(
            "bulk.max_sources_per_batch",
            self.max_sources_per_batch,
            1,
            50_000,
        );
        c.within_because(
            "bulk.max_requests_per_batch",
            self.max_requests_per_batch,
            1,
            50_000,
            "OpenAI's limit",
        );
        c.within_because(
            "bulk.max_inputs_per_batch",
            self.max_inputs_per_batch,
            1,
            50_000,
            "OpenAI's limit",
        );
        c.within_because(
            "bulk.max_file_mb",
            self.max_file_mb,
            1,
            200,
            "OpenAI's limit",
        );
        c.within("bulk.poll_secs", self.poll_secs, 1, 3600);
        c.within("bulk.max_open_batches", self.max_open_batches, 1, 1000);
    }
}

/// `bulk.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BulkMode {
    /// The embeddings endpoint, at a lower queue priority than interactive jobs.
    Sync,
    /// OpenAI's Batch API (`/v1/files`, `/v1/batches`).
    Batch,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[index]`.
pub struct IndexSettings {
    /// `auto` (full up to 2,000 dimensions, half above), `full` (`vector`) or `half` (`halfvec`).
    pub precision: IndexPrecision,
    /// `backfill` and `enqueue-stale` defer the active model's index (drop it while the model has
    /// no rows; built once the backlog drains) when they queue at least this many sources
    /// (0 = never defer).
    pub defer_min_sources: usize,
    /// How often `run` checks whether a missing index can be built (one builder across replicas);
    /// while a backlog it waits for drains, every 250 ms.
    pub check_interval_secs: u64,
    /// `run` builds a missing index itself once the backlog drains; false: only `models
    /// build-index` (or `migrate`) does.
    pub auto_build: bool,
    /// Upper bound of `maintenance_work_mem` for a build, in MB (sized to the graph below it).
    pub max_build_memory_mb: u64,
    /// Parallel workers a build may use (`max_parallel_maintenance_workers`), or `"auto"`.
    pub build_parallel_workers: BuildWorkers,
}

/// `index.build_parallel_workers`: how many parallel maintenance workers join a build's leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildWorkers {
    /// The database's cores less the leader when it runs on this machine (the embedded
    /// default: the worker cannot see a remote server's cores); otherwise the server's own
    /// `max_parallel_maintenance_workers`, which its operator sizes.
    Auto,
    /// This many (0: a serial build).
    Fixed(u32),
}

impl Serialize for BuildWorkers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BuildWorkers::Auto => s.serialize_str("auto"),
            BuildWorkers::Fixed(n) => s.serialize_u32(*n),
        }
    }
}

impl<'de> Deserialize<'de> for BuildWorkers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(BuildWorkers::Fixed(n)),
            Raw::Word(w) if w == "auto" => Ok(BuildWorkers::Auto),
            Raw::Word(w) => w.parse().map(BuildWorkers::Fixed).map_err(|_| {
                serde::de::Error::custom(format!(
                    "index.build_parallel_workers: expected a number or \"auto\", got {w:?}"
                ))
            }),
        }
    }
}

impl IndexSettings {
    /// `[index]`'s ranges.
    fn check(&self, c: &mut Checks) {
        c.within(
            "index.check_interval_secs",
            self.check_interval_secs,
            1,
            86_400,
        );
        c.within(
            "index.max_build_memory_mb",
            self.max_build_memory_mb,
            64,
            65_536,
        );
        if let BuildWorkers::Fixed(n) = self.build_parallel_workers {
            c.within("index.build_parallel_workers", n, 0, 64);
        }
    }
}

/// The type the HNSW index stores (`index.precision`); the column always keeps full precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[budget]`.
pub struct BudgetSettings {
    /// Monthly budget in USD for all replicas (0 = none).
    pub monthly_usd: f64,
    /// While stopped at the budget, check again this often.
    pub recheck_secs: u64,
}

impl BudgetSettings {
    /// `[budget]`'s ranges.
    fn check(&self, c: &mut Checks) {
        c.price(
            "budget.monthly_usd",
            self.monthly_usd,
            "a finite number >= 0 (0 = none)",
        );
        c.within("budget.recheck_secs", self.recheck_secs, 1, 86_400);
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[capture]`: which change-capture triggers `migrate` enables.
pub struct CaptureSettings {
    /// Queue a job when a session's embedded text changes.
    pub sessions: bool,
    /// Queue a job when a template's embedded text changes.
    pub templates: bool,
    /// How often a worker moves captured changes into the queue (`embed_worker.captured` →
    /// jobs). The app's write only records the change; this is when its job appears.
    #[serde(default = "default_drain_ms")]
    pub drain_ms: u64,
}

fn default_drain_ms() -> u64 {
    200
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[freshness]`.
pub struct FreshnessSettings {
    /// Re-embed rows older than this many days (0 = never).
    pub max_age_days: u64,
    /// Periodic stale scan interval, one scanner across replicas (0 = off).
    pub scan_interval_secs: u64,
    /// Rows one scan queues at most (0 = no limit).
    pub scan_limit: i64,
    /// Keep adopted vectors whose row has no `updated_at` (true), or embed their sources again.
    pub adopt_untimed: bool,
}

impl FreshnessSettings {
    /// `[freshness]`'s ranges.
    fn check(&self, c: &mut Checks) {
        c.check(
            self.scan_limit >= 0,
            "freshness.scan_limit",
            &self.scan_limit,
            ">= 0 (0 = no limit)",
        );
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[http]`.
pub struct HttpSettings {
    /// Address for /metrics, /healthz, /readyz (empty disables).
    pub addr: String,
}

impl HttpSettings {
    /// `[http]`'s ranges.
    fn check(&self, c: &mut Checks) {
        let ok = self.addr.is_empty() || self.addr.parse::<std::net::SocketAddr>().is_ok();
        c.check(
            ok,
            "http.addr",
            &format!("{:?}", self.addr),
            "host:port (an IP address and a port), or empty to disable",
        );
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// `[retention]`'s ranges.
    fn check(&self, c: &mut Checks) {
        c.at_least("retention.done_after_hours", self.done_after_hours, 1);
        c.at_least("retention.failed_after_hours", self.failed_after_hours, 1);
        c.at_least("retention.interval_secs", self.interval_secs, 1);
    }
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

#[derive(Debug, Clone, Deserialize, Serialize)]
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

impl RateLimitSettings {
    /// `[rate_limit]`'s ranges.
    fn check(&self, c: &mut Checks) {
        c.within("rate_limit.period_secs", self.period_secs, 1, 3600);
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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

impl RetrySettings {
    /// `[retry]`'s ranges.
    fn check(&self, c: &mut Checks) {
        c.within("retry.request_retries", self.request_retries, 0, 20);
        c.within("retry.base_ms", self.base_ms, 1, 60_000);
        c.within_named(
            "retry.cap_ms",
            self.cap_ms,
            (self.base_ms, "retry.base_ms"),
            600_000,
        );
        c.within(
            "retry.job_backoff_base_secs",
            self.job_backoff_base_secs,
            1,
            86_400,
        );
        c.within_named(
            "retry.job_backoff_cap_secs",
            self.job_backoff_cap_secs,
            (self.job_backoff_base_secs, "retry.job_backoff_base_secs"),
            604_800,
        );
        c.within(
            "retry.quota_recheck_secs",
            self.quota_recheck_secs,
            1,
            86_400,
        );
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[database]`.
pub struct DatabaseSettings {
    /// `DATABASE_URL`: where to connect.
    #[serde(serialize_with = "redacted_url")]
    pub url: String,
    /// Pool size.
    pub max_connections: u32,
    /// Role to `SET ROLE` to after connecting; empty means the login role.
    pub role: String,
    /// How long a query waits for a free connection of the pool before it fails. Long: at a
    /// small budget a batch waits its turn instead of failing and using up an attempt.
    #[serde(default = "default_acquire_timeout_secs")]
    pub acquire_timeout_secs: u64,
}

fn default_acquire_timeout_secs() -> u64 {
    300
}

impl DatabaseSettings {
    /// `[database]`'s ranges.
    fn check(&self, c: &mut Checks) {
        c.check(
            !self.url.trim().is_empty(),
            "database.url",
            &"\"\"",
            "a postgres:// URL",
        );
        c.within("database.max_connections", self.max_connections, 1, 1000);
        c.within(
            "database.acquire_timeout_secs",
            self.acquire_timeout_secs,
            1,
            86_400,
        );
    }
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &crate::redact::url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("role", &self.role)
            .field("acquire_timeout_secs", &self.acquire_timeout_secs)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[queue]`.
pub struct QueueSettings {
    /// The queue (apalis `job_type`).
    pub name: String,
    /// Jobs claimed per poll.
    pub fetch_batch: usize,
    /// Jobs held at once by one process.
    pub concurrency: usize,
    /// How often an idle worker looks for jobs (its only wake-up unless `listen`).
    pub poll_interval_ms: u64,
    /// Also wake on apalis's NOTIFY (one more connection per process, held for LISTEN, and a
    /// NOTIFY in every transaction that queues jobs). Off: polling alone, every
    /// `poll_interval_ms` (docs/decisions.md, "Woken by polling").
    #[serde(default)]
    pub listen: bool,
    /// Attempts before a retried job is a dead letter.
    pub max_attempts: i32,
    /// Worker heartbeat interval.
    pub heartbeat_secs: u64,
    /// Missed heartbeats after which a worker's jobs are re-queued.
    pub missed_heartbeats: usize,
}

impl QueueSettings {
    /// `[_]`'s ranges.
    fn check(&self, c: &mut Checks) {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "_.:-".contains(ch));
        c.check(
            name_ok,
            "queue.name",
            &format!("{:?}", self.name),
            "1-64 characters of A-Z a-z 0-9 _ . : -",
        );
        c.within("queue.fetch_batch", self.fetch_batch, 1, 10_000);
        c.within("queue.concurrency", self.concurrency, 1, 100_000);
        c.within("queue.poll_interval_ms", self.poll_interval_ms, 10, 60_000);
        c.within("queue.max_attempts", self.max_attempts, 1, 100);
        c.within("queue.heartbeat_secs", self.heartbeat_secs, 1, 3600);
        c.within("queue.missed_heartbeats", self.missed_heartbeats, 2, 100);
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
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

impl BatchSettings {
    /// `[batch]`'s ranges.
    fn check(&self, c: &mut Checks) {
        c.within("batch.max_jobs", self.max_jobs, 1, 10_000);
        c.within("batch.linger_ms", self.linger_ms, 0, 60_000);
        c.within("batch.max_in_flight", self.max_in_flight, 1, 256);
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[api]`.
pub struct ApiSettings {
    /// The OpenAI-compatible endpoint.
    #[serde(serialize_with = "redacted_url")]
    pub base_url: String,
    /// A request with no answer after this long is a transient error.
    pub timeout_secs: u64,
    /// Inputs per request (OpenAI: 2,048).
    pub max_inputs_per_request: usize,
    /// Budgeted tokens per request (OpenAI: 300,000).
    pub max_tokens_per_request: usize,
    /// Never from the file: filled from the environment by [`Settings::load`] (`embed-worker
    /// config` says whether it is set, never what it is).
    #[serde(skip)]
    pub api_key: Option<SecretString>,
}

impl ApiSettings {
    /// `[api]`'s ranges.
    fn check(&self, c: &mut Checks) {
        let url_ok = self.base_url.starts_with("http://") || self.base_url.starts_with("https://");
        c.check(
            url_ok,
            "api.base_url",
            &format!("{:?}", self.base_url),
            "an http:// or https:// URL",
        );
        c.within("api.timeout_secs", self.timeout_secs, 1, 3600);
        c.within(
            "api.max_inputs_per_request",
            self.max_inputs_per_request,
            1,
            2048,
        );
    }
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

#[derive(Debug, Clone, Deserialize, Serialize)]
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
    /// Price through the Batch API; unset, half of `usd_per_million_tokens` (OpenAI's discount).
    #[serde(default)]
    pub batch_usd_per_million_tokens: f64,
    /// A source longer than this (in tokens, all chunks) is a dead letter with its size, never
    /// embedded: one 50 MB paste would otherwise take the whole token quota.
    pub max_source_tokens: usize,
}

impl ModelSettings {
    /// These settings for another model of the same provider (the serving model during a
    /// switch): its name and dimensions; `dimensions` is sent to text-embedding-3-* only.
    pub fn for_model(&self, name: &str, dimensions: usize) -> ModelSettings {
        if name == self.name && dimensions == self.dimensions {
            return self.clone();
        }
        ModelSettings {
            name: name.to_string(),
            dimensions,
            send_dimensions: name.starts_with("text-embedding-3"),
            ..self.clone()
        }
    }

    /// `[model]`'s ranges.
    fn check(&self, c: &mut Checks) {
        c.check(
            cfg!(feature = "local") || self.provider != Provider::Local,
            "model.provider",
            &"\"local\"",
            "\"openai\" (this build has no `local` feature)",
        );
        let name_ok = !self.name.is_empty() && self.name.len() <= 100;
        c.check(
            name_ok,
            "model.name",
            &format!("{:?}", self.name),
            "1-100 characters (rag_embeddings.embedding_model is varchar(100))",
        );
        c.within_because(
            "model.dimensions",
            self.dimensions,
            1,
            IndexPrecision::MAX_HALF_DIMS,
            "pgvector's HNSW indexes `vector` up to 2,000 and `halfvec` up to 4,000 dimensions",
        );
        c.within(
            "model.max_input_tokens",
            self.max_input_tokens,
            16,
            1_000_000,
        );
        let half = self.max_input_tokens / 2;
        c.check(
            self.chunk_overlap_tokens < half,
            "model.chunk_overlap_tokens",
            &self.chunk_overlap_tokens,
            &format!("0..{half} (below half of model.max_input_tokens)"),
        );
        c.price(
            "model.usd_per_million_tokens",
            self.usd_per_million_tokens,
            "a finite number >= 0",
        );
        c.check(
            self.max_source_tokens >= self.max_input_tokens,
            "model.max_source_tokens",
            &self.max_source_tokens,
            &format!(">= model.max_input_tokens ({})", self.max_input_tokens),
        );
        c.price(
            "model.batch_usd_per_million_tokens",
            self.batch_usd_per_million_tokens,
            "a finite number >= 0",
        );
    }
}

/// Who computes the embeddings (`model.provider`); anything else is refused when the
/// configuration is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Any OpenAI-compatible `/v1/embeddings` (OpenAI, Azure, vLLM, TEI, Ollama, the fake).
    Openai,
    /// all-MiniLM-L6-v2 in-process (needs the `local` cargo feature).
    Local,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[render]`: `{field}` placeholders, each a column of the app's table (any column, any
/// type: the loader reads exactly those, change capture fires on exactly those); empty lines
/// are dropped.
pub struct RenderSettings {
    /// How a session becomes text.
    pub session: String,
    /// How a template becomes text.
    pub template: String,
    /// The column of `sessions` holding its owner's id (uuid, `auth.uid()`'s): row-level
    /// security on embeddings, the app's enqueue check and search as a user read it.
    pub session_owner: String,
}

impl RenderSettings {
    fn check(&self, c: &mut Checks) {
        let o = &self.session_owner;
        c.check(
            o.chars()
                .next()
                .is_some_and(|ch| ch.is_ascii_lowercase() || ch == '_')
                && o.chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_'),
            "render.session_owner",
            &format!("{o:?}"),
            "a column name of sessions (lower-case letters, digits, _)",
        );
        for (key, format) in [
            ("render.session", &self.session),
            ("render.template", &self.template),
        ] {
            c.check(
                !render_fields(format).is_empty(),
                key,
                &format!("{format:?}"),
                "a format naming at least one column as {column}",
            );
        }
    }
}

/// The `{field}` names in a render format, each once, in order of first use. A field is a
/// column name: `{` then a letter or `_`, then letters, digits or `_`, then `}`; other braces
/// are text.
pub fn render_fields(format: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut rest = format;
    while let Some(open) = rest.find('{') {
        rest = &rest[open + 1..];
        let end = rest
            .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        let starts_well = name
            .chars()
            .next()
            .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_');
        if starts_well && rest[end..].starts_with('}') && !out.iter().any(|f| f == name) {
            out.push(name.to_string());
        }
    }
    out
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[shutdown]`.
pub struct ShutdownSettings {
    /// In-flight batches get this long after SIGTERM.
    pub grace_secs: u64,
}

impl ShutdownSettings {
    /// `[shutdown]`'s ranges.
    fn check(&self, c: &mut Checks) {
        c.within("shutdown.grace_secs", self.grace_secs, 0, 3600);
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
/// `[log]`.
pub struct LogSettings {
    /// `human` or `json`; anything else is refused when the configuration is read.
    pub format: crate::telemetry::LogFormat,
}

/// `EMBED_WORKER_CONFIG_DIR`, else the source tree's `config/` (development), else `./config`.
/// Where each setting's value came from, for `embed-worker config`: the environment
/// (`EMBED_WORKER__SECTION__KEY`, or `DATABASE_URL` for `database.url`), the `--config` file,
/// `config/default.toml`, or derived from others (the Batch API price is half the sync one's).
pub struct Origins {
    file: Option<(PathBuf, config::Config)>,
    defaults: Option<config::Config>,
}

impl Origins {
    /// The sources [`Settings::load`] read, with `extra_file` as its `--config`.
    pub fn new(extra_file: Option<&Path>) -> Origins {
        let read = |path: &Path| {
            config::Config::builder()
                .add_source(config::File::from(path))
                .build()
                .ok()
        };
        Origins {
            file: extra_file.and_then(|p| Some((p.to_path_buf(), read(p)?))),
            defaults: read(&config_dir().join("default.toml")),
        }
    }

    /// Where dotted `key` (`model.name`) came from.
    pub fn of(&self, key: &str) -> String {
        if key == "database.url" && std::env::var_os("DATABASE_URL").is_some() {
            return "env DATABASE_URL".into();
        }
        let env = format!("EMBED_WORKER__{}", key.replace('.', "__").to_uppercase());
        if std::env::var_os(&env).is_some() {
            return format!("env {env}");
        }
        let has = |c: &config::Config| c.get::<config::Value>(key).is_ok();
        match (&self.file, &self.defaults) {
            (Some((path, c)), _) if has(c) => format!("file {}", path.display()),
            (_, Some(c)) if has(c) => "config/default.toml".into(),
            _ => "derived".into(),
        }
    }
}

/// `toml` (the settings as `config` prints them) with a comment above each value saying where
/// it came from ([`Origins::of`]); still TOML that reads back as the same settings.
pub fn with_origins(toml: &str, origins: &Origins) -> String {
    let mut out = String::with_capacity(toml.len() * 2);
    let mut section = String::new();
    let mut in_multiline: Option<&str> = None;
    for line in toml.lines() {
        if let Some(quote) = in_multiline {
            if line.contains(quote) {
                in_multiline = None;
            }
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim_matches(['[', ']']).to_string();
        } else if let Some((key, value)) = line.split_once(" = ") {
            let key = key.trim().trim_matches('"');
            let full = if section.is_empty() {
                key.to_string()
            } else {
                format!("{section}.{key}")
            };
            let origin = origins.of(&full);
            if origin == "derived" {
                out.push_str("# derived\n");
            } else {
                out.push_str(&format!("# from {origin}\n"));
            }
            for quote in ["\"\"\"", "'''"] {
                if value.starts_with(quote) && value[3..].matches(quote).count() == 0 {
                    in_multiline = Some(quote);
                }
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

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

/// The connections a worker cannot do without, each named: the pool it refuses to run below.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinPool {
    /// The batch lane's leader lock: held by one replica at a time, on a connection of its own
    /// for as long as it leads (any replica may become the leader).
    pub leader: u32,
    /// `LISTEN`, when `queue.listen`: one connection for the life of the worker.
    pub listener: u32,
    /// At least one for everything else: claiming, loading, writing, acknowledging (taken and
    /// given back per statement or transaction, so one suffices; more is throughput).
    pub work: u32,
}

impl MinPool {
    /// The minimum `database.max_connections`.
    pub fn total(&self) -> u32 {
        self.leader + self.listener + self.work
    }

    /// Connections of the pool that batches can write with: the pool less what is held for long.
    pub fn writers(&self, max_connections: u32) -> u32 {
        max_connections
            .saturating_sub(self.leader + self.listener)
            .max(1)
    }
}

impl std::fmt::Display for MinPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} for the batch lane's leader lock", self.leader)?;
        if self.listener > 0 {
            write!(f, ", {} for LISTEN (queue.listen)", self.listener)?;
        }
        write!(f, ", {} for claiming, loading and writing", self.work)
    }
}

impl Settings {
    /// The pool `run` needs at the least (it refuses a smaller `database.max_connections`).
    /// The index build's own connection is outside the pool (one replica at a time builds).
    pub fn min_pool(&self) -> MinPool {
        MinPool {
            leader: 1,
            listener: u32::from(self.queue.listen),
            work: 1,
        }
    }

    /// Defaults file, optional extra file, environment. Reads the API key from the environment.
    pub fn load(extra_file: Option<&Path>) -> anyhow::Result<Self> {
        let defaults = config::Config::builder()
            .add_source(config::File::from(config_dir().join("default.toml")).required(true))
            .build()
            .context("reading config/default.toml")?;
        let mut builder = config::Config::builder().add_source(defaults.clone());
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
        let raw = builder.build().context("reading configuration")?;
        refuse_non_integers(&defaults, &raw)?;
        let batch_price_set = raw.get::<f64>("model.batch_usd_per_million_tokens").is_ok();
        let mut settings: Settings = raw.try_deserialize().context("invalid configuration")?;
        if !batch_price_set {
            settings.model.batch_usd_per_million_tokens =
                settings.model.usd_per_million_tokens / 2.0;
        }
        settings.api.api_key = api_key_from_env()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Every value against its allowed range, so no configuration reaches a panic, a worker that
    /// silently does nothing, or a heartbeat shorter than a request. One line per bad key; each
    /// section's ranges are beside its struct, the rules that span sections here.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut c = Checks::default();
        self.database.check(&mut c);
        self.queue.check(&mut c);
        self.batch.check(&mut c);
        self.api.check(&mut c);
        let m = &self.model;
        c.check(
            (m.max_input_tokens.max(1)..=300_000).contains(&self.api.max_tokens_per_request),
            "api.max_tokens_per_request",
            &self.api.max_tokens_per_request,
            &format!("model.max_input_tokens ({})..=300000", m.max_input_tokens),
        );
        m.check(&mut c);
        c.check(
            self.index.precision != IndexPrecision::Full
                || m.dimensions <= IndexPrecision::MAX_FULL_DIMS,
            "index.precision",
            &format!("\"full\" with model.dimensions = {}", m.dimensions),
            "\"half\" or \"auto\" over 2,000 dimensions (pgvector's HNSW `vector` limit)",
        );
        self.render.check(&mut c);
        self.shutdown.check(&mut c);
        self.rate_limit.check(&mut c);
        self.retry.check(&mut c);
        self.retention.check(&mut c);
        self.http.check(&mut c);
        self.freshness.check(&mut c);
        c.within("capture.drain_ms", self.capture.drain_ms, 10, 60_000);
        self.budget.check(&mut c);
        self.bulk.check(&mut c);
        self.index.check(&mut c);
        c.within("write.streams", self.write.streams, 1, 16);
        self.search.check(&mut c);
        c.within(
            "alerts.replica_lag_secs",
            self.alerts.replica_lag_secs,
            1,
            86_400,
        );
        c.result()
    }
}

/// Keys out of range, one line each: `<key> = <value> is out of range (allowed: …)`.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, key: &str, value: &dyn std::fmt::Display, allowed: &str) {
        if !ok {
            self.0.push(format!(
                "{key} = {value} is out of range (allowed: {allowed})"
            ));
        }
    }

    /// `lo..=hi`.
    fn within<T: PartialOrd + std::fmt::Display>(&mut self, key: &str, value: T, lo: T, hi: T) {
        let allowed = format!("{lo}..={hi}");
        self.between(key, value, (lo, hi), &allowed);
    }

    /// `lo..=hi`, with why those are the limits.
    fn within_because<T>(&mut self, key: &str, value: T, lo: T, hi: T, why: &str)
    where
        T: PartialOrd + std::fmt::Display,
    {
        let allowed = format!("{lo}..={hi} ({why})");
        self.between(key, value, (lo, hi), &allowed);
    }

    /// From another key's value (`lo`, named) up to `hi`.
    fn within_named<T>(&mut self, key: &str, value: T, (lo, lo_key): (T, &str), hi: T)
    where
        T: PartialOrd + std::fmt::Display,
    {
        let allowed = format!("{lo_key}..={hi}");
        self.between(key, value, (lo, hi), &allowed);
    }

    fn between<T: PartialOrd + std::fmt::Display>(
        &mut self,
        key: &str,
        v: T,
        r: (T, T),
        allowed: &str,
    ) {
        self.check(r.0 <= v && v <= r.1, key, &v, allowed);
    }

    /// `>= lo`.
    fn at_least<T: PartialOrd + std::fmt::Display>(&mut self, key: &str, value: T, lo: T) {
        let allowed = format!(">= {lo}");
        self.check(value >= lo, key, &value, &allowed);
    }

    /// A finite amount of USD, not negative.
    fn price(&mut self, key: &str, value: f64, allowed: &str) {
        self.check(value.is_finite() && value >= 0.0, key, &value, allowed);
    }

    fn result(self) -> anyhow::Result<()> {
        if self.0.is_empty() {
            Ok(())
        } else {
            anyhow::bail!("invalid configuration:\n  {}", self.0.join("\n  "))
        }
    }
}

/// Keys whose default is an integer must be given an integer: the config crate turns a float
/// into an integer by casting, so `NaN` became 0 (`rate_limit.requests_per_minute = NaN` meant
/// unlimited), `2.5` became 3 and `1e30` the type's maximum. One line per such key.
fn refuse_non_integers(defaults: &config::Config, raw: &config::Config) -> anyhow::Result<()> {
    use config::{Value, ValueKind};
    fn walk(defaults: &Value, actual: &Value, key: &str, bad: &mut Vec<String>) {
        match (&defaults.kind, &actual.kind) {
            (ValueKind::Table(d), ValueKind::Table(a)) => {
                for (k, dv) in d {
                    if let Some(av) = a.get(k) {
                        let key = if key.is_empty() {
                            k.clone()
                        } else {
                            format!("{key}.{k}")
                        };
                        walk(dv, av, &key, bad);
                    }
                }
            }
            (
                ValueKind::I64(_) | ValueKind::U64(_) | ValueKind::I128(_) | ValueKind::U128(_),
                ValueKind::Float(f),
            ) => {
                bad.push(format!(
                    "{key} = {f} is not an integer (NaN, fractions and values past the key's range are refused)"
                ));
            }
            _ => {}
        }
    }
    let as_table = |c: &config::Config| -> anyhow::Result<Value> {
        Ok(Value::new(
            None,
            ValueKind::Table(c.clone().try_deserialize::<config::Map<String, Value>>()?),
        ))
    };
    let mut bad = Vec::new();
    walk(&as_table(defaults)?, &as_table(raw)?, "", &mut bad);
    if bad.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("invalid configuration:\n  {}", bad.join("\n  "))
    }
}

/// `OPENAI_API_KEY`, or the trimmed contents of the file named by `OPENAI_API_KEY_FILE`.
/// A URL as `embed-worker config` prints it: its password masked (`crate::redact::url`).
fn redacted_url<S: serde::Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&crate::redact::url(url))
}

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
    fn render_fields_are_the_column_names_in_braces() {
        assert_eq!(
            render_fields(
                "Q ({category}): {question_text}\nVars: {variables} {category} {1x} {a b} {}"
            ),
            ["category", "question_text", "variables"]
        );
        assert!(render_fields("no fields at all").is_empty());
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
