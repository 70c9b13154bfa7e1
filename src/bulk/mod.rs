//! The bulk lane: backfills and stale re-embeds, which need no answer within seconds.
//!
//! Two lanes share one queue name. Interactive jobs (change capture, `enqueue`) have priority 0
//! in `<queue>`. Bulk jobs (`backfill`, `enqueue-stale`, the periodic stale scan) go, by
//! `bulk.mode`, either into `<queue>` at `bulk.priority` (sync: the embeddings endpoint, claimed
//! only when no interactive job is due), or into `<queue>.batch` (batch: OpenAI's Batch API,
//! billed at half price from a separate rate-limit pool), which no apalis worker claims.
//!
//! The batch lane, one leader across replicas (a lease, [`crate::db::locks::Lease`]), every `bulk.poll_secs`:
//! 1. resume: records left `preparing` by a dead submitter, or by a transient failure at the
//!    provider (`submit`);
//! 2. poll: each submitted batch; an ended one is collected (`collect`);
//! 3. submit: due bulk jobs → one batch (`submit`), while fewer than `bulk.max_open_batches`
//!    are open and the budget allows; in `bulk.mode = sync` nothing is submitted and the
//!    lane's waiting jobs move to the sync queue instead (open batches are still collected).
//!
//! Each batch is on its own: an error in one batch's call is that batch's. A permanent one
//! (the provider refused the create, its output file is gone, its answer cannot be read) ends
//! the batch at once; a transient one (unreachable, 5xx) is counted and ends it at the fifth
//! round in a row. An ended batch's jobs are retried with an attempt used (dead letters after
//! `queue.max_attempts`) with the reason, its reservation stands as spent once the provider had
//! it, and the lane goes on with the other batches. `embed-worker batches abandon ID` ends one
//! by hand whatever the provider says (its jobs released, no attempt used).
//!
//! Batch states as recorded (`embed_worker.batches`): `preparing` (recorded with its items,
//! the file maybe uploaded) → `submitted` (the provider has it; its jobs stay `Running`, owned
//! by the record) → `completed` | `expired` | `failed` | `cancelled`, and `finished_at` once its
//! results are written and every job has ended. A restart resumes polling; a batch is never
//! created twice (its record id is in the provider's metadata and looked up before creating).

pub(crate) mod client;
mod collect;
pub mod records;
mod submit;

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;

use crate::config::{BulkMode, Settings};
use crate::db::locks::Lease;
use crate::guard::budget::Budget;
use crate::job::{JobError, JobResult};
use crate::pipeline::Pipeline;

use client::BatchError;
use records::{BatchRecord, BatchState};

/// The batch lane leader's lease in `embed_worker.leases`.
const LEADER_LEASE: &str = "batch-leader";
/// Rounds in a row a batch's call may fail transiently before the batch is ended.
const MAX_FAILURES: i32 = 5;
/// Times a batch the provider failed for a transient reason is created again.
const MAX_RESUBMITS: i32 = 3;

/// What the batch lane works with.
pub struct Lane {
    pool: PgPool,
    settings: Arc<Settings>,
    pipeline: Arc<Pipeline>,
    client: client::BatchClient,
    /// The monthly budget at the batch price (spend recorded as `<model> (batch)`).
    budget: Budget,
}

impl Lane {
    /// The lane of `pipeline`'s process.
    pub fn new(pipeline: Arc<Pipeline>) -> anyhow::Result<Lane> {
        let settings = pipeline.settings.clone();
        Ok(Lane {
            pool: pipeline.pool.clone(),
            client: client::BatchClient::new(&settings.api)?,
            budget: pipeline.batch_budget(),
            settings,
            pipeline,
        })
    }

    /// One round: resume, poll, then submit while there is room and work (batch mode) or move
    /// the lane's waiting jobs to the sync queue (sync mode).
    pub async fn tick(&self) -> anyhow::Result<()> {
        self.resume().await?;
        self.poll().await?;
        match self.settings.bulk.mode {
            BulkMode::Batch => while self.submit().await?.is_some() {},
            BulkMode::Sync => {
                let s = &self.settings;
                let moved = crate::queue::move_batch_lane_to_sync(
                    &self.pool,
                    &s.queue.name,
                    s.bulk.priority,
                )
                .await?;
                if moved > 0 {
                    tracing::info!(
                        moved,
                        "bulk.mode = sync: the batch lane's waiting jobs moved to the sync queue"
                    );
                }
            }
        }
        Ok(())
    }

