//! The recall probe: how often the index finds the true nearest neighbours, measured on the
//! deployment's own vectors, for everyone and for a small and a large user under row-level
//! security. pgvector's guidance is to monitor recall by comparing approximate results with
//! exact ones; this is that, as a chore.
//!
//! Why stored vectors as queries: real queries are not stored, and a text's own vector is the
//! nearest thing to what users ask about that data. Each sampled vector is searched through
//! `embed_worker.search` (what the app runs) for k + 1 and ranked exactly for k + 1; its own row
//! is dropped from both, and recall@k is the share of the exact k the index found.
//!
//! Why it is bounded: a probe is `search.probe_queries` index searches and as many exact scans
//! per scope, the users chosen among the sample's owners (at most ten counted, each count
//! capped). The exact scan of the "all" scope reads the model's partition: on a large table
//! set `probe_minutes` accordingly (BENCHMARKS.md has its cost).
//!
//! Why one replica probes: the turn is claimed by updating one row (`probe_claimed_at`), so a
//! period's probe runs once whatever the replica count, and no advisory lock the app could hold
//! is involved. Every replica exports the stored results.

use std::time::Instant;

use pgvector::Vector;
use sqlx::PgPool;
use uuid::Uuid;

use super::SearchOptions;
use crate::model_index::IndexSpec;

/// Which callers a probe measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// No `auth.uid()`: every row of the model, through the index.
    All,
    /// The sampled owner with the fewest rows (at least k + 1), as `app_user`.
    SmallUser,
    /// The sampled owner with the most rows, as `app_user`.
    LargeUser,
}

impl Scope {
    /// The `scope` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::All => "all",
            Scope::SmallUser => "small_user",
            Scope::LargeUser => "large_user",
        }
    }
}

/// One query of a probe and what each side returned (its own row dropped).
#[derive(Debug, Clone)]
pub struct Query {
    /// The row whose vector is the query.
    pub source_id: Uuid,
    /// Its chunk.
    pub chunk_index: i32,
    /// The vector.
    pub vector: Vec<f32>,
    /// The index's top k, nearest first.
    pub index: Vec<(Uuid, i32)>,
    /// The exact top k.
    pub exact: Vec<(Uuid, i32)>,
    /// The index search's time, in ms.
    pub ms: f64,
}

/// A scope's measurement.
#[derive(Debug, Clone)]
pub struct Measured {
    /// Which callers.
    pub scope: Scope,
    /// The user measured as (user scopes).
    pub user: Option<Uuid>,
    /// How many rows that user sees (user scopes).
    pub visible: Option<i64>,
    /// The queries, each with both answers.
    pub queries: Vec<Query>,
    /// Mean recall@k over the queries.
    pub recall: f64,
    /// Index search latency, p50 and p95, in ms.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p95_ms: f64,
}

/// How a probe runs.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The model (its spec gives dimensions).
    pub spec: IndexSpec,
    /// Results compared.
    pub k: i64,
    /// Queries per scope.
    pub queries: i64,
    /// Picks the sample: the same seed, the same queries.
    pub seed: i32,
    /// `hnsw.ef_search` for the index side (none: the model's tuned one).
    pub ef_search: Option<u32>,
    /// `hnsw.max_scan_tuples` for the index side (none: the model's tuned one).
    pub max_scan_tuples: Option<u32>,
}

/// A stored row of the model: `(source_id, chunk_index, vector, owner)`, the owner for sessions.
type Row = (Uuid, i32, Vector, Option<Uuid>);

/// The column of sessions holding its owner, as `migrate` recorded it.
async fn owner_column(pool: &PgPool) -> sqlx::Result<String> {
    let owner: String =
        sqlx::query_scalar("SELECT session_owner FROM embed_worker.search_settings")
            .fetch_one(pool)
            .await?;
    // Written by `migrate` from a checked setting; quoted all the same.
    Ok(crate::db::quote_ident(&owner))
}

/// The TABLESAMPLE SYSTEM percentage of `spec`'s partition expected to hold `rows` rows, from the
/// planner's estimate (100 when it has none).
pub(crate) async fn sample_percent<'e>(
    db: impl sqlx::PgExecutor<'e>,
    spec: &IndexSpec,
    rows: f64,
) -> sqlx::Result<f64> {
    let estimate: f64 = sqlx::query_scalar(
        "SELECT coalesce(max(reltuples), 0)::float8 FROM pg_class WHERE relname = $1",
    )
    .bind(spec.partition())
    .fetch_one(db)
    .await?;
    Ok(if estimate > 0.0 {
        (100.0 * rows / estimate).clamp(0.01, 100.0)
    } else {
        100.0
    })
}

