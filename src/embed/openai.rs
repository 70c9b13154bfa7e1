//! The OpenAI-compatible provider: one request to `/v1/embeddings` through async-openai.
//!
//! Why a thin tower service under async-openai: async-openai's default executor retries 429s by
//! itself and hides the response headers. The worker must instead see every status and the
//! provider's `x-ratelimit-*` / `retry-after` headers (only the provider sees the quota shared by
//! all replicas) and decide itself what to retry, when, and whether a job's attempt is used up.
//! So [`HeaderTap`] wraps async-openai's `ReqwestService`: successful responses pass through with
//! their rate-limit headers recorded; any other status becomes an [`EmbedError`] by class.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::{HttpRequestFactory, ReqwestService};
use async_openai::types::embeddings::{CreateEmbeddingRequest, EmbeddingInput, EncodingFormat};
use base64::Engine;
use secrecy::ExposeSecret;

use super::ratelimit::RateLimitHeaders;
use super::reply::{EmbedError, Embedded, classify_status};
use crate::config::{ApiSettings, ModelSettings};

/// Parses OpenAI's durations: "1s", "6m0s", "250ms", "1h2m3.5s", or plain seconds.
pub fn parse_reset(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<f64>() {
        return Some(Duration::from_secs_f64(secs.max(0.0)));
    }
    let mut total = 0.0f64;
    let mut num = String::new();
    let mut chars = v.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let n: f64 = num.parse().ok()?;
        num.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += n * unit;
        any = true;
    }
    if !num.is_empty() || !any {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// `retry-after-ms` (OpenAI) or `Retry-After` in seconds.
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = header(h, "retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    header(h, "retry-after")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
}

/// A non-2xx answer, carried through async-openai as a boxed error.
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status}")]
struct HttpFailure {
    status: u16,
    retry_after: Option<Duration>,
    code: Option<String>,
    message: String,
}

/// Tower service: records rate-limit headers; turns a non-2xx response into an `HttpFailure`.
#[derive(Clone)]
pub struct HeaderTap {
    inner: ReqwestService,
    seen: Arc<Mutex<RateLimitHeaders>>,
}

impl tower::Service<HttpRequestFactory> for HeaderTap {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: HttpRequestFactory) -> Self::Future {
        let fut = tower::Service::call(&mut self.inner, req);
        let seen = self.seen.clone();
        Box::pin(async move {
            let resp = fut.await?;
            let h = resp.headers();
            let parsed = RateLimitHeaders {
                limit_requests: header(h, "x-ratelimit-limit-requests")
                    .and_then(|v| v.parse().ok()),
                limit_tokens: header(h, "x-ratelimit-limit-tokens").and_then(|v| v.parse().ok()),
                remaining_requests: header(h, "x-ratelimit-remaining-requests")
                    .and_then(|v| v.parse().ok()),
                remaining_tokens: header(h, "x-ratelimit-remaining-tokens")
                    .and_then(|v| v.parse().ok()),
                reset_requests: header(h, "x-ratelimit-reset-requests").and_then(parse_reset),
                reset_tokens: header(h, "x-ratelimit-reset-tokens").and_then(parse_reset),
                seen_at: Some(Instant::now()),
            };
            if parsed.remaining_requests.is_some() || parsed.remaining_tokens.is_some() {
                *seen.lock().unwrap() = parsed;
            }
            if resp.status().is_success() {
                return Ok(resp);
            }
            let status = resp.status().as_u16();
            let retry_after = retry_after(resp.headers());
            let body = resp.bytes().await.map_err(OpenAIError::Reqwest)?;
            let (code, message) = match serde_json::from_slice::<serde_json::Value>(&body) {
                Ok(v) => (
                    v.pointer("/error/code")
                        .and_then(|c| c.as_str())
                        .map(str::to_string),
                    v.pointer("/error/message")
                        .and_then(|c| c.as_str())
                        .unwrap_or("")
                        .to_string(),
                ),
                Err(_) => (
                    None,
                    String::from_utf8_lossy(&body).chars().take(500).collect(),
                ),
            };
            Err(OpenAIError::Boxed(Box::new(HttpFailure {
                status,
                retry_after,
                code,
                message,
            })))
        })
    }
}

/// An OpenAI-compatible embeddings client (OpenAI, Azure OpenAI's compatible endpoint, vLLM,
/// TEI, Ollama, or the project's fake server).
#[derive(Clone)]
pub struct OpenAiEmbedder {
    client: async_openai::Client<OpenAIConfig>,
    model: String,
    dimensions: usize,
    send_dimensions: bool,
    seen: Arc<Mutex<RateLimitHeaders>>,
    /// For masking an echoed key in provider messages, never for printing.
    key: Option<secrecy::SecretString>,
    base_url: String,
    timeout_secs: u64,
}

impl OpenAiEmbedder {
    /// A client for `api.base_url` and `model`.
    pub fn new(api: &ApiSettings, model: &ModelSettings) -> anyhow::Result<Self> {
        crate::init_tls();
        let mut config = OpenAIConfig::new().with_api_base(api.base_url.trim_end_matches('/'));
        if let Some(key) = &api.api_key {
            config = config.with_api_key(key.expose_secret());
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(api.timeout_secs))
            .pool_max_idle_per_host(16)
            .build()?;
        let seen = Arc::new(Mutex::new(RateLimitHeaders::default()));
        let tap = HeaderTap {
            inner: ReqwestService::new(http.clone()),
            seen: seen.clone(),
        };
        let client = async_openai::Client::with_config(config)
            .with_http_client(http)
            .with_http_service(tap);
        Ok(OpenAiEmbedder {
            client,
            model: model.name.clone(),
            dimensions: model.dimensions,
            send_dimensions: model.send_dimensions,
            seen,
            key: api.api_key.clone(),
            base_url: api.base_url.clone(),
            timeout_secs: api.timeout_secs,
        })
    }

