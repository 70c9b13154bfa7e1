//! What the app's role can reach: exactly the intended functions and tables, nothing more.

use crate::helpers::*;
use uuid::Uuid;

/// Runs `sql` as `app_user` for a new user; returns the error text, if any.
async fn run_as_app_user(t: &TestDb, sql: &str) -> Result<(), String> {
    run_as_user(t, Uuid::new_v4(), sql).await
}

/// Runs `sql` as `app_user` with `auth.uid()` = `user`; returns the error text, if any.
async fn run_as_user(t: &TestDb, user: Uuid, sql: &str) -> Result<(), String> {
    let mut tx = t.admin.begin().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET LOCAL ROLE app_user; SELECT set_config('request.jwt.claim.sub', '{user}', true);"
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    let r = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(&mut *tx)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    if r.is_ok() {
        tx.commit().await.unwrap();
    }
    r
}

#[tokio::test]
async fn the_app_role_reaches_exactly_the_intended_functions_and_tables() {
    let t = TestDb::migrated().await;
    // Every function app_user can call (schema USAGE and EXECUTE), extensions' own aside.
    let functions: Vec<String> = sqlx::query_scalar(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
            AND has_schema_privilege('app_user', n.oid, 'USAGE')
            AND has_function_privilege('app_user', p.oid, 'EXECUTE')
            AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                             AND d.objid = p.oid AND d.deptype = 'e')
          ORDER BY 1",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(
        functions,
        vec![
            "auth.uid()",
            "embed_worker.check_placeholders(text,jsonb)",
            "embed_worker.enqueue(embedding_source,uuid,text)",
            "embed_worker.enqueue_many(embedding_source[],uuid[],text,integer,integer)",
            "embed_worker.search(vector,integer,embedding_source,integer,integer,text)",
            "embed_worker.search_route(text,integer,text)",
            "embed_worker.serving_model()",
        ],
        "app_user can call exactly these"
    );
    // Every table, view and sequence app_user holds any privilege on.
    let relations: Vec<String> = sqlx::query_scalar(
        "SELECT c.oid::regclass::text || ' ' || p.priv FROM pg_class c
           JOIN pg_namespace n ON n.oid = c.relnamespace
          CROSS JOIN unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER']) AS p(priv)
          WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
            AND c.relkind IN ('r', 'v', 'm', 'S', 'p')
            AND has_schema_privilege('app_user', n.oid, 'USAGE')
            AND has_table_privilege('app_user', c.oid, p.priv)
          ORDER BY 1",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(
        relations,
        vec![
            "question_templates SELECT",
            "rag_embeddings SELECT",
            "sessions SELECT"
        ]
    );

    // The spend functions that any role could call before.
    for sql in [
        "SELECT * FROM embed_worker.reserve_spend('m', 1000000)",
        "SELECT * FROM embed_worker.settle_spend(current_date, 'm', 0, -5, 0)",
        "SELECT apalis.get_jobs('w', 'embed', 10)",
        "SELECT count(*) FROM apalis.jobs",
    ] {
        let err = run_as_app_user(&t, sql).await.unwrap_err();
        assert!(err.contains("permission denied"), "{sql}: {err}");
    }
    // What the README tells the app to call works, without any right on the apalis schema.
    let user = Uuid::new_v4();
    let id = insert_session(&t.admin, user, "x", "y").await;
    let other = insert_session(&t.admin, user, "x", "z").await;
    sqlx::query("DELETE FROM apalis.jobs")
        .execute(&t.admin)
        .await
        .unwrap();
    run_as_user(
        &t,
        user,
        &format!("SELECT embed_worker.enqueue('session', '{id}')"),
    )
    .await
    .unwrap();
    run_as_user(
        &t,
        user,
        &format!(
            "SELECT embed_worker.enqueue_many(ARRAY['session']::embedding_source[], ARRAY['{other}']::uuid[])"
        ),
    )
    .await
    .unwrap();
    let queued: i64 = count(
        &t.admin,
        "SELECT count(*) FROM apalis.jobs WHERE status = 'Pending'",
    )
    .await;
    assert_eq!(queued, 2);
    let err = run_as_user(
        &t,
        user,
        &format!("SELECT embed_worker.enqueue_many(ARRAY['session']::embedding_source[], ARRAY['{id}']::uuid[], 'embed', 100000)"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("max_attempts must be 1..100"), "{err}");
    // Even the worker's own role cannot make the month's spend negative.
    let worker = t.worker_pool().await;
    let err = sqlx::query("SELECT * FROM embed_worker.settle_spend(current_date, 'm', 0, -5, 0)")
        .execute(&worker)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("must be finite and >= 0"), "{err}");
}

