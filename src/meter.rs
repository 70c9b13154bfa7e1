//! Every metric the worker exports, in one place: names, labels, units and help text.
//!
//! Why one module: the dashboard, the alert rules and the tests refer to these names; a metric
//! renamed in one call site and not another is a blank panel at 3 a.m. Prometheus conventions:
//! base units (`_seconds`, `_usd`), `_total` for counters, labels `model` and `source_type`.
//!
//! The `metrics` crate's counters are integers; cost in USD is fractional, so it is kept here as
//! a float counter and rendered with the rest by [`render_extra`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

/// Tokens billed, by model.
pub const TOKENS_EMBEDDED: &str = "embed_worker_tokens_embedded_total";
/// Tokens not sent (content hash matched), by model.
pub const TOKENS_SAVED: &str = "embed_worker_tokens_saved_total";
/// Cost of billed tokens in USD, by model.
pub const COST_USD: &str = "embed_worker_cost_usd_total";
/// Vectors written, by model and source type.
pub const EMBEDDINGS_WRITTEN: &str = "embed_worker_embeddings_written_total";
/// API requests by model, outcome and status class.
pub const API_REQUESTS: &str = "embed_worker_api_requests_total";
/// API request duration.
pub const API_DURATION: &str = "embed_worker_api_request_duration_seconds";
/// Inputs per API request.
pub const REQUEST_INPUTS: &str = "embed_worker_request_inputs";
/// Budgeted tokens per API request.
pub const REQUEST_TOKENS: &str = "embed_worker_request_tokens";
/// Time a request waited for the rate limiter.
pub const LIMITER_WAIT: &str = "embed_worker_rate_limiter_wait_seconds";
/// Waits because the provider's headers said too little remained.
pub const PROVIDER_WAITS: &str = "embed_worker_rate_limit_provider_waits_total";
/// Jobs finished, by outcome and source type.
pub const JOBS: &str = "embed_worker_jobs_total";
/// From a job becoming due to its result.
pub const JOB_LATENCY: &str = "embed_worker_job_latency_seconds";
/// Jobs by state (sampled).
pub const QUEUE_JOBS: &str = "embed_worker_queue_jobs";
/// Age of the oldest due pending job.
pub const QUEUE_OLDEST: &str = "embed_worker_queue_oldest_pending_age_seconds";
/// Duration of a batch's write transaction.
pub const DB_WRITE: &str = "embed_worker_db_write_duration_seconds";
/// Batches of the batch lane by state (sampled; finished ones over the last day).
pub const BATCHES: &str = "embed_worker_batches";
/// Age of the oldest batch still open at the provider.
pub const BATCH_OLDEST_AGE: &str = "embed_worker_batch_oldest_open_age_seconds";
/// Index builds by result (`built`, `failed`, `cancelled`).
pub const INDEX_BUILDS: &str = "embed_worker_index_builds_total";
/// Duration of the last index build.
pub const INDEX_BUILD_SECONDS: &str = "embed_worker_index_build_last_duration_seconds";
/// 1 when the active model's configured index is valid; 0 while missing (deferred) or building.
pub const INDEX_READY: &str = "embed_worker_index_ready";
/// 1 while API calls are stopped (quota, key, budget).
pub const API_STOPPED: &str = "embed_worker_api_stopped";
/// This month's spend in USD.
pub const BUDGET_SPENT: &str = "embed_worker_budget_spent_usd";
/// The monthly budget in USD (0 = none).
pub const BUDGET_LIMIT: &str = "embed_worker_budget_monthly_usd";
/// 1, labelled with the version.
pub const BUILD_INFO: &str = "embed_worker_build_info";
/// Share of the sources each registered model covers, by model and role.
pub const MODEL_COVERAGE: &str = "embed_worker_model_coverage_ratio";
/// Changes of the serving model, by model and how (auto, manual, forced).
pub const MODEL_PROMOTIONS: &str = "embed_worker_model_promotions_total";
/// Each streaming replica's replay lag, from the primary, by application_name.
pub const REPLICA_LAG_SECONDS: &str = "embed_worker_replica_lag_seconds";
/// WAL bytes each streaming replica has not replayed yet.
pub const REPLICA_LAG_BYTES: &str = "embed_worker_replica_lag_bytes";
/// `alerts.replica_lag_secs`, for the alert rule.
pub const REPLICA_LAG_ALERT: &str = "embed_worker_replica_lag_alert_seconds";
/// This process's pool: connections open, by state (`in_use`, `idle`).
pub const DB_POOL_CONNECTIONS: &str = "embed_worker_db_pool_connections";
/// This process's pool size (`database.max_connections`).
pub const DB_POOL_MAX: &str = "embed_worker_db_pool_max_connections";
/// The server's connections for ordinary roles: max_connections less the reserved ones.
pub const DB_SERVER_MAX: &str = "embed_worker_db_server_usable_connections";
/// Client connections open on the server now, every application's.
pub const DB_SERVER_OPEN: &str = "embed_worker_db_server_connections";
/// What the live workers' pools add up to (each worker's `pool=` in its application_name).
pub const DB_WORKER_POOLS: &str = "embed_worker_db_worker_pools_connections";
/// Changes the app's writes recorded, moved into the queue by this process.
pub const CAPTURED: &str = "embed_worker_captured_changes_total";
/// Vectors of the app's adopted table kept for unchanged sources (no tokens paid), by model.
pub const ADOPTED: &str = "embed_worker_adopted_vectors_total";
/// Recall@k of the serving model's index, by model and scope, from the last probe.
pub const SEARCH_RECALL: &str = "embed_worker_search_recall";
/// The recall the index is held to (`search.recall_target`).
pub const SEARCH_RECALL_TARGET: &str = "embed_worker_search_recall_target";
/// One index search of the recall probe, by scope.
pub const SEARCH_PROBE_LATENCY: &str = "embed_worker_search_probe_latency_seconds";

