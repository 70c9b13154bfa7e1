//! Real vectors (issue 33): recall and latency of the HNSW index on embeddings of real English
//! text, beside synthetic vectors of the same count and size. Every other search figure is on
//! generated vectors, unlike what a deployment stores.
//!
//! The corpus is Debian's package descriptions (`apt-cache dumpavail`, offline here: 63,697
//! one-line synopses, about 57,000 distinct — short real English, not paragraphs), embedded once with the local model (all-MiniLM-L6-v2, 384-d) and
//! cached under `.dev/real-vectors/`. Both sets are loaded as one model's sessions, half of them
//! one user's (the "large user" scope under RLS), indexed with the design's m = 16,
//! ef_construction = 64, and measured by the worker's own probe and `tune` sweep: the default
//! `ef_search` (100), then the smallest setting meeting 0.95 and 0.99.

use super::*;
use embed_worker::search::{probe, tune};

const REAL_MODEL: &str = "all-MiniLM-L6-v2";
const REAL_DIMS: usize = 384;

/// Up to `n` distinct package descriptions, 20 characters or more. Debian's Packages files hold
/// only each package's one-line synopsis (the long text is in Translation files, absent here).
fn debian_descriptions(n: usize) -> Vec<String> {
    let out = Command::new("apt-cache")
        .arg("dumpavail")
        .output()
        .expect("apt-cache dumpavail");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut seen = HashSet::new();
    let mut all = Vec::new();
    let mut current: Option<String> = None;
    let mut finish = |d: Option<String>, all: &mut Vec<String>| {
        if let Some(d) = d
            && d.len() >= 20
            && seen.insert(d.clone())
        {
            all.push(d);
        }
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Description: ") {
            finish(current.take(), &mut all);
            current = Some(rest.to_string());
        } else if let (Some(d), Some(rest)) = (current.as_mut(), line.strip_prefix(' ')) {
            let rest = rest.trim();
            if rest != "." {
                d.push(' ');
                d.push_str(rest);
            }
        } else {
            finish(current.take(), &mut all);
        }
        if all.len() >= n {
            break;
        }
    }
    finish(current.take(), &mut all);
    all.truncate(n);
    all
}

