//! Connecting to and migrating the database.
//!
//! Why here: every command needs the same pool (same role, same limits), and `migrate` must
//! apply apalis-postgres's queue schema and ours in one step, then grant the worker role what
//! it needs on both. The post-migration check is [`crate::verify`].
//!
//! Why the pooler check: a transaction-mode pooler (PgBouncer `pool_mode = transaction`, Neon's
//! `-pooler` endpoint, Supabase's port 6543) hands each transaction to any server connection.
//! apalis-postgres and sqlx use named prepared statements and `LISTEN` (and apalis a session
//! advisory lock on each worker's random name), none of which survive that; the first symptom was `prepared statement "sqlx_s_1"
//! already exists`. So every connection is checked first and refused, naming the fix
//! (docs/decisions.md, "Transaction poolers are refused").

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

use crate::config::DatabaseSettings;

pub mod adopt;
pub mod conflict;
pub mod connections;
pub mod locks;
pub mod plan;
pub mod render;

/// This project's migrations (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool whose connections run as `settings.role` (when set), so the worker's queries are
/// checked by the same privileges and RLS policies in tests as in production.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    connect_keyed(settings, crate::config::PRIMARY_URL_KEY).await
}

/// A pool for reads only (`search`, `models`, `status`): to `search.database_url` when set (a
/// standby, say), else the primary; as the worker's role when `as_worker`, else as the login.
/// Errors name the setting the URL came from.
pub async fn connect_reads(
    settings: &crate::config::Settings,
    as_worker: bool,
) -> anyhow::Result<PgPool> {
    let (url, key) = settings.search.source(&settings.database);
    let db = if as_worker {
        DatabaseSettings {
            url: url.to_string(),
            ..settings.database.clone()
        }
    } else {
        login_settings(url)
    };
    connect_keyed(&db, key).await
}

async fn connect_keyed(settings: &DatabaseSettings, key: &str) -> anyhow::Result<PgPool> {
    let opts: PgConnectOptions = settings.url.parse().map_err(|e: sqlx::Error| {
        anyhow::anyhow!(
            "invalid {key} {}: {}",
            crate::redact::url(&settings.url),
            crate::redact::secrets(&e.to_string(), None)
        )
    })?;
    // sqlx's own statement log prints a slow statement whole (a write is kilobytes of SQL)
    // inside the batch span; the write step logs one short line of its own instead.
    let opts = sqlx::ConnectOptions::disable_statement_logging(
        opts.application_name(&application_name(settings.max_connections)),
    );
    // One direct connection first: a pool that cannot connect retries until its acquire
    // timeout and then says only "pool timed out"; this names the cause (refused, unknown
    // host, auth, TLS) within seconds.
    let probe = tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::ConnectOptions::connect(&opts),
    )
    .await;
    let target = crate::redact::url(&settings.url);
    match probe {
        Ok(Ok(mut conn)) => {
            // Before any prepared statement: through a transaction pooler the pool's first
            // query would fail with `prepared statement "sqlx_s_1" already exists`.
            if let Some(evidence) = transaction_pooler(&mut conn, &opts).await? {
                let _ = sqlx::Connection::close(conn).await;
                anyhow::bail!("{}", pooler_refusal(&settings.url, &evidence));
            }
            // The role too: a pool whose every connection fails its `SET ROLE` says only
            // "pool timed out" after 10 s.
            if !settings.role.is_empty() {
                let set = conn
                    .execute(sqlx::AssertSqlSafe(format!(
                        "SET ROLE {}",
                        quote_ident(&settings.role)
                    )))
                    .await;
                if let Err(e) = set {
                    let _ = sqlx::Connection::close(conn).await;
                    anyhow::bail!(
                        "connected to {target}, but cannot act as database.role = {:?} \
                         (EMBED_WORKER__DATABASE__ROLE): {}",
                        settings.role,
                        crate::redact::secrets(&describe_db_error(&e), None)
                    );
                }
            }
            let _ = sqlx::Connection::close(conn).await;
        }
        Ok(Err(e)) => anyhow::bail!(
            "cannot connect to the database at {target} ({key}): {}",
            crate::redact::secrets(&describe_db_error(&e), None)
        ),
        Err(_) => anyhow::bail!("no answer from the database at {target} within 10 s ({key})"),
    }
    let role = settings.role.clone();
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        // At a small budget a batch waits for a connection rather than failing (and using up
        // an attempt); the worker's minimum pool (`Settings::min_pool`) keeps one free for it.
        .acquire_timeout(Duration::from_secs(settings.acquire_timeout_secs))
        .after_connect(move |conn, _meta| {
            let role = role.clone();
            Box::pin(async move {
                if !role.is_empty() {
                    conn.execute(sqlx::AssertSqlSafe(format!(
                        "SET ROLE {}",
                        quote_ident(&role)
                    )))
                    .await?;
                }
                Ok(())
            })
        })
        .connect_with(opts)
        .await
        .with_context(|| format!("connecting to {target}"))
}

