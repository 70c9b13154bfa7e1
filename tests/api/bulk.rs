//! The bulk lane: backfills through the Batch API at half price, resumable, budgeted; and
//! interactive jobs never queued behind bulk ones.

use std::time::{Duration, Instant};

use crate::helpers::*;
use embed_worker::config::{BulkMode, Settings};
use embed_worker::fake_openai::{BATCH_ERROR_MARKER, FakeConfig};
use embed_worker::source::EmbedSource;
use uuid::Uuid;

/// Worker settings with the batch lane on, polling every second.
fn batch_settings(t: &TestDb, fake: &embed_worker::fake_openai::FakeServer) -> Settings {
    let mut s = worker_settings(t, fake);
    s.model.name = "text-embedding-3-small".into();
    s.model.dimensions = 256;
    s.model.send_dimensions = true;
    s.bulk.mode = BulkMode::Batch;
    s.bulk.poll_secs = 1;
    s.retry.job_backoff_base_secs = 1;
    s.retry.job_backoff_cap_secs = 1;
    s
}

async fn spend(t: &TestDb, model: &str) -> f64 {
    sqlx::query_scalar(
        "SELECT coalesce(sum(usd), 0)::float8 FROM embed_worker.spend WHERE model = $1",
    )
    .bind(model)
    .fetch_one(&t.admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_20000_source_backfill_through_the_batch_api_costs_half_and_writes_the_same_vectors() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig::default()).await;
    let n = 20_000;
    insert_sessions(&t.admin, Uuid::new_v4(), n, |i| 3 + i % 25).await;
    let batch = batch_settings(&t, &fake);
    let mut sync = batch.clone();
    sync.bulk.mode = BulkMode::Sync;

    // The sync path first: its vectors, tokens and cost are the reference.
    assert_eq!(backfill_stale(&t, &sync).await, n as i64);
    let w = RunningWorker::start(sync.clone()).await;
    wait_drained(&t.admin, Duration::from_secs(120)).await;
    w.stop().await;
    let sync_usd = spend(&t, "text-embedding-3-small").await;
    let sync_tokens = fake.tokens_billed();
    let sync_requests = fake.requests().len();
    sqlx::raw_sql(
        "CREATE TABLE reference AS SELECT source_id, chunk_index, embedding, token_count FROM rag_embeddings;
         DELETE FROM rag_embeddings",
    )
    .execute(&t.admin)
    .await
    .unwrap();

    // The same backfill through the batch lane.
    assert_eq!(backfill_stale(&t, &batch).await, n as i64);
    let queued: i64 = count(
        &t.admin,
        "SELECT count(*) FROM apalis.jobs WHERE job_type = 'embed.batch' AND status = 'Pending'",
    )
    .await;
    assert_eq!(queued, n as i64, "bulk jobs wait in the batch queue");
    let w = RunningWorker::start(batch.clone()).await;
    wait_drained(&t.admin, Duration::from_secs(180)).await;
    w.stop().await;

    assert_eq!(
        fake.requests().len(),
        sync_requests,
        "no embeddings request on the batch path"
    );
    assert_eq!(fake.batches_created(), 1);
    let rows: i64 = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
    let distinct: i64 = count(
        &t.admin,
        "SELECT count(DISTINCT (source_id, chunk_index)) FROM rag_embeddings",
    )
    .await;
    let same: i64 = count(
        &t.admin,
        "SELECT count(*) FROM reference r JOIN rag_embeddings e USING (source_id, chunk_index)
          WHERE r.embedding = e.embedding AND r.token_count = e.token_count",
    )
    .await;
    let reference: i64 = count(&t.admin, "SELECT count(*) FROM reference").await;
    assert_eq!(
        (rows, distinct, same),
        (reference, reference, reference),
        "0 lost, 0 duplicates, the same vectors"
    );
    let done: i64 = count(
        &t.admin,
        "SELECT count(*) FROM apalis.jobs WHERE job_type = 'embed.batch' AND status = 'Done'",
    )
    .await;
    assert_eq!(done, n as i64);
    assert_eq!(
        fake.batch_tokens_billed(),
        sync_tokens,
        "the same tokens billed"
    );
    let batch_usd = spend(&t, "text-embedding-3-small (batch)").await;
    eprintln!("sync ${sync_usd:.6} vs batch ${batch_usd:.6} for {sync_tokens} tokens");
    assert!(sync_usd > 0.0);
    assert!(
        (batch_usd - 0.5 * sync_usd).abs() < 1e-9,
        "batch cost {batch_usd} = 0.5 × sync cost {sync_usd}"
    );
    assert_eq!(
        fake.files_stored(),
        0,
        "input, output and error files deleted"
    );
    let recs = embed_worker::bulk::records::list(&t.admin, 10)
        .await
        .unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].state, "completed");
    assert!(recs[0].finished_at.is_some());
    assert_eq!(recs[0].tokens_billed, Some(sync_tokens as i64));
    let table = format!("{}", embed_worker::bulk::BatchTable(recs));
    assert!(table.contains("completed (done)"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_after_submitting_is_resumed_by_the_next_and_nothing_is_resubmitted() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig {
        batch_delay: Duration::from_secs(4),
        ..FakeConfig::default()
    })
    .await;
    insert_sessions(&t.admin, Uuid::new_v4(), 500, |i| 3 + i % 20).await;
    let s = batch_settings(&t, &fake);
    assert_eq!(backfill_stale(&t, &s).await, 500);
    let lane_env = |c: &mut std::process::Command| {
        c.env("EMBED_WORKER__BULK__MODE", "batch")
            .env("EMBED_WORKER__BULK__POLL_SECS", "1")
            .env("EMBED_WORKER__MODEL__NAME", "text-embedding-3-small")
            .env("EMBED_WORKER__MODEL__DIMENSIONS", "256")
            .env("EMBED_WORKER__MODEL__SEND_DIMENSIONS", "true");
    };
    let mut first = worker_command(&t, &fake.base_url());
    lane_env(&mut first);
    let mut first = first.arg("run").spawn().unwrap();
    // Killed once the submission is recorded (the provider creating the batch comes first: a
    // kill between the two, the record still `preparing`, is the other resume path's test).
    let started = Instant::now();
    loop {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM embed_worker.batches")
            .fetch_optional(&t.admin)
            .await
            .unwrap();
        if state.as_deref() == Some("submitted") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no batch was submitted: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    assert_eq!(fake.batches_created(), 1);
    let state: String = sqlx::query_scalar("SELECT state FROM embed_worker.batches")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(state, "submitted", "recorded before the kill");

    let mut second = worker_command(&t, &fake.base_url());
    lane_env(&mut second);
    let status = second.args(["run", "--until-empty"]).status().unwrap();
    assert!(status.success());
    assert_eq!(fake.batches_created(), 1, "resumed, not resubmitted");
    let done: i64 = count(
        &t.admin,
        "SELECT count(*) FROM apalis.jobs WHERE status = 'Done'",
    )
    .await;
    let rows: i64 = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
    assert_eq!((done, rows), (500, 500));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_batch_writes_its_answered_half_and_resubmits_the_rest() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig {
        batch_expire_first: 1,
        ..FakeConfig::default()
    })
    .await;
    insert_sessions(&t.admin, Uuid::new_v4(), 200, |i| 3 + i % 20).await;
    let mut s = batch_settings(&t, &fake);
    s.api.max_inputs_per_request = 10;
    assert_eq!(backfill_stale(&t, &s).await, 200);
    let w = RunningWorker::start(s).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    let rows: i64 = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
    assert_eq!(rows, 200);
    assert_eq!(fake.batches_created(), 2);
    let recs: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT state, requests, tokens_billed FROM embed_worker.batches ORDER BY id",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(recs[0].0, "expired");
    assert_eq!(
        (recs[0].1, recs[1].0.as_str(), recs[1].1),
        (20, "completed", 10),
        "{recs:?}"
    );
    let (done, retried): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'Done'), count(*) FILTER (WHERE attempts > 0) FROM apalis.jobs",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!(
        (done, retried),
        (200, 0),
        "the expired half was resubmitted without using an attempt"
    );
    assert_eq!(fake.files_stored(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_error_lines_among_1000_are_three_dead_letters_and_997_rows() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig::default()).await;
    let user = Uuid::new_v4();
    insert_sessions(&t.admin, user, 997, |i| 3 + i % 20).await;
    let mut bad = Vec::new();
    for i in 0..3 {
        bad.push(
            insert_session(
                &t.admin,
                user,
                &format!("bad {i}"),
                &format!("notes {BATCH_ERROR_MARKER}"),
            )
            .await,
        );
    }
    let mut s = batch_settings(&t, &fake);
    s.api.max_inputs_per_request = 1;
    assert_eq!(backfill_stale(&t, &s).await, 1000);
    let w = RunningWorker::start(s).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    let requests: i32 = sqlx::query_scalar("SELECT requests FROM embed_worker.batches")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(requests, 1000);
    let rows: i64 = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
    assert_eq!(rows, 997);
    let dead: Vec<(String, String)> = sqlx::query_as(
        "SELECT source_id, last_error FROM embed_worker.failed_jobs ORDER BY source_id",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(dead.len(), 3, "{dead:?}");
    for (id, reason) in &dead {
        assert!(bad.iter().any(|b| b.to_string() == *id), "{id}");
        assert!(
            reason.contains("HTTP 400") && reason.contains("is invalid"),
            "{reason}"
        );
    }
    assert_eq!(fake.batches_created(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_next_batch_is_cut_to_the_budget_left_while_one_is_in_flight() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig {
        batch_delay: Duration::from_secs(3),
        ..FakeConfig::default()
    })
    .await;
    // Texts of one length (identical ones would be sent once).
    let ids: Vec<Uuid> = insert_sessions(&t.admin, Uuid::new_v4(), 300, |_| 10)
        .await
        .into_iter()
        .map(|s| s.source_id)
        .collect();
    let mut s = batch_settings(&t, &fake);
    s.bulk.max_sources_per_batch = 100;
    s.bulk.max_open_batches = 3;
    // One batch of 100 sources fits the budget; a second only about half.
    let hundred: Vec<EmbedSource> = ids[..100]
        .iter()
        .map(|id| EmbedSource {
            source_type: embed_worker::source::SourceType::Session,
            source_id: *id,
        })
        .collect();
    let one = embed_worker::freshness::estimate(&t.admin, &s, &hundred)
        .await
        .unwrap();
    embed_worker::guard::budget::set(&t.admin, one.batch_usd * 1.5)
        .await
        .unwrap();
    assert_eq!(backfill_stale(&t, &s).await, 300);
    let w = RunningWorker::start(s).await;
    // While the first is in flight, the second is cut to what its reservation leaves.
    let started = Instant::now();
    while fake.batches_created() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a second, smaller batch"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let rows = loop {
        let rows = count(&t.admin, "SELECT count(*) FROM rag_embeddings").await;
        let open = count(
            &t.admin,
            "SELECT count(*) FROM embed_worker.batches WHERE finished_at IS NULL",
        )
        .await;
        if rows >= 100 && open == 0 {
            break rows;
        }
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    w.stop().await;
    assert_eq!(
        fake.batches_created(),
        2,
        "nothing more once the budget is spent"
    );
    assert!(
        (145..=150).contains(&rows),
        "100 + about half of 100 written: {rows}"
    );
    let (spent, budget) = embed_worker::guard::budget::month(&t.admin).await.unwrap();
    assert!(spent <= budget + 1e-12, "spent {spent} within {budget}");
    let pending: i64 = count(
        &t.admin,
        "SELECT count(*) FROM apalis.jobs WHERE job_type = 'embed.batch' AND status = 'Pending' AND attempts = 0",
    )
    .await;
    assert_eq!(pending, 300 - rows, "held back, no attempt used");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn interactive_jobs_are_embedded_while_a_bulk_backlog_waits() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig {
        batch_delay: Duration::from_secs(6),
        ..FakeConfig::default()
    })
    .await;
    let user = Uuid::new_v4();
    insert_sessions(&t.admin, user, 3000, |i| 3 + i % 20).await;
    let s = batch_settings(&t, &fake);
    assert_eq!(backfill_stale(&t, &s).await, 3000);
    let w = RunningWorker::start(s.clone()).await;
    let started = Instant::now();
    while fake.batches_created() == 0 {
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Changes arrive while the backlog is at the provider: captured, embedded at once.
    embed_worker::db::apply_capture(&t.admin, true, true)
        .await
        .unwrap();
    let mut fresh = Vec::new();
    for i in 0..10 {
        fresh.push(
            insert_session(&t.admin, user, &format!("new {i}"), "a change to embed now").await,
        );
    }
    let started = Instant::now();
    loop {
        let embedded: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT source_id) FROM rag_embeddings WHERE source_id = ANY($1)",
        )
        .bind(&fresh)
        .fetch_one(&t.admin)
        .await
        .unwrap();
        if embedded == 10 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{embedded}/10");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let batch_open: i64 = count(
        &t.admin,
        "SELECT count(*) FROM embed_worker.batches WHERE finished_at IS NULL",
    )
    .await;
    assert_eq!(
        batch_open, 1,
        "the interactive jobs did not wait for the bulk batch"
    );
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    let rows: i64 = count(
        &t.admin,
        "SELECT count(DISTINCT source_id) FROM rag_embeddings",
    )
    .await;
    assert_eq!(rows, 3010);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_sync_mode_interactive_jobs_go_first_and_a_change_raises_a_pending_bulk_job() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig::default()).await;
    let user = Uuid::new_v4();
    let sources = insert_sessions(&t.admin, user, 4000, |i| 3 + i % 20).await;
    let mut s = batch_settings(&t, &fake);
    s.bulk.mode = BulkMode::Sync;
    assert_eq!(backfill_stale(&t, &s).await, 4000);
    // A change to a source waiting in the backlog: its job is raised, not duplicated.
    let changed = sources[3999];
    assert_eq!(enqueue(&t.admin, &[changed]).await, 0);
    let (priority, jobs): (i32, i64) = sqlx::query_as(
        "SELECT max(priority), count(*) FROM apalis.jobs WHERE idempotency_key = $1",
    )
    .bind(format!("session:{}", changed.source_id))
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!((priority, jobs), (0, 1));
    let fresh = insert_sessions(&t.admin, user, 10, |_| 5).await;
    enqueue(&t.admin, &fresh).await;
    let w = RunningWorker::start(s).await;
    wait_drained(&t.admin, Duration::from_secs(120)).await;
    w.stop().await;
    // The 11 interactive jobs ended before most of the backlog.
    let ids: Vec<String> = fresh
        .iter()
        .chain(std::iter::once(&changed))
        .map(|s| format!("{}", s.source_id))
        .collect();
    let (last_interactive, median_bulk): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as(
            "SELECT (SELECT max(done_at) FROM apalis.jobs WHERE embed_worker.job_payload(job) ->> 'source_id' = ANY($1)),
                    (SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY done_at) FROM apalis.jobs
                      WHERE NOT embed_worker.job_payload(job) ->> 'source_id' = ANY($1))",
        )
        .bind(&ids)
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert!(
        last_interactive < median_bulk,
        "interactive done by {last_interactive}, half the backlog by {median_bulk}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_batch_retries_its_jobs_and_a_cancelled_one_releases_them() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig {
        batch_fail_first: 1,
        ..FakeConfig::default()
    })
    .await;
    insert_sessions(&t.admin, Uuid::new_v4(), 100, |i| 3 + i % 20).await;
    let s = batch_settings(&t, &fake);
    assert_eq!(backfill_stale(&t, &s).await, 100);
    let w = RunningWorker::start(s.clone()).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    let states: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT state, last_error FROM embed_worker.batches ORDER BY id")
            .fetch_all(&t.admin)
            .await
            .unwrap();
    assert_eq!(states[0].0, "failed");
    assert!(
        states[0]
            .1
            .as_deref()
            .unwrap_or_default()
            .contains("server_error"),
        "{states:?}"
    );
    assert_eq!(states[1].0, "completed");
    let (done, attempts): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'Done'), min(attempts)::int8 FROM apalis.jobs",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!((done, attempts), (100, 1), "retried once, an attempt used");

    // Cancelled by an operator while in progress: the jobs go back untouched and the lane
    // submits them again.
    // (Retries become due at jittered times: phase one may have taken more than two batches.)
    let before = fake.batches_created();
    fake.configure(|c| c.batch_delay = Duration::from_secs(3600));
    sqlx::raw_sql("DELETE FROM rag_embeddings; DELETE FROM apalis.jobs")
        .execute(&t.admin)
        .await
        .unwrap();
    assert_eq!(backfill_stale(&t, &s).await, 100);
    let w = RunningWorker::start(s.clone()).await;
    let started = Instant::now();
    let id: i64 = loop {
        let id: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM embed_worker.batches WHERE state = 'submitted' ORDER BY id DESC LIMIT 1",
        )
        .fetch_optional(&t.admin)
        .await
        .unwrap();
        if let Some(id) = id {
            break id;
        }
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let status = embed_worker::bulk::cancel(&t.admin, &s, id).await.unwrap();
    assert_eq!(status, "cancelled");
    fake.configure(|c| c.batch_delay = Duration::ZERO);
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    let state: String = sqlx::query_scalar("SELECT state FROM embed_worker.batches WHERE id = $1")
        .bind(id)
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(state, "cancelled");
    let (done, attempts): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'Done'), max(attempts)::int8 FROM apalis.jobs",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!((done, attempts), (100, 0), "released, no attempt used");
    let all: Vec<(i64, String, i32, Option<String>)> = sqlx::query_as(
        "SELECT id, state, requests, last_error FROM embed_worker.batches ORDER BY id",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(
        fake.batches_created() - before,
        2,
        "the cancelled batch and its resubmission: {all:?}"
    );
}
