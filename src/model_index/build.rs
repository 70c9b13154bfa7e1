//! Building a model's index: once, `CONCURRENTLY`, over rows already loaded.
//!
//! Why deferred: a row written while its model's HNSW index exists is inserted into the graph
//! there and then, and that insertion bounds a backfill (~250–300 rows/s on 2 cores); pgvector
//! builds the same graph over loaded rows several times faster, in parallel. So a model without
//! a valid index (a model switch, or a first backfill of existing data) is written without one,
//! and its index is built when the queue has drained. A model whose index is ready keeps the
//! incremental path: nothing here runs for it.
//!
//! Who builds: `run` checks every `index.check_interval_secs`; `migrate` and
//! `models build-index` build at once. All take one lease (`index-build`, naming the backend that
//! builds), so one build runs across replicas, and whoever holds it knows an invalid index of the
//! spec is a dead build's leftover (a killed worker's: `client_connection_check_interval` makes
//! its backend stop, and the lease is free once that backend is gone) and drops it.
//! `CREATE INDEX` needs the table's owner: the build runs on its own connection as the login role
//! (not the worker's `SET ROLE`); a login that is not the owner is told so and the operator runs
//! `models build-index` as the owner (deploy/base has a CronJob for that).

use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgConnection};

use super::{IndexSpec, IndexState};
use crate::config::{IndexSettings, Settings};
use crate::db::locks::Lease;

/// The index builds' lease in `embed_worker.leases`.
const BUILD_LEASE: &str = "index-build";

/// What a build attempt did.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildOutcome {
    /// The configured index is valid (nothing to build).
    Ready(String),
    /// Not built now, and why (no rows yet, a backfill ahead, `index.auto_build = false`).
    Deferred(String),
    /// Not built while jobs are open: built as the queue drains.
    Draining(String),
    /// Another process holds the build lock.
    Busy,
    /// Built in this many seconds.
    Built(String, f64),
    /// Stopped by shutdown; the leftover is dropped by the next build.
    Cancelled,
}

impl std::fmt::Display for BuildOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildOutcome::Ready(name) => write!(f, "index {name} ready"),
            BuildOutcome::Deferred(why) | BuildOutcome::Draining(why) => {
                write!(f, "index deferred: {why}")
            }
            BuildOutcome::Busy => write!(f, "another process is building an index"),
            BuildOutcome::Built(name, secs) => write!(f, "index {name} built in {secs:.1} s"),
            BuildOutcome::Cancelled => write!(f, "index build cancelled"),
        }
    }
}

/// Whether any row of `model` exists.
async fn has_rows(pool: &PgPool, model: &str) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM rag_embeddings WHERE embedding_model = $1)",
    )
    .bind(model)
    .fetch_one(pool)
    .await?)
}

/// Whether the index of a model with no rows yet should wait for its backfill: at least
/// `index.defer_min_sources` sources have text to embed.
async fn defer_empty(pool: &PgPool, s: &Settings, model: &str) -> anyhow::Result<Option<String>> {
    let min = s.index.defer_min_sources;
    if min == 0 || has_rows(pool, model).await? {
        return Ok(None);
    }
    let sources = crate::source::count_with_text(pool).await?;
    Ok((sources >= min as i64).then(|| {
        format!("{model} has no rows yet and {sources} sources to embed: built after the backfill")
    }))
}

/// A backfill of `model` still running: at least `index.defer_min_sources` jobs open while the
/// model covers fewer sources than have text. Its index waits for the drained queue.
async fn backfill_under_way(
    pool: &PgPool,
    s: &Settings,
    model: &str,
) -> anyhow::Result<Option<String>> {
    let min = s.index.defer_min_sources as i64;
    let open = crate::queue::open_jobs(pool, &s.queue.name).await?;
    if min == 0 || open < min {
        return Ok(None);
    }
    let (covered, sources) = super::lifecycle::coverage(&mut *pool.acquire().await?, model).await?;
    Ok((covered < sources).then(|| {
        format!(
            "a backfill is under way ({open} jobs open, {covered} of {sources} sources embedded): built once the queue drains"
        )
    }))
}

/// Jobs still open: the build waits for the queue to drain.
async fn draining(pool: &PgPool, s: &Settings) -> anyhow::Result<Option<String>> {
    let open = crate::queue::open_jobs(pool, &s.queue.name).await?;
    Ok((open > 0).then(|| format!("{open} jobs open; built once the queue drains")))
}

/// Why the missing index should not be built yet, if it should not.
pub(crate) async fn not_due(
    pool: &PgPool,
    s: &Settings,
    spec: &IndexSpec,
) -> anyhow::Result<Option<String>> {
    match draining(pool, s).await? {
        Some(why) => Ok(Some(why)),
        None => defer_empty(pool, s, &spec.model).await,
    }
}

