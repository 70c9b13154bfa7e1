//! A bad day: 5xx storms, rate limits, a killed worker, a restarted database, poisoned input,
//! an exhausted quota. Nothing lost, nothing paid twice, no hammering.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::helpers::*;
use embed_worker::fake_openai::FakeConfig;
use embed_worker::source::{EmbedSource, SourceType};
use uuid::Uuid;

async fn assert_all_embedded_once(t: &TestDb, n: i64) {
    let (rows, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (source_type, source_id)) FROM rag_embeddings",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!(distinct, n, "every source embedded");
    assert_eq!(rows, n, "one row per source (no duplicates)");
    let dead: i64 = count(&t.admin, "SELECT count(*) FROM embed_worker.failed_jobs").await;
    assert_eq!(dead, 0, "no dead letters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_the_requests_failing_with_5xx_loses_nothing() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig {
        error_rate: 0.5,
        ..FakeConfig::default()
    })
    .await;
    let mut s = worker_settings(&t, &fake);
    s.batch.max_jobs = 50;
    s.retry.base_ms = 10;
    s.retry.cap_ms = 100;
    s.retry.request_retries = 6;
    s.retry.job_backoff_base_secs = 1;
    s.retry.job_backoff_cap_secs = 2;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 2000, |i| 5 + i % 40).await;
    enqueue(&t.admin, &sources).await;
    let w = RunningWorker::start(s).await;
    wait_drained(&t.admin, Duration::from_secs(180)).await;
    w.stop().await;
    assert_all_embedded_once(&t, 2000).await;
    let reqs = fake.requests();
    let failed = reqs.iter().filter(|r| r.status >= 500).count();
    assert!(
        failed as f64 >= reqs.len() as f64 * 0.3,
        "faults were injected: {failed}/{}",
        reqs.len()
    );
    eprintln!(
        "5xx: {failed} of {} requests failed; all 2,000 sources embedded",
        reqs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_below_demand_are_used_without_a_429_storm() {
    let t = TestDb::migrated().await;
    // A "minute" of 5 s keeps the test short; the arithmetic is the same.
    let window = Duration::from_secs(5);
    let tpm = 20_000u64;
    let fake = fake(FakeConfig {
        tpm,
        rpm: 200,
        window,
        ..FakeConfig::default()
    })
    .await;
    let mut s = worker_settings(&t, &fake);
    s.rate_limit.period_secs = 5;
    s.rate_limit.tokens_per_minute = tpm as u32;
    s.rate_limit.requests_per_minute = 200;
    s.api.max_tokens_per_request = 1000;
    s.batch.max_jobs = 8;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 320, |_| 30).await;
    enqueue(&t.admin, &sources).await;
    let w = RunningWorker::start(s).await;
    wait_drained(&t.admin, Duration::from_secs(120)).await;
    w.stop().await;
    assert_all_embedded_once(&t, 320).await;

    let reqs = fake.requests();
    let ok: Vec<_> = reqs.iter().filter(|r| r.status == 200).collect();
    let limited = reqs.iter().filter(|r| r.status == 429).count();
    let tokens: u64 = ok.iter().map(|r| r.tokens).sum();
    let span = ok.last().unwrap().at.duration_since(ok.first().unwrap().at);
    let windows = span.as_secs_f64() / window.as_secs_f64();
    let achieved = tokens as f64 / windows / tpm as f64;
    let ratio_429 = limited as f64 / reqs.len() as f64;
    eprintln!(
        "TPM limit {tpm}/window: {tokens} tokens in {span:?} = {:.3} of the limit; 429s {limited}/{} = {:.2}%",
        achieved,
        reqs.len(),
        ratio_429 * 100.0
    );
    let t0 = reqs[0].at;
    eprintln!(
        "429 at: {:?}",
        reqs.iter()
            .filter(|r| r.status == 429)
            .map(|r| r.at.duration_since(t0))
            .collect::<Vec<_>>()
    );
    assert!(
        tokens as f64 > 2.5 * tpm as f64,
        "demand exceeded the limit for several windows"
    );
    assert!(ratio_429 <= 0.02, "429 share {ratio_429}");
    assert!(achieved >= 0.9, "achieved {achieved} of the limit");
}

