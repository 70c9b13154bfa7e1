//! Collecting a Batch API batch: the worker's peak RSS over one 50,000-input batch at 3,072
//! dimensions (~800 MB of output), against the same worker at rest (one that has submitted and
//! collected a one-input batch: code, tokenizer and connections loaded). The output is read line
//! by line and written in parts, so the peak should not grow with the batch.

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
             FROM generate_series(1, $1) g;",
    )
    .bind(inputs as i64)
    .execute(pool)
    .await
    .unwrap();
    let queue = |title: &'static str| async move {
        let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM sessions WHERE title LIKE $1")
            .bind(title)
            .fetch_all(pool)
            .await
            .unwrap();
        let sources = helpers::session_sources(&ids);
        embed_worker::queue::enqueue_lane(pool, "embed.batch", 10, -10, &sources)
            .await
            .unwrap();
    };
    // Each batch stays in progress for 5 s: the submitting process is stopped before it ends,
    // and a fresh one collects it (so its peak is collecting's alone).
    let (_fake, api) = start_fake(&["--batch-delay-ms".into(), "5000".into()]);
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
    // At rest: a worker that has submitted and collected a batch of one input.
    let done = |n: i64| {
        format!(
            "SELECT count(*) FILTER (WHERE finished_at IS NOT NULL) = {n} FROM embed_worker.batches"
        )
    };
    queue("Collect 1").await;
    let rest = run_until(url, &api, pool, &done(1), &extra).await;
    // The batch: queued in the batch lane and submitted as one batch by one process, collected
    // and written by another.
    queue("Collect %").await;
    let submit = run_until(
        url,
        &api,
        pool,
        "SELECT count(*) FILTER (WHERE state = 'submitted') = 1 FROM embed_worker.batches",
        &extra,
    )
    .await;
    let batch = run_until(url, &api, pool, &done(2), &extra).await;
    let (rows, batches): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM rag_embeddings WHERE embedding_model = 'text-embedding-3-large'),
                (SELECT count(*) FROM embed_worker.batches)",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let rest_mb = rest.max_rss_kb as f64 / 1024.0;
    let peak_mb = batch.max_rss_kb as f64 / 1024.0;
    let submit_mb = submit.max_rss_kb as f64 / 1024.0;
    report.add(
        &section,
        "rows written / batches",
        format!("{rows} / {batches}"),
        "",
        None,
    );
    report.add(
        &section,
        "worker peak RSS at rest (after a 1-input batch)",
        format!("{rest_mb:.1} MB"),
        "",
        None,
    );
    report.add(
        &section,
        "submitting process: peak RSS (claim, prepare 50,000 sources, JSONL, record, upload)",
        format!("{submit_mb:.1} MB ({:.1} above rest)", submit_mb - rest_mb),
        "",
        None,
    );
    report.add(
        &section,
        "collecting process: peak RSS (resume, stream ~800 MB of output, write, end jobs)",
        format!("{peak_mb:.1} MB"),
        "",
        None,
    );
    report.add(
        &section,
        "collecting, above rest",
        format!("{:.1} MB", peak_mb - rest_mb),
        "≤ 64 MB",
        Some(peak_mb - rest_mb <= 64.0),
    );
    report.add(
        &section,
        "collecting process wall time (spawn → batch collected)",
        format!("{:.1} s", batch.wall.as_secs_f64()),
        "",
        None,
    );
}
