//! Collecting: an ended batch's output and error files → vectors by (request, position) → the
//! sync path's write (newest wins, content hash, `embedding_model`) → each job's end → the
//! budget settled at what was billed → the provider's files deleted.
//!
//! How a batch's end maps to its jobs: a source whose every sent chunk came back with a usable
//! vector is written; a line the provider rejected (HTTP 400) is a dead letter with the
//! provider's message; any other error line is a retry; a line missing from an `expired` batch
//! is released (the next batch resubmits it, no attempt used), from a `cancelled` one released,
//! from a `failed` one retried (an attempt used: a file the provider keeps refusing ends as dead
//! letters, not a loop).

use std::collections::HashMap;

use anyhow::Context;
use async_openai::types::batches::{Batch, BatchStatus};
use base64::Engine;

use crate::job::{JobError, JobResult};
use crate::pipeline::{ChunkWrite, SourceWrite};
use crate::source::EmbedSource;

use super::Lane;
use super::client::status_str;
use super::records::{self, BatchRecord, BatchState, Item};

/// What the provider's files said.
#[derive(Default)]
struct Output {
    /// (custom_id, position) → vector.
    vectors: HashMap<(String, i32), Vec<f32>>,
    /// custom_id → why that request line has no answer.
    errors: HashMap<String, LineError>,
    /// `usage.prompt_tokens` of the answered lines.
    billed: u64,
}

/// Why one request line of a batch came back without vectors.
struct LineError {
    /// The input's fault (HTTP 400): sending it again cannot succeed.
    permanent: bool,
    /// The provider's words, secrets masked.
    message: String,
}

/// One source of a batch, as its items say: which job asked, the text's `read_at`, its chunks.
struct BatchSource {
    source: EmbedSource,
    job_id: String,
    read_at: chrono::DateTime<chrono::Utc>,
    items: Vec<Item>,
}

