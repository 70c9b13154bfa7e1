//! Submitting: bulk jobs → the sync path's stages up to the embed step (load, chunk, count,
//! skip what the content hash says is stored) → one JSONL file of `/v1/embeddings` requests →
//! the record (before the provider hears of it) → upload → create.

use std::collections::{HashMap, HashSet};

use crate::embed::plan::plan_requests;
use crate::guard::budget::Decision;
use crate::job::{Job, JobError, JobOutcome, JobResult};
use crate::pipeline::chunk::request_cap_tokens;
use crate::pipeline::write::SourceWrite;
use crate::source::EmbedSource;

use super::Lane;
use super::records::{self, Item, NewBatch};

/// One batch, ready to record and upload.
struct Built {
    jsonl: Vec<u8>,
    items: Vec<Item>,
    requests: usize,
    inputs: usize,
    tokens: u64,
}

impl Lane {
    /// Claims due bulk jobs and submits them as one batch. Returns the record id, or `None`
    /// when there was nothing to submit (or the budget or the open-batch limit says wait).
    pub(super) async fn submit(&self) -> anyhow::Result<Option<i64>> {
        let s = &self.settings;
        let open = records::open(&self.pool).await?.len();
        if open >= s.bulk.max_open_batches {
            return Ok(None);
        }
        let claimed = crate::queue::claim_batch_jobs(
            &self.pool,
            &s.queue.name,
            s.bulk.max_sources_per_batch as i64,
        )
        .await?;
        if claimed.is_empty() {
            return Ok(None);
        }
        let mut results: HashMap<String, JobResult> = HashMap::new();
        let mut jobs = Vec::new();
        for (id, payload) in claimed {
            match serde_json::from_value::<EmbedSource>(payload.clone()) {
                Ok(source) => jobs.push(Job { id, source }),
                Err(e) => {
                    results.insert(
                        id,
                        Err(JobError::dead(format!("bad job payload {payload}: {e}"))),
                    );
                }
            }
        }
        // A change since the backfill queued these: the interactive job embeds the newer text.
        let interactive = self.open_interactive(&jobs).await?;
        jobs.retain(|j| {
            let superseded = interactive.contains(&j.source);
            if superseded {
                results.insert(j.id.clone(), Ok(JobOutcome::Superseded));
            }
            !superseded
        });
        let outcome = self.submit_jobs(&jobs, &mut results).await;
        crate::queue::finish_jobs(&self.pool, &s.retry, &results).await?;
        outcome
    }

