//! Replicas: worker processes on one server (the same backlog drained by 1, 2 and 4 of them),
//! and searches on the primary and on a streaming standby (`scripts/db standby`) while the
//! worker writes at full speed (a model switch's backfill, no index to maintain).

use super::*;

/// Starts `n` `embed-worker run` processes of `model` and returns them once the queue drained,
/// with the drain's duration (first spawn → no open job).
async fn drain_with(
    url: &str,
    pool: &PgPool,
    api: &str,
    n: usize,
    model: (&str, usize),
    during: impl std::future::Future<Output = ()>,
) -> (Vec<std::process::Child>, Duration) {
    let started = Instant::now();
    let workers: Vec<std::process::Child> = (0..n)
        .map(|_| {
            let extra = [
                (
                    "EMBED_WORKER__HTTP__ADDR",
                    format!("127.0.0.1:{}", free_port()),
                ),
                ("EMBED_WORKER__RATE_LIMIT__TOKENS_PER_MINUTE", "0".into()),
                ("EMBED_WORKER__RATE_LIMIT__REQUESTS_PER_MINUTE", "0".into()),
                ("EMBED_WORKER__MODEL__NAME", model.0.to_string()),
                ("EMBED_WORKER__MODEL__DIMENSIONS", model.1.to_string()),
                (
                    "EMBED_WORKER__MODEL__SEND_DIMENSIONS",
                    model.0.starts_with("text-embedding-3").to_string(),
                ),
                // No build while measured: the drain is the figure.
                ("EMBED_WORKER__INDEX__CHECK_INTERVAL_SECS", "86400".into()),
            ];
            let mut c = worker_cmd(url, api, &extra);
            c.arg("run").stdout(Stdio::null()).spawn().unwrap()
        })
        .collect();
    let drained = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if embed_worker::queue::open_jobs(pool, "embed").await.unwrap() == 0 {
                return started.elapsed();
            }
        }
    };
    tokio::pin!(during);
    let took = tokio::select! {
        t = drained => t,
        _ = &mut during => unreachable!("the searches run until dropped"),
    };
    (workers, took)
}

fn stop(workers: Vec<std::process::Child>) {
    for mut w in workers {
        let _ = Command::new("kill")
            .args(["-TERM", &w.id().to_string()])
            .status();
        let _ = w.wait();
    }
}

