//! The provider's Batch API through async-openai: files (upload, delete) and batches (create,
//! retrieve, list, cancel); output files are read line by line over a plain streamed GET, so
//! memory holds one line, not the file. Errors carry the provider's message with the key
//! masked, and say whether trying again can help ([`BatchError`]).

use std::collections::HashMap;
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::InputSource;
use async_openai::types::batches::{Batch, BatchCompletionWindow, BatchEndpoint, BatchRequest};
use async_openai::types::files::{CreateFileRequest, FileInput, FilePurpose};
use secrecy::ExposeSecret;

use crate::config::ApiSettings;

/// The metadata key that ties a provider's batch to its record (`embed_worker.batches.id`).
pub(crate) const RECORD_KEY: &str = "embed_worker_batch";

/// The metadata key that ties a provider's batch to the database that made it
/// (`embed_worker.installation.id`).
pub(crate) const INSTALLATION_KEY: &str = "embed_worker_installation";

/// What the batch list says of one batch, read field by field.
#[derive(Debug, Clone)]
pub(crate) struct Listed {
    /// The provider's id.
    pub id: String,
    /// Its status, as a word.
    pub status: String,
    input_file_id: String,
    created_at: i64,
    metadata: serde_json::Value,
}

impl Listed {
    /// The entry, or `None` when it lacks an id, a status or a creation time.
    fn read(v: &serde_json::Value) -> Option<Listed> {
        Some(Listed {
            id: v["id"].as_str()?.to_string(),
            status: v["status"].as_str()?.to_string(),
            input_file_id: v["input_file_id"].as_str().unwrap_or_default().to_string(),
            created_at: v["created_at"].as_i64()?,
            metadata: v["metadata"].clone(),
        })
    }

    fn metadata(&self, key: &str) -> Option<&str> {
        self.metadata[key].as_str()
    }
}

/// A Batch API client for `api.base_url`.
pub(crate) struct BatchClient {
    client: async_openai::Client<OpenAIConfig>,
    http: reqwest::Client,
    base_url: String,
    key: Option<secrecy::SecretString>,
}

/// What went wrong with one batch's call, and whether the next round may do better.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BatchError {
    /// The provider refused (4xx other than 408/409/429) or answered what we cannot read: the
    /// same call will fail again, so the batch is ended with this reason.
    #[error("{0}")]
    Permanent(String),
    /// Unreachable, 5xx, rate-limited, timed out: tried again next round (a few times).
    #[error("{0}")]
    Transient(String),
}

impl BatchError {
    fn from_status(status: reqwest::StatusCode, message: String) -> BatchError {
        let retryable = status.is_server_error()
            || matches!(status.as_u16(), 408 | 409 | 429)
            || !status.is_client_error();
        if retryable {
            BatchError::Transient(message)
        } else {
            BatchError::Permanent(message)
        }
    }
}

/// The longest output line read (a line holds one request's vectors; `submit` keeps requests
/// far below this).
const MAX_LINE: usize = 64 * 1024 * 1024;

/// An output or error file, line by line as it arrives.
pub(crate) struct Lines {
    response: reqwest::Response,
    buf: Vec<u8>,
    /// `buf[..scanned]` holds no newline.
    scanned: usize,
    done: bool,
    file: String,
}

impl Lines {
    /// The next non-empty line, without its newline; `None` at the end.
    pub(crate) async fn next(&mut self) -> Result<Option<Vec<u8>>, BatchError> {
        loop {
            if let Some(at) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(self.scanned + at + 1);
                self.scanned = 0;
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.done {
                let line = std::mem::take(&mut self.buf);
                return Ok((!line.iter().all(u8::is_ascii_whitespace)).then_some(line));
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => {
                    self.scanned = self.buf.len();
                    self.buf.extend_from_slice(&bytes);
                    if self.buf.len() > MAX_LINE {
                        return Err(BatchError::Permanent(format!(
                            "file {}: a line longer than {} MB",
                            self.file,
                            MAX_LINE >> 20
                        )));
                    }
                }
                Ok(None) => self.done = true,
                Err(e) => {
                    return Err(BatchError::Transient(format!(
                        "reading file {}: {e}",
                        self.file
                    )));
                }
            }
        }
    }
}

