//! Managed PostgreSQL as users run it (issue 31): Debian's PgBouncer in front of the dev server
//! in transaction and in session mode (Neon's and Supabase's poolers), a small connection budget
//! per worker, a non-superuser owner with CREATEROLE and the extension made beforehand, and
//! change capture that adds nothing to the app's transaction but one row.

use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

use embed_worker::fake_openai::FakeConfig;

use crate::helpers::*;

/// Every job as (id, status, attempts, lock holder): what "claimed nothing" compares.
async fn jobs_snapshot(t: &TestDb) -> String {
    sqlx::query_scalar(
        "SELECT coalesce(string_agg(id || ' ' || status || ' ' || attempts || ' ' || coalesce(lock_by, '-'),
                                    ',' ORDER BY id), '')
           FROM apalis.jobs",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap()
}

/// Runs `cmd` to its end, at most `deadline`; (exit code, stderr).
fn run_with_deadline(mut cmd: std::process::Command, deadline: Duration) -> (Option<i32>, String) {
    let mut child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_transaction_pooler_is_refused_by_run_and_migrate_having_done_nothing() {
    let t = TestDb::migrated().await;
    let sources = insert_sessions(&t.admin, uuid::Uuid::new_v4(), 20, |_| 5).await;
    enqueue(&t.admin, &sources).await;
    let jobs_before = jobs_snapshot(&t).await;
    let captured_before = count(&t.admin, "SELECT count(*) FROM embed_worker.captured").await;
    let pooler = Pooler::start("transaction", 4, &[]);
    let fake = fake(FakeConfig::default()).await;
    let through = pooler.url(&t.url, "postgres");
    for args in [&["run"][..], &["migrate"][..]] {
        let mut cmd = worker_command(&t, &fake.base_url());
        cmd.env("DATABASE_URL", &through).args(args);
        // The bound: refused within 15 s.
        let (code, err) =
            tokio::task::spawn_blocking(move || run_with_deadline(cmd, Duration::from_secs(15)))
                .await
                .unwrap();
        assert_ne!(
            code,
            Some(0),
            "{args:?} went through a transaction pooler: {err}"
        );
        assert!(
            err.contains("transaction-mode connection pooler")
                && err.contains("Nothing was queued, claimed or written")
                && err.contains("pool_mode = session"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        jobs_snapshot(&t).await,
        jobs_before,
        "a job was claimed or changed"
    );
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM rag_embeddings").await,
        0
    );
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM apalis.workers").await,
        0
    );
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM embed_worker.captured").await,
        captured_before
    );
    assert!(fake.requests().is_empty(), "the provider was called");
}