/// Every exported name, for the tests that check dashboards and alerts against the binary.
pub const ALL: &[&str] = &[
    TOKENS_EMBEDDED,
    TOKENS_SAVED,
    ADOPTED,
    COST_USD,
    EMBEDDINGS_WRITTEN,
    API_REQUESTS,
    API_DURATION,
    REQUEST_INPUTS,
    REQUEST_TOKENS,
    LIMITER_WAIT,
    PROVIDER_WAITS,
    JOBS,
    JOB_LATENCY,
    QUEUE_JOBS,
    QUEUE_OLDEST,
    DB_WRITE,
    API_STOPPED,
    BUDGET_SPENT,
    BUDGET_LIMIT,
    BUILD_INFO,
    INDEX_BUILDS,
    INDEX_BUILD_SECONDS,
    INDEX_READY,
    BATCHES,
    BATCH_OLDEST_AGE,
    MODEL_COVERAGE,
    MODEL_PROMOTIONS,
    REPLICA_LAG_SECONDS,
    REPLICA_LAG_BYTES,
    REPLICA_LAG_ALERT,
    DB_POOL_CONNECTIONS,
    DB_POOL_MAX,
    DB_SERVER_MAX,
    DB_SERVER_OPEN,
    DB_WORKER_POOLS,
    CAPTURED,
    SEARCH_RECALL,
    SEARCH_RECALL_TARGET,
    SEARCH_PROBE_LATENCY,
];