pub(crate) async fn bench_replicas(
    report: &mut Report,
    url: &str,
    pool: &PgPool,
    sources: &[EmbedSource],
) {
    let section = format!("replicas {}K", sources.len() / 1000);
    let (_fake, api) = start_fake(&["--latency-ms".into(), "0".into()]);
    let ada = model_index::IndexSpec::new(MODEL, DIMS, IndexPrecision::Auto).unwrap();
    let reset = "TRUNCATE rag_embeddings; DELETE FROM apalis.jobs; DELETE FROM apalis.workers";

    // Worker processes on one server: the backfill path (no index), fake at 0 ms.
    let mut base = 0.0;
    for n in [1usize, 2, 4] {
        sqlx::raw_sql(reset).execute(pool).await.unwrap();
        if let model_index::IndexState::Ready(name) = model_index::state(pool, &ada).await.unwrap()
        {
            model_index::build::drop_index(pool, &name).await.unwrap();
        }
        embed_worker::queue::enqueue_many(pool, "embed", 10, sources)
            .await
            .unwrap();
        eprintln!("replicas: {n} worker process(es) …");
        let (workers, took) =
            drain_with(url, pool, &api, n, (MODEL, DIMS), std::future::pending()).await;
        stop(workers);
        let rows_s = sources.len() as f64 / took.as_secs_f64();
        if n == 1 {
            base = rows_s;
        }
        report.add(
            &section,
            format!("{n} worker process(es) on one server: rows/s (drain, no index)"),
            format!("{rows_s:.0} ({:.2}× one)", rows_s / base),
            "",
            None,
        );
    }

    // The old model serves through its index; a standby of the whole dev cluster streams it.
    let cfg = Settings::load(None).unwrap().index;
    model_index::build::build(pool, &ada, &cfg, None)
        .await
        .unwrap();
    model_index::lifecycle::on_migrate(&mut pool.acquire().await.unwrap(), &ada)
        .await
        .unwrap();
    let standby_dir = std::env::temp_dir().join(format!("bench-standby-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&standby_dir);
    let standby_port = free_port();
    let script = |action: &str| {
        Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/db"))
            .args(["standby", action])
            .env("EMBED_WORKER_STANDBY_PORT", standby_port.to_string())
            .env("EMBED_WORKER_STANDBY_DATA", &standby_dir)
            .stderr(Stdio::null())
            .output()
            .unwrap()
    };
    let started = Instant::now();
    let out = script("start");
    assert!(out.status.success(), "scripts/db standby start");
    let basebackup = started.elapsed();
    let db_name = url.rsplit('/').next().unwrap();
    let standby_url = format!("postgres://postgres@127.0.0.1:{standby_port}/{db_name}");
    let standby = db::connect_as_login(&standby_url).await.unwrap();
    // Until the index is there, replayed.
    loop {
        let ready: bool =
            sqlx::query_scalar("SELECT count(*) > 0 FROM pg_class WHERE relname = $1")
                .bind(ada.name())
                .fetch_one(&standby)
                .await
                .unwrap();
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.add(
        &section,
        "scripts/db standby start (pg_basebackup of the dev cluster + start)",
        format!("{:.1} s", basebackup.as_secs_f64()),
        "seconds",
        Some(basebackup < Duration::from_secs(60)),
    );

    // Searches while two workers write a new model's backfill at full speed.
    let new =
        model_index::IndexSpec::new("text-embedding-3-small", 512, IndexPrecision::Auto).unwrap();
    model_index::lifecycle::ensure(pool, &new).await.unwrap();
    embed_worker::queue::enqueue_many(pool, "embed", 10, sources)
        .await
        .unwrap();
    let times: std::sync::Mutex<(Vec<f64>, Vec<f64>, f64)> =
        std::sync::Mutex::new((Vec::new(), Vec::new(), 0.0));
    let searches = async {
        let mut i = 0usize;
        loop {
            let q = fake_vector(&format!("replica query {i}"), DIMS);
            for (on_standby, p) in [(false, pool), (true, &standby)] {
                let t0 = Instant::now();
                let found = embed_worker::search::search_serving(p, q.clone(), &Default::default())
                    .await
                    .unwrap();
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                assert_eq!(found.hits.len(), 5);
                let mut t = times.lock().unwrap();
                if on_standby {
                    t.1.push(ms)
                } else {
                    t.0.push(ms)
                }
            }
            if i.is_multiple_of(10)
                && let Ok(lag) = embed_worker::replica::lag(pool).await
            {
                let worst = lag
                    .iter()
                    .filter_map(|r| r.replay_lag_seconds)
                    .fold(0.0, f64::max);
                let mut t = times.lock().unwrap();
                t.2 = t.2.max(worst);
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    eprintln!("replicas: searches on the primary and the standby during a 2-worker backfill …");
    let (workers, took) = drain_with(
        url,
        pool,
        &api,
        2,
        ("text-embedding-3-small", 512),
        searches,
    )
    .await;
    stop(workers);
    let (primary, on_standby, worst_lag) = std::mem::take(&mut *times.lock().unwrap());
    let n = primary.len();
    let (p50, p95, _) = ms_stats(primary);
    let (s50, s95, _) = ms_stats(on_standby);
    report.add(
        &section,
        format!(
            "top-5 search during the backfill ({} rows/s written by 2 workers), primary: p50/p95 ({n} searches)",
            (sources.len() as f64 / took.as_secs_f64()).round()
        ),
        format!("{p50:.2}/{p95:.2} ms"),
        "",
        None,
    );
    report.add(
        &section,
        "the same searches on the standby: p50/p95",
        format!("{s50:.2}/{s95:.2} ms"),
        "",
        None,
    );
    report.add(
        &section,
        "the standby's worst replay lag seen meanwhile (from the primary)",
        format!("{worst_lag:.2} s"),
        "",
        None,
    );
    standby.close().await;
    let _ = script("stop");
    let _ = std::fs::remove_dir_all(&standby_dir);
    for suffix in [".log", ".run"] {
        let p = format!("{}{suffix}", standby_dir.display());
        let _ = std::fs::remove_dir_all(&p);
        let _ = std::fs::remove_file(&p);
    }
}
