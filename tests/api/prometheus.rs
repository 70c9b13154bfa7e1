//! A real Prometheus (Debian's package) scrapes the worker during a run; what it stores agrees
//! with the table, and promtool accepts the scrape and the alert rules.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;
use embed_worker::fake_openai::FakeConfig;
use uuid::Uuid;

async fn prom_query(base: &str, q: &str) -> Option<f64> {
    embed_worker::init_tls();
    let url =
        reqwest::Url::parse_with_params(&format!("{base}/api/v1/query"), &[("query", q)]).unwrap();
    let v: serde_json::Value = reqwest::get(url).await.ok()?.json().await.ok()?;
    v.pointer("/data/result/0/value/1")?.as_str()?.parse().ok()
}

struct Prometheus(std::process::Child, std::path::PathBuf);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prometheus_scrapes_tokens_and_cost_that_match_the_table() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig {
        latency: Duration::from_millis(20),
        ..FakeConfig::default()
    })
    .await;
    let mut s = worker_settings(&t, &fake);
    s.model.usd_per_million_tokens = 0.10;
    s.batch.max_jobs = 50;
    let w = RunningWorker::start(s).await;
    let target = w.worker.http_addr.unwrap();

    let dir = std::env::temp_dir().join(format!("prom-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: embed-worker\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package `prometheus`; scripts/test installs it)");
    let _prom = Prometheus(child, dir.clone());
    let base = format!("http://127.0.0.1:{port}");

    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 400, |i| 5 + i % 60).await;
    seed_templates(&t.admin).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    let stored_tokens: i64 =
        sqlx::query_scalar("SELECT sum(token_count)::bigint FROM rag_embeddings")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(sources.len(), 400);

    // Wait until Prometheus has scraped the final counters.
    let start = Instant::now();
    let scraped = loop {
        if let Some(v) = prom_query(&base, "sum(embed_worker_tokens_embedded_total)").await
            && v as i64 == stored_tokens
        {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "Prometheus never saw {stored_tokens} tokens"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(
        scraped as i64, stored_tokens,
        "PromQL tokens embedded = sum(token_count)"
    );
    let cost = prom_query(&base, "sum(embed_worker_cost_usd_total)")
        .await
        .unwrap();
    let want = stored_tokens as f64 * 0.10 / 1e6;
    assert!(
        (cost - want).abs() < 1e-9,
        "cost {cost} = tokens × price {want}"
    );
    let written = prom_query(&base, "sum(embed_worker_embeddings_written_total)")
        .await
        .unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rag_embeddings")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(written as i64, rows);
    let p95 = prom_query(
        &base,
        "histogram_quantile(0.95, sum by (le) (embed_worker_api_request_duration_seconds_bucket))",
    )
    .await
    .unwrap();
    assert!(p95 > 0.0, "API latency histogram scraped");

    // promtool lints the exposition format and names.
    let text = reqwest::get(format!("http://{target}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    w.stop().await;
}