#[tokio::test]
async fn three_workers_with_pools_of_two_drain_1000_sources_through_a_session_pooler() {
    let t = TestDb::migrated().await;
    // Inserted with capture on: the workers drain the recorded changes into jobs as well.
    let sources = insert_sessions(&t.admin, uuid::Uuid::new_v4(), 1000, |i| 5 + i % 30).await;
    // Six server connections for three pools of two: the budget is exactly spent.
    let pooler = Pooler::start("session", 6, &[]);
    let fake = fake(FakeConfig::default()).await;
    let dir = tempdir();
    let mut reaper = Reaper(Vec::new());
    for i in 0..3 {
        let log = std::fs::File::create(dir.join(format!("worker{i}.log"))).unwrap();
        let child = worker_command(&t, &fake.base_url())
            .env("DATABASE_URL", pooler.url(&t.url, "postgres"))
            .env("EMBED_WORKER__DATABASE__MAX_CONNECTIONS", "2")
            .env("EMBED_WORKER__LOG__FORMAT", "json")
            .arg("run")
            .stderr(log)
            .spawn()
            .unwrap();
        reaper.0.push(child);
    }
    let start = Instant::now();
    loop {
        let written = count(
            &t.admin,
            "SELECT count(DISTINCT source_id) FROM rag_embeddings WHERE source_type = 'session'",
        )
        .await;
        let open = embed_worker::queue::open_jobs(&t.admin, "embed")
            .await
            .unwrap();
        if written == sources.len() as i64 && open == 0 {
            break;
        }
        for (i, c) in reaper.0.iter_mut().enumerate() {
            assert!(
                c.try_wait().unwrap().is_none(),
                "worker {i} exited: {}",
                std::fs::read_to_string(dir.join(format!("worker{i}.log"))).unwrap()
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{written} of {} written, {open} open jobs",
            sources.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // No batch failed for want of a connection: every job done at its first attempt.
    let (done, retried, failed): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = 'Done'), count(*) FILTER (WHERE attempts > 1),
                count(*) FILTER (WHERE status IN ('Failed', 'Killed'))
           FROM apalis.jobs",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    assert_eq!((retried, failed), (0, 0), "{done} done");
    assert!(done >= sources.len() as i64, "{done} done");
    // Each worker announced its pool, and the three of them never held more than the pooler's six.
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT application_name FROM pg_stat_activity
          WHERE datname = current_database() AND application_name LIKE 'embed-worker/run %'",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.iter().all(|n| n.contains(" pool=2 ")), "{names:?}");
    for c in &mut reaper.0 {
        unsafe_sigterm(c.id());
    }
    for (i, c) in reaper.0.iter_mut().enumerate() {
        let status = c.wait().unwrap();
        let log = std::fs::read_to_string(dir.join(format!("worker{i}.log"))).unwrap();
        assert!(status.success(), "worker {i}: {status:?}\n{log}");
        assert!(!log.contains("pool timed out"), "worker {i}:\n{log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_worker_refuses_a_pool_below_its_minimum_naming_it() {
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    for (listen, pool, min) in [("false", "1", "2"), ("true", "2", "3")] {
        let mut cmd = worker_command(&t, &fake.base_url());
        cmd.env("EMBED_WORKER__DATABASE__MAX_CONNECTIONS", pool)
            .env("EMBED_WORKER__QUEUE__LISTEN", listen)
            .arg("run");
        let (code, err) =
            tokio::task::spawn_blocking(move || run_with_deadline(cmd, Duration::from_secs(60)))
                .await
                .unwrap();
        assert_ne!(code, Some(0));
        assert!(
            err.contains(&format!(
                "database.max_connections = {pool} is below this worker's minimum pool of {min}"
            )) && err.contains("leader lock"),
            "{err}"
        );
    }
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM apalis.workers").await,
        0
    );
}

// Multi-threaded: the CLI runs blocking (`output()`) while the in-process fake serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_superuser_owner_migrates_and_runs_with_the_extension_made_beforehand() {
    let t = TestDb::empty().await;
    let owner = format!("owner_{}", &t.name[2..14]);
    // As Neon and Supabase set it up: the platform's superuser made the extension; the
    // database belongs to a login with CREATEROLE and nothing more.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE {owner} LOGIN CREATEROLE NOSUPERUSER NOBYPASSRLS;
         ALTER DATABASE {db} OWNER TO {owner};
         CREATE EXTENSION vector;",
        db = t.name
    )))
    .execute(&t.admin)
    .await
    .unwrap();
    // The roles are the cluster's, made by an earlier test's superuser: the owner is granted
    // them here, as an owner that created them itself holds them (README, managed PostgreSQL).
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DO $$ BEGIN CREATE ROLE embed_worker NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         DO $$ BEGIN CREATE ROLE app_user NOLOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         GRANT embed_worker, app_user TO {owner} WITH ADMIN OPTION;"
    )))
    .execute(&t.admin)
    .await
    .unwrap();
    let url = t.url.replacen("://postgres@", &format!("://{owner}@"), 1);
    let fake = fake(FakeConfig::default()).await;
    let cli = |args: &[&str]| {
        let out = worker_command(&t, &fake.base_url())
            .env("DATABASE_URL", &url)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = cli(&["migrate"]);
    assert!(ok, "migrate as a non-superuser owner failed:\n{out}\n{err}");
    let (super_, bypass): (bool, bool) =
        sqlx::query_as("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = $1")
            .bind(&owner)
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert!(!super_ && !bypass);
    let (ok, out, err) = cli(&["verify"]);
    assert!(ok && out.contains("verify: OK"), "{out}\n{err}");
    assert!(out.contains("note: pgvector 0.8."), "{out}");
    assert!(out.contains("note: connections: max_connections"), "{out}");
    // The app writes as the owner (its migrations' role); capture records it, the worker
    // drains, embeds and writes as its own role.
    let owner_pool = embed_worker::db::connect_as_login(&url).await.unwrap();
    let sources = insert_sessions(&owner_pool, uuid::Uuid::new_v4(), 30, |_| 8).await;
    let (ok, out, err) = cli(&["run", "--until-empty"]);
    assert!(ok, "{out}\n{err}");
    assert_eq!(
        count(
            &t.admin,
            "SELECT count(DISTINCT source_id) FROM rag_embeddings"
        )
        .await,
        sources.len() as i64
    );
    let (ok, out, err) = cli(&["status"]);
    assert!(ok && out.contains("connections: "), "{out}\n{err}");
    let (ok, out, err) = cli(&["migrate"]);
    assert!(ok, "second migrate:\n{out}\n{err}");
    owner_pool.close().await;
}

