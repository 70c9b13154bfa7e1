//! An OpenAI-compatible embeddings server for tests, benchmarks and the offline demo.
//!
//! Why build one: the real API is unreachable here, and a mock that always says yes tests
//! nothing. This one behaves like the provider where the worker must cope with it: OpenAI's
//! request limits (2,048 inputs, 8,192 tokens per input, 300,000 tokens per request) answered
//! with OpenAI's error body, `usage` counted with the real tokenizer, `x-ratelimit-*` headers,
//! RPM/TPM limits answered with 429 and `retry-after(-ms)`, `insufficient_quota`, injected 5xx,
//! and configurable latency. Vectors are deterministic unit vectors from a hash of the text
//! (same text → same vector). Every request is recorded for assertions.

mod batch;

pub use batch::BATCH_ERROR_MARKER;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

/// Behaviour of the fake; change it at run time with [`FakeServer::configure`].
#[derive(Debug, Clone)]
pub struct FakeConfig {
    /// Inputs per request (OpenAI: 2,048).
    pub max_inputs: usize,
    /// Tokens per input (OpenAI: 8,192).
    pub max_tokens_per_input: usize,
    /// Estimated tokens per request (OpenAI: 300,000).
    pub max_tokens_per_request: usize,
    /// Requests per minute; 0 = unlimited.
    pub rpm: u64,
    /// Tokens per minute; 0 = unlimited.
    pub tpm: u64,
    /// The rate limits' "minute" (tests shorten it).
    pub window: Duration,
    /// Delay before each answer.
    pub latency: Duration,
    /// Extra delay per 1,000 tokens.
    pub latency_per_1k_tokens: Duration,
    /// Share of requests answered with a 5xx, 0.0..=1.0.
    pub error_rate: f64,
    /// Answer every request with 429 `insufficient_quota`.
    pub insufficient_quota: bool,
    /// Inputs containing this marker are rejected as invalid (400), like a bad input would be.
    pub reject_marker: Option<String>,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// Put the bearer token the request carried into the 401 message, as some providers and
    /// proxies do (a secret that must never reach our logs or stored reasons).
    pub echo_key_in_errors: bool,
    /// `usage.prompt_tokens` = cl100k count × this, like a provider with another tokenizer.
    pub billing_multiplier: f64,
    /// Report the request limit per minute in the headers whatever `window` enforces, as real
    /// providers quantise: one that enforces 1 request a second says "limit 60, remaining 59".
    pub quantised_rpm: Option<u64>,
    /// Send no `x-ratelimit-*` headers at all, as some OpenAI-compatible servers do: the
    /// limits are learnt from 429s only.
    pub no_limit_headers: bool,
    /// After this many successful requests, answer every request with a 503 (an outage that
    /// starts mid-run).
    pub fail_after: Option<usize>,
    /// Batch API: how long a batch stays `in_progress` before it ends.
    pub batch_delay: Duration,
    /// Batch API: this many of the first batches expire with only the first half of their
    /// lines answered.
    pub batch_expire_first: usize,
    /// Batch API: this many of the first batches fail as a whole (no output).
    pub batch_fail_first: usize,
    /// Batch API: how the first [`FakeConfig::hostile_batches`] batches misbehave.
    pub hostile: Option<Hostile>,
    /// Batch API: how many batches (by creation order; create calls for [`Hostile::RefuseCreate`])
    /// [`FakeConfig::hostile`] applies to.
    pub hostile_batches: usize,
}

/// A Batch API provider misbehaving, one way at a time (each seen for real or documented).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    /// The output file is gone when the batch has ended (OpenAI deletes files): content 404.
    OutputGone,
    /// One output line (the first) is not JSON.
    GarbageLine,
    /// `POST /v1/batches` refused with 400.
    RefuseCreate,
    /// The batch object cannot be read: `status` is a number.
    UnreadableBatch,
    /// `data[].index` shifted by one in every output line.
    ShiftedIndexes,
    /// Every output line twice, plus a line with a `custom_id` the batch never sent.
    RepeatedAndForeignLines,
    /// The batch fails as a whole for a transient reason (`token_limit_exceeded`).
    TransientFailure,
}

