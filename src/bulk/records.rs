//! The batch records (`embed_worker.batches`, `embed_worker.batch_items`): what was submitted,
//! written before the provider hears of it, so that any process can resume it.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::guard::budget::Reservation;
use crate::source::{EmbedSource, SourceType};

/// A batch's state as recorded (`embed_worker.batches.state`): `preparing` (recorded with its
/// items, the file maybe uploaded) → `submitted` (the provider has it) → one of the four ends,
/// named as the provider names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchState {
    /// Recorded; not yet created at the provider.
    Preparing,
    /// Created at the provider; its jobs are `Running`, owned by the record.
    Submitted,
    /// Every request ran.
    Completed,
    /// The completion window passed first.
    Expired,
    /// The provider refused or failed the batch.
    Failed,
    /// Cancelled (by `embed-worker batches cancel` or at the provider).
    Cancelled,
    /// Ended by the operator (`embed-worker batches abandon`), whatever the provider says.
    Abandoned,
}

impl BatchState {
    /// The word stored in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Preparing => "preparing",
            BatchState::Submitted => "submitted",
            BatchState::Completed => "completed",
            BatchState::Expired => "expired",
            BatchState::Failed => "failed",
            BatchState::Cancelled => "cancelled",
            BatchState::Abandoned => "abandoned",
        }
    }
}

impl std::fmt::Display for BatchState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for BatchState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl TryFrom<String> for BatchState {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Ok(match s.as_str() {
            "preparing" => BatchState::Preparing,
            "submitted" => BatchState::Submitted,
            "completed" => BatchState::Completed,
            "expired" => BatchState::Expired,
            "failed" => BatchState::Failed,
            "cancelled" => BatchState::Cancelled,
            "abandoned" => BatchState::Abandoned,
            other => return Err(format!("unknown batch state {other:?}")),
        })
    }
}

/// One batch as recorded.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchRecord {
    /// Our id; also in the provider's metadata, which is how a restart finds the batch.
    pub id: i64,
    /// The provider's batch id, once created.
    pub provider_id: Option<String>,
    /// Where it is in its life.
    #[sqlx(try_from = "String")]
    pub state: BatchState,
    /// The provider's last status.
    pub provider_status: Option<String>,
    /// `embedding_model`.
    pub model: String,
    /// The uploaded JSONL.
    pub input_file_id: Option<String>,
    /// The provider's output file (answered lines), once the batch ended.
    pub output_file_id: Option<String>,
    /// The provider's error file (failed lines), if any.
    pub error_file_id: Option<String>,
    /// Request lines.
    pub requests: i32,
    /// Embedding inputs.
    pub inputs: i32,
    /// Tokens by our count.
    pub tokens_estimate: i64,
    /// Reserved against the monthly budget.
    pub usd_reserved: f64,
    /// The budget month of the reservation.
    pub spend_month: NaiveDate,
    /// Tokens the provider billed.
    pub tokens_billed: Option<i64>,
    /// Their cost at the batch price.
    pub usd_billed: Option<f64>,
    /// The provider's `request_counts`.
    pub request_counts: Option<serde_json::Value>,
    /// Why it failed, or the first error lines; while open, the last operation's error.
    pub last_error: Option<String>,
    /// Consecutive rounds whose operation on it failed transiently (it is ended at 5).
    pub failures: i32,
    /// Times it was created again after the provider failed it for a transient reason.
    pub resubmits: i32,
    /// Not created again before this.
    pub retry_at: Option<DateTime<Utc>>,
    /// When it was recorded (before the provider heard of it).
    pub created_at: DateTime<Utc>,
    /// Created at the provider.
    pub submitted_at: Option<DateTime<Utc>>,
    /// Set once its results are written and every job has ended; `None` while open.
    pub finished_at: Option<DateTime<Utc>>,
}

impl BatchRecord {
    /// What it reserved of the monthly budget (settled when it ends).
    pub fn reservation(&self) -> Reservation {
        Reservation {
            month: self.spend_month,
            usd: self.usd_reserved,
        }
    }
}

/// This database's installation id (`embed_worker.installation`, made by `migrate`): every
/// batch it creates carries it, and only a batch carrying it is ever adopted.
pub async fn installation(pool: &PgPool) -> anyhow::Result<Uuid> {
    use anyhow::Context;
    sqlx::query_scalar("SELECT id FROM embed_worker.installation")
        .fetch_one(pool)
        .await
        .context("reading embed_worker.installation (run `embed-worker migrate`)")
}