/// p50 and p95 of `ms` (not empty).
pub(crate) fn p50_p95(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let at = |f: f64| ms[((ms.len() - 1) as f64 * f).round() as usize];
    (at(0.5), at(0.95))
}

/// Up to `n` of the model's rows, picked by `seed`: a block sample sized from the planner's row
/// estimate (so not every row is read), then a hash order over what it gave.
async fn sample(pool: &PgPool, p: &Probe, owner: &str) -> sqlx::Result<Vec<Row>> {
    let mut percent = sample_percent(pool, &p.spec, 20.0 * p.queries as f64).await?;
    loop {
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT e.source_id, e.chunk_index, e.embedding::vector, s.{owner}
               FROM rag_embeddings e TABLESAMPLE SYSTEM ($1) REPEATABLE ($2)
               LEFT JOIN sessions s ON e.source_type = 'session' AND s.id = e.source_id
              WHERE e.embedding_model = $3
              ORDER BY md5(e.source_id::text || e.chunk_index::text || $2::text)
              LIMIT $4"
        )))
        .bind(percent)
        .bind(p.seed)
        .bind(&p.spec.model)
        .bind(p.queries)
        .fetch_all(pool)
        .await?;
        if rows.len() as i64 >= p.queries || percent >= 100.0 {
            return Ok(rows);
        }
        percent = (percent * 10.0).min(100.0);
    }
}

/// The exact k + 1 nearest of what `user` sees (none: every row of the model).
async fn exact(
    pool: &PgPool,
    p: &Probe,
    owner: &str,
    user: Option<Uuid>,
    q: &Vector,
) -> sqlx::Result<Vec<(Uuid, i32)>> {
    // cosine_distance(), not `<=>`: the planner matches only the operator to an HNSW index,
    // and PostgreSQL 18 chose the index even with enable_indexscan off (a "disabled" node).
    let mut tx = pool.begin().await?;
    let k = p.k + 1;
    let rows: Vec<(Uuid, i32)> = match user {
        None => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT source_id, chunk_index FROM rag_embeddings WHERE embedding_model = $2
                  ORDER BY cosine_distance(embedding, $1) LIMIT {k}"
            )))
            .bind(q)
            .bind(&p.spec.model)
            .fetch_all(&mut *tx)
            .await?
        }
        // What app_user's policies show this user: their sessions' rows and the templates'.
        Some(user) => {
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT source_id, chunk_index FROM (
                     SELECT e.source_id, e.chunk_index, e.embedding FROM sessions s
                       JOIN rag_embeddings e ON e.source_type = 'session' AND e.source_id = s.id
                      WHERE s.{owner} = $3 AND e.embedding_model = $2
                     UNION ALL
                     SELECT source_id, chunk_index, embedding FROM rag_embeddings
                      WHERE source_type = 'template' AND embedding_model = $2) v
                  ORDER BY cosine_distance(embedding, $1) LIMIT {k}"
            )))
            .bind(q)
            .bind(&p.spec.model)
            .bind(user)
            .fetch_all(&mut *tx)
            .await?
        }
    };
    tx.rollback().await?;
    Ok(rows)
}

/// The share of `exact`'s first k that `index` found; both without the query's own row.
pub fn recall_at(index: &[(Uuid, i32)], exact: &[(Uuid, i32)]) -> Option<f64> {
    if exact.is_empty() {
        return None;
    }
    let found = exact.iter().filter(|e| index.contains(e)).count();
    Some(found as f64 / exact.len() as f64)
}

/// Drops `me` and keeps the first `k`.
fn without(rows: Vec<(Uuid, i32)>, me: (Uuid, i32), k: i64) -> Vec<(Uuid, i32)> {
    rows.into_iter()
        .filter(|r| *r != me)
        .take(k as usize)
        .collect()
}

/// A query row `(source_id, chunk_index)`, its vector, and the exact top k without it.
pub type Truth = ((Uuid, i32), Vec<f32>, Vec<(Uuid, i32)>);

/// A scope's queries with their exact answers: computed once, measured against any setting.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Which callers.
    pub scope: Scope,
    /// The user (user scopes).
    pub user: Option<Uuid>,
    /// How many rows that user sees, as the search counts (user scopes).
    pub visible: Option<i64>,
    /// `(row, vector, exact top k without the row)`.
    pub queries: Vec<Truth>,
}

