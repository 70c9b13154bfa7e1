//! The model lifecycle (issue 21): a switch under four worker processes with searches running,
//! the move from the single table to one partition per model, what the app role may read of the
//! registry, and pruning by detaching a partition.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::helpers::*;
use embed_worker::fake_openai::{FakeConfig, fake_vector};
use embed_worker::freshness::{self, Scope};
use embed_worker::model_index::{self, lifecycle};
use embed_worker::search::{self, SearchOptions, SearchPath};
use uuid::Uuid;

const OLD: &str = "text-embedding-ada-002";
const NEW: &str = "text-embedding-3-small";
const NEW_DIMS: usize = 512;

/// Rows of `model`.
async fn rows_of(t: &TestDb, model: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM rag_embeddings WHERE embedding_model = $1")
        .bind(model)
        .fetch_one(&t.admin)
        .await
        .unwrap()
}

/// The content hash `model` stores for a session's first chunk.
async fn stored_hash(t: &TestDb, model: &str, id: Uuid) -> String {
    sqlx::query_scalar(
        "SELECT content_hash FROM rag_embeddings
          WHERE embedding_model = $1 AND source_id = $2 AND chunk_index = 0",
    )
    .bind(model)
    .bind(id)
    .fetch_one(&t.admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_20000_source_switch_under_four_workers_serves_from_an_index_and_flips_once() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    let n = 20_000;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), n, |i| 3 + i % 20).await;

    // Before: ada-002 covers every source and serves through its index (loaded without it,
    // then built, as a first backfill is).
    drop_default_index(&t).await;
    let mut a = worker_settings(&t, &fake);
    a.model.name = OLD.into();
    a.model.dimensions = 1536;
    // The index is built below by the test, not by this worker (a build it started as the
    // queue drained would hold the build lock past its stop: `Busy`).
    a.index.auto_build = false;
    let w = RunningWorker::start(a.clone()).await;
    backfill_stale(&t, &a).await;
    wait_drained(&t.admin, Duration::from_secs(120)).await;
    w.stop().await;
    build_index(&t, OLD, 1536).await;
    sqlx::query("ANALYZE rag_embeddings")
        .execute(&t.admin)
        .await
        .unwrap();
    assert_eq!(rows_of(&t, OLD).await, n as i64);
    assert_eq!(
        lifecycle::serving(&t.admin).await.unwrap().unwrap().name,
        OLD
    );

    // The switch: `migrate` with the new model (writing; its index deferred), then `backfill`.
    let mut b = a.clone();
    b.model.name = NEW.into();
    b.model.dimensions = NEW_DIMS;
    b.model.send_dimensions = true;
    let new = spec(NEW, NEW_DIMS);
    lifecycle::on_migrate(&mut t.admin.acquire().await.unwrap(), &new)
        .await
        .unwrap();
    let outcome = model_index::build::on_migrate(&t.admin, &b).await.unwrap();
    assert!(
        matches!(outcome, model_index::BuildOutcome::Deferred(_)),
        "{outcome:?}"
    );
    assert_eq!(backfill_stale(&t, &b).await, n as i64);

    // Searches every 100 ms while it runs, each recording which model answered and how.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let pool = t.admin.clone();
    let searcher = tokio::spawn(async move {
        let mut seen: Vec<(String, usize, String, String)> = Vec::new();
        loop {
            let spec = lifecycle::serving_spec(&pool).await.unwrap();
            let q = fake_vector("Practice 42 scale5 arpeggio3", spec.dimensions);
            let found = search::search_serving(&pool, q.clone(), &SearchOptions::default())
                .await
                .unwrap();
            let plan = explain(&pool, &spec, q, false).await.unwrap();
            let path = match found.path {
                SearchPath::Index(name) => name,
                other => format!("not through an index: {other}"),
            };
            seen.push((spec.model.clone(), found.hits.len(), path, plan));
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop_rx.wait_for(|v| *v) => return seen,
            }
        }
    });

    let logs = std::env::temp_dir().join(format!("lifecycle-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&logs).unwrap();
    let mut workers = Reaper(
        (0..4)
            .map(|i| {
                worker_command(&t, &fake.base_url())
                    .env_remove("EMBED_WORKER__BATCH__MAX_JOBS")
                    .env_remove("EMBED_WORKER__BATCH__MAX_IN_FLIGHT")
                    .env_remove("EMBED_WORKER__QUEUE__FETCH_BATCH")
                    .env_remove("EMBED_WORKER__QUEUE__CONCURRENCY")
                    .env("EMBED_WORKER__MODEL__NAME", NEW)
                    .env("EMBED_WORKER__MODEL__DIMENSIONS", NEW_DIMS.to_string())
                    .env("EMBED_WORKER__MODEL__SEND_DIMENSIONS", "true")
                    .env("EMBED_WORKER__INDEX__CHECK_INTERVAL_SECS", "1")
                    .stderr(std::fs::File::create(logs.join(format!("w{i}.log"))).unwrap())
                    .arg("run")
                    .spawn()
                    .unwrap()
            })
            .collect(),
    );

    // Mid-switch, a source the new model has already embedded is edited.
    let started = Instant::now();
    while rows_of(&t, NEW).await < 2_000 {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "backfill stalled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let edited: Uuid = sqlx::query_scalar(
        "SELECT source_id FROM rag_embeddings WHERE embedding_model = $1 ORDER BY id LIMIT 1",
    )
    .bind(NEW)
    .fetch_one(&t.admin)
    .await
    .unwrap();
    let old_hash = stored_hash(&t, OLD, edited).await;
    sqlx::query(
        "UPDATE sessions SET notes = 'rewritten mid-switch: slow chromatic scales' WHERE id = $1",
    )
    .bind(edited)
    .execute(&t.admin)
    .await
    .unwrap();
    assert!(
        lifecycle::serving(&t.admin).await.unwrap().unwrap().name == OLD,
        "still serving the old model mid-switch"
    );

    // The workers drain, build the new index and promote it by themselves.
    while lifecycle::serving(&t.admin).await.unwrap().unwrap().name != NEW {
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "no promotion: {:?}",
            model_index::status(&t.admin, &new).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_tx.send(true).unwrap();
    let seen = searcher.await.unwrap();
    for w in &workers.0 {
        Command::new("kill")
            .args(["-TERM", &w.id().to_string()])
            .status()
            .unwrap();
    }
    for w in &mut workers.0 {
        assert!(w.wait().unwrap().success());
    }

    // Every search during the switch: k hits from the serving model's index, never a scan.
    assert!(seen.len() > 20, "{} searches", seen.len());
    for (model, hits, path, plan) in &seen {
        let name = spec(model, if model == OLD { 1536 } else { NEW_DIMS }).name();
        assert_eq!(*hits, 5, "{model}: {path}");
        assert_eq!(path, &name, "{model}");
        assert!(
            plan.contains(&format!("Index Scan using {name}")),
            "{model}: {plan}"
        );
    }
    // The serving model flipped once, old to new, at 100% coverage.
    let flips = seen.windows(2).filter(|w| w[0].0 != w[1].0).count();
    assert_eq!((seen[0].0.as_str(), flips), (OLD, 1));
    let history: Vec<(String, String, Option<f64>)> = sqlx::query_as(
        "SELECT model::text, how, coverage FROM embed_worker.model_promotions ORDER BY id",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(history.len(), 2, "{history:?}");
    assert_eq!(
        (history[0].0.as_str(), history[0].1.as_str()),
        (OLD, "install")
    );
    assert_eq!(
        (history[1].0.as_str(), history[1].1.as_str(), history[1].2),
        (NEW, "auto", Some(1.0))
    );
    assert!(matches!(
        model_index::state(&t.admin, &new).await.unwrap(),
        model_index::IndexState::Ready(_)
    ));

    // The edited source is fresh in both models: the old one was written too (dual-write).
    assert_ne!(stored_hash(&t, OLD, edited).await, old_hash);
    for model in [OLD, NEW] {
        let stale = freshness::find_stale(&t.admin, model, &Scope::default())
            .await
            .unwrap();
        assert!(
            stale.is_empty(),
            "{model}: {} stale, e.g. {:?}",
            stale.len(),
            stale.first()
        );
        assert_eq!(rows_of(&t, model).await, n as i64, "{model}");
    }
    assert_eq!(sources.len(), n);
    // The workers' logs: no error.
    for i in 0..4 {
        let log = std::fs::read_to_string(logs.join(format!("w{i}.log"))).unwrap();
        assert!(!log.contains("ERROR"), "worker {i}: {log}");
    }
    let _ = std::fs::remove_dir_all(&logs);
}

#[tokio::test]
async fn migration_from_the_single_table_keeps_rows_rls_trigger_grants_and_verify_clean() {
    let t = TestDb::empty().await;
    // The schema as it was before migration 13.
    let before = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            embed_worker::db::MIGRATOR
                .migrations
                .iter()
                .filter(|m| m.version < 20261129000013)
                .cloned()
                .collect(),
        ),
        ignore_missing: false,
        locking: true,
        no_tx: false,
        table_name: embed_worker::db::MIGRATOR.table_name.clone(),
        create_schemas: embed_worker::db::MIGRATOR.create_schemas.clone(),
    };
    apalis_postgres::PostgresStorage::setup(&t.admin)
        .await
        .unwrap();
    let mut conn = t.admin.acquire().await.unwrap();
    sqlx::raw_sql("SET embed_worker.creating_sessions = on")
        .execute(&mut *conn)
        .await
        .unwrap();
    before.run(&mut *conn).await.unwrap();
    drop(conn);
    let kind: String = sqlx::query_scalar(
        "SELECT relkind::text FROM pg_class WHERE oid = 'rag_embeddings'::regclass",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!(kind, "r");

    // Two users' sessions embedded by two models, each with its partial HNSW index as before.
    let (ua, ub) = (Uuid::new_v4(), Uuid::new_v4());
    let sa = insert_sessions(&t.admin, ua, 30, |_| 4).await;
    let sb = insert_sessions(&t.admin, ub, 20, |_| 4).await;
    sqlx::raw_sql(
        "INSERT INTO rag_embeddings (source_type, source_id, chunk_index, content_hash, embedding,
                                     embedding_model, dimensions, token_count)
         SELECT 'session', id, c, md5(id::text || c), ARRAY[random(), random(), random(), 1]::vector,
                'text-embedding-3-small', 4, 7
           FROM sessions, generate_series(0, 1) c;
         INSERT INTO rag_embeddings (source_type, source_id, chunk_index, content_hash, embedding,
                                     embedding_model, dimensions, token_count)
         SELECT 'session', id, 0, md5(id::text), ARRAY[1, random(), random()]::vector, 'legacy-model', 3, 5
           FROM sessions LIMIT 10;
         CREATE INDEX idx_small_by_hand ON rag_embeddings
             USING hnsw ((embedding::vector(4)) vector_cosine_ops) WITH (m = 16, ef_construction = 64)
             WHERE embedding_model = 'text-embedding-3-small';
         CREATE INDEX idx_legacy_half ON rag_embeddings
             USING hnsw ((embedding::halfvec(3)) halfvec_cosine_ops) WITH (m = 16, ef_construction = 64)
             WHERE embedding_model = 'legacy-model';",
    )
    .execute(&t.admin)
    .await
    .unwrap();
    let snapshot = "SELECT md5(string_agg(id || source_id::text || chunk_index || content_hash
                                         || embedding::text || embedding_model || dimensions
                                         || token_count || created_at || updated_at, ',' ORDER BY id))
                      FROM rag_embeddings";
    let before_rows: String = sqlx::query_scalar(snapshot)
        .fetch_one(&t.admin)
        .await
        .unwrap();
    let max_id: i64 = sqlx::query_scalar("SELECT max(id) FROM rag_embeddings")
        .fetch_one(&t.admin)
        .await
        .unwrap();

    // `migrate` with the configured model text-embedding-3-small at 4 dimensions.
    embed_worker::db::migrate(&t.admin).await.unwrap();
    let mut s = t.settings();
    s.model.name = "text-embedding-3-small".into();
    s.model.dimensions = 4;
    let said = lifecycle::on_migrate(
        &mut t.admin.acquire().await.unwrap(),
        &spec("text-embedding-3-small", 4),
    )
    .await
    .unwrap();
    assert!(
        said.contains("serving model text-embedding-3-small"),
        "{said}"
    );
    model_index::build::on_migrate(&t.admin, &s).await.unwrap();

    // Every row kept, byte for byte, each in its model's partition; new ids continue.
    let kind: String = sqlx::query_scalar(
        "SELECT relkind::text FROM pg_class WHERE oid = 'rag_embeddings'::regclass",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!(kind, "p");
    let after_rows: String = sqlx::query_scalar(snapshot)
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(after_rows, before_rows);
    let per_partition: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tableoid::regclass::text, count(*) FROM rag_embeddings GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(
        per_partition,
        vec![
            (model_index::partition_name("legacy-model"), 10),
            (model_index::partition_name("text-embedding-3-small"), 100),
        ]
    );
    // The hand-made partial indexes are on the partitions now, without the predicate.
    let all = model_index::vector_indexes(&t.admin).await.unwrap();
    let small = all.iter().find(|i| i.name == "idx_small_by_hand").unwrap();
    assert!(
        small.valid && !small.definition.contains("WHERE"),
        "{}",
        small.definition
    );
    assert_eq!(
        small.table,
        model_index::partition_name("text-embedding-3-small")
    );
    assert!(spec("text-embedding-3-small", 4).matches(small));
    let legacy = lifecycle::models(&t.admin).await.unwrap();
    let legacy = legacy.iter().find(|m| m.name == "legacy-model").unwrap();
    assert_eq!(
        (legacy.index_type.as_str(), legacy.role()),
        ("halfvec", "retired")
    );

    // The orphan trigger, RLS and the grants hold on the new table.
    let worker = t.worker_pool().await;
    let err = sqlx::query(
        "INSERT INTO rag_embeddings (source_type, source_id, content_hash, embedding, embedding_model, dimensions, token_count)
         VALUES ('session', $1, 'h', '[1,0,0,0]', 'text-embedding-3-small', 4, 1)",
    )
    .bind(Uuid::new_v4())
    .execute(&worker)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO rag_embeddings (source_type, source_id, chunk_index, content_hash, embedding, embedding_model, dimensions, token_count)
         VALUES ('session', $1, 5, 'h', '[1,0,0,0]', 'text-embedding-3-small', 4, 1) RETURNING id",
    )
    .bind(sa[0].source_id)
    .fetch_one(&worker)
    .await
    .unwrap();
    assert!(id > max_id, "{id} after {max_id}");
    for (user, mine, theirs) in [(ua, &sa, &sb), (ub, &sb, &sa)] {
        let mut tx = app_user_tx(&t, user).await;
        let seen: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT source_id FROM rag_embeddings")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        assert_eq!(seen.len(), mine.len());
        assert!(
            seen.iter()
                .all(|id| !theirs.iter().any(|s| s.source_id == *id))
        );
        // A partition read directly: no privilege.
        let direct = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT 1 FROM {}",
            model_index::partition_name("text-embedding-3-small")
        )))
        .execute(&mut *tx)
        .await
        .unwrap_err();
        assert!(direct.to_string().contains("permission denied"), "{direct}");
    }
    let report = embed_worker::verify::verify(&t.admin, &s).await.unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // A second migrate changes nothing.
    embed_worker::db::migrate(&t.admin).await.unwrap();
    let again: String = sqlx::query_scalar(snapshot)
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_ne!(again, before_rows, "the row inserted above is there");
    assert_eq!(rows_of(&t, "text-embedding-3-small").await, 101);
}

