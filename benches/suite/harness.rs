//! Harness: databases, COPY, worker and fake processes, their usage and metrics.

#[allow(unused_imports)]
use super::*;

// The tests' harness: the dev server's URL and a free port are one function each, shared.
pub(crate) use crate::helpers::{admin_url, free_port};

/// A new database `bench_<tag>_<pid>`, nothing in it.
pub(crate) async fn empty_db(tag: &str) -> (String, PgPool) {
    let name = format!("bench_{tag}_{}", std::process::id());
    let server = db::connect_as_login(&admin_url()).await.unwrap();
    for stmt in [
        format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        format!("CREATE DATABASE {name}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
            .execute(&server)
            .await
            .unwrap();
    }
    let (prefix, _) = admin_url()
        .rsplit_once('/')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
    let url = format!("{prefix}/{name}");
    let pool = db::connect(&DatabaseSettings {
        url: url.clone(),
        max_connections: 16,
        role: String::new(),
        acquire_timeout_secs: 30,
    })
    .await
    .unwrap();
    (url, pool)
}

/// [`empty_db`], migrated, capture off, the bench model registered.
pub(crate) async fn fresh_db(tag: &str) -> (String, PgPool) {
    let (url, pool) = empty_db(tag).await;
    db::migrate(&pool).await.unwrap();
    db::apply_capture(&pool, false, false).await.unwrap();
    // The bench model's partition (rows are COPYed in before any worker registers it).
    let spec = model_index::IndexSpec::new(MODEL, DIMS, IndexPrecision::Auto).unwrap();
    model_index::lifecycle::ensure(&pool, &spec).await.unwrap();
    (url, pool)
}

pub(crate) async fn drop_db(url: &str) {
    let name = url.rsplit('/').next().unwrap().to_string();
    let server = db::connect_as_login(&admin_url()).await.unwrap();
    let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&server)
    .await;
}

pub(crate) async fn insert_sessions(pool: &PgPool, users: &[Uuid], notes: &[String]) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(notes.len());
    for (ci, chunk) in notes.chunks(2000).enumerate() {
        let u: Vec<Uuid> = (0..chunk.len())
            .map(|i| users[(ci * 2000 + i) % users.len()])
            .collect();
        let got: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO sessions (user_id, focus, depth, title, notes)
             SELECT u, 'harmony', 'standard', 'session', n FROM unnest($1::uuid[], $2::text[]) WITH ORDINALITY AS x(u, n, o)
             ORDER BY o RETURNING id",
        )
        .bind(&u)
        .bind(chunk)
        .fetch_all(pool)
        .await
        .unwrap();
        ids.extend(got);
    }
    ids
}

/// One titled session per entry of `users` (its owner), in order: what rows point at.
pub(crate) async fn sessions(pool: &PgPool, users: &[Uuid]) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(users.len());
    for chunk in users.chunks(20_000) {
        let got: Vec<Uuid> = sqlx::query_scalar(
            "INSERT INTO sessions (user_id, title) SELECT u, 's' FROM unnest($1::uuid[]) WITH ORDINALITY AS x(u, o) ORDER BY o RETURNING id",
        )
        .bind(chunk)
        .fetch_all(pool)
        .await
        .unwrap();
        ids.extend(got);
    }
    ids
}

/// One row per id (chunk 0), vectors from `vector(i)`, by COPY in parts of 10,000.
pub(crate) async fn load_vectors(pool: &PgPool, ids: &[Uuid], vector: impl Fn(usize) -> Vec<f32>) {
    for (ci, chunk) in ids.chunks(10_000).enumerate() {
        let rows: Vec<EmbRow> = chunk
            .iter()
            .enumerate()
            .map(|(j, id)| EmbRow {
                source_id: *id,
                chunk: 0,
                hash: "h".into(),
                vector: vector(ci * 10_000 + j),
                tokens: 100,
            })
            .collect();
        copy_rows(pool, &rows).await;
    }
}

/// `VACUUM ANALYZE rag_embeddings`: a loaded table as it is before its index is built.
pub(crate) async fn vacuum_analyze(pool: &PgPool) {
    sqlx::raw_sql("VACUUM ANALYZE rag_embeddings")
        .execute(pool)
        .await
        .unwrap();
}