/// A connection error in words: sqlx's I/O errors print as "error communicating with
/// database: Connection refused (os error 111)".
fn describe_db_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "connection refused (is PostgreSQL running there, on that port?)".into()
            }
            std::io::ErrorKind::TimedOut => "connection timed out".into(),
            _ => io.to_string(),
        },
        other => other.to_string(),
    }
}

/// A connection of `pool` acting as the login role (`RESET ROLE`), for what the worker role may
/// not do: the owner's `CREATE INDEX`, changes to the model registry. Taken from the pool, not
/// opened beside it, so `database.max_connections` stays the process's whole budget (a session
/// pooler of exactly that many server connections is never asked for one more); closed when
/// dropped, so it never goes back to the pool as the login.
pub async fn login_conn(pool: &PgPool) -> sqlx::Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
    let mut conn = pool.acquire().await?;
    conn.close_on_drop();
    conn.execute("RESET ROLE").await?;
    Ok(conn)
}

/// Whether `e` is a database error for a relation, schema or function of embed-worker's that
/// does not exist: a database `migrate` has not made (or an older version made). The command
/// line then says to run `migrate` instead of only PostgreSQL's "relation … does not exist".
pub fn needs_migrate(e: &anyhow::Error) -> bool {
    const OURS: [&str; 7] = [
        "\"apalis.",
        "\"embed_worker.",
        "schema \"apalis\"",
        "schema \"embed_worker\"",
        "rag_embeddings",
        "\"sessions\"",
        "\"question_templates\"",
    ];
    e.chain().any(|c| {
        crate::redact::pg_error(c).is_some_and(|pg| {
            // undefined_table, invalid_schema_name, undefined_function
            matches!(pg.code(), "42P01" | "3F000" | "42883")
                && OURS.iter().any(|o| pg.message().contains(o))
        })
    })
}

/// A pool as the login role, for migrations and administration.
pub async fn connect_as_login(url: &str) -> anyhow::Result<PgPool> {
    connect(&login_settings(url)).await
}

fn login_settings(url: &str) -> DatabaseSettings {
    DatabaseSettings {
        url: url.to_string(),
        max_connections: 4,
        role: String::new(),
        acquire_timeout_secs: 30,
    }
}

/// What this process's connections are for: `run` for a worker, else the command's name.
/// Set once by the command line before it connects; read into every connection's
/// `application_name`.
static PROCESS_KIND: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Names this process's connections (`embed-worker/run …` for a worker).
pub fn set_process_kind(kind: &'static str) {
    let _ = PROCESS_KIND.set(kind);
}

/// A random id for this process, the same in every pool it opens.
fn process_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| uuid::Uuid::new_v4().simple().to_string()[..8].to_string())
}

/// `embed-worker/<kind> pool=<n> <id>`: lets `status`, the connections gauge and the start-up
/// budget check count each live worker's pool from `pg_stat_activity` (no table to keep, and a
/// dead process's connections are gone with it). At most 63 bytes (PostgreSQL's limit).
pub fn application_name(pool: u32) -> String {
    let kind = PROCESS_KIND.get().copied().unwrap_or("cli");
    format!("embed-worker/{kind} pool={pool} {}", process_id())
}

