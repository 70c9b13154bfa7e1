//! Search: what the embeddings are for. The search itself is SQL, `embed_worker.search(query,
//! k)` (migration 22), so the app and `embed-worker search` run one statement: the serving
//! model (`embed_worker.models` says which, read on each call), its partition and index, its
//! tuned `ef_search`. This module calls it, says which way it went ([`SearchPath`]), and labels
//! hits for people.
//!
//! Why iterative index scans: a plain HNSW scan yields `hnsw.ef_search` candidates and only then
//! applies filters (the model is the partition the plan is pruned to, but RLS and `source_type`
//! are filters). A user who owns 0.1% of the rows would get almost nothing back. pgvector 0.8's
//! `hnsw.iterative_scan` keeps scanning until k rows pass the filters (up to
//! `hnsw.max_scan_tuples`). `relaxed_order` is fastest; the outer query re-sorts exactly.
//!
//! Why an exact path too: when a user's own rows are few and all far from the query (they sit in
//! other clusters), the iterative scan walks `hnsw.max_scan_tuples` tuples and still comes back
//! short for a user who owns a tiny share of the rows (docs/decisions.md). So a search as a user
//! first counts what that user can see (index lookups, capped); at most `search.exact_below`
//! rows are ranked exactly through the owner column and the templates' ids — always k rows, the
//! true nearest, in milliseconds — and only a larger set uses the HNSW index.
//!
//! Why a model without a ready index still answers: its index is deferred until its backfill
//! drains, or building. The planner then ranks the model's rows by a scan, and [`Found::path`]
//! says so; it never fails for want of an index.

pub mod probe;
pub mod tune;

use pgvector::Vector;
use sqlx::PgPool;
use uuid::Uuid;

use crate::model_index::IndexSpec;
use crate::source::SourceType;

#[derive(Debug, Clone, sqlx::FromRow)]
/// One search result.
pub struct Hit {
    /// `session` or `template`.
    pub source_type: String,
    /// The source.
    pub source_id: Uuid,
    /// Which chunk matched.
    pub chunk_index: i32,
    /// Cosine distance.
    pub distance: f64,
}

/// How a search was answered.
#[derive(Debug, Clone, PartialEq)]
pub enum SearchPath {
    /// Through this HNSW index (approximate, as configured by `ef_search`).
    Index(String),
    /// Exactly: the user sees at most `exact_below` rows (this many).
    ExactVisible(i64),
    /// Exactly, by a scan of the model's rows: its index is not ready (why).
    ExactNoIndex(String),
}

impl std::fmt::Display for SearchPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SearchPath::Index(name) => write!(f, "through index {name}"),
            SearchPath::ExactVisible(n) => write!(f, "exact over the {n} rows this user sees"),
            SearchPath::ExactNoIndex(why) => write!(f, "exact (no index scan: {why})"),
        }
    }
}

/// A search's hits and how they were found.
#[derive(Debug, Clone)]
pub struct Found {
    /// Nearest first.
    pub hits: Vec<Hit>,
    /// Index or exact, and why.
    pub path: SearchPath,
}

#[derive(Debug, Clone, Default)]
/// How to search.
pub struct SearchOptions {
    /// Results wanted (1 to 1,000).
    pub k: i64,
    /// Only this source type.
    pub source_type: Option<SourceType>,
    /// Run as `app_user` with `auth.uid()` = this user (RLS applies).
    pub as_user: Option<Uuid>,
    /// `hnsw.ef_search` for this search instead of the model's tuned one.
    pub ef_search: Option<u32>,
    /// `hnsw.max_scan_tuples` for this search instead of the model's tuned one.
    pub max_scan_tuples: Option<u32>,
}

impl SearchOptions {
    /// The top `k`, with the model's own settings.
    pub fn top(k: i64) -> Self {
        SearchOptions {
            k,
            ..Default::default()
        }
    }
}