#[tokio::test]
async fn the_app_role_reads_the_serving_model_from_sql_and_nothing_more() {
    let t = TestDb::migrated().await;
    migrate_as_the_cli(&t).await;
    let mut tx = t.admin.begin().await.unwrap();
    sqlx::raw_sql("SET LOCAL ROLE app_user")
        .execute(&mut *tx)
        .await
        .unwrap();
    let row: (String, i32, String, String) = sqlx::query_as(
        "SELECT model, dimensions, index_type, index_expression FROM embed_worker.serving_model()",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            OLD.to_string(),
            1536,
            "vector".to_string(),
            "embedding::vector(1536)".to_string()
        )
    );
    tx.rollback().await.unwrap();
    // Nothing else of the registry, and none of the owner's functions.
    for sql in [
        "SELECT * FROM embed_worker.models",
        "SELECT * FROM embed_worker.model_promotions",
        "SELECT embed_worker.partition_name('x')",
        "SELECT embed_worker.ensure_model('x', 3, 'vector')",
    ] {
        let err = app_user_statement(&t, Uuid::new_v4(), sql)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("permission denied"),
            "{sql}: {err}"
        );
    }
    // The catalog agrees: of the registry, app_user may only execute serving_model().
    let rights: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p
          WHERE p.pronamespace = 'embed_worker'::regnamespace
            AND has_function_privilege('app_user', p.oid, 'EXECUTE')
            AND (p.proname LIKE '%model%' OR p.proname LIKE '%partition%')
         UNION ALL
         SELECT c.oid::regclass::text FROM pg_class c
          WHERE (c.relnamespace = 'embed_worker'::regnamespace AND c.relname LIKE 'model%'
                 OR c.relname LIKE 'rag_embeddings_%')
            AND c.relkind IN ('r', 'v', 'p')
            AND has_table_privilege('app_user', c.oid, 'SELECT')",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(rights, vec!["embed_worker.serving_model()"]);
}