/// The exact answers for `rows` as queries.
async fn truth(
    pool: &PgPool,
    p: &Probe,
    owner: &str,
    scope: Scope,
    user: Option<Uuid>,
    rows: &[Row],
) -> sqlx::Result<Sample> {
    let mut queries = Vec::new();
    for (source_id, chunk_index, v, _) in rows {
        let me = (*source_id, *chunk_index);
        let exact = without(exact(pool, p, owner, user, v).await?, me, p.k);
        queries.push((me, v.to_vec(), exact));
    }
    Ok(Sample {
        scope,
        user,
        visible: None,
        queries,
    })
}

/// The index's answers to `sample` through `embed_worker.search` with `p`'s settings, and the
/// recall; none when no query has an exact answer (a scope of one row).
pub async fn measure(
    pool: &PgPool,
    p: &Probe,
    sample: &Sample,
) -> anyhow::Result<Option<Measured>> {
    let opts = SearchOptions {
        k: p.k + 1,
        as_user: sample.user,
        ef_search: p.ef_search,
        max_scan_tuples: p.max_scan_tuples,
        source_type: None,
    };
    let mut queries = Vec::new();
    for (me, vector, exact) in &sample.queries {
        // Timed: the app's call alone (its transaction, role and claim, the one statement).
        let started = Instant::now();
        let found = super::hits(pool, Some(&p.spec.model), vector.clone(), &opts).await?;
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        crate::meter::search_probe_latency(sample.scope.as_str(), ms / 1000.0);
        let index = found.iter().map(|h| (h.source_id, h.chunk_index)).collect();
        queries.push(Query {
            source_id: me.0,
            chunk_index: me.1,
            vector: vector.clone(),
            index: without(index, *me, p.k),
            exact: exact.clone(),
            ms,
        });
    }
    let recalls: Vec<f64> = queries
        .iter()
        .filter_map(|q| recall_at(&q.index, &q.exact))
        .collect();
    if recalls.is_empty() {
        return Ok(None);
    }
    let (p50_ms, p95_ms) = p50_p95(queries.iter().map(|q| q.ms).collect());
    Ok(Some(Measured {
        scope: sample.scope,
        user: sample.user,
        visible: sample.visible,
        recall: recalls.iter().sum::<f64>() / recalls.len() as f64,
        p50_ms,
        p95_ms,
        queries,
    }))
}

/// A user's rows, up to `cap` + 1 counted, and a sample of them as queries.
async fn users_rows(pool: &PgPool, p: &Probe, owner: &str, user: Uuid) -> sqlx::Result<Vec<Row>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT e.source_id, e.chunk_index, e.embedding::vector, s.{owner} FROM sessions s
           JOIN rag_embeddings e ON e.source_type = 'session' AND e.source_id = s.id
          WHERE s.{owner} = $1 AND e.embedding_model = $2
          ORDER BY md5(e.source_id::text || e.chunk_index::text || $3::text) LIMIT $4"
    )))
    .bind(user)
    .bind(&p.spec.model)
    .bind(p.seed)
    .bind(p.queries)
    .fetch_all(pool)
    .await
}

/// Whether this connection may act as `app_user` (a user scope needs its policies).
async fn can_act_as_app_user(pool: &PgPool) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_has_role(current_user, 'app_user', 'USAGE')")
        .fetch_one(pool)
        .await
}

/// Runs the probe: every scope it can measure, with `p`'s settings.
pub async fn run(pool: &PgPool, p: &Probe) -> anyhow::Result<Vec<Measured>> {
    let mut out = Vec::new();
    for sample in prepare(pool, p).await? {
        if let Some(m) = measure(pool, p, &sample).await? {
            out.push(m);
        }
    }
    Ok(out)
}

