//! The provider's Batch API through async-openai: files (upload, content, delete) and batches
//! (create, retrieve, list, cancel). Errors carry the provider's message with the key masked.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::InputSource;
use async_openai::types::batches::{Batch, BatchCompletionWindow, BatchEndpoint, BatchRequest};
use async_openai::types::files::{CreateFileRequest, FileInput, FilePurpose};
use secrecy::ExposeSecret;

use crate::config::ApiSettings;

/// The metadata key that ties a provider's batch to its record (`embed_worker.batches.id`).
pub(crate) const RECORD_KEY: &str = "embed_worker_batch";

/// A Batch API client for `api.base_url`.
pub(crate) struct BatchClient {
    client: async_openai::Client<OpenAIConfig>,
    key: Option<secrecy::SecretString>,
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
            client: async_openai::Client::with_config(config).with_http_client(http),
            key: api.api_key.clone(),
        })
    }

    fn err(&self, what: &str, e: OpenAIError) -> anyhow::Error {
        anyhow::anyhow!(
            "{what}: {}",
            crate::redact::secrets(&e.to_string(), self.key.as_ref().map(|k| k.expose_secret()))
        )
    }

    /// Uploads a JSONL file with purpose `batch`; returns its id.
    pub(crate) async fn upload(&self, filename: &str, bytes: Vec<u8>) -> anyhow::Result<String> {
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

    /// Creates the batch of `/v1/embeddings` requests in `file_id`, tagged with its record id.
    pub(crate) async fn create(&self, file_id: &str, record: i64) -> anyhow::Result<Batch> {
        let req = BatchRequest {
            input_file_id: file_id.to_string(),
            endpoint: BatchEndpoint::V1Embeddings,
            completion_window: BatchCompletionWindow::W24H,
            metadata: Some(HashMap::from([(
                RECORD_KEY.to_string(),
                serde_json::Value::String(record.to_string()),
            )])),
            output_expires_after: None,
        };
        self.client
            .batches()
            .create(req)
            .await
            .map_err(|e| self.err("creating the batch", e))
    }

    /// The provider's batch created for `record`, if there is one (a submitter that died
    /// between creating it and recording its id).
    pub(crate) async fn find(&self, record: i64) -> anyhow::Result<Option<Batch>> {
        let list = self
            .client
            .batches()
            .list()
            .await
            .map_err(|e| self.err("listing batches", e))?;
        let want = record.to_string();
        Ok(list.data.into_iter().find(|b| {
            serde_json::to_value(&b.metadata)
                .ok()
                .and_then(|m| m.get(RECORD_KEY).cloned())
                .is_some_and(|v| v.as_str() == Some(want.as_str()))
        }))
    }

    /// The batch now.
    pub(crate) async fn retrieve(&self, id: &str) -> anyhow::Result<Batch> {
        self.client
            .batches()
            .retrieve(id)
            .await
            .map_err(|e| self.err(&format!("retrieving batch {id}"), e))
    }

    /// Asks the provider to cancel the batch.
    pub(crate) async fn cancel(&self, id: &str) -> anyhow::Result<Batch> {
        self.client
            .batches()
            .cancel(id)
            .await
            .map_err(|e| self.err(&format!("cancelling batch {id}"), e))
    }

    /// A file's content.
    pub(crate) async fn content(&self, file_id: &str) -> anyhow::Result<Vec<u8>> {
        let bytes = self
            .client
            .files()
            .content(file_id)
            .await
            .map_err(|e| self.err(&format!("downloading file {file_id}"), e))
            .context("batch output")?;
        Ok(bytes.to_vec())
    }

    /// Deletes a file at the provider.
    pub(crate) async fn delete(&self, file_id: &str) -> anyhow::Result<()> {
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
