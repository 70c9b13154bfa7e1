//! Configuration and what the binary prints: degenerate values refused at start naming the
//! key, passwords never printed, a busy address named.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// `embed-worker` with `env`, no database needed; returns (exit code, stdout + stderr).
fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_embed-worker"));
    c.args(args)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn every_degenerate_configuration_is_refused_at_start_naming_the_key() {
    for (key, value, names) in [
        ("QUEUE__FETCH_BATCH", "0", "queue.fetch_batch = 0"),
        (
            "DATABASE__MAX_CONNECTIONS",
            "0",
            "database.max_connections = 0",
        ),
        ("QUEUE__CONCURRENCY", "0", "queue.concurrency = 0"),
        ("QUEUE__HEARTBEAT_SECS", "0", "queue.heartbeat_secs = 0"),
        (
            "QUEUE__MISSED_HEARTBEATS",
            "0",
            "queue.missed_heartbeats = 0",
        ),
        (
            "API__MAX_TOKENS_PER_REQUEST",
            "0",
            "api.max_tokens_per_request = 0",
        ),
        ("API__TIMEOUT_SECS", "0", "api.timeout_secs = 0"),
        ("BATCH__MAX_JOBS", "0", "batch.max_jobs = 0"),
        ("HTTP__ADDR", "localhost", "http.addr"),
        ("BUDGET__MONTHLY_USD", "NaN", "budget.monthly_usd = NaN"),
        ("LOG__FORMAT", "jsn", "log.format"),
    ] {
        let (code, out) = cli(&["config"], &[(&format!("EMBED_WORKER__{key}"), value)]);
        assert_eq!(code, 2, "{key}={value}: {out}");
        assert!(out.contains(names), "{key}={value} names the key: {out}");
        assert!(!out.contains("panicked"), "{out}");
    }
    let (code, out) = cli(&["config"], &[("EMBED_WORKER__QUEUE__FETCH_BATCH", "0")]);
    assert_eq!(code, 2);
    assert!(
        out.contains("allowed: 1..=10000"),
        "the range is given: {out}"
    );
    let (code, out) = cli(&["config"], &[]);
    assert_eq!(code, 0, "the defaults are valid: {out}");
}

#[test]
fn database_passwords_never_print_in_config_or_errors() {
    let port = free_port();
    let url =
        format!("postgres://worker:hunter2@127.0.0.1:{port}/app?password=hunter3&sslmode=disable");
    let (code, out) = cli(&["config"], &[("DATABASE_URL", &url)]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("hunter"), "{out}");
    let started = Instant::now();
    let (code, out) = cli(&["status"], &[("DATABASE_URL", &url)]);
    assert_ne!(code, 0);
    assert!(!out.contains("hunter"), "{out}");
    assert!(
        out.contains("connection refused") && out.contains("DATABASE_URL"),
        "names the cause and the knob: {out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails fast: {:?}",
        started.elapsed()
    );
    assert_eq!(
        out.matches("connection refused").count(),
        1,
        "printed once: {out}"
    );
    for bad in ["NaN", "-5", "inf"] {
        let (code, out) = cli(&["budget", "set", "--", bad], &[("DATABASE_URL", &url)]);
        assert_ne!(code, 0);
        assert!(
            out.contains("must be a finite number of USD >= 0"),
            "{bad}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_http_address_is_named() {
    let t = TestDb::migrated().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut s = t.settings();
    s.http.addr = addr.clone();
    let err = match embed_worker::worker::Worker::build(s).await {
        Ok(_) => panic!("bound a busy address"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(&addr) && err.contains("http.addr"), "{err}");
}