    /// A call of batch `rec` failed: a database error fails the round; a provider error is the
    /// batch's own — permanent ends it now, transient is counted and ends it at
    /// [`MAX_FAILURES`] rounds in a row.
    async fn isolate(&self, rec: &BatchRecord, e: anyhow::Error) -> anyhow::Result<()> {
        let Some(be) = e.downcast_ref::<BatchError>() else {
            return Err(e);
        };
        let (permanent, why) = match be {
            BatchError::Permanent(m) => (true, m.clone()),
            BatchError::Transient(m) => (false, m.clone()),
        };
        let failures = if permanent {
            MAX_FAILURES
        } else {
            records::note_failure(&self.pool, rec.id, &why).await?
        };
        if failures < MAX_FAILURES {
            tracing::warn!(batch = rec.id, failures, error = %why, "batch call failed; trying again next round");
            return Ok(());
        }
        tracing::error!(batch = rec.id, permanent, error = %why, "batch ended: its jobs are retried");
        end_batch(
            &self.pool,
            &self.settings,
            &self.client,
            &batch_budget(&self.pool, &self.settings, rec).await?,
            rec,
            BatchState::Failed,
            &format!("batch {} ended: {why}", rec.id),
        )
        .await?;
        Ok(())
    }

    /// Runs rounds every `bulk.poll_secs` until `stop`, while this process holds the lane's
    /// lease (`batch-leader`). A leader that dies is replaced once its lease lapses: four
    /// rounds, at least 10 s, which is nothing against a batch's 24-hour window.
    pub async fn lead(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let poll = Duration::from_secs(self.settings.bulk.poll_secs);
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let lease = Lease::new(LEADER_LEASE, (poll * 4).max(Duration::from_secs(10)));
        let _renewing = lease.keep(&self.pool);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|v| *v) => break,
            }
            let leading = match lease.hold(&self.pool, None).await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(error = %e, "batch lane: the leader lease could not be read");
                    false
                }
            };
            if let Ok((by_state, oldest)) = records::sample(&self.pool).await {
                crate::meter::batches(&by_state, oldest);
            }
            if !leading {
                continue;
            }
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %format!("{e:#}"), "batch lane round failed; trying again next round");
            }
        }
        // Another replica leads from its next round, not after the lease lapses.
        lease.release(&self.pool).await;
    }
}

/// `embed-worker batches`: one line per recent batch.
pub struct BatchTable(pub Vec<records::BatchRecord>);

impl std::fmt::Display for BatchTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:>5} {:<22} {:<11} {:>15} {:>9} {:>11} {:>10}  provider",
            "id", "state", "provider", "done/failed/all", "age", "tokens", "usd"
        )?;
        let now = chrono::Utc::now();
        for r in &self.0 {
            let counts = r
                .request_counts
                .as_ref()
                .map(|c| format!("{}/{}/{}", c["completed"], c["failed"], c["total"]))
                .unwrap_or_else(|| format!("0/0/{}", r.requests));
            let age = (r.finished_at.unwrap_or(now) - r.created_at).num_seconds();
            let (tokens, usd) = match (r.tokens_billed, r.usd_billed) {
                (Some(t), Some(u)) => (t.to_string(), format!("{u:.4}")),
                _ => (
                    format!("~{}", r.tokens_estimate),
                    format!("~{:.4}", r.usd_reserved),
                ),
            };
            writeln!(
                f,
                "{:>5} {:<22} {:<11} {:>15} {:>8}s {:>11} {:>10}  {}",
                r.id,
                if r.finished_at.is_some() {
                    format!("{} (done)", r.state)
                } else {
                    r.state.to_string()
                },
                r.provider_status.as_deref().unwrap_or("-"),
                counts,
                age,
                tokens,
                usd,
                r.provider_id.as_deref().unwrap_or("-")
            )?;
            if let Some(e) = &r.last_error {
                writeln!(f, "      {e}")?;
            }
        }
        Ok(())
    }
}

/// Deletes a batch's files at the provider (best effort: a file left is billed storage, not a
/// wrong result).
async fn delete_files<'a>(
    client: &client::BatchClient,
    id: i64,
    files: impl IntoIterator<Item = &'a Option<String>>,
) {
    for f in files.into_iter().flatten() {
        if let Err(e) = client.delete(f).await {
            tracing::warn!(batch = id, file = %f, error = %e, "deleting a batch file failed");
        }
    }
}

