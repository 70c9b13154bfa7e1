//! Job: what a claimed job is, how it can end, and what happens to it when it fails.
//!
//! Why its own module: these types are the contract between the queue (apalis), the batcher
//! and the pipeline. States, as River spells them out: a job the pipeline finished well has a
//! [`JobOutcome`] (apalis marks it `Done` with the outcome as its result); one that did not has a
//! [`JobError`] whose [`Disposition`] decides, in one place ([`settle`] for the queue rows and
//! [`JobError::report`] for apalis), whether it is retried with backoff, given back untouched, or
//! killed as a dead letter.

use std::collections::HashMap;
use std::time::Duration;

use crate::embed::EmbedError;
use crate::source::EmbedSource;

/// A claimed job: its apalis id and its payload.
#[derive(Debug, Clone)]
pub struct Job {
    /// apalis's job id.
    pub id: String,
    /// Which source to embed.
    pub source: EmbedSource,
    /// The model it is for, when it names one (backfill and stale jobs: migration 25); `None`
    /// (change capture, the app's enqueue) is for whatever the handling worker writes.
    pub model: Option<String>,
}

/// A job's payload: its source, and the model when it names one.
#[derive(serde::Deserialize)]
struct Payload {
    #[serde(flatten)]
    source: EmbedSource,
    #[serde(default)]
    model: Option<String>,
}

impl Job {
    /// The job `id` whose payload is `payload`; a payload of the wrong shape is this job's
    /// permanent failure, with the payload in its reason (both lanes decode jobs here).
    pub fn from_payload(id: String, payload: &serde_json::Value) -> Result<Job, JobError> {
        match serde_json::from_value::<Payload>(payload.clone()) {
            Ok(p) => Ok(Job {
                id,
                source: p.source,
                model: p.model,
            }),
            Err(e) => Err(JobError::dead(format!("bad job payload {payload}: {e}"))),
        }
    }

    /// [`Job::from_payload`] from the payload's stored bytes (the batch lane claims them raw:
    /// a `serde_json::Value` per job was 50 MB for a 50,000-job batch).
    pub fn from_bytes(id: String, payload: &[u8]) -> Result<Job, JobError> {
        match serde_json::from_slice::<Payload>(payload) {
            Ok(p) => Ok(Job {
                id,
                source: p.source,
                model: p.model,
            }),
            Err(_) => {
                let value = serde_json::from_slice(payload).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(payload).into())
                });
                Job::from_payload(id, &value)
            }
        }
    }
}

/// Each job's result from its source's (the pipeline answers per source; apalis and the batch
/// lane per job): the one re-keying both lanes use. A job whose source has no answer yet is
/// left out.
pub fn by_job<'a>(
    jobs: impl IntoIterator<Item = (&'a str, EmbedSource)>,
    by_source: &HashMap<EmbedSource, JobResult>,
) -> HashMap<String, JobResult> {
    jobs.into_iter()
        .filter_map(|(id, src)| Some((id.to_string(), by_source.get(&src)?.clone())))
        .collect()
}

/// How a job ended, when it ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(missing_docs)] // chunks, embedded, tokens: counts, as `Display` prints them
pub enum JobOutcome {
    /// New vectors written for `embedded` of `chunks` chunks.
    Embedded {
        chunks: usize,
        embedded: usize,
        tokens: usize,
    },
    /// Every chunk's content hash matched: no API call.
    Unchanged { chunks: usize },
    /// The source was deleted before its job ran.
    SourceGone,
    /// Nothing to embed (empty or whitespace-only text); stored chunks were removed.
    SkippedEmpty,
    /// The source changed while this job ran; a newer job was queued for it.
    Superseded,
}

impl JobOutcome {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            JobOutcome::Embedded { .. } => "embedded",
            JobOutcome::Unchanged { .. } => "unchanged",
            JobOutcome::SourceGone => "source_gone",
            JobOutcome::SkippedEmpty => "skipped_empty",
            JobOutcome::Superseded => "superseded",
        }
    }
}

impl std::fmt::Display for JobOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobOutcome::Embedded {
                chunks,
                embedded,
                tokens,
            } => {
                write!(f, "embedded {embedded}/{chunks} chunks ({tokens} tokens)")
            }
            JobOutcome::Unchanged { chunks } => {
                write!(f, "unchanged ({chunks} chunks, no API call)")
            }
            JobOutcome::SourceGone => f.write_str("source gone"),
            JobOutcome::SkippedEmpty => f.write_str("skipped: empty text"),
            JobOutcome::Superseded => f.write_str("superseded by a newer change (re-queued)"),
        }
    }
}

/// What happens to a job that did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)] // after: when the job may be claimed again
pub enum Disposition {
    /// Try again later, backing off by attempt; after `max_attempts` it is a dead letter.
    Retry,
    /// Put back untouched (no attempt used), claimable again after `after`.
    Release { after: std::time::Duration },
    /// Permanent: a dead letter now, with its reason.
    Dead,
}

/// Why a job failed and what to do about it. The reason is stored in `apalis.jobs.last_result`
/// and logged, so anything secret-shaped in it is masked when it is made.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct JobError {
    /// Why (stored as the job's result).
    pub reason: String,
    /// What happens to the job.
    pub disposition: Disposition,
}

