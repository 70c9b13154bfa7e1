//! The pipeline for one batch: prepare (load → tokenize/split → skip what is paid for) → embed →
//! finish (write → answers).
//!
//! Why a batch and not a job: the API bills and limits per request, and the database is fastest
//! with set-based statements. A batch of up to `batch.max_jobs` sources becomes as few API
//! requests as the provider's limits allow (≤ 2,048 inputs, ≤ 300,000 counted tokens each) and
//! one write transaction. Each job still gets its own answer: a bad input fails only its source.
//!
//! Both lanes run the same three public steps: the sync lane [`Pipeline::prepare`] →
//! [`Pipeline::embed`] → [`Pipeline::finish`]; the bulk lane [`Pipeline::prepare`] → the Batch API
//! → [`Pipeline::write`] of what came back. The embed step's requests are in `embed`.

pub(crate) mod batcher;
pub mod chunk;
pub mod cl100k;
mod embed;
pub mod load;
pub(crate) mod paid;
pub mod write;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sqlx::PgPool;

use crate::config::Settings;
use crate::embed::Embedder;
use crate::embed::caller::Caller;
use crate::guard::health::Health;
pub use crate::job::{Disposition, Job, JobError, JobOutcome, JobResult};
use crate::meter::Stats;
use crate::source::EmbedSource;
use chunk::{Chunk, Chunker, ChunkerThread};
use write::WriteOutcome;
pub use write::{ChunkWrite, SourceWrite};

/// One process's pipeline: what every batch shares.
pub struct Pipeline {
    /// The worker role's pool (reads sources, writes `rag_embeddings`, updates job rows).
    pub pool: PgPool,
    /// Shared by every step; read-only.
    pub settings: Arc<Settings>,
    /// Tokenizing and splitting, on their own thread.
    chunker: ChunkerThread,
    /// Every API request goes through it (guards, limiter, retries).
    caller: Caller,
    /// Readiness and the API gate (a stop releases jobs until it ends).
    pub health: Arc<Health>,
    /// This process's counters (tokens embedded and saved, chunks written).
    pub stats: Arc<Stats>,
    /// The serving model's pipeline while it is not the writing one (dual-write).
    serving: tokio::sync::Mutex<Option<Arc<Pipeline>>>,
    /// The writing model's pipeline while this worker's config names another (a rolling
    /// deploy): the jobs that name a model are a backfill of the writing model.
    writing_pipeline: tokio::sync::Mutex<Option<Arc<Pipeline>>>,
    /// Whether a write marks unchanged chunks as verified (false for the serving model's).
    touch_unchanged: bool,
    /// The registry's writing and serving models as last read, and when.
    #[allow(clippy::type_complexity)]
    registry: std::sync::Mutex<Option<(std::time::Instant, (Option<String>, Option<String>))>>,
}

/// One source read and split.
pub struct ChunkedSource {
    /// The source.
    pub source: EmbedSource,
    /// Its `updated_at` when the text was read (newest wins at the write).
    pub read_at: chrono::DateTime<chrono::Utc>,
    /// Its chunks, in order (empty for an empty text).
    pub chunks: Vec<Chunk>,
}

/// Vectors in hand, by (source, chunk index).
pub type Vectors = HashMap<(EmbedSource, usize), pgvector::Vector>;

/// A batch after [`Pipeline::prepare`]: what is settled, what is in hand, what must be embedded.
pub struct Prepared {
    /// Sources answered already (gone, too large, or failed at the embed step).
    pub results: HashMap<EmbedSource, JobResult>,
    /// Every source still to write, with its chunks.
    pub sources: Vec<ChunkedSource>,
    /// Vectors in hand (kept from an earlier attempt, or embedded since).
    pub vectors: Vectors,
    /// (source, chunk index) of each chunk that must be embedded; every other chunk is stored
    /// unchanged or in `vectors`.
    to_embed: HashSet<(EmbedSource, usize)>,
}

impl Prepared {
    /// Whether chunk `index` of `source` must be embedded.
    pub fn must_embed(&self, source: EmbedSource, index: usize) -> bool {
        self.to_embed.contains(&(source, index))
    }

