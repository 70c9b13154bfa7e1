//! The embed queue: what a job is and how to enqueue one.
//!
//! Jobs live in apalis-postgres's `apalis.jobs` under the queue (job_type) `embed`. States, as
//! apalis-postgres keeps them: `Pending` (waiting; `run_at` says from when) → `Queued` (claimed
//! by a worker, `lock_by` names it) → `Running` → `Done`, or `Failed` (retried while
//! `attempts < max_attempts`), or `Killed`. A worker that stops heart-beating for
//! `heartbeat × missed_heartbeats` has its `Queued`/`Running` jobs put back to `Pending` by any
//! other worker of the queue (rescue of stuck jobs).
//!
//! Dedup: a job carries `idempotency_key = '<type>:<id>'`; while it is pending, enqueueing the
//! same source again does nothing. The batcher clears the key when it starts a job (before it
//! reads the text), so a change made during the run queues a fresh job.

use serde::{Deserialize, Serialize};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceType {
    Session,
    Template,
}

impl SourceType {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceType::Session => "session",
            SourceType::Template => "template",
        }
    }
}

impl std::fmt::Display for SourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SourceType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "session" => Ok(SourceType::Session),
            "template" => Ok(SourceType::Template),
            other => Err(format!(
                "unknown source type {other:?} (expected session or template)"
            )),
        }
    }
}

/// The job payload: which source to (re-)embed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EmbedSource {
    pub source_type: SourceType,
    pub source_id: Uuid,
}

/// Enqueues many sources in one statement (in the caller's transaction when `exec` is one).
/// Returns how many jobs were created; sources with a pending job are skipped.
pub async fn enqueue_many<'e>(
    exec: impl PgExecutor<'e>,
    queue: &str,
    max_attempts: i32,
    sources: &[EmbedSource],
) -> sqlx::Result<i64> {
    let types: Vec<&str> = sources.iter().map(|s| s.source_type.as_str()).collect();
    let ids: Vec<Uuid> = sources.iter().map(|s| s.source_id).collect();
    let n: i32 = sqlx::query_scalar(
        "SELECT embed_worker.enqueue_many($1::text[]::embedding_source[], $2, $3, $4)",
    )
    .bind(&types)
    .bind(&ids)
    .bind(queue)
    .bind(max_attempts)
    .fetch_one(exec)
    .await?;
    Ok(n as i64)
}

/// Clears the dedup key of jobs that are starting, so later changes queue new jobs.
pub async fn release_dedup_keys(pool: &PgPool, job_ids: &[String]) -> sqlx::Result<()> {
    sqlx::query("UPDATE apalis.jobs SET idempotency_key = NULL WHERE id = ANY($1) AND idempotency_key IS NOT NULL")
        .bind(job_ids)
        .execute(pool)
        .await?;
    Ok(())
}

/// Job counts by state for one queue.
pub async fn counts_by_state(pool: &PgPool, queue: &str) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT status, count(*) FROM apalis.jobs WHERE job_type = $1 GROUP BY status ORDER BY status",
    )
    .bind(queue)
    .fetch_all(pool)
    .await
}

/// Jobs not yet finished: pending, claimed, running, or failed with attempts left.
pub async fn open_jobs(pool: &PgPool, queue: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM apalis.jobs WHERE job_type = $1
            AND (status IN ('Pending', 'Queued', 'Running')
                 OR (status = 'Failed' AND attempts < max_attempts))",
    )
    .bind(queue)
    .fetch_one(pool)
    .await
}

/// Every session and template.
pub async fn all_sources(pool: &PgPool) -> sqlx::Result<Vec<EmbedSource>> {
    let rows: Vec<(String, Uuid)> = sqlx::query_as(
        "SELECT 'session', id FROM sessions UNION ALL SELECT 'template', id FROM question_templates",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(t, id)| {
            Some(EmbedSource {
                source_type: t.parse().ok()?,
                source_id: id,
            })
        })
        .collect())
}

/// Gives claimed jobs back to the queue untouched (no attempt used): for jobs a stopping worker
/// had claimed but not started. `run_at` moves 2 s ahead so that a lock event apalis may still
/// flush for them (it only locks jobs whose `run_at` has passed) cannot re-claim them.
pub async fn release_jobs(pool: &PgPool, job_ids: &[String]) -> sqlx::Result<u64> {
    if job_ids.is_empty() {
        return Ok(0);
    }
    let r = sqlx::query(
        "UPDATE apalis.jobs
            SET status = 'Pending', lock_by = NULL, lock_at = NULL,
                run_at = now() + interval '2 seconds',
                last_result = '{\"Err\": \"released unstarted: worker shutting down\"}'::jsonb
          WHERE id = ANY($1) AND status IN ('Queued', 'Running')",
    )
    .bind(job_ids)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}
