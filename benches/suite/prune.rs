//! Prune: retiring a model of N rows, as the single table did it (DELETE, then the VACUUM that
//! autovacuum must run afterwards) and as the partitioned table does (`models prune`: DETACH
//! PARTITION CONCURRENTLY + DROP TABLE), side by side in one database: time and WAL bytes.
//!
//! The single table is rebuilt here from its old definition (migration 1 before migration 13):
//! the pruned model's rows beside another model's, whose HNSW partial index every VACUUM scans.
//! The pruned model's own index is not built in either layout: the old prune dropped it (instant)
//! after its DELETE, the new one drops it with the partition.

use super::*;

const OLD_MODEL: &str = "text-embedding-retired";
const KEPT_ROWS: usize = 20_000;

/// WAL written since `from` (bytes).
async fn wal_since(pool: &PgPool, from: &str) -> f64 {
    sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - $1::pg_lsn)::float8")
        .bind(from)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn lsn(pool: &PgPool) -> String {
    sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// `rows` rows of `model` (clustered vectors, as the search section's) by binary COPY into
/// `table`, in parts of 20,000.
async fn load(pool: &PgPool, table: &str, model: &str, ids: &[Uuid], rows: usize) {
    let mut rng = StdRng::seed_from_u64(11);
    let centres: Vec<Vec<f32>> = (0..100)
        .map(|c| fake_vector(&format!("prune centre {c}"), DIMS))
        .collect();
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(20_000);
        let mut enc = embed_worker::pipeline::write::CopyRows::new();
        for i in done..done + n {
            let c = &centres[i % centres.len()];
            let v: Vec<f32> = c
                .iter()
                .map(|x| x + rng.random_range(-0.02..0.02))
                .collect();
            enc.row(8);
            enc.field(b"session");
            enc.field(ids[i % ids.len()].as_bytes());
            enc.field(&((i / ids.len()) as i32).to_be_bytes());
            enc.field(b"h");
            enc.vector(&v);
            enc.field(model.as_bytes());
            enc.field(&(DIMS as i32).to_be_bytes());
            enc.field(&10i32.to_be_bytes());
        }
        let buf = enc.finish();
        let mut conn = pool.acquire().await.unwrap();
        let mut copy = conn
            .copy_in_raw(&format!(
                "COPY {table} (source_type, source_id, chunk_index, content_hash, embedding, embedding_model, dimensions, token_count) FROM STDIN (FORMAT binary)"
            ))
            .await
            .unwrap();
        for part in buf.chunks(1 << 20) {
            copy.send(part).await.unwrap();
        }
        copy.finish().await.unwrap();
        done += n;
    }
}

pub(crate) async fn bench_prune(report: &mut Report, pool: &PgPool, rows: usize) {
    let section = format!("prune {}K", rows / 1000);
    let users: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    let notes: Vec<String> = (0..10_000).map(|i| format!("session {i}")).collect();
    let ids = insert_sessions(pool, &users, &notes).await;
    let kept = model_index::IndexSpec::new(MODEL, DIMS, IndexPrecision::Auto).unwrap();

    // Before: the single table, as migration 1 made it, with the kept model's partial index.
    eprintln!("prune: single table, loading {rows} + {KEPT_ROWS} rows …");
    sqlx::raw_sql(
        "CREATE TABLE flat (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             source_type embedding_source NOT NULL, source_id uuid NOT NULL,
             chunk_index integer NOT NULL DEFAULT 0 CHECK (chunk_index >= 0),
             content_hash text NOT NULL, embedding vector NOT NULL,
             embedding_model varchar(100) NOT NULL, dimensions integer NOT NULL,
             token_count integer NOT NULL CHECK (token_count >= 0),
             created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),
             CONSTRAINT flat_dimensions_match CHECK (dimensions = vector_dims(embedding)),
             CONSTRAINT flat_source_chunk_key UNIQUE (source_type, source_id, embedding_model, chunk_index))",
    )
    .execute(pool)
    .await
    .unwrap();
    load(pool, "flat", MODEL, &ids, KEPT_ROWS).await;
    load(pool, "flat", OLD_MODEL, &ids, rows).await;
    // One statement each: VACUUM cannot run in the implicit transaction of a multi-statement.
    for stmt in [
        format!(
            "CREATE INDEX flat_kept ON flat USING hnsw ((embedding::vector({DIMS})) vector_cosine_ops)
                 WITH (m = 16, ef_construction = 64) WHERE embedding_model = '{MODEL}'"
        ),
        "VACUUM ANALYZE flat".into(),
        "CHECKPOINT".into(),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
            .execute(pool)
            .await
            .unwrap();
    }
    let from = lsn(pool).await;
    let started = Instant::now();
    let deleted = sqlx::query("DELETE FROM flat WHERE embedding_model = $1")
        .bind(OLD_MODEL)
        .execute(pool)
        .await
        .unwrap()
        .rows_affected();
    let delete_s = started.elapsed().as_secs_f64();
    let delete_wal = wal_since(pool, &from).await;
    assert_eq!(deleted as usize, rows);
    let from = lsn(pool).await;
    let started = Instant::now();
    sqlx::raw_sql("VACUUM flat").execute(pool).await.unwrap();
    let vacuum_s = started.elapsed().as_secs_f64();
    let vacuum_wal = wal_since(pool, &from).await;
    report.add(
        &section,
        "single table: DELETE of the model's rows — time / WAL",
        format!("{delete_s:.2} s / {:.0} MB", delete_wal / 1e6),
        "",
        None,
    );
    report.add(
        &section,
        "single table: the VACUUM it leaves (autovacuum's work) — time / WAL",
        format!("{vacuum_s:.2} s / {:.0} MB", vacuum_wal / 1e6),
        "",
        None,
    );
    sqlx::raw_sql("DROP TABLE flat")
        .execute(pool)
        .await
        .unwrap();
    sqlx::raw_sql("CHECKPOINT").execute(pool).await.unwrap();

    // After: one partition per model; `models prune` detaches and drops the retired one.
    eprintln!("prune: partitioned, loading {rows} + {KEPT_ROWS} rows …");
    model_index::lifecycle::ensure(pool, &kept).await.unwrap();
    let old = model_index::IndexSpec::new(OLD_MODEL, DIMS, IndexPrecision::Auto).unwrap();
    model_index::lifecycle::ensure(pool, &old).await.unwrap();
    load(pool, "rag_embeddings", MODEL, &ids, KEPT_ROWS).await;
    load(pool, "rag_embeddings", OLD_MODEL, &ids, rows).await;
    for stmt in [
        kept.create_sql(false),
        "VACUUM ANALYZE rag_embeddings".into(),
        "CHECKPOINT".into(),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(stmt))
            .execute(pool)
            .await
            .unwrap();
    }
    let from = lsn(pool).await;
    let started = Instant::now();
    let pruned = model_index::prune(pool, OLD_MODEL).await.unwrap();
    let prune_s = started.elapsed().as_secs_f64();
    let prune_wal = wal_since(pool, &from).await;
    assert_eq!(pruned as usize, rows);
    report.add(
        &section,
        "partitioned: `models prune` (DETACH CONCURRENTLY + DROP) — time / WAL",
        format!("{prune_s:.3} s / {:.3} MB", prune_wal / 1e6),
        "< 1 s",
        Some(prune_s < 1.0),
    );
    report.add(
        &section,
        "WAL: single table (DELETE + VACUUM) ÷ partitioned prune",
        format!("{:.0}×", (delete_wal + vacuum_wal) / prune_wal.max(1.0)),
        "",
        None,
    );
}