fn worker_process(t: &TestDb, base_url: &str, until_empty: bool) -> std::process::Child {
    let mut c = worker_command(t, base_url);
    c.arg("run");
    if until_empty {
        c.arg("--until-empty");
    }
    c.spawn().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_batch_has_its_jobs_rescued_within_the_bound() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig {
        latency: Duration::from_millis(300),
        ..FakeConfig::default()
    })
    .await;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 300, |i| 10 + i % 30).await;
    enqueue(&t.admin, &sources).await;
    let mut a = worker_process(&t, &fake.base_url(), false);
    let start = Instant::now();
    loop {
        let rows: i64 = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
        if rows >= 30 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a_name: String = sqlx::query_scalar("SELECT id FROM apalis.workers LIMIT 1")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    let claimed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM apalis.jobs WHERE lock_by = $1 AND status IN ('Queued', 'Running')",
    )
    .bind(&a_name)
    .fetch_one(&t.admin)
    .await
    .unwrap();
    a.kill().unwrap(); // SIGKILL
    a.wait().unwrap();
    let killed_at = Instant::now();
    assert!(claimed > 0, "the killed worker held claimed jobs");

    let mut b = worker_process(&t, &fake.base_url(), true);
    // Bound: heartbeat 1 s × 3 missed = 3 s, plus one heartbeat of the rescuer and a poll.
    let bound = Duration::from_secs(3 + 1 + 2);
    let recovered_in = loop {
        let still: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE lock_by = $1 AND status IN ('Queued', 'Running')")
            .bind(&a_name)
            .fetch_one(&t.admin)
            .await
            .unwrap();
        if still == 0 {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "jobs of the killed worker never rescued"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = tokio::task::spawn_blocking(move || b.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());
    eprintln!("SIGKILL with {claimed} claimed jobs: rescued in {recovered_in:?} (bound {bound:?})");
    assert!(
        recovered_in <= bound,
        "rescued in {recovered_in:?}, bound {bound:?}"
    );
    assert_all_embedded_once(&t, 300).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_invalid_input_in_a_batch_of_100_becomes_one_dead_letter() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    let mut s = worker_settings(&t, &fake);
    s.batch.linger_ms = 500;
    let mut sources = insert_sessions(&t.admin, Uuid::new_v4(), 99, |_| 12).await;
    let bad = insert_session(
        &t.admin,
        Uuid::new_v4(),
        "poisoned",
        "this note <<fake:reject>> is refused",
    )
    .await;
    sources.push(EmbedSource {
        source_type: SourceType::Session,
        source_id: bad,
    });
    enqueue(&t.admin, &sources).await;
    let w = RunningWorker::start(s).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    let embedded: i64 = count(
        &t.admin,
        "SELECT count(DISTINCT source_id) FROM rag_embeddings",
    )
    .await;
    assert_eq!(embedded, 99);
    let dead: Vec<(Option<String>, String, Option<String>)> =
        sqlx::query_as("SELECT source_id, status, last_error FROM embed_worker.failed_jobs")
            .fetch_all(&t.admin)
            .await
            .unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0.as_deref(), Some(bad.to_string().as_str()));
    assert!(
        dead[0]
            .2
            .as_deref()
            .unwrap_or("")
            .contains("input rejected"),
        "{dead:?}"
    );

    // `status` shows it; `retry-failed` re-queues it.
    let out = Command::new(env!("CARGO_BIN_EXE_embed-worker"))
        .arg("status")
        .env("DATABASE_URL", &t.url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&bad.to_string()) && text.contains("input rejected"),
        "{text}"
    );
    let requeued =
        embed_worker::queue::retry_failed(&t.admin, "embed", Some(SourceType::Session), None)
            .await
            .unwrap();
    assert_eq!(requeued, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn insufficient_quota_stops_api_calls_and_readiness() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig {
        insufficient_quota: true,
        ..FakeConfig::default()
    })
    .await;
    let mut s = worker_settings(&t, &fake);
    s.batch.max_jobs = 5;
    s.batch.max_in_flight = 1;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 50, |_| 10).await;
    enqueue(&t.admin, &sources).await;
    let w = RunningWorker::start(s).await;
    let addr = w.worker.http_addr.unwrap();
    wait_first_request(&fake).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fake.requests().len(),
        1,
        "stopped calling after the first insufficient_quota"
    );
    let ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    assert!(ready.text().await.unwrap().contains("insufficient_quota"));
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("embed_worker_api_stopped 1"), "{metrics}");
    w.stop().await;
    let dead: i64 = count(&t.admin, "SELECT count(*) FROM embed_worker.failed_jobs").await;
    assert_eq!(dead, 0, "no job is lost to a quota stop");
    let pending: i64 = count(
        &t.admin,
        "SELECT count(*) FROM apalis.jobs WHERE status = 'Pending'",
    )
    .await;
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM apalis.jobs GROUP BY 1")
            .fetch_all(&t.admin)
            .await
            .unwrap();
    assert_eq!(pending, 50, "every job is still waiting: {states:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_payloads_and_empty_text_are_recorded_and_the_worker_goes_on() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    let good = insert_sessions(&t.admin, Uuid::new_v4(), 5, |_| 10).await;
    let empty: Uuid = sqlx::query_scalar(
        "INSERT INTO sessions (user_id, title, notes) VALUES ($1, '  ', E'\\n\\t ') RETURNING id",
    )
    .bind(Uuid::new_v4())
    .fetch_one(&t.admin)
    .await
    .unwrap();
    let mut all = good.clone();
    all.push(EmbedSource {
        source_type: SourceType::Session,
        source_id: empty,
    });
    enqueue(&t.admin, &all).await;
    for payload in [
        &b"{\"source_type\": \"video\", \"source_id\": \"00000000-0000-0000-0000-000000000001\"}"[..],
        &b"\xff\xfe not json"[..],
        &b"plain ASCII, not JSON"[..],
    ] {
        sqlx::query("INSERT INTO apalis.jobs (id, job_type, job, status, attempts, max_attempts) VALUES (apalis.generate_ulid(), 'embed', $1, 'Pending', 0, 10)")
            .bind(payload)
            .execute(&t.admin)
            .await
            .unwrap();
    }
    let w = RunningWorker::start(worker_settings(&t, &fake)).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    let embedded: i64 = count(
        &t.admin,
        "SELECT count(DISTINCT source_id) FROM rag_embeddings",
    )
    .await;
    assert_eq!(embedded, 5);
    let empty_result: serde_json::Value =
        sqlx::query_scalar("SELECT last_result FROM embed_worker.jobs WHERE source_id = $1")
            .bind(empty.to_string())
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert!(
        empty_result.to_string().contains("skipped: empty text"),
        "{empty_result}"
    );
    let dead: Vec<(String, Option<String>, i32)> =
        sqlx::query_as("SELECT status, last_error, attempts FROM embed_worker.failed_jobs")
            .fetch_all(&t.admin)
            .await
            .unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    for (_, reason, _) in &dead {
        assert!(reason.as_deref().is_some_and(|r| !r.is_empty()), "{dead:?}");
    }
    eprintln!("bad payloads: {dead:?}");
}