/// Jobs in `apalis.jobs` (any queue).
async fn jobs(t: &TestDb) -> i64 {
    count(&t.admin, "SELECT count(*) FROM apalis.jobs").await
}

#[tokio::test]
async fn the_app_enqueues_only_its_own_sources_into_the_workers_queue_at_most_1000_at_a_time() {
    let t = TestDb::migrated().await;
    let (ada, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mine = insert_session(&t.admin, ada, "mine", "scales").await;
    let theirs = insert_session(&t.admin, bob, "theirs", "arpeggios").await;
    seed_templates(&t.admin).await;
    let enabled: Uuid =
        sqlx::query_scalar("SELECT id FROM question_templates WHERE enabled LIMIT 1")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    let disabled: Uuid = sqlx::query_scalar(
        "UPDATE question_templates SET enabled = false
          WHERE id = (SELECT id FROM question_templates WHERE id <> $1 LIMIT 1) RETURNING id",
    )
    .bind(enabled)
    .fetch_one(&t.admin)
    .await
    .unwrap();
    sqlx::query("DELETE FROM apalis.jobs")
        .execute(&t.admin)
        .await
        .unwrap();
    let many = |types: &str, ids: &str, rest: &str| {
        format!(
            "SELECT embed_worker.enqueue_many(ARRAY[{types}]::embedding_source[], ARRAY[{ids}]::uuid[]{rest})"
        )
    };

    // Refused, each with its reason, and nothing queued.
    for (sql, why) in [
        (
            format!("SELECT embed_worker.enqueue('session', '{theirs}')"),
            "not yours",
        ),
        (
            many(
                "'session'",
                &format!("'{mine}', '{theirs}'").replace("', '", "','"),
                "",
            ),
            "does not match",
        ),
        (
            many("'session','session'", &format!("'{mine}','{theirs}'"), ""),
            "1 of 2 sources",
        ),
        (
            many("'session'", &format!("'{}'", Uuid::new_v4()), ""),
            "do not exist",
        ),
        (
            many("'template'", &format!("'{disabled}'"), ""),
            "do not exist",
        ),
        (
            many(
                "'session'",
                &format!("'{mine}'"),
                ", 'some-other-app-queue'",
            ),
            "is not a queue of embed-worker",
        ),
        (
            many("'session'", &format!("'{mine}'"), ", 'embed.batch'"),
            "is not a queue of embed-worker",
        ),
        (
            many(
                &vec!["'session'"; 1001].join(","),
                &vec![format!("'{mine}'"); 1001].join(","),
                "",
            ),
            "at most 1000 sources per call",
        ),
    ] {
        let err = run_as_user(&t, ada, &sql).await.unwrap_err();
        let why = if why == "does not match" {
            "1 source types for 2 source ids"
        } else {
            why
        };
        assert!(err.contains(why), "{sql}: {err}");
    }
    assert_eq!(jobs(&t).await, 0, "nothing queued by a refused call");

    // Allowed: her own session and an enabled template, in the worker's queue.
    run_as_user(
        &t,
        ada,
        &many("'session','template'", &format!("'{mine}','{enabled}'"), ""),
    )
    .await
    .unwrap();
    assert_eq!(jobs(&t).await, 2);
    // Without a user, only templates.
    let err = run_as_user(
        &t,
        Uuid::nil(),
        &format!("SELECT embed_worker.enqueue('session', '{mine}')"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("not yours"), "{err}");

    // The operator's server-side path is not the app's.
    let err = run_as_user(
        &t,
        ada,
        &format!("SELECT embed_worker.enqueue_jobs(ARRAY['session']::embedding_source[], ARRAY['{mine}']::uuid[])"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("permission denied"), "{err}");
    // ... and stays unrestricted for the worker role: 5,000 sources in one call.
    let worker = t.worker_pool().await;
    let sources: Vec<embed_worker::source::EmbedSource> = (0..5000)
        .map(|_| embed_worker::source::EmbedSource {
            source_type: embed_worker::source::SourceType::Session,
            source_id: Uuid::new_v4(),
        })
        .collect();
    let n = embed_worker::queue::enqueue_lane(&worker, "embed.batch", 10, -10, &sources)
        .await
        .unwrap();
    assert_eq!(n, 5000);
}

#[tokio::test]
async fn settle_spend_settles_only_reservations_that_exist() {
    let t = TestDb::migrated().await;
    let worker = t.worker_pool().await;
    let spent = || async {
        sqlx::query_scalar::<_, f64>("SELECT coalesce(sum(usd), 0)::float8 FROM embed_worker.spend")
            .fetch_one(&t.admin)
            .await
            .unwrap()
    };
    sqlx::query("SELECT * FROM embed_worker.reserve_spend('m', 0.25)")
        .execute(&worker)
        .await
        .unwrap();
    sqlx::query("SELECT * FROM embed_worker.settle_spend(embed_worker.current_month(), 'm', 0.25, 0.25, 100)")
        .execute(&worker)
        .await
        .unwrap();
    assert!((spent().await - 0.25).abs() < 1e-9);
    // The month's spend cannot be settled away: no reservation is open any more.
    for sql in [
        "SELECT * FROM embed_worker.settle_spend(embed_worker.current_month(), 'm', 1e12, 0, 0)",
        "SELECT * FROM embed_worker.settle_spend(embed_worker.current_month(), 'm', 0.25, 0, 0)",
        "SELECT * FROM embed_worker.settle_spend(embed_worker.current_month(), 'other', 1, 0, 0)",
    ] {
        let err = sqlx::query(sql).execute(&worker).await.unwrap_err();
        assert!(
            err.to_string().contains("no open reservation"),
            "{sql}: {err}"
        );
    }
    assert!(
        (spent().await - 0.25).abs() < 1e-9,
        "the spend is untouched"
    );
    // An open reservation settles once, for at most what it reserved.
    sqlx::query("SELECT * FROM embed_worker.reserve_spend('m', 0.5)")
        .execute(&worker)
        .await
        .unwrap();
    sqlx::query(
        "SELECT * FROM embed_worker.settle_spend(embed_worker.current_month(), 'm', 0.5, 0.1, 10)",
    )
    .execute(&worker)
    .await
    .unwrap();
    assert!((spent().await - 0.35).abs() < 1e-9);
    let err = sqlx::query(
        "SELECT * FROM embed_worker.settle_spend(embed_worker.current_month(), 'm', 0.5, 0, 0)",
    )
    .execute(&worker)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("no open reservation"), "{err}");
}

/// The advisory-lock key the worker once took per source: FNV-1a of `embed-worker:`, the type
/// and the id's 16 bytes.
fn old_source_key(id: Uuid) -> i64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in b"embed-worker:session".iter().chain(id.as_bytes()) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_app_role_holding_every_key_the_worker_used_stalls_nothing() {
    use embed_worker::config::BulkMode;
    use embed_worker::fake_openai::FakeConfig;
    use embed_worker::model_index::{self, IndexState};
    use std::time::{Duration, Instant};

    let t = quiet_db().await;
    let fake = fake(FakeConfig::default()).await;
    let mut s = worker_settings(&t, &fake);
    s.model.name = "text-embedding-3-small".into();
    s.model.dimensions = 64;
    s.model.send_dimensions = true;
    s.bulk.mode = BulkMode::Batch;
    s.bulk.poll_secs = 1;
    s.index.check_interval_secs = 1;
    let spec = model_index::IndexSpec::from_settings(&s).unwrap();
    register(&t, &s.model.name, 64).await;
    // 200 sessions for the batch lane (its leader), then eight of the app's user for the sync
    // lane; then the model's index (the build).
    insert_sessions(&t.admin, Uuid::new_v4(), 200, |i| 3 + i % 20).await;
    assert_eq!(backfill_stale(&t, &s).await, 200);
    let user = Uuid::new_v4();
    let own = insert_sessions(&t.admin, user, 8, |i| 3 + i).await;

    // The app's role, on a session of its own, holds what it saw (as seen first): the per-source
    // keys of its eight sessions, the index-build, batch-leader and stale-scan keys.
    let mut app = t.admin.acquire().await.unwrap().detach();
    sqlx::query("SET ROLE app_user")
        .execute(&mut app)
        .await
        .unwrap();
    let mut keys: Vec<i64> = own.iter().map(|s| old_source_key(s.source_id)).collect();
    keys.extend([0x656d_6269_6478, 0x656d_6262_6174, 0x656d_6265_6473_6361]);
    let held: i64 =
        sqlx::query_scalar("SELECT count(pg_advisory_lock(k)) FROM unnest($1::int8[]) k")
            .bind(&keys)
            .fetch_one(&mut app)
            .await
            .unwrap();
    assert_eq!(held, 11);
    // The rows the worker locks now: refused at once, not waited on.
    for sql in [
        "SELECT * FROM embed_worker.leases FOR UPDATE",
        "SELECT * FROM embed_worker.source_locks FOR KEY SHARE",
        "UPDATE embed_worker.leases SET expires_at = 'infinity'",
        "LOCK TABLE embed_worker.leases",
    ] {
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "BEGIN; SET LOCAL lock_timeout = '2s'; {sql}; COMMIT"
        )))
        .execute(&mut app)
        .await
        .unwrap_err()
        .to_string();
        let _ = sqlx::query("ROLLBACK").execute(&mut app).await;
        assert!(err.contains("permission denied"), "{sql}: {err}");
    }

    // Two workers.
    let interactive = enqueue(&t.admin, &own).await;
    assert_eq!(interactive, 8);
    let a = RunningWorker::start(s.clone()).await;
    let b = RunningWorker::start(s.clone()).await;
    let started = Instant::now();
    loop {
        let rows = count(
            &t.admin,
            "SELECT count(DISTINCT source_id) FROM rag_embeddings",
        )
        .await;
        let state = model_index::state(&t.admin, &spec).await.unwrap();
        let open = embed_worker::queue::open_jobs(&t.admin, "embed")
            .await
            .unwrap();
        if rows == 208 && open == 0 && matches!(state, IndexState::Ready(_)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "stalled: {rows} of 208 sources written, {open} jobs open, index {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.stop().await;
    b.stop().await;
    let batches = count(
        &t.admin,
        "SELECT count(*) FROM embed_worker.batches WHERE state = 'completed'",
    )
    .await;
    assert!(
        batches >= 1,
        "the batch lane led: {batches} batches completed"
    );
    let own_rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM rag_embeddings WHERE source_id = ANY($1)")
            .bind(own.iter().map(|s| s.source_id).collect::<Vec<_>>())
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(own_rows, 8, "the app's locked sessions were written");
    // And the stale scan runs while the app holds its old key.
    let scanned = embed_worker::freshness::scan_stale(&t.admin, &s)
        .await
        .unwrap();
    assert!(scanned.is_some(), "the scan ran");
    // The app still holds every key: nothing above waited for it to let go.
    let still: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
    )
    .fetch_one(&mut app)
    .await
    .unwrap();
    assert_eq!(still, 11);
}
