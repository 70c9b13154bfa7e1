//! Operating the worker: the budget guard, and secrets that never reach logs or metrics.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;
use embed_worker::fake_openai::FakeConfig;
use uuid::Uuid;

async fn readyz(addr: std::net::SocketAddr) -> (u16, String) {
    let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_budget_guard_stops_at_the_budget_and_resumes_when_raised() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    let mut s = worker_settings(&t, &fake);
    let price = 40.0; // USD per 1M tokens: a request of five sessions costs about 2 cents
    s.model.usd_per_million_tokens = price;
    s.batch.max_jobs = 5;
    s.batch.max_in_flight = 2;
    s.budget.recheck_secs = 1;
    let budget = 0.05;
    embed_worker::guard::budget::set(&t.admin, budget)
        .await
        .unwrap();
    insert_sessions(&t.admin, Uuid::new_v4(), 60, |_| 20).await;
    let w = RunningWorker::start(s).await;
    let addr = w.worker.http_addr.unwrap();

    let start = Instant::now();
    loop {
        let (code, text) = readyz(addr).await;
        if code == 503 && text.contains("monthly budget reached") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never stopped at the budget: {code} {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (spent, limit) = embed_worker::guard::budget::month(&t.admin).await.unwrap();
    assert_eq!(limit, budget);
    let billed = fake.tokens_billed() as f64 * price / 1e6;
    assert!(
        (spent - billed).abs() < 1e-9,
        "spend {spent} = billed tokens × price {billed}"
    );
    let largest = fake.requests().iter().map(|r| r.tokens).max().unwrap() as f64 * price / 1e6;
    assert!(spent <= budget, "never over the budget: {spent}");
    assert!(
        spent >= budget - 2.0 * largest,
        "stopped at the budget, not far below: {spent} (largest request ${largest})"
    );
    let calls = fake.requests().len();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fake.requests().len(), calls, "no API calls while stopped");
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("embed_worker_api_stopped 1"), "{metrics}");
    // Queueing still works: the stopped worker's capture chore still turns the app's write
    // into a job (within capture.drain_ms; 10 s allowed).
    let extra = insert_session(&t.admin, Uuid::new_v4(), "late", "queued while stopped").await;
    let start = std::time::Instant::now();
    let queued = loop {
        let queued: i64 =
            sqlx::query_scalar("SELECT count(*) FROM embed_worker.jobs WHERE source_id = $1")
                .bind(extra.to_string())
                .fetch_one(&t.admin)
                .await
                .unwrap();
        if queued > 0 || start.elapsed() > Duration::from_secs(10) {
            break queued;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(queued, 1);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM embed_worker.failed_jobs")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(dead, 0);
    eprintln!(
        "budget ${budget}: stopped at ${spent:.4} after {calls} requests (largest ${largest:.4})"
    );

    // Raising the budget resumes the worker.
    embed_worker::guard::budget::set(&t.admin, 10.0)
        .await
        .unwrap();
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    let embedded: i64 = sqlx::query_scalar("SELECT count(DISTINCT source_id) FROM rag_embeddings")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(embedded, 61);
    let (code, _) = readyz(addr).await;
    assert_eq!(code, 200);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_key_and_source_text_never_reach_logs_or_metrics() {
    let t = TestDb::migrated().await;
    let secret = "sk-proj-THIS-IS-A-SECRET-KEY-0123456789";
    let fake = fake(FakeConfig {
        api_key: Some(secret.into()),
        ..FakeConfig::default()
    })
    .await;
    let note = "my-very-private-practice-note-about-grief";
    insert_session(&t.admin, Uuid::new_v4(), "private", note).await;
    insert_sessions(&t.admin, Uuid::new_v4(), 20, |_| 5).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log_path =
        std::env::temp_dir().join(format!("embed-worker-{}.log", Uuid::new_v4().simple()));
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_embed-worker"))
        .args(["--log-format", "json", "run"])
        .env("DATABASE_URL", &t.url)
        .env("OPENAI_API_KEY", secret)
        .env("EMBED_WORKER__API__BASE_URL", fake.base_url())
        .env("EMBED_WORKER__HTTP__ADDR", format!("127.0.0.1:{port}"))
        .env("EMBED_WORKER__RATE_LIMIT__TOKENS_PER_MINUTE", "0")
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .unwrap();
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    embed_worker::init_tls();
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success());
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let _ = std::fs::remove_file(&log_path);
    assert!(
        fake.requests().iter().all(|r| r.status == 200),
        "the key was sent to the provider"
    );
    assert!(logs.lines().count() > 10, "debug logs were written");
    assert!(logs.lines().all(|l| l.starts_with('{')), "JSON logs");
    assert!(!logs.contains(secret), "API key in logs");
    assert!(!metrics.contains(secret), "API key in metrics");
    assert!(!logs.contains(note), "source text in logs");
    assert!(!metrics.contains(note));
    assert!(metrics.contains("embed_worker_tokens_embedded_total"));
}
