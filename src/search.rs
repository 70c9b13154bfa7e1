//! Search: what the embeddings are for. Top-k cosine through the serving model's HNSW index
//! ([`search_serving`]; `embed_worker.models` says which), optionally as an app user under
//! row-level security; plus the design's two other lookups.
//!
//! Why iterative index scans: a plain HNSW scan yields `hnsw.ef_search` candidates and only then
//! applies filters (the model is the partition the plan is pruned to, but RLS and `source_type`
//! are filters). A
//! user who owns 0.1% of the rows would get almost nothing back. pgvector 0.8's
//! `hnsw.iterative_scan` keeps scanning until k rows pass the filters (up to
//! `hnsw.max_scan_tuples`). `relaxed_order` is fastest; the outer query re-sorts exactly.
//!
//! Why an exact path too: when a user's own rows are few and all far from the query (they sit in
//! other clusters), the iterative scan walks `hnsw.max_scan_tuples` (20,000) tuples and still
//! comes back short for a user who owns a tiny share of the rows (docs/decisions.md).
//! So a search as a user first counts what that user can see (index lookups, capped); at most
//! `exact_below` rows are ranked exactly through the `sessions.user_id` and source indexes —
//! always k rows, the true nearest, in milliseconds — and only a larger set uses the HNSW index.
//!
//! Why a model without a ready index still answers: its index is deferred until its backfill
//! drains, or building. The search then ranks the model's rows exactly (a sequential scan at
//! full precision) and says so in [`Found::path`]; it never fails for want of an index.

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

#[derive(Debug, Clone)]
/// How to search.
pub struct SearchOptions {
    /// Results wanted.
    pub k: i64,
    /// Only this source type.
    pub source_type: Option<SourceType>,
    /// Run as `app_user` with `auth.uid()` = this user (RLS applies).
    pub as_user: Option<Uuid>,
    /// `hnsw.ef_search`.
    pub ef_search: u32,
    /// With `as_user`: rank exactly when the user can see at most this many rows.
    pub exact_below: i64,
    /// The column of sessions holding its owner (`render.session_owner`).
    pub session_owner: String,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            k: 5,
            source_type: None,
            as_user: None,
            ef_search: 100,
            exact_below: 5000,
            session_owner: "user_id".into(),
        }
    }
}

/// The statement ranking exactly the rows `auth.uid()` can see: own sessions, reached through
/// `sessions.user_id`, and the embedded templates whose ids are bound as `$2` (when
/// `templates`). Under row-level security only leakproof conditions (uuid and text equality;
/// not enum equality) may become index conditions, hence ids rather than `source_type`.
fn exact_visible_sql(
    spec: &IndexSpec,
    k: i64,
    sessions: bool,
    templates: bool,
    owner: &str,
) -> String {
    let lit = crate::model_index::quote_literal(&spec.model);
    let dimensions = spec.dimensions;
    let mut parts = Vec::new();
    if sessions {
        parts.push(format!(
            "SELECT e.source_type, e.source_id, e.chunk_index, e.embedding
               FROM sessions s
               JOIN rag_embeddings e ON e.source_type = 'session' AND e.source_id = s.id
              WHERE s.{owner} = auth.uid() AND e.embedding_model = {lit}"
        ));
    }
    if templates {
        parts.push(format!(
            "SELECT source_type, source_id, chunk_index, embedding FROM rag_embeddings
              WHERE source_id = ANY($2) AND source_type = 'template' AND embedding_model = {lit}"
        ));
    }
    format!(
        "SELECT source_type::text AS source_type, source_id, chunk_index,
                (embedding::vector({dimensions}) <=> $1) AS distance
           FROM ({}) visible
          ORDER BY distance LIMIT {k}",
        parts.join(" UNION ALL "),
        k = k.max(1)
    )
}

/// How many of `model`'s rows `user` can see, counted up to `cap` + 1 (a bounded index walk);
/// `owner`: the column of sessions holding its owner.
pub async fn visible_rows(
    pool: &PgPool,
    model: &str,
    user: Uuid,
    source_type: Option<SourceType>,
    cap: i64,
    owner: &str,
) -> sqlx::Result<i64> {
    let (sessions, templates) = visible(pool, model, user, source_type, cap, owner).await?;
    Ok(sessions + templates.len() as i64)
}

/// What `user` can see of `model`'s rows, in one round trip: the number of their session rows
/// and the source id of each template row (templates are visible to every user), each capped at
/// `cap` + 1 rows.
async fn visible(
    pool: &PgPool,
    model: &str,
    user: Uuid,
    source_type: Option<SourceType>,
    cap: i64,
    owner: &str,
) -> sqlx::Result<(i64, Vec<Uuid>)> {
    let sessions = if source_type == Some(SourceType::Template) {
        "false"
    } else {
        "true"
    };
    let templates = if source_type == Some(SourceType::Session) {
        "false"
    } else {
        "true"
    };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM sessions s
                   JOIN rag_embeddings e ON e.source_type = 'session' AND e.source_id = s.id
                  WHERE {sessions} AND s.{owner} = $1 AND e.embedding_model = $2 LIMIT $3 + 1) a),
                ARRAY(SELECT source_id FROM rag_embeddings
                  WHERE {templates} AND source_type = 'template' AND embedding_model = $2 LIMIT $3 + 1)"
    )))
    .bind(user)
    .bind(model)
    .bind(cap)
    .fetch_one(pool)
    .await
}