impl BatchClient {
    /// A client with the configured key and a timeout long enough for a 200 MB upload.
    pub(crate) fn new(api: &ApiSettings) -> anyhow::Result<Self> {
        crate::init_tls();
        let mut config = OpenAIConfig::new().with_api_base(api.base_url.trim_end_matches('/'));
        if let Some(key) = &api.api_key {
            config = config.with_api_key(key.expose_secret());
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(api.timeout_secs.max(300)))
            .build()?;
        Ok(BatchClient {
            client: async_openai::Client::with_config(config).with_http_client(http.clone()),
            http,
            base_url: api.base_url.trim_end_matches('/').to_string(),
            key: api.api_key.clone(),
        })
    }

    fn masked(&self, text: &str) -> String {
        crate::redact::secrets(text, self.key.as_ref().map(|k| k.expose_secret()))
    }

    fn err(&self, what: &str, e: OpenAIError) -> BatchError {
        let message = format!("{what}: {}", self.masked(&e.to_string()));
        match &e {
            OpenAIError::ApiError(r) => BatchError::from_status(r.status_code, message),
            // An answer we cannot read (a batch object of another shape): reading it again
            // gives the same.
            OpenAIError::JSONDeserialize(..) | OpenAIError::InvalidArgument(_) => {
                BatchError::Permanent(message)
            }
            _ => BatchError::Transient(message),
        }
    }

    /// Uploads a JSONL file with purpose `batch`; returns its id.
    pub(crate) async fn upload(
        &self,
        filename: &str,
        bytes: Vec<u8>,
    ) -> Result<String, BatchError> {
        let req = CreateFileRequest {
            file: FileInput {
                source: InputSource::VecU8 {
                    filename: filename.to_string(),
                    vec: bytes,
                },
            },
            purpose: FilePurpose::Batch,
            expires_after: None,
        };
        let f = self
            .client
            .files()
            .create(req)
            .await
            .map_err(|e| self.err("uploading the batch file", e))?;
        Ok(f.id)
    }

    /// Creates the batch of `/v1/embeddings` requests in `file_id`, tagged with its record id
    /// and this database's installation id.
    pub(crate) async fn create(
        &self,
        file_id: &str,
        record: i64,
        installation: uuid::Uuid,
    ) -> Result<Batch, BatchError> {
        let req = BatchRequest {
            input_file_id: file_id.to_string(),
            endpoint: BatchEndpoint::V1Embeddings,
            completion_window: BatchCompletionWindow::W24H,
            metadata: Some(HashMap::from([
                (
                    RECORD_KEY.to_string(),
                    serde_json::Value::String(record.to_string()),
                ),
                (
                    INSTALLATION_KEY.to_string(),
                    serde_json::Value::String(installation.to_string()),
                ),
            ])),
            output_expires_after: None,
        };
        self.client
            .batches()
            .create(req)
            .await
            .map_err(|e| self.err("creating the batch", e))
    }

