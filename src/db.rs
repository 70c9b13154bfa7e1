//! Connecting to and migrating the database.
//!
//! Why here: every command needs the same pool (same role, same limits), and `migrate` must
//! apply apalis-postgres's queue schema and ours in one step, then grant the worker role what
//! it needs on both. The post-migration check is [`crate::verify`].

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};

use crate::config::DatabaseSettings;

/// This project's migrations (`migrations/`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A pool whose connections run as `settings.role` (when set), so the worker's queries are
/// checked by the same privileges and RLS policies in tests as in production.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let opts: PgConnectOptions = settings.url.parse().map_err(|e: sqlx::Error| {
        anyhow::anyhow!(
            "invalid database.url / DATABASE_URL {}: {}",
            crate::redact::url(&settings.url),
            crate::redact::secrets(&e.to_string(), None)
        )
    })?;
    // sqlx's own statement log prints a slow statement whole (a write is kilobytes of SQL)
    // inside the batch span; the write step logs one short line of its own instead.
    let opts =
        sqlx::ConnectOptions::disable_statement_logging(opts.application_name("embed-worker"));
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
            "cannot connect to the database at {target} (database.url / DATABASE_URL): {}",
            crate::redact::secrets(&describe_db_error(&e), None)
        ),
        Err(_) => anyhow::bail!(
            "no answer from the database at {target} within 10 s (database.url / DATABASE_URL)"
        ),
    }
    let role = settings.role.clone();
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_secs(10))
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

/// A pool as the login role, for migrations and administration.
pub async fn connect_as_login(url: &str) -> anyhow::Result<PgPool> {
    let settings = DatabaseSettings {
        url: url.to_string(),
        max_connections: 4,
        role: String::new(),
    };
    connect(&settings).await
}

/// `s` as a quoted SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// apalis-postgres's migrations (schema `apalis`), then ours, then the worker role's grants on
/// the queue schema. Idempotent: a second run changes nothing.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .context("apalis-postgres migrations")?;
    // Migration 7 turns row-level security on for `sessions` only where this project creates
    // the table; whether it will is known only before migration 1 runs.
    let mut conn = pool.acquire().await?;
    let creating_sessions: bool =
        sqlx::query_scalar("SELECT to_regclass('public.sessions') IS NULL")
            .fetch_one(&mut *conn)
            .await?;
    if creating_sessions {
        conn.execute("SET embed_worker.creating_sessions = on")
            .await?;
    }
    let migrated = MIGRATOR.run(&mut *conn).await;
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

/// Enables or disables the change-capture triggers per source (config `capture.*`).
pub async fn apply_capture(pool: &PgPool, sessions: bool, templates: bool) -> anyhow::Result<()> {
    for (table, on, triggers) in [
        (
            "sessions",
            sessions,
            ["trg_sessions_capture_insert", "trg_sessions_capture_update"],
        ),
        (
            "question_templates",
            templates,
            [
                "trg_question_templates_capture_insert",
                "trg_question_templates_capture_update",
            ],
        ),
    ] {
        for trg in triggers {
            let verb = if on { "ENABLE" } else { "DISABLE" };
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {table} {verb} TRIGGER {trg}"
            )))
            .execute(pool)
            .await
            .with_context(|| format!("{verb} TRIGGER {trg}"))?;
        }
    }
    Ok(())
}