/// The search statement for `spec`'s model: the model as a literal, so the plan is pruned to its
/// partition at planning time, and the expression of that partition's index, so the planner can
/// use it; `exact` ranks at full precision instead (no index applies). `k` and the source-type filter are written into the statement, not bound:
/// with a bound LIMIT, a cached generic plan does not know the limit is small and prefers a
/// sequential scan and sort (docs/decisions.md). `plain`: the model's index is on the column
/// itself (an adopted table's), so the distance is written on the column.
pub fn search_sql(
    spec: &IndexSpec,
    k: i64,
    source_type: Option<SourceType>,
    exact: bool,
    plain: bool,
) -> String {
    let filter = source_type
        .map(|t| format!(" AND source_type = '{}'", t.as_str()))
        .unwrap_or_default();
    let distance = if exact {
        format!("embedding::vector({}) <=> $1", spec.dimensions)
    } else if plain {
        "embedding <=> $1".to_string()
    } else {
        format!("{} <=> {}", spec.key(), spec.query_param())
    };
    format!(
        "SELECT source_type::text AS source_type, source_id, chunk_index, distance::float8 AS distance FROM (
             SELECT source_type, source_id, chunk_index, ({distance}) AS distance
               FROM rag_embeddings
              WHERE embedding_model = {lit}{filter}
              ORDER BY {distance}
              LIMIT {k}
         ) hits ORDER BY distance",
        lit = crate::model_index::quote_literal(&spec.model),
        k = k.max(1)
    )
}

/// Top-k nearest chunks to `query` (a vector of the serving model) among the serving model's
/// vectors: what an app should call. The serving model is read from `embed_worker.models` on
/// each call, so a promotion takes effect at once.
pub async fn search_serving(
    pool: &PgPool,
    query: Vec<f32>,
    opts: &SearchOptions,
) -> anyhow::Result<Found> {
    let spec = crate::model_index::lifecycle::serving_spec(pool).await?;
    anyhow::ensure!(
        query.len() == spec.dimensions,
        "the query has {} dimensions; the serving model {} has {}",
        query.len(),
        spec.model,
        spec.dimensions
    );
    search(pool, &spec, query, opts).await
}

/// Top-k nearest chunks to `query` among the vectors of `spec`'s model.
pub async fn search(
    pool: &PgPool,
    spec: &IndexSpec,
    query: Vec<f32>,
    opts: &SearchOptions,
) -> anyhow::Result<Found> {
    let model = spec.model.as_str();
    // As a user who sees few rows: rank them exactly; templates on that path are looked up by id.
    let (exact, template_ids, seen) = match opts.as_user {
        Some(user) => {
            let (sessions, mut templates) = visible(
                pool,
                model,
                user,
                opts.source_type,
                opts.exact_below,
                &opts.session_owner,
            )
            .await?;
            let seen = sessions + templates.len() as i64;
            let exact = seen <= opts.exact_below;
            templates.sort_unstable();
            templates.dedup();
            (exact, if exact { templates } else { Vec::new() }, seen)
        }
        None => (false, Vec::new(), 0),
    };
    let indexes = crate::model_index::vector_indexes(pool).await?;
    let path = if exact {
        SearchPath::ExactVisible(seen)
    } else {
        match crate::model_index::find(&indexes, spec) {
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
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true), set_config('hnsw.ef_search', $1, true)")
        .bind(opts.ef_search.to_string())
        .execute(&mut *tx)
        .await?;
    if let Some(user) = opts.as_user {
        sqlx::query("SET LOCAL ROLE app_user")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SELECT set_config('request.jwt.claim.sub', $1, true)")
            .bind(user.to_string())
            .execute(&mut *tx)
            .await?;
    }
    // Row-level security applies on both paths: the exact one only narrows what is read.
    let sql = if exact {
        let sessions = opts.source_type != Some(SourceType::Template);
        if !sessions && template_ids.is_empty() {
            return Ok(Found {
                hits: Vec::new(),
                path,
            });
        }
        exact_visible_sql(
            spec,
            opts.k,
            sessions,
            !template_ids.is_empty(),
            &opts.session_owner,
        )
    } else {
        let plain = matches!(&path, SearchPath::Index(name)
            if indexes.iter().any(|ix| &ix.name == name && crate::model_index::is_plain(ix)));
        search_sql(
            spec,
            opts.k,
            opts.source_type,
            matches!(path, SearchPath::ExactNoIndex(_)),
            plain,
        )
    };
    let mut q = sqlx::query_as::<_, Hit>(sqlx::AssertSqlSafe(sql)).bind(Vector::from(query));
    if exact && !template_ids.is_empty() {
        q = q.bind(template_ids);
    }
    let hits = q.fetch_all(&mut *tx).await?;
    tx.commit().await?;
    Ok(Found { hits, path })
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