impl Default for FakeConfig {
    fn default() -> Self {
        FakeConfig {
            max_inputs: 2048,
            max_tokens_per_input: 8192,
            max_tokens_per_request: 300_000,
            rpm: 0,
            tpm: 0,
            window: Duration::from_secs(60),
            latency: Duration::ZERO,
            latency_per_1k_tokens: Duration::ZERO,
            error_rate: 0.0,
            insufficient_quota: false,
            reject_marker: Some("<<fake:reject>>".into()),
            api_key: None,
            echo_key_in_errors: false,
            billing_multiplier: 1.0,
            quantised_rpm: None,
            no_limit_headers: false,
            fail_after: None,
            batch_delay: Duration::ZERO,
            batch_expire_first: 0,
            batch_fail_first: 0,
            hostile: None,
            hostile_batches: 1,
        }
    }
}

/// Inputs containing these markers get a poisoned vector back (the request succeeds): what a
/// misbehaving provider or model server returns now and then. This one: a NaN component.
pub const NAN_MARKER: &str = "<<fake:nan>>";
/// An input with this marker gets an infinite component.
pub const INF_MARKER: &str = "<<fake:inf>>";
/// An input with this marker gets an all-zero vector.
pub const ZERO_MARKER: &str = "<<fake:zero>>";

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The model asked for.
    pub model: String,
    /// Inputs in the request.
    pub inputs: usize,
    /// Tokens counted for `usage` (0 when the request was refused).
    pub tokens: u64,
    /// The status answered.
    pub status: u16,
    /// When.
    pub at: Instant,
}

/// A limit as OpenAI enforces it: a bucket of `limit` per window, replenished continuously.
#[derive(Default)]
struct Bucket {
    available: f64,
    at: Option<Instant>,
}

impl Bucket {
    /// Refills to `now`; returns what is available.
    fn refill(&mut self, limit: u64, window: Duration, now: Instant) -> f64 {
        let rate = limit as f64 / window.as_secs_f64();
        self.available = match self.at {
            None => limit as f64,
            Some(t) => {
                (self.available + now.duration_since(t).as_secs_f64() * rate).min(limit as f64)
            }
        };
        self.at = Some(now);
        self.available
    }
}

/// Seconds until `need` is available, and until the bucket is full again.
fn bucket_waits(available: f64, need: f64, limit: u64, window: Duration) -> (Duration, Duration) {
    let rate = limit as f64 / window.as_secs_f64();
    (
        Duration::from_secs_f64(((need - available) / rate).max(0.0)),
        Duration::from_secs_f64(((limit as f64 - available) / rate).max(0.0)),
    )
}

#[derive(Default)]
struct Window {
    requests: Bucket,
    tokens: Bucket,
}

struct Inner {
    config: Mutex<FakeConfig>,
    recorded: Mutex<Vec<Recorded>>,
    window: Mutex<Window>,
    rng: Mutex<u64>,
    /// Requests let through to an answer; claimed atomically so that concurrent requests
    /// cannot all see "fewer than `fail_after`".
    answered: AtomicUsize,
    /// Uploaded and produced files, and batches (the Batch API).
    batch: batch::Store,
}

#[derive(Clone)]
/// A running fake (cheap to clone).
pub struct FakeServer {
    /// Where it listens.
    pub addr: SocketAddr,
    inner: Arc<Inner>,
}

