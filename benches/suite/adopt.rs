//! Adopt: `embed-worker migrate` on the app's own database (issue 30): the review's schema
//! (tests/data/app_schema_0012_0014.sql) with N ada-002 vectors and their HNSW index, adopted in
//! place. Measured: migrate's time, and what a reader of the app's sees meanwhile (a lookup by
//! source id on `rag_embeddings` in a loop, before, during and after: the longest wait). Checked:
//! the heap and the index keep their files (nothing rewritten or rebuilt).

use super::*;

const APP_SCHEMA: &str = include_str!("../../tests/data/app_schema_0012_0014.sql");

/// `rows` sessions of 100 users, and one ada-002 vector each in the app's table (clustered
/// vectors, as the search section's), by binary COPY in parts of 20,000.
async fn load(pool: &PgPool, rows: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..rows).map(|_| Uuid::new_v4()).collect();
    sqlx::query(
        "INSERT INTO sessions (id, user_id, title, notes, updated_at)
         SELECT id, ('00000000-0000-0000-0000-0000000000' || lpad((n % 100)::text, 2, '0'))::uuid,
                'Session ' || n, 'notes of session ' || n, now() - interval '1 day'
           FROM unnest($1::uuid[]) WITH ORDINALITY AS u(id, n)",
    )
    .bind(&ids)
    .execute(pool)
    .await
    .unwrap();
    let mut rng = StdRng::seed_from_u64(17);
    let centres: Vec<Vec<f32>> = (0..100)
        .map(|c| fake_vector(&format!("adopt centre {c}"), DIMS))
        .collect();
    for (p, part) in ids.chunks(20_000).enumerate() {
        let mut enc = embed_worker::pipeline::write::CopyRows::new();
        for (i, id) in part.iter().enumerate() {
            let c = &centres[(p * 20_000 + i) % centres.len()];
            let v: Vec<f32> = c
                .iter()
                .map(|x| x + rng.random_range(-0.02..0.02))
                .collect();
            enc.row(4);
            enc.field(b"session");
            enc.field(id.as_bytes());
            enc.field(b"the text the app embedded");
            enc.vector(&v);
        }
        let buf = enc.finish();
        let mut conn = pool.acquire().await.unwrap();
        let mut copy = conn
            .copy_in_raw(
                "COPY rag_embeddings (source_type, source_id, content, embedding) FROM STDIN (FORMAT binary)",
            )
            .await
            .unwrap();
        for chunk in buf.chunks(1 << 20) {
            copy.send(chunk).await.unwrap();
        }
        copy.finish().await.unwrap();
    }
    ids
}

async fn files(pool: &PgPool, table: &str) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT relfilenode::int8 FROM pg_class WHERE oid = to_regclass($1)),
                (SELECT relfilenode::int8 FROM pg_class
                  WHERE oid = to_regclass('public.idx_rag_embeddings_vector'))",
    )
    .bind(format!("public.{table}"))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// The app's database of `rows` rows, made once and kept as a template database
/// (`bench_adopt_app_<rows>`: loading 500,000 vectors and building their index takes ~13 min
/// here); each run measures a copy of it. Returns the time the loading and the build took when
/// made now.
async fn app_database(rows: usize) -> (String, Option<(f64, f64)>) {
    let template = format!("bench_adopt_app_{rows}");
    let server = db::connect_as_login(&admin_url()).await.unwrap();
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&template)
            .fetch_one(&server)
            .await
            .unwrap();
    if exists {
        return (template, None);
    }
    let (url, pool) = empty_db("adopt_make").await;
    // The app's schema without its 40 demo rows, then N of its own.
    let schema = APP_SCHEMA
        .split("-- The app's data:")
        .next()
        .unwrap()
        .to_string();
    sqlx::raw_sql(sqlx::AssertSqlSafe(schema))
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql("DROP INDEX idx_rag_embeddings_vector")
        .execute(&pool)
        .await
        .unwrap();
    eprintln!("adopt: loading {rows} app rows …");
    let started = Instant::now();
    load(&pool, rows).await;
    let load_secs = started.elapsed().as_secs_f64();
    eprintln!("adopt: building the app's HNSW index over {rows} rows …");
    let started = Instant::now();
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql(
        "SET maintenance_work_mem = '6GB'; SET max_parallel_maintenance_workers = 1;
         SET min_parallel_table_scan_size = 0;
         CREATE INDEX idx_rag_embeddings_vector ON rag_embeddings
             USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    let build_secs = started.elapsed().as_secs_f64();
    for stmt in ["VACUUM ANALYZE rag_embeddings", "CHECKPOINT"] {
        sqlx::raw_sql(stmt).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let made = url.rsplit('/').next().unwrap().to_string();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {made} RENAME TO {template}"
    )))
    .execute(&server)
    .await
    .unwrap();
    (template, Some((load_secs, build_secs)))
}

