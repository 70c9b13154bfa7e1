//! Submitting: bulk jobs → the pipeline's prepare step (load, chunk, count, skip what is paid
//! for) → one JSONL file of `/v1/embeddings` requests → the record (before the provider hears
//! of it) → upload → create. And resuming what a dead submitter left `preparing`.

use std::collections::{HashMap, HashSet};

use crate::embed::plan::{plan_requests, request_cap_tokens};
use crate::guard::budget::Decision;
use crate::job::{Job, JobError, JobOutcome, JobResult};
use crate::pipeline::chunk::Chunk;
use crate::pipeline::{ChunkedSource, Prepared};
use crate::source::EmbedSource;

use super::Lane;
use super::client::status_str;
use super::records::{self, BatchState, Item, NewBatch};

/// One batch, ready to record and upload.
struct Built {
    jsonl: Vec<u8>,
    items: Vec<Item>,
    requests: usize,
    inputs: usize,
    tokens: u64,
}

/// A source taken into the batch, with the chunks it sends.
type Taken<'a> = (&'a ChunkedSource, Vec<&'a Chunk>);

/// The output a request line may produce, at most.
const OUTPUT_LINE_BYTES: usize = 4 << 20;

impl Lane {
    /// Claims due bulk jobs and submits them as one batch. Returns the record id, or `None`
    /// when there was nothing to submit (or the budget or the open-batch limit says wait).
    pub(super) async fn submit(&self) -> anyhow::Result<Option<i64>> {
        let s = &self.settings;
        let open = records::open(&self.pool).await?.len();
        if open >= s.bulk.max_open_batches {
            return Ok(None);
        }
        // The claim clears the jobs' dedup keys (a change from now on queues a new job).
        let writing: Option<String> =
            sqlx::query_scalar("SELECT name::text FROM embed_worker.models WHERE writing")
                .fetch_optional(&self.pool)
                .await?;
        let claimed = crate::queue::claim_batch_jobs(
            &self.pool,
            &s.queue.name,
            writing.is_none_or(|w| w == s.model.name),
            s.bulk.max_sources_per_batch as i64,
        )
        .await?;
        if claimed.is_empty() {
            return Ok(None);
        }
        let mut results: HashMap<String, JobResult> = HashMap::new();
        let mut jobs = Vec::new();
        for (id, payload) in claimed {
            match Job::from_bytes(id.clone(), &payload) {
                Ok(job) => jobs.push(job),
                Err(e) => {
                    results.insert(id, Err(e));
                }
            }
        }
        // A change since the backfill queued these: the interactive job embeds the newer text.
        let sources: Vec<EmbedSource> = jobs.iter().map(|j| j.source).collect();
        let interactive = crate::queue::open_sources(
            &self.pool,
            std::slice::from_ref(&s.queue.name),
            Some(&sources),
        )
        .await?;
        jobs.retain(|j| {
            let superseded = interactive.contains(&j.source);
            if superseded {
                results.insert(j.id.clone(), Ok(JobOutcome::Superseded));
            }
            !superseded
        });
        let outcome = self.submit_jobs(&jobs, &mut results).await;
        crate::job::end_unacked(&self.pool, &s.retry, &results).await?;
        outcome
    }

    /// The jobs' sources: prepared; those with nothing to embed written now; the rest recorded
    /// and submitted as far as one batch's limits allow. Jobs in the batch get no answer yet.
    async fn submit_jobs(
        &self,
        jobs: &[Job],
        results: &mut HashMap<String, JobResult>,
    ) -> anyhow::Result<Option<i64>> {
        let ids = || jobs.iter().map(|j| (j.id.as_str(), j.source));
        let mut batch = match self.pipeline.prepare(jobs.iter().map(|j| j.source)).await {
            Ok(b) => b,
            Err(e) => {
                for j in jobs {
                    results.insert(
                        j.id.clone(),
                        Err(JobError::retry(format!("batch failed: {e:#}"))),
                    );
                }
                return Err(e);
            }
        };
        // Unchanged, or kept from an earlier sync attempt: no API call needed.
        let ready = batch.take_ready();
        for part in ready.chunks(1000) {
            self.pipeline.write(part, &mut batch.results).await?;
        }
        let job_of: HashMap<EmbedSource, &str> = ids().map(|(id, src)| (src, id)).collect();
        // Cut to what the month's budget has left (at the billing ratio seen so far; before the
        // provider's first bill, as if it billed 100×, or one request).
        let affordable = self
            .budget
            .affordable_at_once(self.settings.api.max_tokens_per_request as u64)
            .await?;
        let (built, left_out) = self.build(&batch, &job_of, affordable);
        let mut by_source = batch.results;
        let over_budget = built.is_none() && affordable.is_some();
        for src in left_out {
            let e = if over_budget {
                JobError::release(
                    "monthly budget reached: the batch waits",
                    std::time::Duration::from_secs(self.settings.budget.recheck_secs),
                )
            } else {
                JobError::release(
                    "over one batch's limits (or the budget left): the next batch takes it",
                    std::time::Duration::ZERO,
                )
            };
            by_source.insert(src, Err(e));
        }
        let record = match built {
            None => None,
            Some(b) => self.record(b, &mut by_source).await?,
        };
        results.extend(crate::job::by_job(ids(), &by_source));
        Ok(record)
    }

