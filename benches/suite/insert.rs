//! Build and insert: the deferred HNSW build alone (precision × parallel workers), and the
//! design's 100-row insert through the worker's write path over 1, 2 and 4 streams.

#[allow(unused_imports)]
use super::*;

/// `n` owners for sessions, 1,000 users round robin.
fn users(n: usize) -> Vec<Uuid> {
    (0..n)
        .map(|i| Uuid::from_u128(i as u128 % 1000 + 1))
        .collect()
}

/// The worker's build (its own connection, the build lock, memory sized to the graph,
/// `min_parallel_table_scan_size = 0`) with `workers` parallel maintenance workers: seconds.
async fn build(pool: &PgPool, spec: &model_index::IndexSpec, workers: Option<u32>) -> f64 {
    let mut cfg = Settings::load(None).unwrap().index;
    if let Some(w) = workers {
        cfg.build_parallel_workers = embed_worker::config::BuildWorkers::Fixed(w);
    }
    match model_index::build::build(pool, spec, &cfg, None)
        .await
        .unwrap()
    {
        model_index::BuildOutcome::Built(_, secs) => secs,
        other => panic!("build: {other}"),
    }
}

async fn drop_model_indexes(pool: &PgPool) {
    for ix in model_index::vector_indexes(pool).await.unwrap() {
        if model_index::of_model(&ix, MODEL) {
            model_index::build::drop_index(pool, &ix.name)
                .await
                .unwrap();
        }
    }
}

/// (9) The deferred build alone over `n` rows of the fake provider's vectors (uniform on the
/// sphere: HNSW's worst case, what the e2e and switch runs write), `vector` and `halfvec`, with
/// 0 (serial), 1 and 2 parallel maintenance workers (`workers`).
pub(crate) async fn bench_build(report: &mut Report, pool: &PgPool, n: usize, workers: &[u32]) {
    let section = format!("build {}K", n / 1000);
    let ids = sessions(pool, &users(n)).await;
    drop_model_indexes(pool).await;
    let started = Instant::now();
    load_vectors(pool, &ids, |i| fake_vector(&format!("build {i}"), DIMS)).await;
    report.add(
        &section,
        format!("load {n} × {DIMS} fake-provider vectors (COPY, no index)"),
        format!("{:.1} s", started.elapsed().as_secs_f64()),
        "",
        None,
    );
    vacuum_analyze(pool).await;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    for precision in [IndexPrecision::Full, IndexPrecision::Half] {
        let spec = model_index::IndexSpec::new(MODEL, DIMS, precision).unwrap();
        for &w in workers {
            let secs = build(pool, &spec, Some(w)).await;
            report.add(
                &section,
                format!(
                    "{} build, {w} parallel worker(s) + leader ({cores} cores)",
                    spec.index_type()
                ),
                format!("{secs:.1} s"),
                "",
                None,
            );
            drop_model_indexes(pool).await;
        }
    }
}

/// (10) The design's "bulk embedding insert (100)": 100 new rows into `n` rows with a live
/// index, through the worker's write path with 1, 2 and 4 streams, and by one raw COPY;
/// `vector` then `halfvec`. Fresh clustered vectors each time (a vector already in the graph
/// takes pgvector's duplicate shortcut).
pub(crate) async fn bench_insert(report: &mut Report, pool: &PgPool, n: usize) {
    let section = format!("insert {}K", n / 1000);
    let ids = sessions(pool, &users(n + 100)).await;
    let (ids, new_ids) = ids.split_at(n);
    drop_model_indexes(pool).await;
    let started = Instant::now();
    load_vectors(pool, ids, clustered).await;
    report.add(
        &section,
        format!("load {n} × {DIMS} clustered vectors (COPY, no index)"),
        format!("{:.1} s", started.elapsed().as_secs_f64()),
        "",
        None,
    );
    vacuum_analyze(pool).await;
    let read_at: HashMap<Uuid, chrono::DateTime<chrono::Utc>> =
        sqlx::query_as::<_, (Uuid, chrono::DateTime<chrono::Utc>)>(
            "SELECT id, updated_at FROM sessions WHERE id = ANY($1)",
        )
        .bind(new_ids)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let default_streams = Settings::load(None).unwrap().write.streams;
    let mut fresh = 40_000_000usize;
    let mut next_vectors = || -> Vec<Vec<f32>> {
        fresh += 100;
        (0..100).map(|j| clustered(fresh + j)).collect()
    };
    let clear = || async {
        sqlx::query("DELETE FROM rag_embeddings WHERE source_id = ANY($1)")
            .bind(new_ids)
            .execute(pool)
            .await
            .unwrap();
    };
    for precision in [IndexPrecision::Full, IndexPrecision::Half] {
        let spec = model_index::IndexSpec::new(MODEL, DIMS, precision).unwrap();
        let ty = spec.index_type();
        let secs = build(pool, &spec, None).await;
        report.add(
            &section,
            format!("{ty} build (the worker's, index.build_parallel_workers as shipped)"),
            format!("{secs:.1} s"),
            "",
            None,
        );
        // Warm the index and the partition as a running system has them.
        sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
            .execute(pool)
            .await
            .unwrap();
        for rel in [spec.name(), model_index::partition_name(MODEL)] {
            let _ = sqlx::query("SELECT pg_prewarm($1::regclass)")
                .bind(&rel)
                .execute(pool)
                .await;
        }
        for streams in [1usize, 2, 4] {
            let mut ms = Vec::new();
            for iter in 0..20 {
                let writes: Vec<SourceWrite> = new_ids
                    .iter()
                    .zip(next_vectors())
                    .map(|(id, v)| SourceWrite {
                        source: EmbedSource {
                            source_type: SourceType::Session,
                            source_id: *id,
                        },
                        read_at: read_at[id],
                        chunks: vec![ChunkWrite {
                            index: 0,
                            content_hash: format!("h{iter}"),
                            tokens: 100,
                            vector: Some(Vector::from(v)),
                        }],
                    })
                    .collect();
                let to = write::Target {
                    model: MODEL,
                    dimensions: DIMS,
                    queue: "embed",
                    max_attempts: 10,
                    touch: true,
                    streams,
                };
                let t = Instant::now();
                write::write_batch(pool, &to, &writes).await.unwrap();
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
                clear().await;
            }
            let (p50, p95, _) = ms_stats(ms);
            let shipped = if streams == default_streams {
                " (write.streams as shipped)"
            } else {
                ""
            };
            report.add(
                &section,
                format!("100 × {DIMS} into {ty} index, worker path, {streams} stream(s){shipped}: p50/p95"),
                format!("{p50:.1}/{p95:.1} ms"),
                "p95 < 500 ms",
                Some(p95 < 500.0),
            );
        }
        let mut ms = Vec::new();
        for iter in 0..20 {
            let rows: Vec<EmbRow> = new_ids
                .iter()
                .zip(next_vectors())
                .map(|(id, v)| EmbRow {
                    source_id: *id,
                    chunk: 0,
                    hash: format!("c{iter}"),
                    vector: v,
                    tokens: 100,
                })
                .collect();
            ms.push(copy_rows(pool, &rows).await.as_secs_f64() * 1000.0);
            clear().await;
        }
        let (p50, p95, _) = ms_stats(ms);
        report.add(
            &section,
            format!("100 × {DIMS} into {ty} index, one raw COPY: p50/p95"),
            format!("{p50:.1}/{p95:.1} ms"),
            "",
            None,
        );
        drop_model_indexes(pool).await;
    }
}
