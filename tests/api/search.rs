//! The app's search, `embed_worker.search` (migration 22), called as the app calls it: one SQL
//! statement as `app_user`; and the recall probe, checked against a recall computed here.

use std::collections::HashSet;

use crate::helpers::*;
use embed_worker::search::probe;
use pgvector::Vector;
use uuid::Uuid;

/// A unit vector near one of 20 centres (real embeddings cluster by topic).
fn clustered(i: usize, dims: usize) -> Vec<f32> {
    clustered_vector(i, dims, 0.5)
}

/// Sessions of `owners` (one each, in order); their ids.
async fn sessions(t: &TestDb, owners: &[Uuid]) -> Vec<Uuid> {
    sqlx::query_scalar(
        "INSERT INTO sessions (user_id, title) SELECT u, 'x' FROM unnest($1::uuid[]) WITH ORDINALITY AS x(u, o) ORDER BY o RETURNING id",
    )
    .bind(owners)
    .fetch_all(&t.admin)
    .await
    .unwrap()
}

/// Rows of `model` for `(source_type, id)`s with the given vectors.
async fn put(t: &TestDb, model: &str, kind: &str, ids: &[Uuid], vectors: Vec<Vec<f32>>) {
    let dims = vectors.first().map_or(0, |v| v.len()) as i32;
    let vectors: Vec<Vector> = vectors.into_iter().map(Vector::from).collect();
    sqlx::query(
        "INSERT INTO rag_embeddings (source_type, source_id, content_hash, embedding, embedding_model, dimensions, token_count)
         SELECT $1::embedding_source, id, 'h', v, $2, $3, 1 FROM unnest($4::uuid[], $5::vector[]) AS x(id, v)",
    )
    .bind(kind)
    .bind(model)
    .bind(dims)
    .bind(ids)
    .bind(&vectors)
    .execute(&t.admin)
    .await
    .unwrap();
}

async fn templates(t: &TestDb, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(
            sqlx::query_scalar(
                "INSERT INTO question_templates (focus, depth, body) VALUES ('harmony', 'quick', $1) RETURNING id",
            )
            .bind(format!("Voice a ii-V-I in key {i}."))
            .fetch_one(&t.admin)
            .await
            .unwrap(),
        );
    }
    ids
}

/// The app's one line, as `app_user` signed in as `user`: `(source_type, source_id)` per hit.
async fn app_search(
    t: &TestDb,
    user: Uuid,
    sql: &str,
    q: &[f32],
) -> Result<Vec<(String, Uuid)>, String> {
    let mut tx = app_user_tx(t, user).await;
    let r = sqlx::query_as(sqlx::AssertSqlSafe(sql.to_string()))
        .bind(Vector::from(q.to_vec()))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| e.to_string());
    tx.rollback().await.unwrap();
    r
}