pub(crate) async fn bench_adopt(report: &mut Report, rows: usize) {
    let section = format!("adopt {}K", rows / 1000);
    let (template, made) = app_database(rows).await;
    let (url, pool) = empty_db("adopt").await;
    pool.close().await;
    let name = url.rsplit('/').next().unwrap().to_string();
    let server = db::connect_as_login(&admin_url()).await.unwrap();
    let started = Instant::now();
    for stmt in [
        format!("DROP DATABASE {name}"),
        format!("CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
            .execute(&server)
            .await
            .unwrap();
    }
    eprintln!(
        "adopt: copied {template} in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let pool = db::connect_as_login(&url).await.unwrap();
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT source_id FROM rag_embeddings")
        .fetch_all(&pool)
        .await
        .unwrap();
    let pool = &pool;
    let url = url.as_str();
    let before = files(pool, "rag_embeddings").await;

    // The app's reader: one lookup by source id after another, from before migrate to after.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let pool = pool.clone();
        let ids = ids.clone();
        tokio::spawn(async move {
            let mut waits = Vec::new();
            let mut errors = 0u64;
            let mut i = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let r: sqlx::Result<Option<Uuid>> =
                    sqlx::query_scalar("SELECT id FROM rag_embeddings WHERE source_id = $1")
                        .bind(ids[(i * 7919) % ids.len()])
                        .fetch_optional(&pool)
                        .await;
                if r.is_err() {
                    errors += 1;
                }
                waits.push(t.elapsed().as_secs_f64() * 1000.0);
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (waits, errors)
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("adopt: migrate …");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_embed-worker"))
        .env("DATABASE_URL", url)
        .env("EMBED_WORKER__RENDER__TEMPLATE", "{question_text}")
        .env("EMBED_WORKER__RENDER__SESSION", "{title}: {notes}")
        .args(["migrate"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let migrate_secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (waits, errors) = reader.await.unwrap();
    let part = model_index::partition_name(MODEL);
    let after = files(pool, &part).await;
    let longest = waits.iter().cloned().fold(0.0, f64::max);
    let (p50, p99, _) = ms_stats(waits.clone());

    if let Some((load_secs, build_secs)) = made {
        report.add(
            &section,
            format!("app's data: load {rows} rows / build its HNSW index"),
            format!("{load_secs:.0} s / {build_secs:.0} s"),
            "",
            None,
        );
    }
    report.add(
        &section,
        "migrate (plan, prepare, migrations + attach)",
        format!("{migrate_secs:.1} s"),
        "seconds",
        Some(migrate_secs < 60.0),
    );
    report.add(
        &section,
        format!("app reader: longest wait ({} reads)", waits.len()),
        format!("{longest:.0} ms (p50 {p50:.1}, p99 {p99:.1})"),
        "< ~1 s",
        Some(longest < 1000.0),
    );
    report.add(
        &section,
        "app reader: errors",
        errors.to_string(),
        "0",
        Some(errors == 0),
    );
    report.add(
        &section,
        "heap and HNSW index files kept",
        format!("{}", before == after),
        "true",
        Some(before == after),
    );
    pool.close().await;
    drop_db(url).await;
}