/// WAL bytes this pool's one connection has written, its statistics flushed first.
async fn backend_wal_bytes(one: &sqlx::PgPool) -> f64 {
    sqlx::query("SELECT pg_stat_force_next_flush()")
        .execute(one)
        .await
        .unwrap();
    sqlx::query_scalar("SELECT wal_bytes::float8 FROM pg_stat_get_backend_wal(pg_backend_pid())")
        .fetch_one(one)
        .await
        .unwrap()
}

#[tokio::test]
async fn prune_of_a_100k_row_model_detaches_and_drops_its_partition_writing_catalog_wal_only() {
    let t = quiet_db().await;
    migrate_as_the_cli(&t).await;
    register(&t, "old-model", 8).await;
    let users = insert_sessions(&t.admin, Uuid::new_v4(), 1_000, |_| 2).await;
    sqlx::raw_sql(
        "INSERT INTO rag_embeddings (source_type, source_id, chunk_index, content_hash, embedding,
                                     embedding_model, dimensions, token_count)
         SELECT 'session', s.id, c, 'h', '[1,0,0,0,0,0,0,1]', 'old-model', 8, 3
           FROM sessions s, generate_series(0, 99) c",
    )
    .execute(&t.admin)
    .await
    .unwrap();
    build_index(&t, "old-model", 8).await;
    assert_eq!(rows_of(&t, "old-model").await, 100_000);
    let err = model_index::prune(&t.admin, OLD)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("it is the serving model"), "{err}");

    // WAL written by the prune's own connection (PG 18's per-backend statistics): the cluster's
    // WAL position also moves with every other test running beside this one.
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&t.url)
        .await
        .unwrap();
    let before = backend_wal_bytes(&one).await;
    let pruned = model_index::prune(&one, "old-model").await.unwrap();
    let wal_bytes = backend_wal_bytes(&one).await - before;
    assert_eq!(pruned, 100_000);
    // Catalog changes only: kilobytes, not the rows (a DELETE writes ~50 bytes a row: ~5 MB).
    assert!(
        wal_bytes > 0.0 && wal_bytes < 200_000.0,
        "{wal_bytes} bytes of WAL"
    );
    assert_eq!(rows_of(&t, "old-model").await, 0);
    let gone: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(model_index::partition_name("old-model"))
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(gone, None);
    assert_eq!(users.len(), 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_new_dimensions_under_a_registered_name_having_changed_nothing() {
    let t = TestDb::migrated().await;
    let model = "text-embedding-3-small";
    register(&t, model, 8).await;
    let s = insert_session(&t.admin, Uuid::new_v4(), "scales", "slow").await;
    sqlx::query(
        "INSERT INTO rag_embeddings (source_type, source_id, chunk_index, content_hash, embedding,
                                     embedding_model, dimensions, token_count)
         VALUES ('session', $1, 0, 'h', '[1,0,0,0,0,0,0,1]', $2, 8, 5)",
    )
    .bind(s)
    .bind(model)
    .execute(&t.admin)
    .await
    .unwrap();
    let catalog = || async {
        count(
            &t.admin,
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
              WHERE c.relname IN ('sessions', 'question_templates') AND t.tgenabled <> 'D'",
        )
        .await
    };
    let triggers = catalog().await;
    let out = worker_command(&t, "http://127.0.0.1:9/v1")
        .env("EMBED_WORKER__MODEL__NAME", model)
        .env("EMBED_WORKER__MODEL__DIMENSIONS", "4")
        .env("EMBED_WORKER__CAPTURE__SESSIONS", "false")
        .arg("migrate")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{err}{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        err.contains("refusing model.dimensions = 4")
            && err.contains("registered with 8 dimensions")
            && err.contains("nothing was changed"),
        "{err}"
    );
    let dims: i32 =
        sqlx::query_scalar("SELECT dimensions FROM embed_worker.models WHERE name = $1")
            .bind(model)
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(dims, 8, "the registry keeps the rows' size");
    // Refused before anything: the capture switch in the same run was not applied either.
    assert_eq!(catalog().await, triggers);
    // The SQL function refuses it too, for any other caller.
    let direct = sqlx::query("SELECT embed_worker.ensure_model($1, 4, 'vector')")
        .bind(model)
        .execute(&t.admin)
        .await
        .unwrap_err();
    assert!(
        direct.to_string().contains("registered with 8 dimensions"),
        "{direct}"
    );
    // Without rows a model may still change size.
    sqlx::query("DELETE FROM rag_embeddings WHERE embedding_model = $1")
        .bind(model)
        .execute(&t.admin)
        .await
        .unwrap();
    sqlx::query("SELECT embed_worker.ensure_model($1, 4, 'vector')")
        .bind(model)
        .execute(&t.admin)
        .await
        .unwrap();
}