/// The texts' vectors: from the cache when it holds these texts, else embedded now (and cached).
async fn embed_cached(texts: &[String]) -> Vec<Vec<f32>> {
    let hash = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for t in texts {
            h.update(t.as_bytes());
            h.update([0]);
        }
        h.finalize()[..6]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev/real-vectors");
    let file = dir.join(format!("debian-{}-{hash}.f32", texts.len()));
    if let Ok(bytes) = std::fs::read(&file)
        && bytes.len() == texts.len() * REAL_DIMS * 4
    {
        return bytes
            .chunks(REAL_DIMS * 4)
            .map(|v| {
                v.chunks(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            })
            .collect();
    }
    let model = embed_worker::embed::local::LocalEmbedder::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev/models/all-MiniLM-L6-v2"),
    )
    .expect("scripts/fetch-model");
    let started = Instant::now();
    let mut out = Vec::with_capacity(texts.len());
    for (i, part) in texts.chunks(64).enumerate() {
        let e = model.embed(part.to_vec()).await.unwrap();
        out.extend(e.vectors);
        if i % 50 == 0 {
            eprintln!(
                "  embedded {} of {} ({:.0}/s)",
                out.len(),
                texts.len(),
                out.len() as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    std::fs::create_dir_all(&dir).unwrap();
    let bytes: Vec<u8> = out
        .iter()
        .flat_map(|v| v.iter().flat_map(|x| x.to_le_bytes()))
        .collect();
    std::fs::write(&file, bytes).unwrap();
    out
}

/// Loads `vectors` as `model`'s sessions (half of them one user's), builds the index, makes it
/// the serving model; returns the build time.
async fn load(pool: &PgPool, model: &str, vectors: &[Vec<f32>]) -> f64 {
    let large = Uuid::new_v4();
    let others: Vec<Uuid> = (0..200).map(|_| Uuid::new_v4()).collect();
    let users: Vec<Uuid> = (0..vectors.len())
        .map(|i| if i % 2 == 0 { large } else { others[i % 200] })
        .collect();
    let spec = model_index::IndexSpec::new(model, REAL_DIMS, IndexPrecision::Auto).unwrap();
    model_index::lifecycle::ensure(pool, &spec).await.unwrap();
    for (part, vs) in users.chunks(5000).zip(vectors.chunks(5000)) {
        let vs: Vec<Vector> = vs.iter().map(|v| Vector::from(v.clone())).collect();
        sqlx::query(
            "WITH s AS (INSERT INTO sessions (user_id, title)
                        SELECT u, 'x' FROM unnest($1::uuid[]) WITH ORDINALITY AS x(u, o) ORDER BY o
                        RETURNING id),
                  n AS (SELECT id, row_number() OVER () AS o FROM s)
             INSERT INTO rag_embeddings (source_type, source_id, content_hash, embedding,
                                         embedding_model, dimensions, token_count)
             SELECT 'session', n.id, 'h', v.v, $3, $4, 1
               FROM n JOIN unnest($2::vector[]) WITH ORDINALITY AS v(v, o) USING (o)",
        )
        .bind(part)
        .bind(&vs)
        .bind(model)
        .bind(REAL_DIMS as i32)
        .execute(pool)
        .await
        .unwrap();
    }
    let cfg = Settings::load(None).unwrap().index;
    let started = Instant::now();
    model_index::build::build(pool, &spec, &cfg, None)
        .await
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    model_index::lifecycle::promote(&mut pool.acquire().await.unwrap(), model, true, false)
        .await
        .unwrap();
    sqlx::raw_sql(
        "ANALYZE rag_embeddings; UPDATE embed_worker.search_settings SET exact_below = 1000",
    )
    .execute(pool)
    .await
    .unwrap();
    secs
}

/// The probe at the default, then `tune`'s sweep for 0.95 and 0.99, as report rows.
async fn measure(report: &mut Report, section: &str, pool: &PgPool, model: &str, kind: &str) {
    let p = probe::Probe {
        spec: model_index::IndexSpec::new(model, REAL_DIMS, IndexPrecision::Auto).unwrap(),
        k: 5,
        queries: 100,
        seed: 1,
        ef_search: None,
        max_scan_tuples: None,
    };
    let started = Instant::now();
    let results = probe::run(pool, &p).await.unwrap();
    report.add(
        section,
        format!(
            "{kind}: one probe run ({} queries × {} scopes, exact side included)",
            p.queries,
            results.len()
        ),
        format!("{:.1} s", started.elapsed().as_secs_f64()),
        "",
        None,
    );
    for m in results {
        report.add(
            section,
            format!(
                "{kind}, ef_search 100 (default), {}: recall@5, p50/p95",
                m.scope.as_str()
            ),
            format!("{:.3}, {:.2}/{:.2} ms", m.recall, m.p50_ms, m.p95_ms),
            "",
            None,
        );
    }
    for target in [0.95, 0.99] {
        let tuned = tune::sweep(pool, &p, target).await.unwrap();
        let value = match tuned.chosen.map(|i| &tuned.steps[i]) {
            Some(step) => step.line(),
            None => format!(
                "none up to ef_search 1000 ({})",
                tuned.steps.last().unwrap().line()
            ),
        };
        report.add(
            section,
            format!("{kind}, tune --target {target}: the smallest setting"),
            value,
            "",
            None,
        );
    }
}

pub(crate) async fn bench_real(report: &mut Report, rows: usize) {
    let section = format!("real vectors {rows}");
    eprintln!("real: reading package descriptions …");
    let texts = debian_descriptions(rows);
    assert_eq!(
        texts.len(),
        rows,
        "apt-cache dumpavail has fewer descriptions"
    );
    let started = Instant::now();
    let real = embed_cached(&texts).await;
    report.add(
        &section,
        "corpus: Debian package synopses, all-MiniLM-L6-v2 384-d (cached after the first run)",
        format!(
            "{rows} texts, vectors in {:.1} s",
            started.elapsed().as_secs_f64()
        ),
        "",
        None,
    );
    let synthetic: Vec<Vec<f32>> = (0..rows)
        .map(|i| fake_vector(&format!("synthetic {i}"), REAL_DIMS))
        .collect();
    for (kind, vectors) in [("real", &real), ("synthetic (uniform random)", &synthetic)] {
        eprintln!("real: {kind} …");
        let (url, pool) = fresh_db("real").await;
        let secs = load(&pool, REAL_MODEL, vectors).await;
        report.add(
            &section,
            format!("{kind}: HNSW m=16 build"),
            format!("{secs:.1} s"),
            "",
            None,
        );
        measure(report, &section, &pool, REAL_MODEL, kind).await;
        pool.close().await;
        drop_db(&url).await;
    }
}
