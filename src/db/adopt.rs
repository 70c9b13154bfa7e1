//! Adopt: the app's own `rag_embeddings`, attached in place as its model's partition.
//!
//! Why: where embed-worker is deployed, the app's migrations (the reviewed 0012–0014) have
//! usually made `rag_embeddings` already, with vectors the app paid for and an HNSW index that
//! took hours to build. Copying the rows into the worker's table would rewrite gigabytes and
//! rebuild that index; embedding them again would pay for them twice. Instead the table itself
//! becomes the partition of its model under the worker's LIST-partitioned `rag_embeddings`:
//! its heap, its index, its ids and its extra columns stay as they are.
//!
//! How, without a rewrite and without blocking the app's reads for more than a moment:
//! 1. Before (each step idempotent, none blocks reads or writes for long): `embedding` loses
//!    its size (the index keeps it), the worker's columns are added with constant defaults
//!    (catalog only; `content_hash` empty marks a vector not yet verified), the parent's CHECKs and the partition bound are added `NOT VALID` and
//!    validated (a scan under SHARE UPDATE EXCLUSIVE: the app keeps reading and writing), and
//!    the worker's unique key is built `CONCURRENTLY`.
//! 2. One transaction: the table is renamed to its partition's name, the worker's migrations
//!    make the parent beside it, the parent takes the app's column types (id, `source_type`)
//!    and extra columns, grants and policies, and the table is attached. The validated
//!    constraints let ATTACH skip its scan, and the built index becomes the partition's key.
//!    The app sees the old table until the commit and the partitioned one after it.
//! 3. The first run keeps each vector whose source has not changed since it was written and
//!    records its content hash and tokens ([`crate::pipeline`]): it costs nothing.

use anyhow::Context;
use sqlx::{Executor, PgConnection};

use super::conflict::Conflict;
use super::quote_ident;

/// The app's `rag_embeddings`, as the catalog shows it.
#[derive(Debug, Clone)]
pub struct AppTable {
    /// Its columns in order.
    pub columns: Vec<AppColumn>,
    /// The one model of its rows (`embedding_model`'s values, or its default when absent).
    pub model: String,
    /// The vectors' size: the column's typmod, else `model.dimensions`.
    pub dimensions: i32,
    /// Rows counted when planned.
    pub rows: i64,
    /// Its HNSW index on the plain column, kept as the model's index.
    pub hnsw: Option<String>,
}

/// One column of the app's table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AppColumn {
    /// Its name.
    pub name: String,
    /// `format_type` with the type modifier: what the parent's column is made as.
    pub shown: String,
    /// pg_type.typname.
    pub type_name: String,
    /// pg_type.typtype (`e`: an ENUM).
    pub type_type: String,
    /// atttypmod (a vector's dimensions; -1 when none).
    pub typmod: i32,
    /// NOT NULL.
    pub not_null: bool,
    /// Its default expression.
    pub default: Option<String>,
    /// attidentity: `a` or `d` for an identity column, empty otherwise.
    pub identity: String,
}

/// The columns the worker's table has, what it makes when the app's table lacks one (constant
/// defaults: catalog only), and the types it accepts when the app's has it.
const WORKER_COLUMNS: &[(&str, &str, &[&str])] = &[
    ("chunk_index", "integer NOT NULL DEFAULT 0", &["int4"]),
    ("content_hash", "text NOT NULL DEFAULT ''", &["text"]),
    ("dimensions", "integer NOT NULL DEFAULT {dims}", &["int4"]),
    ("token_count", "integer", &["int4"]),
    ("created_at", "timestamptz DEFAULT now()", &["timestamptz"]),
    // No default for the rows already there (none is known to be fresh), now() for new ones.
    ("updated_at", "timestamptz", &["timestamptz"]),
];