/// One row of rag_embeddings for COPY.
pub(crate) struct EmbRow {
    pub(crate) source_id: Uuid,
    pub(crate) chunk: i32,
    pub(crate) hash: String,
    pub(crate) vector: Vec<f32>,
    pub(crate) tokens: i32,
}

/// PostgreSQL binary COPY of rows into rag_embeddings: the ceiling of the write path.
pub(crate) async fn copy_rows(pool: &PgPool, rows: &[EmbRow]) -> Duration {
    // The same binary encoding the worker streams; here sent as one buffer straight into the table.
    let mut enc = embed_worker::pipeline::write::CopyRows::new();
    for r in rows {
        enc.row(8);
        enc.field(b"session");
        enc.field(r.source_id.as_bytes());
        enc.field(&r.chunk.to_be_bytes());
        enc.field(r.hash.as_bytes());
        enc.vector(&r.vector);
        enc.field(MODEL.as_bytes());
        enc.field(&(r.vector.len() as i32).to_be_bytes());
        enc.field(&r.tokens.to_be_bytes());
    }
    let buf = enc.finish();
    let mut conn = pool.acquire().await.unwrap();
    let started = Instant::now();
    let mut copy = conn
        .copy_in_raw(
            "COPY rag_embeddings (source_type, source_id, chunk_index, content_hash, embedding, embedding_model, dimensions, token_count) FROM STDIN (FORMAT binary)",
        )
        .await
        .unwrap();
    for part in buf.chunks(1 << 20) {
        copy.send(part).await.unwrap();
    }
    copy.finish().await.unwrap();
    started.elapsed()
}

// --------------------------------------------------------------------------- processes ---

pub(crate) struct Usage {
    pub(crate) wall: Duration,
    pub(crate) cpu: Duration,
    pub(crate) max_rss_kb: i64,
    pub(crate) stdout: String,
}

/// Waits for `child` and returns its CPU time (wait4) and peak RSS (VmHWM).
///
/// Why not wait4's `ru_maxrss`: Linux carries the pre-exec high-water mark into it, and a
/// child forked from this harness starts as a copy of the harness, corpus and all (measured:
/// 127 MB reported for a worker whose VmHWM was 71 MB). VmHWM belongs to the exec'd image alone;
/// it only grows, so the last value read before exit is the peak (give or take the last 20 ms).
pub(crate) fn wait_usage(child: std::process::Child, started: Instant) -> Usage {
    let pid = child.id() as i32;
    let hwm = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let sampler = {
        let hwm = hwm.clone();
        std::thread::spawn(move || {
            while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let Some(kb) = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
                else {
                    break; // exited: the memory map is gone
                };
                hwm.fetch_max(kb, std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut stdout = child.stdout;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(out) = stdout.as_mut() {
            use std::io::Read;
            let _ = out.read_to_string(&mut s);
        }
        s
    });
    let mut status = 0;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child; status and ru are valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    assert_eq!(r, pid, "wait4");
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Usage {
        wall: started.elapsed(),
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        max_rss_kb: {
            let _ = sampler.join();
            hwm.load(std::sync::atomic::Ordering::Relaxed)
        },
        stdout: reader.join().unwrap(),
    }
}

pub(crate) struct Fake(std::process::Child);
impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start_fake(args: &[String]) -> (Fake, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_fake-openai"))
        .arg("--port")
        .arg(port.to_string())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/v1");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (Fake(child), url)
}

pub(crate) fn worker_cmd(db_url: &str, api: &str, extra: &[(&str, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_embed-worker"));
    c.env("DATABASE_URL", db_url)
        .env("EMBED_WORKER__API__BASE_URL", api)
        .env("EMBED_WORKER__DATABASE__ROLE", "embed_worker")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in extra {
        c.env(k, v);
    }
    c
}

pub(crate) fn parse_summary(stdout: &str, key: &str) -> u64 {
    stdout
        .split([',', '\n'])
        .find_map(|part| {
            part.trim().strip_prefix(key).and_then(|v| {
                v.trim_start_matches(':')
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

pub(crate) async fn scrape(port: u16, metric: &str) -> f64 {
    let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(metric) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub(crate) async fn scrape_filtered(port: u16, metric: &str, needle: &str) -> f64 {
    let Ok(resp) = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(metric) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ------------------------------------------------------------------------------ sections ---
