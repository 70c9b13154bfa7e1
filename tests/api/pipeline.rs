//! The worker end to end: apalis queue → batches → token counts → fake OpenAI → bulk write.

use std::time::Duration;

use crate::helpers::*;
use embed_worker::fake_openai::FakeConfig;
use embed_worker::pipeline::chunk::count_tokens;
use embed_worker::source::{EmbedSource, SourceType};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_mixed_sources_are_embedded_in_a_handful_of_requests() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    seed_templates(&t.admin).await;
    let mut sources = insert_sessions(&t.admin, Uuid::new_v4(), 980, |i| 5 + (i * 13) % 400).await;
    sources.extend(template_sources(&t.admin).await);
    assert_eq!(sources.len(), 1000);
    let worker_pool = t.worker_pool().await;
    // Change capture queued every insert already; enqueueing again (as the worker role) adds no duplicate.
    assert_eq!(enqueue(&worker_pool, &sources).await, 0);
    assert_eq!(
        embed_worker::queue::open_jobs(&t.admin, "embed")
            .await
            .unwrap(),
        1000
    );

    // Batches as large as the request limits allow: this test is about packing many sources
    // into few requests. (The default, 128 per batch for memory, would make 8 requests here.)
    let mut settings = worker_settings(&t, &fake);
    settings.batch.max_jobs = 1024;
    let w = RunningWorker::start(settings).await;
    wait_drained(&t.admin, Duration::from_secs(120)).await;
    w.stop().await;

    let (sources_covered, rows, missing_meta): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(DISTINCT (source_type, source_id)), count(*),
                count(*) FILTER (WHERE embedding_model IS NULL OR dimensions <> 1536 OR token_count <= 0)
           FROM rag_embeddings",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!(sources_covered, 1000);
    assert_eq!(rows, 1000, "no text is long enough to split");
    assert_eq!(missing_meta, 0);
    let requests = fake.requests();
    assert!(requests.iter().all(|r| r.status == 200), "{requests:?}");
    assert!(
        requests.len() <= 6,
        "batching: {} requests for 1,000 sources",
        requests.len()
    );
    let stored_tokens: i64 =
        sqlx::query_scalar("SELECT sum(token_count)::bigint FROM rag_embeddings")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(stored_tokens as u64, fake.tokens_billed());
    let done: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE status = 'Done'")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(done, 1000);
    eprintln!("1,000 sources: {} API requests", requests.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_transcript_is_split_into_chunks_under_the_limit() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    let transcript = (0..3000)
        .map(|i| {
            format!("In bar {i} the left hand walks a tenth while the right plays a shell voicing.")
        })
        .collect::<Vec<_>>()
        .join(" ");
    let tokens = count_tokens(&transcript);
    assert!(tokens > 30_000, "{tokens}");
    let id: Uuid = sqlx::query_scalar(
        "INSERT INTO sessions (user_id, title, transcript) VALUES ($1, 'long', $2) RETURNING id",
    )
    .bind(Uuid::new_v4())
    .bind(&transcript)
    .fetch_one(&t.admin)
    .await
    .unwrap();
    enqueue(
        &t.admin,
        &[EmbedSource {
            source_type: SourceType::Session,
            source_id: id,
        }],
    )
    .await;
    let w = RunningWorker::start(worker_settings(&t, &fake)).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;

    let chunks: Vec<(i32, i32)> = sqlx::query_as("SELECT chunk_index, token_count FROM rag_embeddings WHERE source_id = $1 ORDER BY chunk_index")
        .bind(id)
        .fetch_all(&t.admin)
        .await
        .unwrap();
    assert!(chunks.len() >= 4, "{} chunks", chunks.len());
    for (i, (idx, n)) in chunks.iter().enumerate() {
        assert_eq!(*idx as usize, i);
        assert!(*n <= 8191 && *n > 0, "chunk {idx} has {n} tokens");
    }
    assert!(
        fake.requests().iter().all(|r| r.status == 200),
        "none rejected by the fake"
    );
}