/// Reads the app's table and says why it cannot be adopted, if it cannot. `model` and `dims`
/// are the settings' (used when the table has no `embedding_model` or no typmod).
pub async fn inspect(
    conn: &mut PgConnection,
    model: &str,
    dims: usize,
) -> anyhow::Result<(AppTable, Vec<Conflict>)> {
    let columns: Vec<AppColumn> = sqlx::query_as(
        "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS shown,
                t.typname::text AS type_name, t.typtype::text AS type_type,
                a.atttypmod AS typmod, a.attnotnull AS not_null,
                pg_get_expr(d.adbin, d.adrelid) AS default, a.attidentity::text AS identity
           FROM pg_attribute a
           JOIN pg_type t ON t.oid = a.atttypid
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE a.attrelid = 'public.rag_embeddings'::regclass AND a.attnum > 0
            AND NOT a.attisdropped
          ORDER BY a.attnum",
    )
    .fetch_all(&mut *conn)
    .await?;
    let col = |n: &str| columns.iter().find(|c| c.name == n);
    let mut conflicts = Vec::new();
    let conflict = |conflicts: &mut Vec<Conflict>, place: &str, found: String, needed: &str| {
        conflicts.push(Conflict {
            place: format!("rag_embeddings.{place}"),
            found,
            needed: needed.into(),
        })
    };
    match col("id") {
        Some(c) if matches!(c.type_name.as_str(), "uuid" | "int8") => {}
        Some(c) => conflict(
            &mut conflicts,
            "id",
            format!("of type {}", c.shown),
            "uuid or bigint: the partition keeps the app's ids",
        ),
        None => conflict(
            &mut conflicts,
            "id",
            "no such column".into(),
            "uuid or bigint, the row's id",
        ),
    }
    match col("source_type") {
        Some(c) if c.type_name == "text" => {}
        Some(c) if c.type_type == "e" => {
            let labels: Vec<String> = sqlx::query_scalar(
                "SELECT enumlabel::text FROM pg_enum WHERE enumtypid = $1::regtype
                  ORDER BY enumsortorder",
            )
            .bind(&c.shown)
            .fetch_all(&mut *conn)
            .await?;
            for l in ["session", "template"] {
                if !labels.iter().any(|x| x == l) {
                    conflict(
                        &mut conflicts,
                        "source_type",
                        format!("ENUM {} without '{l}' (has {})", c.shown, labels.join(", ")),
                        "both 'session' and 'template': the worker writes both",
                    );
                }
            }
        }
        Some(c) => conflict(
            &mut conflicts,
            "source_type",
            format!("of type {}", c.shown),
            "text or an ENUM with 'session' and 'template'",
        ),
        None => conflict(
            &mut conflicts,
            "source_type",
            "no such column".into(),
            "text or an ENUM, which table the source is in",
        ),
    }
    match col("source_id") {
        Some(c) if c.type_name == "uuid" => {}
        Some(c) => conflict(
            &mut conflicts,
            "source_id",
            format!("of type {}", c.shown),
            "uuid, the source row's id",
        ),
        None => conflict(
            &mut conflicts,
            "source_id",
            "no such column".into(),
            "uuid, the source row's id",
        ),
    }
    let mut dimensions = dims as i32;
    match col("embedding") {
        Some(c) if c.type_name == "vector" => {
            if c.typmod > 0 {
                dimensions = c.typmod;
            }
        }
        Some(c) => conflict(
            &mut conflicts,
            "embedding",
            format!("of type {}", c.shown),
            "vector (pgvector): another type cannot be searched by its index",
        ),
        None => conflict(
            &mut conflicts,
            "embedding",
            "no such column".into(),
            "vector (pgvector)",
        ),
    }
    match col("embedding_model") {
        Some(c) if c.type_name == "varchar" && (1..=104).contains(&c.typmod) => {}
        Some(c) => conflict(
            &mut conflicts,
            "embedding_model",
            format!("of type {}", c.shown),
            "varchar(100) or shorter: the partition key's type",
        ),
        None => {}
    }
    for (name, _, types) in WORKER_COLUMNS {
        if let Some(c) = col(name)
            && !types.contains(&c.type_name.as_str())
        {
            conflict(
                &mut conflicts,
                name,
                format!("of type {}", c.shown),
                &format!("{}: the worker's column of that name", types[0]),
            );
        }
    }
    // The rows are read only where the columns to read them by exist.
    if ["source_type", "source_id", "embedding"]
        .iter()
        .any(|n| col(n).is_none())
    {
        let t = AppTable {
            columns,
            model: model.into(),
            dimensions,
            rows: 0,
            hnsw: None,
        };
        return Ok((t, conflicts));
    }
    let has_model = col("embedding_model").is_some();
    let models: Vec<(Option<String>, i64)> = sqlx::raw_sql(sqlx::AssertSqlSafe(if has_model {
        "SELECT embedding_model::text, count(*) FROM public.rag_embeddings GROUP BY 1 ORDER BY 2 DESC"
    } else {
        "SELECT NULL::text, count(*) FROM public.rag_embeddings"
    }))
    .fetch_all(&mut *conn)
    .await
    .map(|rows| {
        rows.iter()
            .map(|r| {
                use sqlx::Row;
                (r.get(0), r.get(1))
            })
            .collect()
    })?;
    let rows: i64 = models.iter().map(|(_, n)| n).sum();
    let named: Vec<&(Option<String>, i64)> = models.iter().filter(|(m, _)| m.is_some()).collect();
    let adopted_model = named
        .first()
        .and_then(|(m, _)| m.clone())
        .unwrap_or_else(|| model.to_string());
    if named.len() > 1 {
        conflict(
            &mut conflicts,
            "embedding_model",
            format!(
                "{} models in its rows ({})",
                named.len(),
                named
                    .iter()
                    .map(|(m, n)| format!("{}: {n}", m.as_deref().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "one: the table becomes that model's partition (move the others' rows out first)",
        );
    }
    if has_model && let Some((_, n)) = models.iter().find(|(m, _)| m.is_none()) {
        conflict(
            &mut conflicts,
            "embedding_model",
            format!("NULL in {n} rows"),
            "the model of every row (UPDATE rag_embeddings SET embedding_model = '<model>' \
             WHERE embedding_model IS NULL)",
        );
    }
    if adopted_model == model && dimensions != dims as i32 {
        conflict(
            &mut conflicts,
            "embedding",
            format!("vector({dimensions}) for {model}"),
            &format!(
                "model.dimensions = {dims} is configured for {model}: set it to {dimensions} \
                 (EMBED_WORKER__MODEL__DIMENSIONS), or name the model the rows are of"
            ),
        );
    }
    let dupes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM public.rag_embeddings
                                GROUP BY source_type, source_id HAVING count(*) > 1) d",
    )
    .fetch_one(&mut *conn)
    .await?;
    if dupes > 0 {
        conflict(
            &mut conflicts,
            "source_id",
            format!("{dupes} sources with more than one row"),
            "one row per (source_type, source_id): the worker's key also has chunk_index, \
             which the app's rows do not",
        );
    }
    if col("embedding").is_some_and(|c| !c.not_null) {
        let nulls: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM public.rag_embeddings WHERE embedding IS NULL",
        )
        .fetch_one(&mut *conn)
        .await?;
        if nulls > 0 {
            conflict(
                &mut conflicts,
                "embedding",
                format!("NULL in {nulls} rows"),
                "a vector in every row (delete the rows without one)",
            );
        }
    }
    let hnsw: Option<String> = sqlx::query_scalar(
        "SELECT i.relname::text FROM pg_index x
           JOIN pg_class i ON i.oid = x.indexrelid
           JOIN pg_am am ON am.oid = i.relam
          WHERE x.indrelid = 'public.rag_embeddings'::regclass AND am.amname = 'hnsw'
            AND x.indisvalid AND pg_get_indexdef(i.oid) LIKE '%USING hnsw (embedding vector_cosine_ops)%'
          ORDER BY 1 LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    let t = AppTable {
        columns,
        model: adopted_model,
        dimensions,
        rows,
        hnsw,
    };
    Ok((t, conflicts))
}

/// The plan's lines for adopting `t`.
pub fn steps(t: &AppTable) -> Vec<String> {
    let mut s = vec![format!(
        "table rag_embeddings: the app's ({} rows of {}, {} dimensions), adopted in place as \
         that model's partition: kept, not copied; attached after its constraints are \
         validated, so ATTACH does not scan",
        t.rows, t.model, t.dimensions
    )];
    let missing: Vec<&str> = WORKER_COLUMNS
        .iter()
        .filter(|(n, _, _)| !t.columns.iter().any(|c| c.name == *n))
        .map(|(n, _, _)| *n)
        .collect();
    if !missing.is_empty() {
        s.push(format!(
            "  adds {} (constant defaults: no rewrite; content_hash empty until the first run \
             verifies each vector)",
            missing.join(", ")
        ));
    }
    let shown = |n: &str| {
        t.columns
            .iter()
            .find(|c| c.name == n)
            .map(|c| c.shown.clone())
            .unwrap_or_default()
    };
    s.push(format!(
        "  the parent takes its types (id {}, source_type {}); embedding becomes vector \
         without a size, as the parent's (catalog only: the index keeps the size)",
        shown("id"),
        shown("source_type")
    ));
    if t.columns
        .iter()
        .any(|c| c.name == "id" && !c.identity.is_empty())
    {
        s.push(
            "  its id identity moves to the parent (a partition may not have one): new rows \
             are numbered after its highest id"
                .into(),
        );
    }
    s.push(match &t.hnsw {
        Some(ix) => format!("  keeps its HNSW index {ix} as the model's index (none is built)"),
        None => "  has no HNSW index on embedding (cosine): the worker builds one".into(),
    });
    let extra: Vec<String> = t
        .columns
        .iter()
        .filter(|c| !is_worker_column(&c.name))
        .map(|c| c.name.clone())
        .collect();
    if !extra.is_empty() {
        s.push(format!(
            "  keeps its own columns {} (on the parent too, so the app reads them through \
             rag_embeddings; NOT NULL ones without a default lose NOT NULL: the worker's rows \
             do not fill them)",
            extra.join(", ")
        ));
    }
    s.push(
        "  keeps its policies, grants and triggers, copied to the parent for reads through \
         rag_embeddings; the worker's orphan check (trg_rag_embeddings_check_source) runs \
         beside the app's own"
            .into(),
    );
    s
}

fn is_worker_column(name: &str) -> bool {
    matches!(
        name,
        "id" | "source_type" | "source_id" | "embedding" | "embedding_model"
    ) || WORKER_COLUMNS.iter().any(|(n, _, _)| *n == name)
}

/// Whether the app's table is still to be adopted: `public.rag_embeddings` is a plain table
/// and no migration of the worker's is recorded.
pub async fn pending(conn: &mut PgConnection) -> sqlx::Result<bool> {
    let (plain, recorded): (bool, bool) = sqlx::query_as(
        "SELECT coalesce((SELECT relkind = 'r' FROM pg_class
                           WHERE oid = to_regclass('public.rag_embeddings')), false),
                to_regclass('public._sqlx_migrations') IS NOT NULL",
    )
    .fetch_one(&mut *conn)
    .await?;
    if !plain || !recorded {
        return Ok(plain);
    }
    sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM public._sqlx_migrations WHERE version = 20261126000001)",
    )
    .fetch_one(conn)
    .await
}