const COLUMNS: &str = "id, provider_id, state, provider_status, model, input_file_id, \
    output_file_id, error_file_id, requests, inputs, tokens_estimate, \
    usd_reserved::float8 AS usd_reserved, spend_month, tokens_billed, usd_billed::float8 AS usd_billed, \
    request_counts, last_error, failures, resubmits, retry_at, created_at, submitted_at, finished_at";

/// One chunk of one source in a batch.
#[derive(Debug, Clone)]
pub struct Item {
    /// The job that asked for the source.
    pub job_id: String,
    /// The source.
    pub source: EmbedSource,
    /// `updated_at` of the text that was chunked (newest wins at the write).
    pub read_at: DateTime<Utc>,
    /// Chunk index.
    pub chunk_index: i32,
    /// The chunk's hash.
    pub content_hash: String,
    /// Its tokens.
    pub tokens: i32,
    /// The request line; `None` for a chunk that was not sent (unchanged).
    pub custom_id: Option<String>,
    /// The input's position in that request.
    pub position: Option<i32>,
}

/// What a new record says.
pub struct NewBatch<'a> {
    /// `embedding_model`.
    pub model: &'a str,
    /// Request lines.
    pub requests: usize,
    /// Inputs.
    pub inputs: usize,
    /// Tokens by our count.
    pub tokens: u64,
    /// What the batch reserved of the monthly budget.
    pub reserved: Reservation,
}

/// Records a batch and its items in one transaction; returns its id.
pub async fn insert(pool: &PgPool, b: &NewBatch<'_>, items: &[Item]) -> sqlx::Result<i64> {
    let mut tx = pool.begin().await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO embed_worker.batches (model, requests, inputs, tokens_estimate, usd_reserved, spend_month)
         VALUES ($1, $2, $3, $4, $5::float8::numeric, $6) RETURNING id",
    )
    .bind(b.model)
    .bind(b.requests as i32)
    .bind(b.inputs as i32)
    .bind(b.tokens as i64)
    .bind(b.reserved.usd)
    .bind(b.reserved.month)
    .fetch_one(&mut *tx)
    .await?;
    for part in items.chunks(5000) {
        sqlx::query(
            "INSERT INTO embed_worker.batch_items (batch_id, job_id, source_type, source_id, read_at,
                 chunk_index, content_hash, tokens, custom_id, position)
             SELECT $1, * FROM unnest($2::text[], $3::text[]::embedding_source[], $4::uuid[],
                 $5::timestamptz[], $6::int[], $7::text[], $8::int[], $9::text[], $10::int[])",
        )
        .bind(id)
        .bind(part.iter().map(|i| i.job_id.clone()).collect::<Vec<_>>())
        .bind(part.iter().map(|i| i.source.source_type.as_str()).collect::<Vec<_>>())
        .bind(part.iter().map(|i| i.source.source_id).collect::<Vec<_>>())
        .bind(part.iter().map(|i| i.read_at).collect::<Vec<_>>())
        .bind(part.iter().map(|i| i.chunk_index).collect::<Vec<_>>())
        .bind(part.iter().map(|i| i.content_hash.clone()).collect::<Vec<_>>())
        .bind(part.iter().map(|i| i.tokens).collect::<Vec<_>>())
        .bind(part.iter().map(|i| i.custom_id.clone()).collect::<Vec<_>>())
        .bind(part.iter().map(|i| i.position).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(id)
}

