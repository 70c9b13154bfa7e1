//! Queue: enqueue, dedup, and claim + complete of no-op jobs.

#[allow(unused_imports)]
use super::*;

/// (6) The queue: apalis-postgres's bulk push, the worker's own enqueue path (dedup by
/// idempotency key, one statement), and claim + complete of no-op jobs through an apalis worker
/// configured as the embed worker's (config/default.toml: fetch batch, concurrency, poll,
/// LISTEN/NOTIFY stream).
pub(crate) async fn bench_queue(report: &mut Report, pool: &PgPool, n: usize) {
    use apalis::prelude::*;
    use apalis_postgres::{Config as PgQueueConfig, PostgresStorage, Pubsub};
    let section = "queue";
    let q = Settings::load(None).unwrap().queue;
    let queue = "bench_noop";
    let cfg = PgQueueConfig::default()
        .queue(queue)
        .batch_size(q.fetch_batch)
        .heartbeat_interval(Duration::from_secs(q.heartbeat_secs))
        .missed_heartbeats(q.missed_heartbeats);

    let mut storage = PostgresStorage::<serde_json::Value>::new(pool).with_config(cfg.clone());
    let payloads: Vec<serde_json::Value> = (0..n).map(|i| serde_json::json!({ "n": i })).collect();
    let t = Instant::now();
    storage.push_bulk(payloads).await.unwrap();
    let push = t.elapsed().as_secs_f64();
    report.add(
        section,
        format!("apalis push_bulk of {n} jobs"),
        format!("{:.0} jobs/s ({push:.2} s)", n as f64 / push),
        "",
        None,
    );

    let sources: Vec<EmbedSource> = (0..n)
        .map(|_| EmbedSource {
            source_type: SourceType::Session,
            source_id: Uuid::new_v4(),
        })
        .collect();
    let t = Instant::now();
    let created = embed_worker::queue::enqueue_many(pool, "bench_enqueue", 10, &sources)
        .await
        .unwrap();
    let enqueue = t.elapsed().as_secs_f64();
    assert_eq!(created as usize, n);
    let t = Instant::now();
    let again = embed_worker::queue::enqueue_many(pool, "bench_enqueue", 10, &sources)
        .await
        .unwrap();
    let dedup = t.elapsed().as_secs_f64();
    assert_eq!(again, 0, "every source already has a pending job");
    report.add(
        section,
        format!("worker's enqueue_many of {n} sources (one statement)"),
        format!("{:.0} jobs/s ({enqueue:.2} s)", n as f64 / enqueue),
        "",
        None,
    );
    report.add(
        section,
        format!("the same {n} again (all deduplicated)"),
        format!("{:.0} sources/s ({dedup:.2} s)", n as f64 / dedup),
        "",
        None,
    );

    pub(crate) async fn noop(_: serde_json::Value) -> Result<(), BoxDynError> {
        Ok(())
    }
    let strategy = Strategy::new()
        .stream(Pubsub::new(pool.clone(), queue.to_string()))
        .interval(Duration::from_millis(q.poll_interval_ms));
    let backend = PostgresStorage::<serde_json::Value>::new(pool)
        .with_config(cfg)
        .poll_with_strategy(strategy);
    let worker = WorkerBuilder::new("bench-noop")
        .backend(backend)
        .concurrency(q.concurrency)
        .build(noop);
    let t = Instant::now();
    let running = tokio::spawn(worker.run());
    let done = loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM apalis.jobs WHERE job_type = $1 AND status = 'Done'",
        )
        .bind(queue)
        .fetch_one(pool)
        .await
        .unwrap();
        if done as usize >= n || t.elapsed() > Duration::from_secs(300) {
            break done;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let claim = t.elapsed().as_secs_f64();
    running.abort();
    assert_eq!(done as usize, n, "every no-op job completed");
    report.add(
        section,
        format!(
            "claim + complete {n} no-op jobs (fetch {}, concurrency {})",
            q.fetch_batch, q.concurrency
        ),
        format!("{:.0} jobs/s ({claim:.2} s)", n as f64 / claim),
        "",
        None,
    );
}