static COST: Mutex<BTreeMap<(String, &'static str), f64>> = Mutex::new(BTreeMap::new());

/// HELP and units, once per process.
pub fn describe() {
    describe_gauge!(
        DB_POOL_CONNECTIONS,
        Unit::Count,
        "This process's database connections, by state (in_use, idle)"
    );
    describe_gauge!(
        DB_POOL_MAX,
        Unit::Count,
        "This process's pool size (database.max_connections)"
    );
    describe_gauge!(
        DB_SERVER_MAX,
        Unit::Count,
        "The server's max_connections less superuser_reserved_connections and reserved_connections"
    );
    describe_gauge!(
        DB_SERVER_OPEN,
        Unit::Count,
        "Client connections open on the server (every application's)"
    );
    describe_gauge!(
        DB_WORKER_POOLS,
        Unit::Count,
        "The live embed-worker processes' pool sizes added up (from their application_name)"
    );
    describe_counter!(
        CAPTURED,
        Unit::Count,
        "Changes recorded by the app's writes and moved into the queue by this process"
    );
    describe_counter!(
        TOKENS_EMBEDDED,
        Unit::Count,
        "Tokens billed by the provider (usage.prompt_tokens)"
    );
    describe_counter!(
        TOKENS_SAVED,
        Unit::Count,
        "Tokens not sent because the stored content hash matched"
    );
    describe_gauge!(
        SEARCH_RECALL,
        Unit::Count,
        "Recall@k of the model's index against exact search, from the last recall probe"
    );
    describe_gauge!(
        SEARCH_RECALL_TARGET,
        Unit::Count,
        "The recall the index is held to (search.recall_target)"
    );
    describe_histogram!(
        SEARCH_PROBE_LATENCY,
        Unit::Seconds,
        "One index search of the recall probe"
    );
    describe_counter!(
        ADOPTED,
        Unit::Count,
        "Vectors the app paid for, adopted with its table and kept: their sources had not changed"
    );
    describe_counter!(
        EMBEDDINGS_WRITTEN,
        Unit::Count,
        "Embedding rows (chunks) written with a new vector"
    );
    describe_counter!(
        API_REQUESTS,
        Unit::Count,
        "Embedding API requests by outcome and status class"
    );
    describe_histogram!(
        API_DURATION,
        Unit::Seconds,
        "Embedding API request duration"
    );
    describe_histogram!(
        REQUEST_INPUTS,
        Unit::Count,
        "Inputs per embedding API request"
    );
    describe_histogram!(
        REQUEST_TOKENS,
        Unit::Count,
        "Budgeted tokens per embedding API request"
    );
    describe_histogram!(
        LIMITER_WAIT,
        Unit::Seconds,
        "Time a request waited for the rate limiter"
    );
    describe_counter!(
        PROVIDER_WAITS,
        Unit::Count,
        "Waits because the provider's rate-limit headers said too little remains"
    );
    describe_counter!(JOBS, Unit::Count, "Jobs finished by outcome");
    describe_histogram!(
        JOB_LATENCY,
        Unit::Seconds,
        "Time from a job becoming due to its vectors being written"
    );
    describe_gauge!(
        QUEUE_JOBS,
        Unit::Count,
        "Jobs in the queue by state (sampled)"
    );
    describe_gauge!(
        QUEUE_OLDEST,
        Unit::Seconds,
        "Age of the oldest due pending job (sampled)"
    );
    describe_histogram!(
        DB_WRITE,
        Unit::Seconds,
        "Duration of a batch's write transaction"
    );
    describe_gauge!(
        API_STOPPED,
        Unit::Count,
        "1 while API calls are stopped (quota or budget)"
    );
    describe_gauge!(
        BUDGET_SPENT,
        Unit::Count,
        "Estimated spend this month in USD, all replicas (sampled)"
    );
    describe_gauge!(
        BUDGET_LIMIT,
        Unit::Count,
        "Monthly embedding budget in USD (0 = none)"
    );
    describe_gauge!(BUILD_INFO, Unit::Count, "Build information");
    describe_counter!(INDEX_BUILDS, Unit::Count, "HNSW index builds by result");
    describe_gauge!(
        BATCHES,
        Unit::Count,
        "Batch API batches by state (open ones, and those finished in the last day)"
    );
    describe_gauge!(
        BATCH_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest batch not yet collected (its window is 24 h)"
    );
    describe_gauge!(
        INDEX_BUILD_SECONDS,
        Unit::Seconds,
        "Duration of the last HNSW index build"
    );
    describe_gauge!(
        INDEX_READY,
        Unit::Count,
        "1 when the active model's configured HNSW index is valid (0: deferred or building)"
    );
    describe_gauge!(
        MODEL_COVERAGE,
        Unit::Count,
        "Share of the sources with text that each registered model covers (role: writing, serving, retired; a model both writing and serving has both series)"
    );
    describe_gauge!(
        REPLICA_LAG_SECONDS,
        Unit::Seconds,
        "Replay lag of each streaming replica, from the primary (0 when it has replayed all WAL; NaN when the migrating login may not read it; +Inf once a replica seen streaming has disconnected)"
    );
    describe_gauge!(
        REPLICA_LAG_BYTES,
        Unit::Bytes,
        "WAL bytes each streaming replica has not replayed yet"
    );
    describe_gauge!(
        REPLICA_LAG_ALERT,
        Unit::Seconds,
        "alerts.replica_lag_secs: the replica-lag alert's threshold"
    );
    describe_counter!(
        MODEL_PROMOTIONS,
        Unit::Count,
        "Changes of the serving model, by the model promoted and how"
    );
}

/// A gauge's series by label set, as one sample: each `(labels, value)` is set, and a label set
/// of the previous sample missing from this one is set to NaN (the exporter cannot drop a
/// series; PromQL's `max` and comparisons skip NaN).
struct Family(Mutex<Vec<Vec<(&'static str, String)>>>);

impl Family {
    const fn new() -> Self {
        Family(Mutex::new(Vec::new()))
    }

    fn sample(&self, name: &'static str, now: Vec<(Vec<(&'static str, String)>, f64)>) {
        self.sample_keeping(name, now, f64::NAN);
    }

    /// As `sample`, but a label set gone since an earlier sample reads `gone`, and, unless that
    /// is NaN, keeps reading it at every later sample until it is back.
    fn sample_keeping(
        &self,
        name: &'static str,
        now: Vec<(Vec<(&'static str, String)>, f64)>,
        gone: f64,
    ) {
        let mut seen = self.0.lock().unwrap();
        let missing: Vec<_> = seen
            .iter()
            .filter(|l| !now.iter().any(|(n, _)| n == *l))
            .cloned()
            .collect();
        for labels in &missing {
            gauge!(name, labels.as_slice()).set(gone);
        }
        for (labels, value) in &now {
            gauge!(name, labels.as_slice()).set(*value);
        }
        *seen = now.into_iter().map(|(l, _)| l).collect();
        if !gone.is_nan() {
            seen.extend(missing);
        }
    }
}

/// The streaming replicas' lag, and the alert threshold. A replica seen streaming that has left
/// `pg_stat_replication` reads +Inf seconds until it is back: a standby cut off from the primary
/// still answers searches, ever further behind, and its alert must fire, not lose its series.
pub fn replica_lag(replicas: &[crate::replica::ReplicaLag], alert_secs: u64) {
    static SECONDS: Family = Family::new();
    static BYTES: Family = Family::new();
    let by_name = |v: fn(&crate::replica::ReplicaLag) -> Option<f64>| {
        replicas
            .iter()
            .map(|r| {
                let labels = vec![("application_name", r.application_name.clone())];
                (labels, v(r).unwrap_or(f64::NAN))
            })
            .collect()
    };
    SECONDS.sample_keeping(
        REPLICA_LAG_SECONDS,
        by_name(|r| r.replay_lag_seconds),
        f64::INFINITY,
    );
    BYTES.sample(REPLICA_LAG_BYTES, by_name(|r| r.lag_bytes));
    gauge!(REPLICA_LAG_ALERT).set(alert_secs as f64);
}

/// The recall probe's stored results `(model, scope, recall)` and the target.
pub fn search_recall(results: &[(String, String, f64)], target: f64) {
    for (model, scope, recall) in results {
        gauge!(SEARCH_RECALL, "model" => model.clone(), "scope" => scope.clone()).set(*recall);
    }
    gauge!(SEARCH_RECALL_TARGET).set(target);
}

/// One index search of the recall probe took `secs`.
pub fn search_probe_latency(scope: &'static str, secs: f64) {
    histogram!(SEARCH_PROBE_LATENCY, "scope" => scope).record(secs);
}

/// A model became the serving one.
pub fn model_promoted(model: &str, how: &'static str) {
    counter!(MODEL_PROMOTIONS, "model" => model.to_string(), "how" => how).increment(1);
}

/// Each registered model's coverage, by role. A (model, role) that no longer holds is set to NaN
/// (the exporter cannot drop a series; PromQL's `max` and comparisons skip NaN).
pub fn model_coverage(models: &[(String, Vec<&'static str>, f64)]) {
    static COVERAGE: Family = Family::new();
    let now = models
        .iter()
        .flat_map(|(m, roles, ratio)| {
            roles
                .iter()
                .map(move |r| (vec![("model", m.clone()), ("role", r.to_string())], *ratio))
        })
        .collect();
    COVERAGE.sample(MODEL_COVERAGE, now);
}

/// An index build ended.
pub fn index_build(result: &'static str, secs: f64) {
    counter!(INDEX_BUILDS, "result" => result).increment(1);
    gauge!(INDEX_BUILD_SECONDS).set(secs);
}

/// Whether the active model's index is ready.
pub fn index_ready(model: &str, ready: bool) {
    gauge!(INDEX_READY, "model" => model.to_string()).set(if ready { 1.0 } else { 0.0 });
}

/// Counts billed tokens and their cost.
pub fn tokens_embedded(model: &str, tokens: u64, usd_per_million: f64) {
    lane_tokens(model, "sync", tokens, usd_per_million);
}

/// Counts tokens billed through the Batch API and their cost at the batch price.
pub fn batch_tokens(model: &str, tokens: u64, usd_per_million: f64) {
    lane_tokens(model, "batch", tokens, usd_per_million);
}

fn lane_tokens(model: &str, lane: &'static str, tokens: u64, usd_per_million: f64) {
    counter!(TOKENS_EMBEDDED, "model" => model.to_string(), "lane" => lane).increment(tokens);
    *COST
        .lock()
        .unwrap()
        .entry((model.to_string(), lane))
        .or_insert(0.0) += tokens as f64 * usd_per_million / 1e6;
}

/// The batch lane's records, sampled: batches by state, and the age of the oldest open one.
pub fn batches(by_state: &[(String, i64)], oldest_open_secs: f64) {
    for state in [
        "preparing",
        "submitted",
        "completed",
        "expired",
        "failed",
        "cancelled",
    ] {
        let n = by_state
            .iter()
            .find(|(s, _)| s == state)
            .map_or(0, |(_, n)| *n);
        gauge!(BATCHES, "state" => state).set(n as f64);
    }
    gauge!(BATCH_OLDEST_AGE).set(oldest_open_secs);
}

/// Counts tokens not sent.
pub fn tokens_saved(model: &str, tokens: u64) {
    counter!(TOKENS_SAVED, "model" => model.to_string()).increment(tokens);
}

/// Counts adopted vectors kept.
pub fn adopted(model: &str, n: u64) {
    if n > 0 {
        counter!(ADOPTED, "model" => model.to_string()).increment(n);
    }
}

/// Counts vectors written.
pub fn embeddings_written(model: &str, source_type: &str, n: u64) {
    counter!(EMBEDDINGS_WRITTEN, "model" => model.to_string(), "source_type" => source_type.to_string()).increment(n);
}

/// Records one API request.
pub fn api_request(
    model: &str,
    outcome: &'static str,
    status: Option<u16>,
    duration: Duration,
    inputs: usize,
    tokens: usize,
) {
    let class = match status {
        Some(s) => format!("{}xx", s / 100),
        None => "none".into(),
    };
    counter!(API_REQUESTS, "model" => model.to_string(), "outcome" => outcome, "status_class" => class).increment(1);
    histogram!(API_DURATION, "model" => model.to_string()).record(duration.as_secs_f64());
    histogram!(REQUEST_INPUTS).record(inputs as f64);
    histogram!(REQUEST_TOKENS).record(tokens as f64);
}

/// Records a rate-limiter wait.
pub fn limiter_wait(d: Duration) {
    histogram!(LIMITER_WAIT).record(d.as_secs_f64());
}

/// Counts a wait on the provider's headers.
pub fn provider_wait() {
    counter!(PROVIDER_WAITS).increment(1);
}

/// Counts a finished job.
pub fn job(outcome: &'static str, source_type: &str) {
    counter!(JOBS, "outcome" => outcome, "source_type" => source_type.to_string()).increment(1);
}

/// Records a job's latency.
pub fn job_latency(secs: f64) {
    histogram!(JOB_LATENCY).record(secs.max(0.0));
}

/// Sets the queue gauges.
pub fn queue_sample(by_state: &[(String, i64)], dead: i64, oldest_pending: f64) {
    for state in ["Pending", "Queued", "Running", "Done", "Failed", "Killed"] {
        let n = by_state
            .iter()
            .find(|(s, _)| s == state)
            .map_or(0, |(_, n)| *n);
        gauge!(QUEUE_JOBS, "state" => state.to_lowercase()).set(n as f64);
    }
    gauge!(QUEUE_JOBS, "state" => "dead").set(dead as f64);
    gauge!(QUEUE_OLDEST).set(oldest_pending);
}

/// Sets the connection gauges (`crate::db::connections`).
/// `server`: (usable, open, the live workers' pools).
pub fn connections(in_use: u32, idle: u32, pool_max: u32, server: (i64, i64, i64)) {
    let (usable, open, worker_pools) = server;
    gauge!(DB_POOL_CONNECTIONS, "state" => "in_use").set(f64::from(in_use));
    gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(f64::from(idle));
    gauge!(DB_POOL_MAX).set(f64::from(pool_max));
    gauge!(DB_SERVER_MAX).set(usable as f64);
    gauge!(DB_SERVER_OPEN).set(open as f64);
    gauge!(DB_WORKER_POOLS).set(worker_pools as f64);
}

/// Counts changes moved from `embed_worker.captured` into the queue.
pub fn captured(n: u64) {
    counter!(CAPTURED).increment(n);
}

/// Records a write transaction's duration.
pub fn db_write(d: Duration) {
    histogram!(DB_WRITE).record(d.as_secs_f64());
}

/// Sets the API-stopped gauge.
pub fn api_stopped(stopped: bool) {
    gauge!(API_STOPPED).set(if stopped { 1.0 } else { 0.0 });
}

/// Sets the budget gauges.
pub fn budget(spent: f64, limit: f64) {
    gauge!(BUDGET_SPENT).set(spent);
    gauge!(BUDGET_LIMIT).set(limit);
}

/// Sets the build-info gauge.
pub fn build_info() {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// The float counters, in Prometheus text format, appended to the exporter's output.
pub fn render_extra() -> String {
    let cost = COST.lock().unwrap();
    let mut out = format!(
        "# HELP {COST_USD} Estimated embedding cost in USD (tokens × the model's configured price)\n# TYPE {COST_USD} counter\n"
    );
    for ((model, lane), usd) in cost.iter() {
        out.push_str(&format!(
            "{COST_USD}{{model=\"{}\",lane=\"{lane}\"}} {usd}\n",
            model.replace('\\', "\\\\").replace('"', "\\\"")
        ));
    }
    out
}

/// Counters of what the worker did in this process (printed at the end of `run`; the same
/// figures are exported as metrics).
#[derive(Debug, Default)]
pub struct Stats {
    /// API requests sent.
    pub api_requests: std::sync::atomic::AtomicU64,
    /// Tokens billed.
    pub tokens_embedded: std::sync::atomic::AtomicU64,
    /// Tokens not sent.
    pub tokens_saved: std::sync::atomic::AtomicU64,
    /// Vectors written.
    pub chunks_written: std::sync::atomic::AtomicU64,
    /// 429s received.
    pub rate_limited: std::sync::atomic::AtomicU64,
}