/// Step 1: the worker's columns, validated constraints and unique key on the app's table.
/// Each statement is idempotent, so a run killed here repeats what is left.
pub async fn prepare(conn: &mut PgConnection, t: &AppTable) -> anyhow::Result<()> {
    let dims = t.dimensions.to_string();
    // The parent's types first, each a moment's lock without a rewrite: changed after the
    // CHECKs and the key below, PostgreSQL re-validates every CHECK on the column (detoasting
    // each vector: 4.2 s of the app's reads blocked at 500K rows) and rebuilds the key. Read
    // from the catalog, so a resumed run changes only what is left.
    let (vector_sized, model_sized): (bool, bool) = sqlx::query_as(
        "SELECT coalesce((SELECT atttypmod > 0 FROM pg_attribute
                           WHERE attrelid = 'public.rag_embeddings'::regclass
                             AND attname = 'embedding'), false),
                coalesce((SELECT atttypmod <> 104 FROM pg_attribute
                           WHERE attrelid = 'public.rag_embeddings'::regclass
                             AND attname = 'embedding_model'), false)",
    )
    .fetch_one(&mut *conn)
    .await?;
    if vector_sized {
        conn.execute("ALTER TABLE public.rag_embeddings ALTER COLUMN embedding TYPE vector")
            .await
            .context("the app's rag_embeddings.embedding as vector without a size")?;
    }
    if model_sized {
        conn.execute(
            "ALTER TABLE public.rag_embeddings ALTER COLUMN embedding_model TYPE varchar(100)",
        )
        .await
        .context("the app's rag_embeddings.embedding_model as varchar(100)")?;
    }
    for (name, def, _) in WORKER_COLUMNS {
        if !t.columns.iter().any(|c| c.name == *name) {
            conn.execute(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE public.rag_embeddings ADD COLUMN IF NOT EXISTS {name} {}",
                def.replace("{dims}", &dims)
            )))
            .await
            .with_context(|| format!("adding rag_embeddings.{name}"))?;
        }
    }
    conn.execute("ALTER TABLE public.rag_embeddings ALTER COLUMN updated_at SET DEFAULT now()")
        .await?;
    if !t.columns.iter().any(|c| c.name == "embedding_model") {
        conn.execute(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE public.rag_embeddings ADD COLUMN IF NOT EXISTS embedding_model
                 varchar(100) DEFAULT {}",
            crate::model_index::quote_literal(&t.model)
        )))
        .await?;
    }
    // The parent's CHECKs (ATTACH requires them on the table, validated; [`attach`] gives them
    // the parent's names) and the partition bound, whose validated form lets ATTACH skip its
    // scan.
    let checks = [
        (
            "embed_worker_adopted_chunk_index",
            "chunk_index >= 0".to_string(),
        ),
        (
            "embed_worker_adopted_token_count",
            "token_count >= 0".to_string(),
        ),
        (
            "embed_worker_adopted_dimensions",
            "dimensions = vector_dims(embedding)".to_string(),
        ),
        (
            "embed_worker_adopted_model",
            format!(
                "embedding_model IS NOT NULL AND embedding_model = {} AND embedding IS NOT NULL",
                crate::model_index::quote_literal(&t.model)
            ),
        ),
    ];
    for (name, expr) in &checks {
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_constraint
                             WHERE conrelid = 'public.rag_embeddings'::regclass AND conname = $1)",
        )
        .bind(name)
        .fetch_one(&mut *conn)
        .await?;
        if !exists {
            conn.execute(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE public.rag_embeddings ADD CONSTRAINT {name} CHECK ({expr}) NOT VALID"
            )))
            .await?;
        }
        conn.execute(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE public.rag_embeddings VALIDATE CONSTRAINT {name}"
        )))
        .await
        .with_context(|| format!("validating {name} on the app's rag_embeddings"))?;
    }
    // An index left INVALID by a killed CONCURRENTLY build is dropped and built again.
    conn.execute(
        "DO $$ BEGIN
             IF EXISTS (SELECT 1 FROM pg_index
                         WHERE indexrelid = to_regclass('public.embed_worker_adopted_key')
                           AND NOT indisvalid) THEN
                 DROP INDEX public.embed_worker_adopted_key;
             END IF;
         END $$",
    )
    .await?;
    conn.execute(
        "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS embed_worker_adopted_key
             ON public.rag_embeddings (source_type, source_id, embedding_model, chunk_index)",
    )
    .await
    .context("building the worker's unique key on the app's rag_embeddings")?;
    Ok(())
}

