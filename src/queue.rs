//! The embed queue: every statement on `apalis.jobs` that apalis does not make itself.
//!
//! Why one room: the queue's schema is apalis-postgres's, and its states, locks and dedup keys
//! must be read the same way by the worker, the bulk lane, the freshness scan and the
//! operator's commands. What a job *is* and how it ends is [`crate::job`]'s.
//!
//! Jobs live in apalis-postgres's `apalis.jobs` under the queue (job_type) `embed`. States
//! ([`JobState`], as apalis-postgres keeps them): `Pending` (waiting; `run_at` says from when) →
//! `Queued` (claimed by a worker, `lock_by` names it) → `Running` → `Done`, or `Failed` (retried
//! while `attempts < max_attempts`), or `Killed`. A worker that stops heart-beating for
//! `heartbeat × missed_heartbeats` has its `Queued`/`Running` jobs put back to `Pending` by any
//! other worker of the queue (rescue of stuck jobs).
//!
//! Dedup: a job carries `idempotency_key = '<type>:<id>'`; while it is pending, enqueueing the
//! same source again does nothing. The pipeline clears the key when it starts a job (before it
//! reads the text), so a change made during the run queues a fresh job.

use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::config::{BulkMode, Settings};
use crate::source::{EmbedSource, SourceType};

/// A job's state as apalis-postgres stores it in `apalis.jobs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    /// Waiting; `run_at` says from when.
    Pending,
    /// Claimed by a worker (`lock_by`), not started.
    Queued,
    /// Started (or, in the batch lane, owned by a batch record).
    Running,
    /// Ended well.
    Done,
    /// Ended badly; claimed again while `attempts < max_attempts`, a dead letter after.
    Failed,
    /// A dead letter now (a permanent failure).
    Killed,
}

impl JobState {
    /// The word in `apalis.jobs.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "Pending",
            JobState::Queued => "Queued",
            JobState::Running => "Running",
            JobState::Done => "Done",
            JobState::Failed => "Failed",
            JobState::Killed => "Killed",
        }
    }
}

/// SQL: a job not yet finished (pending, claimed, running, or failed with attempts left).
macro_rules! open_job {
    () => {
        "(status IN ('Pending', 'Queued', 'Running') OR (status = 'Failed' AND attempts < max_attempts))"
    };
}
/// [`open_job!`] for other rooms' statements.
pub(crate) const OPEN_JOB_SQL: &str = open_job!();
/// SQL: a job that holds its source (pending, claimed or running).
macro_rules! active_job {
    () => {
        "status IN ('Pending', 'Queued', 'Running')"
    };
}
/// SQL: a dead letter (as the view `embed_worker.failed_jobs` says).
macro_rules! dead_job {
    () => {
        "(status = 'Killed' OR (status = 'Failed' AND attempts >= max_attempts))"
    };
}

/// Enqueues many sources in one statement (in the caller's transaction when `exec` is one).
/// Returns how many jobs were created; sources with a pending job are skipped.
pub async fn enqueue_many<'e>(
    exec: impl PgExecutor<'e>,
    queue: &str,
    max_attempts: i32,
    sources: &[EmbedSource],
) -> sqlx::Result<i64> {
    enqueue_lane(exec, queue, max_attempts, 0, sources).await
}

/// [`enqueue_many`] at `priority` (bulk jobs: below interactive ones' 0). A source whose pending
/// job has a lower priority gets it raised instead.
pub async fn enqueue_lane<'e>(
    exec: impl PgExecutor<'e>,
    queue: &str,
    max_attempts: i32,
    priority: i32,
    sources: &[EmbedSource],
) -> sqlx::Result<i64> {
    let types: Vec<&str> = sources.iter().map(|s| s.source_type.as_str()).collect();
    let ids: Vec<Uuid> = sources.iter().map(|s| s.source_id).collect();
    let n: i32 = sqlx::query_scalar(
        "SELECT embed_worker.enqueue_jobs($1::text[]::embedding_source[], $2, $3, $4, $5)",
    )
    .bind(&types)
    .bind(&ids)
    .bind(queue)
    .bind(max_attempts)
    .bind(priority)
    .fetch_one(exec)
    .await?;
    Ok(n as i64)
}

