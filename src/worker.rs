//! `run`: the apalis worker that feeds the batcher, and graceful shutdown.
//!
//! Why apalis hands jobs to a batcher instead of embedding them itself: apalis calls the
//! handler once per job; the handler submits the job to the `Batcher` and returns that job's
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
use crate::job::Job;
use crate::pipeline::Pipeline;
use crate::pipeline::batcher::Batcher;

pub use crate::telemetry::worker_name;

/// The handler takes the payload as raw JSON so that a payload of the wrong shape is this job's
/// failure, with its reason, and not a decoding error that stops the whole worker.
async fn handle(
    payload: serde_json::Value,
    id: TaskId,
    batcher: Data<Batcher>,
) -> Result<String, BoxDynError> {
    let job = match Job::from_payload(id.to_string(), &payload) {
        Ok(job) => job,
        Err(e) => {
            tracing::error!(job = %id, reason = %e.reason, "job failed permanently (dead letter)");
            return Err(AbortError::new(e.reason).into());
        }
    };
    match batcher.submit(job.clone()).await {
        Ok(outcome) => {
            tracing::debug!(job = %job.id, source = %job.source.source_id, %outcome, "job done");
            Ok(outcome.to_string())
        }
        Err(e) => Err(e.report(&job)),
    }
}

/// Everything `run` needs, built once.
pub struct Worker {
    /// The worker role's pool; every connection runs as `database.role` (RLS and grants apply).
    pub pool: PgPool,
    /// Validated at load; never changes while the process runs.
    pub settings: Arc<Settings>,
    /// Shared by every batch of this process (one tokenizer thread, one limiter, one budget).
    pub pipeline: Arc<Pipeline>,
    /// What /readyz reports; the same `Health` the pipeline's API gate stops and resumes.
    pub health: Arc<crate::guard::health::Health>,
    /// Where /metrics, /healthz and /readyz are served, when they are.
    pub http_addr: Option<std::net::SocketAddr>,
}

