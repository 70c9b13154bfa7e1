//! Provider: the configured one of the providers, behind one call.

use std::sync::{Arc, Mutex};

#[cfg(feature = "local")]
use super::local;
use super::openai::OpenAiEmbedder;
use super::ratelimit::RateLimitHeaders;
use super::reply::{EmbedError, Embedded};
use crate::config::{ApiSettings, ModelSettings, Provider};

/// The configured provider: an OpenAI-compatible API, or the in-process local model.
#[derive(Clone)]
pub enum Embedder {
    /// An OpenAI-compatible API.
    OpenAi(Box<OpenAiEmbedder>),
    #[cfg(feature = "local")]
    /// all-MiniLM-L6-v2 in-process.
    Local(local::LocalEmbedder),
}

impl Embedder {
    /// Builds the provider `model.provider` names.
    pub fn from_settings(api: &ApiSettings, model: &ModelSettings) -> anyhow::Result<Self> {
        match model.provider {
            Provider::Openai => Ok(Embedder::OpenAi(Box::new(OpenAiEmbedder::new(api, model)?))),
            #[cfg(feature = "local")]
            Provider::Local => Ok(Embedder::Local(local::LocalEmbedder::load(
                std::path::Path::new(&model.local_path),
            )?)),
            #[cfg(not(feature = "local"))]
            Provider::Local => {
                anyhow::bail!("model.provider = \"local\" needs a build with the `local` feature")
            }
        }
    }

    /// Embeds `inputs` in one request.
    pub async fn embed(&self, inputs: Vec<String>) -> Result<Embedded, EmbedError> {
        match self {
            Embedder::OpenAi(e) => e.embed(inputs).await,
            #[cfg(feature = "local")]
            Embedder::Local(e) => e.embed(inputs).await,
        }
    }

    /// Where the provider's rate-limit headers are recorded (never written for the local model).
    pub fn headers_handle(&self) -> Arc<Mutex<RateLimitHeaders>> {
        match self {
            Embedder::OpenAi(e) => e.headers_handle(),
            #[cfg(feature = "local")]
            Embedder::Local(_) => Arc::new(Mutex::new(RateLimitHeaders::default())),
        }
    }

    /// Whether requests go to a remote API (rate limits and retries apply).
    pub fn is_remote(&self) -> bool {
        matches!(self, Embedder::OpenAi(_))
    }
}
