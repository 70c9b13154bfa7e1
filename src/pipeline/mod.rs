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
use std::sync::atomic::Ordering;

use sqlx::PgPool;

use crate::config::Settings;
use crate::embed::caller::Caller;
use crate::embed::plan::plan_requests;
use crate::embed::{EmbedError, Embedder};
use crate::guard::health::Health;
pub use crate::job::{Disposition, Job, JobError, JobOutcome, JobResult};
use crate::meter::Stats;
use crate::source::EmbedSource;
use chunk::{Chunk, Chunker, ChunkerThread, request_cap_tokens};
use write::{ChunkWrite, SourceWrite, WriteOutcome};

/// One process's pipeline: what every batch shares.
pub struct Pipeline {
    /// The worker role's pool (reads sources, writes `rag_embeddings`, updates job rows).
    pub pool: PgPool,
    /// The configuration.
    pub settings: Arc<Settings>,
    /// Tokenizing and splitting, on their own thread.
    chunker: ChunkerThread,
    /// Every API request goes through it (guards, limiter, retries).
    caller: Caller,
    /// Readiness and the API gate.
    pub health: Arc<Health>,
    /// This process's counters.
    pub stats: Arc<Stats>,
}

/// Each source's chunks, with the `updated_at` its text was read at.
pub type Chunked = Vec<(EmbedSource, chrono::DateTime<chrono::Utc>, Vec<Chunk>)>;
/// Vectors in hand, by (source, chunk index).
pub type Vectors = HashMap<(EmbedSource, usize), pgvector::Vector>;

/// What to write for one source: every chunk, with its vector when one was embedded (taken
/// from `vectors`); a chunk without one is unchanged.
pub fn source_write(
    source: EmbedSource,
    read_at: chrono::DateTime<chrono::Utc>,
    chunks: &[Chunk],
    vectors: &mut Vectors,
) -> SourceWrite {
    SourceWrite {
        source,
        read_at,
        chunks: chunks
            .iter()
            .map(|c| ChunkWrite {
                index: c.index,
                content_hash: c.content_hash.clone(),
                tokens: c.tokens,
                vector: vectors.remove(&(source, c.index)),
            })
            .collect(),
    }
}

/// A batch up to the embed stage, for the bulk lane, which embeds through the Batch API: the
/// sources settled already, every source's chunks, the vectors in hand (unchanged chunks are
/// not in it: they are written as unchanged), and which chunks must be embedded.
pub struct Prepared {
    /// Sources settled before any API call (gone, too large).
    pub results: HashMap<EmbedSource, JobResult>,
    /// The sources to write, with their chunks.
    pub chunked: Chunked,
    /// Vectors already in hand (staged from an earlier attempt).
    pub vectors: Vectors,
    /// (source, chunk index) of each chunk to embed.
    pub to_send: std::collections::HashSet<(EmbedSource, usize)>,
}
/// When each job became due, by job id (for the job-latency metric).
type DueAt = HashMap<String, chrono::DateTime<chrono::Utc>>;

/// One input to embed: which source and chunk it belongs to.
struct ToEmbed<'a> {
    source: EmbedSource,
    chunk: &'a Chunk,
    /// The source has several chunks: stage the vector as soon as it is paid for.
    stage: bool,
}