    /// Sources among `jobs` with an open interactive job.
    async fn open_interactive(&self, jobs: &[Job]) -> anyhow::Result<HashSet<EmbedSource>> {
        let keys: Vec<String> = jobs
            .iter()
            .map(|j| format!("{}:{}", j.source.source_type.as_str(), j.source.source_id))
            .collect();
        let rows: Vec<(String, uuid::Uuid)> = sqlx::query_as(
            "SELECT p ->> 'source_type', (p ->> 'source_id')::uuid
               FROM (SELECT embed_worker.job_payload(job) AS p FROM apalis.jobs
                      WHERE job_type = $1 AND status IN ('Pending', 'Queued', 'Running')
                        AND idempotency_key = ANY($2)) j",
        )
        .bind(&self.settings.queue.name)
        .bind(&keys)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().filter_map(EmbedSource::from_row).collect())
    }

    async fn submit_jobs(
        &self,
        jobs: &[Job],
        results: &mut HashMap<String, JobResult>,
    ) -> anyhow::Result<Option<i64>> {
        let mut by_source: HashMap<EmbedSource, JobResult> = HashMap::new();
        let prepared = match self.pipeline.prepare(jobs).await {
            Ok(p) => p,
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
        by_source.extend(prepared.results);
        let job_of: HashMap<EmbedSource, &Job> = jobs.iter().map(|j| (j.source, j)).collect();
        // Sources with nothing to send (unchanged, or staged by an earlier sync attempt) are
        // written now; the rest go into the batch as far as its limits allow.
        let mut vectors = prepared.vectors;
        let (send, now): (Vec<_>, Vec<_>) =
            prepared.chunked.into_iter().partition(|(src, _, chunks)| {
                chunks
                    .iter()
                    .any(|c| prepared.to_send.contains(&(*src, c.index)))
            });
        let writes: Vec<SourceWrite> = now
            .iter()
            .map(|(src, read_at, chunks)| {
                crate::pipeline::source_write(*src, *read_at, chunks, &mut vectors)
            })
            .collect();
        for part in writes.chunks(1000) {
            self.pipeline.finish(part, &mut by_source).await?;
        }
        let (built, left_out) = self.build(&send, &prepared.to_send, &job_of);
        for src in left_out {
            by_source.insert(
                src,
                Err(JobError::release(
                    "over one batch's limits: the next batch takes it",
                    std::time::Duration::ZERO,
                )),
            );
        }
        let record = match built {
            None => None,
            Some(b) => self.record(b, &mut by_source).await?,
        };
        for j in jobs {
            if let Some(r) = by_source.get(&j.source) {
                results.insert(j.id.clone(), r.clone());
            }
        }
        Ok(record)
    }

    /// The JSONL and the items of `send` (every chunk of each source; the ones to embed with
    /// their request line and position), within the batch's limits. Returns the sources left
    /// out.
    fn build(
        &self,
        send: &crate::pipeline::Chunked,
        to_send: &HashSet<(EmbedSource, usize)>,
        job_of: &HashMap<EmbedSource, &Job>,
    ) -> (Option<Built>, Vec<EmbedSource>) {
        let s = &self.settings;
        let max_bytes = s.bulk.max_file_mb * 1024 * 1024;
        // Take whole sources while the inputs and (roughly) the file size fit.
        let mut taken = Vec::new();
        let mut left_out = Vec::new();
        let (mut inputs, mut bytes) = (0usize, 0usize);
        for entry in send {
            let (src, _, chunks) = entry;
            let mine: Vec<&crate::pipeline::chunk::Chunk> = chunks
                .iter()
                .filter(|c| to_send.contains(&(*src, c.index)))
                .collect();
            let size: usize = mine.iter().map(|c| c.text.len() * 2 + 16).sum();
            if !taken.is_empty()
                && (inputs + mine.len() > s.bulk.max_inputs_per_batch
                    || bytes + size > max_bytes * 9 / 10)
            {
                left_out.push(*src);
                continue;
            }
            inputs += mine.len();
            bytes += size;
            taken.push((entry, mine));
        }
        let flat: Vec<(EmbedSource, &crate::pipeline::chunk::Chunk)> = taken
            .iter()
            .flat_map(|((src, _, _), mine)| mine.iter().map(move |c| (*src, *c)))
            .collect();
        if flat.is_empty() {
            return (None, left_out);
        }
        let plan = plan_requests(
            flat.iter()
                .map(|(_, c)| request_cap_tokens(&c.text, c.tokens)),
            s.api.max_inputs_per_request,
            s.api.max_tokens_per_request,
        );
        let mut jsonl = Vec::with_capacity(bytes + plan.len() * 200);
        let mut line_of: HashMap<(EmbedSource, usize), (String, i32)> = HashMap::new();
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
        let mut items = Vec::new();
        let mut tokens = 0u64;
        let mut sent_inputs = 0usize;
        for ((src, read_at, chunks), _) in &taken {
            // A source whose chunks did not all get a line (over max_requests) waits.
            let complete = chunks.iter().all(|c| {
                !to_send.contains(&(*src, c.index)) || line_of.contains_key(&(*src, c.index))
            });
            if !complete {
                left_out.push(*src);
                continue;
            }
            for c in chunks {
                let line = line_of.get(&(*src, c.index));
                if line.is_some() {
                    tokens += c.tokens as u64;
                    sent_inputs += 1;
                }
                items.push(Item {
                    job_id: job_of[src].id.clone(),
                    source: *src,
                    read_at: *read_at,
                    chunk_index: c.index as i32,
                    content_hash: c.content_hash.clone(),
                    tokens: c.tokens as i32,
                    custom_id: line.map(|l| l.0.clone()),
                    position: line.map(|l| l.1),
                });
            }
        }
        let requests = plan.len().min(s.bulk.max_requests_per_batch);
        (
            Some(Built {
                jsonl,
                items,
                requests,
                inputs: sent_inputs,
                tokens,
            }),
            left_out,
        )
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
            reserved: {
                let (month, usd) = reservation.parts();
                (usd, month)
            },
        };
        let id = match records::insert(&self.pool, &new, &b.items).await {
            Ok(id) => id,
            Err(e) => {
                let _ = self.budget.settle(reservation, Some(0)).await;
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
                self.create_or_adopt(id, &file_id).await?;
            }
            Err(e) => {
                // An attempt each: a file the provider keeps refusing ends as dead letters
                // with its reason, not as a loop.
                tracing::warn!(batch = id, error = %format!("{e:#}"), "batch upload failed; its jobs will retry");
                let reservation =
                    crate::guard::budget::Reservation::from_parts(new.reserved.1, new.reserved.0);
                let _ = self.budget.settle(reservation, Some(0)).await;
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
    pub(super) async fn create_or_adopt(&self, id: i64, file_id: &str) -> anyhow::Result<()> {
        if let Some(found) = self.client.find(id).await? {
            tracing::info!(batch = id, provider = %found.id, "batch found at the provider; resuming it");
            records::set_submitted(&self.pool, id, &found.id, &status_str(&found.status)).await?;
            return Ok(());
        }
        let created = self.client.create(file_id, id).await?;
        tracing::info!(batch = id, provider = %created.id, "batch created");
        records::set_submitted(&self.pool, id, &created.id, &status_str(&created.status)).await?;
        Ok(())
    }
}

/// The provider's status as a word (`in_progress`, `completed`…).
pub(super) fn status_str(s: &async_openai::types::batches::BatchStatus) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{s:?}").to_lowercase())
}
