//! The parts of the schema that follow the render settings: which columns are a source's text.
//!
//! Why: `render.session` and `render.template` may name any column of the app's tables (an
//! app keeps its templates' text in `question_text`, say), and three things must agree with
//! them: the loader (it reads exactly those columns), change capture (its triggers fire when
//! exactly those change: the WHEN clause the executor evaluates, so other updates run no
//! function), and queueing's "has this row text" test. The first reads the settings at each
//! batch; the other two are database objects, made here by `migrate` and re-made whenever the
//! settings name other columns. A comment on the capture trigger records the columns it was
//! made for, so an unchanged setting changes nothing (no lock on the app's table).

use anyhow::Context;
use sqlx::PgPool;

use crate::config::{RenderSettings, render_fields};
use crate::source::SourceType;

/// The render setting's key and format for `ty`.
pub fn format_of(render: &RenderSettings, ty: SourceType) -> (&'static str, &str) {
    match ty {
        SourceType::Session => ("render.session", &render.session),
        SourceType::Template => ("render.template", &render.template),
    }
}

/// Each source type with its render setting's key and the columns that setting names.
pub fn named(
    render: &RenderSettings,
) -> impl Iterator<Item = (SourceType, &'static str, Vec<String>)> + '_ {
    SourceType::ALL.into_iter().map(|ty| {
        let (key, format) = format_of(render, ty);
        (ty, key, render_fields(format))
    })
}

/// Columns the render settings name that `ty`'s table lacks, as errors naming the setting,
/// the column and the table (with the columns it has). Empty when all exist.
pub async fn missing_columns(
    conn: &mut sqlx::PgConnection,
    render: &RenderSettings,
) -> sqlx::Result<Vec<String>> {
    let mut out = Vec::new();
    for (ty, key, fields) in named(render) {
        let columns = columns_of(&mut *conn, ty.table()).await?;
        if columns.is_empty() {
            continue; // no table yet: migration 1 makes it with the default columns
        }
        for f in fields {
            if !columns.iter().any(|c| c.name == f) {
                out.push(format!(
                    "{key} names {{{f}}}, but table {} has no column {f} (its columns: {})",
                    ty.table(),
                    columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
    Ok(out)
}

/// What the capture trigger's comment says it was made for: the columns, sorted (the order
/// of the format does not matter to a WHEN clause). Migration 17 writes the default's.
fn signature(fields: &[String]) -> String {
    let mut sorted: Vec<&str> = fields.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    format!("embed-worker render columns: {}", sorted.join(", "))
}

/// Where change capture fires on other columns than the render settings name (they changed
/// and `migrate` has not re-made the triggers since), one line each naming both and the fix.
pub async fn capture_behind(
    conn: &mut sqlx::PgConnection,
    render: &RenderSettings,
) -> sqlx::Result<Vec<String>> {
    let mut out = Vec::new();
    for (ty, key, fields) in named(render) {
        let want = signature(&fields);
        let made_for: Option<Option<String>> = sqlx::query_scalar(
            "SELECT obj_description(g.oid, 'pg_trigger') FROM pg_trigger g
              WHERE g.tgrelid = to_regclass('public.' || $1) AND g.tgname = $2",
        )
        .bind(ty.table())
        .bind(format!("{}_capture_update", trigger_prefix(ty)))
        .fetch_optional(&mut *conn)
        .await?;
        // No trigger (no table, or not migrated): `migrate` has not run, which is said elsewhere.
        let Some(made_for) = made_for else { continue };
        if made_for.as_deref() != Some(want.as_str()) {
            let was = made_for
                .as_deref()
                .and_then(|c| c.strip_prefix("embed-worker render columns: "))
                .unwrap_or("columns it does not record");
            out.push(format!(
                "change capture on {} fires on {was}, but {key} names {}: run `embed-worker \
                 migrate` to re-make it",
                ty.table(),
                fields.join(", ")
            ));
        }
    }
    Ok(out)
}

/// The comment on a has-text function made by this version's [`text_test`]; a function without
/// it (an older definition: ASCII white space, text columns only) is made again by `migrate`.
const TEXT_TEST_VERSION: &str =
    "embed-worker text test 2: every render column, Unicode white space";

fn is_text_type(ty: &str) -> bool {
    matches!(ty, "text" | "varchar" | "bpchar")
}

/// SQL true when `value` (a column of type `ty`) renders as text: not NULL and not empty once
/// trimmed of the white space the worker trims. JSON renders nothing for null, `[]`, `{}` and
/// `""` (a nested empty value, such as `[""]`, is counted as text here and renders empty: the
/// worker then ends that source's job as without text).
fn text_test(value: &str, ty: &str) -> String {
    let ws = crate::source::white_space_sql();
    match ty {
        t if is_text_type(t) => format!("btrim({value}, {ws}) <> ''"),
        "json" | "jsonb" => {
            format!("btrim({value}::text, {ws}) NOT IN ('', 'null', '[]', '{{}}', '\"\"')")
        }
        _ => format!("btrim({value}::text, {ws}) <> ''"),
    }
}

fn trigger_prefix(ty: SourceType) -> &'static str {
    match ty {
        SourceType::Session => "trg_sessions",
        SourceType::Template => "trg_question_templates",
    }
}

/// The render columns' capture triggers and has-text functions, re-made where the settings
/// name other columns than they were made for. Returns one line per table re-made.
pub async fn follow_render(pool: &PgPool, render: &RenderSettings) -> anyhow::Result<Vec<String>> {
    let mut conn = pool.acquire().await?;
    let missing = missing_columns(&mut conn, render).await?;
    anyhow::ensure!(missing.is_empty(), "{}", missing.join("\n"));
    let mut changed = Vec::new();
    for (ty, _, fields) in named(render) {
        let signature = signature(&fields);
        // The parameter's name is migration 19's (a function's is kept when it is replaced).
        let prefix = trigger_prefix(ty);
        let (kind, x) = match ty {
            SourceType::Session => ("session", "s"),
            SourceType::Template => ("template", "q"),
        };
        let table = ty.table();
        let function = ty.has_text_function();
        let (made_for, has_fn): (Option<String>, bool) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT (SELECT obj_description(g.oid, 'pg_trigger') FROM pg_trigger g
                      WHERE g.tgrelid = 'public.{table}'::regclass
                        AND g.tgname = '{prefix}_capture_update'),
                    obj_description(to_regprocedure('embed_worker.{function}(public.{table})'),
                                    'pg_proc') IS NOT DISTINCT FROM '{TEXT_TEST_VERSION}'"
            )))
            .fetch_one(&mut *conn)
            .await?;
        if made_for.as_deref() == Some(signature.as_str()) && has_fn {
            continue;
        }
        let columns = columns_of(&mut conn, ty.table()).await?;
        let q = |f: &String| super::quote_ident(f);
        let new: Vec<String> = fields.iter().map(|f| format!("NEW.{}", q(f))).collect();
        let old: Vec<String> = fields.iter().map(|f| format!("OLD.{}", q(f))).collect();
        let when = format!(
            "(({}) IS DISTINCT FROM ({}))",
            new.join(", "),
            old.join(", ")
        );
        // Every named column, as the worker renders it ([`text_test`]); text columns first (the
        // planner tries the tests in order, and most rows have text there).
        let mut named_columns: Vec<(&String, &str)> = fields
            .iter()
            .map(|f| {
                let ty = columns
                    .iter()
                    .find(|c| c.name == *f)
                    .map_or("text", |c| c.type_name.as_str());
                (f, ty)
            })
            .collect();
        named_columns.sort_by_key(|(_, ty)| !is_text_type(ty));
        let tests: Vec<String> = named_columns
            .into_iter()
            .map(|(f, ty)| text_test(&format!("{x}.{}", q(f)), ty))
            .collect();
        let sql = format!(
            "CREATE OR REPLACE TRIGGER {prefix}_capture_update BEFORE UPDATE ON public.{table}
                 FOR EACH ROW WHEN {when} EXECUTE FUNCTION embed_worker.capture_{kind}_update();
             CREATE OR REPLACE TRIGGER {prefix}_touch BEFORE UPDATE ON public.{table}
                 FOR EACH ROW WHEN {when} EXECUTE FUNCTION embed_worker.touch_{kind}();
             COMMENT ON TRIGGER {prefix}_capture_update ON public.{table} IS '{signature}';
             CREATE OR REPLACE FUNCTION embed_worker.{function}({x} public.{table})
                 RETURNS boolean LANGUAGE sql STABLE AS $f$ SELECT {tests} $f$;
             COMMENT ON FUNCTION embed_worker.{function}(public.{table}) IS '{TEXT_TEST_VERSION}';
             REVOKE EXECUTE ON FUNCTION embed_worker.{function}(public.{table}) FROM PUBLIC;
             GRANT EXECUTE ON FUNCTION embed_worker.{function}(public.{table}) TO embed_worker;",
            tests = tests.join(" OR "),
        );
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&mut *tx)
            .await
            .with_context(|| {
                format!(
                    "making {table}'s capture triggers for {}",
                    fields.join(", ")
                )
            })?;
        tx.commit().await?;
        changed.push(format!(
            "change capture on {table} fires on {}",
            fields.join(", ")
        ));
    }
    Ok(changed)
}

/// A column of one of the app's tables, as the catalog has it.
#[derive(sqlx::FromRow)]
pub(super) struct Column {
    pub(super) name: String,
    /// `format_type`: what the error shows.
    pub(super) shown: String,
    /// pg_type.typname (`varchar`, `timestamptz`, an ENUM's own name).
    pub(super) type_name: String,
    /// pg_type.typtype: `e` for an ENUM.
    pub(super) type_type: String,
}

/// The columns of `public.<table>` in their order; empty when there is no such table.
pub(super) async fn columns_of(
    conn: &mut sqlx::PgConnection,
    table: &str,
) -> sqlx::Result<Vec<Column>> {
    sqlx::query_as(
        "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS shown,
                t.typname::text AS type_name, t.typtype::text AS type_type
           FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_type t ON t.oid = a.atttypid
          WHERE c.relnamespace = 'public'::regnamespace AND c.relname = $1
            AND a.attnum > 0 AND NOT a.attisdropped
          ORDER BY a.attnum",
    )
    .bind(table)
    .fetch_all(&mut *conn)
    .await
}

/// What `render.session_owner` names in the worker's SQL: the session-embeddings policy and
/// the app's enqueue check compare `s.<owner> = auth.uid()`. Made for `user_id` by the
/// migrations, re-made here (by `migrate`) when the setting names another column; the column
/// they were made for is the enqueue function's comment. One transaction; nothing when they
/// already follow it.
pub async fn follow_owner(pool: &PgPool, owner: &str) -> anyhow::Result<Option<String>> {
    let enqueue = "embed_worker.enqueue_many(embedding_source[], uuid[], text, integer, integer)";
    let made_for: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT obj_description('{enqueue}'::regprocedure, 'pg_proc')"
    )))
    .fetch_one(pool)
    .await?;
    let old = made_for
        .as_deref()
        .and_then(|c| c.strip_prefix("embed-worker session owner: "))
        .unwrap_or("user_id")
        .to_string();
    if old == owner {
        return Ok(None);
    }
    let (def, policy): (String, String) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT pg_get_functiondef('{enqueue}'::regprocedure),
                (SELECT qual FROM pg_policies WHERE schemaname = 'public'
                    AND tablename = 'rag_embeddings'
                    AND policyname = 'rag_embeddings_read_own_sessions')"
    )))
    .fetch_one(pool)
    .await
    .context("reading the enqueue check and the session-embeddings policy")?;
    // Unquoted: the setting is checked to be a lower-case identifier, and a name after `s.`
    // may be any keyword.
    let (from_fn, to_fn) = (format!("s.{old} = uid"), format!("s.{owner} = uid"));
    let (from_pol, to_pol) = (
        format!("(s.{old} = auth.uid())"),
        format!("(s.{owner} = auth.uid())"),
    );
    anyhow::ensure!(
        def.contains(&from_fn) && policy.contains(&from_pol),
        "the enqueue check or the session-embeddings policy no longer compares sessions.{old} \
         with the user: not re-made for render.session_owner = {owner:?}"
    );
    let sql = format!(
        "{function};
         COMMENT ON FUNCTION {enqueue} IS 'embed-worker session owner: {owner}';
         DROP POLICY rag_embeddings_read_own_sessions ON public.rag_embeddings;
         CREATE POLICY rag_embeddings_read_own_sessions ON public.rag_embeddings FOR SELECT
             TO app_user USING ({qual});",
        function = def.replace(&from_fn, &to_fn),
        qual = policy.replace(&from_pol, &to_pol),
    );
    let mut tx = pool.begin().await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *tx)
        .await
        .with_context(|| format!("re-making the owner checks for sessions.{owner}"))?;
    tx.commit().await?;
    Ok(Some(format!(
        "session owner: row-level security and the app's enqueue check read sessions.{owner}"
    )))
}

