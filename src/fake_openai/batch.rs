//! The Batch API as OpenAI serves it, enough to exercise the worker's bulk lane: `/v1/files`
//! (multipart upload, content, delete) and `/v1/batches` (create, retrieve, cancel, list).
//!
//! Validated at batch creation, as the service does (the batch then ends `failed` with
//! `errors`): one JSONL file of at most 50,000 requests and 200 MB, every line a `POST` to the
//! batch's endpoint with a unique `custom_id`, one model per file, at most 50,000 embedding inputs
//! in all, window `24h`. A batch stays `in_progress` for `batch_delay`, then ends `completed`;
//! the first `batch_fail_first` batches end `failed`, the next `batch_expire_first` end `expired`
//! with only the first half of their lines answered (the rest in the error file as
//! `batch_expired`). A line that breaks a per-request limit, or whose input carries
//! [`BATCH_ERROR_MARKER`], is answered in the error file with the error body. The list pages as
//! OpenAI's does (newest first, `limit` 20 by default, `after`, `has_more`). [`Hostile`] modes
//! make the first batches misbehave as providers have.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::{
    FakeConfig, Hostile, Inner, Refusal, authorize, check_limits, embedding_body, parse_inputs,
};

/// A batch line whose input contains this is answered in the error file (HTTP 400).
pub const BATCH_ERROR_MARKER: &str = "<<fake:batch-error>>";
const MAX_REQUESTS: usize = 50_000;
const MAX_INPUTS: usize = 50_000;
const MAX_BYTES: usize = 200 * 1024 * 1024;

/// Files and batches.
#[derive(Default)]
pub(super) struct Store {
    files: Mutex<HashMap<String, StoredFile>>,
    batches: Mutex<Vec<FakeBatch>>,
    next: AtomicUsize,
    tokens: AtomicU64,
    create_calls: AtomicUsize,
}

struct StoredFile {
    bytes: Vec<u8>,
    purpose: String,
    filename: String,
    created_at: u64,
}

struct FakeBatch {
    id: String,
    input_file_id: String,
    endpoint: String,
    status: &'static str,
    created: Instant,
    created_at: u64,
    ordinal: usize,
    ended_at: Option<u64>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    errors: Vec<Value>,
    counts: (usize, usize, usize),
    metadata: Value,
    /// Another tenant's (not counted as created by us).
    foreign: bool,
}

impl Store {
    pub(super) fn created(&self) -> usize {
        self.batches
            .lock()
            .unwrap()
            .iter()
            .filter(|b| !b.foreign)
            .count()
    }

    pub(super) fn add_foreign(&self, n: usize) {
        let mut batches = self.batches.lock().unwrap();
        for _ in 0..n {
            let id = self.id("batch");
            batches.push(FakeBatch {
                id,
                input_file_id: "file_foreign".into(),
                endpoint: "/v1/embeddings".into(),
                status: "completed",
                created: Instant::now(),
                created_at: now(),
                ordinal: usize::MAX,
                ended_at: Some(now()),
                output_file_id: None,
                error_file_id: None,
                errors: Vec::new(),
                counts: (1, 1, 0),
                metadata: json!({"tenant": "another-app"}),
                foreign: true,
            });
        }
    }

    pub(super) fn files_stored(&self) -> usize {
        self.files.lock().unwrap().len()
    }

