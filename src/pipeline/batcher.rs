//! Batch: apalis hands the worker jobs one by one; the batcher gathers them into batches.
//!
//! Why: one API request per job would cost a round trip and a request-per-minute slot each.
//! Every handler call sends its job here and waits for its own answer; the batcher flushes when
//! it holds `batch.max_jobs` jobs or when the oldest has waited `batch.linger_ms`, and runs up to
//! `batch.max_in_flight` batches at once so API latency overlaps database work.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{Job, JobError, JobResult, Pipeline};

struct Submitted {
    job: Job,
    reply: oneshot::Sender<JobResult>,
}

/// The handlers' side of the batcher. Cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Submitted>,
}

impl Batcher {
    /// Starts the batching task on the current runtime.
    pub fn spawn(pipeline: Arc<Pipeline>) -> Batcher {
        let cfg = pipeline.settings.batch.clone();
        let (tx, rx) = mpsc::channel(cfg.max_jobs * 4);
        tokio::spawn(run(
            pipeline,
            rx,
            cfg.max_jobs,
            Duration::from_millis(cfg.linger_ms),
            cfg.max_in_flight,
        ));
        Batcher { tx }
    }

    /// Submits one job and waits for its result.
    pub async fn submit(&self, job: Job) -> JobResult {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Submitted { job, reply }).await.is_err() {
            return Err(JobError {
                reason: "worker shutting down".into(),
                retryable: true,
            });
        }
        rx.await.unwrap_or_else(|_| {
            Err(JobError {
                reason: "batch aborted".into(),
                retryable: true,
            })
        })
    }
}

async fn run(
    pipeline: Arc<Pipeline>,
    mut rx: mpsc::Receiver<Submitted>,
    max_jobs: usize,
    linger: Duration,
    max_in_flight: usize,
) {
    let slots = Arc::new(Semaphore::new(max_in_flight));
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < max_jobs {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let permit = slots.clone().acquire_owned().await.expect("semaphore open");
        let pipeline = pipeline.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let jobs: Vec<Job> = batch.iter().map(|s| s.job.clone()).collect();
            let span = tracing::info_span!("batch", jobs = jobs.len(), first_job = %jobs[0].id);
            let mut results = tracing::Instrument::instrument(pipeline.process(&jobs), span).await;
            for s in batch {
                let r = results.remove(&s.job.id).unwrap_or_else(|| {
                    Err(JobError {
                        reason: "internal: job lost in batch".into(),
                        retryable: true,
                    })
                });
                let _ = s.reply.send(r);
            }
        });
    }
}