impl Lane {
    /// Polls every submitted batch; collects those that ended.
    pub(super) async fn poll(&self) -> anyhow::Result<()> {
        for rec in records::open(&self.pool).await? {
            let Some(pid) = rec.provider_id.clone() else {
                continue;
            };
            let b = match self.client.retrieve(&pid).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(batch = rec.id, error = %format!("{e:#}"), "polling batch failed");
                    continue;
                }
            };
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
            if matches!(
                b.status,
                BatchStatus::Completed
                    | BatchStatus::Expired
                    | BatchStatus::Cancelled
                    | BatchStatus::Failed
            ) {
                self.collect(&rec, &b).await?;
            }
        }
        Ok(())
    }

    async fn download(&self, b: &Batch) -> anyhow::Result<Output> {
        let mut out = Output::default();
        if let Some(f) = &b.output_file_id {
            let bytes = self.client.content(f).await?;
            for line in bytes.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value =
                    serde_json::from_slice(line).context("a batch output line is not JSON")?;
                let cid = v["custom_id"].as_str().unwrap_or_default().to_string();
                let resp = &v["response"];
                if resp["status_code"].as_u64() != Some(200) {
                    out.errors.insert(cid, line_error(&v));
                    continue;
                }
                let body = &resp["body"];
                out.billed += body["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
                for d in body["data"].as_array().into_iter().flatten() {
                    let pos = d["index"].as_i64().unwrap_or(-1) as i32;
                    if let Some(v) = decode(&d["embedding"]) {
                        out.vectors.insert((cid.clone(), pos), v);
                    }
                }
            }
        }
        if let Some(f) = &b.error_file_id {
            let bytes = self.client.content(f).await?;
            for line in bytes.split(|c| *c == b'\n').filter(|l| !l.is_empty()) {
                let v: serde_json::Value =
                    serde_json::from_slice(line).context("a batch error line is not JSON")?;
                let cid = v["custom_id"].as_str().unwrap_or_default().to_string();
                out.errors.insert(cid, line_error(&v));
            }
        }
        Ok(out)
    }

    /// Writes what came back, ends every job of the batch, settles the budget, deletes the
    /// files and marks the record finished. Safe to run again after a crash: the write is
    /// idempotent (content hashes) and ended jobs are not touched twice.
    async fn collect(&self, rec: &BatchRecord, b: &Batch) -> anyhow::Result<()> {
        let s = &self.settings;
        let out = self.download(b).await?;
        let items = records::items(&self.pool, rec.id).await?;
        let mut sources: Vec<BatchSource> = Vec::new();
        for it in items {
            match sources.last_mut() {
                Some(last) if last.source == it.source => last.items.push(it),
                _ => sources.push(BatchSource {
                    source: it.source,
                    job_id: it.job_id.clone(),
                    read_at: it.read_at,
                    items: vec![it],
                }),
            }
        }
        let mut vectors = out.vectors;
        let mut by_source: HashMap<EmbedSource, JobResult> = HashMap::new();
        let mut writes = Vec::new();
        for bs in &sources {
            let mut failure: Option<JobError> = None;
            let mut cw = Vec::with_capacity(bs.items.len());
            for it in &bs.items {
                let vector = match (&it.custom_id, it.position) {
                    (Some(cid), Some(pos)) => match vectors.remove(&(cid.clone(), pos)) {
                        Some(v) => match crate::embed::check_vector(&v, s.model.dimensions) {
                            Ok(()) => Some(pgvector::Vector::from(v)),
                            Err(why) => {
                                failure.get_or_insert(JobError::dead(format!(
                                    "chunk {}: {why}",
                                    it.chunk_index
                                )));
                                None
                            }
                        },
                        None => {
                            failure.get_or_insert(unanswered(rec.id, b, out.errors.get(cid)));
                            None
                        }
                    },
                    _ => None,
                };
                cw.push(ChunkWrite {
                    index: it.chunk_index as usize,
                    content_hash: it.content_hash.clone(),
                    tokens: it.tokens as usize,
                    vector,
                });
            }
            match failure {
                Some(e) => {
                    by_source.insert(bs.source, Err(e));
                }
                None => writes.push(SourceWrite {
                    source: bs.source,
                    read_at: bs.read_at,
                    chunks: cw,
                }),
            }
        }
        // In parts: one write transaction per 1,000 sources keeps locks and memory short
        // beside the interactive lane's writes.
        for part in writes.chunks(1000) {
            self.pipeline.write(part, &mut by_source).await?;
        }
        let results = crate::job::by_job(
            sources.iter().map(|bs| (bs.job_id.as_str(), bs.source)),
            &by_source,
        );
        crate::job::end_unacked(&self.pool, &s.retry, &results).await?;
        let usd = self.budget.cost(out.billed);
        if let Err(e) = self
            .budget
            .settle(rec.reservation(), Some(out.billed))
            .await
        {
            tracing::warn!(batch = rec.id, error = %e, "settling the batch's spend failed");
        }
        crate::meter::batch_tokens(
            &s.model.name,
            out.billed,
            s.model.batch_usd_per_million_tokens,
        );
        self.pipeline
            .stats
            .tokens_embedded
            .fetch_add(out.billed, std::sync::atomic::Ordering::Relaxed);
        for f in [&rec.input_file_id, &b.output_file_id, &b.error_file_id]
            .into_iter()
            .flatten()
        {
            if let Err(e) = self.client.delete(f).await {
                tracing::warn!(batch = rec.id, file = %f, error = %format!("{e:#}"), "deleting a batch file failed");
            }
        }
        let state = match b.status {
            BatchStatus::Completed => BatchState::Completed,
            BatchStatus::Expired => BatchState::Expired,
            BatchStatus::Cancelled => BatchState::Cancelled,
            _ => BatchState::Failed,
        };
        let errors = results.values().filter(|r| r.is_err()).count();
        let last_error = batch_errors(b).or_else(|| {
            results.values().find_map(|r| {
                r.as_ref()
                    .err()
                    .map(|e| format!("{errors} jobs not written; first: {}", e.reason))
            })
        });
        records::close(
            &self.pool,
            rec.id,
            state,
            out.billed as i64,
            usd,
            last_error.as_deref(),
        )
        .await?;
        tracing::info!(
            batch = rec.id,
            state = state.as_str(),
            written = writes.len(),
            not_written = errors,
            tokens = out.billed,
            usd,
            "batch collected"
        );
        Ok(())
    }
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
fn batch_errors(b: &Batch) -> Option<String> {
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
