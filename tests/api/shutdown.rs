//! Graceful shutdown of the real binary: SIGTERM mid-run → exit 0 within the grace period,
//! unstarted jobs stay claimable, a second run finishes the rest, no duplicate rows.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::helpers::*;
use embed_worker::fake_openai::FakeConfig;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_run_exits_zero_and_a_second_run_finishes() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig {
        latency: Duration::from_millis(400),
        ..FakeConfig::default()
    })
    .await;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 300, |i| 10 + i % 50).await;
    enqueue(&t.admin, &sources).await;

    let mut child = worker_command(&t, &fake.base_url())
        .arg("run")
        .spawn()
        .unwrap();
    // Wait until the run is under way but far from done.
    let start = Instant::now();
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rag_embeddings")
            .fetch_one(&t.admin)
            .await
            .unwrap();
        if rows >= 20 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "worker made no progress"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let term_at = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let took = term_at.elapsed();
    assert_eq!(exit.code(), Some(0), "exit 0 on SIGTERM");
    assert!(
        took < Duration::from_secs(10),
        "stopped within the grace period: {took:?}"
    );
    let rows_after_stop: i64 = sqlx::query_scalar("SELECT count(*) FROM rag_embeddings")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert!(
        rows_after_stop < 300,
        "stopped mid-run ({rows_after_stop} rows)"
    );
    eprintln!("SIGTERM → exit in {took:?}, {rows_after_stop}/300 rows written");

    let second = worker_command(&t, &fake.base_url())
        .args(["run", "--until-empty"])
        .status()
        .unwrap();
    assert!(second.success());
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT source_id) FROM rag_embeddings")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!((rows, distinct), (300, 300), "everything embedded once");
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE status = 'Done'")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(done, 300);
}