/// A private PostgreSQL cluster (its own port and data directory) that this test may restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_mid_run_loses_nothing() {
    let cluster = PrivateCluster::new("restart-test", 55499);
    let url = cluster.db("start");
    let t = TestDb {
        name: "embed_worker".into(),
        url: url.clone(),
        admin: embed_worker::db::connect_as_login(&url).await.unwrap(),
    };
    embed_worker::db::migrate(&t.admin).await.unwrap();
    let fake = fake(FakeConfig {
        latency: Duration::from_millis(100),
        ..FakeConfig::default()
    })
    .await;
    let mut s = worker_settings(&t, &fake);
    s.batch.max_jobs = 20;
    s.batch.max_in_flight = 2;
    s.retry.job_backoff_base_secs = 1;
    s.retry.job_backoff_cap_secs = 2;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 600, |i| 10 + i % 20).await;
    enqueue(&t.admin, &sources).await;
    let w = RunningWorker::start(s).await;
    let ready_url = format!("http://{}/readyz", w.worker.http_addr.unwrap());
    let start = Instant::now();
    loop {
        let rows: i64 = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
        if rows >= 60 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.db("stop");
    let mut saw_not_ready = false;
    for _ in 0..40 {
        let r = reqwest::get(&ready_url).await.unwrap();
        if r.status().as_u16() == 503 && r.text().await.unwrap().contains("database unreachable") {
            saw_not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.db("start");
    assert!(
        saw_not_ready,
        "readiness went false while the database was down"
    );

    let admin = embed_worker::db::connect_as_login(&url).await.unwrap();
    wait_drained(&admin, Duration::from_secs(120)).await;
    let t2 = TestDb {
        name: t.name.clone(),
        url: url.clone(),
        admin,
    };
    assert_all_embedded_once(&t2, 600).await;
    let mut ready = false;
    for _ in 0..50 {
        if reqwest::get(&ready_url)
            .await
            .unwrap()
            .status()
            .is_success()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "ready again after the database came back");
    w.stop().await;
}