#[tokio::test]
async fn verify_notes_a_login_that_bypasses_rls_and_the_connection_budget() {
    let t = TestDb::migrated().await;
    let s = t.settings();
    // As the first worker would: its model becomes writing and serving.
    embed_worker::model_index::lifecycle::ensure_for_run(&t.admin, &s)
        .await
        .unwrap();
    let report = embed_worker::verify::verify(&t.admin, &s).await.unwrap();
    let notes = report.notes.join("\n");
    // The dev server's login is a superuser, as Neon's owner has BYPASSRLS.
    assert!(notes.contains("has SUPERUSER"), "{notes}");
    assert!(notes.contains("connections: max_connections"), "{notes}");
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    // A pool the server cannot give is a problem, not a note.
    let mut big = s.clone();
    big.database.max_connections = 1000;
    let report = embed_worker::verify::verify(&t.admin, &big).await.unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("database.max_connections = 1000")),
        "{:?}",
        report.problems
    );
}

#[tokio::test]
async fn an_app_write_queues_no_job_itself_and_no_change_is_lost_to_concurrent_drains() {
    let t = TestDb::migrated().await;
    let user = uuid::Uuid::new_v4();
    let sources = insert_sessions(&t.admin, user, 200, |_| 5).await;
    embed_worker::queue::drain_captured(&t.admin, "embed", 10, 10_000)
        .await
        .unwrap();
    // Done with those jobs (a claim clears the key), as a worker would be: what follows must make new ones.
    sqlx::query("UPDATE apalis.jobs SET status = 'Done', done_at = now(), idempotency_key = NULL")
        .execute(&t.admin)
        .await
        .unwrap();
    // The app's write adds one row to embed_worker.captured and none to apalis.jobs, so
    // neither apalis's NOTIFY trigger nor ours can fire in the app's transaction.
    let jobs = count(&t.admin, "SELECT count(*) FROM apalis.jobs").await;
    sqlx::query("UPDATE sessions SET notes = notes || ' again' WHERE id = $1")
        .bind(sources[0].source_id)
        .execute(&t.admin)
        .await
        .unwrap();
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM apalis.jobs").await,
        jobs
    );
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM embed_worker.captured").await,
        1
    );
    // Usage-only updates record nothing.
    sqlx::query("UPDATE sessions SET created_at = created_at WHERE id = $1")
        .bind(sources[1].source_id)
        .execute(&t.admin)
        .await
        .unwrap();
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM embed_worker.captured").await,
        1
    );
    // Eight writers edit 150 of the sessions while two drainers move changes into the queue.
    let edited: Vec<uuid::Uuid> = sources[..150].iter().map(|s| s.source_id).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut drainers = Vec::new();
    for _ in 0..2 {
        let (pool, stop) = (t.admin.clone(), stop.clone());
        drainers.push(tokio::spawn(async move {
            let mut moved = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                moved += embed_worker::queue::drain_captured(&pool, "embed", 10, 7)
                    .await
                    .unwrap()
                    .0;
                // Workers take jobs now and then (clearing their keys), so later edits need new ones.
                sqlx::query(
                    "UPDATE apalis.jobs SET status = 'Done', done_at = now(), idempotency_key = NULL
                      WHERE id IN (SELECT id FROM apalis.jobs WHERE status = 'Pending'
                                    ORDER BY random() LIMIT 5 FOR UPDATE SKIP LOCKED)",
                )
                .execute(&pool)
                .await
                .unwrap();
            }
            moved
        }));
    }
    let mut writers = Vec::new();
    for w in 0..8 {
        let (pool, ids) = (t.admin.clone(), edited.clone());
        writers.push(tokio::spawn(async move {
            for (i, id) in ids.iter().enumerate().filter(|(i, _)| i % 8 == w) {
                for round in 0..3 {
                    sqlx::query("UPDATE sessions SET notes = $2 WHERE id = $1")
                        .bind(id)
                        .bind(format!("edit {round} of {i} by {w}"))
                        .execute(&pool)
                        .await
                        .unwrap();
                }
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for d in drainers {
        d.await.unwrap();
    }
    embed_worker::queue::drain_captured(&t.admin, "embed", 10, 10_000)
        .await
        .unwrap();
    assert_eq!(
        count(&t.admin, "SELECT count(*) FROM embed_worker.captured").await,
        0
    );
    // Every edited session's last edit has a job after it: a pending one, or a job done after
    // the edit (its worker would have loaded the edited text).
    let lost: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT s.id FROM sessions s
          WHERE s.id = ANY($1)
            AND NOT EXISTS (SELECT 1 FROM apalis.jobs j
                             WHERE embed_worker.job_payload(j.job) ->> 'source_id' = s.id::text
                               AND (j.status = 'Pending' OR j.done_at >= s.updated_at))",
    )
    .bind(&edited)
    .fetch_all(&t.admin)
    .await
    .unwrap();
    assert!(
        lost.is_empty(),
        "{} edits have no job: {lost:?}",
        lost.len()
    );
    // And one pending job per source at most.
    let doubled = count(
        &t.admin,
        "SELECT count(*) FROM (SELECT idempotency_key FROM apalis.jobs WHERE status = 'Pending'
                                GROUP BY 1 HAVING count(*) > 1) d",
    )
    .await;
    assert_eq!(doubled, 0);
}

fn unsafe_sigterm(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}