impl Pipeline {
    /// The pipeline for `settings`, calling `embedder`.
    pub fn new(
        pool: PgPool,
        settings: Arc<Settings>,
        embedder: Embedder,
        health: Arc<Health>,
    ) -> anyhow::Result<Self> {
        let chunker = ChunkerThread::spawn(Chunker::for_model(&settings.model)?)?;
        let stats = Arc::new(Stats::default());
        let caller = Caller::new(
            pool.clone(),
            settings.clone(),
            embedder,
            health.clone(),
            stats.clone(),
        );
        Ok(Pipeline {
            pool,
            settings,
            chunker,
            caller,
            health,
            stats,
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

    /// The batch, step by step: start → load → chunk → skip unchanged → embed → write →
    /// outcomes. `results` collects each source's answer as soon as a step settles it.
    async fn process_inner(&self, jobs: &[Job]) -> anyhow::Result<HashMap<EmbedSource, JobResult>> {
        let mut results: HashMap<EmbedSource, JobResult> = HashMap::new();
        let (sources, due_at) = self.start(jobs).await?;
        let loaded = load::load(&self.pool, &self.settings.render, &sources).await?;
        let chunked = self.chunk(sources, loaded, &mut results).await?;
        let (to_embed, mut vectors) = self.skip_unchanged(&chunked).await?;
        let failures = self.embed_all(&to_embed, &mut vectors).await;
        let writes = self.writes(&chunked, failures, vectors, &mut results);
        let outcomes = self.write(&writes).await?;
        self.outcomes(&writes, &outcomes, &mut results);
        let now = chrono::Utc::now();
        for j in jobs {
            if let (Some(Ok(_)), Some(due)) = (results.get(&j.source), due_at.get(&j.id)) {
                crate::meter::job_latency((now - *due).as_seconds_f64());
            }
        }
        Ok(results)
    }

    /// The stages before embedding (start → load → chunk → skip unchanged), for the bulk lane.
    pub async fn prepare(&self, jobs: &[Job]) -> anyhow::Result<Prepared> {
        let mut results: HashMap<EmbedSource, JobResult> = HashMap::new();
        let (sources, _) = self.start(jobs).await?;
        let loaded = load::load(&self.pool, &self.settings.render, &sources).await?;
        let chunked = self.chunk(sources, loaded, &mut results).await?;
        let (to_embed, vectors) = self.skip_unchanged(&chunked).await?;
        let to_send = to_embed.iter().map(|p| (p.source, p.chunk.index)).collect();
        Ok(Prepared {
            results,
            chunked,
            vectors,
            to_send,
        })
    }

    /// The stages after embedding (write → outcomes), for the bulk lane: writes `writes` and
    /// adds each source's answer to `results`.
    pub async fn finish(
        &self,
        writes: &[SourceWrite],
        results: &mut HashMap<EmbedSource, JobResult>,
    ) -> anyhow::Result<()> {
        let outcomes = self.write(writes).await?;
        self.outcomes(writes, &outcomes, results);
        Ok(())
    }

    /// Start: clear the jobs' dedup keys (a change from now on queues a new job); the distinct
    /// sources, and when each job became due.
    async fn start(&self, jobs: &[Job]) -> anyhow::Result<(Vec<EmbedSource>, DueAt)> {
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        let due_at = crate::queue::start_jobs(&self.pool, &ids).await?;
        Ok((write::distinct(jobs.iter().map(|j| j.source)), due_at))
    }

    /// Chunk, on the tokenizer thread. A source that is gone is settled here, and so is one over
    /// `model.max_source_tokens` (a dead letter with its size, before any API call).
    async fn chunk(
        &self,
        sources: Vec<EmbedSource>,
        loaded: HashMap<EmbedSource, load::Loaded>,
        results: &mut HashMap<EmbedSource, JobResult>,
    ) -> anyhow::Result<Chunked> {
        let (model, dims) = (
            self.settings.model.name.clone(),
            self.settings.model.dimensions,
        );
        let (gone, mut chunked): (Vec<EmbedSource>, Chunked) = self
            .chunker
            .run(move |chunker| {
                let (mut gone, mut chunked) = (Vec::new(), Vec::new());
                for src in sources {
                    match loaded.get(&src) {
                        None => gone.push(src),
                        Some(l) => {
                            chunked.push((src, l.updated_at, chunker.chunks(&l.text, &model, dims)))
                        }
                    }
                }
                (gone, chunked)
            })
            .await?;
        for src in gone {
            results.insert(src, Ok(JobOutcome::SourceGone));
        }
        let cap = self.settings.model.max_source_tokens;
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
            }
            tokens <= cap
        });
        Ok(chunked)
    }