/// Where the app's table waits while the migrations run: not yet its partition's name, which
/// the migrations would take for a partition of their own (and build an index on).
const ASIDE: &str = "embed_worker_adopting";

/// Step 2, first half, inside the caller's transaction before the migrations: the app's table
/// moves aside (and its indexes off the names the worker's parent takes). Returns the name of
/// its partition-to-be.
pub async fn set_aside(conn: &mut PgConnection, t: &AppTable) -> anyhow::Result<String> {
    let part = crate::model_index::partition_name(&t.model);
    conn.execute("SET LOCAL lock_timeout = '10s'").await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE public.rag_embeddings RENAME TO {ASIDE}"
    )))
    .await
    .context("renaming the app's rag_embeddings (is a long transaction holding it?)")?;
    for (taken, suffix) in [
        ("rag_embeddings_pkey", "app_pkey"),
        ("rag_embeddings_source_chunk_key", "app_source_chunk_key"),
        ("rag_embeddings_id_seq", "app_id_seq"),
    ] {
        let kind: Option<String> =
            sqlx::query_scalar("SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)")
                .bind(format!("public.{taken}"))
                .fetch_optional(&mut *conn)
                .await?
                .flatten();
        let what = match kind.as_deref() {
            Some("i") => "INDEX",
            Some("S") => "SEQUENCE",
            _ => continue,
        };
        conn.execute(sqlx::AssertSqlSafe(format!(
            "ALTER {what} public.{taken} RENAME TO {}",
            quote_ident(&format!("{}_{suffix}", &part[..part.len().min(40)]))
        )))
        .await?;
    }
    Ok(part)
}

