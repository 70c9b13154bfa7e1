//! Freshness: which sources need (re-)embedding, and queueing them in bulk.
//!
//! Why in SQL: the stale set is a join of the sources with their embeddings for the active
//! model; the database answers it in one pass however many rows there are, and the queueing
//! (`embed_worker.enqueue_many`) skips sources that already have a pending job, so a scan is
//! idempotent and safe to run from a CronJob and from every replica (one at a time, under an
//! advisory lock).
//!
//! Reasons, in order of precedence:
//! - `missing`: no embedding at all;
//! - `other_model`: embeddings only from a model other than the active one;
//! - `outdated`: the source changed (`updated_at`) after its embeddings were written;
//! - `too_old`: embeddings older than `freshness.max_age_days`.
//!
//! Sources with no text to embed (every embedded column empty) are never stale.

use std::collections::BTreeMap;

use sqlx::PgPool;
use uuid::Uuid;

use crate::source::{EmbedSource, SourceType};

/// Why a source needs (re-)embedding for the active model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StaleReason {
    /// No embedding of this source at all.
    Missing,
    /// Embedded, but only by another model (a model switch).
    OtherModel,
    /// The text changed after its embedding was written.
    Outdated,
    /// Older than `freshness.max_age_days`.
    TooOld,
    /// Current (listed only when a scan includes fresh sources).
    Fresh,
}

impl StaleReason {
    /// The name used in SQL, output and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            StaleReason::Missing => "missing",
            StaleReason::OtherModel => "other_model",
            StaleReason::Outdated => "outdated",
            StaleReason::TooOld => "too_old",
            StaleReason::Fresh => "fresh",
        }
    }
}

impl std::fmt::Display for StaleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

impl std::str::FromStr for StaleReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            StaleReason::Missing,
            StaleReason::OtherModel,
            StaleReason::Outdated,
            StaleReason::TooOld,
            StaleReason::Fresh,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| format!("unknown stale reason {s:?}"))
    }
}

/// A stale source and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// The source.
    pub source: EmbedSource,
    /// Why it is stale.
    pub reason: StaleReason,
}

/// Filters for a scan.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Only this source type.
    pub source_type: Option<SourceType>,
    /// Only sources updated at or after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// At most this many sources.
    pub limit: Option<i64>,
    /// Embeddings older than this many days count as stale (0/None: never).
    pub max_age_days: Option<u64>,
    /// Include sources whose embeddings are current (backfill of everything).
    pub include_fresh: bool,
}

/// Every source with text (as `src`: type, id, updated_at), then why each is stale for `$1`.
fn stale_sql() -> String {
    let (s, t) = (SourceType::Session, SourceType::Template);
    format!(
        r#"
WITH src AS (
    SELECT 'session'::text AS t, s.id, s.updated_at
      FROM {sessions} s
     WHERE ($2::text IS NULL OR $2 = 'session')
       AND ($3::timestamptz IS NULL OR s.updated_at >= $3)
       AND {session_text}
    UNION ALL
    SELECT 'template', q.id, q.updated_at
      FROM {templates} q
     WHERE ($2::text IS NULL OR $2 = 'template')
       AND ($3::timestamptz IS NULL OR q.updated_at >= $3)
       AND {template_text}
), emb AS (
    SELECT e.source_type::text AS t, e.source_id AS id,
           bool_or(e.embedding_model = $1) AS has_active,
           min(e.updated_at) FILTER (WHERE e.embedding_model = $1) AS oldest
      FROM rag_embeddings e
     GROUP BY 1, 2
)
SELECT src.t, src.id,
       CASE WHEN emb.id IS NULL THEN 'missing'
            WHEN NOT emb.has_active THEN 'other_model'
            WHEN src.updated_at > emb.oldest THEN 'outdated'
            WHEN $4::float8 > 0 AND emb.oldest < now() - make_interval(days => 1) * $4 THEN 'too_old'
            ELSE 'fresh' END AS reason
  FROM src LEFT JOIN emb ON emb.t = src.t AND emb.id = src.id
"#,
        sessions = s.table(),
        templates = t.table(),
        session_text = s.has_text_sql("s"),
        template_text = t.has_text_sql("q"),
    )
}

/// Sources needing (re-)embedding for `model` (with `include_fresh`, every source).
pub async fn find_stale(pool: &PgPool, model: &str, scope: &Scope) -> sqlx::Result<Vec<Stale>> {
    let sql = format!(
        "SELECT t, id, reason FROM ({}) x WHERE $5 OR reason <> 'fresh' ORDER BY reason, t, id LIMIT $6",
        stale_sql()
    );
    let rows: Vec<(String, Uuid, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(model)
        .bind(scope.source_type.map(|t| t.as_str()))
        .bind(scope.since)
        .bind(scope.max_age_days.unwrap_or(0) as f64)
        .bind(scope.include_fresh)
        .bind(scope.limit.filter(|l| *l > 0).unwrap_or(i64::MAX))
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(t, id, reason)| {
            Some(Stale {
                source: EmbedSource {
                    source_type: t.parse().ok()?,
                    source_id: id,
                },
                reason: reason.parse().ok()?,
            })
        })
        .collect())
}