impl FakeServer {
    /// Starts on `127.0.0.1:port` (0 picks a free port) on the current runtime.
    pub async fn start(config: FakeConfig, port: u16) -> std::io::Result<FakeServer> {
        let inner = Arc::new(Inner {
            config: Mutex::new(config),
            recorded: Mutex::new(Vec::new()),
            window: Mutex::new(Window::default()),
            rng: Mutex::new(0x9E3779B97F4A7C15),
            answered: AtomicUsize::new(0),
            batch: batch::Store::default(),
        });
        let app = batch::routes(
            Router::new()
                .route("/v1/embeddings", post(embeddings))
                .route("/embeddings", post(embeddings)),
        )
        // Batch files reach 200 MB (axum's default limit is 2 MB).
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024 * 1024))
        .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(FakeServer { addr, inner })
    }

    /// The base URL to configure as `api.base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Changes the behaviour of a running fake.
    pub fn configure(&self, f: impl FnOnce(&mut FakeConfig)) {
        f(&mut self.inner.config.lock().unwrap());
    }

    /// Every request seen so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.recorded.lock().unwrap().clone()
    }

    /// Batches created so far (a resumed batch must not be created twice).
    pub fn batches_created(&self) -> usize {
        self.inner.batch.created()
    }

    /// Tokens billed through batches (`usage.prompt_tokens` of their output lines).
    pub fn batch_tokens_billed(&self) -> u64 {
        self.inner.batch.tokens_billed()
    }

    /// Adds `n` finished batches of another tenant, newer than every batch so far (they page
    /// ours out of the first page of `GET /v1/batches`).
    pub fn add_foreign_batches(&self, n: usize) {
        self.inner.batch.add_foreign(n);
    }

    /// Files stored now (uploaded and produced, not yet deleted).
    pub fn files_stored(&self) -> usize {
        self.inner.batch.files_stored()
    }

    /// Sum of `usage.prompt_tokens` over successful requests.
    pub fn tokens_billed(&self) -> u64 {
        self.requests()
            .iter()
            .filter(|r| r.status == 200)
            .map(|r| r.tokens)
            .sum()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    ManyTokens(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct Request {
    model: String,
    input: Input,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
}

fn error(
    status: StatusCode,
    message: impl Into<String>,
    kind: &str,
    code: Option<&str>,
) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

fn model_dims(model: &str) -> usize {
    match model {
        "text-embedding-3-large" => 3072,
        m if m.contains("minilm") || m.contains("MiniLM") => 384,
        _ => 1536,
    }
}

/// A deterministic unit vector from the text.
pub fn fake_vector(text: &str, dims: usize) -> Vec<f32> {
    let seed = Sha256::digest(text.as_bytes());
    let mut state = u64::from_le_bytes(seed[..8].try_into().unwrap());
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            // splitmix64
            state = state.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            (z as f64 / u64::MAX as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// Why a request is refused: the status and OpenAI's error body, and for a 429 how long to wait.
struct Refusal {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    retry_after: Option<Duration>,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>, kind: &'static str) -> Refusal {
        Refusal {
            status,
            message: message.into(),
            kind,
            code: None,
            retry_after: None,
        }
    }
    fn code(mut self, code: &'static str) -> Refusal {
        self.code = Some(code);
        self
    }
    fn into_response(self) -> Response {
        let mut resp = error(self.status, self.message, self.kind, self.code);
        if let Some(wait) = self.retry_after {
            let h = resp.headers_mut();
            h.insert(
                "retry-after-ms",
                HeaderValue::from_str(&wait.as_millis().max(1).to_string()).unwrap(),
            );
            h.insert(
                "retry-after",
                HeaderValue::from_str(&wait.as_secs_f64().ceil().to_string()).unwrap(),
            );
        }
        resp
    }
}

/// The rate-limit state after an admitted request, for the response headers.
struct Quota {
    remaining_requests: u64,
    remaining_tokens: u64,
    reset_requests: Duration,
    reset_tokens: Duration,
}

impl Inner {
    fn record(&self, model: &str, inputs: usize, tokens: u64, status: u16) {
        self.recorded.lock().unwrap().push(Recorded {
            model: model.to_string(),
            inputs,
            tokens,
            status,
            at: Instant::now(),
        });
    }

    /// Records a refused request and answers it.
    fn refuse(&self, model: &str, inputs: usize, r: Refusal) -> Response {
        self.record(model, inputs, 0, r.status.as_u16());
        r.into_response()
    }
}

/// `POST /v1/embeddings`, in the order the real service checks: the key, the body, the inputs
/// against the per-input and per-request limits, the rate limits, then (after the configured
/// latency and injected failures) the answer.
async fn embeddings(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let cfg = inner.config.lock().unwrap().clone();
    if let Err(r) = authorize(&cfg, &headers) {
        return inner.refuse("", 0, r);
    }
    let (req, texts) = match parse_inputs(&body) {
        Ok(parsed) => parsed,
        Err(r) => return inner.refuse("", 0, r),
    };
    let n = texts.len();
    let (total, dims) = match check_limits(&cfg, &req, &texts) {
        Ok(checked) => checked,
        Err(r) => return inner.refuse(&req.model, n, r),
    };
    let quota = match admit(&inner, &cfg, &req.model, total) {
        Ok(q) => q,
        Err(r) => return inner.refuse(&req.model, n, r),
    };
    let latency = cfg.latency + cfg.latency_per_1k_tokens.mul_f64(total as f64 / 1000.0);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if injected_failure(&inner, &cfg) {
        // A failed request still used its rate-limit slot, as at the provider.
        return inner.refuse(
            &req.model,
            n,
            Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
            ),
        );
    }
    respond(&inner, &cfg, &req, &texts, dims, total, quota)
}

/// The bearer token, when the fake requires one (a wrong one may be echoed back, as some
/// providers do).
fn authorize(cfg: &FakeConfig, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(key) = &cfg.api_key else {
        return Ok(());
    };
    let sent = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if sent == Some(key.as_str()) {
        return Ok(());
    }
    let message = if cfg.echo_key_in_errors {
        format!(
            "Incorrect API key provided: {}. You can find your API key at https://platform.example/account/api-keys.",
            sent.unwrap_or("")
        )
    } else {
        "Incorrect API key provided.".to_string()
    };
    Err(
        Refusal::new(StatusCode::UNAUTHORIZED, message, "invalid_request_error")
            .code("invalid_api_key"),
    )
}

/// The JSON body and its inputs as texts (token arrays are decoded).
fn parse_inputs(body: &[u8]) -> Result<(Request, Vec<String>), Refusal> {
    let mut req: Request = serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("We could not parse the JSON body of your request. ({e})"),
            "invalid_request_error",
        )
    })?;
    let bpe = tiktoken_rs::cl100k_base_singleton();
    let input = std::mem::replace(&mut req.input, Input::Many(Vec::new()));
    let texts = match input {
        Input::One(s) => vec![s],
        Input::Many(v) => v,
        Input::Tokens(t) => vec![bpe.decode(&t).unwrap_or_default()],
        Input::ManyTokens(ts) => ts
            .into_iter()
            .map(|t| bpe.decode(&t).unwrap_or_default())
            .collect(),
    };
    Ok((req, texts))
}