/// Step 2, second half, after the migrations in the same transaction: the (empty) parent takes
/// the app's types, columns, grants and policies, and the app's table is attached.
pub async fn attach(conn: &mut PgConnection, t: &AppTable, part: &str) -> anyhow::Result<()> {
    let p = quote_ident(part);
    conn.execute(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE public.{ASIDE} RENAME TO {p}"
    )))
    .await
    .context("naming the app's table as its model's partition")?;
    let col = |n: &str| t.columns.iter().find(|c| c.name == n);
    let ddl = |sql: String| sqlx::AssertSqlSafe(sql);
    // NOT NULL as the parent's: no scan, the validated CHECK proves it ([`prepare`] made the
    // types the parent's already).
    conn.execute(ddl(format!(
        "ALTER TABLE public.{p} ALTER COLUMN embedding_model SET NOT NULL,
                                ALTER COLUMN embedding SET NOT NULL"
    )))
    .await
    .context("the app's table: embedding and embedding_model NOT NULL")?;
    // A partition may not have an identity column: the parent's identity numbers new rows
    // (after the app's highest id, below).
    if col("id").is_some_and(|c| !c.identity.is_empty()) {
        conn.execute(ddl(format!(
            "ALTER TABLE public.{p} ALTER COLUMN id DROP IDENTITY"
        )))
        .await?;
    }
    // The parent's primary key is (id, embedding_model); the app's table keeps its own.
    conn.execute("ALTER TABLE public.rag_embeddings DROP CONSTRAINT IF EXISTS rag_embeddings_pkey")
        .await?;
    let id = col("id").expect("inspected");
    if id.type_name == "uuid" {
        conn.execute(
            "ALTER TABLE public.rag_embeddings ALTER COLUMN id DROP IDENTITY IF EXISTS;
             ALTER TABLE public.rag_embeddings ALTER COLUMN id TYPE uuid USING NULL,
                 ALTER COLUMN id SET DEFAULT gen_random_uuid()",
        )
        .await?;
    }
    // source_type in the app's type: the policies that name it are made again around the change.
    let st = col("source_type").expect("inspected");
    if st.shown != "embedding_source" {
        let policies = policies_sql(conn, "public.rag_embeddings", "rag_embeddings", false).await?;
        for (name, _) in &policies {
            conn.execute(ddl(format!(
                "DROP POLICY {} ON public.rag_embeddings",
                quote_ident(name)
            )))
            .await?;
        }
        let triggers: Vec<(String, String)> = sqlx::query_as(
            "SELECT tgname::text, pg_get_triggerdef(oid) FROM pg_trigger
              WHERE tgrelid = 'public.rag_embeddings'::regclass AND NOT tgisinternal",
        )
        .fetch_all(&mut *conn)
        .await?;
        for (name, _) in &triggers {
            conn.execute(ddl(format!(
                "DROP TRIGGER {} ON public.rag_embeddings",
                quote_ident(name)
            )))
            .await?;
        }
        conn.execute(ddl(format!(
            "ALTER TABLE public.rag_embeddings ALTER COLUMN source_type TYPE {0}
                 USING source_type::text::{0}",
            st.shown
        )))
        .await?;
        for (_, create) in policies.iter().chain(&triggers) {
            conn.execute(ddl(
                create.replace("::embedding_source", &format!("::{}", st.shown))
            ))
            .await?;
        }
        conn.execute(ddl(format!(
            "DROP FUNCTION IF EXISTS embed_worker.source_label(text);
             CREATE FUNCTION embed_worker.source_label(t text) RETURNS {0}
             LANGUAGE sql STABLE PARALLEL SAFE AS $$ SELECT t::{0} $$;
             REVOKE EXECUTE ON FUNCTION embed_worker.source_label(text) FROM PUBLIC;
             GRANT EXECUTE ON FUNCTION embed_worker.source_label(text) TO embed_worker",
            st.shown
        )))
        .await?;
    }
    // Columns the app leaves NULL stay nullable on the parent; its own columns join the parent.
    for c in ["token_count", "created_at", "updated_at"] {
        if col(c).is_none_or(|c| !c.not_null) {
            conn.execute(ddl(format!(
                "ALTER TABLE public.rag_embeddings ALTER COLUMN {c} DROP NOT NULL"
            )))
            .await?;
        }
    }
    for c in t.columns.iter().filter(|c| !is_worker_column(&c.name)) {
        let default = c
            .default
            .as_ref()
            .map(|d| format!(" DEFAULT {d}"))
            .unwrap_or_default();
        conn.execute(ddl(format!(
            "ALTER TABLE public.rag_embeddings ADD COLUMN {} {}{default}",
            quote_ident(&c.name),
            c.shown
        )))
        .await?;
        if c.not_null && c.default.is_none() {
            conn.execute(ddl(format!(
                "ALTER TABLE public.{p} ALTER COLUMN {} DROP NOT NULL",
                quote_ident(&c.name)
            )))
            .await?;
        }
    }
    // The app's grants and policies, for reads through the parent as before.
    let grants: Vec<String> = sqlx::query_scalar(
        "SELECT format('GRANT %s ON public.rag_embeddings TO %s', a.privilege_type,
                       CASE WHEN a.grantee = 0 THEN 'public' ELSE quote_ident(pg_get_userbyid(a.grantee)) END)
           FROM pg_class c, aclexplode(c.relacl) a
          WHERE c.oid = $1::regclass AND a.grantee <> c.relowner",
    )
    .bind(format!("public.{p}"))
    .fetch_all(&mut *conn)
    .await?;
    for g in grants {
        conn.execute(ddl(g)).await?;
    }
    let policies = policies_sql(conn, &format!("public.{p}"), part, true).await?;
    for (_, create) in policies {
        conn.execute(ddl(create)).await?;
    }
    // The validated CHECKs take the names of the parent's (ATTACH matches them by name).
    let renames: Vec<(String, String)> = sqlx::query_as(
        "SELECT c.conname::text, p.conname::text
           FROM pg_constraint c
           JOIN pg_constraint p ON p.conrelid = 'public.rag_embeddings'::regclass
                               AND p.contype = 'c'
                               AND pg_get_constraintdef(p.oid) = pg_get_constraintdef(c.oid)
          WHERE c.conrelid = $1::regclass AND c.contype = 'c' AND c.conname <> p.conname",
    )
    .bind(format!("public.{p}"))
    .fetch_all(&mut *conn)
    .await?;
    for (from, to) in renames {
        conn.execute(ddl(format!(
            "ALTER TABLE public.{p} RENAME CONSTRAINT {} TO {}",
            quote_ident(&from),
            quote_ident(&to)
        )))
        .await?;
    }
    // The built unique index becomes the partition's key, then the table is attached.
    conn.execute(ddl(format!(
        "ALTER TABLE public.{p} ADD CONSTRAINT {} UNIQUE USING INDEX embed_worker_adopted_key",
        quote_ident(&format!("{}_key", &part[..part.len().min(55)]))
    )))
    .await?;
    conn.execute(ddl(format!(
        "ALTER TABLE public.rag_embeddings ATTACH PARTITION public.{p} FOR VALUES IN ({})",
        crate::model_index::quote_literal(&t.model)
    )))
    .await
    .context("attaching the app's table as its model's partition")?;
    if id.type_name == "int8" {
        conn.execute(ddl(format!(
            "SELECT setval(pg_get_serial_sequence('public.rag_embeddings', 'id'),
                           coalesce((SELECT max(id) FROM public.{p}), 0) + 1, false)"
        )))
        .await?;
    }
    conn.execute(ddl(format!(
        "ALTER TABLE public.{p} ENABLE ROW LEVEL SECURITY"
    )))
    .await?;
    sqlx::query("SELECT embed_worker.ensure_model($1, $2, 'vector')")
        .bind(&t.model)
        .bind(t.dimensions)
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO embed_worker.adoptions (model, partition, index_name, rows)
         VALUES ($1, $2, $3, $4) ON CONFLICT (model) DO NOTHING",
    )
    .bind(&t.model)
    .bind(part)
    .bind(&t.hnsw)
    .bind(t.rows)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The policies of `table` as `CREATE POLICY … ON public.rag_embeddings` statements, by name:
