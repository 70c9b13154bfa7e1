//! End to end: the real worker against the raw COPY ceiling.

#[allow(unused_imports)]
use super::*;

pub(crate) struct E2e {
    pub(crate) rows: i64,
    pub(crate) rows_per_s: f64,
    pub(crate) cpu_s: f64,
}

/// (1) The worker end to end at `latency_ms`, then the raw COPY ceiling of the same rows.
/// `deferred`: the model has no index (a model switch, a first backfill): rows are written
/// without HNSW maintenance and `run --until-empty` builds the index once the queue has drained;
/// the build is inside the measured time.
pub(crate) async fn bench_e2e(
    report: &mut Report,
    url: &str,
    pool: &PgPool,
    sources: &[EmbedSource],
    latency_ms: u64,
    tokenize_cpu: f64,
    deferred: bool,
) -> E2e {
    let section = if deferred {
        format!("e2e {latency_ms}ms, deferred index")
    } else {
        format!("e2e {latency_ms}ms")
    };
    sqlx::raw_sql("TRUNCATE rag_embeddings; DELETE FROM apalis.jobs; DELETE FROM apalis.workers")
        .execute(pool)
        .await
        .unwrap();
    let spec = model_index::IndexSpec::new(MODEL, DIMS, IndexPrecision::Auto).unwrap();
    let present = model_index::state(pool, &spec).await.unwrap();
    match (deferred, present) {
        (true, model_index::IndexState::Ready(name)) => {
            model_index::build::drop_index(pool, &name).await.unwrap()
        }
        (false, model_index::IndexState::Missing) => {
            let cfg = Settings::load(None).unwrap().index;
            model_index::build::build(pool, &spec, &cfg, None)
                .await
                .unwrap();
        }
        _ => {}
    }
    embed_worker::queue::enqueue_many(pool, "embed", 10, sources)
        .await
        .unwrap();
    let (_fake, api) = start_fake(&["--latency-ms".into(), latency_ms.to_string()]);
    let extra = [
        (
            "EMBED_WORKER__HTTP__ADDR",
            format!("127.0.0.1:{}", free_port()),
        ),
        ("EMBED_WORKER__RATE_LIMIT__TOKENS_PER_MINUTE", "0".into()),
        ("EMBED_WORKER__RATE_LIMIT__REQUESTS_PER_MINUTE", "0".into()),
        // Batching and queue settings: config/default.toml's, as shipped.
    ];
    let started = Instant::now();
    let mut cmd = worker_cmd(url, &api, &extra);
    cmd.args(["run", "--until-empty"]);
    // EMBED_BENCH_WRAP="perf record -e cpu-clock -F 250 --call-graph dwarf,8192 -o w.data --"
    // (or "heaptrack -o h"): run the worker under a profiler. CPU and RSS figures then include
    // the profiler's own; use such a run for the profile only.
    if let Ok(wrap) = std::env::var("EMBED_BENCH_WRAP") {
        let inner = cmd;
        let mut words = wrap.split_whitespace();
        cmd = Command::new(words.next().expect("EMBED_BENCH_WRAP names a command"));
        cmd.args(words.map(|w| w.replace("{latency}", &latency_ms.to_string())))
            .arg(inner.get_program())
            .args(inner.get_args())
            .envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
    }
    let child = cmd.spawn().unwrap();
    let usage = tokio::task::spawn_blocking(move || wait_usage(child, started))
        .await
        .unwrap();
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM rag_embeddings")
        .fetch_one(pool)
        .await
        .unwrap();
    // From spawn to exit: every row committed, start-up and the empty-queue check included.
    // (`max(updated_at)` would be the start of the last write transaction, not its commit, and
    // with batches of 1,024 writing in parallel that missed most of the HNSW insertion time.)
    let rows_per_s = rows as f64 / usage.wall.as_secs_f64();
    let requests = parse_summary(&usage.stdout, "api requests");
    let cpu_s = usage.cpu.as_secs_f64();
    report.add(
        &section,
        format!("{} sources → rows written", sources.len()),
        rows.to_string(),
        "",
        None,
    );
    report.add(
        &section,
        "rows/s (worker spawn → exit, all rows committed)",
        format!("{rows_per_s:.0}"),
        "",
        None,
    );
    report.add(&section, "API requests", requests.to_string(), "", None);
    let cpu_per_row_ms = cpu_s * 1000.0 / rows as f64;
    report.add(
        &section,
        "worker CPU per 1,000 rows",
        format!(
            "{:.3} s ({cpu_per_row_ms:.3} ms/row)",
            cpu_s * 1000.0 / rows as f64
        ),
        "≤ 0.1 ms/row",
        Some(cpu_per_row_ms <= 0.1),
    );
    let rss_mb = usage.max_rss_kb as f64 / 1024.0;
    report.add(
        &section,
        "worker peak RSS",
        format!("{rss_mb:.1} MB"),
        "≤ 64 MB",
        Some(rss_mb <= 64.0),
    );
    report.add(
        &section,
        "worker wall time (process)",
        format!("{:.1} s", usage.wall.as_secs_f64()),
        "",
        None,
    );
    if deferred {
        let ready = matches!(
            model_index::state(pool, &spec).await.unwrap(),
            model_index::IndexState::Ready(_)
        );
        report.add(
            &section,
            "index built by the worker once drained (inside the time above)",
            if ready { "yes" } else { "no" },
            "yes",
            Some(ready),
        );
        // The worker's last line: "index … built in 9.8 s".
        let build = usage
            .stdout
            .lines()
            .find_map(|l| l.split(" built in ").nth(1))
            .unwrap_or("?")
            .to_string();
        report.add(&section, "of which the index build", build, "", None);
        return E2e {
            rows,
            rows_per_s,
            cpu_s,
        };
    }
    if latency_ms == 0 {
        report.add(
            &section,
            "tokenize+split share of worker CPU",
            format!("{:.1}%", tokenize_cpu * 100.0 / cpu_s),
            "",
            None,
        );
    }

    // Ceiling: the same rows, precomputed, by raw binary COPY into the same indexed table.
    let stored: Vec<(Uuid, i32, String, Vector, i32)> = sqlx::query_as(
        "SELECT source_id, chunk_index, content_hash, embedding, token_count FROM rag_embeddings",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let rows_copy: Vec<EmbRow> = stored
        .into_iter()
        .map(|(source_id, chunk, hash, v, tokens)| EmbRow {
            source_id,
            chunk,
            hash,
            vector: v.to_vec(),
            tokens,
        })
        .collect();
    sqlx::raw_sql("TRUNCATE rag_embeddings")
        .execute(pool)
        .await
        .unwrap();
    // As many COPY streams as cores: the worker writes with several batches in flight too.
    let streams = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let per = rows_copy.len().div_ceil(streams);
    let rows_copy = Arc::new(rows_copy);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..streams {
        let (rows_copy, pool) = (rows_copy.clone(), pool.clone());
        tasks.push(tokio::spawn(async move {
            let part =
                &rows_copy[(i * per).min(rows_copy.len())..((i + 1) * per).min(rows_copy.len())];
            copy_rows(&pool, part).await
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let copy = started.elapsed();
    let ceiling = rows_copy.len() as f64 / copy.as_secs_f64();
    report.add(
        &section,
        "ceiling: raw binary COPY rows/s (same table, HNSW, one stream per core)",
        format!("{ceiling:.0}"),
        "",
        None,
    );
    let ratio = rows_per_s / ceiling;
    report.add(
        &section,
        "worker ÷ ceiling",
        format!("{ratio:.2}"),
        "≥ 0.8",
        Some(ratio >= 0.8),
    );
    E2e {
        rows,
        rows_per_s,
        cpu_s,
    }
}
