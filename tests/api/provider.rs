//! A misbehaving provider: a revoked key, poisoned vectors, billing above our count, errors
//! that must name their cause, 429s, and a long source's retry paying only for what is missing.

use std::time::{Duration, Instant};

use crate::helpers::*;
use embed_worker::fake_openai::{FakeConfig, INF_MARKER, NAN_MARKER, ZERO_MARKER};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_key_stops_api_calls_releases_jobs_and_one_probe_resumes() {
    let t = TestDb::migrated().await;
    let good = "sk-proj-good-key-0123456789abcdefghij";
    let revoked = "sk-proj-revoked-key-9876543210zyxwvu";
    let fake = fake(FakeConfig {
        api_key: Some(good.into()),
        echo_key_in_errors: true,
        ..FakeConfig::default()
    })
    .await;
    let mut s = worker_settings(&t, &fake);
    s.api.api_key = Some(secrecy::SecretString::from(revoked.to_string()));
    s.batch.max_jobs = 5;
    s.batch.max_in_flight = 2;
    s.queue.max_attempts = 3;
    s.retry.quota_recheck_secs = 4;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 40, |_| 10).await;
    enqueue(&t.admin, &sources).await;
    let w = RunningWorker::start(s).await;
    let addr = w.worker.http_addr.unwrap();
    wait_first_request(&fake).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused = fake.requests().len();
    assert!(
        refused <= 2,
        "stopped after the first 401s: {refused} requests"
    );
    let ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let why = ready.text().await.unwrap();
    assert!(why.contains("refused the API key (HTTP 401)"), "{why}");
    assert!(!why.contains(revoked), "the echoed key is masked: {why}");
    let (dead, used): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM embed_worker.failed_jobs), (SELECT count(*) FROM apalis.jobs WHERE attempts > 0 AND status <> 'Done')",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!((dead, used), (0, 0), "no dead letter, no attempt used");
    let leaked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM apalis.jobs WHERE last_result::text LIKE '%' || $1 || '%'",
    )
    .bind(&revoked[8..24])
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!(leaked, 0, "the echoed key is not stored in job results");

    // The operator rotates the key at the provider; after the recheck one probe resumes work.
    fake.configure(|c| c.api_key = Some(revoked.into()));
    let start = Instant::now();
    while embed_worker::queue::open_jobs(&t.admin, "embed")
        .await
        .unwrap()
        > 0
    {
        if start.elapsed() > Duration::from_secs(30) {
            let states: Vec<(String, i32, Option<serde_json::Value>, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
                "SELECT status, attempts, last_result, run_at FROM apalis.jobs WHERE status <> 'Done'",
            )
            .fetch_all(&t.admin)
            .await
            .unwrap();
            panic!(
                "not drained: {states:?}; requests {:?}",
                fake.requests().iter().map(|r| r.status).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.stop().await;
    let reqs = fake.requests();
    assert_eq!(
        reqs.iter().filter(|r| r.status == 401).count(),
        refused,
        "no request was refused after the stop"
    );
    let rows: i64 = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
    assert_eq!(rows, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poisoned_vector_fails_only_its_own_source() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    let mut s = worker_settings(&t, &fake);
    s.batch.max_jobs = 100;
    s.batch.linger_ms = 300;
    let user = Uuid::new_v4();
    let mut sources = insert_sessions(&t.admin, user, 77, |i| 5 + i % 30).await;
    let mut bad = Vec::new();
    for (i, marker) in [NAN_MARKER, INF_MARKER, ZERO_MARKER].iter().enumerate() {
        let id = insert_session(&t.admin, user, &format!("bad {i}"), marker).await;
        bad.push(id);
        sources.push(embed_worker::source::EmbedSource {
            source_type: embed_worker::source::SourceType::Session,
            source_id: id,
        });
    }
    enqueue(&t.admin, &sources).await;
    let w = RunningWorker::start(s).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    let written: Vec<Uuid> = sqlx::query_scalar("SELECT source_id FROM rag_embeddings")
        .fetch_all(&t.admin)
        .await
        .unwrap();
    assert_eq!(written.len(), 77, "every batch-mate is written");
    assert!(bad.iter().all(|b| !written.contains(b)));
    let dead: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT source_id, last_error, attempts FROM embed_worker.failed_jobs ORDER BY source_id",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    for (_, reason, attempts) in &dead {
        assert!(reason.contains("unusable vector"), "{reason}");
        assert_eq!(*attempts, 1, "dead at once, not retried");
    }
    assert!(dead.iter().any(|(_, r, _)| r.contains("NaN")));
    assert!(dead.iter().any(|(_, r, _)| r.contains("zero vector")));
    let requests = fake.requests();
    assert!(
        requests.iter().all(|r| r.status == 200),
        "nothing was sent twice"
    );
    let billed_inputs: usize = requests.iter().map(|r| r.inputs).sum();
    assert_eq!(billed_inputs, 80, "each source billed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_budget_holds_against_a_provider_that_bills_three_times_our_count() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig {
        billing_multiplier: 3.0,
        latency: Duration::from_millis(20),
        ..FakeConfig::default()
    })
    .await;
    let mut s = worker_settings(&t, &fake);
    s.batch.max_jobs = 10;
    s.batch.max_in_flight = 1;
    s.batch.linger_ms = 5;
    s.model.usd_per_million_tokens = 20.0; // a request of ~1,500 tokens costs $0.03
    s.budget.recheck_secs = 60;
    embed_worker::guard::budget::set(&t.admin, 1.0)
        .await
        .unwrap();
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 400, |_| 20).await;
    enqueue(&t.admin, &sources).await;
    let (a, b) = (
        RunningWorker::start(s.clone()).await,
        RunningWorker::start(s.clone()).await,
    );
    // Until the budget stops a worker and no request has gone out for a second (the other
    // worker stops at its next request, or has none left to send).
    let start = Instant::now();
    let mut last = (0, Instant::now());
    loop {
        let sent = fake.requests().len();
        if sent != last.0 {
            last = (sent, Instant::now());
        }
        let stopped =
            a.worker.health.api.stopped().is_some() || b.worker.health.api.stopped().is_some();
        if stopped && last.1.elapsed() > Duration::from_secs(1) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the budget stopped the workers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.stop().await;
    b.stop().await;
    let (spent, _) = embed_worker::guard::budget::month(&t.admin).await.unwrap();
    let requests = fake.requests();
    let billed: u64 = requests.iter().map(|r| r.tokens).sum();
    let usd = |tokens: u64| tokens as f64 * 20.0 / 1e6;
    let largest = usd(requests.iter().map(|r| r.tokens).max().unwrap());
    eprintln!(
        "spent ${spent:.4} of $1.00 ({} requests, {billed} tokens billed, largest ${largest:.4})",
        requests.len()
    );
    assert!(
        (spent - usd(billed)).abs() < 1e-6,
        "spend is what the provider billed"
    );
    // Each worker has one request in flight: the month goes over by at most that.
    assert!(
        spent <= 1.0 + 2.0 * largest,
        "spent ${spent:.4} on a $1.00 budget (largest request ${largest:.4})"
    );
}

#[tokio::test]
async fn provider_errors_name_their_cause_and_the_setting() {
    embed_worker::init_tls();
    let model = embed_worker::config::Settings::load(None).unwrap().model;
    let mut api = embed_worker::config::Settings::load(None).unwrap().api;
    // Nothing listens here: refused.
    api.base_url = format!("http://127.0.0.1:{}/v1", free_port());
    let e = embed_worker::embed::OpenAiEmbedder::new(&api, &model)
        .unwrap()
        .embed(vec!["x".into()])
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("connection refused") && text.contains("api.base_url"),
        "{text}"
    );
    assert!(
        !e.may_have_been_billed(),
        "a refused request was never sent"
    );
    // A provider slower than api.timeout_secs: the request may have been billed.
    let slow = fake(FakeConfig {
        latency: Duration::from_millis(2500),
        ..FakeConfig::default()
    })
    .await;
    api.base_url = slow.base_url();
    api.timeout_secs = 1;
    let e = embed_worker::embed::OpenAiEmbedder::new(&api, &model)
        .unwrap()
        .embed(vec!["x".into()])
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("within 1 s (api.timeout_secs)"), "{text}");
    assert!(e.may_have_been_billed());
}

