//! Each model's HNSW index: native size (halfvec over 2,000 dimensions), deferred builds after a
//! backfill, repair of a killed build, names that cannot collide.

use std::time::{Duration, Instant};

use crate::helpers::*;
use embed_worker::fake_openai::FakeConfig;
use embed_worker::model_index::{self, BuildOutcome, IndexState};
use embed_worker::search::{self, SearchOptions, SearchPath};
use uuid::Uuid;

/// The stored vector of `source`'s first chunk (a query whose nearest row is known).
async fn stored_vector(t: &TestDb, source: Uuid) -> Vec<f32> {
    let v: pgvector::Vector = sqlx::query_scalar(
        "SELECT embedding FROM rag_embeddings WHERE source_id = $1 AND chunk_index = 0",
    )
    .bind(source)
    .fetch_one(&t.admin)
    .await
    .unwrap();
    v.to_vec()
}

/// The true top-`k` by a full-precision scan.
async fn exact_top(t: &TestDb, model: &str, dims: usize, q: &[f32], k: i64) -> Vec<Uuid> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT source_id FROM rag_embeddings WHERE embedding_model = $2
          ORDER BY embedding::vector({dims}) <=> $1 LIMIT {k}"
    )))
    .bind(pgvector::Vector::from(q.to_vec()))
    .bind(model)
    .fetch_all(&t.admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn text_embedding_3_large_at_3072_dimensions_migrates_embeds_and_searches_through_its_index()
{
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    let mut s = worker_settings(&t, &fake);
    s.model.name = "text-embedding-3-large".into();
    s.model.dimensions = 3072;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 60, |i| 5 + i % 30).await;
    // `migrate`'s index step: 60 sources are below index.defer_min_sources, so it builds now.
    let outcome = model_index::build::on_migrate(&t.admin, &s).await.unwrap();
    let BuildOutcome::Built(name, _) = outcome else {
        panic!("{outcome:?}")
    };
    let spec = model_index::IndexSpec::from_settings(&s).unwrap();
    assert!(spec.half && name == spec.name(), "{name}");
    enqueue(&t.admin, &sources).await;
    let w = RunningWorker::start(s.clone()).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    let rows: i64 = count(
        &t.admin,
        "SELECT count(*) FROM rag_embeddings WHERE embedding_model = 'text-embedding-3-large' AND dimensions = 3072",
    )
    .await;
    assert_eq!(rows, 60);

    let report = embed_worker::verify::verify(&t.admin, &s).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let ix = report.indexes.iter().find(|i| i.name == name).unwrap();
    assert_eq!(
        model_index::stored_type(ix).as_deref(),
        Some("halfvec(3072)")
    );
    assert!(format!("{report}").contains("halfvec(3072)"));

    let target = sources[17].source_id;
    let q = stored_vector(&t, target).await;
    let plan = explain(&t.admin, &spec, q.clone(), true).await.unwrap();
    assert!(plan.contains(&name), "{plan}");
    let found = search::search(&t.admin, &spec, q, &SearchOptions::default())
        .await
        .unwrap();
    assert_eq!(found.path, SearchPath::Index(name));
    assert_eq!(found.hits.len(), 5);
    assert_eq!(found.hits[0].source_id, target);
    assert!(found.hits[0].distance < 1e-3, "{:?}", found.hits[0]);
}

