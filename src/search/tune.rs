//! `embed-worker tune`: the smallest `hnsw.ef_search` (and, for users under row-level security,
//! `hnsw.max_scan_tuples`) that meets a recall target on the deployment's own vectors, stored for
//! the model so `embed_worker.search` uses it; and the design's "m=16 vs m=32" question answered
//! on a sample copy of the same rows.
//!
//! Why the smallest: latency grows with `ef_search`, recall flattens; the first setting of the
//! sweep that meets the target in every scope is the cheapest that is good enough. The sweep
//! measures exactly what the app runs (`embed_worker.search` with the setting as an argument) on
//! the probe's queries, whose exact answers are computed once.
//!
//! Why a sample copy for a candidate index: building a second HNSW index on the live partition
//! takes as long as the first (minutes at 500K rows) and WAL for every page. A TEMP table of a
//! sample is the session's alone: no WAL, nothing left behind, and both parameter sets are built
//! on the same rows so their figures compare.

use std::time::Instant;

use sqlx::PgPool;

use super::probe::{self, Measured, Probe, Sample};
use crate::model_index::IndexSpec;

/// The `ef_search` values tried, in order.
pub const EF_SEARCH: &[u32] = &[10, 20, 40, 64, 100, 150, 200, 300, 400, 600, 800, 1000];
/// The `max_scan_tuples` values tried for user scopes that fall short while everyone's meets.
pub const MAX_SCAN_TUPLES: &[u32] = &[50_000, 100_000, 200_000];

/// One setting and what it measured, per scope.
#[derive(Debug, Clone)]
pub struct Step {
    /// `hnsw.ef_search`.
    pub ef_search: u32,
    /// `hnsw.max_scan_tuples`; none: the model's current one.
    pub max_scan_tuples: Option<u32>,
    /// Per scope.
    pub results: Vec<Measured>,
}

impl Step {
    /// The lowest recall of its scopes.
    pub fn worst(&self) -> f64 {
        self.results
            .iter()
            .map(|m| m.recall)
            .fold(f64::INFINITY, f64::min)
    }

    /// One line: the setting, then each scope's recall and p50/p95.
    pub fn line(&self) -> String {
        let scopes: Vec<String> = self
            .results
            .iter()
            .map(|m| {
                format!(
                    "{} {:.3} ({:.1}/{:.1} ms)",
                    m.scope.as_str(),
                    m.recall,
                    m.p50_ms,
                    m.p95_ms
                )
            })
            .collect();
        let tuples = self
            .max_scan_tuples
            .map_or(String::new(), |t| format!(" max_scan_tuples={t}"));
        format!(
            "ef_search={}{tuples}: {}",
            self.ef_search,
            scopes.join(", ")
        )
    }
}

/// A sweep: every step measured, and the first that met the target.
#[derive(Debug, Clone)]
pub struct Tuned {
    /// In the order tried.
    pub steps: Vec<Step>,
    /// Index into `steps` of the chosen setting.
    pub chosen: Option<usize>,
}

async fn step(
    pool: &PgPool,
    p: &Probe,
    samples: &[Sample],
    ef_search: u32,
    max_scan_tuples: Option<u32>,
) -> anyhow::Result<Step> {
    let p = Probe {
        ef_search: Some(ef_search),
        max_scan_tuples,
        ..p.clone()
    };
    let mut results = Vec::new();
    for s in samples {
        if let Some(m) = probe::measure(pool, &p, s).await? {
            results.push(m);
        }
    }
    Ok(Step {
        ef_search,
        max_scan_tuples,
        results,
    })
}

/// Sweeps `ef_search` on `p`'s queries until every scope meets `target`; where everyone's
/// meets it and a user's does not, raises `max_scan_tuples` at that `ef_search` first.
pub async fn sweep(pool: &PgPool, p: &Probe, target: f64) -> anyhow::Result<Tuned> {
    let samples = probe::prepare(pool, p).await?;
    let mut steps = Vec::new();
    for &ef in EF_SEARCH {
        let s = step(pool, p, &samples, ef, None).await?;
        let meets = s.worst() >= target;
        let everyone = s
            .results
            .iter()
            .filter(|m| m.scope == probe::Scope::All)
            .all(|m| m.recall >= target);
        steps.push(s);
        if meets {
            return Ok(Tuned {
                chosen: Some(steps.len() - 1),
                steps,
            });
        }
        if everyone {
            for &tuples in MAX_SCAN_TUPLES {
                let s = step(pool, p, &samples, ef, Some(tuples)).await?;
                let meets = s.worst() >= target;
                steps.push(s);
                if meets {
                    return Ok(Tuned {
                        chosen: Some(steps.len() - 1),
                        steps,
                    });
                }
            }
        }
    }
    Ok(Tuned {
        steps,
        chosen: None,
    })
}

/// Stores `step` as `model`'s setting (`embed_worker.models`), which `embed_worker.search`
/// reads on its next call.
pub async fn store(pool: &PgPool, model: &str, step: &Step) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE embed_worker.models
            SET ef_search = $2, max_scan_tuples = coalesce($3, max_scan_tuples),
                tuned_recall = $4, tuned_at = now()
          WHERE name = $1",
    )
    .bind(model)
    .bind(step.ef_search as i32)
    .bind(step.max_scan_tuples.map(|t| t as i32))
    .bind(step.worst())
    .execute(pool)
    .await?;
    Ok(())
}

/// HNSW build parameters, `m=32` or `m=32,ef_construction=128`.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexParams {
    /// Links per node.
    pub m: u32,
    /// Candidate list while building.
    pub ef_construction: u32,
}