    /// The batch of `batch`'s sources to embed, within one batch's limits: which sources, their
    /// request lines, their items. Returns the sources left out.
    fn build(
        &self,
        batch: &Prepared,
        job_of: &HashMap<EmbedSource, &str>,
        affordable: Option<u64>,
    ) -> (Option<Built>, Vec<EmbedSource>) {
        let (taken, mut left_out) = self.select(batch.to_embed(), affordable);
        if taken.is_empty() {
            return (None, left_out);
        }
        let (jsonl, line_of, requests) = self.jsonl(&taken);
        let (items, inputs, tokens) = items(&taken, &line_of, job_of, &mut left_out);
        (
            Some(Built {
                jsonl,
                items,
                requests,
                inputs,
                tokens,
            }),
            left_out,
        )
    }

    /// Whole sources, in order, while the inputs, (roughly) the file size and the tokens the
    /// budget can still pay for (`affordable`) fit.
    fn select<'a>(
        &self,
        candidates: Vec<Taken<'a>>,
        affordable: Option<u64>,
    ) -> (Vec<Taken<'a>>, Vec<EmbedSource>) {
        let s = &self.settings;
        let max_bytes = s.bulk.max_file_mb * 1024 * 1024;
        let (mut taken, mut left_out) = (Vec::new(), Vec::new());
        let (mut inputs, mut bytes, mut tokens) = (0usize, 0usize, 0u64);
        for (src, mine) in candidates {
            let size: usize = mine.iter().map(|c| c.text.len() * 2 + 16).sum();
            let cost: u64 = mine.iter().map(|c| c.tokens as u64).sum();
            let over_budget = affordable.is_some_and(|a| tokens + cost > a);
            if over_budget
                || (!taken.is_empty()
                    && (inputs + mine.len() > s.bulk.max_inputs_per_batch
                        || bytes + size > max_bytes * 9 / 10))
            {
                left_out.push(src.source);
                continue;
            }
            inputs += mine.len();
            bytes += size;
            tokens += cost;
            taken.push((src, mine));
        }
        (taken, left_out)
    }

    /// The JSONL of `taken`'s chunks, packed into requests as the sync path packs them (at most
    /// `bulk.max_requests_per_batch`); each chunk's (custom_id, position); the request count.
    fn jsonl(&self, taken: &[Taken<'_>]) -> (Vec<u8>, LineOf, usize) {
        let s = &self.settings;
        // Identical chunks are sent once; their copies share the first one's line and position.
        let mut first_of: HashMap<&str, (EmbedSource, usize)> = HashMap::new();
        let mut copies: Vec<(EmbedSource, usize, &str)> = Vec::new();
        let flat: Vec<(EmbedSource, &Chunk)> = taken
            .iter()
            .flat_map(|(src, mine)| mine.iter().map(move |c| (src.source, *c)))
            .filter(|(src, c)| {
                if first_of.contains_key(c.content_hash.as_str()) {
                    copies.push((*src, c.index, c.content_hash.as_str()));
                    false
                } else {
                    first_of.insert(&c.content_hash, (*src, c.index));
                    true
                }
            })
            .collect();
        // An output line carries its inputs' vectors (base64, 4/3 × 4 bytes a dimension):
        // requests are kept to ~4 MB of output each, so collecting holds one small line.
        let per_input = s.model.dimensions * 4 * 4 / 3 + 64;
        let max_inputs = s
            .api
            .max_inputs_per_request
            .min((OUTPUT_LINE_BYTES / per_input).max(1));
        let plan = plan_requests(
            flat.iter()
                .map(|(_, c)| request_cap_tokens(&c.text, c.tokens)),
            max_inputs,
            s.api.max_tokens_per_request,
        );
        let bytes: usize = flat.iter().map(|(_, c)| c.text.len() * 2 + 16).sum();
        let mut jsonl = Vec::with_capacity(bytes + plan.len() * 200);
        let mut line_of = LineOf::new();
        for (ri, range) in plan.iter().enumerate().take(s.bulk.max_requests_per_batch) {
            let custom_id = format!("r{ri}");
            let texts: Vec<&str> = flat[range.clone()]
                .iter()
                .map(|(_, c)| c.text.as_str())
                .collect();
            let mut body = serde_json::json!({
                "model": s.model.name, "input": texts, "encoding_format": "base64"
            });
            if s.model.send_dimensions {
                body["dimensions"] = serde_json::json!(s.model.dimensions);
            }
            let line = serde_json::json!({
                "custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body
            });
            serde_json::to_writer(&mut jsonl, &line).expect("JSON to memory");
            jsonl.push(b'\n');
            for (pos, (src, c)) in flat[range.clone()].iter().enumerate() {
                line_of.insert((*src, c.index), (custom_id.clone(), pos as i32));
            }
        }
        for (src, index, hash) in copies {
            if let Some(line) = line_of.get(&first_of[hash]).cloned() {
                line_of.insert((src, index), line);
            }
        }
        let requests = plan.len().min(s.bulk.max_requests_per_batch);
        (jsonl, line_of, requests)
    }

    /// Reserves the batch's cost, records it, uploads the file and creates the batch. The
    /// batch's sources have no answer yet (their jobs stay `Running`, owned by the record) unless
    /// the budget refuses (released) or the record cannot be written (retried).
    async fn record(
        &self,
        b: Built,
        by_source: &mut HashMap<EmbedSource, JobResult>,
    ) -> anyhow::Result<Option<i64>> {
        let s = &self.settings;
        let in_batch: HashSet<EmbedSource> = b.items.iter().map(|i| i.source).collect();
        let (decision, reservation) = self.budget.reserve(b.tokens).await?;
        let Some(reservation) = reservation else {
            if let Decision::Exceeded { spent, budget } = decision {
                tracing::warn!(
                    spent,
                    budget,
                    tokens = b.tokens,
                    "batch not submitted: the monthly budget would be exceeded"
                );
            }
            for src in &in_batch {
                by_source.insert(
                    *src,
                    Err(JobError::release(
                        "monthly budget reached: the batch waits",
                        std::time::Duration::from_secs(s.budget.recheck_secs),
                    )),
                );
            }
            return Ok(None);
        };
        let new = NewBatch {
            model: &s.model.name,
            requests: b.requests,
            inputs: b.inputs,
            tokens: b.tokens,
            reserved: reservation,
        };
        let id = match records::insert(&self.pool, &new, &b.items).await {
            Ok(id) => id,
            Err(e) => {
                let _ = self.budget.settle(new.reserved, Some(0)).await;
                for src in &in_batch {
                    by_source.insert(
                        *src,
                        Err(JobError::retry(format!("recording the batch failed: {e}"))),
                    );
                }
                return Err(e.into());
            }
        };
        tracing::info!(
            batch = id,
            requests = b.requests,
            inputs = b.inputs,
            tokens = b.tokens,
            bytes = b.jsonl.len(),
            "batch recorded; uploading"
        );
        let file = self
            .client
            .upload(&format!("embed-worker-batch-{id}.jsonl"), b.jsonl)
            .await;
        match file {
            Ok(file_id) => {
                records::set_file(&self.pool, id, &file_id).await?;
                if let Err(e) = self.create_or_adopt(id, &file_id, chrono::Utc::now()).await {
                    // The batch's own problem: its record (and the jobs it owns) ends by the
                    // lane's rule for a failed call; the next round resumes a transient one.
                    if let Some(rec) = records::get(&self.pool, id).await? {
                        self.isolate(&rec, e).await?;
                    }
                }
            }
            Err(e) => {
                // An attempt each: a file the provider keeps refusing ends as dead letters
                // with its reason, not as a loop.
                tracing::warn!(batch = id, error = %format!("{e:#}"), "batch upload failed; its jobs will retry");
                let _ = self.budget.settle(new.reserved, Some(0)).await;
                records::delete(&self.pool, id).await?;
                for src in &in_batch {
                    by_source.insert(*src, Err(JobError::retry(format!("{e:#}"))));
                }
                return Ok(None);
            }
        }
        Ok(Some(id))
    }

    /// Creates the batch for record `id` unless the provider already has it (a submitter that
    /// died after creating it): a batch is never created twice.
    async fn create_or_adopt(
        &self,
        id: i64,
        file_id: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<()> {
        let installation = records::installation(&self.pool).await?;
        if let Some(found) = self.client.find(id, installation, file_id, since).await? {
            tracing::info!(batch = id, provider = %found.id, "batch found at the provider; resuming it");
            records::set_submitted(&self.pool, id, &found.id, &found.status).await?;
            return Ok(());
        }
        let created = self.client.create(file_id, id, installation).await?;
        tracing::info!(batch = id, provider = %created.id, "batch created");
        records::set_submitted(&self.pool, id, &created.id, &status_str(&created.status)).await?;
        Ok(())
    }

    /// Records that never reached the provider (the submitter died before or during the
    /// upload): their jobs go back to the queue and the reservation is refunded. Records whose
    /// file was uploaded but whose batch id was not recorded, or that the provider failed for a
    /// transient reason (once `retry_at` has passed): created now, or adopted if the provider
    /// has it. A create that fails is that batch's problem ([`Lane::isolate`]).
    pub(super) async fn resume(&self) -> anyhow::Result<()> {
        for rec in records::open(&self.pool).await? {
            if rec.state != BatchState::Preparing
                || rec.retry_at.is_some_and(|at| at > chrono::Utc::now())
            {
                continue;
            }
            match &rec.input_file_id {
                Some(file) => {
                    if let Err(e) = self.create_or_adopt(rec.id, file, rec.created_at).await {
                        self.isolate(&rec, e).await?;
                    }
                }
                None => {
                    let jobs: Vec<String> = records::items(&self.pool, rec.id)
                        .await?
                        .into_iter()
                        .map(|i| i.job_id)
                        .collect();
                    crate::queue::release_jobs(
                        &self.pool,
                        &jobs,
                        std::time::Duration::ZERO,
                        "the batch was never uploaded; back to the queue",
                    )
                    .await?;
                    super::batch_budget(&self.pool, &self.settings, &rec)
                        .await?
                        .settle(rec.reservation(), Some(0))
                        .await?;
                    records::delete(&self.pool, rec.id).await?;
                    tracing::warn!(
                        batch = rec.id,
                        jobs = jobs.len(),
                        "batch never uploaded; its jobs were released"
                    );
                }
            }
        }
        Ok(())
    }
}

/// (source, chunk index) → (custom_id, position in that request).
type LineOf = HashMap<(EmbedSource, usize), (String, i32)>;

/// Every chunk of each taken source as an item (the sent ones with their request line and
/// position), and the inputs and tokens sent. A source whose chunks did not all get a line
/// (over `bulk.max_requests_per_batch`) is left out and waits.
fn items(
    taken: &[Taken<'_>],
    line_of: &LineOf,
    job_of: &HashMap<EmbedSource, &str>,
    left_out: &mut Vec<EmbedSource>,
) -> (Vec<Item>, usize, u64) {
    let mut items = Vec::new();
    let (mut inputs, mut tokens) = (0usize, 0u64);
    let mut sent: std::collections::HashSet<&(String, i32)> = std::collections::HashSet::new();
    for (src, mine) in taken {
        if !mine
            .iter()
            .all(|c| line_of.contains_key(&(src.source, c.index)))
        {
            left_out.push(src.source);
            continue;
        }
        for c in &src.chunks {
            let line = line_of.get(&(src.source, c.index));
            if let Some(l) = line
                && sent.insert(l)
            {
                tokens += c.tokens as u64;
                inputs += 1;
            }
            items.push(Item {
                job_id: job_of[&src.source].to_string(),
                source: src.source,
                read_at: src.read_at,
                chunk_index: c.index as i32,
                content_hash: c.content_hash.clone(),
                tokens: c.tokens as i32,
                custom_id: line.map(|l| l.0.clone()),
                position: line.map(|l| l.1),
            });
        }
    }
    (items, inputs, tokens)
}
