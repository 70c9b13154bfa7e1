//! The pipeline for one batch: load → tokenize/split → skip unchanged → embed → write.
//!
//! Why a batch and not a job: the API bills and limits per request, and the database is fastest
//! with set-based statements. A batch of up to `batch.max_jobs` sources becomes as few API
//! requests as the provider's limits allow (≤ 2,048 inputs, ≤ 300,000 budgeted tokens each) and
//! one write transaction. Each job still gets its own answer: a bad input fails only its source.

pub mod batcher;
pub mod chunk;
pub mod load;
pub mod stage;
pub mod write;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::PgPool;
use tokio::sync::Semaphore;

use crate::config::Settings;
use crate::embed::{EmbedError, Embedder};
use crate::health::Health;
use crate::queue::EmbedSource;
use crate::ratelimit::RateLimiter;
use chunk::{Chunk, Chunker, ChunkerThread, request_budget_tokens};
use write::{ChunkWrite, SourceWrite, WriteOutcome};

/// A claimed job: its apalis id and its payload.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: String,
    pub source: EmbedSource,
}

/// How a job ended, when it ended well.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub reason: String,
    pub disposition: Disposition,
}

impl JobError {
    pub fn retry(reason: impl Into<String>) -> Self {
        JobError {
            reason: crate::redact::secrets(&reason.into(), None),
            disposition: Disposition::Retry,
        }
    }
    pub fn release(reason: impl Into<String>, after: std::time::Duration) -> Self {
        JobError {
            reason: crate::redact::secrets(&reason.into(), None),
            disposition: Disposition::Release { after },
        }
    }
    pub fn dead(reason: impl Into<String>) -> Self {
        JobError {
            reason: crate::redact::secrets(&reason.into(), None),
            disposition: Disposition::Dead,
        }
    }
}

pub type JobResult = Result<JobOutcome, JobError>;

/// Counters of what the pipeline did (also exported as metrics).
#[derive(Debug, Default)]
pub struct Stats {
    pub api_requests: AtomicU64,
    pub tokens_embedded: AtomicU64,
    pub tokens_saved: AtomicU64,
    pub chunks_written: AtomicU64,
    pub rate_limited: AtomicU64,
}

pub struct Pipeline {
    pub pool: PgPool,
    pub settings: Arc<Settings>,
    chunker: ChunkerThread,
    embedder: Embedder,
    api_slots: Semaphore,
    limiter: RateLimiter,
    budget: crate::budget::Budget,
    pub health: Arc<Health>,
    pub stats: Stats,
}

/// One input to embed: which source and chunk it belongs to.
struct Pending<'a> {
    source: EmbedSource,
    chunk: &'a Chunk,
    /// The source has several chunks: stage the vector as soon as it is paid for.
    stage: bool,
}

impl Pipeline {
    pub fn new(
        pool: PgPool,
        settings: Arc<Settings>,
        embedder: Embedder,
        health: Arc<Health>,
    ) -> anyhow::Result<Self> {
        let chunker = ChunkerThread::spawn(Chunker::for_model(&settings.model)?)?;
        // An in-process model has no provider quota to respect.
        let limits = if embedder.is_remote() {
            settings.rate_limit.clone()
        } else {
            crate::config::RateLimitSettings {
                requests_per_minute: 0,
                tokens_per_minute: 0,
                ..settings.rate_limit.clone()
            }
        };
        let limiter = RateLimiter::new(
            &limits,
            settings.api.max_tokens_per_request as u32,
            embedder.headers_handle(),
            if embedder.is_remote() {
                settings.batch.max_in_flight
            } else {
                0
            },
        );
        let budget = crate::budget::Budget::new(
            pool.clone(),
            &settings.model.name,
            settings.model.usd_per_million_tokens,
        );
        Ok(Pipeline {
            pool,
            limiter,
            budget,
            health,
            api_slots: Semaphore::new(settings.batch.max_in_flight),
            settings,
            chunker,
            embedder,
            stats: Stats::default(),
        })
    }

