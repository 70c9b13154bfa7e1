//! Connecting, migrating and verifying the database.
//!
//! Why here: every command needs the same pool (same role, same limits), and `migrate` must
//! apply apalis-postgres's queue schema and ours in one step, then grant the worker role what
//! it needs on both. `verify` is the design's post-migration check: it reads the catalog, not
//! our own migration history, so it also catches an index someone created by hand.

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
    let opts = opts.application_name("embed-worker");
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
        Ok(Ok(conn)) => {
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

/// One vector index as the catalog describes it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VectorIndex {
    /// Index name.
    pub name: String,
    /// `hnsw` or `ivfflat` (or another).
    pub access_method: String,
    /// Storage options, e.g. `m=16`.
    pub options: Vec<String>,
    /// `CREATE INDEX` statement.
    pub definition: String,
    /// False after a failed concurrent build.
    pub valid: bool,
}

/// Every index on a `vector` column or expression of any table.
pub async fn vector_indexes<'e>(db: impl sqlx::PgExecutor<'e>) -> anyhow::Result<Vec<VectorIndex>> {
    Ok(sqlx::query_as::<_, VectorIndex>(
        r#"
        SELECT i.relname::text AS name,
               am.amname::text AS access_method,
               coalesce(i.reloptions, '{}')::text[] AS options,
               pg_get_indexdef(i.oid) AS definition,
               x.indisvalid AS valid
          FROM pg_index x
          JOIN pg_class i ON i.oid = x.indexrelid
          JOIN pg_am am ON am.oid = i.relam
         WHERE am.amname IN ('hnsw', 'ivfflat')
            OR EXISTS (SELECT 1 FROM pg_opclass oc
                         JOIN pg_type t ON t.oid = oc.opcintype
                        WHERE oc.oid = ANY (x.indclass) AND t.typname = 'vector')
         ORDER BY 1
        "#,
    )
    .fetch_all(db)
    .await?)
}

/// The result of `verify`: what was found and what is wrong.
#[derive(Debug)]
pub struct VerifyReport {
    /// Every vector index found.
    pub indexes: Vec<VectorIndex>,
    /// What is wrong, one sentence each.
    pub problems: Vec<String>,
    /// What is fine but worth knowing (an index deferred until a backfill drains).
    pub notes: Vec<String>,
}

/// The indexes as a table, then `verify: OK` or one `verify: FAIL: …` line per problem.
impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<56} {:<8} {:<14} {:<32} valid",
            "vector index", "method", "type", "options"
        )?;
        for ix in &self.indexes {
            writeln!(
                f,
                "{:<56} {:<8} {:<14} {:<32} {}",
                ix.name,
                ix.access_method,
                crate::model_index::stored_type(ix).unwrap_or_else(|| "?".into()),
                ix.options.join(","),
                ix.valid
            )?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        if self.problems.is_empty() {
            writeln!(f, "verify: OK")
        } else {
            self.problems
                .iter()
                .try_for_each(|p| writeln!(f, "verify: FAIL: {p}"))
        }
    }
}

/// The design's post-migration check, against the active model's index as configured
/// (`settings`): HNSW, m = 16, ef_construction = 64, cosine; missing only while deferred.
pub async fn verify(
    pool: &PgPool,
    settings: &crate::config::Settings,
) -> anyhow::Result<VerifyReport> {
    let indexes = vector_indexes(pool).await?;
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    for ix in &indexes {
        if ix.access_method == "ivfflat" {
            problems.push(format!(
                "index {} uses IVFFlat; the design requires HNSW",
                ix.name
            ));
        }
        if !ix.valid {
            problems.push(format!(
                "index {} is INVALID (a failed CONCURRENTLY build? `embed-worker migrate` or \
                 `models build-index` drops and rebuilds it)",
                ix.name
            ));
        }
    }
    let spec = crate::model_index::IndexSpec::from_settings(settings)?;
    let want = format!(
        "{} index of {} ({})",
        spec.index_type(),
        spec.model,
        spec.name()
    );
    match crate::model_index::find(&indexes, &spec) {
        crate::model_index::IndexState::Ready(name) => {
            let ix = indexes.iter().find(|i| i.name == name).expect("found");
            for opt in ["m=16", "ef_construction=64"] {
                if !ix.options.iter().any(|o| o == opt) {
                    problems.push(format!("{name} lacks {opt}"));
                }
            }
        }
        crate::model_index::IndexState::Invalid(_) => {}
        crate::model_index::IndexState::Missing => {
            match crate::model_index::build::not_due(pool, settings, &spec).await? {
                Some(why) => notes.push(format!("{want} not built yet: {why}")),
                None => problems.push(format!(
                    "{want} is missing (`embed-worker models build-index` builds it)"
                )),
            }
        }
    }
    let rls: Vec<(String, bool)> = sqlx::query_as(
        "SELECT relname::text, relrowsecurity FROM pg_class
          WHERE relname IN ('rag_embeddings', 'question_templates') AND relkind = 'r'
            AND relnamespace = 'public'::regnamespace",
    )
    .fetch_all(pool)
    .await?;
    for table in ["rag_embeddings", "question_templates"] {
        match rls.iter().find(|(t, _)| t == table) {
            Some((_, true)) => {}
            Some((_, false)) => problems.push(format!("row-level security is off on {table}")),
            None => problems.push(format!("table {table} is missing")),
        }
    }
    // `sessions` usually belongs to the app (we leave its table alone), but a user's practice
    // notes readable by every user is the leak the design's RLS exists to prevent.
    let sessions_open: bool = sqlx::query_scalar(
        "SELECT coalesce(NOT c.relrowsecurity
                         AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_user')
                         AND has_table_privilege('app_user', c.oid, 'SELECT'), false)
           FROM pg_class c
          WHERE c.relname = 'sessions' AND c.relkind = 'r'
            AND c.relnamespace = 'public'::regnamespace",
    )
    .fetch_optional(pool)
    .await?
    .unwrap_or(false);
    if sessions_open {
        problems.push(
            "row-level security is off on sessions while app_user can select it: every user \
             reads every user's sessions. Fix (as the table's owner): ALTER TABLE sessions \
             ENABLE ROW LEVEL SECURITY; CREATE POLICY sessions_read_own ON sessions FOR SELECT \
             TO app_user USING (user_id = auth.uid()); CREATE POLICY sessions_worker_read ON \
             sessions FOR SELECT TO embed_worker USING (true);"
                .into(),
        );
    }
    let trigger: Option<(bool,)> = sqlx::query_as(
        "SELECT tgenabled <> 'D' FROM pg_trigger
          WHERE tgname = 'trg_rag_embeddings_check_source'
            AND tgrelid = to_regclass('public.rag_embeddings')",
    )
    .fetch_optional(pool)
    .await?;
    match trigger {
        Some((true,)) => {}
        Some((false,)) => {
            problems.push("source trigger trg_rag_embeddings_check_source is disabled".into())
        }
        None => problems.push("source trigger trg_rag_embeddings_check_source is missing".into()),
    }
    Ok(VerifyReport {
        indexes,
        problems,
        notes,
    })
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