/// The quota, the number of inputs, each input (empty, rejected marker, over the context),
/// the per-request token cap (OpenAI's ~0.25-token-per-byte estimate) and `dimensions`.
/// Returns the tokens to bill and the vectors' dimensions.
fn check_limits(
    cfg: &FakeConfig,
    req: &Request,
    texts: &[String],
) -> Result<(u64, usize), Refusal> {
    let bad =
        |message: String| Refusal::new(StatusCode::BAD_REQUEST, message, "invalid_request_error");
    if cfg.insufficient_quota {
        return Err(Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
        )
        .code("insufficient_quota"));
    }
    let n = texts.len();
    if n == 0 || n > cfg.max_inputs {
        return Err(bad(format!(
            "'$.input' is invalid: an array must have between 1 and {} items.",
            cfg.max_inputs
        )));
    }
    let bpe = tiktoken_rs::cl100k_base_singleton();
    let mut total = 0u64;
    let mut estimated = 0u64;
    for (i, t) in texts.iter().enumerate() {
        if t.is_empty() {
            return Err(bad(format!("'$.input[{i}]' is invalid: empty string.")));
        }
        if cfg
            .reject_marker
            .as_ref()
            .is_some_and(|m| t.contains(m.as_str()))
        {
            return Err(bad(format!("'$.input[{i}]' is invalid.")));
        }
        let c = bpe.encode_ordinary(t).len();
        if c > cfg.max_tokens_per_input {
            return Err(bad(format!(
                "This model's maximum context length is {} tokens, however you requested {c} tokens in input {i}.",
                cfg.max_tokens_per_input
            )));
        }
        total += c as u64;
        estimated += crate::embed::plan::request_cap_tokens(t, c) as u64;
    }
    if estimated as usize > cfg.max_tokens_per_request {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Requested {estimated} tokens, max {} tokens per request",
                cfg.max_tokens_per_request
            ),
            "max_tokens_per_request",
        )
        .code("max_tokens_per_request"));
    }
    let dims = match req.dimensions {
        Some(_) if !req.model.starts_with("text-embedding-3") => {
            return Err(bad(
                "This model does not support specifying dimensions.".into()
            ));
        }
        Some(d) => d,
        None => model_dims(&req.model),
    };
    Ok((total, dims))
}