    /// The provider's batch created for `record` of this installation from `file_id`, if there
    /// is one that has not failed (a submitter that died between creating it and recording its
    /// id). All three must match: another database on the same account (staging, a restored
    /// copy) numbers its records alike, and a restored copy has our installation id but never
    /// our uploads. Pages through the list, newest first, until it passes `since` (the
    /// record's creation, less a minute of clock skew): another tenant's newer batches do not
    /// hide ours. Each entry is read on its own: one the provider lists in a shape we cannot
    /// read is skipped (and counted in the log), not a failure of every later create.
    pub(crate) async fn find(
        &self,
        record: i64,
        installation: uuid::Uuid,
        file_id: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<Listed>, BatchError> {
        let (want, ours) = (record.to_string(), installation.to_string());
        let oldest = (since - chrono::Duration::seconds(60)).timestamp();
        let mut after: Option<String> = None;
        let mut unreadable = 0usize;
        for _ in 0..1000 {
            let mut query = vec![("limit", "100".to_string())];
            if let Some(a) = &after {
                query.push(("after", a.clone()));
            }
            let page = self.get_json("batches", &query, "listing batches").await?;
            let data = page["data"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            let listed: Vec<Listed> = data.iter().filter_map(Listed::read).collect();
            unreadable += data.len() - listed.len();
            let past = listed.last().is_none_or(|b| b.created_at < oldest);
            after = data
                .last()
                .and_then(|b| b["id"].as_str())
                .map(str::to_string);
            let found = listed.into_iter().find(|b| {
                !matches!(b.status.as_str(), "failed" | "expired" | "cancelled")
                    && b.metadata(RECORD_KEY) == Some(want.as_str())
                    && b.metadata(INSTALLATION_KEY) == Some(ours.as_str())
                    && b.input_file_id == file_id
                    && b.created_at >= oldest
            });
            let more = page["has_more"].as_bool().unwrap_or(false);
            if found.is_some() || past || !more || after.is_none() {
                if unreadable > 0 {
                    tracing::warn!(
                        record,
                        unreadable,
                        "the provider's batch list held entries that could not be read; skipped"
                    );
                }
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// `GET {base_url}/{path}?{query}` as JSON, errors as [`BatchError`]s with the provider's
    /// message, key masked.
    async fn get_json(
        &self,
        path: &str,
        query: &[(&str, String)],
        what: &str,
    ) -> Result<serde_json::Value, BatchError> {
        let mut req = self
            .http
            .get(format!("{}/{path}", self.base_url))
            .query(query);
        if let Some(key) = &self.key {
            req = req.bearer_auth(key.expose_secret());
        }
        let response = req.send().await.map_err(|e| {
            BatchError::Transient(format!("{what}: {}", self.masked(&e.to_string())))
        })?;
        let status = response.status();
        let body = response.text().await.map_err(|e| {
            BatchError::Transient(format!("{what}: {}", self.masked(&e.to_string())))
        })?;
        if !status.is_success() {
            return Err(self.refused(what, status, &body));
        }
        serde_json::from_str::<serde_json::Value>(&body)
            .map_err(|e| BatchError::Transient(format!("{what}: the answer is not JSON: {e}")))
    }

    /// A refusal's error: OpenAI's `error.message` when the body is its error object, else the
    /// body's first 200 characters; secrets masked.
    fn refused(&self, what: &str, status: reqwest::StatusCode, body: &str) -> BatchError {
        let message = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body.chars().take(200).collect());
        BatchError::from_status(
            status,
            format!("{what}: {status}: {}", self.masked(&message)),
        )
    }

    /// The batch now.
    pub(crate) async fn retrieve(&self, id: &str) -> Result<Batch, BatchError> {
        self.client
            .batches()
            .retrieve(id)
            .await
            .map_err(|e| self.err(&format!("retrieving batch {id}"), e))
    }

    /// Asks the provider to cancel the batch.
    pub(crate) async fn cancel(&self, id: &str) -> Result<Batch, BatchError> {
        self.client
            .batches()
            .cancel(id)
            .await
            .map_err(|e| self.err(&format!("cancelling batch {id}"), e))
    }

    /// A file's content, line by line as it arrives. A file the provider no longer has (404:
    /// OpenAI deletes output files some time after the batch) is a permanent error.
    pub(crate) async fn lines(&self, file_id: &str) -> Result<Lines, BatchError> {
        let url = format!("{}/files/{file_id}/content", self.base_url);
        let mut req = self.http.get(&url);
        if let Some(key) = &self.key {
            req = req.bearer_auth(key.expose_secret());
        }
        let what = format!("downloading file {file_id}");
        let response = req.send().await.map_err(|e| {
            BatchError::Transient(format!("{what}: {}", self.masked(&e.to_string())))
        })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(self.refused(&what, status, &body));
        }
        Ok(Lines {
            response,
            buf: Vec::new(),
            scanned: 0,
            done: false,
            file: file_id.to_string(),
        })
    }

    /// Deletes a file at the provider.
    pub(crate) async fn delete(&self, file_id: &str) -> Result<(), BatchError> {
        self.client
            .files()
            .delete(file_id)
            .await
            .map_err(|e| self.err(&format!("deleting file {file_id}"), e))?;
        Ok(())
    }
}

/// The provider's status as a word (`in_progress`, `completed`…).
pub(crate) fn status_str(s: &async_openai::types::batches::BatchStatus) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{s:?}").to_lowercase())
}