/// The probe's queries and their exact answers, per scope. A user scope is prepared only where
/// the connection may act as `app_user` and the sample holds an owner with more than k rows.
pub async fn prepare(pool: &PgPool, p: &Probe) -> anyhow::Result<Vec<Sample>> {
    let owner = owner_column(pool).await?;
    let rows = sample(pool, p, &owner).await?;
    let mut out = vec![truth(pool, p, &owner, Scope::All, None, &rows).await?];
    if !can_act_as_app_user(pool).await? {
        tracing::info!("recall probe: this login is not a member of app_user; user scopes skipped");
        return Ok(out);
    }
    // The sample's owners, the five most and the five least frequent in it (a user with many
    // rows is likely sampled often), each with their rows counted up to a cap.
    let mut seen: std::collections::BTreeMap<Uuid, usize> = Default::default();
    for owner in rows.iter().filter_map(|r| r.3) {
        *seen.entry(owner).or_default() += 1;
    }
    let mut owners: Vec<(usize, Uuid)> = seen.into_iter().map(|(u, n)| (n, u)).collect();
    owners.sort_unstable_by(|a, b| b.cmp(a));
    if owners.len() > 10 {
        owners.drain(5..owners.len() - 5);
    }
    let mut counted = Vec::new();
    for (_, user) in owners {
        let n = super::visible_rows(pool, &p.spec.model, user, None).await?;
        counted.push((n, user));
    }
    counted.sort_unstable();
    let small = counted.iter().find(|(n, _)| *n > p.k).copied();
    let large = counted.last().copied().filter(|l| Some(*l) != small);
    for (scope, pick) in [(Scope::SmallUser, small), (Scope::LargeUser, large)] {
        let Some((n, user)) = pick else { continue };
        let theirs = users_rows(pool, p, &owner, user).await?;
        let mut sample = truth(pool, p, &owner, scope, Some(user), &theirs).await?;
        sample.visible = Some(n);
        out.push(sample);
    }
    Ok(out)
}

/// Stores a probe's results (what every replica exports).
pub async fn store(pool: &PgPool, p: &Probe, results: &[Measured]) -> sqlx::Result<()> {
    let ef: i32 = match p.ef_search {
        Some(ef) => ef as i32,
        None => {
            super::route(pool, Some(&p.spec.model), p.k, None, None)
                .await?
                .ef_search
        }
    };
    for m in results {
        sqlx::query(
            "INSERT INTO embed_worker.search_recall
                 (model, scope, k, queries, recall, ef_search, p50_ms, p95_ms, visible)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (model, scope) DO UPDATE SET k = EXCLUDED.k, queries = EXCLUDED.queries,
                 recall = EXCLUDED.recall, ef_search = EXCLUDED.ef_search,
                 p50_ms = EXCLUDED.p50_ms, p95_ms = EXCLUDED.p95_ms,
                 visible = EXCLUDED.visible, probed_at = now()",
        )
        .bind(&p.spec.model)
        .bind(m.scope.as_str())
        .bind(p.k as i32)
        .bind(m.queries.len() as i32)
        .bind(m.recall)
        .bind(ef)
        .bind(m.p50_ms)
        .bind(m.p95_ms)
        .bind(m.visible)
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Claims this period's probe for this replica: true for one replica per `minutes`.
pub async fn claim(pool: &PgPool, minutes: u64) -> sqlx::Result<bool> {
    Ok(sqlx::query_scalar::<_, bool>(
        "UPDATE embed_worker.search_settings SET probe_claimed_at = now()
          WHERE probe_claimed_at IS NULL
             OR probe_claimed_at < now() - make_interval(secs => $1 * 60 - 5)
         RETURNING true",
    )
    .bind(minutes as f64)
    .fetch_optional(pool)
    .await?
    .unwrap_or(false))
}

/// The stored results of the models still registered: `(model, scope, recall)`.
pub async fn stored(pool: &PgPool) -> sqlx::Result<Vec<(String, String, f64)>> {
    sqlx::query_as(
        "SELECT r.model::text, r.scope, r.recall FROM embed_worker.search_recall r
           JOIN embed_worker.models m ON m.name = r.model ORDER BY 1, 2",
    )
    .fetch_all(pool)
    .await
}

/// The chore: when this replica wins the period's claim, probe the serving model with the
/// configured settings and store the results.
pub async fn run_if_due(
    pool: &PgPool,
    s: &crate::config::SearchSettings,
) -> anyhow::Result<Option<Vec<Measured>>> {
    if s.probe_minutes == 0 || !claim(pool, s.probe_minutes).await? {
        return Ok(None);
    }
    let spec = crate::model_index::lifecycle::serving_spec(pool).await?;
    let p = Probe {
        spec,
        k: s.probe_k as i64,
        queries: s.probe_queries as i64,
        seed: (chrono::Utc::now().timestamp() / 60) as i32,
        ef_search: None,
        max_scan_tuples: None,
    };
    let results = run(pool, &p).await?;
    store(pool, &p, &results).await?;
    Ok(Some(results))
}