/// The rate limits: buckets replenished continuously over the window. A request over either
/// limit is refused with how long to wait; an admitted one takes its share.
fn admit(inner: &Inner, cfg: &FakeConfig, model: &str, total: u64) -> Result<Quota, Refusal> {
    let now = Instant::now();
    let mut w = inner.window.lock().unwrap();
    let avail_req = if cfg.rpm > 0 {
        w.requests.refill(cfg.rpm, cfg.window, now)
    } else {
        f64::MAX
    };
    let avail_tok = if cfg.tpm > 0 {
        w.tokens.refill(cfg.tpm, cfg.window, now)
    } else {
        f64::MAX
    };
    let over_rpm = cfg.rpm > 0 && avail_req < 1.0;
    let over_tpm = cfg.tpm > 0 && avail_tok < total as f64;
    if over_rpm || over_tpm {
        let wait_req = if over_rpm {
            bucket_waits(avail_req, 1.0, cfg.rpm, cfg.window).0
        } else {
            Duration::ZERO
        };
        let wait_tok = if over_tpm {
            bucket_waits(avail_tok, total as f64, cfg.tpm, cfg.window).0
        } else {
            Duration::ZERO
        };
        let wait = wait_req.max(wait_tok).max(Duration::from_millis(1));
        let (what, limit, used, requested) = if over_tpm {
            (
                "tokens per min (TPM)",
                cfg.tpm,
                cfg.tpm.saturating_sub(avail_tok as u64),
                total,
            )
        } else {
            (
                "requests per min (RPM)",
                cfg.rpm,
                cfg.rpm.saturating_sub(avail_req as u64),
                1,
            )
        };
        let mut r = Refusal::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "Rate limit reached for {model} on {what}: Limit {limit}, Used {used}, Requested {requested}. Please try again in {:.3}s.",
                wait.as_secs_f64()
            ),
            if over_tpm { "tokens" } else { "requests" },
        )
        .code("rate_limit_exceeded");
        r.retry_after = Some(wait);
        return Err(r);
    }
    if cfg.rpm > 0 {
        w.requests.available -= 1.0;
    }
    if cfg.tpm > 0 {
        w.tokens.available -= total as f64;
    }
    let (ra, ta) = (w.requests.available, w.tokens.available);
    Ok(Quota {
        remaining_requests: ra.max(0.0) as u64,
        remaining_tokens: ta.max(0.0) as u64,
        reset_requests: if cfg.rpm > 0 {
            bucket_waits(ra, 0.0, cfg.rpm, cfg.window).1
        } else {
            Duration::ZERO
        },
        reset_tokens: if cfg.tpm > 0 {
            bucket_waits(ta, 0.0, cfg.tpm, cfg.window).1
        } else {
            Duration::ZERO
        },
    })
}