/// Evidence that `conn` goes through a transaction- (or statement-) mode pooler, or `None`.
///
/// Sound both ways on a direct server and a session pooler: there a client connection keeps
/// one backend (its `pg_backend_pid()` never changes) and two client connections never share
/// one. A transaction pooler returns the backend to its pool after each transaction: a second
/// client's transaction is then given the backend the first one just used (PgBouncer reuses
/// the most recent), or the first client's next statement lands on another. Simple-protocol
/// statements only, so the check itself works through any pooler.
async fn transaction_pooler(
    first: &mut sqlx::PgConnection,
    opts: &PgConnectOptions,
) -> anyhow::Result<Option<String>> {
    async fn pid(conn: &mut sqlx::PgConnection, sql: &'static str) -> anyhow::Result<i32> {
        use futures::TryStreamExt;
        let rows: Vec<sqlx::postgres::PgRow> =
            sqlx::raw_sql(sql).fetch(&mut *conn).try_collect().await?;
        let row = rows.last().context("no row from pg_backend_pid()")?;
        Ok(sqlx::Row::try_get::<i32, _>(row, 0)?)
    }
    for _ in 0..3 {
        let a1 = pid(first, "SELECT pg_backend_pid()").await?;
        let mut second = sqlx::ConnectOptions::connect(opts).await?;
        let b = pid(&mut second, "BEGIN; SELECT pg_backend_pid()").await;
        let a2 = pid(first, "SELECT pg_backend_pid()").await;
        let _ = sqlx::raw_sql("ROLLBACK").execute(&mut second).await;
        let _ = sqlx::Connection::close(second).await;
        let (b, a2) = (b?, a2?);
        if b == a1 {
            return Ok(Some(format!(
                "a second connection's transaction ran on the first connection's server backend (pid {a1})"
            )));
        }
        if a2 != a1 {
            return Ok(Some(format!(
                "one connection's statements ran on two server backends (pids {a1} and {a2})"
            )));
        }
    }
    Ok(None)
}

/// The refusal: what was seen, why the worker cannot use it, and which endpoint to use.
fn pooler_refusal(url: &str, evidence: &str) -> String {
    let target = crate::redact::url(url);
    let host = url
        .split_once("://")
        .map(|(_, rest)| rest.rsplit_once('@').map_or(rest, |(_, h)| h))
        .unwrap_or(url);
    let hint = if host.contains("-pooler.") {
        "Neon: use the direct endpoint (the host name without `-pooler`)".to_string()
    } else if host.contains(":6543") {
        "Supabase: use the session-mode pooler (port 5432) or the direct connection \
         (db.<project>.supabase.co:5432)"
            .to_string()
    } else {
        "PgBouncer: point database.url at PostgreSQL itself or at a pool with \
         `pool_mode = session`"
            .to_string()
    };
    format!(
        "{target} is a transaction-mode connection pooler ({evidence}). embed-worker needs a \
         session of its own: apalis-postgres's prepared statements, LISTEN and the worker's \
         advisory locks do not survive a pooler that moves each transaction to another server \
         connection. Nothing was queued, claimed or written. Fix: {hint}; keep the pooled URL \
         for the app (README, \"Running on a managed PostgreSQL\")."
    )
}

/// `s` as a quoted SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// apalis-postgres's migrations (schema `apalis`), then ours, then the worker role's grants on
/// the queue schema. Idempotent: a second run changes nothing.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    migrate_adopting(pool, None, "user_id").await
}

/// [`migrate`] for sessions whose owner column is `session_owner` ([`render::owner_alias`]),
/// adopting the app's own `rag_embeddings` when `adopt` says what it is
/// ([`adopt`]): its preparation first, then the migrations and the attach in one transaction
/// (the app reads its table until the commit and the partitioned one after it; a run killed
/// before the commit leaves the app's table as it was, prepared, and runs again the same way).
pub async fn migrate_adopting(
    pool: &PgPool,
    adopt: Option<&adopt::AppTable>,
    session_owner: &str,
) -> anyhow::Result<()> {
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .context("apalis-postgres migrations")?;
    // Migration 7 turns row-level security on for `sessions` only where this project creates
    // the table; whether it will is known only before migration 1 runs.
    let mut conn = pool.acquire().await?;
    render::owner_alias(&mut conn, session_owner).await?;
    let creating_sessions = creating_sessions(&mut conn).await?;
    if creating_sessions {
        conn.execute("SET embed_worker.creating_sessions = on")
            .await?;
    }
    let migrated = match adopt {
        Some(t) if adopt::pending(&mut conn).await? => {
            adopt::prepare(&mut conn, t).await?;
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            let part = adopt::set_aside(&mut tx, t).await?;
            MIGRATOR
                .run(&mut *tx)
                .await
                .context("embed-worker migrations")?;
            adopt::attach(&mut tx, t, &part).await?;
            tx.commit().await.map_err(anyhow::Error::from)
        }
        _ => MIGRATOR.run(&mut *conn).await.map_err(anyhow::Error::from),
    };
    conn.execute("RESET embed_worker.creating_sessions").await?;
    migrated.context("embed-worker migrations")?;
    pool.execute(
        r#"
        GRANT USAGE ON SCHEMA apalis TO embed_worker;
        GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA apalis TO embed_worker;
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA apalis TO embed_worker;
        GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA apalis TO embed_worker;
        "#,
    )
    .await
    .context("granting embed_worker the apalis schema")?;
    Ok(())
}