    /// Never pay twice: chunks whose stored hash matches are not sent, and chunks of long
    /// sources an earlier attempt paid for come from the stage. Returns what is left to embed
    /// and the vectors already in hand.
    async fn skip_unchanged<'c>(
        &self,
        chunked: &'c Chunked,
    ) -> anyhow::Result<(Vec<ToEmbed<'c>>, Vectors)> {
        let model = self.settings.model.name.as_str();
        let present: Vec<EmbedSource> = chunked.iter().map(|(s, _, _)| *s).collect();
        let stored = write::existing_hashes(&self.pool, model, &present).await?;
        let mut to_embed: Vec<ToEmbed> = Vec::new();
        let mut saved_tokens = 0u64;
        for (src, _, chunks) in chunked {
            for c in chunks {
                if stored.get(&(*src, c.index)) == Some(&c.content_hash) {
                    saved_tokens += c.tokens as u64;
                } else {
                    to_embed.push(ToEmbed {
                        source: *src,
                        chunk: c,
                        stage: chunks.len() > 1,
                    });
                }
            }
        }
        let mut vectors = Vectors::new();
        let staged_hashes: Vec<&str> = to_embed
            .iter()
            .filter(|p| p.stage)
            .map(|p| p.chunk.content_hash.as_str())
            .collect();
        let mut staged = stage::take(&self.pool, model, &staged_hashes).await?;
        if !staged.is_empty() {
            to_embed.retain(|p| match staged.remove(&p.chunk.content_hash) {
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
        Ok((to_embed, vectors))
    }

    /// Embed: pack into requests within the provider's limits and run them concurrently. Each
    /// vector is checked; a source with a failed request or an unusable vector is returned
    /// with the error (the first for that source).
    async fn embed_all(
        &self,
        to_embed: &[ToEmbed<'_>],
        vectors: &mut Vectors,
    ) -> HashMap<EmbedSource, EmbedError> {
        let s = &self.settings;
        let plan = plan_requests(
            to_embed
                .iter()
                .map(|p| request_cap_tokens(&p.chunk.text, p.chunk.tokens)),
            s.api.max_inputs_per_request,
            self.caller
                .max_request_tokens()
                .map_or(s.api.max_tokens_per_request, |b| {
                    (b as usize).min(s.api.max_tokens_per_request)
                }),
        );
        let request_results = futures::future::join_all(plan.iter().map(|range| {
            let inputs: Vec<&ToEmbed> = to_embed[range.clone()].iter().collect();
            self.embed_isolating(inputs)
        }))
        .await;
        let mut failures: HashMap<EmbedSource, EmbedError> = HashMap::new();
        for (range, res) in plan.iter().zip(request_results) {
            for (p, r) in to_embed[range.clone()].iter().zip(res) {
                match r {
                    Ok(v) => match crate::embed::check_vector(&v, s.model.dimensions) {
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
        failures
    }

    /// What to write: every source that has all its chunks; a failed one is settled here.
    fn writes(
        &self,
        chunked: &Chunked,
        failures: HashMap<EmbedSource, EmbedError>,
        mut vectors: Vectors,
        results: &mut HashMap<EmbedSource, JobResult>,
    ) -> Vec<SourceWrite> {
        let mut writes = Vec::new();
        for (src, read_at, chunks) in chunked {
            if let Some(e) = failures.get(src) {
                results.insert(*src, Err(self.job_error(e)));
                continue;
            }
            writes.push(source_write(*src, *read_at, chunks, &mut vectors));
        }
        writes
    }

    /// Write: one transaction for the batch; then forget the staged chunks it stored.
    async fn write(
        &self,
        writes: &[SourceWrite],
    ) -> anyhow::Result<HashMap<EmbedSource, WriteOutcome>> {
        let s = &self.settings;
        let model = s.model.name.as_str();
        let started = std::time::Instant::now();
        let outcomes = write::write_batch(
            &self.pool,
            model,
            s.model.dimensions,
            &s.queue.name,
            s.queue.max_attempts,
            writes,
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
        Ok(outcomes)
    }

    /// Outcomes: each written source's answer, and the write metrics.
    fn outcomes(
        &self,
        writes: &[SourceWrite],
        outcomes: &HashMap<EmbedSource, WriteOutcome>,
        results: &mut HashMap<EmbedSource, JobResult>,
    ) {
        let model = self.settings.model.name.as_str();
        let mut written_chunks = 0u64;
        for w in writes {
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
    }

    /// What a request failure means for the jobs whose inputs were in it.
    pub fn job_error(&self, e: &EmbedError) -> JobError {
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
                    .api
                    .remaining()
                    .unwrap_or_default()
                    .min(std::time::Duration::from_secs(60)),
            ),
            _ => JobError::retry(e.to_string()),
        }
    }

    /// Embeds `inputs` in one request; when the provider rejects the request as invalid, splits
    /// it in halves until the bad input is alone, so the good inputs are still embedded.
    fn embed_isolating<'a>(
        &'a self,
        inputs: Vec<&'a ToEmbed<'a>>,
    ) -> futures::future::BoxFuture<'a, Vec<Result<Vec<f32>, EmbedError>>> {
        Box::pin(async move {
            let texts: Vec<&str> = inputs.iter().map(|p| p.chunk.text.as_str()).collect();
            let budget = inputs
                .iter()
                .map(|p| request_cap_tokens(&p.chunk.text, p.chunk.tokens))
                .sum();
            let model = self.settings.model.name.clone();
            let tokens = inputs.iter().map(|p| p.chunk.tokens).sum();
            match self.caller.send(&texts, budget, tokens).await {
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
