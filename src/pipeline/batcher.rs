//! Batch: apalis hands the worker jobs one by one; the batcher gathers them into batches.
//!
//! Why: one API request per job would cost a round trip and a request-per-minute slot each.
//! Every handler call sends its job here and waits for its own answer; the batcher flushes when
//! it holds `batch.max_jobs` jobs or when the oldest has waited `batch.linger_ms`, and runs up to
//! `batch.max_in_flight` batches at once so API latency overlaps database work.
//!
//! Shutdown: [`Batcher::drain`] stops forming batches, gives every claimed-but-unstarted job
//! back to the queue (no attempt used), and waits for the batches already running.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Disposition, Job, JobError, JobResult, Pipeline};
use crate::queue;

struct Submitted {
    job: Job,
    reply: oneshot::Sender<JobResult>,
}

/// The handlers' side of the batcher. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Batcher {
    tx: mpsc::Sender<Submitted>,
    pipeline: Arc<Pipeline>,
    draining: Arc<AtomicBool>,
    drain_tx: mpsc::Sender<oneshot::Sender<()>>,
}

fn released() -> JobError {
    JobError::release(
        "released unstarted: worker shutting down",
        Duration::from_secs(2),
    )
}

impl Batcher {
    /// Starts the batching task on the current runtime.
    pub(crate) fn spawn(pipeline: Arc<Pipeline>) -> Batcher {
        let cfg = pipeline.settings.batch.clone();
        let (tx, rx) = mpsc::channel(cfg.max_jobs * 4);
        let (drain_tx, drain_rx) = mpsc::channel(1);
        let draining = Arc::new(AtomicBool::new(false));
        tokio::spawn(gather(
            pipeline.clone(),
            rx,
            drain_rx,
            cfg.max_jobs,
            Duration::from_millis(cfg.linger_ms),
            cfg.max_in_flight,
        ));
        Batcher {
            tx,
            pipeline,
            draining,
            drain_tx,
        }
    }

    /// Submits one job and waits for its result.
    pub(crate) async fn submit(&self, job: Job) -> JobResult {
        if self.draining.load(Ordering::SeqCst) {
            return self.give_back(job, released()).await;
        }
        // A worker whose model is neither written nor served takes no job: it gives each back
        // at once and holds the handler's slot a while, so with every slot held apalis claims
        // none (instead of claiming them straight back).
        if let Some(why) = self.pipeline.idle_reason().await {
            if self.pipeline.health.set_idle(Some(why.clone())) {
                tracing::warn!(reason = %why, "not taking jobs");
            }
            crate::meter::job("idle", job.source.source_type.as_str());
            let r = self
                .give_back(job, JobError::release(why, Duration::ZERO))
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            return r;
        }
        if self.pipeline.health.set_idle(None) {
            tracing::info!("taking jobs again: model.name is the writing or the serving model");
        }
        let (reply, rx) = oneshot::channel();
        if let Err(e) = self.tx.send(Submitted { job, reply }).await {
            return self.give_back(e.0.job, released()).await;
        }
        rx.await.unwrap_or_else(|_| Err(released()))
    }

    /// Puts `job` back in the queue untouched (no attempt used), due again at once.
    async fn give_back(&self, job: Job, e: JobError) -> JobResult {
        if let Err(err) =
            queue::release_jobs(&self.pipeline.pool, &[job.id], Duration::ZERO, &e.reason).await
        {
            tracing::warn!(error = %err, "could not release a job; it will be rescued after the heartbeat timeout");
        }
        Err(e)
    }

    /// Stops forming batches, releases unstarted jobs, waits for running batches.
    pub(crate) async fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
        let (done_tx, done_rx) = oneshot::channel();
        if self.drain_tx.send(done_tx).await.is_ok() {
            let _ = done_rx.await;
        }
    }
}

async fn gather(
    pipeline: Arc<Pipeline>,
    mut rx: mpsc::Receiver<Submitted>,
    mut drain_rx: mpsc::Receiver<oneshot::Sender<()>>,
    max_jobs: usize,
    linger: Duration,
    max_in_flight: usize,
) {
    let slots = Arc::new(Semaphore::new(max_in_flight));
    let mut batch: Vec<Submitted> = Vec::new();
    let mut deadline = tokio::time::Instant::now() + linger;
    let done = loop {
        let flush_now = batch.len() >= max_jobs;
        if !flush_now {
            tokio::select! {
                biased;
                done = drain_rx.recv() => break done,
                item = rx.recv() => match item {
                    Some(s) => {
                        if batch.is_empty() {
                            deadline = tokio::time::Instant::now() + linger;
                        }
                        batch.push(s);
                        continue;
                    }
                    None => break None,
                },
                _ = tokio::time::sleep_until(deadline), if !batch.is_empty() => {}
            }
        }
        let permit = tokio::select! {
            biased;
            done = drain_rx.recv() => break done,
            p = slots.clone().acquire_owned() => p.expect("semaphore open"),
        };
        let ready = std::mem::take(&mut batch);
        let pipeline = pipeline.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let jobs: Vec<Job> = ready.iter().map(|s| s.job.clone()).collect();
            // The span's fields ride on every line logged inside it: the job ids (128 by
            // default, ~4 KB) only at debug, where they are asked for.
            let span = tracing::info_span!("batch", jobs = jobs.len(), first_job = %jobs.first().map_or("", |j| j.id.as_str()));
            if tracing::enabled!(tracing::Level::DEBUG) {
                let ids: Vec<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
                span.in_scope(|| tracing::debug!(job_ids = %ids.join(","), "batch started"));
            }
            let mut results = tracing::Instrument::instrument(pipeline.process(&jobs), span).await;
            crate::job::settle(&pipeline.pool, &pipeline.settings.retry, &results).await;
            for s in &ready {
                let label = match results.get(&s.job.id) {
                    Some(Ok(o)) => o.label(),
                    Some(Err(e)) => e.disposition.label(),
                    None => Disposition::Retry.label(),
                };
                crate::meter::job(label, s.job.source.source_type.as_str());
            }
            for s in ready {
                let r = results
                    .remove(&s.job.id)
                    .unwrap_or_else(|| Err(JobError::retry("internal: job lost in batch")));
                let _ = s.reply.send(r);
            }
        });
    };
    // Draining: nothing new starts; give back what has not started.
    rx.close();
    while let Ok(s) = rx.try_recv() {
        batch.push(s);
    }
    let ids: Vec<String> = batch.iter().map(|s| s.job.id.clone()).collect();
    match queue::release_jobs(&pipeline.pool, &ids, Duration::ZERO, &released().reason).await {
        Ok(n) => tracing::info!(released = n, "released unstarted jobs to the queue"),
        Err(e) => {
            tracing::warn!(error = %e, "could not release unstarted jobs; they will be rescued after the heartbeat timeout")
        }
    }
    for s in batch {
        let _ = s.reply.send(Err(released()));
    }
    // Wait for the batches in flight.
    let _all = slots.acquire_many(max_in_flight as u32).await;
    if let Some(done) = done {
        let _ = done.send(());
    }
}
