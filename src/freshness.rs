//! Freshness: which sources need (re-)embedding, and queueing them in bulk.
//!
//! Why in SQL: the stale set is a join of the sources with their embeddings for the active
//! model; the database answers it in one pass however many rows there are, and the queueing
//! ([`enqueue_stale`], one statement) skips sources that already have an open job, so a scan is
//! idempotent and safe to run from a CronJob and from every replica (one at a time, under a
//! row lock the app's role cannot take).
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
    /// A vector of the app's, adopted with its table and not yet verified against the current
    /// text: its job costs no tokens when the source has not changed since (db::adopt).
    Adopted,
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
            StaleReason::Adopted => "adopted",
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
            StaleReason::Adopted,
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
           min(e.updated_at) FILTER (WHERE e.embedding_model = $1) AS oldest,
           bool_or(e.content_hash = '' OR e.updated_at IS NULL)
               FILTER (WHERE e.embedding_model = $1) AS adopted
      FROM rag_embeddings e
     GROUP BY 1, 2
)
SELECT src.t, src.id,
       CASE WHEN emb.id IS NULL THEN 'missing'
            WHEN NOT emb.has_active THEN 'other_model'
            WHEN src.updated_at > emb.oldest THEN 'outdated'
            WHEN $4::float8 > 0 AND emb.oldest < now() - make_interval(days => 1) * $4 THEN 'too_old'
            WHEN emb.adopted THEN 'adopted'
            ELSE 'fresh' END AS reason
  FROM src LEFT JOIN emb ON emb.t = src.t AND emb.id = src.id
"#,
        sessions = s.table(),
        templates = t.table(),
        session_text = s.has_text_sql("s"),
        template_text = t.has_text_sql("q"),
    )
}

/// Sources with text that `model` has no current row for, as (missing, outdated): the stale
/// scan's own set (missing or only another model's rows; edited since written), so coverage
/// is a set and not a count: rows of a source without text, or a source's extra chunk, offset
/// nothing. Promotion needs both to be zero.
pub async fn uncovered<'e>(db: impl sqlx::PgExecutor<'e>, model: &str) -> sqlx::Result<(i64, i64)> {
    let sql = format!(
        "SELECT count(*) FILTER (WHERE reason IN ('missing', 'other_model')),
                count(*) FILTER (WHERE reason = 'outdated')
           FROM ({}) x",
        stale_sql()
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(model)
        .bind(None::<&str>)
        .bind(None::<chrono::DateTime<chrono::Utc>>)
        .bind(0.0_f64)
        .fetch_one(db)
        .await
}

/// Sources needing (re-)embedding for `model` (with `include_fresh`, every source), all in
/// memory: for tests and small scopes; the commands use [`survey`], which streams.
pub async fn find_stale(pool: &PgPool, model: &str, scope: &Scope) -> sqlx::Result<Vec<Stale>> {
    let rows = stale_rows(model, scope).fetch_all(pool).await?;
    Ok(rows.into_iter().filter_map(Stale::from_row).collect())
}

/// The stale scan of `model` over `scope` as rows (type, id, reason), in reason order.
fn stale_rows<'q>(
    model: &'q str,
    scope: &'q Scope,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, (String, Uuid, String), sqlx::postgres::PgArguments> {
    let sql = format!(
        "SELECT t, id, reason FROM ({}) x WHERE $5 OR reason <> 'fresh' ORDER BY reason, t, id LIMIT $6",
        stale_sql()
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(model)
        .bind(scope.source_type.map(|t| t.as_str()))
        .bind(scope.since)
        .bind(scope.max_age_days.unwrap_or(0) as f64)
        .bind(scope.include_fresh)
        .bind(scope.limit.filter(|l| *l > 0).unwrap_or(i64::MAX))
}

impl Stale {
    /// From a scan row; `None` for a type or reason this version does not know.
    fn from_row((t, id, reason): (String, Uuid, String)) -> Option<Stale> {
        Some(Stale {
            source: EmbedSource {
                source_type: t.parse().ok()?,
                source_id: id,
            },
            reason: reason.parse().ok()?,
        })
    }
}

/// What one server-side queueing did, per reason: sources found stale, and of those how many
/// already had an open job (skipped); `created` jobs in all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Queued {
    /// (reason, stale sources, of which already with an open job), in reason order.
    pub by_reason: Vec<(StaleReason, i64, i64)>,
    /// Jobs created (sources with a pending job are deduplicated by the queue as well).
    pub created: i64,
}

impl Queued {
    /// Stale sources found.
    pub fn found(&self) -> i64 {
        self.by_reason.iter().map(|(_, n, _)| n).sum()
    }
}

