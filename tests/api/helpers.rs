//! Test support: one fresh database per test on the dev server started by `scripts/db`.
#![allow(dead_code)]

use embed_worker::config::{DatabaseSettings, Settings};
use embed_worker::db;
use sqlx::PgPool;

/// The dev server's admin URL (`scripts/db url`), or `TEST_DATABASE_URL`.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:55432/embed_worker".to_string())
}

fn url_for(db_name: &str) -> String {
    let base = admin_url();
    let (prefix, _) = base.rsplit_once('/').expect("database url has a path");
    format!("{prefix}/{db_name}")
}

pub struct TestDb {
    pub name: String,
    pub url: String,
    /// Login role (superuser on the dev server): for setup and assertions.
    pub admin: PgPool,
}

impl TestDb {
    /// A new, empty database.
    pub async fn empty() -> TestDb {
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let server = db::connect_as_login(&admin_url()).await.expect(
            "cannot reach the dev database: run `scripts/db start` (scripts/test does this)",
        );
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&server)
            .await
            .unwrap();
        server.close().await;
        let url = url_for(&name);
        let admin = db::connect_as_login(&url).await.unwrap();
        TestDb { name, url, admin }
    }

    /// A new database with all migrations applied.
    pub async fn migrated() -> TestDb {
        let t = Self::empty().await;
        // The default model's partition and index, as the single table's migration 1 had its
        // index; no role yet: the first worker's model becomes writing and serving (tests run
        // other models), as on a fresh install.
        migrate_with_default_model(&t, false).await;
        t
    }

    /// A pool whose connections run as the `embed_worker` role, as the worker's do.
    pub async fn worker_pool(&self) -> PgPool {
        db::connect(&DatabaseSettings {
            url: self.url.clone(),
            max_connections: 20,
            role: "embed_worker".into(),
            acquire_timeout_secs: 30,
        })
        .await
        .unwrap()
    }

    /// Settings from config/default.toml pointed at this database.
    pub fn settings(&self) -> Settings {
        let mut s = Settings::load(None).expect("config/default.toml");
        s.database.url = self.url.clone();
        s
    }
}

/// Gives `model` its partition (as `migrate` or a worker's start would), so rows of it can be
/// inserted by hand.
pub async fn register(t: &TestDb, model: &str, dims: usize) {
    embed_worker::model_index::lifecycle::ensure(&t.admin, &spec(model, dims))
        .await
        .expect("registering the model");
}

/// What `embed-worker migrate` does with the default configuration: both migrations, the model
/// registered (writing and serving), its index.
pub async fn migrate_as_the_cli(t: &TestDb) {
    migrate_with_default_model(t, true).await;
}

/// Both migrations, the default model's partition (made writing and serving when `roles`) and
/// its index.
async fn migrate_with_default_model(t: &TestDb, roles: bool) {
    db::migrate(&t.admin).await.expect("migrate");
    let s = t.settings();
    // The render columns' has-text functions, as `migrate` makes them.
    db::render::follow_render(&t.admin, &s.render)
        .await
        .expect("the render columns' functions");
    let spec = embed_worker::model_index::IndexSpec::from_settings(&s).unwrap();
    if roles {
        embed_worker::model_index::lifecycle::on_migrate(
            &mut t.admin.acquire().await.unwrap(),
            &spec,
        )
        .await
        .expect("registering the model");
    } else {
        embed_worker::model_index::lifecycle::ensure(&t.admin, &spec)
            .await
            .expect("registering the model");
    }
    embed_worker::model_index::build::on_migrate(&t.admin, &s)
        .await
        .expect("the model's index");
}

/// Drops the default model's HNSW index: rows are then written without graph upkeep.
pub async fn drop_default_index(t: &TestDb) {
    embed_worker::model_index::build::drop_index(
        &t.admin,
        &spec("text-embedding-ada-002", 1536).name(),
    )
    .await
    .unwrap();
}