    /// The shared slot the rate-limit headers are recorded in.
    pub fn headers_handle(&self) -> Arc<Mutex<RateLimitHeaders>> {
        self.seen.clone()
    }

    /// Embeds `inputs` in one request.
    pub async fn embed(&self, inputs: Vec<String>) -> Result<Embedded, EmbedError> {
        let n = inputs.len();
        let request = CreateEmbeddingRequest {
            model: self.model.clone(),
            input: EmbeddingInput::StringArray(inputs),
            encoding_format: Some(EncodingFormat::Base64),
            user: None,
            dimensions: self.send_dimensions.then_some(self.dimensions as u32),
        };
        let resp = self
            .client
            .embeddings()
            .create_base64(request)
            .await
            .map_err(|e| {
                classify(e, &self.base_url, self.timeout_secs)
                    .redacted(self.key.as_ref().map(|k| k.expose_secret()))
            })?;
        if resp.data.len() != n {
            return Err(EmbedError::Fatal {
                status: None,
                message: format!(
                    "provider returned {} embeddings for {n} inputs",
                    resp.data.len()
                ),
            });
        }
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; n];
        for item in resp.data {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(item.embedding.0.as_bytes())
                .map_err(|e| EmbedError::Fatal {
                    status: None,
                    message: format!("bad base64 embedding: {e}"),
                })?;
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if v.len() != self.dimensions {
                return Err(EmbedError::Fatal {
                    status: None,
                    message: format!(
                        "provider returned {} dimensions, configured {}",
                        v.len(),
                        self.dimensions
                    ),
                });
            }
            let slot = vectors
                .get_mut(item.index as usize)
                .ok_or_else(|| EmbedError::Fatal {
                    status: None,
                    message: format!("embedding index {} out of range", item.index),
                })?;
            *slot = Some(v);
        }
        let vectors = vectors
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| EmbedError::Fatal {
                status: None,
                message: "missing embedding index".into(),
            })?;
        Ok(Embedded {
            vectors,
            prompt_tokens: resp.usage.prompt_tokens as u64,
        })
    }
}

/// Maps async-openai's error to the worker's classes, naming the cause an operator can act
/// on: refused connection vs timeout vs reset, and the setting behind it.
fn classify(e: OpenAIError, base_url: &str, timeout_secs: u64) -> EmbedError {
    match e {
        OpenAIError::Boxed(b) => match b.downcast::<HttpFailure>() {
            Ok(f) => classify_status(f.status, f.code.as_deref(), f.message, f.retry_after),
            Err(other) => EmbedError::Transient {
                status: None,
                message: other.to_string(),
                unconfirmed: true,
            },
        },
        OpenAIError::Reqwest(r) => classify_transport(&r, base_url, timeout_secs),
        OpenAIError::ApiError(a) => {
            let status = a.status_code.as_u16();
            classify_status(
                status,
                a.api_error.code.as_deref(),
                a.api_error.message,
                None,
            )
        }
        OpenAIError::JSONDeserialize(e, _) => EmbedError::Fatal {
            status: None,
            message: format!("unreadable provider response: {e}"),
        },
        other => EmbedError::Fatal {
            status: None,
            message: other.to_string(),
        },
    }
}

/// A request that got no HTTP answer. reqwest says only "error sending request for url"; the
/// cause is in its source chain.
fn classify_transport(r: &reqwest::Error, base_url: &str, timeout_secs: u64) -> EmbedError {
    let io_kind = {
        let mut source = std::error::Error::source(r);
        let mut kind = None;
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                kind = Some(io.kind());
            }
            source = e.source();
        }
        kind
    };
    let root = {
        let mut e: &dyn std::error::Error = r;
        while let Some(next) = e.source() {
            e = next;
        }
        e.to_string()
    };
    use std::io::ErrorKind::*;
    let (message, unconfirmed) = if r.is_timeout() {
        (
            format!("no answer from {base_url} within {timeout_secs} s (api.timeout_secs)"),
            true,
        )
    } else if r.is_connect() {
        let what = match io_kind {
            Some(ConnectionRefused) => "connection refused".to_string(),
            _ => format!("cannot connect ({root})"),
        };
        (format!("{what} by {base_url} (api.base_url)"), false)
    } else {
        let what = match io_kind {
            Some(ConnectionReset) => "connection reset by the provider".to_string(),
            Some(ConnectionAborted) | Some(BrokenPipe) | Some(UnexpectedEof) => {
                "connection closed by the provider".to_string()
            }
            _ => format!("request failed ({root})"),
        };
        (format!("{what} during a request to {base_url}"), true)
    };
    EmbedError::Transient {
        status: r.status().map(|s| s.as_u16()),
        message,
        unconfirmed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_openai_reset_durations() {
        assert_eq!(parse_reset("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_reset("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_reset("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_reset("1h2m3s"), Some(Duration::from_secs(3723)));
        assert_eq!(parse_reset("0.5"), Some(Duration::from_millis(500)));
        assert_eq!(parse_reset("soon"), None);
    }
}
