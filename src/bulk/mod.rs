//! The bulk lane: backfills and stale re-embeds, which need no answer within seconds.
//!
//! Two lanes share one queue name. Interactive jobs (change capture, `enqueue`) have priority 0
//! in `<queue>`. Bulk jobs (`backfill`, `enqueue-stale`, the periodic stale scan) go, by
//! `bulk.mode`, either into `<queue>` at `bulk.priority` (sync: the embeddings endpoint, claimed
//! only when no interactive job is due), or into `<queue>.batch` (batch: OpenAI's Batch API,
//! billed at half price from a separate rate-limit pool), which no apalis worker claims.
//!
//! The batch lane, one leader across replicas (advisory lock), every `bulk.poll_secs`:
//! 1. resume: records left `preparing` by a dead submitter (`submit`);
//! 2. poll: each submitted batch; an ended one is collected (`collect`);
//! 3. submit: due bulk jobs → one batch (`submit`), while fewer than `bulk.max_open_batches`
//!    are open.
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

use crate::config::Settings;
use crate::guard::budget::Budget;
use crate::pipeline::Pipeline;

/// `pg_advisory_lock` key of the batch lane's leader ("embbat").
const LEADER_LOCK: i64 = 0x656d_6262_6174;

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
            budget: Budget::new(
                pipeline.pool.clone(),
                &format!("{} (batch)", settings.model.name),
                settings.model.batch_usd_per_million_tokens,
            ),
            settings,
            pipeline,
        })
    }

    /// One round: resume, poll, submit while there is room and work.
    pub async fn tick(&self) -> anyhow::Result<()> {
        self.resume().await?;
        self.poll().await?;
        while self.submit().await?.is_some() {}
        Ok(())
    }

    /// Runs rounds every `bulk.poll_secs` until `stop`, when this process holds the lane's
    /// leader lock (taken on a connection of its own, released if the process dies).
    pub async fn lead(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.settings.bulk.poll_secs));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut leader: Option<sqlx::pool::PoolConnection<sqlx::Postgres>> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|v| *v) => return,
            }
            if leader.is_none() {
                leader = match self.pool.acquire().await {
                    Ok(mut c) => {
                        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                            .bind(LEADER_LOCK)
                            .fetch_one(&mut *c)
                            .await
                            .unwrap_or(false);
                        got.then_some(c)
                    }
                    Err(_) => None,
                };
            }
            if let Ok((by_state, oldest)) = records::sample(&self.pool).await {
                crate::meter::batches(&by_state, oldest);
            }
            if leader.is_none() {
                continue;
            }
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %format!("{e:#}"), "batch lane round failed; trying again next round");
            }
        }
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
        .await?;
    Ok(client::status_str(&b.status))
}