/// An outage that began after `fail_after` good answers, or a random 5xx at `error_rate`.
fn injected_failure(inner: &Inner, cfg: &FakeConfig) -> bool {
    let random = cfg.error_rate > 0.0 && {
        let mut s = inner.rng.lock().unwrap();
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        (*s as f64 / u64::MAX as f64) < cfg.error_rate
    };
    if random {
        return true;
    }
    let limit = cfg.fail_after.unwrap_or(usize::MAX);
    inner
        .answered
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
            (c < limit).then_some(c + 1)
        })
        .is_err()
}

/// The body of a successful answer: one vector per input (poisoned where a marker asks) and
/// `usage` at the billing multiplier; and the tokens billed. Shared with the batch lines.
fn embedding_body(
    cfg: &FakeConfig,
    req: &Request,
    texts: &[String],
    dims: usize,
    total: u64,
) -> (serde_json::Value, u64) {
    let base64 = req.encoding_format.as_deref() == Some("base64");
    let data: Vec<serde_json::Value> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut v = fake_vector(t, dims);
            if t.contains(NAN_MARKER) {
                v[dims / 2] = f32::NAN;
            } else if t.contains(INF_MARKER) {
                v[0] = f32::INFINITY;
            } else if t.contains(ZERO_MARKER) {
                v.iter_mut().for_each(|x| *x = 0.0);
            }
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let billed = (total as f64 * cfg.billing_multiplier).round() as u64;
    let body = json!({
        "object": "list", "data": data, "model": req.model,
        "usage": {"prompt_tokens": billed, "total_tokens": billed}
    });
    (body, billed)
}

/// The answer: [`embedding_body`] and the rate-limit headers.
fn respond(
    inner: &Inner,
    cfg: &FakeConfig,
    req: &Request,
    texts: &[String],
    dims: usize,
    total: u64,
    quota: Quota,
) -> Response {
    let (body, billed) = embedding_body(cfg, req, texts, dims, total);
    inner.record(&req.model, texts.len(), billed, 200);
    let mut resp = (StatusCode::OK, Json(body)).into_response();
    let h = resp.headers_mut();
    let quiet = cfg.no_limit_headers;
    let mut put = |k: &'static str, v: String| {
        if !quiet {
            h.insert(k, HeaderValue::from_str(&v).unwrap());
        }
    };
    // OpenAI's reset headers: the time until the limit is back to its initial state.
    if let Some(per_minute) = cfg.quantised_rpm {
        let minute_ago = Instant::now() - Duration::from_secs(60);
        let used = inner
            .recorded
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.status == 200 && r.at > minute_ago)
            .count() as u64;
        put("x-ratelimit-limit-requests", per_minute.to_string());
        put(
            "x-ratelimit-remaining-requests",
            per_minute.saturating_sub(used).to_string(),
        );
        put("x-ratelimit-reset-requests", "1s".to_string());
    } else if cfg.rpm > 0 {
        put("x-ratelimit-limit-requests", cfg.rpm.to_string());
        put(
            "x-ratelimit-remaining-requests",
            quota.remaining_requests.to_string(),
        );
        put(
            "x-ratelimit-reset-requests",
            format!("{:.3}s", quota.reset_requests.as_secs_f64()),
        );
    }
    if cfg.tpm > 0 {
        put("x-ratelimit-limit-tokens", cfg.tpm.to_string());
        put(
            "x-ratelimit-remaining-tokens",
            quota.remaining_tokens.to_string(),
        );
        put(
            "x-ratelimit-reset-tokens",
            format!("{:.3}s", quota.reset_tokens.as_secs_f64()),
        );
    }
    resp
}