/// Where the app's sessions name their owner otherwise (`render.session_owner`) and have no
/// `user_id`: migrations 1, 2 and 13, as released, index and compare `sessions.user_id`, so a
/// placeholder column of that name is added for them (nullable, no default: catalog only, no
/// rewrite; PostgreSQL 18's virtual columns cannot be indexed, which migration 1 does).
/// Until [`follow_owner`] points the worker's checks at the owner column, they compare the
/// placeholder's NULLs and let no user see a session's embeddings: closed, not open. Then
/// [`drop_owner_placeholder`] drops it. Idempotent; `false` when nothing was needed.
pub async fn owner_alias(conn: &mut sqlx::PgConnection, owner: &str) -> anyhow::Result<bool> {
    use sqlx::Executor;
    if owner == "user_id" || !needs_owner_alias(conn).await? {
        return Ok(false);
    }
    conn.execute(
        "ALTER TABLE public.sessions ADD COLUMN IF NOT EXISTS user_id uuid;
         COMMENT ON COLUMN public.sessions.user_id IS 'embed-worker placeholder'",
    )
    .await
    .context("adding the placeholder sessions.user_id")?;
    Ok(true)
}

/// After [`follow_owner`]: the placeholder `sessions.user_id` and migration 1's index on it
/// dropped, and an index of that name on the owner column built `CONCURRENTLY` (the worker's
/// row-level security and searches look sessions up by owner). Idempotent.
pub async fn drop_owner_placeholder(pool: &PgPool, owner: &str) -> anyhow::Result<bool> {
    let placeholder: bool = sqlx::query_scalar(
        "SELECT coalesce(col_description('public.sessions'::regclass,
                    (SELECT attnum FROM pg_attribute WHERE attrelid = 'public.sessions'::regclass
                        AND attname = 'user_id' AND NOT attisdropped)) = 'embed-worker placeholder',
                false)",
    )
    .fetch_one(pool)
    .await?;
    if placeholder {
        sqlx::raw_sql(
            "DROP INDEX IF EXISTS public.idx_sessions_user_id;
             ALTER TABLE public.sessions DROP COLUMN user_id",
        )
        .execute(pool)
        .await
        .context("dropping the placeholder sessions.user_id")?;
    }
    if owner == "user_id" {
        return Ok(placeholder);
    }
    sqlx::raw_sql(
        "DO $$ BEGIN
             IF EXISTS (SELECT 1 FROM pg_index
                         WHERE indexrelid = to_regclass('public.idx_sessions_user_id')
                           AND NOT indisvalid) THEN
                 DROP INDEX public.idx_sessions_user_id;
             END IF;
         END $$",
    )
    .execute(pool)
    .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS idx_sessions_user_id ON public.sessions ({owner})"
    )))
    .execute(pool)
    .await?;
    Ok(placeholder)
}

/// Whether the app's sessions lack `user_id` while a migration that reads it is still to run.
pub(super) async fn needs_owner_alias(conn: &mut sqlx::PgConnection) -> sqlx::Result<bool> {
    let (sessions, has_user_id, recorded): (bool, bool, bool) = sqlx::query_as(
        "SELECT to_regclass('public.sessions') IS NOT NULL,
                EXISTS (SELECT 1 FROM pg_attribute
                         WHERE attrelid = to_regclass('public.sessions') AND attname = 'user_id'
                           AND NOT attisdropped),
                to_regclass('public._sqlx_migrations') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !sessions || has_user_id {
        return Ok(false);
    }
    if !recorded {
        return Ok(true);
    }
    sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM public._sqlx_migrations
                             WHERE version = 20261129000013 AND success)",
    )
    .fetch_one(conn)
    .await
}