/// `run`'s periodic check (`force` = false) and `models build-index` (`force`): builds the active
/// model's index if it is missing and due; the build takes one of `pool`'s connections as the login.
pub async fn build_if_due(
    pool: &PgPool,
    s: &Settings,
    force: bool,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> anyhow::Result<BuildOutcome> {
    let spec = IndexSpec::from_settings(s)?;
    if let IndexState::Ready(name) = super::state(pool, &spec).await? {
        crate::meter::index_ready(&spec.model, true);
        return Ok(BuildOutcome::Ready(name));
    }
    crate::meter::index_ready(&spec.model, false);
    if !force {
        if let Some(why) = draining(pool, s).await? {
            return Ok(BuildOutcome::Draining(why));
        }
        if let Some(why) = defer_empty(pool, s, &spec.model).await? {
            return Ok(BuildOutcome::Deferred(why));
        }
    }
    let outcome = build(pool, &spec, &s.index, stop).await?;
    crate::meter::index_ready(&spec.model, matches!(outcome, BuildOutcome::Built(..)));
    Ok(outcome)
}

/// `run`'s check (its periodic loop and `--until-empty` once drained): [`build_if_due`], or with
/// `index.auto_build = false` only the index's state, a missing one left to `models build-index`.
pub async fn run_check(
    pool: &PgPool,
    s: &Settings,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> anyhow::Result<BuildOutcome> {
    if s.index.auto_build {
        return build_if_due(pool, s, false, stop).await;
    }
    let spec = IndexSpec::from_settings(s)?;
    let ready = super::state(pool, &spec).await?;
    crate::meter::index_ready(&spec.model, matches!(ready, IndexState::Ready(_)));
    Ok(match ready {
        IndexState::Ready(name) => BuildOutcome::Ready(name),
        _ => BuildOutcome::Deferred(
            "index.auto_build = false: `embed-worker models build-index` builds it".into(),
        ),
    })
}

/// `migrate`: repairs, defers or builds the active model's index, and says which.
/// A model with no rows and a large backlog ahead gets no index now (an empty one is dropped:
/// it costs nothing and would make the backfill pay for live insertion); a missing index is
/// not built while jobs are open either (a deploy's migrate Job during a deferred backfill
/// would make the rest of it pay for HNSW upkeep): the worker builds it once the queue drains.
pub async fn on_migrate(pool: &PgPool, s: &Settings) -> anyhow::Result<BuildOutcome> {
    let spec = IndexSpec::from_settings(s)?;
    if let Some(why) = defer_empty(pool, s, &spec.model).await? {
        if let IndexState::Ready(name) = super::state(pool, &spec).await? {
            drop_index(pool, &name).await?;
        }
        return Ok(BuildOutcome::Deferred(why));
    }
    match super::state(pool, &spec).await? {
        IndexState::Ready(name) => {
            drop_superseded(&mut *pool.acquire().await?, &spec).await?;
            Ok(BuildOutcome::Ready(name))
        }
        _ => match backfill_under_way(pool, s, &spec.model).await? {
            Some(why) => Ok(BuildOutcome::Deferred(why)),
            None => build(pool, &spec, &s.index, None).await,
        },
    }
}

/// `maintenance_work_mem` in MB for a graph of `rows` elements of `spec`: the vectors plus ~1 KB
/// of neighbour lists and bookkeeping each, with a fifth to spare, within `cap_mb`.
pub fn build_memory_mb(spec: &IndexSpec, rows: i64, cap_mb: u64) -> u64 {
    let per_row = spec.dimensions as u64 * if spec.half { 2 } else { 4 } + 1024;
    let mb = (rows.max(0) as u64 * per_row * 6 / 5) >> 20;
    mb.clamp(64, cap_mb.max(64))
}

/// `max_parallel_maintenance_workers` for a build (`None`: the server's own setting). Auto: a
/// server on this machine (a loopback address or a socket) gets its cores less the leader;
/// the cores of a remote one are not visible from here.
pub fn parallel_workers(
    setting: crate::config::BuildWorkers,
    opts: &PgConnectOptions,
) -> Option<u32> {
    match setting {
        crate::config::BuildWorkers::Fixed(n) => Some(n),
        crate::config::BuildWorkers::Auto => {
            let host = opts.get_host();
            let local = host.starts_with('/')
                || host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            local.then(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32 - 1))
        }
    }
}

/// Builds `spec`'s index on its own login connection under the build lock: drops a dead build's
/// leftover, sizes `maintenance_work_mem`, lets pgvector use parallel workers, `CREATE INDEX
/// CONCURRENTLY`, then drops the model's superseded indexes (another precision or size).
pub async fn build(
    pool: &PgPool,
    spec: &IndexSpec,
    cfg: &IndexSettings,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> anyhow::Result<BuildOutcome> {
    let mut conn = crate::db::login_conn(pool)
        .await
        .context("index build: a connection")?;
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *conn)
        .await?;
    let lease = Lease::new(BUILD_LEASE, Duration::from_secs(60));
    if !lease.hold(pool, Some(pid)).await? {
        return Ok(BuildOutcome::Busy);
    }
    let renewing = lease.keep(pool);
    let local = parallel_workers(cfg.build_parallel_workers, &pool.connect_options());
    let result = build_locked(&mut conn, pid, local, spec, cfg, stop).await;
    drop(renewing);
    // A cancelled build's connection is mid-statement: closed on drop, and its backend stops
    // within `client_connection_check_interval`. The lease names that backend, so it is free
    // once the backend is gone, not before (a next build must not drop an index still being
    // built).
    if !matches!(result, Ok(BuildOutcome::Cancelled)) {
        lease.release(pool).await;
    }
    result
}

async fn build_locked(
    conn: &mut PgConnection,
    pid: i32,
    workers: Option<u32>,
    spec: &IndexSpec,
    cfg: &IndexSettings,
    stop: Option<tokio::sync::watch::Receiver<bool>>,
) -> anyhow::Result<BuildOutcome> {
    // The index goes on the model's partition: a model built before any row (a test, a
    // `models build-index` right after a config change) is registered here.
    super::lifecycle::ensure(&mut *conn, spec).await?;
    let all = super::vector_indexes(&mut *conn).await?;
    match super::find(&all, spec) {
        IndexState::Ready(name) => return Ok(BuildOutcome::Ready(name)),
        // Every build holds the lock we hold: this one died (a lock seen on it is a reader's).
        IndexState::Invalid(name) | IndexState::Building(name) => {
            tracing::warn!(index = %name, "dropping the invalid leftover of an index build that died");
            drop_on(conn, &name).await?;
        }
        IndexState::Missing => {}
    }
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rag_embeddings WHERE embedding_model = $1")
            .bind(&spec.model)
            .fetch_one(&mut *conn)
            .await?;
    let mem = build_memory_mb(spec, rows, cfg.max_build_memory_mb);
    let workers = match workers {
        Some(n) => format!("SET max_parallel_maintenance_workers = {n};"),
        None => String::new(),
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET maintenance_work_mem = '{mem}MB';
         {workers}
         SET min_parallel_table_scan_size = 0;
         SET client_connection_check_interval = '1s';
         SET statement_timeout = 0; SET lock_timeout = 0"
    )))
    .execute(&mut *conn)
    .await?;
    let name = spec.name();
    tracing::info!(index = %name, model = %spec.model, rows, maintenance_work_mem_mb = mem,
        index_type = %spec.index_type(), "building HNSW index (CONCURRENTLY)");
    let started = Instant::now();
    let sql = spec.create_sql(true);
    let create = sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut *conn);
    let result = match stop {
        None => Some(create.await),
        Some(mut stop) => {
            tokio::pin!(create);
            let stopped = async move {
                let _ = stop.wait_for(|v| *v).await;
            };
            tokio::select! {
                r = &mut create => Some(r),
                _ = stopped => {
                    // No second connection to cancel from (the budget has none to spare): the
                    // caller drops this one mid-statement, and the server, checking its client
                    // every second (`client_connection_check_interval` above), ends the build.
                    tracing::debug!(backend = pid, "index build stopped: closing its connection");
                    None
                }
            }
        }
    };
    let Some(result) = result else {
        crate::meter::index_build("cancelled", started.elapsed().as_secs_f64());
        tracing::warn!(index = %name, "index build cancelled by shutdown; the next build starts over");
        return Ok(BuildOutcome::Cancelled);
    };
    let secs = started.elapsed().as_secs_f64();
    if let Err(e) = result {
        crate::meter::index_build("failed", secs);
        let owner_hint = match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("42501") => {
                " (CREATE INDEX needs the owner of rag_embeddings: run `embed-worker models \
                 build-index` with the login that ran `migrate`)"
            }
            _ => "",
        };
        return Err(anyhow::Error::new(e).context(format!("building index {name}{owner_hint}")));
    }
    crate::meter::index_build("built", secs);
    tracing::info!(index = %name, secs, rows, "HNSW index built");
    // Statistics before the first search: a partition filled since the last autovacuum
    // analyze looks empty to the planner, which then sorts it instead of using the new index.
    super::lifecycle::analyze(&mut *conn, spec).await?;
    drop_superseded(conn, spec).await?;
    Ok(BuildOutcome::Built(name, secs))
}

/// Drops the model's indexes that do not match `spec`, once `spec`'s is valid.
async fn drop_superseded(conn: &mut PgConnection, spec: &IndexSpec) -> anyhow::Result<()> {
    for ix in super::vector_indexes(&mut *conn).await? {
        if super::of_model(&ix, &spec.model) && !spec.matches(&ix) {
            tracing::info!(index = %ix.name, "dropping the model's superseded index");
            drop_on(conn, &ix.name).await?;
        }
    }
    Ok(())
}

/// `DROP INDEX CONCURRENTLY IF EXISTS`.
pub async fn drop_index(pool: &PgPool, name: &str) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    drop_on(&mut conn, name).await
}

async fn drop_on(conn: &mut PgConnection, name: &str) -> anyhow::Result<()> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP INDEX CONCURRENTLY IF EXISTS {}",
        crate::db::quote_ident(name)
    )))
    .execute(conn)
    .await
    .with_context(|| format!("dropping index {name}"))?;
    Ok(())
}