/// How `embed_worker.search_route` (migration 22) answers for the caller.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Route {
    /// The model searched.
    pub model: String,
    /// Its dimensions.
    pub dimensions: i32,
    /// The statement `embed_worker.search` runs (`$1` the query, `$2` template ids); none when
    /// the caller can see nothing of what was asked.
    pub statement: Option<String>,
    /// The `hnsw.ef_search` it runs with unless the call names one.
    pub ef_search: i32,
    /// The `hnsw.max_scan_tuples` it runs with unless the call names one.
    pub max_scan_tuples: i32,
    /// Ranked exactly: the caller sees at most `search.exact_below` rows.
    pub exact: bool,
    /// Rows the caller sees, counted up to the cap (only with `auth.uid()` set).
    pub visible: Option<i64>,
}

/// Sets the role and the JWT subject of `user` for the rest of `tx`: what an app's request
/// does before it searches.
async fn act_as(tx: &mut sqlx::PgConnection, user: Option<Uuid>) -> sqlx::Result<()> {
    if let Some(user) = user {
        sqlx::query("SET LOCAL ROLE app_user")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT set_config('request.jwt.claim.sub', $1, true)")
            .bind(user.to_string())
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// The route `embed_worker.search` takes for `user` (none: the connection's own role) on
/// `model` (none: the serving one).
pub async fn route(
    pool: &PgPool,
    model: Option<&str>,
    k: i64,
    source_type: Option<SourceType>,
    user: Option<Uuid>,
) -> sqlx::Result<Route> {
    let mut tx = pool.begin().await?;
    act_as(&mut tx, user).await?;
    let route = sqlx::query_as(
        "SELECT model, dimensions, statement, ef_search, max_scan_tuples, exact, visible
           FROM embed_worker.search_route($1, $2, $3)",
    )
    .bind(source_type.map(|t| t.as_str()))
    .bind(k as i32)
    .bind(model)
    .fetch_one(&mut *tx)
    .await?;
    tx.rollback().await?;
    Ok(route)
}

/// The statement the search runs on `model`'s index for a caller without `auth.uid()` (what an
/// EXPLAIN should look at): `$1` is the query.
pub async fn index_statement(
    pool: &PgPool,
    model: &str,
    k: i64,
    source_type: Option<SourceType>,
) -> anyhow::Result<String> {
    route(pool, Some(model), k, source_type, None)
        .await?
        .statement
        .ok_or_else(|| anyhow::anyhow!("no statement for model {model}"))
}

/// How many of `model`'s rows `user` can see, as the search counts them: up to
/// `search.exact_below` + 1 session rows and as many template rows.
pub async fn visible_rows(
    pool: &PgPool,
    model: &str,
    user: Uuid,
    source_type: Option<SourceType>,
) -> sqlx::Result<i64> {
    Ok(route(pool, Some(model), 1, source_type, Some(user))
        .await?
        .visible
        .unwrap_or(0))
}

/// Ground truth: the exact top-k of `spec`'s rows at full precision, no index (`$1` the
/// query). What recall is measured against. `cosine_distance()`, not `<=>`: only the operator
/// matches an HNSW index, and PostgreSQL 18 plans a disabled index scan over a sort even with
/// `enable_indexscan` off.
pub fn exact_sql(spec: &IndexSpec, k: i64) -> String {
    format!(
        "SELECT source_type::text AS source_type, source_id, chunk_index,
                cosine_distance(embedding, $1)::float8 AS distance
           FROM rag_embeddings WHERE embedding_model = {lit}
          ORDER BY distance LIMIT {k}",
        lit = crate::model_index::quote_literal(&spec.model),
        k = k.max(1)
    )
}

/// Top-k nearest chunks to `query` among the serving model's vectors, through
/// `embed_worker.search`: what an app calls. The serving model is read on each call, so a
/// promotion takes effect at once.
pub async fn search_serving(
    pool: &PgPool,
    query: Vec<f32>,
    opts: &SearchOptions,
) -> anyhow::Result<Found> {
    search_model(pool, None, query, opts).await
}

/// Top-k nearest chunks to `query` among the vectors of `spec`'s model.
pub async fn search(
    pool: &PgPool,
    spec: &IndexSpec,
    query: Vec<f32>,
    opts: &SearchOptions,
) -> anyhow::Result<Found> {
    search_model(pool, Some(&spec.model), query, opts).await
}

async fn search_model(
    pool: &PgPool,
    model: Option<&str>,
    query: Vec<f32>,
    opts: &SearchOptions,
) -> anyhow::Result<Found> {
    let k = if opts.k == 0 { 5 } else { opts.k };
    let route = route(pool, model, k, opts.source_type, opts.as_user).await?;
    let path = if route.exact {
        SearchPath::ExactVisible(route.visible.unwrap_or(0))
    } else {
        let models = crate::model_index::lifecycle::models(pool).await?;
        let spec = models
            .iter()
            .find(|m| m.name == route.model)
            .map(IndexSpec::of)
            .ok_or_else(|| anyhow::anyhow!("model {} is not registered", route.model))?;
        match crate::model_index::state(pool, &spec).await? {
            crate::model_index::IndexState::Ready(name) => SearchPath::Index(name),
            crate::model_index::IndexState::Building(name) => {
                SearchPath::ExactNoIndex(format!("{name} is being built"))
            }
            crate::model_index::IndexState::Invalid(name) => SearchPath::ExactNoIndex(format!(
                "{name} is invalid (a build that died; `embed-worker models build-index` rebuilds it)"
            )),
            crate::model_index::IndexState::Missing => SearchPath::ExactNoIndex(format!(
                "{} not built yet (deferred until the backlog drains)",
                spec.name()
            )),
        }
    };
    let hits = hits(pool, model, query, opts).await?;
    Ok(Found { hits, path })
}

/// The hits alone: one call of `embed_worker.search`, as the app makes it (as `opts.as_user`
/// when set), on `model` (none: the serving one).
pub async fn hits(
    pool: &PgPool,
    model: Option<&str>,
    query: Vec<f32>,
    opts: &SearchOptions,
) -> anyhow::Result<Vec<Hit>> {
    let k = if opts.k == 0 { 5 } else { opts.k };
    let mut tx = pool.begin().await?;
    act_as(&mut tx, opts.as_user).await?;
    let hits = sqlx::query_as::<_, Hit>(
        "SELECT source_type, source_id, chunk_index, distance
           FROM embed_worker.search($1, $2, $3::embedding_source, $4, $5, $6)",
    )
    .bind(Vector::from(query))
    .bind(k as i32)
    .bind(opts.source_type.map(|t| t.as_str()))
    .bind(opts.ef_search.map(|v| v as i32))
    .bind(opts.max_scan_tuples.map(|v| v as i32))
    .bind(model)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(hits)
}

/// Writes `[search]`'s settings and `render.session_owner` where `embed_worker.search` reads
/// them (`migrate`).
pub async fn apply_settings(
    pool: &PgPool,
    search: &crate::config::SearchSettings,
    session_owner: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE embed_worker.search_settings
            SET session_owner = $1, exact_below = $2, ef_search = $3, max_scan_tuples = $4",
    )
    .bind(session_owner)
    .bind(search.exact_below as i32)
    .bind(search.ef_search as i32)
    .bind(search.max_scan_tuples as i32)
    .execute(pool)
    .await?;
    Ok(())
}

/// A short human label per hit: a template's focus, a session's owner, and the head of the
/// text as `render` makes it (so the app's own columns, whatever their names).
pub async fn labels(
    pool: &PgPool,
    render: &crate::config::RenderSettings,
    hits: &[Hit],
) -> sqlx::Result<std::collections::HashMap<Uuid, String>> {
    let ids: Vec<Uuid> = hits.iter().map(|h| h.source_id).collect();
    let sources: Vec<crate::source::EmbedSource> = hits
        .iter()
        .filter_map(|h| {
            Some(crate::source::EmbedSource {
                source_type: h.source_type.parse().ok()?,
                source_id: h.source_id,
            })
        })
        .collect();
    let texts = crate::pipeline::load::load(pool, render, &sources).await?;
    let heads: Vec<(Uuid, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, '[template ' || focus || ']' FROM question_templates WHERE id = ANY($1)
         UNION ALL
         SELECT id, '[session, user …' || right({owner}::text, 4) || ']'
           FROM sessions WHERE id = ANY($1)",
        owner = render.session_owner
    )))
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    Ok(heads
        .into_iter()
        .map(|(id, head)| {
            let text = texts
                .iter()
                .find(|(s, _)| s.source_id == id)
                .map(|(_, l)| l.text.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            let text: String = text.chars().take(90).collect();
            (id, format!("{head} {text}"))
        })
        .collect())
}