/// The serving model's name.
async fn serving_name(t: &TestDb) -> String {
    lifecycle::serving(&t.admin).await.unwrap().unwrap().name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn promotion_takes_the_set_of_sources_with_text_and_a_rollback_is_not_undone() {
    let t = quiet_db().await;
    let fake = fake(FakeConfig::default()).await;
    let user = Uuid::new_v4();
    insert_sessions(&t.admin, user, 30, |i| 3 + i % 10).await;
    // As seen first: U+3000 alone was text to SQL and empty to the worker (no row, ever: the
    // promotion was refused for ever); a focus alone is text to the worker ("Focus: rhythm").
    let ideographic: Uuid = sqlx::query_scalar(
        "INSERT INTO sessions (user_id, notes) VALUES ($1, E'\\u3000\\u3000') RETURNING id",
    )
    .bind(user)
    .fetch_one(&t.admin)
    .await
    .unwrap();
    let focus_only: Uuid = sqlx::query_scalar(
        "INSERT INTO sessions (user_id, focus) VALUES ($1, 'rhythm') RETURNING id",
    )
    .bind(user)
    .fetch_one(&t.admin)
    .await
    .unwrap();
    let mut a = worker_settings(&t, &fake);
    a.index.check_interval_secs = 1;
    let stale = freshness::find_stale(&t.admin, OLD, &Scope::default())
        .await
        .unwrap();
    let ids: Vec<Uuid> = stale.iter().map(|s| s.source.source_id).collect();
    assert_eq!(ids.len(), 31, "30 sessions and the focus-only one");
    assert!(ids.contains(&focus_only) && !ids.contains(&ideographic));

    // ada-002 serves every source with text.
    backfill_stale(&t, &a).await;
    let w = RunningWorker::start(a.clone()).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    assert_eq!(serving_name(&t).await, OLD);
    assert_eq!(
        freshness::uncovered(&t.admin, OLD).await.unwrap(),
        (0, 0),
        "the focus-only session has its row; the U+3000 one is not asked for"
    );

    // The switch to 3-small: promoted by the running worker once every source is current.
    let mut b = a.clone();
    b.model.name = NEW.into();
    b.model.dimensions = 64;
    b.model.send_dimensions = true;
    lifecycle::on_migrate(&mut t.admin.acquire().await.unwrap(), &spec(NEW, 64))
        .await
        .unwrap();
    assert_eq!(backfill_stale(&t, &b).await, 31);
    let w = RunningWorker::start(b.clone()).await;
    let started = Instant::now();
    while serving_name(&t).await != NEW {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "3-small never promoted: {:?}",
            freshness::uncovered(&t.admin, NEW).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An edit while 3-small serves alone (no capture here, so no job: as a missed change):
    // a rollback to ada-002 is refused, naming the edited source, and changes nothing.
    sqlx::query("UPDATE sessions SET notes = 'edited after the switch' WHERE id = $1")
        .bind(focus_only)
        .execute(&t.admin)
        .await
        .unwrap();
    let mut admin = t.admin.acquire().await.unwrap();
    let refused = lifecycle::promote(&mut admin, OLD, false, false)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("1 edited since it wrote them"),
        "{refused}"
    );
    assert_eq!(serving_name(&t).await, NEW);
    // Forced: ada-002 serves, and the running worker (3-small is its model, 3-small is current)
    // does not promote 3-small back over the operator.
    let p = lifecycle::promote(&mut admin, OLD, true, false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(p.how, "forced");
    drop(admin);
    sqlx::query("UPDATE sessions SET notes = 'edited again' WHERE id = $1")
        .bind(focus_only)
        .execute(&t.admin)
        .await
        .unwrap();
    enqueue(&t.admin, &session_sources(&[focus_only])).await;
    wait_drained(&t.admin, Duration::from_secs(30)).await;
    let promotions_before = count(
        &t.admin,
        "SELECT count(*) FROM embed_worker.model_promotions",
    )
    .await;
    // Five of the worker's promotion checks (one a second), 3-small ready at each.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(freshness::uncovered(&t.admin, NEW).await.unwrap(), (0, 0));
    assert_eq!(serving_name(&t).await, OLD, "the rollback stands");
    assert_eq!(
        count(
            &t.admin,
            "SELECT count(*) FROM embed_worker.model_promotions"
        )
        .await,
        promotions_before
    );
    w.stop().await;
    // An operator's promotion of 3-small decides again.
    let mut admin = t.admin.acquire().await.unwrap();
    let p = lifecycle::promote(&mut admin, NEW, false, false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((p.model.as_str(), p.how), (NEW, "manual"));
}

/// Pending jobs whose payload names `model`.
async fn jobs_for(t: &TestDb, model: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM apalis.jobs
          WHERE status = 'Pending' AND embed_worker.job_payload(job) ->> 'model' = $1",
    )
    .bind(model)
    .fetch_one(&t.admin)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_and_new_config_workers_side_by_side_leave_every_model_job_to_its_model() {
    const THIRD: &str = "text-embedding-3-large";
    let t = quiet_db().await;
    let fake = fake(FakeConfig::default()).await;
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 200, |i| 3 + i % 10).await;
    let mut old = worker_settings(&t, &fake);
    old.index.check_interval_secs = 1;
    let w = RunningWorker::start(old.clone()).await;
    backfill_stale(&t, &old).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    assert_eq!(rows_of(&t, OLD).await, 200);
    let for_model = |name: &str, dims: usize| {
        let mut s = old.clone();
        s.model.name = name.into();
        s.model.dimensions = dims;
        s.model.send_dimensions = true;
        s
    };

    // `migrate` to 3-small and its backfill; before any worker runs, `migrate` to 3-large and
    // its backfill: the pending jobs become the third model's (as seen first: deduplicated
    // against the second's, the third stopped at 2,197 of 3,020).
    lifecycle::on_migrate(&mut t.admin.acquire().await.unwrap(), &spec(NEW, 64))
        .await
        .unwrap();
    assert_eq!(backfill_stale(&t, &for_model(NEW, 64)).await, 200);
    assert_eq!(jobs_for(&t, NEW).await, 200);
    let third = for_model(THIRD, 32);
    lifecycle::on_migrate(&mut t.admin.acquire().await.unwrap(), &spec(THIRD, 32))
        .await
        .unwrap();
    backfill_stale(&t, &third).await;
    assert_eq!(
        (jobs_for(&t, NEW).await, jobs_for(&t, THIRD).await),
        (0, 200)
    );

    // Only a worker still on the ada-002 config (a rolling deploy's old pod): it embeds the
    // backfill with the writing model (as seen first: it ended 2,973 of 3,011 as no-ops).
    let old_worker = RunningWorker::start(old.clone()).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    assert_eq!(freshness::uncovered(&t.admin, THIRD).await.unwrap(), (0, 0));
    assert_eq!(
        rows_of(&t, NEW).await,
        0,
        "nobody wrote the abandoned second model"
    );
    assert_eq!(rows_of(&t, OLD).await, 200);

    // The new config's worker builds the index and promotes 3-large; the ada-002 worker is then
    // neither writing nor serving: it takes no job and /readyz says why.
    let new_worker = RunningWorker::start(third.clone()).await;
    let started = Instant::now();
    loop {
        let idle = old_worker
            .worker
            .health
            .readiness()
            .err()
            .unwrap_or_default()
            .join("; ");
        if idle.contains("not taking jobs") {
            assert!(
                idle.contains(
                    "model.name = text-embedding-ada-002 is neither the writing \
                     (text-embedding-3-large) nor the serving (text-embedding-3-large) model"
                ),
                "{idle}"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the ada-002 worker still takes jobs; serving: {:?}",
            lifecycle::serving(&t.admin).await.unwrap().map(|m| m.name)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Edits queued while only the idle worker runs, then taken by the current one: ada-002
    // (read by no search now) is not written.
    new_worker.stop().await;
    let edit_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "UPDATE sessions SET notes = notes || ' edited' WHERE id = ANY($1) RETURNING now()",
    )
    .bind(
        sources[..20]
            .iter()
            .map(|s| s.source_id)
            .collect::<Vec<_>>(),
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    enqueue(&t.admin, &sources[..20]).await;
    let new_worker = RunningWorker::start(third.clone()).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    new_worker.stop().await;
    old_worker.stop().await;
    assert_eq!(freshness::uncovered(&t.admin, THIRD).await.unwrap(), (0, 0));
    let old_rewritten: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rag_embeddings WHERE embedding_model = $1 AND updated_at >= $2",
    )
    .bind(OLD)
    .bind(edit_at)
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!(
        old_rewritten, 0,
        "the ada-002 worker wrote a model nothing reads"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prune_is_refused_while_a_worker_runs_with_that_model_and_allowed_once_it_stopped() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    insert_sessions(&t.admin, Uuid::new_v4(), 20, |i| 3 + i).await;
    let old = worker_settings(&t, &fake);
    let mut admin = t.admin.acquire().await.unwrap();
    lifecycle::on_migrate(&mut admin, &spec(OLD, 1536))
        .await
        .unwrap();
    lifecycle::on_migrate(&mut admin, &spec(NEW, 64))
        .await
        .unwrap();
    lifecycle::promote(&mut admin, NEW, true, false)
        .await
        .unwrap();
    drop(admin);
    // A worker still on the ada-002 config (as seen first: prune dropped the partition under it,
    // its connection desynced and 179 edits stayed stale).
    let w = RunningWorker::start(old).await;
    let started = Instant::now();
    while count(
        &t.admin,
        "SELECT count(*) FROM embed_worker.workers WHERE model = 'text-embedding-ada-002'",
    )
    .await
        == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no presence row"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = lifecycle::prune(&t.admin, OLD)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.starts_with(
            "refusing to prune text-embedding-ada-002: a worker is running with model.name = \
             text-embedding-ada-002"
        ) && refused.ends_with("nothing was changed"),
        "{refused}"
    );
    assert!(
        lifecycle::partition_exists(&t.admin, OLD).await.unwrap(),
        "the refusal changed nothing"
    );
    w.stop().await;
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM embed_worker.workers").await,
        0,
        "a stopped worker's presence is gone"
    );
    lifecycle::prune(&t.admin, OLD).await.unwrap();
    assert!(!lifecycle::partition_exists(&t.admin, OLD).await.unwrap());
}