    /// Processes one batch of jobs; returns every job's result by job id.
    pub async fn process(&self, jobs: &[Job]) -> HashMap<String, JobResult> {
        match self.process_inner(jobs).await {
            Ok(by_source) => jobs
                .iter()
                .map(|j| {
                    (
                        j.id.clone(),
                        by_source
                            .get(&j.source)
                            .cloned()
                            .unwrap_or(Err(JobError::retry("internal: no result for source"))),
                    )
                })
                .collect(),
            Err(e) => {
                // Database trouble: every job of the batch is retried.
                tracing::warn!(error = %format!("{e:#}"), jobs = jobs.len(), "batch failed");
                let err = JobError::retry(format!("batch failed: {e:#}"));
                jobs.iter()
                    .map(|j| (j.id.clone(), Err(err.clone())))
                    .collect()
            }
        }
    }

    async fn process_inner(&self, jobs: &[Job]) -> anyhow::Result<HashMap<EmbedSource, JobResult>> {
        let s = &self.settings;
        let model = s.model.name.as_str();
        let dims = s.model.dimensions;
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let due_at = crate::queue::start_jobs(&self.pool, &ids).await?;
        let sources = write::distinct(jobs.iter().map(|j| j.source));

        // Load.
        let loaded = load::load(&self.pool, &s.render, &sources).await?;
        let mut results: HashMap<EmbedSource, JobResult> = HashMap::new();

        // Tokenize/split, on the tokenizer thread.
        let (model_name, order) = (model.to_string(), sources.clone());
        type Chunked = Vec<(EmbedSource, chrono::DateTime<chrono::Utc>, Vec<Chunk>)>;
        let (gone, mut chunked): (Vec<EmbedSource>, Chunked) = self
            .chunker
            .run(move |chunker| {
                let (mut gone, mut chunked) = (Vec::new(), Vec::new());
                for src in order {
                    match loaded.get(&src) {
                        None => gone.push(src),
                        Some(l) => chunked.push((
                            src,
                            l.updated_at,
                            chunker.chunks(&l.text, &model_name, dims),
                        )),
                    }
                }
                (gone, chunked)
            })
            .await?;
        for src in gone {
            results.insert(src, Ok(JobOutcome::SourceGone));
        }
        // Too long to embed at all: a dead letter with its size, before any API call.
        let cap = s.model.max_source_tokens;
        chunked.retain(|(src, _, chunks)| {
            let tokens: usize = chunks.iter().map(|c| c.tokens).sum();
            if tokens > cap {
                results.insert(
                    *src,
                    Err(JobError::dead(format!(
                        "source too large: {tokens} tokens in {} chunks (model.max_source_tokens = {cap})",
                        chunks.len()
                    ))),
                );
                false
            } else {
                true
            }
        });

        // Never pay twice: drop chunks whose stored hash matches.
        let present: Vec<EmbedSource> = chunked.iter().map(|(s, _, _)| *s).collect();
        let stored = write::existing_hashes(&self.pool, model, &present).await?;
        let mut pending: Vec<Pending> = Vec::new();
        let mut saved_tokens = 0u64;
        for (src, _, chunks) in &chunked {
            for c in chunks {
                if stored.get(&(*src, c.index)) == Some(&c.content_hash) {
                    saved_tokens += c.tokens as u64;
                } else {
                    pending.push(Pending {
                        source: *src,
                        chunk: c,
                        stage: chunks.len() > 1,
                    });
                }
            }
        }
        // Chunks of long sources paid for by an earlier attempt.
        let mut vectors: HashMap<(EmbedSource, usize), pgvector::Vector> = HashMap::new();
        let staged_hashes: Vec<&str> = pending
            .iter()
            .filter(|p| p.stage)
            .map(|p| p.chunk.content_hash.as_str())
            .collect();
        let mut staged = stage::take(&self.pool, model, &staged_hashes).await?;
        if !staged.is_empty() {
            pending.retain(|p| match staged.remove(&p.chunk.content_hash) {
                Some((v, _)) if p.stage => {
                    saved_tokens += p.chunk.tokens as u64;
                    vectors.insert((p.source, p.chunk.index), v);
                    false
                }
                _ => true,
            });
        }
        self.stats
            .tokens_saved
            .fetch_add(saved_tokens, Ordering::Relaxed);
        crate::meter::tokens_saved(model, saved_tokens);

        // Embed: pack into requests within the provider's limits, run them concurrently.
        let plan = plan_requests(
            pending
                .iter()
                .map(|p| request_budget_tokens(&p.chunk.text, p.chunk.tokens)),
            s.api.max_inputs_per_request,
            self.limiter
                .max_request_tokens()
                .map_or(s.api.max_tokens_per_request, |b| {
                    (b as usize).min(s.api.max_tokens_per_request)
                }),
        );
        let request_results = futures::future::join_all(plan.iter().map(|range| {
            let inputs: Vec<&Pending> = pending[range.clone()].iter().collect();
            self.embed_isolating(inputs)
        }))
        .await;
        let mut failures: HashMap<EmbedSource, EmbedError> = HashMap::new();
        for (range, res) in plan.iter().zip(request_results) {
            for (p, r) in pending[range.clone()].iter().zip(res) {
                match r {
                    Ok(v) => match crate::embed::check_vector(&v, dims) {
                        // Moved, not copied: this Vec is what the write encodes.
                        Ok(()) => {
                            vectors.insert((p.source, p.chunk.index), pgvector::Vector::from(v));
                        }
                        // Only this source fails (permanently); its batch-mates are written.
                        Err(why) => {
                            failures.entry(p.source).or_insert(EmbedError::BadVector {
                                message: format!("chunk {}: {why}", p.chunk.index),
                            });
                        }
                    },
                    Err(e) => {
                        failures.entry(p.source).or_insert(e);
                    }
                }
            }
        }

        // Write every source that has all its chunks.
        let mut writes = Vec::new();
        for (src, read_at, chunks) in &chunked {
            if let Some(e) = failures.get(src) {
                results.insert(*src, Err(self.job_error(e)));
                continue;
            }
            let chunks = chunks
                .iter()
                .map(|c| ChunkWrite {
                    index: c.index,
                    content_hash: c.content_hash.clone(),
                    tokens: c.tokens,
                    vector: vectors.remove(&(*src, c.index)),
                })
                .collect();
            writes.push(SourceWrite {
                source: *src,
                read_at: *read_at,
                chunks,
            });
        }
        let started = std::time::Instant::now();
        let outcomes = write::write_batch(
            &self.pool,
            model,
            dims,
            &s.queue.name,
            s.queue.max_attempts,
            &writes,
        )
        .await?;
        crate::meter::db_write(started.elapsed());
        let written_staged: Vec<String> = writes
            .iter()
            .filter(|w| {
                w.chunks.len() > 1 && matches!(outcomes.get(&w.source), Some(WriteOutcome::Written))
            })
            .flat_map(|w| w.chunks.iter().map(|c| c.content_hash.clone()))
            .collect();
        if let Err(e) = stage::clear(&self.pool, model, &written_staged).await {
            tracing::warn!(error = %e, "could not clear staged chunks; retention removes them");
        }
        let mut written_chunks = 0u64;
        for w in &writes {
            let outcome = match outcomes.get(&w.source) {
                Some(WriteOutcome::Gone) | None => JobOutcome::SourceGone,
                Some(WriteOutcome::Superseded) => JobOutcome::Superseded,
                Some(WriteOutcome::Written) => {
                    let embedded = w.chunks.iter().filter(|c| c.vector.is_some()).count();
                    written_chunks += embedded as u64;
                    crate::meter::embeddings_written(
                        model,
                        w.source.source_type.as_str(),
                        embedded as u64,
                    );
                    if w.chunks.is_empty() {
                        JobOutcome::SkippedEmpty
                    } else if embedded == 0 {
                        JobOutcome::Unchanged {
                            chunks: w.chunks.len(),
                        }
                    } else {
                        let tokens = w
                            .chunks
                            .iter()
                            .filter(|c| c.vector.is_some())
                            .map(|c| c.tokens)
                            .sum();
                        JobOutcome::Embedded {
                            chunks: w.chunks.len(),
                            embedded,
                            tokens,
                        }
                    }
                }
            };
            results.insert(w.source, Ok(outcome));
        }
        self.stats
            .chunks_written
            .fetch_add(written_chunks, Ordering::Relaxed);
        let now = chrono::Utc::now();
        for j in jobs {
            if let (Some(Ok(_)), Some(due)) = (results.get(&j.source), due_at.get(&j.id)) {
                crate::meter::job_latency((now - *due).as_seconds_f64());
            }
        }

        Ok(results)
    }