    pub(super) fn tokens_billed(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    fn id(&self, prefix: &str) -> String {
        format!("{prefix}_{:08}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    fn put_file(&self, bytes: Vec<u8>, purpose: &str, filename: &str) -> Value {
        let id = self.id("file");
        let f = StoredFile {
            bytes,
            purpose: purpose.to_string(),
            filename: filename.to_string(),
            created_at: now(),
        };
        let json = file_json(&id, &f);
        self.files.lock().unwrap().insert(id, f);
        json
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn file_json(id: &str, f: &StoredFile) -> Value {
    json!({
        "id": id, "object": "file", "bytes": f.bytes.len(), "created_at": f.created_at,
        "expires_at": null, "filename": f.filename, "purpose": f.purpose,
        "status": "processed", "status_details": null
    })
}

fn bad(message: impl Into<String>) -> Response {
    super::error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        None,
    )
}

fn not_found(what: &str, id: &str) -> Response {
    super::error(
        StatusCode::NOT_FOUND,
        format!("No such {what}: {id}"),
        "invalid_request_error",
        None,
    )
}

/// The routes, added to the embeddings router.
pub(super) fn routes(r: Router<Arc<Inner>>) -> Router<Arc<Inner>> {
    r.route("/v1/files", post(upload))
        .route("/v1/files/{id}", get(file_info).delete(delete_file))
        .route("/v1/files/{id}/content", get(content))
        .route("/v1/batches", post(create).get(list))
        .route("/v1/batches/{id}", get(retrieve))
        .route("/v1/batches/{id}/cancel", post(cancel))
}

fn auth(inner: &Inner, headers: &HeaderMap) -> Result<FakeConfig, Box<Response>> {
    let cfg = inner.config.lock().unwrap().clone();
    authorize(&cfg, headers).map_err(|r| Box::new(r.into_response()))?;
    Ok(cfg)
}

/// The parts of a `multipart/form-data` body: name → (filename, bytes).
fn multipart(headers: &HeaderMap, body: &[u8]) -> Option<HashMap<String, (String, Vec<u8>)>> {
    let ct = headers.get("content-type")?.to_str().ok()?;
    let boundary = ct.split("boundary=").nth(1)?.trim_matches('"');
    let delim = format!("--{boundary}");
    let mut parts = HashMap::new();
    let mut rest = body;
    while let Some(at) = find(rest, delim.as_bytes()) {
        rest = &rest[at + delim.len()..];
        if rest.starts_with(b"--") {
            break;
        }
        let head_end = find(rest, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&rest[..head_end]).to_string();
        let content = &rest[head_end + 4..];
        let end = find(content, delim.as_bytes())?;
        let data = content[..end]
            .strip_suffix(b"\r\n")
            .unwrap_or(&content[..end]);
        let attr = |key: &str| {
            head.split(&format!("{key}=\""))
                .nth(1)
                .and_then(|s| s.split('"').next())
                .map(str::to_string)
        };
        if let Some(name) = attr("name") {
            parts.insert(name, (attr("filename").unwrap_or_default(), data.to_vec()));
        }
        rest = &content[end..];
    }
    Some(parts)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `POST /v1/files` (multipart: `purpose`, `file`).
async fn upload(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(r) = auth(&inner, &headers) {
        return *r;
    }
    let Some(mut parts) = multipart(&headers, &body) else {
        return bad("Expected a multipart/form-data body with 'file' and 'purpose'.");
    };
    let purpose = parts
        .remove("purpose")
        .map(|(_, b)| String::from_utf8_lossy(&b).to_string())
        .unwrap_or_default();
    let Some((filename, bytes)) = parts.remove("file") else {
        return bad("'file' is a required property");
    };
    if purpose != "batch" {
        return bad(format!(
            "'{purpose}' is not a purpose this fake supports ('batch')"
        ));
    }
    if bytes.len() > MAX_BYTES {
        return bad(format!(
            "File is too large: {} bytes, the maximum for purpose 'batch' is {MAX_BYTES}.",
            bytes.len()
        ));
    }
    Json(inner.batch.put_file(bytes, "batch", &filename)).into_response()
}

/// A file route: authorized, then `op` on the file (or 404).
fn with_file(
    inner: &Inner,
    headers: &HeaderMap,
    id: &str,
    op: impl FnOnce(&mut HashMap<String, StoredFile>) -> Option<Response>,
) -> Response {
    if let Err(r) = auth(inner, headers) {
        return *r;
    }
    op(&mut inner.batch.files.lock().unwrap()).unwrap_or_else(|| not_found("file", id))
}

async fn file_info(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    with_file(&inner, &headers, &id, |files| {
        files
            .get(&id)
            .map(|f| Json(file_json(&id, f)).into_response())
    })
}

async fn content(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    with_file(&inner, &headers, &id, |files| {
        files
            .get(&id)
            .map(|f| (StatusCode::OK, f.bytes.clone()).into_response())
    })
}

async fn delete_file(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    with_file(&inner, &headers, &id, |files| {
        files
            .remove(&id)
            .map(|_| Json(json!({"id": id, "object": "file", "deleted": true})).into_response())
    })
}

/// The problems the service reports for an input file, one per line at most (`line` 1-based).
fn validate(file: &[u8], endpoint: &str) -> Vec<Value> {
    let mut errors = Vec::new();
    let mut err = |code: &str, message: String, line: Option<usize>| {
        errors.push(json!({"code": code, "message": message, "param": null, "line": line}));
    };
    let text = String::from_utf8_lossy(file);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        err("empty_file", "The input file is empty.".into(), None);
    }
    if lines.len() > MAX_REQUESTS {
        err(
            "too_many_requests",
            format!(
                "The batch input file has {} requests; at most {MAX_REQUESTS} are allowed.",
                lines.len()
            ),
            None,
        );
    }
    let mut ids = std::collections::HashSet::new();
    let mut model: Option<String> = None;
    let mut inputs = 0usize;
    for (i, line) in lines.iter().enumerate() {
        let n = Some(i + 1);
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            err(
                "invalid_json_line",
                "This line is not parseable as valid JSON.".into(),
                n,
            );
            continue;
        };
        match v["custom_id"].as_str() {
            Some(id) if ids.insert(id.to_string()) => {}
            Some(_) => err("duplicate_custom_id", "The custom_id for this request is a duplicate of another request. The custom_id parameter must be unique for each request in a batch.".into(), n),
            None => err("missing_required_parameter", "Missing required parameter: 'custom_id'.".into(), n),
        }
        if v["method"] != "POST" {
            err("invalid_method", "The method must be POST.".into(), n);
        }
        if v["url"] != endpoint {
            err(
                "mismatched_endpoint",
                format!("The url of this request does not match the batch endpoint {endpoint}."),
                n,
            );
        }
        let m = v["body"]["model"].as_str().unwrap_or_default().to_string();
        match &model {
            None => model = Some(m),
            Some(first) if *first != m => err("mismatched_model", "The provided model does not match the model of the other requests in the file: a batch file holds one model.".into(), n),
            _ => {}
        }
        inputs += match &v["body"]["input"] {
            Value::Array(a) => a.len(),
            _ => 1,
        };
    }
    if inputs > MAX_INPUTS {
        err(
            "token_limit_exceeded",
            format!(
                "The batch holds {inputs} embedding inputs; at most {MAX_INPUTS} are allowed in all."
            ),
            None,
        );
    }
    errors
}

/// `POST /v1/batches`.
async fn create(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Json(req): Json<Value>,
) -> Response {
    let cfg = match auth(&inner, &headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let call = inner.batch.create_calls.fetch_add(1, Ordering::Relaxed);
    if cfg.hostile == Some(Hostile::RefuseCreate) && call < cfg.hostile_batches {
        return bad("Your organization is not allowed to create batches for this model.");
    }
    let input_file_id = req["input_file_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let endpoint = req["endpoint"].as_str().unwrap_or_default().to_string();
    if endpoint != "/v1/embeddings" {
        return bad(format!(
            "'{endpoint}': this fake serves batches of /v1/embeddings"
        ));
    }
    if req["completion_window"] != "24h" {
        return bad("'completion_window' must be '24h'");
    }
    let errors = {
        let files = inner.batch.files.lock().unwrap();
        match files.get(&input_file_id) {
            None => return not_found("file", &input_file_id),
            Some(f) if f.purpose != "batch" => {
                return bad(format!(
                    "File {input_file_id} has purpose '{}', not 'batch'",
                    f.purpose
                ));
            }
            Some(f) => validate(&f.bytes, &endpoint),
        }
    };
    let mut batches = inner.batch.batches.lock().unwrap();
    let b = FakeBatch {
        id: inner.batch.id("batch"),
        input_file_id,
        endpoint,
        status: if errors.is_empty() {
            "validating"
        } else {
            "failed"
        },
        created: Instant::now(),
        created_at: now(),
        ordinal: batches.iter().filter(|b| !b.foreign).count(),
        ended_at: (!errors.is_empty()).then(now),
        output_file_id: None,
        error_file_id: None,
        errors,
        counts: (0, 0, 0),
        metadata: req["metadata"].clone(),
        foreign: false,
    };
    let json = batch_json(&b);
    batches.push(b);
    Json(json).into_response()
}

fn batch_json(b: &FakeBatch) -> Value {
    let at = |s: &str| (b.status == s).then_some(b.ended_at).flatten();
    json!({
        "id": b.id, "object": "batch", "endpoint": b.endpoint, "model": null,
        "errors": if b.errors.is_empty() { Value::Null } else { json!({"object": "list", "data": b.errors}) },
        "input_file_id": b.input_file_id, "completion_window": "24h", "status": b.status,
        "output_file_id": b.output_file_id, "error_file_id": b.error_file_id,
        "created_at": b.created_at, "in_progress_at": b.created_at, "expires_at": b.created_at + 86_400,
        "finalizing_at": null, "completed_at": at("completed"), "failed_at": at("failed"),
        "expired_at": at("expired"), "cancelling_at": null, "cancelled_at": at("cancelled"),
        "request_counts": {"total": b.counts.0, "completed": b.counts.1, "failed": b.counts.2},
        "metadata": b.metadata, "usage": null
    })
}

/// The batch as retrieved and listed: [`Hostile::UnreadableBatch`]'s batches with a status
/// no client can read, in the list too (as a provider's new field or state would be).
fn shown(cfg: &FakeConfig, b: &FakeBatch) -> Value {
    let mut json = batch_json(b);
    if cfg.hostile == Some(Hostile::UnreadableBatch) && b.ordinal < cfg.hostile_batches {
        json["status"] = json!(42);
    }
    json
}

/// Moves a running batch on: in progress until `batch_delay` has passed, then it ends.
fn advance(store: &Store, cfg: &FakeConfig, b: &mut FakeBatch) {
    if !matches!(b.status, "validating" | "in_progress") {
        return;
    }
    let lines: Vec<String> = store
        .files
        .lock()
        .unwrap()
        .get(&b.input_file_id)
        .map(|f| {
            String::from_utf8_lossy(&f.bytes)
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    if b.created.elapsed() < cfg.batch_delay {
        b.status = "in_progress";
        b.counts = (lines.len(), 0, 0);
        return;
    }
    b.ended_at = Some(now());
    let hostile = cfg.hostile.filter(|_| b.ordinal < cfg.hostile_batches);
    if hostile == Some(Hostile::TransientFailure) {
        b.status = "failed";
        b.errors = vec![
            json!({"code": "token_limit_exceeded", "message": "Enqueued token limit reached for text-embedding-3-small in organization org-x. Limit: 3,000,000 enqueued tokens. Please try again once some in_progress batches have been completed.", "param": null, "line": null}),
        ];
        b.counts = (lines.len(), 0, 0);
        return;
    }
    if b.ordinal < cfg.batch_fail_first {
        b.status = "failed";
        b.errors = vec![
            json!({"code": "server_error", "message": "The batch failed: an internal error occurred.", "param": null, "line": null}),
        ];
        b.counts = (lines.len(), 0, 0);
        return;
    }
    let expire = b.ordinal < cfg.batch_fail_first + cfg.batch_expire_first;
    let answered = if expire { lines.len() / 2 } else { lines.len() };
    let (mut out, mut errs) = (String::new(), String::new());
    let mut ok = 0;
    for (i, line) in lines.iter().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap_or_default();
        let custom_id = v["custom_id"].clone();
        let rid = format!(
            "batch_req_{:08}",
            store.next.fetch_add(1, Ordering::Relaxed)
        );
        if i >= answered {
            errs.push_str(&json!({"id": rid, "custom_id": custom_id, "response": null,
                "error": {"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}}).to_string());
            errs.push('\n');
            continue;
        }
        match answer(cfg, &v["body"]) {
            Ok((mut body, billed)) => {
                ok += 1;
                store.tokens.fetch_add(billed, Ordering::Relaxed);
                if hostile == Some(Hostile::ShiftedIndexes) {
                    for d in body["data"].as_array_mut().into_iter().flatten() {
                        d["index"] = json!(d["index"].as_u64().unwrap_or(0) + 1);
                    }
                }
                let line = json!({"id": rid, "custom_id": custom_id,
                    "response": {"status_code": 200, "request_id": rid, "body": body}, "error": null}).to_string();
                if hostile == Some(Hostile::GarbageLine) && out.is_empty() {
                    out.push_str("<html>502 Bad Gateway</html>\n");
                    continue;
                }
                out.push_str(&line);
                out.push('\n');
                if hostile == Some(Hostile::RepeatedAndForeignLines) {
                    store.tokens.fetch_add(billed, Ordering::Relaxed);
                    out.push_str(&line);
                    out.push('\n');
                    if i == 0 {
                        let foreign = line.replace(
                            &format!("\"custom_id\":{custom_id}"),
                            "\"custom_id\":\"not-ours-7\"",
                        );
                        store.tokens.fetch_add(billed, Ordering::Relaxed);
                        out.push_str(&foreign);
                        out.push('\n');
                    }
                }
            }
            Err((status, body)) => {
                errs.push_str(&json!({"id": rid, "custom_id": custom_id,
                    "response": {"status_code": status, "request_id": rid, "body": body}, "error": null}).to_string());
                errs.push('\n');
            }
        }
    }
    b.counts = (lines.len(), ok, lines.len() - ok);
    if !out.is_empty() {
        let id = store.put_file(out.into_bytes(), "batch_output", "batch_output.jsonl")["id"]
            .as_str()
            .unwrap()
            .to_string();
        if hostile == Some(Hostile::OutputGone) {
            store.files.lock().unwrap().remove(&id);
        }
        b.output_file_id = Some(id);
    }
    if !errs.is_empty() {
        b.error_file_id = Some(
            store.put_file(errs.into_bytes(), "batch_output", "batch_errors.jsonl")["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    b.status = if expire { "expired" } else { "completed" };
}

/// One line's answer, as `/v1/embeddings` would give it: (body, tokens billed) or (status, error
/// body).
fn answer(cfg: &FakeConfig, body: &Value) -> Result<(Value, u64), (u16, Value)> {
    let refusal = |r: Refusal| {
        let status = r.status.as_u16();
        (
            status,
            json!({"error": {"message": r.message, "type": r.kind, "param": null, "code": r.code}}),
        )
    };
    let (req, texts) = parse_inputs(body.to_string().as_bytes()).map_err(refusal)?;
    if let Some(i) = texts.iter().position(|t| t.contains(BATCH_ERROR_MARKER)) {
        return Err((
            400,
            json!({"error": {"message": format!("'$.input[{i}]' is invalid."), "type": "invalid_request_error", "param": null, "code": null}}),
        ));
    }
    let (total, dims) = check_limits(cfg, &req, &texts).map_err(refusal)?;
    Ok(embedding_body(cfg, &req, &texts, dims, total))
}

async fn retrieve(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let cfg = match auth(&inner, &headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let mut batches = inner.batch.batches.lock().unwrap();
    match batches.iter_mut().find(|b| b.id == id) {
        Some(b) => {
            advance(&inner.batch, &cfg, b);
            Json(shown(&cfg, b)).into_response()
        }
        None => not_found("batch", &id),
    }
}

async fn cancel(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = auth(&inner, &headers) {
        return *r;
    }
    let mut batches = inner.batch.batches.lock().unwrap();
    match batches.iter_mut().find(|b| b.id == id) {
        Some(b) if matches!(b.status, "validating" | "in_progress") => {
            b.status = "cancelled";
            b.ended_at = Some(now());
            Json(batch_json(b)).into_response()
        }
        Some(b) => bad(format!("Cannot cancel a batch with status '{}'.", b.status)),
        None => not_found("batch", &id),
    }
}

async fn list(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<HashMap<String, String>>,
) -> Response {
    let cfg = match auth(&inner, &headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, 100);
    let mut batches = inner.batch.batches.lock().unwrap();
    let newest_first: Vec<&mut FakeBatch> = batches.iter_mut().rev().collect();
    let start = match q.get("after") {
        Some(after) => match newest_first.iter().position(|b| &b.id == after) {
            Some(i) => i + 1,
            None => return not_found("batch", after),
        },
        None => 0,
    };
    let total = newest_first.len();
    let data: Vec<Value> = newest_first
        .into_iter()
        .skip(start)
        .take(limit)
        .map(|b| {
            advance(&inner.batch, &cfg, b);
            shown(&cfg, b)
        })
        .collect();
    Json(json!({
        "object": "list", "first_id": data.first().map(|b| b["id"].clone()),
        "last_id": data.last().map(|b| b["id"].clone()), "has_more": start + limit < total,
        "data": data
    }))
    .into_response()
}
