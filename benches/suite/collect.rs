//! Collecting a Batch API batch: the worker's peak RSS over one 50,000-input batch at 3,072
//! dimensions (~800 MB of output), against the same worker at rest. The output is read line by
//! line and written in parts, so the peak should not grow with the batch.

#[allow(unused_imports)]
use super::*;

/// Runs the worker in batch mode until `done` says so, then stops it with SIGTERM; its usage.
async fn run_until(
    url: &str,
    api: &str,
    pool: &PgPool,
    done: &str,
    extra: &[(&str, String)],
) -> Usage {
    let mut cmd = worker_cmd(url, api, extra);
    cmd.arg("run");
    let started = Instant::now();
    let child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let usage = tokio::task::spawn_blocking(move || wait_usage(child, started));
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ok: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(done.to_string()))
            .fetch_one(pool)
            .await
            .unwrap();
        if ok {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "collect bench: {done}"
        );
    }
    // SAFETY: a plain signal to our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    usage.await.unwrap()
}

pub(crate) async fn bench_collect(report: &mut Report, url: &str, pool: &PgPool, inputs: usize) {
    let section = format!("collect {inputs} inputs × 3072");
    sqlx::query(
        "INSERT INTO sessions (id, user_id, title, notes)
           SELECT gen_random_uuid(), gen_random_uuid(), 'Collect ' || g, 'bench notes number ' || g
             FROM generate_series(1, $1) g",
    )
    .bind(inputs as i64)
    .execute(pool)
    .await
    .unwrap();
    let (_fake, api) = start_fake(&[]);
    let extra = [
        (
            "EMBED_WORKER__HTTP__ADDR",
            format!("127.0.0.1:{}", free_port()),
        ),
        ("EMBED_WORKER__MODEL__NAME", "text-embedding-3-large".into()),
        ("EMBED_WORKER__MODEL__DIMENSIONS", "3072".into()),
        ("EMBED_WORKER__MODEL__SEND_DIMENSIONS", "true".into()),
        ("EMBED_WORKER__BULK__MODE", "batch".into()),
        ("EMBED_WORKER__BULK__POLL_SECS", "1".into()),
        ("EMBED_WORKER__INDEX__CHECK_INTERVAL_SECS", "86400".into()),
        (
            "EMBED_WORKER__BULK__MAX_SOURCES_PER_BATCH",
            inputs.to_string(),
        ),
        (
            "EMBED_WORKER__BULK__MAX_INPUTS_PER_BATCH",
            inputs.to_string(),
        ),
        ("EMBED_WORKER__RATE_LIMIT__TOKENS_PER_MINUTE", "0".into()),
        ("EMBED_WORKER__RATE_LIMIT__REQUESTS_PER_MINUTE", "0".into()),
    ];
    // At rest: the same worker with nothing to do, for 3 s.
    let rest = run_until(url, &api, pool, "SELECT pg_sleep(3) IS NOT NULL", &extra).await;
    // The batch: queued in the batch lane, submitted as one batch, collected, written.
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM sessions WHERE title LIKE 'Collect %'")
        .fetch_all(pool)
        .await
        .unwrap();
    let sources: Vec<EmbedSource> = ids
        .iter()
        .map(|id| EmbedSource {
            source_type: SourceType::Session,
            source_id: *id,
        })
        .collect();
    embed_worker::queue::enqueue_lane(pool, "embed.batch", 10, -10, &sources)
        .await
        .unwrap();
    let batch = run_until(
        url,
        &api,
        pool,
        "SELECT count(*) > 0 AND count(*) FILTER (WHERE finished_at IS NULL) = 0 FROM embed_worker.batches",
        &extra,
    )
    .await;
    let (rows, batches): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM rag_embeddings WHERE embedding_model = 'text-embedding-3-large'),
                (SELECT count(*) FROM embed_worker.batches)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let rest_mb = rest.max_rss_kb as f64 / 1024.0;
    let peak_mb = batch.max_rss_kb as f64 / 1024.0;
    report.add(
        &section,
        "rows written / batches",
        format!("{rows} / {batches}"),
        "",
        None,
    );
    report.add(
        &section,
        "worker peak RSS at rest (3 s idle)",
        format!("{rest_mb:.1} MB"),
        "",
        None,
    );
    report.add(
        &section,
        "worker peak RSS, submit + collect",
        format!("{peak_mb:.1} MB"),
        "",
        None,
    );
    report.add(
        &section,
        "above rest",
        format!("{:.1} MB", peak_mb - rest_mb),
        "≤ 64 MB",
        Some(peak_mb - rest_mb <= 64.0),
    );
    report.add(
        &section,
        "worker wall time (spawn → batch collected)",
        format!("{:.1} s", batch.wall.as_secs_f64()),
        "",
        None,
    );
}