    /// Stops API calls at the monthly budget (readiness says why) and returns the error for
    /// the jobs of the request that found it.
    fn stop_at_budget(&self, decision: &crate::budget::Decision) -> EmbedError {
        let reason = match decision {
            crate::budget::Decision::Exceeded { spent, budget } => {
                format!("monthly budget reached: ${spent:.4} spent of ${budget:.4}")
            }
            crate::budget::Decision::Reserved => "monthly budget reached".to_string(),
        };
        let until = std::time::Instant::now()
            + std::time::Duration::from_secs(self.settings.budget.recheck_secs);
        if !self.health.api_stop_recorded() {
            tracing::error!(%reason, "budget guard: API calls stopped, readiness false; queueing continues");
        }
        self.health.stop_api(reason.clone(), until);
        EmbedError::Stopped { reason }
    }

    /// What a request failure means for the jobs whose inputs were in it.
    fn job_error(&self, e: &EmbedError) -> JobError {
        match e {
            EmbedError::InvalidInput { .. } => {
                JobError::dead(format!("input rejected by the provider: {e}"))
            }
            // Stopped calling (quota or budget): back to the queue untouched, no attempt used.
            EmbedError::BadVector { .. } => JobError::dead(e.to_string()),
            EmbedError::QuotaExhausted { .. } | EmbedError::Unauthorized { .. } => {
                JobError::release(
                    e.to_string(),
                    std::time::Duration::from_secs(self.settings.retry.quota_recheck_secs.min(60)),
                )
            }
            // Back when the stop ends (whichever guard set it: budget, quota, a refused key),
            // so the probe's success finds them due.
            EmbedError::Stopped { .. } => JobError::release(
                e.to_string(),
                self.health
                    .api_stop_remaining()
                    .unwrap_or_default()
                    .min(std::time::Duration::from_secs(60)),
            ),
            _ => JobError::retry(e.to_string()),
        }
    }