/// 2,000 sources through a provider that enforces 1 request a second (its headers, when it
/// sends them, say "60 per minute"): (accepted, refused with 429).
async fn one_request_a_second(stated: bool) -> (usize, usize) {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig {
        rpm: 1,
        window: Duration::from_secs(1),
        quantised_rpm: Some(60),
        no_limit_headers: !stated,
        ..FakeConfig::default()
    })
    .await;
    let mut s = worker_settings(&t, &fake);
    // The shipped batching (128 sources a request, 4 in flight) and the limit the headers state.
    let defaults = embed_worker::config::Settings::load(None).unwrap();
    s.batch = defaults.batch.clone();
    s.rate_limit.requests_per_minute = 60;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 2000, |i| 5 + i % 20).await;
    enqueue(&t.admin, &sources).await;
    let w = RunningWorker::start(s).await;
    wait_drained(&t.admin, Duration::from_secs(120)).await;
    w.stop().await;
    let reqs = fake.requests();
    let ok = reqs.iter().filter(|r| r.status == 200).count();
    let refused = reqs.iter().filter(|r| r.status == 429).count();
    let t0 = reqs[0].at;
    eprintln!(
        "1 request/s provider (limits stated: {stated}): {ok} accepted, {refused} refused (429): {:?}",
        reqs.iter()
            .map(|r| (r.at.duration_since(t0).as_millis(), r.status))
            .collect::<Vec<_>>()
    );
    let rows: i64 = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
    assert_eq!(rows, 2000);
    (ok, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_provider_stating_its_limit_is_paced_at_it_from_its_first_answer() {
    let (ok, refused) = one_request_a_second(true).await;
    assert!(ok >= 16, "{ok}");
    assert_eq!(
        refused, 0,
        "paced from x-ratelimit-limit-requests: no 429 at all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_429_sending_resumes_at_what_a_silent_provider_accepts() {
    let (ok, refused) = one_request_a_second(false).await;
    assert!(ok >= 16, "{ok}");
    assert!(
        refused * 10 <= ok,
        "at most one 429 per 10 accepted requests: {refused} for {ok}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_source_is_capped_and_its_retry_pays_only_for_what_is_missing() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig {
        fail_after: Some(3),
        ..FakeConfig::default()
    })
    .await;
    let mut s = worker_settings(&t, &fake);
    s.model.max_input_tokens = 200;
    s.model.chunk_overlap_tokens = 20;
    s.model.max_source_tokens = 20_000;
    s.api.max_inputs_per_request = 4;
    s.retry.request_retries = 0;
    s.retry.job_backoff_base_secs = 1;
    s.retry.job_backoff_cap_secs = 1;
    let user = Uuid::new_v4();
    let words = |n: usize, salt: &str| {
        (0..n)
            .map(|i| format!("{salt}{} bar{}.", i % 89, i % 7))
            .collect::<Vec<_>>()
            .join(" ")
    };
    // About 50 chunks of 200 tokens in requests of 4 inputs; the provider fails after 3.
    let long = insert_session(&t.admin, user, "long", &words(1500, "scale")).await;
    // Far over model.max_source_tokens: never sent.
    let huge = insert_session(&t.admin, user, "huge", &words(12_000, "arpeggio")).await;
    let w = RunningWorker::start(s).await;
    let start = Instant::now();
    while fake.requests().iter().filter(|r| r.status == 503).count() == 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the outage began"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let staged: i64 = count(&t.admin, "SELECT count(*) FROM embed_worker.chunk_stage").await;
    assert_eq!(staged, 12, "the 3 answered requests' chunks are kept");
    fake.configure(|c| c.fail_after = None);
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    let chunks: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rag_embeddings WHERE source_id = $1")
            .bind(long)
            .fetch_one(&t.admin)
            .await
            .unwrap();
    let sent: usize = fake
        .requests()
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.inputs)
        .sum();
    eprintln!("long source: {chunks} chunks written, {sent} inputs billed");
    assert!(chunks >= 16, "{chunks}");
    assert_eq!(sent as i64, chunks, "each chunk paid for once");
    let left: i64 = count(&t.admin, "SELECT count(*) FROM embed_worker.chunk_stage").await;
    assert_eq!(left, 0, "staged chunks are removed once written");
    let (reason, attempts): (String, i32) = sqlx::query_as(
        "SELECT last_error, attempts FROM embed_worker.failed_jobs WHERE source_id = $1",
    )
    .bind(huge.to_string())
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert!(
        reason.contains("source too large") && reason.contains("model.max_source_tokens = 20000"),
        "{reason}"
    );
    assert_eq!(
        attempts, 1,
        "dead at once; none of it was sent (billed = the long source's chunks)"
    );
}