impl IndexParams {
    /// The design's (migration 1, every index the worker builds).
    pub const TODAY: IndexParams = IndexParams {
        m: 16,
        ef_construction: 64,
    };
}

impl std::fmt::Display for IndexParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "m={}, ef_construction={}", self.m, self.ef_construction)
    }
}

impl std::str::FromStr for IndexParams {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let mut p = IndexParams::TODAY;
        for part in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("{part:?}: expected key=value (m=32)"))?;
            let value: u32 = value
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{part:?}: the value is not a whole number"))?;
            match key.trim() {
                // pgvector's own ranges.
                "m" if (2..=100).contains(&value) => p.m = value,
                "ef_construction" if (4..=1000).contains(&value) => p.ef_construction = value,
                "m" => anyhow::bail!("m = {value} is out of range (2..=100)"),
                "ef_construction" => {
                    anyhow::bail!("ef_construction = {value} is out of range (4..=1000)")
                }
                other => anyhow::bail!("{other:?}: only m and ef_construction can be compared"),
            }
        }
        anyhow::ensure!(
            p.ef_construction >= 2 * p.m,
            "ef_construction ({}) must be at least 2 × m ({})",
            p.ef_construction,
            2 * p.m
        );
        Ok(p)
    }
}

/// One index built on the sample copy, and how it searched.
#[derive(Debug, Clone)]
pub struct Built {
    /// Its parameters.
    pub params: IndexParams,
    /// Build time.
    pub build_secs: f64,
    /// Its size.
    pub bytes: i64,
    /// Mean recall@k of the sample's queries (self excluded).
    pub recall: f64,
    /// Search latency p50 / p95, ms.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p95_ms: f64,
}

/// Copies up to `rows` of `spec`'s rows into a TEMP table, builds today's index and `candidate`
/// on it one after the other, and searches each with `queries` of its rows at `ef_search`.
pub async fn candidate(
    pool: &PgPool,
    spec: &IndexSpec,
    candidate: &IndexParams,
    rows: i64,
    queries: i64,
    k: i64,
    ef_search: u32,
) -> anyhow::Result<(i64, Vec<Built>)> {
    let mut conn = pool.acquire().await?;
    let ty = spec.index_type();
    let percent = probe::sample_percent(&mut *conn, spec, 1.5 * rows as f64).await?;
    sqlx::raw_sql("DROP TABLE IF EXISTS pg_temp.tune_sample")
        .execute(&mut *conn)
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TEMP TABLE tune_sample AS
         SELECT row_number() OVER () AS id, embedding::{ty} AS embedding
           FROM (SELECT embedding FROM rag_embeddings TABLESAMPLE SYSTEM ($1) REPEATABLE (1)
                  WHERE embedding_model = $2 LIMIT $3) s"
    )))
    .bind(percent)
    .bind(&spec.model)
    .bind(rows)
    .execute(&mut *conn)
    .await?;
    let copied: i64 = sqlx::query_scalar("SELECT count(*) FROM tune_sample")
        .fetch_one(&mut *conn)
        .await?;
    anyhow::ensure!(
        copied > k,
        "model {} has {copied} rows to sample: too few to compare indexes",
        spec.model
    );
    let qs: Vec<(i64, pgvector::Vector)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, embedding::vector FROM tune_sample ORDER BY md5(id::text) LIMIT {queries}"
    )))
    .fetch_all(&mut *conn)
    .await?;
    let mut truth = Vec::new();
    for (id, v) in &qs {
        let ids: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM tune_sample WHERE id <> $2
              ORDER BY cosine_distance(embedding::vector, $1) LIMIT {k}"
        )))
        .bind(v)
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        truth.push(ids);
    }
    let mut out = Vec::new();
    for params in [IndexParams::TODAY, candidate.clone()] {
        let started = Instant::now();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE INDEX tune_sample_hnsw ON tune_sample USING hnsw (embedding {})
               WITH (m = {}, ef_construction = {})",
            spec.opclass(),
            params.m,
            params.ef_construction
        )))
        .execute(&mut *conn)
        .await?;
        let build_secs = started.elapsed().as_secs_f64();
        let bytes: i64 = sqlx::query_scalar("SELECT pg_relation_size('pg_temp.tune_sample_hnsw')")
            .fetch_one(&mut *conn)
            .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET hnsw.ef_search = {ef_search}"
        )))
        .execute(&mut *conn)
        .await?;
        let mut ms = Vec::new();
        let mut recalls = Vec::new();
        for ((id, v), truth) in qs.iter().zip(&truth) {
            let started = Instant::now();
            let found: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT id FROM tune_sample ORDER BY embedding <=> $1::{ty} LIMIT {}",
                k + 1
            )))
            .bind(v)
            .fetch_all(&mut *conn)
            .await?;
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
            let found: Vec<i64> = found
                .into_iter()
                .filter(|f| f != id)
                .take(k as usize)
                .collect();
            if !truth.is_empty() {
                let hit = truth.iter().filter(|t| found.contains(t)).count();
                recalls.push(hit as f64 / truth.len() as f64);
            }
        }
        sqlx::raw_sql("RESET hnsw.ef_search; DROP INDEX pg_temp.tune_sample_hnsw")
            .execute(&mut *conn)
            .await?;
        let (p50_ms, p95_ms) = probe::p50_p95(ms);
        out.push(Built {
            params,
            build_secs,
            bytes,
            recall: recalls.iter().sum::<f64>() / recalls.len().max(1) as f64,
            p50_ms,
            p95_ms,
        });
    }
    sqlx::raw_sql("DROP TABLE pg_temp.tune_sample")
        .execute(&mut *conn)
        .await?;
    Ok((copied, out))
}