    /// One request through the budget guard and the rate limiter, with retries: a 429 waits
    /// (never counts), a transient error backs off with full jitter up to
    /// `retry.request_retries` times, `insufficient_quota` stops API calls for
    /// `retry.quota_recheck_secs`, the monthly budget stops them for `budget.recheck_secs`.
    /// `budget`: tokens as the provider's per-request cap counts them (the larger of the real
    /// count and 0.25 per byte; requests were planned under that cap); `tokens`: the real count,
    /// which is what is billed and what the tokens-per-minute limit is charged. Charging the
    /// estimate there left ~6% of the quota unused on ordinary text (BENCHMARKS.md); a provider
    /// that counts its quota otherwise is followed through its `x-ratelimit-remaining-tokens`.
    async fn send(
        &self,
        texts: &[&str],
        budget: usize,
        tokens: usize,
    ) -> Result<crate::embed::Embedded, EmbedError> {
        let r = &self.settings.retry;
        let model = self.settings.model.name.clone();
        let mut transient_failures = 0u32;
        let mut probe;
        loop {
            if let Some(reason) = self.health.api_stopped() {
                return Err(EmbedError::Stopped { reason });
            }
            let result = {
                // A request slot first, then the budget and the limiter: spend and tokens are
                // accounted when the request is sent.
                let _slot = self.api_slots.acquire().await.expect("semaphore open");
                // After a stop has expired exactly one request goes out as the probe.
                probe = match self.health.claim_api() {
                    Ok(probe) => probe,
                    Err(reason) => return Err(EmbedError::Stopped { reason }),
                };
                let reservation = match self.budget.reserve(tokens as u64).await {
                    Ok((crate::budget::Decision::Reserved, r)) => r,
                    Ok((exceeded, _)) => return Err(self.stop_at_budget(&exceeded)),
                    Err(e) => {
                        if probe {
                            self.health.end_probe();
                        }
                        return Err(EmbedError::Transient {
                            status: None,
                            message: format!("budget check failed: {e}"),
                            unconfirmed: false,
                        });
                    }
                };
                let permit = self.limiter.acquire(tokens as u32).await;
                tracing::debug!(waited = ?permit.waited, budget, inputs = texts.len(), "rate limiter admitted a request");
                self.stats.api_requests.fetch_add(1, Ordering::Relaxed);
                let started = std::time::Instant::now();
                // Owned copies only for the request in flight (the chunks keep the originals).
                let res = self
                    .embedder
                    .embed(texts.iter().map(|t| t.to_string()).collect())
                    .await;
                let sent_at = permit.sent_at;
                match &res {
                    Ok(_) => self.limiter.accepted(),
                    Err(EmbedError::RateLimited { retry_after, .. }) => self.limiter.refused(
                        retry_after.unwrap_or(std::time::Duration::from_secs(1)),
                        sent_at,
                    ),
                    Err(_) => {}
                }
                drop(permit);
                let (outcome, status) = match &res {
                    Ok(_) => ("ok", Some(200)),
                    Err(e) => (e.class(), e.status()),
                };
                crate::meter::api_request(
                    &model,
                    outcome,
                    status,
                    started.elapsed(),
                    texts.len(),
                    budget,
                );
                if let Some(reservation) = reservation {
                    // What the provider billed; a request that may have reached it without an
                    // answer (timeout, reset) counts as spent at the reserved estimate.
                    let billed = match &res {
                        Ok(d) => Some(d.prompt_tokens),
                        Err(e) if e.may_have_been_billed() => None,
                        Err(_) => Some(0),
                    };
                    if let Ok(d) = &res {
                        self.budget.observe_billing(tokens as u64, d.prompt_tokens);
                    }
                    match self.budget.settle(reservation, billed).await {
                        Ok(crate::budget::Decision::Reserved) => {}
                        Ok(exceeded) => {
                            // Billed more than reserved (another tokenizer): stop now, so the
                            // month goes over by at most the requests already in flight.
                            let _ = self.stop_at_budget(&exceeded);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not settle the budget reservation")
                        }
                    }
                }
                res
            };
            if probe
                && !matches!(
                    result,
                    Ok(_)
                        | Err(EmbedError::QuotaExhausted { .. })
                        | Err(EmbedError::Unauthorized { .. })
                )
            {
                self.health.end_probe();
            }
            match result {
                Ok(done) => {
                    if self.health.api_stop_recorded() {
                        tracing::info!("API calls resumed");
                        self.health.resume_api();
                    }
                    return Ok(done);
                }
                Err(EmbedError::RateLimited {
                    retry_after,
                    message,
                }) => {
                    let wait = retry_after.unwrap_or(std::time::Duration::from_secs(1));
                    self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(?wait, spacing = ?self.limiter.interval(), %message,
                        "429 from the provider: pausing, then pacing requests");
                }
                Err(EmbedError::QuotaExhausted { message }) => {
                    let until = std::time::Instant::now()
                        + std::time::Duration::from_secs(r.quota_recheck_secs);
                    tracing::error!(%message, recheck_secs = r.quota_recheck_secs,
                        "provider quota exhausted (insufficient_quota): API calls stopped, readiness false");
                    self.health
                        .stop_api(format!("insufficient_quota: {message}"), until);
                    return Err(EmbedError::QuotaExhausted { message });
                }
                Err(EmbedError::Unauthorized { status, message }) => {
                    // A revoked or wrong key fails every request alike: stop calling rather than
                    // turn the whole queue into dead letters; one probe after the recheck.
                    let until = std::time::Instant::now()
                        + std::time::Duration::from_secs(r.quota_recheck_secs);
                    tracing::error!(status, %message, recheck_secs = r.quota_recheck_secs,
                        "provider refused the API key: API calls stopped, readiness false; check OPENAI_API_KEY / OPENAI_API_KEY_FILE");
                    self.health.stop_api(
                        format!("provider refused the API key (HTTP {status}): {message}; check OPENAI_API_KEY / OPENAI_API_KEY_FILE"),
                        until,
                    );
                    return Err(EmbedError::Unauthorized { status, message });
                }
                Err(e) if e.is_retryable() && transient_failures < r.request_retries => {
                    transient_failures += 1;
                    let wait = full_jitter(r.base_ms, r.cap_ms, transient_failures);
                    tracing::warn!(error = %e, attempt = transient_failures, ?wait, "transient API error: retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Embeds `inputs` in one request; when the provider rejects the request as invalid, splits
    /// it in halves until the bad input is alone, so the good inputs are still embedded.
    fn embed_isolating<'a>(
        &'a self,
        inputs: Vec<&'a Pending<'a>>,
    ) -> futures::future::BoxFuture<'a, Vec<Result<Vec<f32>, EmbedError>>> {
        Box::pin(async move {
            let texts: Vec<&str> = inputs.iter().map(|p| p.chunk.text.as_str()).collect();
            let budget = inputs
                .iter()
                .map(|p| request_budget_tokens(&p.chunk.text, p.chunk.tokens))
                .sum();
            let model = self.settings.model.name.clone();
            let tokens = inputs.iter().map(|p| p.chunk.tokens).sum();
            match self.send(&texts, budget, tokens).await {
                Ok(done) => {
                    let to_stage: Vec<(&str, &[f32], usize)> = inputs
                        .iter()
                        .zip(&done.vectors)
                        .filter(|(p, v)| {
                            p.stage
                                && crate::embed::check_vector(v, self.settings.model.dimensions)
                                    .is_ok()
                        })
                        .map(|(p, v)| (p.chunk.content_hash.as_str(), v.as_slice(), p.chunk.tokens))
                        .collect();
                    if let Err(e) = stage::put(&self.pool, &model, &to_stage).await {
                        tracing::warn!(error = %e, "could not stage paid-for chunks of a long source");
                    }
                    self.stats
                        .tokens_embedded
                        .fetch_add(done.prompt_tokens, Ordering::Relaxed);
                    crate::meter::tokens_embedded(
                        &model,
                        done.prompt_tokens,
                        self.settings.model.usd_per_million_tokens,
                    );
                    done.vectors.into_iter().map(Ok).collect()
                }
                Err(EmbedError::InvalidInput { .. }) if inputs.len() > 1 => {
                    let right = inputs[inputs.len() / 2..].to_vec();
                    let left = inputs[..inputs.len() / 2].to_vec();
                    let (mut a, b) =
                        futures::join!(self.embed_isolating(left), self.embed_isolating(right));
                    a.extend(b);
                    a
                }
                Err(e) => {
                    tracing::warn!(class = e.class(), error = %e, inputs = inputs.len(), "embedding request failed");
                    inputs.iter().map(|_| Err(e.clone())).collect()
                }
            }
        })
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(cap, base · 2^attempt)].
pub fn full_jitter(base_ms: u64, cap_ms: u64, attempt: u32) -> std::time::Duration {
    let ceiling = base_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(cap_ms)
        .max(1);
    std::time::Duration::from_millis(rand::random_range(0..=ceiling))
}

/// Packs inputs (given by their budgeted token counts) into consecutive ranges, each at most
/// `max_inputs` long and `max_tokens` in total. An input is never split across requests.
pub fn plan_requests(
    budgets: impl IntoIterator<Item = usize>,
    max_inputs: usize,
    max_tokens: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut tokens = 0;
    let mut i = 0;
    for b in budgets {
        if i > start && (i - start == max_inputs || tokens + b > max_tokens) {
            ranges.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += b;
        i += 1;
    }
    if i > start {
        ranges.push(start..i);
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::plan_requests;

    #[test]
    fn requests_respect_input_and_token_caps() {
        assert_eq!(
            plan_requests(vec![1; 5000], 2048, 300_000),
            vec![0..2048, 2048..4096, 4096..5000]
        );
        assert_eq!(
            plan_requests(vec![8000; 80], 2048, 300_000),
            vec![0..37, 37..74, 74..80]
        );
        assert_eq!(
            plan_requests(Vec::<usize>::new(), 2048, 300_000),
            Vec::<std::ops::Range<usize>>::new()
        );
        for r in plan_requests((0..3000).map(|i| (i * 37) % 8000), 2048, 300_000) {
            assert!(r.len() <= 2048);
            let sum: usize = r.clone().map(|i| (i * 37) % 8000).sum();
            assert!(sum <= 300_000);
        }
    }
}