/// Inserts a session and returns its id.
pub async fn insert_session(
    pool: &PgPool,
    user: uuid::Uuid,
    title: &str,
    notes: &str,
) -> uuid::Uuid {
    sqlx::query_scalar(
        "INSERT INTO sessions (user_id, focus, depth, title, notes)
         VALUES ($1, 'harmony', 'standard', $2, $3) RETURNING id",
    )
    .bind(user)
    .bind(title)
    .bind(notes)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// A tiny unit vector literal of `dims` dimensions.
pub fn vector_literal(dims: usize) -> String {
    let mut v = vec!["0".to_string(); dims];
    v[0] = "1".into();
    format!("[{}]", v.join(","))
}

use embed_worker::fake_openai::{FakeConfig, FakeServer};
use embed_worker::source::{EmbedSource, SourceType};
use std::time::Duration;

/// Settings for a worker against `fake`, with quick heartbeats for tests.
pub fn worker_settings(t: &TestDb, fake: &FakeServer) -> Settings {
    let mut s = t.settings();
    s.api.base_url = fake.base_url();
    s.queue.heartbeat_secs = 1;
    s.queue.missed_heartbeats = 3;
    s.queue.poll_interval_ms = 100;
    s.shutdown.grace_secs = 10;
    s.http.addr = "127.0.0.1:0".into();
    // The fake enforces no limit unless a test asks it to; neither does the worker then.
    s.rate_limit.requests_per_minute = 0;
    s.rate_limit.tokens_per_minute = 0;
    s
}

pub async fn fake(config: FakeConfig) -> FakeServer {
    FakeServer::start(config, 0).await.unwrap()
}

/// A worker running in this process until the returned sender is dropped or fired.
pub struct RunningWorker {
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub worker: std::sync::Arc<embed_worker::worker::Worker>,
}

impl RunningWorker {
    pub async fn start(settings: Settings) -> RunningWorker {
        embed_worker::telemetry::init(embed_worker::telemetry::LogFormat::Human);
        let worker =
            std::sync::Arc::new(embed_worker::worker::Worker::build(settings).await.unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let w = worker.clone();
        let handle = tokio::spawn(async move {
            w.run(async move {
                let _ = rx.await;
            })
            .await
        });
        RunningWorker {
            stop: Some(tx),
            handle,
            worker,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("worker stops within 30 s")
            .unwrap()
            .unwrap();
    }
}

/// Waits until the queue has no open job; panics after `limit`.
pub async fn wait_drained(pool: &PgPool, limit: Duration) {
    let start = std::time::Instant::now();
    loop {
        let open = embed_worker::queue::open_jobs(pool, "embed").await.unwrap();
        if open == 0 {
            return;
        }
        if start.elapsed() >= limit {
            let by: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(
                "SELECT job_type, status, left(last_result::text, 120), count(*) FROM apalis.jobs
                  WHERE status NOT IN ('Done', 'Killed') GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 8",
            )
            .fetch_all(pool)
            .await
            .unwrap_or_default();
            panic!("queue not drained after {limit:?}: {open} open jobs: {by:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Queues `sources` as the worker role would (`enqueue-stale`, the app's function): jobs made.
/// The app's writes before it are drained into jobs first, as a running worker's chore would
/// have done by then: what this returns is then only what capture had not queued.
pub async fn enqueue(pool: &PgPool, sources: &[EmbedSource]) -> i64 {
    drain(pool).await;
    embed_worker::queue::enqueue_many(pool, "embed", 10, sources)
        .await
        .unwrap()
}

/// The worker's capture chore until nothing is left: the app's recorded changes become jobs.
/// Returns how many jobs it queued. (One round takes at most 10,000 changes: with 20,000
/// sessions inserted, the other half stayed recorded, and a worker's chore queued them again
/// after their first jobs had finished: 896 jobs run twice in the four-worker test.)
pub async fn drain(pool: &PgPool) -> i32 {
    let mut queued = 0;
    loop {
        let (changes, jobs) = embed_worker::queue::drain_captured(pool, "embed", 10, 10_000)
            .await
            .unwrap();
        queued += jobs;
        if changes == 0 {
            return queued;
        }
    }
}

/// Inserts `n` sessions for `user` with notes of `words(i)` words, in one statement; returns their sources.
pub async fn insert_sessions(
    pool: &PgPool,
    user: uuid::Uuid,
    n: usize,
    words: impl Fn(usize) -> usize,
) -> Vec<EmbedSource> {
    let titles: Vec<String> = (0..n).map(|i| format!("Practice {i}")).collect();
    let notes: Vec<String> = (0..n)
        .map(|i| {
            (0..words(i))
                .map(|w| format!("scale{} arpeggio{}", (i * 7 + w) % 97, w % 13))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
        "INSERT INTO sessions (user_id, focus, depth, title, notes)
         SELECT $1, 'harmony', 'standard', t, n FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS u(t, n, o)
         ORDER BY o RETURNING id",
    )
    .bind(user)
    .bind(&titles)
    .bind(&notes)
    .fetch_all(pool)
    .await
    .unwrap();
    ids.into_iter()
        .map(|source_id| EmbedSource {
            source_type: SourceType::Session,
            source_id,
        })
        .collect()
}

pub async fn template_sources(pool: &PgPool) -> Vec<EmbedSource> {
    let ids: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM question_templates")
        .fetch_all(pool)
        .await
        .unwrap();
    ids.into_iter()
        .map(|source_id| EmbedSource {
            source_type: SourceType::Template,
            source_id,
        })
        .collect()
}

pub async fn seed_templates(pool: &PgPool) {
    let seeds = embed_worker::seed::read_templates(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/templates.toml"
    )))
    .unwrap();
    embed_worker::seed::seed_templates(pool, &seeds)
        .await
        .unwrap();
}

/// `embed-worker <args>` against `t`: (exit code, stdout, stderr).
pub fn cli(t: &TestDb, args: &[&str]) -> (i32, String, String) {
    output(
        std::process::Command::new(env!("CARGO_BIN_EXE_embed-worker"))
            .env("DATABASE_URL", &t.url)
            .args(args),
    )
}

/// Runs `cmd` to its end: (exit code, stdout, stderr).
pub fn output(cmd: &mut std::process::Command) -> (i32, String, String) {
    let out = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// The real `embed-worker` binary against this database and `base_url`, in small batches with
/// 1 s heartbeats (3 missed = orphaned) and no rate limit; the caller adds args.
pub fn worker_command(t: &TestDb, base_url: &str) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_embed-worker"));
    c.env("DATABASE_URL", &t.url)
        .env("EMBED_WORKER__API__BASE_URL", base_url)
        .env("EMBED_WORKER__BATCH__MAX_JOBS", "10")
        .env("EMBED_WORKER__BATCH__MAX_IN_FLIGHT", "2")
        .env("EMBED_WORKER__QUEUE__FETCH_BATCH", "30")
        .env("EMBED_WORKER__QUEUE__CONCURRENCY", "60")
        .env("EMBED_WORKER__QUEUE__HEARTBEAT_SECS", "1")
        .env("EMBED_WORKER__QUEUE__MISSED_HEARTBEATS", "3")
        .env("EMBED_WORKER__SHUTDOWN__GRACE_SECS", "10")
        .env("EMBED_WORKER__HTTP__ADDR", "127.0.0.1:0")
        .env("EMBED_WORKER__RATE_LIMIT__TOKENS_PER_MINUTE", "0")
        .env("EMBED_WORKER__RATE_LIMIT__REQUESTS_PER_MINUTE", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    c
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `fake` has seen its first request; panics after 20 s.
pub async fn wait_first_request(fake: &FakeServer) {
    let start = std::time::Instant::now();
    while fake.requests().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no request reached the fake"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The single number a counting query returns.
pub async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// The index spec of `model` at `dims` with the shipped precision (`auto`).
pub fn spec(model: &str, dims: usize) -> embed_worker::model_index::IndexSpec {
    embed_worker::model_index::IndexSpec::new(
        model,
        dims,
        embed_worker::config::IndexPrecision::Auto,
    )
    .unwrap()
}

/// Builds `model`'s index now, as `models build-index` would.
pub async fn build_index(t: &TestDb, model: &str, dims: usize) {
    let cfg = embed_worker::config::Settings::load(None).unwrap().index;
    let outcome = embed_worker::model_index::build::build(&t.admin, &spec(model, dims), &cfg, None)
        .await
        .unwrap();
    assert!(
        matches!(
            outcome,
            embed_worker::model_index::BuildOutcome::Built(..)
                | embed_worker::model_index::BuildOutcome::Ready(_)
        ),
        "{outcome:?}"
    );
}

/// Test and bench lookups (not part of the worker).
///
/// EXPLAIN of the search, to show which index it uses. `without_seqscan`: on a small table the
/// planner rightly prefers a sequential scan; disabling it shows whether the index matches.
pub async fn explain(
    pool: &sqlx::PgPool,
    spec: &embed_worker::model_index::IndexSpec,
    query: Vec<f32>,
    without_seqscan: bool,
) -> sqlx::Result<String> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL hnsw.iterative_scan = relaxed_order")
        .execute(&mut *tx)
        .await?;
    if without_seqscan {
        // And no sort: on a partition of a few rows, its unique btree (which holds the
        // model column the search filters on) and a sort cost less than the HNSW scan.
        sqlx::raw_sql(
            "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; SET LOCAL enable_sort = off",
        )
            .execute(&mut *tx)
            .await?;
    }
    let sql = embed_worker::search::index_statement(pool, &spec.model, 5, None)
        .await
        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
    let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
        .bind(pgvector::Vector::from(query))
        .fetch_all(&mut *tx)
        .await?;
    Ok(rows.into_iter().map(|r| r.0).collect::<Vec<_>>().join("\n"))
}

/// Enabled templates of a focus (the design's template lookup).
pub async fn templates_by_focus(
    pool: &sqlx::PgPool,
    focus: &str,
) -> sqlx::Result<Vec<(uuid::Uuid, String)>> {
    sqlx::query_as(
        "SELECT id, body FROM question_templates WHERE focus = $1::interview_focus AND enabled ORDER BY usage_count DESC, id",
    )
    .bind(focus)
    .fetch_all(pool)
    .await
}

/// A session's own embeddings (the design's session lookup): (model, chunk, tokens).
pub async fn session_embeddings(
    pool: &sqlx::PgPool,
    session: uuid::Uuid,
) -> sqlx::Result<Vec<(String, i32, i32)>> {
    sqlx::query_as(
        "SELECT embedding_model::text, chunk_index, token_count FROM rag_embeddings
          WHERE source_type = 'session' AND source_id = $1 ORDER BY embedding_model, chunk_index",
    )
    .bind(session)
    .fetch_all(pool)
    .await
}

/// A database whose inserts queue nothing by themselves (the tests choose the lane).
pub async fn quiet_db() -> TestDb {
    let t = TestDb::migrated().await;
    embed_worker::db::apply_capture(&t.admin, false, false)
        .await
        .unwrap();
    t
}

/// Queues what the active model lacks, as `backfill` does (in the configured bulk lane).
pub async fn backfill_stale(t: &TestDb, s: &Settings) -> i64 {
    let scope = embed_worker::freshness::Scope::default();
    embed_worker::freshness::enqueue_stale(&t.admin, s, &s.model.name, &scope)
        .await
        .unwrap()
        .created
}

/// Sessions `ids` as embed sources.
pub fn session_sources(ids: &[uuid::Uuid]) -> Vec<EmbedSource> {
    ids.iter()
        .map(|id| EmbedSource {
            source_type: embed_worker::source::SourceType::Session,
            source_id: *id,
        })
        .collect()
}

/// A PostgreSQL cluster of a test's own (`scripts/db` with its own port and data directory), for
/// tests that restart the server or stream it to a standby; stopped and removed when dropped.
pub struct PrivateCluster {
    pub port: u16,
    pub data: std::path::PathBuf,
    /// The standby's port, once `standby("start")` ran.
    pub standby_port: Option<u16>,
}

impl PrivateCluster {
    /// A cluster on `port` in `.dev/<name>` (left over from an earlier run: removed first).
    pub fn new(name: &str, port: u16) -> PrivateCluster {
        let data =
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.dev")).join(name);
        let c = PrivateCluster {
            port,
            data,
            standby_port: None,
        };
        c.remove();
        c
    }

    fn script(&self, args: &[&str]) -> String {
        let mut cmd =
            std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/db"));
        cmd.args(args)
            .env("EMBED_WORKER_DB_PORT", self.port.to_string())
            .env("EMBED_WORKER_DB_DATA", &self.data);
        if let Some(p) = self.standby_port {
            cmd.env("EMBED_WORKER_STANDBY_PORT", p.to_string());
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "scripts/db {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or("")
            .to_string()
    }

    /// `scripts/db <action>` for this cluster; its last line (the URL for `start`).
    pub fn db(&self, action: &str) -> String {
        self.script(&[action])
    }

    /// `scripts/db standby <action>`; its last line (the standby's URL for `start`).
    pub fn standby(&mut self, action: &str) -> String {
        if self.standby_port.is_none() {
            self.standby_port = Some(free_port());
        }
        self.script(&["standby", action])
    }

    fn remove(&self) {
        let base = self.data.to_string_lossy().to_string();
        for suffix in [
            "",
            ".log",
            ".run",
            ".standby",
            ".standby.log",
            ".standby.run",
        ] {
            let p = std::path::PathBuf::from(format!("{base}{suffix}"));
            let _ = std::fs::remove_dir_all(&p);
            let _ = std::fs::remove_file(&p);
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.standby_port.is_some() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.standby("stop")));
        }
        let _ = std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/db"))
            .arg("stop")
            .env("EMBED_WORKER_DB_PORT", self.port.to_string())
            .env("EMBED_WORKER_DB_DATA", &self.data)
            .output();
        self.remove();
    }
}

/// Child processes killed when dropped: a failed assertion must not leave workers running
/// against a database that is about to be dropped.
pub struct Reaper(pub Vec<std::process::Child>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A transaction as `app_user`, signed in as `user` (`auth.uid()`), as the app's requests are.
pub async fn app_user_tx(
    t: &TestDb,
    user: uuid::Uuid,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = t.admin.begin().await.unwrap();
    sqlx::query("SET LOCAL ROLE app_user")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SELECT set_config('request.jwt.claim.sub', $1, true)")
        .bind(user.to_string())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Runs one statement as `app_user` for `user` and returns its result.
pub async fn app_user_statement(
    t: &TestDb,
    user: uuid::Uuid,
    sql: &'static str,
) -> Result<u64, sqlx::Error> {
    let mut tx = app_user_tx(t, user).await;
    sqlx::query(sql)
        .execute(&mut *tx)
        .await
        .map(|r| r.rows_affected())
}

/// Debian's PgBouncer in front of the dev server, as Neon's and Supabase's poolers stand in
/// front of theirs: `mode` is `session` or `transaction`, `server_conns` the server connections
/// it may open to each database (every client shares them). Stopped when dropped.
pub struct Pooler {
    pub port: u16,
    pub dir: std::path::PathBuf,
    child: std::process::Child,
}

impl Pooler {
    /// Starts it; `users` may log in through it (trust, as the dev server's own rules).
    pub fn start(mode: &str, server_conns: u32, users: &[&str]) -> Pooler {
        let bin = ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("pgbouncer is not installed (scripts/test installs Debian's package)");
        let base = admin_url();
        let server_port = base
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split('/').next())
            .expect("admin url has a port")
            .to_string();
        let dir = std::env::temp_dir().join(format!("pooler-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let auth: String = std::iter::once("postgres")
            .chain(users.iter().copied())
            .map(|u| format!("\"{u}\" \"\"\n"))
            .collect();
        std::fs::write(dir.join("users.txt"), auth).unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n* = host=127.0.0.1 port={server_port}\n\n[pgbouncer]\n\
                 listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
                 auth_type = trust\nauth_file = {auth}\npool_mode = {mode}\n\
                 default_pool_size = {server_conns}\nmax_db_connections = {server_conns}\n\
                 max_client_conn = 400\nignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {log}\npidfile = {pid}\n",
                auth = dir.join("users.txt").display(),
                log = dir.join("pgbouncer.log").display(),
                pid = dir.join("pgbouncer.pid").display(),
            ),
        )
        .unwrap();
        // PgBouncer refuses to run as root: as the cluster's own OS user then (scripts/db).
        let root = is_root();
        if root {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let ini = dir.join("pgbouncer.ini");
        let mut cmd = if root {
            let user = std::env::var("EMBED_WORKER_DB_USER").unwrap_or_else(|_| "embedpg".into());
            // setpriv execs (runuser would stay as the parent, and a kill would orphan it).
            let mut c = std::process::Command::new("setpriv");
            c.args([
                &format!("--reuid={user}"),
                &format!("--regid={user}"),
                "--init-groups",
                bin,
            ])
            .arg(&ini);
            c
        } else {
            let mut c = std::process::Command::new(bin);
            c.arg(&ini);
            c
        };
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting pgbouncer");
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "pgbouncer did not listen on {port}: {}",
                std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Pooler { port, dir, child }
    }

    /// `url` (a test database's) with its host and port replaced by the pooler's, as `user`.
    pub fn url(&self, url: &str, user: &str) -> String {
        let db = url.rsplit_once('/').expect("url has a path").1;
        format!("postgres://{user}@127.0.0.1:{}/{db}", self.port)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Pooler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A new empty directory under the system's temporary one (the caller removes it when done).
pub fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "embed-worker-test-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The database's whole catalog outside the system schemas, one line each: schemas,
/// extensions, types (ENUM labels), relations (kind, RLS, options, rights, relfilenode),
/// columns, indexes, constraints, triggers, policies and functions; plus each table's row
/// count. Two snapshots compare equal only if nothing was changed.
pub async fn whole_catalog(pool: &PgPool) -> Vec<String> {
    let mut lines: Vec<String> = sqlx::query_scalar(
        "WITH ns AS (SELECT oid, nspname FROM pg_namespace
                      WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
                        AND nspname NOT LIKE 'pg_temp%' AND nspname NOT LIKE 'pg_toast_temp%')
         SELECT 'schema ' || nspname FROM ns
         UNION ALL SELECT 'extension ' || extname || ' ' || extversion FROM pg_extension
         UNION ALL
         SELECT 'type ' || t.oid::regtype || ' ' || t.typtype::text || ' '
                || coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                               FROM pg_enum e WHERE e.enumtypid = t.oid), '')
           FROM pg_type t WHERE t.typnamespace IN (SELECT oid FROM ns) AND t.typrelid = 0
         UNION ALL
         SELECT 'rel ' || c.oid::regclass || ' ' || c.relkind::text || ' ' || c.relrowsecurity
                || ' ' || coalesce(c.reloptions::text, '') || ' ' || coalesce(c.relacl::text, '')
                || ' ' || c.relfilenode || ' ' || pg_get_userbyid(c.relowner)
           FROM pg_class c WHERE c.relnamespace IN (SELECT oid FROM ns)
         UNION ALL
         SELECT 'col ' || a.attrelid::regclass || '.' || a.attname || ' '
                || format_type(a.atttypid, a.atttypmod) || ' ' || a.attnotnull || ' '
                || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
           FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
           LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
          WHERE c.relnamespace IN (SELECT oid FROM ns) AND a.attnum > 0 AND NOT a.attisdropped
         UNION ALL
         SELECT 'index ' || pg_get_indexdef(i.indexrelid) || ' ' || i.indisvalid
           FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
          WHERE c.relnamespace IN (SELECT oid FROM ns)
         UNION ALL
         SELECT 'constraint ' || k.conrelid::regclass || ' ' || k.conname || ' '
                || pg_get_constraintdef(k.oid) || ' ' || k.convalidated
           FROM pg_constraint k WHERE k.connamespace IN (SELECT oid FROM ns)
         UNION ALL
         SELECT 'trigger ' || pg_get_triggerdef(g.oid) || ' ' || g.tgenabled::text
           FROM pg_trigger g JOIN pg_class c ON c.oid = g.tgrelid
          WHERE NOT g.tgisinternal AND c.relnamespace IN (SELECT oid FROM ns)
         UNION ALL
         SELECT 'policy ' || pol.polrelid::regclass || ' ' || pol.polname || ' '
                || coalesce(pg_get_expr(pol.polqual, pol.polrelid), '') || ' '
                || coalesce(pg_get_expr(pol.polwithcheck, pol.polrelid), '') || ' ' || pol.polroles::text
           FROM pg_policy pol
         UNION ALL
         SELECT 'fn ' || p.oid::regprocedure || ' ' || md5(p.prosrc) || ' ' || p.prosecdef
                || ' ' || coalesce(p.proconfig::text, '') || ' ' || coalesce(p.proacl::text, '')
           FROM pg_proc p WHERE p.pronamespace IN (SELECT oid FROM ns)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT c.oid::regclass::text FROM pg_class c
          WHERE c.relkind IN ('r', 'p')
            AND c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for t in tables {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {t}")))
            .fetch_one(pool)
            .await
            .unwrap();
        lines.push(format!("rows {t} {n}"));
    }
    lines.sort();
    lines
}

/// [`whole_catalog`] without the relations' file numbers: what two databases migrated the same
/// way have in common.
pub async fn catalog_shape(pool: &PgPool) -> Vec<String> {
    whole_catalog(pool)
        .await
        .into_iter()
        .map(|line| {
            if !line.starts_with("rel ") {
                return line;
            }
            let mut words: Vec<&str> = line.split(' ').collect();
            let file = words.len() - 2;
            words.remove(file);
            words.join(" ")
        })
        .collect()
}

/// A unit vector near one of 20 centres, `spread` the noise's weight (real embeddings cluster
/// by topic).
pub fn clustered_vector(i: usize, dims: usize, spread: f32) -> Vec<f32> {
    let centre = embed_worker::fake_openai::fake_vector(&format!("centre {}", i % 20), dims);
    let noise = embed_worker::fake_openai::fake_vector(&format!("noise {i}"), dims);
    let v: Vec<f32> = centre
        .iter()
        .zip(&noise)
        .map(|(c, n)| c + spread * n)
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}