/// Rows of one source as (chunk_index, content_hash).
async fn chunks_of(pool: &sqlx::PgPool, id: Uuid) -> Vec<(i32, String)> {
    sqlx::query_as("SELECT chunk_index, content_hash FROM rag_embeddings WHERE source_id = $1 ORDER BY chunk_index")
        .bind(id)
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unchanged_text_costs_nothing_and_changed_text_is_re_embedded() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    let mut settings = worker_settings(&t, &fake);
    settings.model.max_input_tokens = 200; // so a long note makes several chunks
    settings.model.chunk_overlap_tokens = 20;
    let long_notes = (0..200)
        .map(|i| format!("Exercise {i}: play the scale slowly."))
        .collect::<Vec<_>>()
        .join(" ");
    let id = insert_session(&t.admin, Uuid::new_v4(), "scales", &long_notes).await;
    let src = [EmbedSource {
        source_type: SourceType::Session,
        source_id: id,
    }];
    let w = RunningWorker::start(settings.clone()).await;

    enqueue(&t.admin, &src).await;
    wait_drained(&t.admin, Duration::from_secs(30)).await;
    let first = chunks_of(&t.admin, id).await;
    assert!(first.len() > 3, "{}", first.len());
    let calls = fake.requests().len();

    enqueue(&t.admin, &src).await;
    wait_drained(&t.admin, Duration::from_secs(30)).await;
    assert_eq!(fake.requests().len(), calls, "unchanged text: no API call");
    assert_eq!(chunks_of(&t.admin, id).await, first);
    let saved = w
        .worker
        .pipeline
        .stats
        .tokens_saved
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(saved > 0);

    sqlx::query("UPDATE sessions SET notes = 'Now only a short note about arpeggios.', updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(&t.admin)
        .await
        .unwrap();
    enqueue(&t.admin, &src).await;
    wait_drained(&t.admin, Duration::from_secs(30)).await;
    w.stop().await;
    let after = chunks_of(&t.admin, id).await;
    assert_eq!(after.len(), 1, "stale chunks are gone");
    assert_ne!(after[0].1, first[0].1);
    assert_eq!(fake.requests().len(), calls + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_sources_on_two_workers_leave_one_consistent_set() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig {
        latency: Duration::from_millis(50),
        ..FakeConfig::default()
    })
    .await;
    let mut settings = worker_settings(&t, &fake);
    settings.model.max_input_tokens = 100;
    settings.model.chunk_overlap_tokens = 10;
    settings.batch.max_jobs = 16;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 40, |i| 50 + i * 5).await;
    // Two jobs per source, bypassing the pending-job dedup as two racing enqueuers could.
    for _ in 0..3 {
        enqueue(&t.admin, &sources).await;
        sqlx::query("UPDATE apalis.jobs SET idempotency_key = NULL")
            .execute(&t.admin)
            .await
            .unwrap();
    }
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(jobs, 120);
    let a = RunningWorker::start(settings.clone()).await;
    let b = RunningWorker::start(settings.clone()).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    a.stop().await;
    b.stop().await;

    let chunker = embed_worker::pipeline::chunk::Chunker::new(100, 10).unwrap();
    for s in &sources {
        let rows = chunks_of(&t.admin, s.source_id).await;
        let loaded = embed_worker::pipeline::load::load(&t.admin, &settings.render, &[*s])
            .await
            .unwrap();
        let want: Vec<(i32, String)> = chunker
            .chunks(
                &loaded[s].text,
                &settings.model.name,
                settings.model.dimensions,
            )
            .into_iter()
            .map(|c| (c.index as i32, c.content_hash))
            .collect();
        assert_eq!(rows, want, "source {}", s.source_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_over_the_request_caps_are_split_into_valid_requests() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    let mut settings = worker_settings(&t, &fake);
    settings.batch.max_jobs = 3000;
    settings.batch.linger_ms = 2000;
    settings.queue.fetch_batch = 3000;
    // 2,500 tiny sources: more inputs than one request may hold.
    let mut sources = insert_sessions(&t.admin, Uuid::new_v4(), 2500, |_| 2).await;
    // 45 sources of ~7,500 tokens: more tokens than one request may hold.
    let big = (0..1900)
        .map(|i| format!("note{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    for i in 0..45 {
        let id = insert_session(
            &t.admin,
            Uuid::new_v4(),
            &format!("big {i}"),
            &format!("{i} {big}"),
        )
        .await;
        sources.push(EmbedSource {
            source_type: SourceType::Session,
            source_id: id,
        });
    }
    enqueue(&t.admin, &sources).await;
    let w = RunningWorker::start(settings).await;
    wait_drained(&t.admin, Duration::from_secs(120)).await;
    w.stop().await;
    let reqs = fake.requests();
    assert!(
        reqs.iter().all(|r| r.status == 200),
        "every request valid: {:?}",
        reqs.iter().filter(|r| r.status != 200).collect::<Vec<_>>()
    );
    assert!(reqs.iter().all(|r| r.inputs <= 2048));
    assert!(reqs.iter().all(|r| r.tokens <= 300_000));
    assert!(
        reqs.iter().any(|r| r.inputs > 1000),
        "large requests were used"
    );
    let covered: i64 = sqlx::query_scalar("SELECT count(DISTINCT source_id) FROM rag_embeddings")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(covered, 2545);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_deleted_before_its_job_runs_completes_as_gone() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 3, |_| 10).await;
    enqueue(&t.admin, &sources).await;
    sqlx::query("DELETE FROM sessions WHERE id = $1")
        .bind(sources[0].source_id)
        .execute(&t.admin)
        .await
        .unwrap();
    let w = RunningWorker::start(worker_settings(&t, &fake)).await;
    wait_drained(&t.admin, Duration::from_secs(30)).await;
    w.stop().await;
    let states: Vec<(String, Option<serde_json::Value>)> =
        sqlx::query_as("SELECT status, last_result FROM embed_worker.jobs WHERE source_id = $1")
            .bind(sources[0].source_id.to_string())
            .fetch_all(&t.admin)
            .await
            .unwrap();
    assert_eq!(states.len(), 1);
    assert_eq!(states[0].0, "Done");
    assert!(
        states[0]
            .1
            .as_ref()
            .unwrap()
            .to_string()
            .contains("source gone"),
        "{:?}",
        states[0].1
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rag_embeddings")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(rows, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_chunks_are_sent_and_billed_once() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig::default()).await;
    let user = Uuid::new_v4();
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(insert_session(&t.admin, user, "Scales", "the same notes, pasted again").await);
    }
    ids.push(insert_session(&t.admin, user, "Arpeggios", "something else entirely").await);
    enqueue(&t.admin, &session_sources(&ids)).await;
    let mut s = worker_settings(&t, &fake);
    s.batch.linger_ms = 2000; // all eleven in one batch
    let w = RunningWorker::start(s).await;
    wait_drained(&t.admin, Duration::from_secs(30)).await;
    w.stop().await;
    let inputs: usize = fake.requests().iter().map(|r| r.inputs).sum();
    assert_eq!(inputs, 2, "ten identical texts sent once, plus the other");
    let (rows, vectors): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT embedding::text) FROM rag_embeddings")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(
        (rows, vectors),
        (11, 2),
        "every source written, the ten with one vector"
    );
}
