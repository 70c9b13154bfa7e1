//! A model switch as an operator runs it (migrate, `backfill --yes`, `run --until-empty` with
//! its deferred build), and pacing under a provider that enforces 1 request a second.

#[allow(unused_imports)]
use super::*;

/// The model switched to (1,536 dimensions, as ada-002: the same vectors' cost to index).
const NEW: &str = "text-embedding-3-small";

/// Runs the CLI with `args` to its end: (wall time, stdout, stderr).
fn cli(url: &str, api: &str, extra: &[(&str, String)], args: &[&str]) -> (Duration, String) {
    let mut cmd = worker_cmd(url, api, extra);
    cmd.args(args).stderr(Stdio::piped());
    let t = Instant::now();
    let out = cmd.output().unwrap();
    let took = t.elapsed();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?}: {said}");
    (took, said)
}

/// (11) The 20,000-source switch ada-002 → 3-small, index included: the old model is embedded
/// and indexed first (not timed), then `migrate` with the new model, and timed: `backfill --yes`
/// (the queueing) and `run --until-empty` (embedding, writing, the deferred build as the queue
/// drains, the promotion). pgai 0.12.1 at concurrency 4 through a live index: 184 rows/s on
/// this machine (issue 23's measurement, not re-run here): 108.7 s for 20,000; 6× is 18.1 s.
pub(crate) async fn bench_switch(
    report: &mut Report,
    url: &str,
    pool: &PgPool,
    sources: &[EmbedSource],
) {
    let section = "switch 20K";
    sqlx::raw_sql("TRUNCATE rag_embeddings; DELETE FROM apalis.jobs; DELETE FROM apalis.workers")
        .execute(pool)
        .await
        .unwrap();
    let (_fake, api) = start_fake(&[]);
    let port = || {
        (
            "EMBED_WORKER__HTTP__ADDR",
            format!("127.0.0.1:{}", free_port()),
        )
    };
    let unlimited = [
        (
            "EMBED_WORKER__RATE_LIMIT__TOKENS_PER_MINUTE",
            "0".to_string(),
        ),
        (
            "EMBED_WORKER__RATE_LIMIT__REQUESTS_PER_MINUTE",
            "0".to_string(),
        ),
    ];
    // The old model, embedded and indexed (as before any switch).
    let old: Vec<(&str, String)> = unlimited.iter().cloned().chain([port()]).collect();
    cli(url, &api, &old, &["migrate"]);
    embed_worker::queue::enqueue_many(pool, "embed", 10, sources)
        .await
        .unwrap();
    cli(url, &api, &old, &["run", "--until-empty"]);

    // The switch.
    let new: Vec<(&str, String)> = unlimited
        .iter()
        .cloned()
        .chain([
            ("EMBED_WORKER__MODEL__NAME", NEW.to_string()),
            ("EMBED_WORKER__MODEL__DIMENSIONS", DIMS.to_string()),
            port(),
        ])
        .collect();
    cli(url, &api, &new, &["migrate"]);
    let (queueing, said) = cli(url, &api, &new, &["backfill", "--yes"]);
    // "backfill: N jobs queued (M already pending) in X s": the one queueing statement.
    let line = said
        .lines()
        .find(|l| l.contains(" jobs queued"))
        .unwrap_or("")
        .to_string();
    let queued: u64 = line
        .strip_prefix("backfill: ")
        .and_then(|l| l.split(" jobs queued").next()?.parse().ok())
        .unwrap_or(0);
    let statement: f64 = line
        .rsplit(" in ")
        .next()
        .and_then(|t| t.trim_end_matches(" s").parse().ok())
        .unwrap_or(f64::NAN);
    let (run, said) = cli(url, &api, &new, &["run", "--until-empty"]);
    let build = said
        .lines()
        .find_map(|l| l.split(" built in ").nth(1))
        .unwrap_or("?")
        .to_string();
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rag_embeddings WHERE embedding_model = $1")
            .bind(NEW)
            .fetch_one(pool)
            .await
            .unwrap();
    let serving: String = sqlx::query_scalar("SELECT model FROM embed_worker.serving_model()")
        .fetch_one(pool)
        .await
        .unwrap();
    let total = queueing + run;
    eprintln!(
        "switch: backfill {:.2} s (queueing {statement:.2} s, {queued} jobs), run {:.1} s (build {build})",
        queueing.as_secs_f64(),
        run.as_secs_f64()
    );
    report.add(
        section,
        format!(
            "{} sources: `backfill --yes` (scan, estimate, queueing; process wall time)",
            sources.len()
        ),
        format!("{:.2} s", queueing.as_secs_f64()),
        "",
        None,
    );
    report.add(
        section,
        "of which queueing the jobs (one statement)",
        format!("{queued} jobs in {statement:.2} s"),
        "< 0.5 s",
        Some(statement < 0.5),
    );
    report.add(
        section,
        format!("`run --until-empty`: {rows} rows of {NEW}, its index built (of which the build: {build}), serving: {serving}"),
        format!("{:.1} s", run.as_secs_f64()),
        "",
        None,
    );
    let ratio = (sources.len() as f64 / total.as_secs_f64()) / 184.0;
    report.add(
        section,
        "the switch, index included (backfill + run), and × pgai c4 (184 rows/s)",
        format!("{:.1} s, {ratio:.2}×", total.as_secs_f64()),
        "≤ 17 s (≥ 6×)",
        Some(total.as_secs_f64() <= 17.0),
    );
    assert_eq!(serving, NEW, "the switch ends with the new model serving");
}

