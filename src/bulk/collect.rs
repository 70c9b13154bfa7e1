//! Collecting: an ended batch's output and error files, streamed line by line → each line
//! checked as the sync path checks an answer → vectors of complete sources written in parts
//! through the pipeline's write step → each job's end → the budget settled at what was billed
//! → the provider's files deleted.
//!
//! Why streamed: a 50,000-input batch at 3,072 dimensions is ~800 MB of output; memory holds
//! one line (requests are sized so a line stays a few MB) and one part of vectors.
//!
//! What a line must be to be believed (as on the sync path): a `custom_id` the batch sent, seen
//! once (a repeat is ignored, and its tokens are not ours), `data[].index` a permutation of
//! 0..n-1 for the n inputs sent on that line, each vector of the model's dimensions and
//! finite. A line that is not JSON counts as not answered.
//!
//! How a batch's end maps to its jobs: a source whose every sent chunk came back with a usable
//! vector is written; a line the provider rejected (HTTP 400) is a dead letter with the
//! provider's message; a line answered with wrong indexes, and any other error line, is a
//! retry; a line missing from an `expired` batch is released (the next batch resubmits it, no
//! attempt used), from a `cancelled` one released, from a `failed` one retried (an attempt
//! used: a file the provider keeps refusing ends as dead letters, not a loop).

use std::collections::{HashMap, HashSet};

use async_openai::types::batches::{Batch, BatchStatus};
use base64::Engine;

use crate::job::{JobError, JobResult};
use crate::pipeline::{ChunkWrite, SourceWrite};
use crate::source::EmbedSource;

use super::Lane;
use super::client::status_str;
use super::records::{self, BatchRecord, BatchState, Item};

/// Bytes of vectors held before they are written.
const PART_BYTES: usize = 8 << 20;
/// Sources held before they are written.
const PART_SOURCES: usize = 1000;

/// Why one request line of a batch came back without vectors.
struct LineError {
    /// The input's fault (HTTP 400): sending it again cannot succeed.
    permanent: bool,
    /// The provider's words, secrets masked.
    message: String,
}

/// One source of a batch, as its items say, and what came back for it.
struct BatchSource {
    source: EmbedSource,
    job_id: String,
    read_at: chrono::DateTime<chrono::Utc>,
    /// Every chunk (sent or unchanged), in order.
    items: Vec<Item>,
    /// The vector of each item, as it arrives.
    vectors: Vec<Option<pgvector::Vector>>,
    /// Sent chunks still without a vector.
    missing: usize,
    failure: Option<JobError>,
    written: bool,
}

/// What one batch sent, and what its files have said so far.
struct Collection {
    id: i64,
    dimensions: usize,
    sources: Vec<BatchSource>,
    /// custom_id → the (source, item)s of each position of that request (several where a
    /// chunk's identical copies were sent once).
    lines: HashMap<String, Vec<Vec<(usize, usize)>>>,
    seen: HashSet<String>,
    /// Sources complete and not yet written.
    ready: Vec<usize>,
    ready_bytes: usize,
    /// `usage.prompt_tokens` of our answered lines (each once).
    billed: u64,
    /// Our count of the tokens of those lines.
    counted: u64,
    /// Lines not believed: not JSON, not ours, repeated.
    not_json: usize,
    not_ours: usize,
    repeated: usize,
}