    /// Each source with chunks to embed, and those chunks, in order.
    pub fn to_embed(&self) -> Vec<(&ChunkedSource, Vec<&Chunk>)> {
        self.sources
            .iter()
            .filter_map(|s| {
                let mine: Vec<&Chunk> = s
                    .chunks
                    .iter()
                    .filter(|c| self.must_embed(s.source, c.index))
                    .collect();
                (!mine.is_empty()).then_some((s, mine))
            })
            .collect()
    }

    /// Takes out the sources with nothing to embed (unchanged, or every chunk in hand) as
    /// writes: they need no API call.
    pub fn take_ready(&mut self) -> Vec<SourceWrite> {
        let (ready, rest): (Vec<ChunkedSource>, Vec<ChunkedSource>) =
            std::mem::take(&mut self.sources)
                .into_iter()
                .partition(|s| !s.chunks.iter().any(|c| self.must_embed(s.source, c.index)));
        self.sources = rest;
        ready.iter().map(|s| self.source_write(s)).collect()
    }

    /// What to write for one source: every chunk, with its vector when one is in hand (taken
    /// out of `vectors`); a chunk without one is unchanged.
    fn source_write(&mut self, s: &ChunkedSource) -> SourceWrite {
        SourceWrite {
            source: s.source,
            read_at: s.read_at,
            chunks: s
                .chunks
                .iter()
                .map(|c| ChunkWrite {
                    index: c.index,
                    content_hash: c.content_hash.clone(),
                    tokens: c.tokens,
                    vector: self.vectors.remove(&(s.source, c.index)),
                })
                .collect(),
        }
    }
}

/// A write slower than this is logged (one short line; its jobs are in the batch span at debug).
const SLOW_WRITE: std::time::Duration = std::time::Duration::from_secs(1);