impl JobError {
    /// What a failed request means for the jobs whose inputs were in it. `quota_recheck` is
    /// when a job stopped by the provider's quota or a refused key is due again; `stopped_for`
    /// how long API calls stay stopped (whichever guard stopped them), so the probe's success
    /// finds the job due.
    pub fn from_embed(e: &EmbedError, quota_recheck: Duration, stopped_for: Duration) -> Self {
        match e {
            EmbedError::InvalidInput { .. } => {
                JobError::dead(format!("input rejected by the provider: {e}"))
            }
            // A vector of the wrong size or with NaN: sending it again cannot fix it.
            EmbedError::BadVector { .. } => JobError::dead(e.to_string()),
            // Back to the queue untouched (no attempt used) until the quota or key is checked.
            EmbedError::QuotaExhausted { .. } | EmbedError::Unauthorized { .. } => {
                JobError::release(e.to_string(), quota_recheck)
            }
            EmbedError::Stopped { .. } => JobError::release(e.to_string(), stopped_for),
            _ => JobError::retry(e.to_string()),
        }
    }

    /// A retryable failure.
    pub fn retry(reason: impl Into<String>) -> Self {
        JobError {
            reason: crate::redact::secrets(&reason.into(), None),
            disposition: Disposition::Retry,
        }
    }
    /// Given back untouched, claimable after `after`.
    pub fn release(reason: impl Into<String>, after: std::time::Duration) -> Self {
        JobError {
            reason: crate::redact::secrets(&reason.into(), None),
            disposition: Disposition::Release { after },
        }
    }
    /// A permanent failure (dead letter).
    pub fn dead(reason: impl Into<String>) -> Self {
        JobError {
            reason: crate::redact::secrets(&reason.into(), None),
            disposition: Disposition::Dead,
        }
    }
}

/// How a job ended.
pub type JobResult = Result<JobOutcome, JobError>;

impl Disposition {
    /// The metric label of a job that ended this way.
    pub fn label(&self) -> &'static str {
        match self {
            Disposition::Retry => "retry",
            Disposition::Release { .. } => "released",
            Disposition::Dead => "dead",
        }
    }
}

impl JobError {
    /// What apalis records for this job, logged once at the level its disposition deserves:
    /// released (debug; the row was already put back by [`settle`]), retried (warn; apalis
    /// counts the attempt), dead (error; an `AbortError` makes it `Killed`).
    pub fn report(self, job: &Job) -> apalis::prelude::BoxDynError {
        let (source_type, source) = (job.source.source_type, job.source.source_id);
        match self.disposition {
            Disposition::Release { .. } => {
                tracing::debug!(job = %job.id, reason = %self.reason, "job released");
                self.into()
            }
            Disposition::Retry => {
                tracing::warn!(job = %job.id, %source_type, %source, reason = %self.reason,
                    "job failed; will retry");
                self.into()
            }
            Disposition::Dead => {
                tracing::error!(job = %job.id, %source_type, %source, reason = %self.reason,
                    "job failed permanently (dead letter)");
                apalis::prelude::AbortError::new(self).into()
            }
        }
    }
}

/// Applies what failed jobs' dispositions ask of the queue, in bulk, before apalis acknowledges
/// them: released jobs go back untouched; retried jobs get their backoff.
pub async fn settle(
    pool: &sqlx::PgPool,
    retry: &crate::config::RetrySettings,
    results: &HashMap<String, JobResult>,
) {
    let mut releases: HashMap<(Duration, String), Vec<String>> = Default::default();
    let mut retries = Vec::new();
    for (id, r) in results {
        if let Err(e) = r {
            match e.disposition {
                Disposition::Release { after } => releases
                    .entry((after, e.reason.clone()))
                    .or_default()
                    .push(id.clone()),
                Disposition::Retry => retries.push(id.clone()),
                Disposition::Dead => {}
            }
        }
    }
    for ((after, reason), ids) in releases {
        if let Err(e) = crate::queue::release_jobs(pool, &ids, after, &reason).await {
            tracing::warn!(error = %e, "could not release jobs; they will be rescued after the heartbeat timeout");
        }
    }
    if let Err(e) = crate::queue::defer_retries(
        pool,
        &retries,
        retry.job_backoff_base_secs,
        retry.job_backoff_cap_secs,
    )
    .await
    {
        tracing::warn!(error = %e, "could not defer retries; they will be retried at once");
    }
}

/// Ends jobs no apalis worker will acknowledge (the batch lane's), as apalis would: done →
/// `Done`; dead → `Killed`; retry → `Failed` with an attempt used; release → back to `Pending`.
/// Releases and retry backoff go through [`settle`], as on the sync path, so both lanes' acks
/// are decided here.
pub async fn end_unacked(
    pool: &sqlx::PgPool,
    retry: &crate::config::RetrySettings,
    results: &HashMap<String, JobResult>,
) -> sqlx::Result<()> {
    use crate::queue::JobState;
    settle(pool, retry, results).await;
    let ends: Vec<(String, JobState, String)> = results
        .iter()
        .filter_map(|(id, r)| {
            let (state, result) = match r {
                Ok(outcome) => (JobState::Done, outcome.to_string()),
                Err(e) => match e.disposition {
                    Disposition::Dead => (JobState::Killed, e.reason.clone()),
                    Disposition::Retry => (JobState::Failed, e.reason.clone()),
                    Disposition::Release { .. } => return None,
                },
            };
            Some((id.clone(), state, result))
        })
        .collect();
    crate::queue::end_jobs(pool, &ends).await
}