impl Collection {
    fn new(id: i64, dimensions: usize, items: Vec<Item>) -> Collection {
        let mut sources: Vec<BatchSource> = Vec::new();
        for it in items {
            match sources.last_mut() {
                Some(last) if last.source == it.source => last.items.push(it),
                _ => sources.push(BatchSource {
                    source: it.source,
                    job_id: it.job_id.clone(),
                    read_at: it.read_at,
                    items: vec![it],
                    vectors: Vec::new(),
                    missing: 0,
                    failure: None,
                    written: false,
                }),
            }
        }
        let mut lines: HashMap<String, Vec<Vec<(usize, usize)>>> = HashMap::new();
        for (si, s) in sources.iter_mut().enumerate() {
            s.vectors = vec![None; s.items.len()];
            for (ii, it) in s.items.iter().enumerate() {
                if let (Some(cid), Some(pos)) = (&it.custom_id, it.position) {
                    s.missing += 1;
                    let at = lines.entry(cid.clone()).or_default();
                    let pos = pos.max(0) as usize;
                    if at.len() <= pos {
                        at.resize(pos + 1, Vec::new());
                    }
                    at[pos].push((si, ii));
                }
            }
        }
        Collection {
            id,
            dimensions,
            sources,
            lines,
            seen: HashSet::new(),
            ready: Vec::new(),
            ready_bytes: 0,
            billed: 0,
            counted: 0,
            not_json: 0,
            not_ours: 0,
            repeated: 0,
        }
    }

    /// Fails every source with an input on line `cid` (the first failure of a source stands).
    fn fail_line(&mut self, cid: &str, e: &JobError) {
        for &(si, _) in self.lines.get(cid).into_iter().flatten().flatten() {
            if let Some(s) = self.sources.get_mut(si) {
                s.failure.get_or_insert_with(|| e.clone());
            }
        }
    }