/// The uploaded input file.
pub async fn set_file(pool: &PgPool, id: i64, file_id: &str) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE embed_worker.batches SET input_file_id = $2, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(file_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Created at the provider.
pub async fn set_submitted(
    pool: &PgPool,
    id: i64,
    provider_id: &str,
    status: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE embed_worker.batches SET provider_id = $2, provider_status = $3, state = 'submitted',
                submitted_at = now(), updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(provider_id)
    .bind(status)
    .execute(pool)
    .await?;
    Ok(())
}

/// What the provider says now.
pub async fn set_status(
    pool: &PgPool,
    id: i64,
    status: &str,
    counts: Option<serde_json::Value>,
    output_file_id: Option<&str>,
    error_file_id: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE embed_worker.batches SET provider_status = $2, request_counts = $3,
                output_file_id = coalesce($4, output_file_id), error_file_id = coalesce($5, error_file_id),
                updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(counts)
    .bind(output_file_id)
    .bind(error_file_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// An operation on an open batch failed transiently: remembered with its reason. Returns the
/// consecutive failures so far.
pub async fn note_failure(pool: &PgPool, id: i64, error: &str) -> sqlx::Result<i32> {
    sqlx::query_scalar(
        "UPDATE embed_worker.batches SET failures = failures + 1, last_error = $2, updated_at = now()
          WHERE id = $1 RETURNING failures",
    )
    .bind(id)
    .bind(error)
    .fetch_one(pool)
    .await
}

/// A round whose operations on the batch went through: its failure count starts again.
pub async fn clear_failures(pool: &PgPool, id: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE embed_worker.batches SET failures = 0, updated_at = now() WHERE id = $1 AND failures > 0",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// The provider failed the batch for a transient reason: back to `preparing` (the file kept),
/// to be created again after `after`.
pub async fn resubmit(
    pool: &PgPool,
    id: i64,
    after: std::time::Duration,
    why: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE embed_worker.batches
            SET state = 'preparing', provider_id = NULL, provider_status = NULL, request_counts = NULL,
                output_file_id = NULL, error_file_id = NULL, resubmits = resubmits + 1,
                retry_at = now() + make_interval(secs => $2), last_error = $3, updated_at = now()
          WHERE id = $1 AND finished_at IS NULL",
    )
    .bind(id)
    .bind(after.as_secs_f64())
    .bind(why)
    .execute(pool)
    .await?;
    Ok(())
}

/// Results written and jobs settled: the end state, what was billed, and why it failed if it did.
/// Returns false when it was already closed (by another process, or abandoned meanwhile).
pub async fn close(
    pool: &PgPool,
    id: i64,
    state: BatchState,
    tokens_billed: i64,
    usd_billed: f64,
    last_error: Option<&str>,
) -> sqlx::Result<bool> {
    // The items were needed until now (a collect that died is redone from them); the record
    // stays for `embed-worker batches` until retention.
    let mut tx = pool.begin().await?;
    let closed = sqlx::query(
        "UPDATE embed_worker.batches SET state = $2, tokens_billed = $3, usd_billed = $4::float8::numeric,
                last_error = $5, finished_at = now(), updated_at = now()
          WHERE id = $1 AND finished_at IS NULL",
    )
    .bind(id)
    .bind(state.as_str())
    .bind(tokens_billed)
    .bind(usd_billed)
    .bind(last_error)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    sqlx::query("DELETE FROM embed_worker.batch_items WHERE batch_id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(closed)
}

/// Retention: finished records older than `age`. Returns how many were deleted.
pub async fn prune(pool: &PgPool, age: std::time::Duration) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM embed_worker.batches
          WHERE finished_at < now() - make_interval(secs => $1)",
    )
    .bind(age.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}

/// A record whose file never reached the provider: gone (its jobs are released by the caller).
pub async fn delete(pool: &PgPool, id: i64) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM embed_worker.batches WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// Records not finished, oldest first.
pub async fn open(pool: &PgPool) -> sqlx::Result<Vec<BatchRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM embed_worker.batches WHERE finished_at IS NULL ORDER BY id"
    )))
    .fetch_all(pool)
    .await
}

/// The newest `limit` records.
pub async fn list(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<BatchRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM embed_worker.batches ORDER BY id DESC LIMIT $1"
    )))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// One record.
pub async fn get(pool: &PgPool, id: i64) -> sqlx::Result<Option<BatchRecord>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM embed_worker.batches WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Every item of a batch, by source then chunk.
pub async fn items(pool: &PgPool, id: i64) -> sqlx::Result<Vec<Item>> {
    type Row = (
        String,
        String,
        Uuid,
        DateTime<Utc>,
        i32,
        String,
        i32,
        Option<String>,
        Option<i32>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT job_id, source_type::text, source_id, read_at, chunk_index, content_hash, tokens,
                custom_id, position
           FROM embed_worker.batch_items WHERE batch_id = $1
          ORDER BY source_type, source_id, chunk_index",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(
            |(job_id, t, sid, read_at, chunk_index, content_hash, tokens, custom_id, position)| {
                Some(Item {
                    job_id,
                    source: EmbedSource {
                        source_type: t.parse::<SourceType>().ok()?,
                        source_id: sid,
                    },
                    read_at,
                    chunk_index,
                    content_hash,
                    tokens,
                    custom_id,
                    position,
                })
            },
        )
        .collect())
}

/// Records by state (finished ones of the last day) and the age in seconds of the oldest
/// record not yet finished, for the metrics.
pub async fn sample(pool: &PgPool) -> sqlx::Result<(Vec<(String, i64)>, f64)> {
    let by_state: Vec<(String, i64)> = sqlx::query_as(
        "SELECT state, count(*) FROM embed_worker.batches
          WHERE finished_at IS NULL OR finished_at > now() - interval '1 day' GROUP BY 1",
    )
    .fetch_all(pool)
    .await?;
    let oldest: f64 = sqlx::query_scalar(
        "SELECT coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8
           FROM embed_worker.batches WHERE finished_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok((by_state, oldest))
}