/// Queues the sources `scope` finds stale for `model` in the bulk lane (`bulk.mode`), in one
/// statement: the scan, the skip of sources with an open job (pending, claimed, running, or
/// failed with attempts left: that job will embed them) and the insert all run in the server,
/// so 20,000 jobs cost one round trip and no row travels to the worker. The one way every
/// caller (the periodic scan, `enqueue-stale`, `backfill`) turns a scan into jobs.
pub async fn enqueue_stale<'e>(
    db: impl sqlx::PgExecutor<'e>,
    settings: &crate::config::Settings,
    model: &str,
    scope: &Scope,
) -> sqlx::Result<Queued> {
    // Running jobs have given up their dedup key, so open jobs are matched by payload: an
    // enqueue that relied on the key made a second job per source for every running batch.
    // Only jobs for this model (or for none: whatever the worker writes) count: another
    // model's open job does not embed this one's: a pending one is made this model's by
    // enqueue_jobs, a running one gets a job after it (migration 25). The jobs name `model`,
    // so a worker writing another model gives them back.
    let sql = format!(
        r#"WITH stale AS MATERIALIZED (
    SELECT t, id, reason FROM ({stale}) x
     WHERE $5 OR reason <> 'fresh' ORDER BY reason, t, id LIMIT $6
), open AS MATERIALIZED (
    SELECT DISTINCT p ->> 'source_type' AS t, p ->> 'source_id' AS id
      FROM (SELECT embed_worker.job_payload(job) AS p FROM apalis.jobs
             WHERE job_type = ANY($7) AND {open}) j
     WHERE p ->> 'model' IS NULL OR p ->> 'model' = $1
), marked AS MATERIALIZED (
    SELECT s.t, s.id, s.reason,
           EXISTS (SELECT 1 FROM open o WHERE o.t = s.t AND o.id = s.id::text) AS is_open
      FROM stale s
), q AS MATERIALIZED (
    SELECT embed_worker.enqueue_jobs(array_agg(t::embedding_source ORDER BY t, id),
                                     array_agg(id ORDER BY t, id), $8, $9, $10, $1) AS n
      FROM marked WHERE NOT is_open
)
SELECT reason, count(*), count(*) FILTER (WHERE is_open), (SELECT coalesce(n, 0) FROM q)::int8
  FROM marked GROUP BY reason
 UNION ALL
SELECT NULL, 0, 0, (SELECT coalesce(n, 0) FROM q)::int8"#,
        stale = stale_sql(),
        open = crate::queue::OPEN_JOB_SQL,
    );
    let rows: Vec<(Option<String>, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(model)
        .bind(scope.source_type.map(|t| t.as_str()))
        .bind(scope.since)
        .bind(scope.max_age_days.unwrap_or(0) as f64)
        .bind(scope.include_fresh)
        .bind(scope.limit.filter(|l| *l > 0).unwrap_or(i64::MAX))
        .bind(crate::queue::lanes(&settings.queue.name))
        .bind(crate::queue::bulk_job_type(settings))
        .bind(settings.queue.max_attempts)
        .bind(settings.bulk.priority)
        .fetch_all(db)
        .await?;
    let mut q = Queued::default();
    for (reason, found, open, created) in rows {
        q.created = created;
        if let Some(r) = reason.and_then(|r| r.parse().ok()) {
            q.by_reason.push((r, found, open));
        }
    }
    q.by_reason.sort();
    Ok(q)
}