async fn promote(t: &TestDb, model: &str) {
    embed_worker::model_index::lifecycle::promote(
        &mut t.admin.acquire().await.unwrap(),
        model,
        true,
        false,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn the_apps_one_line_search_reads_the_serving_model_under_rls_and_follows_a_promotion() {
    let t = TestDb::migrated().await;
    embed_worker::db::apply_capture(&t.admin, false, false)
        .await
        .unwrap();
    let (small, big) = (Uuid::new_v4(), Uuid::new_v4());
    let others: Vec<Uuid> = (0..20).map(|_| Uuid::new_v4()).collect();
    let owners: Vec<Uuid> = (0..600)
        .map(|i| match i {
            _ if i < 3 => small,
            _ if i < 203 => big,
            _ => others[i % 20],
        })
        .collect();
    let ids = sessions(&t, &owners).await;
    let tpl = templates(&t, 2).await;
    register(&t, "test-a", 32).await;
    register(&t, "test-b", 16).await;
    put(
        &t,
        "test-a",
        "session",
        &ids,
        (0..600).map(|i| clustered(i, 32)).collect(),
    )
    .await;
    put(
        &t,
        "test-a",
        "template",
        &tpl,
        (0..2).map(|i| clustered(i + 5000, 32)).collect(),
    )
    .await;
    // The next model has only two of the small user's sessions and one template so far.
    put(
        &t,
        "test-b",
        "session",
        &ids[..2],
        (0..2).map(|i| clustered(i, 16)).collect(),
    )
    .await;
    put(
        &t,
        "test-b",
        "template",
        &tpl[..1],
        vec![clustered(5000, 16)],
    )
    .await;
    build_index(&t, "test-a", 32).await;
    promote(&t, "test-a").await;
    sqlx::query("ANALYZE rag_embeddings")
        .execute(&t.admin)
        .await
        .unwrap();

    let mine: HashSet<Uuid> = ids[..3].iter().copied().collect();
    let bigs: HashSet<Uuid> = ids[3..203].iter().copied().collect();
    let tpls: HashSet<Uuid> = tpl.iter().copied().collect();
    let line = "SELECT source_type, source_id FROM embed_worker.search($1, 5)";
    let q = clustered(1, 32);

    // The small user sees their 3 sessions and the 2 templates: exactly those, k = 5 rows.
    let hits = app_search(&t, small, line, &q).await.unwrap();
    let got: HashSet<Uuid> = hits.iter().map(|h| h.1).collect();
    assert_eq!(hits.len(), 5, "{hits:?}");
    assert_eq!(
        got,
        &mine | &tpls,
        "own sessions and the templates, nothing else"
    );
    // The big user (200 of 600 rows): 5 rows, none of another user's.
    let hits = app_search(&t, big, line, &q).await.unwrap();
    assert_eq!(hits.len(), 5, "{hits:?}");
    assert!(
        hits.iter()
            .all(|h| bigs.contains(&h.1) || tpls.contains(&h.1)),
        "{hits:?}"
    );
    // Forced onto the index path (exact_below 0): still k rows, still only theirs.
    sqlx::query("UPDATE embed_worker.search_settings SET exact_below = 0")
        .execute(&t.admin)
        .await
        .unwrap();
    let hits = app_search(&t, big, line, &q).await.unwrap();
    assert_eq!(hits.len(), 5, "{hits:?}");
    assert!(
        hits.iter()
            .all(|h| bigs.contains(&h.1) || tpls.contains(&h.1))
    );
    let route = embed_worker::search::route(&t.admin, None, 5, None, Some(big))
        .await
        .unwrap();
    assert!(!route.exact, "{route:?}");
    sqlx::query("UPDATE embed_worker.search_settings SET exact_below = 5000")
        .execute(&t.admin)
        .await
        .unwrap();
    // Templates only.
    let hits = app_search(
        &t,
        small,
        "SELECT source_type, source_id FROM embed_worker.search($1, 5, 'template')",
        &q,
    )
    .await
    .unwrap();
    assert_eq!(
        hits.iter().map(|h| h.1).collect::<HashSet<_>>(),
        tpls,
        "{hits:?}"
    );
    assert!(hits.iter().all(|h| h.0 == "template"));

    // The app's own hnsw settings are its own after the call.
    let mut tx = app_user_tx(&t, big).await;
    sqlx::query("SET LOCAL hnsw.ef_search = 77")
        .execute(&mut *tx)
        .await
        .unwrap();
    let _: Vec<(String, Uuid)> = sqlx::query_as(line)
        .bind(Vector::from(q.clone()))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    let ef: String = sqlx::query_scalar("SHOW hnsw.ef_search")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(ef, "77");
    tx.rollback().await.unwrap();

    // Arguments the function refuses, each saying why; the wrong size names both sizes.
    let bad = |sql: &'static str, v: Vec<f32>| {
        let t = &t;
        async move { app_search(t, small, sql, &v).await.unwrap_err() }
    };
    let e = bad(line, vec![0.1; 16]).await;
    assert!(
        e.contains("the query has 16 dimensions; the model test-a has 32"),
        "{e}"
    );
    let e = bad(
        "SELECT source_type, source_id FROM embed_worker.search($1, 0)",
        q.clone(),
    )
    .await;
    assert!(e.contains("k must be between 1 and 1000, not 0"), "{e}");
    let e = bad(
        "SELECT source_type, source_id FROM embed_worker.search($1, 1001)",
        q.clone(),
    )
    .await;
    assert!(e.contains("k must be between 1 and 1000, not 1001"), "{e}");
    let e = bad(
        "SELECT source_type, source_id FROM embed_worker.search($1, 5, NULL, 0)",
        q.clone(),
    )
    .await;
    assert!(
        e.contains("ef_search must be between 1 and 1000, not 0"),
        "{e}"
    );
    let e = bad(
        "SELECT source_type, source_id FROM embed_worker.search(NULL::vector, 5) WHERE $1::vector IS NOT NULL",
        q.clone(),
    )
    .await;
    assert!(e.contains("the query vector is NULL"), "{e}");

    // A promotion: the same line, with a query of the new model's size, reads the new model.
    promote(&t, "test-b").await;
    let hits = app_search(&t, small, line, &clustered(1, 16))
        .await
        .unwrap();
    assert_eq!(
        hits.iter().map(|h| h.1).collect::<HashSet<_>>(),
        [ids[0], ids[1], tpl[0]].into_iter().collect(),
        "test-b's rows this user sees: {hits:?}"
    );
    let e = bad(line, q.clone()).await;
    assert!(
        e.contains("the query has 32 dimensions; the model test-b has 16"),
        "{e}"
    );
}

/// Cosine distance in f64.
fn distance(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    1.0 - dot / (na * nb)
}

#[tokio::test]
async fn the_recall_probe_agrees_with_recall_computed_independently() {
    let t = TestDb::migrated().await;
    embed_worker::db::apply_capture(&t.admin, false, false)
        .await
        .unwrap();
    let (model, dims) = (hard_model(&t, 3000).await, 128usize);
    // What is stored, read back: the recall here is computed from it.
    let stored: Vec<(Uuid, Uuid, Vector)> = sqlx::query_as(
        "SELECT s.id, s.user_id, e.embedding FROM sessions s
           JOIN rag_embeddings e ON e.source_type = 'session' AND e.source_id = s.id",
    )
    .fetch_all(&t.admin)
    .await
    .unwrap();
    let ids: Vec<Uuid> = stored.iter().map(|r| r.0).collect();
    let owners: Vec<Uuid> = stored.iter().map(|r| r.1).collect();
    let vectors: Vec<Vec<f32>> = stored.iter().map(|r| r.2.to_vec()).collect();
    let p = probe::Probe {
        spec: spec(model, dims),
        k: 5,
        // Enough that the index misses some: a recall of 1.0 everywhere would agree with
        // anything (over 20 queries, two runs of the full suite saw 1.0: iterative scans make a
        // low ef_search no harder, and the graph differs from build to build).
        queries: 100,
        seed: 7,
        ef_search: Some(2),
        max_scan_tuples: None,
    };
    let results = probe::run(&t.admin, &p).await.unwrap();
    let scopes: Vec<&str> = results.iter().map(|m| m.scope.as_str()).collect();
    assert_eq!(scopes, ["all", "small_user", "large_user"]);
    let by_id: std::collections::HashMap<Uuid, (usize, Uuid)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, (i, owners[i])))
        .collect();
    for m in &results {
        // Every query for everyone; a user's scope has at most as many (its own rows).
        let n = m.queries.len();
        assert!(
            n > 0
                && n <= p.queries as usize
                && (m.scope != probe::Scope::All || n == p.queries as usize),
            "{:?}: {n} queries",
            m.scope
        );
        // The probe picks its users among its sample's owners; the recall is checked for them.
        let user = m.user;
        assert_eq!(user.is_some(), m.scope != probe::Scope::All);
        let mut recalls = Vec::new();
        for q in &m.queries {
            // Exact, here: every row the scope sees, by distance, the query's own row dropped.
            let mut ranked: Vec<(f64, Uuid)> = ids
                .iter()
                .enumerate()
                .filter(|(i, id)| **id != q.source_id && user.is_none_or(|u| owners[*i] == u))
                .map(|(i, id)| (distance(&q.vector, &vectors[i]), *id))
                .collect();
            ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
            let truth: HashSet<Uuid> = ranked.iter().take(5).map(|r| r.1).collect();
            // The index, here: the app's one line as that user (or as the table's owner).
            let mut tx = match user {
                Some(u) => app_user_tx(&t, u).await,
                None => t.admin.begin().await.unwrap(),
            };
            let found: Vec<(Uuid,)> =
                sqlx::query_as("SELECT source_id FROM embed_worker.search($1, 6, NULL, 2)")
                    .bind(Vector::from(q.vector.clone()))
                    .fetch_all(&mut *tx)
                    .await
                    .unwrap();
            tx.rollback().await.unwrap();
            let found: Vec<Uuid> = found
                .into_iter()
                .map(|r| r.0)
                .filter(|id| *id != q.source_id)
                .take(5)
                .collect();
            assert!(found.iter().all(|id| user.is_none_or(|u| by_id[id].1 == u)));
            let r = found.iter().filter(|id| truth.contains(id)).count() as f64 / 5.0;
            recalls.push(r);
        }
        let mine = recalls.iter().sum::<f64>() / recalls.len() as f64;
        assert!(
            (m.recall - mine).abs() <= 0.01,
            "{:?}: the probe says {:.3}, computed here {mine:.3}",
            m.scope,
            m.recall
        );
        if m.scope == probe::Scope::SmallUser {
            assert_eq!(m.recall, 1.0, "{:?} rows: ranked exactly", m.visible);
        }
    }
    assert!(
        results[1].visible < results[2].visible,
        "{:?}",
        (results[1].visible, results[2].visible)
    );
    assert!(
        results[2].visible > Some(100),
        "the large user is on the index path"
    );
    let all = &results[0];
    assert!(all.recall < 1.0, "ef_search 2 misses some: {}", all.recall);

    // Stored and claimed: one replica per period.
    probe::store(&t.admin, &p, &results).await.unwrap();
    let stored = probe::stored(&t.admin).await.unwrap();
    assert_eq!(stored.len(), 3);
    assert!(
        stored
            .iter()
            .any(|(m, s, r)| m == model && s == "all" && *r == all.recall)
    );
    assert!(probe::claim(&t.admin, 60).await.unwrap());
    assert!(
        !probe::claim(&t.admin, 60).await.unwrap(),
        "the period is taken"
    );
}