/// The model batch `rec` was submitted with, at its own size and price (the one this worker is
/// configured with may have changed since: a batch stays open up to 24 h), and whether its
/// partition still exists (when it does not, nothing of the batch can be written).
async fn batch_model(
    pool: &PgPool,
    settings: &Settings,
    rec: &BatchRecord,
) -> anyhow::Result<(crate::config::ModelSettings, bool)> {
    use crate::model_index::lifecycle;
    let registered = lifecycle::models(pool)
        .await?
        .into_iter()
        .find(|m| m.name == rec.model);
    let dims = registered
        .as_ref()
        .map_or(settings.model.dimensions, |m| m.dimensions as usize);
    let live = registered.is_some() && lifecycle::partition_exists(pool, &rec.model).await?;
    let m = lifecycle::settings_for(pool, &settings.model, &rec.model, dims).await?;
    Ok((m, live))
}

/// The budget batch `rec` counts against: its own model's, as `<model> (batch)` at that
/// model's Batch API price (the label its reservation was made under).
async fn batch_budget(
    pool: &PgPool,
    settings: &Settings,
    rec: &BatchRecord,
) -> anyhow::Result<Budget> {
    let (m, _) = batch_model(pool, settings, rec).await?;
    Ok(Budget::new(
        pool.clone(),
        &format!("{} (batch)", m.name),
        m.batch_usd_per_million_tokens,
    ))
}

/// Ends batch `rec` without its results: its jobs retried with an attempt used (`Failed`) or
/// released untouched (`Abandoned`) with `why`; the reservation refunded if the provider never
/// had the batch, else standing as spent; the batch cancelled at the provider and its files
/// deleted (best effort); the record closed with `why`.
async fn end_batch(
    pool: &PgPool,
    settings: &Settings,
    client: &client::BatchClient,
    budget: &Budget,
    rec: &BatchRecord,
    state: BatchState,
    why: &str,
) -> anyhow::Result<usize> {
    let items = records::items(pool, rec.id).await?;
    let result: JobResult = Err(match state {
        BatchState::Abandoned => JobError::release(why, Duration::ZERO),
        _ => JobError::retry(why),
    });
    let results: std::collections::HashMap<String, JobResult> = items
        .iter()
        .map(|i| (i.job_id.clone(), result.clone()))
        .collect();
    crate::job::end_unacked(pool, &settings.retry, &results).await?;
    let billed = if rec.provider_id.is_none() {
        Some(0)
    } else {
        None
    };
    if let Err(e) = budget.settle(rec.reservation(), billed).await {
        tracing::warn!(batch = rec.id, error = %e, "settling the ended batch's reservation failed");
    }
    if let Some(pid) = &rec.provider_id {
        let _ = client.cancel(pid).await;
    }
    delete_files(
        client,
        rec.id,
        [&rec.input_file_id, &rec.output_file_id, &rec.error_file_id],
    )
    .await;
    let usd = if billed.is_some() {
        0.0
    } else {
        rec.usd_reserved
    };
    records::close(pool, rec.id, state, 0, usd, Some(why)).await?;
    Ok(results.len())
}

/// `embed-worker batches abandon ID`: ends a batch whatever the provider says (stuck, gone,
/// unreadable): its unanswered jobs go back to the queue with no attempt used, the batch is
/// cancelled at the provider and its files deleted (best effort).
pub async fn abandon(pool: &PgPool, settings: &Settings, id: i64) -> anyhow::Result<String> {
    let rec = records::get(pool, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no batch {id}"))?;
    if rec.finished_at.is_some() {
        anyhow::bail!("batch {id} has already ended ({})", rec.state);
    }
    let client = client::BatchClient::new(&settings.api)?;
    let budget = batch_budget(pool, settings, &rec).await?;
    let jobs = end_batch(
        pool,
        settings,
        &client,
        &budget,
        &rec,
        BatchState::Abandoned,
        &format!("batch {id} abandoned by the operator"),
    )
    .await?;
    Ok(format!(
        "batch {id} abandoned; {jobs} items' jobs back in the queue"
    ))
}

/// `embed-worker batches cancel ID`: asks the provider to cancel; the lane then releases the
/// batch's unanswered jobs when it sees the batch `cancelled`.
pub async fn cancel(pool: &PgPool, settings: &Settings, id: i64) -> anyhow::Result<String> {
    let rec = records::get(pool, id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no batch {id}"))?;
    let pid = rec.provider_id.ok_or_else(|| {
        anyhow::anyhow!(
            "batch {id} never reached the provider (state {})",
            rec.state
        )
    })?;
    let b = client::BatchClient::new(&settings.api)?
        .cancel(&pid)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{e} (`embed-worker batches abandon {id}` ends it here whatever the provider says)"
            )
        })?;
    Ok(client::status_str(&b.status))
}