/// The job type of `queue`'s batch lane (bulk jobs in `bulk.mode = batch`): the sync workers
/// never claim them.
pub fn batch_lane_job_type(queue: &str) -> String {
    format!("{queue}.batch")
}

/// The job type bulk jobs are enqueued into under the configured `bulk.mode`.
pub fn bulk_job_type(s: &Settings) -> String {
    match s.bulk.mode {
        BulkMode::Sync => s.queue.name.clone(),
        BulkMode::Batch => batch_lane_job_type(&s.queue.name),
    }
}

/// Both lanes' job types of `queue`: what counts, dead letters, retention and "open job" checks
/// look at.
pub fn lanes(queue: &str) -> Vec<String> {
    vec![queue.to_string(), batch_lane_job_type(queue)]
}

/// Sources that have an open job in `job_types` (pending, claimed, running, or failed with
/// attempts left: it will be retried): such a source will be embedded by that job. With
/// `among`, only those sources are asked about, by their dedup key (so only jobs that still
/// hold it: pending or claimed, not started).
pub async fn open_sources(
    pool: &PgPool,
    job_types: &[String],
    among: Option<&[EmbedSource]>,
) -> sqlx::Result<std::collections::HashSet<EmbedSource>> {
    let keys: Option<Vec<String>> =
        among.map(|sources| sources.iter().map(EmbedSource::dedup_key).collect());
    let sql = match keys {
        Some(_) => concat!(
            "SELECT p ->> 'source_type', (p ->> 'source_id')::uuid
               FROM (SELECT embed_worker.job_payload(job) AS p FROM apalis.jobs
                      WHERE job_type = ANY($1) AND ",
            active_job!(),
            " AND idempotency_key = ANY($2)) j"
        ),
        None => concat!(
            "SELECT p ->> 'source_type', (p ->> 'source_id')::uuid
               FROM (SELECT embed_worker.job_payload(job) AS p FROM apalis.jobs
                      WHERE job_type = ANY($1) AND ",
            open_job!(),
            ") j WHERE p ->> 'source_id' ~ '^[0-9a-fA-F-]{36}$'"
        ),
    };
    let mut query = sqlx::query_as::<_, (String, Uuid)>(sql).bind(job_types);
    if let Some(keys) = keys {
        query = query.bind(keys);
    }
    let rows = query.fetch_all(pool).await?;
    Ok(rows.into_iter().filter_map(EmbedSource::from_row).collect())
}

/// Claims up to `limit` due bulk jobs of `queue` for the batch lane; those naming a model (a
/// backfill of the writing model) only when the lane `writes_the_writing_model` (a leader left
/// on an older config does not embed the new model's backfill with its own; highest priority,
/// oldest first; `Running`, not locked by an apalis worker: the batch record owns them from here) and
/// clears their dedup keys, as a started sync job's are. Returns (id, payload bytes).
pub async fn claim_batch_jobs(
    pool: &PgPool,
    queue: &str,
    writes_the_writing_model: bool,
    limit: i64,
) -> sqlx::Result<Vec<(String, Vec<u8>)>> {
    sqlx::query_as(
        "WITH due AS (SELECT id FROM apalis.jobs
                       WHERE job_type = $1 AND run_at <= now()
                         AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
                         AND ($3 OR embed_worker.job_payload(job) ->> 'model' IS NULL)
                       ORDER BY priority DESC, run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED)
         UPDATE apalis.jobs j SET status = 'Running', lock_at = now(), lock_by = NULL,
                                  idempotency_key = NULL
           FROM due WHERE j.id = due.id
         RETURNING j.id, j.job",
    )
    .bind(batch_lane_job_type(queue))
    .bind(limit)
    .bind(writes_the_writing_model)
    .fetch_all(pool)
    .await
}

/// Ends jobs no apalis worker acknowledges (the batch lane's) as apalis would: each row gets
/// `status` (`Done`, `Failed` with an attempt used, or `Killed`) and `last_result`, unlocked.
/// The mapping from a job's result to its end is [`crate::job::end_unacked`]'s.
pub async fn end_jobs(pool: &PgPool, ends: &[(String, JobState, String)]) -> sqlx::Result<()> {
    // In parts: one statement of 50,000 rows (a whole batch) held ~80 MB of binds and rows.
    for part in ends.chunks(5000) {
        let by_id: std::collections::HashMap<&str, (&str, &str)> = part
            .iter()
            .map(|(id, st, r)| (id.as_str(), (st.as_str(), r.as_str())))
            .collect();
        let ids: Vec<String> = by_id.keys().map(|id| id.to_string()).collect();
        update_unlocked(pool, &ids, |chunk| {
            let (st, rs): (Vec<&str>, Vec<&str>) =
                chunk.iter().map(|id| by_id[id.as_str()]).unzip();
            async move {
                sqlx::query_as::<_, (String, bool)>(
                    "WITH r AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS r(id, status, result)),
                          locked AS (SELECT j.id FROM apalis.jobs j JOIN r USING (id)
                                      ORDER BY j.id FOR UPDATE OF j SKIP LOCKED)
                     UPDATE apalis.jobs j
                        SET status = r.status, done_at = now(), lock_by = NULL, lock_at = NULL,
                            last_result = jsonb_build_object(CASE WHEN r.status = 'Done' THEN 'Ok' ELSE 'Err' END, r.result),
                            attempts = CASE WHEN r.status = 'Done' THEN j.attempts ELSE j.attempts + 1 END
                       FROM locked, r
                      WHERE j.id = locked.id AND r.id = j.id AND j.status IN ('Queued', 'Running')
                     RETURNING j.id, true",
                )
                .bind(&chunk)
                .bind(&st)
                .bind(&rs)
                .fetch_all(pool)
                .await
            }
        })
        .await?;
    }
    Ok(())
}

/// Moves the batch lane's waiting jobs (pending, or failed with attempts left) into `queue` at
/// `priority`, for the sync workers: after `bulk.mode` went from `batch` to `sync`, nothing
/// else reads `<queue>.batch`. A job whose source already waits in `queue` is ended as
/// superseded (that job embeds it). Returns how many were moved.
pub async fn move_batch_lane_to_sync(
    pool: &PgPool,
    queue: &str,
    priority: i32,
) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "WITH dup AS (SELECT b.id FROM apalis.jobs b
                       WHERE b.job_type = $1 AND b.status = 'Pending' AND b.idempotency_key IS NOT NULL
                         AND EXISTS (SELECT 1 FROM apalis.jobs s WHERE s.job_type = $2
                                        AND s.idempotency_key = b.idempotency_key)
                       ORDER BY b.id FOR UPDATE SKIP LOCKED)
         UPDATE apalis.jobs j SET status = 'Done', done_at = now(), idempotency_key = NULL,
                last_result = jsonb_build_object('Ok', 'superseded: the source waits in the sync lane')
           FROM dup WHERE j.id = dup.id",
    )
    .bind(batch_lane_job_type(queue))
    .bind(queue)
    .execute(&mut *tx)
    .await?;
    let moved = sqlx::query(
        "WITH m AS (SELECT id FROM apalis.jobs
                     WHERE job_type = $1 AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
                     ORDER BY id FOR UPDATE SKIP LOCKED)
         UPDATE apalis.jobs j SET job_type = $2, priority = $3, run_at = least(j.run_at, now())
           FROM m WHERE j.id = m.id",
    )
    .bind(batch_lane_job_type(queue))
    .bind(queue)
    .bind(priority)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(moved)
}

