//! `run`: the apalis worker that feeds the batcher, and graceful shutdown.
//!
//! Why apalis hands jobs to a batcher instead of embedding them itself: apalis calls the
//! handler once per job; the handler submits the job to the [`Batcher`] and returns that job's
//! own result, which apalis-postgres acknowledges (Done / Failed with the reason).
//!
//! Shutdown (SIGTERM, SIGINT): apalis stops claiming, in-flight handlers (and so their batches)
//! finish within `shutdown.grace_secs`, claimed-but-unstarted jobs go back to `Pending`, exit 0.
//! Worker names are `<host>-<random>`: apalis takes an advisory lock on the name, so a restart
//! must never reuse one.

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::*;
use apalis_postgres::{Config as PgQueueConfig, PostgresStorage, Pubsub};
use sqlx::PgPool;

use crate::config::Settings;
use crate::embed::OpenAiEmbedder;
use crate::pipeline::batcher::Batcher;
use crate::pipeline::{Job, Pipeline};
use crate::queue::EmbedSource;

/// A unique worker name: host (pod) name plus a random suffix.
pub fn worker_name() -> String {
    let host = std::env::var("HOSTNAME")
        .or_else(|_| std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()))
        .unwrap_or_else(|_| "embed-worker".into());
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

async fn handle(
    job: EmbedSource,
    id: TaskId,
    batcher: Data<Batcher>,
) -> Result<String, BoxDynError> {
    let job = Job {
        id: id.to_string(),
        source: job,
    };
    match batcher.submit(job.clone()).await {
        Ok(outcome) => {
            tracing::debug!(job = %job.id, source = %job.source.source_id, %outcome, "job done");
            Ok(outcome.to_string())
        }
        Err(e) if e.reason.starts_with("released") => {
            tracing::debug!(job = %job.id, "job released unstarted");
            Err(e.into())
        }
        Err(e) => {
            tracing::warn!(job = %job.id, source_type = %job.source.source_type,
                source = %job.source.source_id, reason = %e.reason, "job failed");
            Err(e.into())
        }
    }
}

/// Everything `run` needs, built once.
pub struct Worker {
    pub pool: PgPool,
    pub settings: Arc<Settings>,
    pub pipeline: Arc<Pipeline>,
}

impl Worker {
    pub async fn build(settings: Settings) -> anyhow::Result<Worker> {
        let settings = Arc::new(settings);
        let pool = crate::db::connect(&settings.database).await?;
        let embedder = OpenAiEmbedder::new(&settings.api, &settings.model)?;
        let pipeline = Arc::new(Pipeline::new(pool.clone(), settings.clone(), embedder)?);
        Ok(Worker {
            pool,
            settings,
            pipeline,
        })
    }

    /// Runs until `shutdown` resolves, then drains within the grace period.
    pub async fn run(
        &self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let s = &self.settings;
        let batcher = Batcher::spawn(self.pipeline.clone());
        let drain = batcher.clone();
        let grace = Duration::from_secs(s.shutdown.grace_secs);
        let pool = self.pool.clone();
        let queue = s.queue.clone();
        // The monitor calls this again to restart a worker whose backend failed (e.g. the
        // database restarted); each incarnation gets a fresh unique name.
        let make_worker = move |_restarts: usize| {
            let queue_cfg = PgQueueConfig::default()
                .queue(&queue.name)
                .batch_size(queue.fetch_batch)
                .heartbeat_interval(Duration::from_secs(queue.heartbeat_secs))
                .missed_heartbeats(queue.missed_heartbeats);
            let strategy = Strategy::new()
                .stream(Pubsub::new(pool.clone(), queue.name.clone()))
                .interval(Duration::from_millis(queue.poll_interval_ms));
            let backend = PostgresStorage::<EmbedSource>::new(&pool)
                .with_config(queue_cfg)
                .poll_with_strategy(strategy);
            let name = worker_name();
            tracing::info!(worker = %name, queue = %queue.name, "worker starting");
            WorkerBuilder::new(name.as_str())
                .backend(backend)
                .data(batcher.clone())
                .concurrency(queue.concurrency)
                .build(handle)
        };
        Monitor::new()
            .register(make_worker)
            // After our drain only apalis's own acknowledgements remain to be flushed.
            .shutdown_timeout(Duration::from_secs(5))
            .run_with_signal(async move {
                shutdown.await;
                tracing::info!("shutdown requested: finishing in-flight batches");
                if tokio::time::timeout(grace, drain.drain()).await.is_err() {
                    tracing::warn!(
                        ?grace,
                        "grace period over with batches still running; their jobs will be rescued"
                    );
                } else {
                    tracing::info!("in-flight batches finished");
                }
                Ok(())
            })
            .await?;
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
}