/// (12) 2,000 sources through a provider that enforces 1 request a second, with the shipped
/// batching: once stating its limit in its headers ("60 per minute", quantised as providers
/// do), once stating nothing (429s are all there is to learn from).
pub(crate) async fn bench_pace(report: &mut Report, url: &str, pool: &PgPool) {
    let section = "1 request/s provider";
    let users = [Uuid::new_v4()];
    let texts: Vec<String> = (0..2000)
        .map(|i| format!("pace {i}: {}", "scales and arpeggios ".repeat(5 + i % 20)))
        .collect();
    let ids = insert_sessions(pool, &users, &texts).await;
    let sources = helpers::session_sources(&ids);
    for stated in [true, false] {
        sqlx::raw_sql(
            "TRUNCATE rag_embeddings; DELETE FROM apalis.jobs; DELETE FROM apalis.workers",
        )
        .execute(pool)
        .await
        .unwrap();
        embed_worker::queue::enqueue_many(pool, "embed", 10, &sources)
            .await
            .unwrap();
        let fake = embed_worker::fake_openai::FakeServer::start(
            embed_worker::fake_openai::FakeConfig {
                rpm: 1,
                window: Duration::from_secs(1),
                quantised_rpm: Some(60),
                no_limit_headers: !stated,
                ..Default::default()
            },
            0,
        )
        .await
        .unwrap();
        let extra = [
            (
                "EMBED_WORKER__HTTP__ADDR",
                format!("127.0.0.1:{}", free_port()),
            ),
            (
                "EMBED_WORKER__RATE_LIMIT__REQUESTS_PER_MINUTE",
                "60".to_string(),
            ),
        ];
        let api = fake.base_url();
        let url = url.to_string();
        let t = Instant::now();
        tokio::task::spawn_blocking(move || cli(&url, &api, &extra, &["run", "--until-empty"]))
            .await
            .unwrap();
        let took = t.elapsed();
        let reqs = fake.requests();
        let ok = reqs.iter().filter(|r| r.status == 200).count();
        let refused = reqs.iter().filter(|r| r.status == 429).count();
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rag_embeddings")
            .fetch_one(pool)
            .await
            .unwrap();
        assert_eq!(rows, 2000);
        let (what, goal, met) = if stated {
            ("limit stated in headers", "0", refused == 0)
        } else {
            (
                "no limit headers",
                "≤ 1 per 10 accepted",
                refused * 10 <= ok,
            )
        };
        report.add(
            section,
            format!("2,000 sources, {what}: 429s / accepted requests (wall time)"),
            format!("{refused} / {ok} ({:.1} s)", took.as_secs_f64()),
            goal,
            Some(met),
        );
    }
}