/// Clears the dedup key of jobs that are starting, so later changes queue new jobs. Returns
/// each job's `run_at` (when it became due), for the job-latency metric.
pub async fn start_jobs(
    pool: &PgPool,
    job_ids: &[String],
) -> sqlx::Result<std::collections::HashMap<String, chrono::DateTime<chrono::Utc>>> {
    let rows = update_unlocked(pool, job_ids, |ids| async move {
        sqlx::query_as::<_, (String, chrono::DateTime<chrono::Utc>)>(
            "WITH locked AS (SELECT id FROM apalis.jobs WHERE id = ANY($1)
                              ORDER BY id FOR UPDATE SKIP LOCKED)
             UPDATE apalis.jobs j SET idempotency_key = NULL
               FROM locked WHERE j.id = locked.id
             RETURNING j.id, j.run_at",
        )
        .bind(&ids)
        .fetch_all(pool)
        .await
    })
    .await?;
    Ok(rows.into_iter().collect())
}

/// Runs `update` on the job rows `ids` until each has been handled, never waiting for a row
/// lock, and returns what it returned: one `(id, value)` per row it locked. Ids that no longer
/// exist (pruned or deleted meanwhile) are dropped.
///
/// Why: apalis-postgres claims and acknowledges jobs in one transaction per flush, its claim a
/// multi-row `UPDATE … WHERE id = ANY($1)` in no guaranteed order. Our own multi-row updates of
/// the same rows (clearing the dedup key, releasing, deferring) deadlocked with it, even in one
/// process (docs/decisions.md has the runs). So `update` takes its rows with `FOR UPDATE SKIP LOCKED` (in
/// id order) and returns each row it locked: a statement that never waits while holding a lock
/// cannot be part of a deadlock. Rows apalis holds at that moment are tried again a few
/// milliseconds later, when its short transaction has committed.
pub(crate) async fn update_unlocked<T, F, Fut>(
    pool: &PgPool,
    ids: &[String],
    mut update: F,
) -> sqlx::Result<Vec<(String, T)>>
where
    F: FnMut(Vec<String>) -> Fut,
    Fut: std::future::Future<Output = sqlx::Result<Vec<(String, T)>>>,
{
    let mut remaining: Vec<String> = ids.to_vec();
    remaining.sort();
    remaining.dedup();
    let mut done = Vec::with_capacity(remaining.len());
    let mut pause = std::time::Duration::from_millis(2);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !remaining.is_empty() {
        let rows = update(remaining.clone()).await?;
        let handled: std::collections::HashSet<&str> =
            rows.iter().map(|(id, _)| id.as_str()).collect();
        remaining.retain(|id| !handled.contains(id.as_str()));
        done.extend(rows);
        if remaining.is_empty() {
            break;
        }
        let existing: std::collections::HashSet<String> =
            sqlx::query_scalar("SELECT id FROM apalis.jobs WHERE id = ANY($1)")
                .bind(&remaining)
                .fetch_all(pool)
                .await?
                .into_iter()
                .collect();
        remaining.retain(|id| existing.contains(id));
        if remaining.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(sqlx::Error::Protocol(format!(
                "{} job rows stayed locked for 30 s (first: {})",
                remaining.len(),
                remaining[0]
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_millis(50));
    }
    Ok(done)
}

/// A sample of the queue for the metrics: counts by state, dead letters, and the age in
/// seconds of the oldest job that is due and still pending.
pub async fn sample(pool: &PgPool, queue: &str) -> sqlx::Result<(Vec<(String, i64)>, i64, f64)> {
    let by_state = counts_by_state(pool, queue).await?;
    let (dead, oldest): (i64, f64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM embed_worker.failed_jobs WHERE queue = ANY($2)),
                coalesce((SELECT extract(epoch FROM now() - min(run_at))::float8 FROM apalis.jobs
                           WHERE job_type = $1 AND status = 'Pending' AND run_at <= now()), 0)",
    )
    .bind(queue)
    .bind(lanes(queue))
    .fetch_one(pool)
    .await?;
    Ok((by_state, dead, oldest))
}

/// Job counts by state for one queue (both lanes).
pub async fn counts_by_state(pool: &PgPool, queue: &str) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT status, count(*) FROM apalis.jobs WHERE job_type = ANY($1)
          GROUP BY status ORDER BY status",
    )
    .bind(lanes(queue))
    .fetch_all(pool)
    .await
}