/// When each job became due, by job id (for the job-latency metric).
type DueAt = HashMap<String, chrono::DateTime<chrono::Utc>>;

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
            serving: tokio::sync::Mutex::new(None),
            writing_pipeline: tokio::sync::Mutex::new(None),
            touch_unchanged: true,
            registry: std::sync::Mutex::new(None),
        })
    }

    /// The monthly budget at the Batch API's price, spending as `<model> (batch)`: the sync
    /// lane's guard with its observed billing ratio.
    pub fn batch_budget(&self) -> crate::guard::budget::Budget {
        self.batch_budget_of(&self.settings.model)
    }

    /// [`Pipeline::batch_budget`] for model `m` (a batch another model submitted), at its price.
    pub fn batch_budget_of(
        &self,
        m: &crate::config::ModelSettings,
    ) -> crate::guard::budget::Budget {
        self.caller.budget().at_price(
            &format!("{} (batch)", m.name),
            m.batch_usd_per_million_tokens,
        )
    }

    /// Processes one batch of jobs (the sync lane); returns every job's result by job id.
    ///
    /// A job naming a model is a backfill of the registry's writing model (migration 25). When
    /// that is not this worker's model (a worker left on an older config in a rolling deploy),
    /// those jobs run through the writing model's pipeline (its dimensions and price from the
    /// registry): ended against this worker's own model's rows, as they were, they were no-ops
    /// and the new model's backfill stopped at 140 of 3,024. Giving them back instead made this
    /// worker, whose fetch loop runs while it finds jobs, claim them straight back.
    pub async fn process(&self, jobs: &[Job]) -> HashMap<String, JobResult> {
        if jobs.iter().any(|j| j.model.is_some())
            && let Some(writing) = self.writing_pipeline().await
        {
            let (theirs, ours): (Vec<Job>, Vec<Job>) =
                jobs.iter().cloned().partition(|j| j.model.is_some());
            let mut results = self.process_own(&ours).await;
            results.extend(writing.process_own(&theirs).await);
            return results;
        }
        self.process_own(jobs).await
    }

    /// The writing model's pipeline when it is registered and not this one (read afresh: a
    /// `migrate` seconds ago counts), else `None` (and with the local provider, which embeds
    /// with one model only).
    async fn writing_pipeline(&self) -> Option<Arc<Pipeline>> {
        let writing: Option<(String, i32)> =
            sqlx::query_as("SELECT name::text, dimensions FROM embed_worker.models WHERE writing")
                .fetch_optional(&self.pool)
                .await
                .ok()
                .flatten();
        let m = &self.settings.model;
        let (name, dims) = writing.filter(|(name, _)| *name != m.name)?;
        if m.provider == crate::config::Provider::Local {
            return None;
        }
        let mut slot = self.writing_pipeline.lock().await;
        if let Some(p) = slot.as_ref()
            && p.settings.model.name == name
            && p.settings.model.dimensions == dims as usize
        {
            return Some(p.clone());
        }
        match self.pipeline_for(&name, dims as usize, true).await {
            Ok(p) => {
                tracing::warn!(configured = %m.name, writing = %name,
                    "jobs of the writing model's backfill are embedded with it: this worker's \
                     model.name is not the writing model (roll it out with the current configuration)");
                *slot = Some(p.clone());
                Some(p)
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), writing = %name, "no pipeline for the writing model");
                None
            }
        }
    }

    /// A pipeline like this one for registered model `name` at `dims`, at its own price.
    async fn pipeline_for(
        &self,
        name: &str,
        dims: usize,
        touch_unchanged: bool,
    ) -> anyhow::Result<Arc<Pipeline>> {
        let mut settings = (*self.settings).clone();
        settings.model = crate::model_index::lifecycle::settings_for(
            &self.pool,
            &self.settings.model,
            name,
            dims,
        )
        .await?;
        let embedder = Embedder::from_settings(&settings.api, &settings.model)?;
        let mut p = Pipeline::new(
            self.pool.clone(),
            Arc::new(settings),
            embedder,
            self.health.clone(),
        )?;
        p.touch_unchanged = touch_unchanged;
        Ok(Arc::new(p))
    }

    /// [`Pipeline::process`] of jobs all for this pipeline's model.
    async fn process_own(&self, jobs: &[Job]) -> HashMap<String, JobResult> {
        if jobs.is_empty() {
            return HashMap::new();
        }
        let by_source = match self.process_batch(jobs).await {
            Ok(by_source) => by_source,
            Err(e) => {
                // Database trouble: every job of the batch is retried.
                tracing::warn!(error = %format!("{e:#}"), jobs = jobs.len(), "batch failed");
                let err = JobError::retry(format!("batch failed: {e:#}"));
                jobs.iter().map(|j| (j.source, Err(err.clone()))).collect()
            }
        };
        let mut results =
            crate::job::by_job(jobs.iter().map(|j| (j.id.as_str(), j.source)), &by_source);
        for j in jobs {
            results
                .entry(j.id.clone())
                .or_insert_with(|| Err(JobError::retry("internal: no result for source")));
        }
        results
    }

    /// The sync lane's sequence: start → prepare → embed → finish, then the same for the serving
    /// model while it is not the writing one.
    async fn process_batch(&self, jobs: &[Job]) -> anyhow::Result<HashMap<EmbedSource, JobResult>> {
        let due_at = self.start(jobs).await?;
        let mut batch = self.prepare(jobs.iter().map(|j| j.source)).await?;
        self.embed(&mut batch).await;
        let results = self.finish(batch).await?;
        let results = self.dual_write(results).await?;
        let now = chrono::Utc::now();
        for j in jobs {
            if let (Some(Ok(_)), Some(due)) = (results.get(&j.source), due_at.get(&j.id)) {
                crate::meter::job_latency((now - *due).as_seconds_f64());
            }
        }
        Ok(results)
    }

    /// Dual-write: while a switch is under way (the serving model is not this one), each source
    /// this batch wrote is brought up to date in the serving model too, so searches never read
    /// stale text. Unchanged chunks cost nothing (the serving model's hashes match); a backfill
    /// job therefore costs only the writing model. A source the serving model fails is this
    /// job's failure: its retry finds the writing model's part paid for.
    async fn dual_write(
        &self,
        mut results: HashMap<EmbedSource, JobResult>,
    ) -> anyhow::Result<HashMap<EmbedSource, JobResult>> {
        let Some(serving) = self.serving_pipeline().await? else {
            return Ok(results);
        };
        let written: Vec<EmbedSource> = results
            .iter()
            .filter(|(_, r)| {
                matches!(
                    r,
                    Ok(JobOutcome::Embedded { .. }
                        | JobOutcome::Unchanged { .. }
                        | JobOutcome::SkippedEmpty)
                )
            })
            .map(|(s, _)| *s)
            .collect();
        if written.is_empty() {
            return Ok(results);
        }
        let mut batch = serving.prepare(written).await?;
        serving.embed(&mut batch).await;
        for (src, r) in serving.finish(batch).await? {
            if let Err(e) = r {
                results.insert(src, Err(e));
            }
        }
        Ok(results)
    }

    /// The serving model's pipeline when it is not this one (read from `embed_worker.models`
    /// each batch: a promotion or a rollback takes effect at the next batch).
    async fn serving_pipeline(&self) -> anyhow::Result<Option<Arc<Pipeline>>> {
        let serving: Option<(String, i32)> =
            sqlx::query_as("SELECT name::text, dimensions FROM embed_worker.models WHERE serving")
                .fetch_optional(&self.pool)
                .await?;
        let m = &self.settings.model;
        let Some((name, dims)) = serving.filter(|(name, _)| *name != m.name) else {
            return Ok(None);
        };
        let mut slot = self.serving.lock().await;
        if let Some(p) = slot.as_ref()
            && p.settings.model.name == name
            && p.settings.model.dimensions == dims as usize
        {
            return Ok(Some(p.clone()));
        }
        if m.provider == crate::config::Provider::Local {
            static WARNED: std::sync::atomic::AtomicBool =
                std::sync::atomic::AtomicBool::new(false);
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(writing = %m.name, serving = %name,
                    "no dual-write: the local provider embeds with one model only, so the serving \
                     model misses changes until `embed-worker models promote` switches it");
            }
            return Ok(None);
        }
        // At the serving model's own price: its tokens are billed at it.
        let p = self.pipeline_for(&name, dims as usize, false).await?;
        tracing::info!(writing = %m.name, serving = %name,
            "dual-write: changed text is embedded with the serving model too until the switch ends");
        *slot = Some(p.clone());
        Ok(Some(p))
    }

    /// The registry's (writing, serving) models, read at most every 5 s (every handled job
    /// asks); `(None, None)` when none is registered or it cannot be read now.
    async fn registry(&self) -> (Option<String>, Option<String>) {
        const FOR: std::time::Duration = std::time::Duration::from_secs(5);
        if let Some((at, roles)) = self.registry.lock().unwrap().as_ref()
            && at.elapsed() < FOR
        {
            return roles.clone();
        }
        let roles: (Option<String>, Option<String>) = sqlx::query_as(
            "SELECT (SELECT name::text FROM embed_worker.models WHERE writing),
                    (SELECT name::text FROM embed_worker.models WHERE serving)",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap_or((None, None));
        *self.registry.lock().unwrap() = Some((std::time::Instant::now(), roles.clone()));
        roles
    }

    /// Why this worker takes no job now, if it does not: its model (`model.name`) is neither
    /// the writing nor the serving one, so what it wrote would be read by no search and the
    /// models that are would miss it (a worker left on an older config after a switch).
    pub async fn idle_reason(&self) -> Option<String> {
        let own = &self.settings.model.name;
        match self.registry().await {
            (None, None) => None,
            (w, s) if w.as_ref() == Some(own) || s.as_ref() == Some(own) => None,
            (w, s) => Some(format!(
                "model.name = {own} is neither the writing ({}) nor the serving ({}) model: this \
                 worker takes no job (its jobs go back to the queue); roll it out with the current \
                 configuration",
                w.as_deref().unwrap_or("none"),
                s.as_deref().unwrap_or("none"),
            )),
        }
    }

    /// Start: clear the jobs' dedup keys (a change from now on queues a new job); when each job
    /// became due. (The batch lane's claim clears them itself.)
    async fn start(&self, jobs: &[Job]) -> anyhow::Result<DueAt> {
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        Ok(crate::queue::start_jobs(&self.pool, &ids).await?)
    }

    /// Prepare: load → chunk → skip what is paid for, for each distinct source (in order).
    /// Both lanes' first step.
    pub async fn prepare(
        &self,
        sources: impl IntoIterator<Item = EmbedSource>,
    ) -> anyhow::Result<Prepared> {
        let mut seen = HashSet::new();
        let sources: Vec<EmbedSource> = sources.into_iter().filter(|s| seen.insert(*s)).collect();
        let mut results: HashMap<EmbedSource, JobResult> = HashMap::new();
        let loaded = load::load(&self.pool, &self.settings.render, &sources).await?;
        let sources = self.chunk(sources, loaded, &mut results).await?;
        let (to_embed, vectors) = self.skip_paid(&sources).await?;
        Ok(Prepared {
            results,
            sources,
            vectors,
            to_embed,
        })
    }

    /// Embed (the sync lane): what `batch` must embed, through the provider; each vector is
    /// checked. A source with a failed request or an unusable vector is answered with the error
    /// (the first for that source) and not written.
    pub async fn embed(&self, batch: &mut Prepared) {
        let step = embed::Step {
            caller: &self.caller,
            pool: &self.pool,
            settings: &self.settings,
            stats: &self.stats,
        };
        let (vectors, failures) = {
            let inputs: Vec<embed::Input> = batch
                .to_embed()
                .into_iter()
                .flat_map(|(src, chunks)| {
                    let keep_paid = src.chunks.len() > 1;
                    chunks.into_iter().map(move |chunk| embed::Input {
                        source: src.source,
                        chunk,
                        keep_paid,
                    })
                })
                .collect();
            embed::embed_all(&step, &inputs).await
        };
        batch.vectors.extend(vectors);
        let quota_recheck =
            std::time::Duration::from_secs(self.settings.retry.quota_recheck_secs.min(60));
        let stopped_for = self
            .health
            .api
            .remaining()
            .unwrap_or_default()
            .min(std::time::Duration::from_secs(60));
        for (src, e) in failures {
            batch.results.insert(
                src,
                Err(JobError::from_embed(&e, quota_recheck, stopped_for)),
            );
        }
    }

    /// Finish (the sync lane): write every source not answered yet; every source's answer.
    pub async fn finish(
        &self,
        mut batch: Prepared,
    ) -> anyhow::Result<HashMap<EmbedSource, JobResult>> {
        let sources = std::mem::take(&mut batch.sources);
        let unanswered: Vec<&ChunkedSource> = sources
            .iter()
            .filter(|s| !batch.results.contains_key(&s.source))
            .collect();
        let writes: Vec<SourceWrite> = unanswered
            .into_iter()
            .map(|s| batch.source_write(s))
            .collect();
        self.write(&writes, &mut batch.results).await?;
        Ok(batch.results)
    }

    /// Chunk, on the tokenizer thread. A source that is gone is settled here, and so is one over
    /// `model.max_source_tokens` (a dead letter with its size, before any API call).
    async fn chunk(
        &self,
        sources: Vec<EmbedSource>,
        loaded: HashMap<EmbedSource, load::Loaded>,
        results: &mut HashMap<EmbedSource, JobResult>,
    ) -> anyhow::Result<Vec<ChunkedSource>> {
        let (model, dims) = (
            self.settings.model.name.clone(),
            self.settings.model.dimensions,
        );
        let (gone, mut chunked): (Vec<EmbedSource>, Vec<ChunkedSource>) = self
            .chunker
            .call(move |chunker| {
                let (mut gone, mut chunked) = (Vec::new(), Vec::new());
                for source in sources {
                    match loaded.get(&source) {
                        None => gone.push(source),
                        Some(l) => chunked.push(ChunkedSource {
                            source,
                            read_at: l.read_at,
                            chunks: chunker.chunks(&l.text, &model, dims),
                        }),
                    }
                }
                (gone, chunked)
            })
            .await?;
        for src in gone {
            results.insert(src, Ok(JobOutcome::SourceGone));
        }
        let cap = self.settings.model.max_source_tokens;
        chunked.retain(|s| {
            let tokens: usize = s.chunks.iter().map(|c| c.tokens).sum();
            if tokens > cap {
                results.insert(
                    s.source,
                    Err(JobError::dead(format!(
                        "source too large: {tokens} tokens in {} chunks (model.max_source_tokens = {cap})",
                        s.chunks.len()
                    ))),
                );
            }
            tokens <= cap
        });
        Ok(chunked)
    }

    /// Never pay twice: chunks whose stored hash matches are not sent, and chunks of long
    /// sources an earlier attempt paid for come from [`paid`]. Returns which chunks are left to
    /// embed and the vectors already in hand.
    async fn skip_paid(
        &self,
        sources: &[ChunkedSource],
    ) -> anyhow::Result<(HashSet<(EmbedSource, usize)>, Vectors)> {
        let model = self.settings.model.name.as_str();
        let present: Vec<EmbedSource> = sources.iter().map(|s| s.source).collect();
        let stored = paid::stored_hashes(&self.pool, model, &present).await?;
        let mut to_embed = HashSet::new();
        let mut kept_hashes: Vec<&str> = Vec::new();
        let mut saved_tokens = 0u64;
        let untimed = self.settings.freshness.adopt_untimed;
        let mut adopted = 0u64;
        for s in sources {
            for c in &s.chunks {
                let st = stored.get(&(s.source, c.index));
                let kept = st.is_some_and(|st| st.hash == c.content_hash);
                // The app's vector of an unchanged source: kept, and its hash recorded by the
                // write (the unchanged chunks' touch).
                let adopt = !kept
                    && s.chunks.len() == 1
                    && st.is_some_and(|st| st.adoptable(s.read_at, untimed));
                if adopt {
                    adopted += 1;
                }
                if kept || adopt {
                    saved_tokens += c.tokens as u64;
                } else {
                    to_embed.insert((s.source, c.index));
                    if s.chunks.len() > 1 {
                        kept_hashes.push(c.content_hash.as_str());
                    }
                }
            }
        }
        let mut vectors = Vectors::new();
        let mut kept = paid::take(&self.pool, model, &kept_hashes).await?;
        if !kept.is_empty() {
            for s in sources.iter().filter(|s| s.chunks.len() > 1) {
                for c in &s.chunks {
                    if !to_embed.contains(&(s.source, c.index)) {
                        continue;
                    }
                    if let Some((v, _)) = kept.remove(&c.content_hash) {
                        saved_tokens += c.tokens as u64;
                        vectors.insert((s.source, c.index), v);
                        to_embed.remove(&(s.source, c.index));
                    }
                }
            }
        }
        self.stats
            .tokens_saved
            .fetch_add(saved_tokens, Ordering::Relaxed);
        crate::meter::tokens_saved(model, saved_tokens);
        crate::meter::adopted(model, adopted);
        Ok((to_embed, vectors))
    }

    /// Write `writes` (one transaction), forget the kept vectors of long sources it stored,
    /// and add each written source's answer to `results`. The bulk lane calls it with what a
    /// batch brought back, in parts.
    pub async fn write(
        &self,
        writes: &[SourceWrite],
        results: &mut HashMap<EmbedSource, JobResult>,
    ) -> anyhow::Result<()> {
        let m = &self.settings.model;
        self.write_model(&m.name, m.dimensions, writes, results)
            .await
    }

    /// [`Pipeline::write`] into `model`'s partition at its `dimensions`: a batch is written as
    /// the model that submitted it, whichever model this worker is configured with.
    pub async fn write_model(
        &self,
        model: &str,
        dimensions: usize,
        writes: &[SourceWrite],
        results: &mut HashMap<EmbedSource, JobResult>,
    ) -> anyhow::Result<()> {
        let s = &self.settings;
        let started = std::time::Instant::now();
        let to = write::Target {
            model,
            dimensions,
            queue: &s.queue.name,
            max_attempts: s.queue.max_attempts,
            touch: self.touch_unchanged,
            streams: s.write.streams,
        };
        let outcomes = write::write_batch(&self.pool, &to, writes).await?;
        let took = started.elapsed();
        crate::meter::db_write(took);
        if took >= SLOW_WRITE {
            tracing::warn!(
                statement = "write_batch",
                ms = took.as_millis() as u64,
                sources = writes.len(),
                "slow write"
            );
        }
        let written_kept: Vec<String> = writes
            .iter()
            .filter(|w| {
                w.chunks.len() > 1 && matches!(outcomes.get(&w.source), Some(WriteOutcome::Written))
            })
            .flat_map(|w| w.chunks.iter().map(|c| c.content_hash.clone()))
            .collect();
        if let Err(e) = paid::clear(&self.pool, model, &written_kept).await {
            tracing::warn!(error = %e, "could not clear kept chunks; retention removes them");
        }
        self.answers(model, writes, &outcomes, results);
        Ok(())
    }

    /// Answers: each written source's outcome, and the write metrics.
    fn answers(
        &self,
        model: &str,
        writes: &[SourceWrite],
        outcomes: &HashMap<EmbedSource, WriteOutcome>,
        results: &mut HashMap<EmbedSource, JobResult>,
    ) {
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
}