    /// One line of the output or error file.
    fn take(&mut self, raw: &[u8], b: &Batch) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(raw) else {
            self.not_json += 1;
            return;
        };
        let cid = v["custom_id"].as_str().unwrap_or_default().to_string();
        if !self.lines.contains_key(&cid) {
            self.not_ours += 1;
            return;
        }
        if !self.seen.insert(cid.clone()) {
            self.repeated += 1;
            return;
        }
        let resp = &v["response"];
        if resp["status_code"].as_u64() != Some(200) {
            let e = unanswered(self.id, b, Some(&line_error(&v)));
            self.fail_line(&cid, &e);
            return;
        }
        let body = &resp["body"];
        let sent = self.lines[&cid].clone();
        let data = body["data"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut indexes: Vec<i64> = data
            .iter()
            .map(|d| d["index"].as_i64().unwrap_or(-1))
            .collect();
        indexes.sort_unstable();
        if indexes.iter().enumerate().any(|(i, x)| *x != i as i64) || indexes.len() != sent.len() {
            let e = JobError::retry(format!(
                "batch {}: request {cid} was answered with {} vectors whose indexes are not 0..{}; nothing of it written",
                self.id,
                data.len(),
                sent.len()
            ));
            self.fail_line(&cid, &e);
            return;
        }
        self.billed += body["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
        for d in data {
            let at = &sent[d["index"].as_i64().unwrap_or(0) as usize];
            let mut vector = decode(&d["embedding"])
                .ok_or_else(|| "not a vector".to_string())
                .and_then(|v| crate::embed::check_vector(&v, self.dimensions).map(|_| v))
                .map(pgvector::Vector::from);
            if let Some(&(si, ii)) = at.first() {
                self.counted += self.sources[si].items[ii].tokens.max(0) as u64;
            }
            for (k, &(si, ii)) in at.iter().enumerate() {
                let s = &mut self.sources[si];
                match &mut vector {
                    Ok(v) => {
                        if s.vectors[ii].is_none() {
                            s.missing -= 1;
                        }
                        self.ready_bytes += self.dimensions * 4;
                        // Moved into the last (usually the only) item; copied for identical
                        // chunks that shared the input.
                        s.vectors[ii] = Some(if k + 1 == at.len() {
                            std::mem::replace(v, pgvector::Vector::from(Vec::new()))
                        } else {
                            v.clone()
                        });
                    }
                    Err(why) => {
                        let chunk = s.items[ii].chunk_index;
                        s.failure
                            .get_or_insert_with(|| JobError::dead(format!("chunk {chunk}: {why}")));
                    }
                }
                if s.missing == 0 && s.failure.is_none() && !s.written {
                    s.written = true;
                    self.ready.push(si);
                }
            }
        }
    }

    /// Whether enough is ready to write a part.
    fn part_due(&self) -> bool {
        self.ready.len() >= PART_SOURCES || self.ready_bytes >= PART_BYTES
    }

    /// The ready sources as writes; their vectors leave the collection.
    fn take_part(&mut self) -> Vec<SourceWrite> {
        self.ready_bytes = 0;
        std::mem::take(&mut self.ready)
            .into_iter()
            .map(|si| {
                let s = &mut self.sources[si];
                let vectors = std::mem::take(&mut s.vectors);
                SourceWrite {
                    source: s.source,
                    read_at: s.read_at,
                    chunks: s
                        .items
                        .iter()
                        .zip(vectors)
                        .map(|(it, vector)| ChunkWrite {
                            index: it.chunk_index as usize,
                            content_hash: it.content_hash.clone(),
                            tokens: it.tokens as usize,
                            vector,
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// What the files did not say: every source neither written nor failed is unanswered, as
    /// the batch's end says.
    fn settle_unanswered(&mut self, b: &Batch) {
        for s in &mut self.sources {
            if !s.written && s.failure.is_none() {
                s.failure = Some(unanswered(self.id, b, None));
            }
        }
    }

    /// The lines not believed, for the record.
    fn distrust(&self) -> Option<String> {
        let mut parts = Vec::new();
        if self.not_json > 0 {
            parts.push(format!("{} output lines not JSON", self.not_json));
        }
        if self.not_ours > 0 {
            parts.push(format!(
                "{} lines with a custom_id never sent (ignored, tokens not counted)",
                self.not_ours
            ));
        }
        if self.repeated > 0 {
            parts.push(format!(
                "{} repeated lines (ignored, counted once)",
                self.repeated
            ));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

impl Lane {
    /// Polls every submitted batch; collects those that ended. A batch whose poll or collect
    /// fails is that batch's problem ([`Lane::isolate`]); the others go on.
    pub(super) async fn poll(&self) -> anyhow::Result<()> {
        for rec in records::open(&self.pool).await? {
            if rec.provider_id.is_none() {
                continue;
            }
            match self.poll_one(&rec).await {
                Ok(()) if rec.failures > 0 => records::clear_failures(&self.pool, rec.id).await?,
                Ok(()) => {}
                Err(e) => self.isolate(&rec, e).await?,
            }
        }
        Ok(())
    }

    /// One batch: its status now; collected once it ended (or created again, when the
    /// provider failed it for a transient reason).
    async fn poll_one(&self, rec: &BatchRecord) -> anyhow::Result<()> {
        let pid = rec.provider_id.as_deref().unwrap_or_default();
        let b = self.client.retrieve(pid).await?;
        let status = status_str(&b.status);
        records::set_status(
            &self.pool,
            rec.id,
            &status,
            serde_json::to_value(&b.request_counts).ok(),
            b.output_file_id.as_deref(),
            b.error_file_id.as_deref(),
        )
        .await?;
        match b.status {
            BatchStatus::Failed
                if transient_failure(&b) && rec.resubmits < super::MAX_RESUBMITS =>
            {
                let why = batch_errors(&b).unwrap_or_default();
                let after = std::time::Duration::from_secs(
                    self.settings.bulk.poll_secs * 2u64.pow(rec.resubmits.max(0) as u32 + 1),
                );
                tracing::warn!(batch = rec.id, reason = %why, resubmits = rec.resubmits + 1, ?after,
                    "the provider failed the batch for a transient reason; creating it again (no job attempt used)");
                records::resubmit(
                    &self.pool,
                    rec.id,
                    after,
                    &format!("failed at the provider, created again: {why}"),
                )
                .await?;
                Ok(())
            }
            BatchStatus::Completed
            | BatchStatus::Expired
            | BatchStatus::Cancelled
            | BatchStatus::Failed => self.collect(rec, &b).await,
            _ => Ok(()),
        }
    }

    /// Writes what came back, ends every job of the batch, settles the budget, deletes the
    /// files and marks the record finished. Safe to run again after a crash: the write is
    /// idempotent (content hashes) and ended jobs are not touched twice.
    async fn collect(&self, rec: &BatchRecord, b: &Batch) -> anyhow::Result<()> {
        let s = &self.settings;
        // As the model that submitted it: its partition, its size, its price.
        let (model, live) = super::batch_model(&self.pool, s, rec).await?;
        if !live {
            return self.collect_orphan(rec, b).await;
        }
        let budget = self.pipeline.batch_budget_of(&model);
        let items = records::items(&self.pool, rec.id).await?;
        let mut c = Collection::new(rec.id, model.dimensions, items);
        let mut by_source: HashMap<EmbedSource, JobResult> = HashMap::new();
        let mut written = 0usize;
        for file in [&b.output_file_id, &b.error_file_id].into_iter().flatten() {
            let mut lines = self.client.lines(file).await?;
            while let Some(line) = lines.next().await? {
                c.take(&line, b);
                if c.part_due() {
                    let part = c.take_part();
                    written += part.len();
                    self.pipeline
                        .write_model(&model.name, model.dimensions, &part, &mut by_source)
                        .await?;
                }
            }
        }
        c.settle_unanswered(b);
        let part = c.take_part();
        written += part.len();
        self.pipeline
            .write_model(&model.name, model.dimensions, &part, &mut by_source)
            .await?;
        for src in &c.sources {
            if let Some(e) = &src.failure {
                by_source.insert(src.source, Err(e.clone()));
            }
        }
        let results = crate::job::by_job(
            c.sources.iter().map(|s| (s.job_id.as_str(), s.source)),
            &by_source,
        );
        crate::job::end_unacked(&self.pool, &s.retry, &results).await?;
        let usd = budget.cost(c.billed);
        if c.counted > 0 {
            budget.observe_billing(c.counted, c.billed);
        }
        if let Err(e) = budget.settle(rec.reservation(), Some(c.billed)).await {
            tracing::warn!(batch = rec.id, error = %e, "settling the batch's spend failed");
        }
        crate::meter::batch_tokens(&model.name, c.billed, model.batch_usd_per_million_tokens);
        self.pipeline
            .stats
            .tokens_embedded
            .fetch_add(c.billed, std::sync::atomic::Ordering::Relaxed);
        super::delete_files(
            &self.client,
            rec.id,
            [&rec.input_file_id, &b.output_file_id, &b.error_file_id],
        )
        .await;
        let state = match b.status {
            BatchStatus::Completed => BatchState::Completed,
            BatchStatus::Expired => BatchState::Expired,
            BatchStatus::Cancelled => BatchState::Cancelled,
            _ => BatchState::Failed,
        };
        let errors = results.values().filter(|r| r.is_err()).count();
        let last_error = [
            batch_errors(b),
            results.values().find_map(|r| {
                r.as_ref()
                    .err()
                    .map(|e| format!("{errors} jobs not written; first: {}", e.reason))
            }),
            c.distrust(),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" | ");
        records::close(
            &self.pool,
            rec.id,
            state,
            c.billed as i64,
            usd,
            (!last_error.is_empty()).then_some(last_error.as_str()),
        )
        .await?;
        tracing::info!(
            batch = rec.id,
            model = %model.name,
            state = state.as_str(),
            written,
            not_written = errors,
            tokens = c.billed,
            usd,
            "batch collected"
        );
        Ok(())
    }
}

impl Lane {
    /// A batch whose model has been pruned since it was submitted: its vectors have no
    /// partition to go to and are not of the model that writes now, so nothing is written; its
    /// jobs go back to the queue (no attempt used) for the next batch, of the writing model;
    /// its reservation stands as spent (the provider ran it); its files are deleted.
    async fn collect_orphan(&self, rec: &BatchRecord, b: &Batch) -> anyhow::Result<()> {
        let why = format!(
            "batch {} was submitted with model {}, which is no longer registered (pruned): \
             nothing of it was written; its jobs went back to the queue",
            rec.id, rec.model
        );
        tracing::warn!(batch = rec.id, model = %rec.model, "{why}");
        let rec = BatchRecord {
            output_file_id: b.output_file_id.clone(),
            error_file_id: b.error_file_id.clone(),
            ..rec.clone()
        };
        super::end_batch(
            &self.pool,
            &self.settings,
            &self.client,
            &super::batch_budget(&self.pool, &self.settings, &rec).await?,
            &rec,
            BatchState::Abandoned,
            &why,
        )
        .await?;
        Ok(())
    }
}

/// A batch the provider failed for a reason that passes (its enqueued-token limit, a rate
/// limit): worth creating again.
fn transient_failure(b: &Batch) -> bool {
    b.errors.as_ref().is_some_and(|e| {
        !e.data.is_empty()
            && e.data.iter().all(|x| {
                matches!(
                    x.code.as_str(),
                    "token_limit_exceeded" | "rate_limit_exceeded"
                )
            })
    })
}

/// Why a request line of batch `id` has no vector, as the module's table says: the line's error
/// (`error`) if the provider gave one, else the batch's end.
fn unanswered(id: i64, b: &Batch, error: Option<&LineError>) -> JobError {
    match error {
        Some(LineError {
            permanent: true,
            message,
        }) => JobError::dead(format!("rejected by the provider in batch {id}: {message}")),
        Some(LineError { message, .. }) if b.status == BatchStatus::Expired => JobError::release(
            format!("batch {id} expired before this request ran ({message}); resubmitted"),
            std::time::Duration::ZERO,
        ),
        Some(LineError { message, .. }) => {
            JobError::retry(format!("batch {id} request failed: {message}"))
        }
        None => match b.status {
            BatchStatus::Cancelled => JobError::release(
                format!("batch {id} was cancelled"),
                std::time::Duration::ZERO,
            ),
            BatchStatus::Expired => JobError::release(
                format!("batch {id} expired before this request ran; resubmitted"),
                std::time::Duration::ZERO,
            ),
            BatchStatus::Failed => JobError::retry(format!(
                "batch {id} failed: {}",
                batch_errors(b).unwrap_or_else(|| "no reason given".into())
            )),
            _ => JobError::retry(format!("batch {id}: no result for this request")),
        },
    }
}

/// An error line's [`LineError`]: HTTP 400 from the endpoint is the input's fault.
fn line_error(v: &serde_json::Value) -> LineError {
    let resp = &v["response"];
    let status = resp["status_code"].as_u64();
    let msg = resp["body"]["error"]["message"]
        .as_str()
        .or_else(|| v["error"]["message"].as_str())
        .unwrap_or("no message");
    let code = v["error"]["code"].as_str().unwrap_or_default();
    let text = match (status, code) {
        (Some(st), _) => format!("HTTP {st}: {msg}"),
        (None, c) if !c.is_empty() => format!("{c}: {msg}"),
        _ => msg.to_string(),
    };
    LineError {
        permanent: status == Some(400),
        message: crate::redact::secrets(&text, None),
    }
}

/// A batch's own errors (validation), in one line.
pub(super) fn batch_errors(b: &Batch) -> Option<String> {
    let e = b.errors.as_ref()?;
    (!e.data.is_empty()).then(|| {
        e.data
            .iter()
            .take(3)
            .map(|x| format!("{}: {}", x.code, x.message))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// An embedding as base64 little-endian f32 or as a JSON array.
fn decode(v: &serde_json::Value) -> Option<Vec<f32>> {
    match v {
        serde_json::Value::String(s) => {
            let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
            Some(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )
        }
        serde_json::Value::Array(a) => a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect(),
        _ => None,
    }
}