/// Jobs not yet finished in `queue` and its batch lane: pending, claimed, running, or failed
/// with attempts left.
/// A change the app's write recorded and no worker has queued yet counts as an open job.
pub async fn open_jobs(pool: &PgPool, queue: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar(concat!(
        "SELECT (SELECT count(*) FROM embed_worker.captured)
              + (SELECT count(*) FROM apalis.jobs WHERE job_type = ANY($1) AND ",
        open_job!(),
        ")"
    ))
    .bind(lanes(queue))
    .fetch_one(pool)
    .await
}

/// Moves changes recorded by the app's writes (`embed_worker.captured`) into `queue`: one
/// transaction deletes them and queues their jobs. Returns (changes taken, jobs made); a full
/// round (`max_rows`) means more may wait.
pub async fn drain_captured(
    pool: &PgPool,
    queue: &str,
    max_attempts: i32,
    max_rows: i32,
) -> sqlx::Result<(i64, i32)> {
    sqlx::query_as("SELECT changes, queued FROM embed_worker.drain_captured($1, $2, $3)")
        .bind(queue)
        .bind(max_attempts)
        .bind(max_rows)
        .fetch_one(pool)
        .await
}

/// Every session and template.
pub async fn all_sources(pool: &PgPool) -> sqlx::Result<Vec<EmbedSource>> {
    let sql = SourceType::ALL
        .iter()
        .map(|t| format!("SELECT '{}', id FROM {}", t.as_str(), t.table()))
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let rows: Vec<(String, Uuid)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().filter_map(EmbedSource::from_row).collect())
}