/// Whether `sessions` is this project's to secure (migration 7): absent before migration 1,
/// or made by migration 1 in a run that was stopped before migration 7. The second is read
/// from the catalog, so a run killed in between and run again decides as the first would
/// have: migration 1 made the table's row type in the transaction that made its
/// `trg_sessions_delete_embeddings` trigger (same `xmin`; migration 1 makes that trigger on
/// the app's own table too, in a later transaction than the app's CREATE TABLE). The
/// migration record itself cannot tell: sqlx updates its row after the commit.
async fn creating_sessions(conn: &mut sqlx::PgConnection) -> anyhow::Result<bool> {
    let (absent, recorded): (bool, bool) = sqlx::query_as(
        "SELECT to_regclass('public.sessions') IS NULL,
                to_regclass('public._sqlx_migrations') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await?;
    if absent || !recorded {
        return Ok(absent);
    }
    let made_by_1_before_7: Option<bool> = sqlx::query_scalar(
        "SELECT (SELECT xmin::text FROM pg_type WHERE oid = 'public.sessions'::regtype)
                = (SELECT xmin::text FROM pg_trigger
                    WHERE tgrelid = 'public.sessions'::regclass
                      AND tgname = 'trg_sessions_delete_embeddings')
           FROM public._sqlx_migrations m
          WHERE m.version = 20261126000001 AND m.success
            AND NOT EXISTS (SELECT 1 FROM public._sqlx_migrations
                             WHERE version = 20261127000007 AND success)",
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(made_by_1_before_7 == Some(true))
}

/// Registers `queue` as the worker's: the only queues the app's `embed_worker.enqueue_many`
/// accepts (its batch lane is the server's, for backfills).
pub async fn register_queue(pool: &PgPool, queue: &str) -> anyhow::Result<()> {
    sqlx::query("INSERT INTO embed_worker.queues (name) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(queue)
        .execute(pool)
        .await
        .context("registering the queue")?;
    Ok(())
}

/// Enables or disables the change-capture triggers per source (config `capture.*`). The
/// update capture also moves `updated_at` (migration 17): on, it replaces the touch trigger,
/// which is disabled; off, the touch trigger runs alone. Either way one function per changed row.
pub async fn apply_capture(pool: &PgPool, sessions: bool, templates: bool) -> anyhow::Result<()> {
    for (table, on, prefix) in [
        ("sessions", sessions, "trg_sessions"),
        ("question_templates", templates, "trg_question_templates"),
    ] {
        for trg in ["capture_insert", "capture_update"] {
            set_trigger(pool, table, &format!("{prefix}_{trg}"), on).await?;
        }
        set_trigger(pool, table, &format!("{prefix}_touch"), !on).await?;
    }
    Ok(())
}

/// Turns the queue's NOTIFY on or off (config `queue.listen`). Off, no transaction that queues
/// jobs sends a notification (each takes a database-wide lock at commit) and workers poll.
pub async fn apply_listen(pool: &PgPool, listen: bool) -> anyhow::Result<()> {
    set_trigger(pool, "apalis.jobs", "notify_workers", listen).await
}

/// `ALTER TABLE table ENABLE|DISABLE TRIGGER trigger` (both names ours, not input).
/// Nothing when it already is so: `ALTER TABLE` takes a lock on the app's table that queues
/// the app's writes behind any long transaction of its own, at every `migrate`.
async fn set_trigger(pool: &PgPool, table: &str, trigger: &str, on: bool) -> anyhow::Result<()> {
    let enabled: Option<bool> = sqlx::query_scalar(
        "SELECT tgenabled <> 'D' FROM pg_trigger WHERE tgrelid = $1::regclass AND tgname = $2",
    )
    .bind(table)
    .bind(trigger)
    .fetch_optional(pool)
    .await
    .with_context(|| format!("reading trigger {trigger} on {table}"))?;
    if enabled == Some(on) {
        return Ok(());
    }
    let verb = if on { "ENABLE" } else { "DISABLE" };
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE {table} {verb} TRIGGER {trigger}"
    )))
    .execute(pool)
    .await
    .with_context(|| format!("{verb} TRIGGER {trigger}"))?;
    Ok(())
}