/// Random 128-d vectors, the hard case for HNSW, for a model of `n` rows: half one user's,
/// the rest 50 others'. Serving, indexed, analysed; exact_below 100 puts the large user on the
/// index path. Returns the model.
async fn hard_model(t: &TestDb, n: usize) -> &'static str {
    let (model, dims) = ("test-p", 128usize);
    let large = Uuid::new_v4();
    let others: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    let owners: Vec<Uuid> = (0..n)
        .map(|i| if i % 2 == 0 { large } else { others[i % 50] })
        .collect();
    let ids = sessions(t, &owners).await;
    let vectors: Vec<Vec<f32>> = (0..n)
        .map(|i| embed_worker::fake_openai::fake_vector(&format!("random {i}"), dims))
        .collect();
    register(t, model, dims).await;
    put(t, model, "session", &ids, vectors).await;
    build_index(t, model, dims).await;
    promote(t, model).await;
    sqlx::query("ANALYZE rag_embeddings")
        .execute(&t.admin)
        .await
        .unwrap();
    sqlx::query("UPDATE embed_worker.search_settings SET exact_below = 100")
        .execute(&t.admin)
        .await
        .unwrap();
    model
}

#[tokio::test]
async fn tune_stores_the_smallest_ef_search_that_meets_the_target_where_the_default_does_not() {
    let t = TestDb::migrated().await;
    embed_worker::db::apply_capture(&t.admin, false, false)
        .await
        .unwrap();
    let model = hard_model(&t, 3000).await;
    // A deployment whose configured default is ef_search 10.
    sqlx::query("UPDATE embed_worker.search_settings SET ef_search = 10")
        .execute(&t.admin)
        .await
        .unwrap();
    let p = probe::Probe {
        spec: spec(model, 128),
        k: 5,
        queries: 20,
        seed: 1,
        ef_search: None,
        max_scan_tuples: None,
    };
    let before = probe::run(&t.admin, &p).await.unwrap();
    let worst = |r: &[probe::Measured]| r.iter().map(|m| m.recall).fold(1.0f64, f64::min);
    assert!(worst(&before) < 0.99, "the default misses: {before:?}");

    // Bad arguments are refused before anything is measured or stored.
    let (code, _, err) = cli(&t, &["tune", "--candidate", "m=1"]);
    assert_ne!(code, 0);
    assert!(err.contains("m = 1 is out of range (2..=100)"), "{err}");
    let (code, _, err) = cli(&t, &["tune", "--target", "2"]);
    assert_ne!(code, 0);
    assert!(err.contains("--target 2 is not a recall"), "{err}");
    let stored: Option<i32> =
        sqlx::query_scalar("SELECT ef_search FROM embed_worker.models WHERE name = $1")
            .bind(model)
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(stored, None);

    let (code, out, err) = cli(
        &t,
        &[
            "tune",
            "--target",
            "0.99",
            "--queries",
            "20",
            "--candidate",
            "m=32",
            "--sample",
            "2000",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let first = out
        .lines()
        .find(|l| l.contains("ef_search=10:"))
        .expect(&out);
    assert!(first.contains("all "), "{out}");
    let stored: Option<i32> =
        sqlx::query_scalar("SELECT ef_search FROM embed_worker.models WHERE name = $1")
            .bind(model)
            .fetch_one(&t.admin)
            .await
            .unwrap();
    let ef = stored.expect("a setting stored");
    assert!(ef > 10, "{out}");
    assert!(
        out.contains(&format!("stored for {model}: ef_search={ef}")),
        "{out}"
    );
    // The smallest: the setting before it in the sweep fell short.
    let at = embed_worker::search::tune::EF_SEARCH
        .iter()
        .position(|e| *e == ef as u32)
        .unwrap();
    let below = embed_worker::search::tune::EF_SEARCH[at - 1];
    let line = out
        .lines()
        .find(|l| l.contains(&format!("ef_search={below}:")))
        .expect(&out);
    // "  ef_search=64: all 0.980 (…), small_user 1.000 (…), …": each scope's figure (the first
    // follows the "ef_search=N: " prefix, which hid it from a split on ", " alone).
    let scopes = line.split_once(": ").map_or(line, |(_, rest)| rest);
    let recalls: Vec<f64> = scopes
        .split(", ")
        .filter_map(|part| part.split_whitespace().nth(1).and_then(|r| r.parse().ok()))
        .collect();
    assert!(
        !recalls.is_empty() && recalls.iter().any(|r| *r < 0.99),
        "{line}"
    );
    // The search now uses it: the same probe with the model's own setting meets the target.
    let after = probe::run(&t.admin, &p).await.unwrap();
    assert!(worst(&after) >= 0.99, "{after:?}");
    assert_eq!(after.len(), before.len());

    // The candidate beside today's index, on the same 2,000 copied rows; nothing left behind.
    assert!(
        out.contains("indexes on a sample copy of 2000 rows"),
        "{out}"
    );
    let size = |params: &str| -> f64 {
        let line = out.lines().find(|l| l.contains(params)).expect(&out);
        let mb = line.split(", ").nth(2).unwrap().trim_end_matches(" MB");
        mb.parse().unwrap()
    };
    assert!(
        size("m=32, ef_construction=64:") > size("m=16, ef_construction=64:"),
        "{out}"
    );
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_class WHERE relname LIKE 'tune_sample%'")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(left, 0);
}