/// Counts per reason.
pub fn counts(stale: &[Stale]) -> BTreeMap<StaleReason, usize> {
    let mut m = BTreeMap::new();
    for s in stale {
        *m.entry(s.reason).or_insert(0) += 1;
    }
    m
}

/// Queues the `stale` sources in the bulk lane (`bulk.mode`) in chunks of 1,000, calling
/// `progress(done, total)` after each: the one way every caller (the periodic scan,
/// `enqueue-stale`, `backfill`) turns a scan into jobs. Returns how many jobs were created
/// (sources with a pending job are skipped).
pub async fn enqueue_stale(
    pool: &PgPool,
    settings: &crate::config::Settings,
    stale: &[Stale],
    mut progress: impl FnMut(usize, usize),
) -> sqlx::Result<i64> {
    let attempts = settings.queue.max_attempts;
    let queue = crate::queue::bulk_job_type(settings);
    // A source whose job is already open (pending, claimed or running) will be embedded by it:
    // running jobs have given up their dedup key, so enqueueing them again made a second job
    // per source for every batch the worker had started.
    let open =
        crate::queue::open_sources(pool, &crate::queue::lanes(&settings.queue.name), None).await?;
    let sources: Vec<EmbedSource> = stale
        .iter()
        .map(|s| s.source)
        .filter(|s| !open.contains(s))
        .collect();
    let mut created = 0;
    for (i, chunk) in sources.chunks(1000).enumerate() {
        created +=
            crate::queue::enqueue_lane(pool, &queue, attempts, settings.bulk.priority, chunk)
                .await?;
        progress((i * 1000 + chunk.len()).min(sources.len()), sources.len());
    }
    Ok(created)
}

/// One periodic stale scan (`freshness.scan_interval_secs`), if no other replica is scanning
/// (advisory lock). Returns jobs queued, or `None` when another replica holds the lock.
pub async fn scan_stale(
    pool: &PgPool,
    settings: &crate::config::Settings,
) -> anyhow::Result<Option<i64>> {
    with_scan_lock(pool, || async {
        let scope = Scope {
            max_age_days: Some(settings.freshness.max_age_days),
            limit: Some(settings.freshness.scan_limit),
            ..Default::default()
        };
        let stale = find_stale(pool, &settings.model.name, &scope).await?;
        Ok(enqueue_stale(pool, settings, &stale, |_, _| {}).await?)
    })
    .await
}

/// One scanner at a time across replicas: runs `f` only if this session gets the lock.
pub async fn with_scan_lock<T, F: std::future::Future<Output = anyhow::Result<T>>>(
    pool: &PgPool,
    f: impl FnOnce() -> F,
) -> anyhow::Result<Option<T>> {
    let mut conn = pool.acquire().await?;
    let key: i64 = 0x656d_6265_6473_6361; // "embedsca"
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await?;
    if !got {
        return Ok(None);
    }
    let result = f().await;
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *conn)
        .await;
    result.map(Some)
}

/// Tokens the sources would cost to embed now with the active model, and that in USD.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Sources to embed.
    pub sources: usize,
    /// Their tokens.
    pub tokens: u64,
    /// Their cost at the synchronous price.
    pub usd: f64,
    /// Their cost through the Batch API.
    pub batch_usd: f64,
}

impl std::fmt::Display for Estimate {
    /// `N sources, T tokens, $S sync / $B batch (saves $D)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sources, {} tokens, ${:.4} sync / ${:.4} through the Batch API (saves ${:.4})",
            self.sources,
            self.tokens,
            self.usd,
            self.batch_usd,
            self.usd - self.batch_usd
        )
    }
}

/// Renders and counts the sources' chunks, 1,000 sources at a time.
pub async fn estimate(
    pool: &PgPool,
    settings: &crate::config::Settings,
    sources: &[EmbedSource],
) -> anyhow::Result<Estimate> {
    let m = &settings.model;
    let chunker = crate::pipeline::chunk::Chunker::for_model(m)?;
    let mut tokens = 0u64;
    for chunk in sources.chunks(1000) {
        let loaded = crate::pipeline::load::load(pool, &settings.render, chunk).await?;
        for l in loaded.values() {
            tokens += chunker
                .chunks(&l.text, &m.name, m.dimensions)
                .iter()
                .map(|c| c.tokens as u64)
                .sum::<u64>();
        }
    }
    Ok(Estimate {
        sources: sources.len(),
        tokens,
        usd: tokens as f64 * m.usd_per_million_tokens / 1e6,
        batch_usd: tokens as f64 * m.batch_usd_per_million_tokens / 1e6,
    })
}