/// One periodic stale scan (`freshness.scan_interval_secs`), if no other replica is scanning.
/// Returns jobs queued, or `None` when another replica holds the lock.
///
/// The lock is the `stale-scan` lease's row ([`crate::db::locks::try_lock_in`]), for the scan's
/// transaction, on the connection that runs the scan: a session lock held on one connection
/// while the scan took a second from the pool needed two at once, and at a pool of two the
/// leader (whose lock held the other) had none left.
pub async fn scan_stale(
    pool: &PgPool,
    settings: &crate::config::Settings,
) -> anyhow::Result<Option<i64>> {
    let mut tx = pool.begin().await?;
    if !crate::db::locks::try_lock_in(&mut tx, "stale-scan").await? {
        return Ok(None);
    }
    let scope = Scope {
        max_age_days: Some(settings.freshness.max_age_days),
        limit: Some(settings.freshness.scan_limit),
        ..Default::default()
    };
    let queued = enqueue_stale(&mut *tx, settings, &settings.model.name, &scope).await?;
    tx.commit().await?;
    Ok(Some(queued.created))
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

impl Estimate {
    /// `tokens` of `sources` at `model`'s prices.
    fn priced(sources: usize, tokens: u64, model: &crate::config::ModelSettings) -> Self {
        Estimate {
            sources,
            tokens,
            usd: tokens as f64 * model.usd_per_million_tokens / 1e6,
            batch_usd: tokens as f64 * model.batch_usd_per_million_tokens / 1e6,
        }
    }
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

/// A scan's stale sources counted per reason, and those of the reasons `priced` selects
/// estimated (tokens and cost with the active model).
#[derive(Debug, Clone, PartialEq)]
pub struct Survey {
    /// Stale sources per reason.
    pub counts: BTreeMap<StaleReason, usize>,
    /// What embedding the priced ones would cost.
    pub estimate: Estimate,
}

/// Sources priced per round: their texts are loaded and counted together.
const SURVEY_BATCH: usize = 1000;

/// Scans `scope` for sources stale for `model` and surveys them: the rows stream from the server
/// and are priced 1,000 at a time, so memory stays the same for 20,000 sources or 20 million
/// (`backfill` and `estimate` may run as a Job in a pod with the worker's memory limit). Sources
/// only another model has embedded (a model switch) are counted from that model's stored
/// `token_count`s when the active model counts with the same tokenizer (cl100k: OpenAI's
/// embedding models), since their text has not changed since; the rest are rendered and counted.
/// Why: for a 20,000-source switch, rendering and tokenizing everything took ~2 s of the
/// command's ~4 s, to print a number the database already holds.
pub async fn survey(
    pool: &PgPool,
    settings: &crate::config::Settings,
    model: &str,
    scope: &Scope,
    priced: impl Fn(StaleReason) -> bool,
) -> anyhow::Result<Survey> {
    use futures::TryStreamExt;
    // Built for the first round priced (a dry run prices none: no tokenizer to load).
    let mut chunker = None;
    // The stream holds a connection while each round queries on another: a pool of one (which
    // `database.max_connections` allows) gets a second pool of one, same options and hooks.
    let own;
    let scan = if pool.options().get_max_connections() < 2 {
        own = pool
            .options()
            .clone()
            .connect_lazy_with((*pool.connect_options()).clone());
        &own
    } else {
        pool
    };
    let mut rows = stale_rows(model, scope).fetch(scan);
    let mut counts = BTreeMap::new();
    let (mut sources, mut tokens) = (0usize, 0u64);
    let mut batch: Vec<Stale> = Vec::with_capacity(SURVEY_BATCH);
    loop {
        let row = rows.try_next().await?;
        let end = row.is_none();
        if let Some(stale) = row.and_then(Stale::from_row) {
            *counts.entry(stale.reason).or_insert(0) += 1;
            if priced(stale.reason) {
                sources += 1;
                batch.push(stale);
            }
        }
        if batch.len() >= SURVEY_BATCH || (end && !batch.is_empty()) {
            if chunker.is_none() {
                chunker = Some(crate::pipeline::chunk::Chunker::for_model(&settings.model)?);
            }
            if let Some(c) = &chunker {
                tokens += price(pool, settings, c, &batch).await?;
            }
            batch.clear();
        }
        if end {
            break;
        }
    }
    Ok(Survey {
        counts,
        estimate: Estimate::priced(sources, tokens, &settings.model),
    })
}

/// Tokens of one round of stale sources: a switch's from the stored counts, the rest counted.
async fn price(
    pool: &PgPool,
    settings: &crate::config::Settings,
    chunker: &crate::pipeline::chunk::Chunker,
    batch: &[Stale],
) -> anyhow::Result<u64> {
    let cl100k = chunker.counts_cl100k();
    let (switched, mut counted): (Vec<&Stale>, Vec<&Stale>) = batch
        .iter()
        .partition(|s| cl100k && s.reason == StaleReason::OtherModel);
    let mut tokens = 0u64;
    if !switched.is_empty() {
        let types: Vec<&str> = switched
            .iter()
            .map(|s| s.source.source_type.as_str())
            .collect();
        let ids: Vec<Uuid> = switched.iter().map(|s| s.source.source_id).collect();
        // One model's chunks per source (the first by name that has it); sources without a
        // stored count (none, unless rows vanished since the scan) are counted instead.
        let stored: Vec<(String, Uuid, i64)> = sqlx::query_as(
            "SELECT t, id, sum(token_count)::int8 FROM (
                 SELECT e.source_type::text AS t, e.source_id AS id, e.token_count, e.embedding_model,
                        min(e.embedding_model) OVER (PARTITION BY e.source_type, e.source_id) AS first
                   FROM rag_embeddings e
                   JOIN unnest($1::text[], $2::uuid[]) AS u(t, id)
                     ON e.source_type::text = u.t AND e.source_id = u.id) x
              WHERE embedding_model = first GROUP BY t, id",
        )
        .bind(&types)
        .bind(&ids)
        .fetch_all(pool)
        .await?;
        let mut have = std::collections::HashSet::with_capacity(stored.len());
        for (t, id, n) in stored {
            if let Some(source) = EmbedSource::from_row((t, id)) {
                have.insert(source);
                tokens += n.max(0) as u64;
            }
        }
        counted.extend(switched.into_iter().filter(|s| !have.contains(&s.source)));
    }
    let sources: Vec<EmbedSource> = counted.iter().map(|s| s.source).collect();
    Ok(tokens + count_tokens(pool, settings, chunker, &sources).await?)
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
    for part in sources.chunks(SURVEY_BATCH) {
        tokens += count_tokens(pool, settings, &chunker, part).await?;
    }
    Ok(Estimate::priced(sources.len(), tokens, m))
}

/// Tokens of the sources' chunks as the worker would send them (rendered, split).
async fn count_tokens(
    pool: &PgPool,
    settings: &crate::config::Settings,
    chunker: &crate::pipeline::chunk::Chunker,
    sources: &[EmbedSource],
) -> anyhow::Result<u64> {
    let m = &settings.model;
    let loaded = crate::pipeline::load::load(pool, &settings.render, sources).await?;
    Ok(loaded
        .values()
        .flat_map(|l| chunker.chunks(&l.text, &m.name, m.dimensions))
        .map(|c| c.tokens as u64)
        .sum())
}

/// What adopting the app's own `rag_embeddings` would save, read before `migrate` (nothing of
/// the worker's exists yet): every source of the app's tables, its vector adoptable when its
/// row was written at or after the source's text (`freshness.adopt_untimed` for rows without
/// `updated_at`). Streams the sources and prices them 1,000 at a time, as [`survey`] does.
pub struct Adoption {
    /// The app's vectors that the first run would keep: their sources and tokens not paid.
    pub kept: Estimate,
    /// Sources without a vector to keep (never embedded, or changed since): to embed.
    pub to_embed: Estimate,
}

/// [`Adoption`] of the app's `rag_embeddings` (present, not yet adopted).
pub async fn adoption_estimate(
    pool: &PgPool,
    settings: &crate::config::Settings,
) -> anyhow::Result<Adoption> {
    use futures::TryStreamExt;
    let timed: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'public.rag_embeddings'::regclass
                          AND attname = 'updated_at' AND NOT attisdropped)",
    )
    .fetch_one(pool)
    .await?;
    let row_time = if timed {
        "e.updated_at"
    } else {
        "NULL::timestamptz"
    };
    let sql = format!(
        "WITH src AS (
             SELECT 'session'::text AS t, id, updated_at FROM public.{sessions}
             UNION ALL
             SELECT 'template', id, updated_at FROM public.{templates})
         SELECT src.t, src.id,
                coalesce(bool_or({row_time} >= src.updated_at OR ({row_time} IS NULL AND $1)), false)
           FROM src LEFT JOIN public.rag_embeddings e
             ON e.source_type::text = src.t AND e.source_id = src.id
          GROUP BY 1, 2",
        sessions = SourceType::Session.table(),
        templates = SourceType::Template.table(),
    );
    let own = pool
        .options()
        .clone()
        .connect_lazy_with((*pool.connect_options()).clone());
    let mut rows = sqlx::query_as::<_, (String, Uuid, bool)>(sqlx::AssertSqlSafe(sql))
        .bind(settings.freshness.adopt_untimed)
        .fetch(&own);
    let chunker = crate::pipeline::chunk::Chunker::for_model(&settings.model)?;
    let (mut kept, mut embed) = ((0usize, 0u64), (0usize, 0u64));
    let (mut keep_batch, mut embed_batch) = (Vec::new(), Vec::new());
    loop {
        let row = rows.try_next().await?;
        let end = row.is_none();
        if let Some((t, id, adoptable)) = row
            && let Some(source) = EmbedSource::from_row((t, id))
        {
            if adoptable {
                keep_batch.push(source);
            } else {
                embed_batch.push(source);
            }
        }
        for (batch, acc) in [(&mut keep_batch, &mut kept), (&mut embed_batch, &mut embed)] {
            if batch.len() >= SURVEY_BATCH || (end && !batch.is_empty()) {
                acc.0 += batch.len();
                acc.1 += count_tokens(pool, settings, &chunker, batch).await?;
                batch.clear();
            }
        }
        if end {
            break;
        }
    }
    Ok(Adoption {
        kept: Estimate::priced(kept.0, kept.1, &settings.model),
        to_embed: Estimate::priced(embed.0, embed.1, &settings.model),
    })
}