#[tokio::test]
async fn over_4000_dimensions_migrate_fails_before_writing_anything() {
    let t = TestDb::empty().await;
    let out = worker_command(&t, "http://127.0.0.1:9")
        .arg("migrate")
        .env("EMBED_WORKER__MODEL__DIMENSIONS", "4096")
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("model.dimensions = 4096") && err.contains("4,000"),
        "{err}"
    );
    let tables: i64 = count(
        &t.admin,
        "SELECT count(*) FROM pg_class WHERE relname IN ('rag_embeddings', 'jobs')",
    )
    .await;
    assert_eq!(tables, 0, "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_switch_is_written_without_its_index_and_indexed_once_the_queue_drains() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 300, |i| 5 + i % 40).await;
    let mut b = worker_settings(&t, &fake);
    b.model.name = "text-embedding-3-small".into();
    b.model.dimensions = 256;
    b.model.send_dimensions = true;
    b.index.defer_min_sources = 100;
    let spec = model_index::IndexSpec::from_settings(&b).unwrap();

    // migrate: the new model has no rows and 300 sources ahead: no index yet.
    model_index::lifecycle::on_migrate(&mut t.admin.acquire().await.unwrap(), &spec)
        .await
        .unwrap();
    let outcome = model_index::build::on_migrate(&t.admin, &b).await.unwrap();
    assert!(matches!(outcome, BuildOutcome::Deferred(_)), "{outcome:?}");
    assert_eq!(
        model_index::state(&t.admin, &spec).await.unwrap(),
        IndexState::Missing
    );
    let report = embed_worker::verify::verify(&t.admin, &b).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(
        report.notes.iter().any(|n| n.contains("not built yet")),
        "{:?}",
        report.notes
    );

    // Half the backfill with a worker that does not build: rows without an index.
    let mut slow = b.clone();
    slow.index.auto_build = false;
    enqueue(&t.admin, &sources[..150]).await;
    let w = RunningWorker::start(slow).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    assert_eq!(
        model_index::state(&t.admin, &spec).await.unwrap(),
        IndexState::Missing
    );
    let q = stored_vector(&t, sources[3].source_id).await;
    let found = search::search(&t.admin, &spec, q.clone(), &SearchOptions::default())
        .await
        .unwrap();
    assert!(
        matches!(found.path, SearchPath::ExactNoIndex(_)),
        "{:?}",
        found.path
    );
    let ids: Vec<Uuid> = found.hits.iter().map(|h| h.source_id).collect();
    assert_eq!(
        ids,
        exact_top(&t, &spec.model, 256, &q, 5).await,
        "exact while unindexed"
    );

    // The rest, with the shipped builder cadence shortened: no index while jobs are open, one
    // build once they are done.
    b.index.check_interval_secs = 1;
    enqueue(&t.admin, &sources[150..]).await;
    let w = RunningWorker::start(b.clone()).await;
    let started = Instant::now();
    let name = loop {
        let state = model_index::state(&t.admin, &spec).await.unwrap();
        let open = embed_worker::queue::open_jobs(&t.admin, "embed")
            .await
            .unwrap();
        if let IndexState::Ready(name) = state {
            assert_eq!(open, 0, "the index was built while {open} jobs were open");
            break name;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let oid: i64 = sqlx::query_scalar("SELECT $1::regclass::oid::int8")
        .bind(&name)
        .fetch_one(&t.admin)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.stop().await;
    let again: i64 = sqlx::query_scalar("SELECT $1::regclass::oid::int8")
        .bind(&name)
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(oid, again, "built once, not rebuilt");
    let rows: i64 = count(
        &t.admin,
        "SELECT count(*) FROM rag_embeddings WHERE embedding_model = 'text-embedding-3-small'",
    )
    .await;
    assert_eq!(rows, 300);

    let plan = explain(&t.admin, &spec, q.clone(), true).await.unwrap();
    assert!(plan.contains(&name), "{plan}");
    let found = search::search(&t.admin, &spec, q, &SearchOptions::default())
        .await
        .unwrap();
    assert_eq!(found.path, SearchPath::Index(name));
    assert_eq!(found.hits[0].source_id, sources[3].source_id);
    let report = embed_worker::verify::verify(&t.admin, &b).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_build_killed_midway_leaves_a_leftover_that_the_next_build_replaces() {
    let t = TestDb::migrated().await;
    let mut s = t.settings();
    s.model.name = "text-embedding-3-large".into();
    s.model.dimensions = 3072;
    let spec = model_index::IndexSpec::from_settings(&s).unwrap();
    // 6,000 rows of random 3,072-d vectors: a build of several seconds.
    model_index::lifecycle::on_migrate(&mut t.admin.acquire().await.unwrap(), &spec)
        .await
        .unwrap();
    sqlx::raw_sql(
        "INSERT INTO sessions (id, user_id, title, notes)
           SELECT gen_random_uuid(), gen_random_uuid(), 's', 'n' FROM generate_series(1, 6000);
         INSERT INTO rag_embeddings (source_type, source_id, chunk_index, content_hash, embedding,
                                     embedding_model, dimensions, token_count)
           SELECT 'session', s.id, 0, 'h',
                  (SELECT array_agg(random() - 0.5) FROM generate_series(1, 3072) WHERE s.id IS NOT NULL)::vector,
                  'text-embedding-3-large', 3072, 10
             FROM sessions s",
    )
    .execute(&t.admin)
    .await
    .unwrap();
    let mut child = worker_command(&t, "http://127.0.0.1:9")
        .args(["models", "build-index"])
        .env("EMBED_WORKER__MODEL__NAME", "text-embedding-3-large")
        .env("EMBED_WORKER__MODEL__DIMENSIONS", "3072")
        .env("EMBED_WORKER__INDEX__BUILD_PARALLEL_WORKERS", "0")
        .spawn()
        .unwrap();
    // Killed once the graph is being loaded.
    let started = Instant::now();
    loop {
        let phase: Option<String> = sqlx::query_scalar(
            "SELECT phase FROM pg_stat_progress_create_index
              WHERE relid = to_regclass($1) AND tuples_done > 0",
        )
        .bind(model_index::partition_name("text-embedding-3-large"))
        .fetch_optional(&t.admin)
        .await
        .unwrap();
        if phase.is_some() {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the build ended before it could be killed"
        );
        assert!(started.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While it runs, the build is a build, not a failure (a CronJob's `verify` must pass), as
    // the worker's login sees it too (it cannot read the building login's progress).
    assert_eq!(
        model_index::state(&t.admin, &spec).await.unwrap(),
        IndexState::Building(spec.name())
    );
    let worker = t.worker_pool().await;
    assert_eq!(
        model_index::state(&worker, &spec).await.unwrap(),
        IndexState::Building(spec.name())
    );
    let report = embed_worker::verify::verify(&t.admin, &s).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(
        report.notes.iter().any(|n| n.contains("being built now")),
        "{:?}",
        report.notes
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // The backend notices its client is gone (client_connection_check_interval) and stops.
    let started = Instant::now();
    while count(
        &t.admin,
        "SELECT count(*) FROM pg_stat_progress_create_index",
    )
    .await
        > 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the killed build kept running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        model_index::state(&t.admin, &spec).await.unwrap(),
        IndexState::Invalid(spec.name())
    );
    let report = embed_worker::verify::verify(&t.admin, &s).await.unwrap();
    assert!(
        report.problems.iter().any(|p| p.contains("INVALID")),
        "{:?}",
        report.problems
    );
    let found = search::search(&t.admin, &spec, vec![0.1; 3072], &SearchOptions::default())
        .await
        .unwrap();
    assert!(
        found
            .path
            .to_string()
            .contains("is invalid (a build that died"),
        "{}",
        found.path
    );

    // The next build (here `migrate`'s) drops the leftover and builds it whole.
    let outcome = model_index::build::on_migrate(&t.admin, &s).await.unwrap();
    assert!(matches!(outcome, BuildOutcome::Built(..)), "{outcome:?}");
    assert_eq!(
        model_index::state(&t.admin, &spec).await.unwrap(),
        IndexState::Ready(spec.name())
    );
    let report = embed_worker::verify::verify(&t.admin, &s).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let of_model = embed_worker::model_index::vector_indexes(&t.admin)
        .await
        .unwrap()
        .into_iter()
        .filter(|ix| model_index::of_model(ix, &spec.model))
        .count();
    assert_eq!(of_model, 1);
}

#[tokio::test]
async fn two_models_sharing_a_60_character_prefix_get_two_indexes() {
    let t = TestDb::migrated().await;
    let stem = "azure-openai-deployment-for-the-practice-coaching-app-embeddi";
    assert_eq!(stem.len(), 61);
    let east = spec(&format!("{stem}-east"), 8);
    let west = spec(&format!("{stem}-west"), 8);
    assert_ne!(east.name(), west.name());
    build_index(&t, &east.model, 8).await;
    build_index(&t, &west.model, 8).await;
    let all = embed_worker::model_index::vector_indexes(&t.admin)
        .await
        .unwrap();
    for s in [&east, &west] {
        assert_eq!(
            model_index::find(&all, s),
            IndexState::Ready(s.name()),
            "{}",
            s.model
        );
        let plan = explain(&t.admin, s, vec![0.5; 8], true).await.unwrap();
        assert!(plan.contains(&s.name()), "{plan}");
    }
    let st = model_index::status(&t.admin, &east).await.unwrap();
    let line = format!("{}", model_index::StatusTable(st));
    assert!(
        line.contains(&east.name()) && line.contains("vector(8) (valid)"),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_during_a_deferred_backfill_leaves_the_index_to_the_drained_queue() {
    let t = TestDb::migrated().await;
    let mut s = t.settings();
    s.model.name = "text-embedding-3-small".into();
    s.model.dimensions = 8;
    s.index.defer_min_sources = 10;
    let spec = model_index::IndexSpec::from_settings(&s).unwrap();
    // Half a backfill: rows of the new model written, jobs still open.
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 40, |_| 5).await;
    register(&t, &s.model.name, 8).await;
    sqlx::query(
        "INSERT INTO rag_embeddings (source_type, source_id, chunk_index, content_hash, embedding,
                                     embedding_model, dimensions, token_count)
         SELECT 'session', id, 0, 'h', '[1,0,0,0,0,0,0,1]', 'text-embedding-3-small', 8, 5
           FROM sessions LIMIT 20",
    )
    .execute(&t.admin)
    .await
    .unwrap();
    // The inserts' captured changes count as open work too: this setup states the queue itself.
    sqlx::raw_sql("DELETE FROM apalis.jobs; DELETE FROM embed_worker.captured")
        .execute(&t.admin)
        .await
        .unwrap();
    enqueue(&t.admin, &sources[20..]).await;
    let outcome = model_index::build::on_migrate(&t.admin, &s).await.unwrap();
    assert!(
        matches!(&outcome, BuildOutcome::Deferred(why) if why.contains("20 jobs open, 20 of 40 sources")),
        "{outcome:?}"
    );
    assert_eq!(
        model_index::state(&t.admin, &spec).await.unwrap(),
        IndexState::Missing
    );
    // Drained: the next migrate (or the worker's builder) builds it.
    sqlx::query("DELETE FROM apalis.jobs")
        .execute(&t.admin)
        .await
        .unwrap();
    let outcome = model_index::build::on_migrate(&t.admin, &s).await.unwrap();
    assert!(matches!(outcome, BuildOutcome::Built(..)), "{outcome:?}");
}