/// Gives claimed jobs back to the queue untouched (no attempt used), claimable again after
/// `after`. Used for jobs a stopping worker had claimed but not started, and while API calls are
/// stopped. `after` is at least 2 s so that a lock event apalis may still flush for them (it only
/// locks jobs whose `run_at` has passed) cannot re-claim them; apalis's own acknowledgement then
/// finds the job no longer locked by this worker and changes nothing.
pub async fn release_jobs(
    pool: &PgPool,
    job_ids: &[String],
    after: std::time::Duration,
    reason: &str,
) -> sqlx::Result<u64> {
    if job_ids.is_empty() {
        return Ok(0);
    }
    let after = after.max(std::time::Duration::from_secs(2));
    let rows = update_unlocked(pool, job_ids, |ids| async move {
        sqlx::query_as::<_, (String, bool)>(
            "WITH locked AS (SELECT id FROM apalis.jobs WHERE id = ANY($1)
                              ORDER BY id FOR UPDATE SKIP LOCKED),
                  released AS (
                    UPDATE apalis.jobs j
                       SET status = 'Pending', lock_by = NULL, lock_at = NULL,
                           run_at = now() + make_interval(secs => $2),
                           last_result = jsonb_build_object('Err', $3::text)
                      FROM locked
                     WHERE j.id = locked.id AND j.status IN ('Queued', 'Running')
                    RETURNING j.id)
             SELECT l.id, r.id IS NOT NULL FROM locked l LEFT JOIN released r USING (id)",
        )
        .bind(&ids)
        .bind(after.as_secs_f64())
        .bind(reason)
        .fetch_all(pool)
        .await
    })
    .await?;
    Ok(rows.iter().filter(|(_, released)| *released).count() as u64)
}