/// references to `table_name.` rewritten to `rag_embeddings.`; with `new_only`, those whose
/// name the parent has already left out.
async fn policies_sql(
    conn: &mut PgConnection,
    table: &str,
    table_name: &str,
    new_only: bool,
) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "SELECT polname::text,
                format('CREATE POLICY %I ON public.rag_embeddings AS %s FOR %s TO %s%s%s',
                       polname,
                       CASE WHEN polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
                       CASE polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT'
                                   WHEN 'w' THEN 'UPDATE' WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
                       (SELECT string_agg(CASE WHEN r = 0 THEN 'public' ELSE quote_ident(pg_get_userbyid(r)) END, ', ')
                          FROM unnest(polroles) r),
                       ' USING (' || replace(pg_get_expr(polqual, polrelid), $2 || '.', 'rag_embeddings.') || ')',
                       ' WITH CHECK (' || replace(pg_get_expr(polwithcheck, polrelid), $2 || '.', 'rag_embeddings.') || ')')
           FROM pg_policy
          WHERE polrelid = $1::regclass
            AND NOT ($3 AND polname IN (SELECT polname FROM pg_policy
                                         WHERE polrelid = 'public.rag_embeddings'::regclass))",
    )
    .bind(table)
    .bind(table_name)
    .bind(new_only)
    .fetch_all(conn)
    .await
}

/// `status`'s line on an adopted table: when, how many rows, how many not yet verified by a
/// run (their sources not yet seen since). `None` where nothing was adopted.
pub async fn status(pool: &sqlx::PgPool) -> sqlx::Result<Option<String>> {
    let rows: Vec<(String, i64, chrono::DateTime<chrono::Utc>, i64)> = sqlx::query_as(
        "SELECT a.model::text, a.rows, a.adopted_at,
                (SELECT count(*) FROM rag_embeddings e
                  WHERE e.embedding_model = a.model AND e.content_hash = '')
           FROM embed_worker.adoptions a ORDER BY a.adopted_at",
    )
    .fetch_all(pool)
    .await?;
    Ok((!rows.is_empty()).then(|| {
        rows.iter()
            .map(|(model, n, at, unverified)| {
                format!(
                    "adopted: the app's rag_embeddings, {n} vectors of {model} ({}); {unverified} \
                     not yet verified by a run",
                    at.format("%Y-%m-%d %H:%M UTC")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }))
}