impl Worker {
    /// Connects, builds the pipeline, serves /metrics and the probes.
    pub async fn build(settings: Settings) -> anyhow::Result<Worker> {
        let settings = Arc::new(settings);
        let min = settings.min_pool();
        anyhow::ensure!(
            settings.database.max_connections >= min.total(),
            "database.max_connections = {} is below this worker's minimum pool of {}: {} \
             (EMBED_WORKER__DATABASE__MAX_CONNECTIONS; README, \"Running on a managed PostgreSQL\")",
            settings.database.max_connections,
            min.total(),
            min
        );
        crate::db::set_process_kind("run");
        let pool = crate::db::connect(&settings.database).await?;
        crate::db::connections::warn_at_start(&pool, &settings).await;
        // The render settings name columns of the app's tables: a name they lack stops the
        // worker here, naming it, instead of failing every batch; so does change capture still
        // firing on the columns of an earlier setting (edits to the new ones would be missed).
        let mut conn = pool.acquire().await?;
        let mut missing = crate::db::render::missing_columns(&mut conn, &settings.render).await?;
        if missing.is_empty() {
            missing = crate::db::render::capture_behind(&mut conn, &settings.render).await?;
        }
        drop(conn);
        anyhow::ensure!(
            missing.is_empty(),
            "{}; nothing was queued or written (render.*, README \"Adding embed-worker to an \
             existing database\")",
            missing.join("; ")
        );
        crate::model_index::lifecycle::ensure_for_run(&pool, &settings).await?;
        let embedder = crate::embed::Embedder::from_settings(&settings.api, &settings.model)?;
        let health = Arc::new(crate::guard::health::Health::default());
        let pipeline = Arc::new(Pipeline::new(
            pool.clone(),
            settings.clone(),
            embedder,
            health.clone(),
        )?);
        let http_addr = if settings.http.addr.is_empty() {
            None
        } else {
            Some(crate::http::serve(&settings.http.addr, health.clone()).await?)
        };
        crate::http::install_metrics();
        Ok(Worker {
            pool,
            settings,
            pipeline,
            health,
            http_addr,
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
        let health = self.health.clone();
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
            // LISTEN holds a connection of the pool for as long as the worker runs; polling
            // alone needs none between polls (`queue.listen`, `Settings::min_pool`).
            let mut strategy = Strategy::new();
            if queue.listen {
                strategy = strategy.stream(Pubsub::new(pool.clone(), queue.name.clone()));
            }
            let strategy = strategy.interval(Duration::from_millis(queue.poll_interval_ms));
            let backend = PostgresStorage::<serde_json::Value>::new(&pool)
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
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        // This process's row in embed_worker.workers (its model, for `models prune`).
        let presence = crate::telemetry::worker_name();
        let maintenance = tokio::spawn(maintain(
            self.pool.clone(),
            self.settings.clone(),
            self.health.clone(),
            presence.clone(),
            stop_rx.clone(),
        ));
        let drainer = tokio::spawn(drain_captured(
            self.pool.clone(),
            self.settings.clone(),
            stop_rx.clone(),
        ));
        let indexer = tokio::spawn(build_indexes(
            self.pool.clone(),
            self.settings.clone(),
            stop_rx.clone(),
        ));
        let prober = tokio::spawn(probe_recall(
            self.pool.clone(),
            self.settings.clone(),
            stop_rx.clone(),
        ));
        // In sync mode too: batches still open from batch mode are collected, and the batch
        // lane's waiting jobs move to the sync queue.
        let lane = Some(tokio::spawn(
            crate::bulk::Lane::new(self.pipeline.clone())?.lead(stop_rx.clone()),
        ));

        // apalis-postgres 1.0's Monitor can return an error when the database restarts: run it
        // again (with fresh worker names) until shutdown is requested.
        loop {
            // A worker whose model is neither written nor served claims nothing: its queue
            // consumer does not run (a rolling deploy's old pods, once the switch is promoted).
            if !self.wait_until_not_idle(stop_rx.clone()).await {
                break;
            }
            let mut stop = stop_rx.clone();
            let (health, drain) = (health.clone(), drain.clone());
            let pipeline = self.pipeline.clone();
            let restart_health = health.clone();
            let result = Monitor::new()
                .register(make_worker.clone())
                .should_restart(move |ctx, err| {
                    if restart_health.is_shutting_down() {
                        return false;
                    }
                    tracing::warn!(worker = %ctx.name(), error = %err, "worker stopped with an error: restarting");
                    // The callback is synchronous; a short pause keeps a dead database from
                    // turning restarts into a busy loop.
                    std::thread::sleep(Duration::from_millis(500));
                    true
                })
                // After our drain only apalis's own acknowledgements remain to be flushed.
                .shutdown_timeout(Duration::from_secs(5))
                .run_with_signal(async move {
                    tokio::select! {
                        _ = stop.wait_for(|v| *v) => {}
                        why = became_idle(&pipeline) => {
                            if health.set_idle(Some(why.clone())) {
                                tracing::warn!(reason = %why, "not taking jobs: the queue consumer stops");
                            }
                            return Ok(());
                        }
                    }
                    health.set_shutting_down();
                    tracing::info!("shutdown requested: finishing in-flight batches");
                    if tokio::time::timeout(grace, drain.drain()).await.is_err() {
                        tracing::warn!(?grace, "grace period over with batches still running; their jobs will be rescued");
                    } else {
                        tracing::info!("in-flight batches finished");
                    }
                    Ok(())
                })
                .await;
            if *stop_rx.borrow() {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "monitor ended with an error during shutdown");
                }
                break;
            }
            if self.health.is_idle() {
                continue;
            }
            match result {
                Err(e) => {
                    tracing::warn!(error = %e, "workers stopped with an error: restarting in 1 s")
                }
                Ok(()) => tracing::warn!("workers exited unexpectedly: restarting in 1 s"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        maintenance.abort();
        let _ = maintenance.await;
        crate::model_index::lifecycle::left(&self.pool, &presence).await;
        drainer.abort();
        // A build in progress is cancelled by its own task on the stop signal; a batch round
        // in progress ends at its next step (its records let the next process resume it).
        let _ = tokio::time::timeout(Duration::from_secs(10), indexer).await;
        prober.abort();
        if let Some(lane) = lane {
            let _ = tokio::time::timeout(Duration::from_secs(10), lane).await;
        }
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// Resolves with the reason once this worker's model is neither the writing nor the serving
/// one (checked every 5 s).
async fn became_idle(pipeline: &Pipeline) -> String {
    loop {
        if let Some(why) = pipeline.idle_reason().await {
            return why;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

impl Worker {
    /// Waits while this worker's model is neither written nor served (every 5 s, `/readyz`
    /// saying why); `false` when shutdown came first.
    async fn wait_until_not_idle(&self, mut stop: tokio::sync::watch::Receiver<bool>) -> bool {
        loop {
            if *stop.borrow() {
                return false;
            }
            match self.pipeline.idle_reason().await {
                None => {
                    if self.health.set_idle(None) {
                        tracing::info!(
                            "taking jobs again: model.name is the writing or the serving model"
                        );
                    }
                    return true;
                }
                Some(why) => {
                    if self.health.set_idle(Some(why.clone())) {
                        tracing::warn!(reason = %why, "not taking jobs");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = stop.wait_for(|v| *v) => return false,
            }
        }
    }
}

/// Background upkeep while running: database reachability for `/readyz`, the queue and replica
/// gauges (every 2 s), this worker's model in `embed_worker.workers` (every 10 s), the models'
/// coverage (every 30 s) and retention of finished jobs (every `retention.interval_secs`).
async fn maintain(
    pool: PgPool,
    settings: Arc<Settings>,
    health: Arc<crate::guard::health::Health>,
    presence: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    let mut last_prune: Option<std::time::Instant> = None;
    let mut last_scan: Option<std::time::Instant> = None;
    let mut last_models: Option<std::time::Instant> = None;
    let mut last_seen: Option<std::time::Instant> = None;
    let r = &settings.retention;
    loop {
        let stopping = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.wait_for(|v| *v) => true,
        };
        if stopping {
            return;
        }
        // This worker's model, for `models prune` to refuse while it runs (every 10 s).
        if last_seen.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            last_seen = Some(std::time::Instant::now());
            if let Err(e) =
                crate::model_index::lifecycle::seen(&pool, &presence, &settings.model.name).await
            {
                tracing::debug!(error = %e, "presence not recorded");
            }
        }
        let ping = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query("SELECT 1").execute(&pool),
        )
        .await;
        match ping {
            Ok(Ok(_)) => health.set_db(None),
            Ok(Err(e)) => health.set_db(Some(e.to_string())),
            // Every connection busy at a small budget: the database answers them, the ping
            // only waited its turn.
            Err(_)
                if pool.num_idle() == 0 && pool.size() >= pool.options().get_max_connections() => {}
            Err(_) => health.set_db(Some("ping timed out".into())),
        }
        if let Err(e) = crate::db::connections::sample(&pool).await {
            tracing::debug!(error = %e, "connection sample failed");
        }
        match crate::queue::sample(&pool, &settings.queue.name).await {
            Ok((by_state, dead, oldest)) => crate::meter::queue_sample(&by_state, dead, oldest),
            Err(e) => tracing::debug!(error = %e, "queue sample failed"),
        }
        match crate::replica::lag(&pool).await {
            Ok(replicas) => crate::meter::replica_lag(&replicas, settings.alerts.replica_lag_secs),
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "replica lag sample failed"),
        }
        if let Ok((spent, limit)) = crate::guard::budget::month(&pool).await {
            crate::meter::budget(spent, limit);
        }
        // Coverage counts every model's sources: every 30 s, not every 2.
        if last_models.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            last_models = Some(std::time::Instant::now());
            match crate::model_index::lifecycle::sample(&pool).await {
                Ok(line) => health.set_models(Some(line)),
                Err(e) => tracing::debug!(error = %format!("{e:#}"), "model sample failed"),
            }
        }
        let f = &settings.freshness;
        if f.scan_interval_secs > 0
            && last_scan.is_none_or(|t| t.elapsed() >= Duration::from_secs(f.scan_interval_secs))
        {
            last_scan = Some(std::time::Instant::now());
            match crate::freshness::scan_stale(&pool, &settings).await {
                Ok(Some(n)) if n > 0 => tracing::info!(queued = n, "stale scan queued jobs"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "stale scan failed"),
            }
        }
        if last_prune.is_none_or(|t| t.elapsed() >= Duration::from_secs(r.interval_secs)) {
            last_prune = Some(std::time::Instant::now());
            match crate::queue::prune_finished(
                &pool,
                &settings.queue.name,
                r.done_age(),
                r.failed_age(),
            )
            .await
            {
                Ok((0, 0)) => {}
                Ok((done, failed)) => {
                    tracing::info!(done, failed, "pruned finished jobs past retention")
                }
                Err(e) => tracing::warn!(error = %e, "pruning finished jobs failed"),
            }
            if let Err(e) = crate::pipeline::paid::prune(&pool, r.failed_age()).await {
                tracing::warn!(error = %e, "pruning staged chunks failed");
            }
            if let Err(e) = crate::bulk::records::prune(&pool, r.failed_age()).await {
                tracing::warn!(error = %e, "pruning finished batch records failed");
            }
        }
    }
}

/// Changes one drain statement takes at most.
const DRAIN_ROWS: i32 = 10_000;

/// Capture's second half: the changes the app's writes recorded (`embed_worker.captured`)
/// moved into the queue every `capture.drain_ms`, by every replica (SKIP LOCKED keeps them
/// apart, so a stalled one holds up nobody). A full round goes again at once.
async fn drain_captured(
    pool: PgPool,
    settings: Arc<Settings>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let every = Duration::from_millis(settings.capture.drain_ms);
    let q = &settings.queue;
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        loop {
            match crate::queue::drain_captured(&pool, &q.name, q.max_attempts, DRAIN_ROWS).await {
                Ok((changes, queued)) => {
                    last_error = None;
                    if changes > 0 {
                        crate::meter::captured(changes as u64);
                        tracing::debug!(changes, queued, "captured changes queued");
                    }
                    if changes < i64::from(DRAIN_ROWS) {
                        break;
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(error = %msg, "moving captured changes into the queue failed; trying again");
                        last_error = Some(msg);
                    }
                    break;
                }
            }
        }
    }
}

/// How often the index loop looks while a backlog it waits for drains.
const DRAIN_POLL: Duration = Duration::from_millis(250);

/// The active model's index, when it is missing: built once the queue has drained (see
/// [`crate::model_index::build`]); one builder across replicas. Then the switch's end: the
/// writing model promoted to serving once it covers every source with a valid index
/// ([`crate::model_index::lifecycle::promote_if_due`]). Its own task: a build takes minutes and
/// must not hold up the readiness pings.
async fn build_indexes(
    pool: PgPool,
    settings: Arc<Settings>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let interval = Duration::from_secs(settings.index.check_interval_secs);
    let mut wait = Duration::ZERO;
    let mut last_error: Option<String> = None;
    let mut last_promotion_error: Option<String> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
        wait = interval;
        match crate::model_index::build::run_check(&pool, &settings, Some(stop.clone())).await {
            Ok(outcome) => {
                last_error = None;
                match &outcome {
                    crate::model_index::BuildOutcome::Deferred(why) => {
                        tracing::debug!(%why, "index build deferred")
                    }
                    crate::model_index::BuildOutcome::Draining(why) => {
                        tracing::debug!(%why, "index build deferred");
                        // Look again every DRAIN_POLL, so the build starts as the last job ends
                        // rather than up to an interval later.
                        wait = DRAIN_POLL.min(interval);
                    }
                    crate::model_index::BuildOutcome::Cancelled => return,
                    _ => tracing::debug!(%outcome, "index check"),
                }
                // Promotion needs the index: nothing to look at while it is missing.
                if !matches!(
                    outcome,
                    crate::model_index::BuildOutcome::Ready(_)
                        | crate::model_index::BuildOutcome::Built(..)
                ) {
                    continue;
                }
                match crate::model_index::lifecycle::promote_if_due(&pool, &settings).await {
                    Ok(_) => last_promotion_error = None,
                    Err(e) => {
                        let msg = format!("{e:#}");
                        if last_promotion_error.as_deref() != Some(msg.as_str()) {
                            tracing::warn!(error = %msg, "promotion check failed");
                            last_promotion_error = Some(msg);
                        }
                    }
                }
            }
            Err(e) => {
                // Once per distinct error: a login that is not the table's owner fails every tick.
                let msg = format!("{e:#}");
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "index build failed");
                    last_error = Some(msg);
                }
            }
        }
    }
}

/// The recall probe (`search::probe`): every minute, the stored results are exported; once a
/// `search.probe_minutes` period, the replica that claims it probes. Its own task: an exact scan
/// of a large model takes seconds and must not hold up the readiness pings.
async fn probe_recall(
    pool: PgPool,
    settings: Arc<Settings>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let s = &settings.search;
    let mut last_error: Option<String> = None;
    loop {
        match crate::search::probe::run_if_due(&pool, s).await {
            Ok(Some(results)) => {
                last_error = None;
                for m in &results {
                    tracing::info!(
                        scope = m.scope.as_str(),
                        recall = m.recall,
                        queries = m.queries.len(),
                        p95_ms = m.p95_ms,
                        "recall probe"
                    );
                }
            }
            Ok(None) => {}
            Err(e) => {
                let msg = format!("{e:#}");
                if last_error.as_deref() != Some(msg.as_str()) {
                    tracing::warn!(error = %msg, "recall probe failed");
                    last_error = Some(msg);
                }
            }
        }
        match crate::search::probe::stored(&pool).await {
            Ok(results) => crate::meter::search_recall(&results, s.recall_target),
            Err(e) => tracing::debug!(error = %e, "reading probe results failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            _ = stop.wait_for(|v| *v) => return,
        }
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