/// Pushes the next try of failing jobs into the future: exponential backoff by attempt with full
/// jitter (apalis-postgres itself would re-fetch a failed job at once).
pub async fn defer_retries(
    pool: &PgPool,
    job_ids: &[String],
    base_secs: u64,
    cap_secs: u64,
) -> sqlx::Result<()> {
    if job_ids.is_empty() {
        return Ok(());
    }
    update_unlocked(pool, job_ids, |ids| async move {
        sqlx::query_as::<_, (String, bool)>(
            "WITH locked AS (SELECT id FROM apalis.jobs WHERE id = ANY($1)
                              ORDER BY id FOR UPDATE SKIP LOCKED)
             UPDATE apalis.jobs j
                SET run_at = now() + make_interval(secs => random() * least($3::float8, $2::float8 * power(2, least(attempts, 20))))
               FROM locked WHERE j.id = locked.id
             RETURNING j.id, true",
        )
        .bind(&ids)
        .bind(base_secs as f64)
        .bind(cap_secs as f64)
        .fetch_all(pool)
        .await
    })
    .await?;
    Ok(())
}

/// A dead letter as `embed_worker.failed_jobs` shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FailedJob {
    /// Job id.
    pub id: String,
    /// From the payload, if readable.
    pub source_type: Option<String>,
    /// From the payload, if readable.
    pub source_id: Option<String>,
    /// `Killed` or `Failed`.
    pub status: String,
    /// Attempts used.
    pub attempts: i32,
    /// Attempts allowed.
    pub max_attempts: i32,
    /// The reason.
    pub last_error: Option<String>,
    /// When.
    pub failed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The latest dead letters of a queue (both lanes).
pub async fn failed_jobs(pool: &PgPool, queue: &str, limit: i64) -> sqlx::Result<Vec<FailedJob>> {
    sqlx::query_as(
        "SELECT id, source_type, source_id, status, attempts, max_attempts, last_error, failed_at
           FROM embed_worker.failed_jobs WHERE queue = ANY($1)
          ORDER BY failed_at DESC NULLS LAST LIMIT $2",
    )
    .bind(lanes(queue))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Puts dead letters back in the queue with fresh attempts. Jobs whose payload is unreadable
/// stay dead (re-running them cannot succeed). Returns how many were re-queued.
pub async fn retry_failed(
    pool: &PgPool,
    queue: &str,
    source_type: Option<SourceType>,
    since: Option<chrono::DateTime<chrono::Utc>>,
) -> sqlx::Result<u64> {
    let r = sqlx::query(
        "UPDATE apalis.jobs j
            SET status = 'Pending', attempts = 0, run_at = now(), done_at = NULL,
                lock_by = NULL, lock_at = NULL
           FROM embed_worker.failed_jobs f
          WHERE j.id = f.id AND f.queue = ANY($1) AND f.source_type IS NOT NULL
            AND ($2::text IS NULL OR f.source_type = $2)
            AND ($3::timestamptz IS NULL OR f.failed_at >= $3)",
    )
    .bind(lanes(queue))
    .bind(source_type.map(|t| t.as_str()))
    .bind(since)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}

/// Retention: apalis never deletes finished jobs. Deletes `Done` jobs older than `done_age`
/// and dead letters older than `failed_age`. Returns (done, failed) deleted.
pub async fn prune_finished(
    pool: &PgPool,
    queue: &str,
    done_age: std::time::Duration,
    failed_age: std::time::Duration,
) -> sqlx::Result<(u64, u64)> {
    let done = sqlx::query(
        "DELETE FROM apalis.jobs WHERE job_type = ANY($1) AND status = 'Done'
            AND done_at < now() - make_interval(secs => $2)",
    )
    .bind(lanes(queue))
    .bind(done_age.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    // The predicate of the view embed_worker.failed_jobs, written out: joined with the view,
    // a plan made while apalis.jobs had just been refilled (stale statistics) became a nested
    // loop of sequential scans that ran for minutes at worker start (docs/decisions.md); one
    // table, one scan.
    let failed = sqlx::query(concat!(
        "DELETE FROM apalis.jobs WHERE job_type = ANY($1) AND ",
        dead_job!(),
        " AND coalesce(done_at, lock_at, run_at) < now() - make_interval(secs => $2)"
    ))
    .bind(lanes(queue))
    .bind(failed_age.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected();
    Ok((done, failed))
}
