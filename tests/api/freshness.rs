//! Keeping embeddings fresh: change capture, stale scans, a model switch, search under RLS,
//! and backfill.

use std::time::Duration;

use crate::helpers::*;
use embed_worker::fake_openai::FakeConfig;
use embed_worker::freshness::{self, Scope, StaleReason};
use embed_worker::source::SourceType;
use embed_worker::{model_index, search};
use uuid::Uuid;

/// Pending jobs once the app's captured changes are drained (the worker's chore).
async fn pending(t: &TestDb) -> i64 {
    drain(&t.admin).await;
    sqlx::query_scalar("SELECT count(*) FROM apalis.jobs WHERE status = 'Pending'")
        .fetch_one(&t.admin)
        .await
        .unwrap()
}

/// Marks every job done (as a worker would), so new jobs can be told apart.
async fn settle(t: &TestDb) {
    sqlx::query("UPDATE apalis.jobs SET status = 'Done', idempotency_key = NULL")
        .execute(&t.admin)
        .await
        .unwrap();
}

#[tokio::test]
async fn text_changes_queue_one_job_and_usage_updates_queue_none() {
    let t = TestDb::migrated().await;
    let s = insert_session(&t.admin, Uuid::new_v4(), "scales", "slow").await;
    assert_eq!(pending(&t).await, 1, "an insert queues its source");
    seed_templates(&t.admin).await;
    assert_eq!(pending(&t).await, 21);
    settle(&t).await;

    let before = updated_at(&t, s).await;
    sqlx::query("UPDATE sessions SET notes = 'slow, then fast' WHERE id = $1")
        .bind(s)
        .execute(&t.admin)
        .await
        .unwrap();
    assert_eq!(pending(&t).await, 1, "a notes change queues one job");
    assert!(
        updated_at(&t, s).await > before,
        "the capture trigger moves updated_at (the app did not)"
    );
    sqlx::query("UPDATE sessions SET notes = 'slow, then faster' WHERE id = $1")
        .bind(s)
        .execute(&t.admin)
        .await
        .unwrap();
    assert_eq!(
        pending(&t).await,
        1,
        "a second change while pending does not queue twice"
    );
    settle(&t).await;

    sqlx::query(
        "UPDATE question_templates SET usage_count = usage_count + 1, last_used_at = now()",
    )
    .execute(&t.admin)
    .await
    .unwrap();
    assert_eq!(pending(&t).await, 0, "usage updates queue nothing");
    let bumped: i64 =
        sqlx::query_scalar("SELECT count(*) FROM question_templates WHERE updated_at > created_at")
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(bumped, 0, "and do not make templates look changed");

    embed_worker::db::apply_capture(&t.admin, false, true)
        .await
        .unwrap();
    let before = updated_at(&t, s).await;
    sqlx::query("UPDATE sessions SET notes = 'off' WHERE id = $1")
        .bind(s)
        .execute(&t.admin)
        .await
        .unwrap();
    assert_eq!(pending(&t).await, 0, "capture switched off for sessions");
    assert!(
        updated_at(&t, s).await > before,
        "with capture off the touch trigger still moves updated_at"
    );
}

async fn updated_at(t: &TestDb, id: Uuid) -> chrono::DateTime<chrono::Utc> {
    sqlx::query_scalar("SELECT updated_at FROM sessions WHERE id = $1")
        .bind(id)
        .fetch_one(&t.admin)
        .await
        .unwrap()
}

async fn put_rows(t: &TestDb, id: Uuid, model: &str, dims: usize, age_days: i32) {
    register(t, model, dims).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO rag_embeddings (source_type, source_id, content_hash, embedding, embedding_model, dimensions, token_count, updated_at)
         VALUES ('session', $1, 'h', '{}', $2, {dims}, 3, now() - make_interval(days => $3))",
        vector_literal(dims)
    )))
    .bind(id)
    .bind(model)
    .bind(age_days)
    .execute(&t.admin)
    .await
    .unwrap();
}

#[tokio::test]
async fn every_stale_reason_is_found_and_a_second_scan_queues_nothing() {
    let t = TestDb::migrated().await;
    let user = Uuid::new_v4();
    let missing = insert_session(&t.admin, user, "a", "missing").await;
    let outdated = insert_session(&t.admin, user, "b", "outdated").await;
    let other = insert_session(&t.admin, user, "c", "other model").await;
    let old = insert_session(&t.admin, user, "d", "too old").await;
    let fresh = insert_session(&t.admin, user, "e", "fresh").await;
    let _empty = insert_session(&t.admin, user, "", "  ").await;
    // Text only in the transcript is text; white space (or nothing) in every column is not.
    let transcript_only = insert_session(&t.admin, user, "", "").await;
    let blank = insert_session(&t.admin, user, "\t", "\r\n").await;
    sqlx::query("UPDATE sessions SET transcript = $2 WHERE id = $1")
        .bind(transcript_only)
        .bind("left hand alone, then hands together")
        .execute(&t.admin)
        .await
        .unwrap();
    // Every render column: a focus or depth alone renders ("Focus: harmony") and is text.
    sqlx::query(
        "UPDATE sessions SET transcript = ' ', focus = NULL, depth = NULL WHERE id = ANY($1)",
    )
    .bind([blank, _empty])
    .execute(&t.admin)
    .await
    .unwrap();
    sqlx::query("UPDATE sessions SET updated_at = now() - interval '30 days'")
        .execute(&t.admin)
        .await
        .unwrap();
    sqlx::query("UPDATE sessions SET updated_at = now() WHERE id = $1")
        .bind(outdated)
        .execute(&t.admin)
        .await
        .unwrap();
    let active = "text-embedding-ada-002";
    put_rows(&t, outdated, active, 1536, 1).await;
    put_rows(&t, other, "text-embedding-3-small", 8, 1).await;
    put_rows(&t, old, active, 1536, 10).await;
    put_rows(&t, fresh, active, 1536, 1).await;
    sqlx::query("DELETE FROM apalis.jobs")
        .execute(&t.admin)
        .await
        .unwrap();

    let scope = Scope {
        max_age_days: Some(7),
        ..Default::default()
    };
    let stale = freshness::find_stale(&t.admin, active, &scope)
        .await
        .unwrap();
    let by_id: std::collections::HashMap<Uuid, String> = stale
        .iter()
        .map(|s| (s.source.source_id, s.reason.to_string()))
        .collect();
    assert_eq!(by_id.len(), 5, "{by_id:?}");
    assert_eq!(by_id[&missing], "missing");
    assert_eq!(by_id[&transcript_only], "missing");
    assert_eq!(by_id[&outdated], "outdated");
    assert_eq!(by_id[&other], "other_model");
    assert_eq!(by_id[&old], "too_old");

    // One statement in the server: per reason, found and already open; jobs created.
    let first = freshness::enqueue_stale(&t.admin, &t.settings(), active, &scope)
        .await
        .unwrap();
    assert_eq!(first.created, 5);
    assert_eq!(
        first.by_reason,
        vec![
            (StaleReason::Missing, 2, 0),
            (StaleReason::OtherModel, 1, 0),
            (StaleReason::Outdated, 1, 0),
            (StaleReason::TooOld, 1, 0),
        ]
    );
    // A started job has given up its dedup key; its source is still skipped (by payload).
    sqlx::query(
        "UPDATE apalis.jobs SET status = 'Running', idempotency_key = NULL
          WHERE idempotency_key = 'session:' || $1::text",
    )
    .bind(missing)
    .execute(&t.admin)
    .await
    .unwrap();
    let again = freshness::enqueue_stale(&t.admin, &t.settings(), active, &scope)
        .await
        .unwrap();
    assert_eq!(again.created, 0, "idempotent");
    assert_eq!(again.found(), 5);
    assert!(
        again.by_reason.iter().all(|(_, n, open)| n == open),
        "{again:?}"
    );
    let jobs: i64 = sqlx::query_scalar("SELECT count(*) FROM apalis.jobs")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(jobs, 5);

    // The CLI's dry run prints the counts per reason and queues nothing.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_embed-worker"))
        .args(["enqueue-stale", "--dry-run"])
        .env("DATABASE_URL", &t.url)
        .env("EMBED_WORKER__FRESHNESS__MAX_AGE_DAYS", "7")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "missing      2",
        "other_model  1",
        "outdated     1",
        "too_old      1",
        "dry run",
    ] {
        assert!(text.contains(line), "{line:?} in {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_switch_serves_the_old_model_until_promotion_then_rolls_back_and_prunes() {
    use embed_worker::model_index::lifecycle;
    let t = TestDb::migrated().await;
    let fake = fake(FakeConfig::default()).await;
    insert_sessions(&t.admin, Uuid::new_v4(), 30, |i| 5 + i).await;
    let mut a = worker_settings(&t, &fake);
    a.model.name = "text-embedding-3-small".into();
    a.model.dimensions = 256;
    a.model.send_dimensions = true;
    build_index(&t, &a.model.name, 256).await;
    // The first worker on a database where nothing serves yet: its model writes and serves.
    let w = RunningWorker::start(a.clone()).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    let serving = lifecycle::serving(&t.admin).await.unwrap().unwrap();
    assert_eq!(
        (serving.name.as_str(), serving.role()),
        (a.model.name.as_str(), "writing, serving")
    );

    // The switch starts as `migrate` with the new model: it writes, the old one still serves.
    let mut b = a.clone();
    b.model.name = "text-embedding-3-large".into();
    b.model.dimensions = 512;
    b.models.auto_promote = false;
    let said = lifecycle::on_migrate(
        &mut t.admin.acquire().await.unwrap(),
        &spec(&b.model.name, 512),
    )
    .await
    .unwrap();
    assert!(said.contains("was text-embedding-3-small"), "{said}");
    build_index(&t, &b.model.name, 512).await;
    let st = model_index::status(&t.admin, &spec(&b.model.name, 512))
        .await
        .unwrap();
    let old = st.iter().find(|m| m.model == a.model.name).unwrap();
    assert_eq!(
        (old.sources, old.percent as i64, old.role.as_str()),
        (30, 100, "serving")
    );
    let new = st.iter().find(|m| m.model == b.model.name).unwrap();
    assert!(new.active && new.rows == 0 && new.indexes.iter().any(|i| i.2));
    assert_eq!(new.role, "writing");

    // Promotion below 100% is refused and says the coverage; forced, it works; rollback works.
    let err = lifecycle::promote(
        &mut t.admin.acquire().await.unwrap(),
        &b.model.name,
        false,
        false,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("0 of 30 sources (0.0% coverage)"), "{err}");
    let forced = lifecycle::promote(
        &mut t.admin.acquire().await.unwrap(),
        &b.model.name,
        true,
        false,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        (forced.how, forced.previous.as_deref()),
        ("forced", Some(a.model.name.as_str()))
    );
    let back = lifecycle::promote(
        &mut t.admin.acquire().await.unwrap(),
        &a.model.name,
        false,
        false,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(back.how, "manual");
    assert_eq!(
        lifecycle::serving(&t.admin).await.unwrap().unwrap().name,
        a.model.name
    );
    // The serving and the writing model cannot be pruned.
    for m in [&a.model.name, &b.model.name] {
        let err = model_index::prune(&t.admin, m)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("refusing to prune"), "{err}");
    }

    let stale = freshness::find_stale(&t.admin, &b.model.name, &Scope::default())
        .await
        .unwrap();
    assert_eq!(stale.len(), 30);
    assert!(
        stale
            .iter()
            .all(|s| s.reason == embed_worker::freshness::StaleReason::OtherModel)
    );
    // The switch's estimate reads the old model's stored counts: the same as counting again.
    let sources: Vec<_> = stale.iter().map(|s| s.source).collect();
    let counted = freshness::estimate(&t.admin, &b, &sources).await.unwrap();
    let survey = freshness::survey(&t.admin, &b, &b.model.name, &Scope::default(), |_| true)
        .await
        .unwrap();
    let stored = survey.estimate;
    assert_eq!(
        (stored.sources, stored.tokens),
        (counted.sources, counted.tokens)
    );
    assert_eq!(
        survey.counts.into_iter().collect::<Vec<_>>(),
        [(embed_worker::freshness::StaleReason::OtherModel, 30)]
    );
    assert!(counted.tokens > 0);
    let q = freshness::enqueue_stale(&t.admin, &b, &b.model.name, &Scope::default())
        .await
        .unwrap();
    assert_eq!(q.created, 30);
    // Searches read the serving model, whatever the config says.
    let q = embed_worker::fake_openai::fake_vector("Practice 3", 256);
    let found = search::search_serving(&t.admin, q, &search::SearchOptions::default())
        .await
        .unwrap();
    assert_eq!(found.hits.len(), 5);
    assert!(
        matches!(found.path, search::SearchPath::Index(_)),
        "{:?}",
        found.path
    );

    let w = RunningWorker::start(b.clone()).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;
    w.stop().await;
    // Not promoted by itself (auto_promote = false); by hand at 100% with a valid index it is.
    assert_eq!(
        lifecycle::serving(&t.admin).await.unwrap().unwrap().name,
        a.model.name
    );
    let p = lifecycle::promote(
        &mut t.admin.acquire().await.unwrap(),
        &b.model.name,
        false,
        false,
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!((p.how, p.coverage), ("manual", 1.0));
    let plan = explain(
        &t.admin,
        &spec(&b.model.name, 512),
        embed_worker::fake_openai::fake_vector("x", 512),
        true,
    )
    .await
    .unwrap();
    assert!(plan.contains(&spec(&b.model.name, 512).name()), "{plan}");
    let found = search::search_serving(
        &t.admin,
        embed_worker::fake_openai::fake_vector("y", 512),
        &search::SearchOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(found.hits.len(), 5);
    let history: Vec<(String, String)> =
        sqlx::query_as("SELECT model::text, how FROM embed_worker.model_promotions ORDER BY id")
            .fetch_all(&t.admin)
            .await
            .unwrap();
    let want: Vec<(String, String)> = [
        (&a.model.name, "install"),
        (&b.model.name, "forced"),
        (&a.model.name, "manual"),
        (&b.model.name, "manual"),
    ]
    .iter()
    .map(|(m, h)| (m.to_string(), h.to_string()))
    .collect();
    assert_eq!(history, want);

    // a is retired now: pruning detaches and drops its partition, rows and index with it.
    let deleted = model_index::prune(&t.admin, &a.model.name).await.unwrap();
    assert_eq!(deleted, 30);
    let names: Vec<String> = embed_worker::model_index::vector_indexes(&t.admin)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert!(
        !names.contains(&spec(&a.model.name, 256).name()),
        "old index dropped"
    );
    let left: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT embedding_model::text FROM rag_embeddings")
            .fetch_all(&t.admin)
            .await
            .unwrap();
    assert_eq!(left, vec![b.model.name.clone()]);
    let part: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(model_index::partition_name(&a.model.name))
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(part, None, "partition dropped");
    // No way back to a pruned model.
    let err = lifecycle::promote(
        &mut t.admin.acquire().await.unwrap(),
        &a.model.name,
        true,
        false,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("not a registered model"), "{err}");
    assert_eq!(sources.len(), 30);
}

/// Clustered vectors (HNSW on uniform noise says little): 20 centres, small spread.
fn clustered(i: usize, dims: usize) -> Vec<f32> {
    clustered_vector(i, dims, 0.3)
}

#[tokio::test]
async fn search_as_a_user_owning_a_tenth_of_a_percent_returns_k_of_their_rows() {
    let t = TestDb::migrated().await;
    embed_worker::db::apply_capture(&t.admin, false, false)
        .await
        .unwrap();
    let (model, dims, n) = ("test-mini", 32usize, 5000usize);
    let owner = Uuid::new_v4();
    let heavy = Uuid::new_v4();
    let others: Vec<Uuid> = (0..50).map(|_| Uuid::new_v4()).collect();
    let users: Vec<Uuid> = (0..n)
        .map(|i| match i {
            _ if i % 1000 == 7 => owner,
            _ if i % 100 == 3 => heavy,
            _ => others[i % 50],
        })
        .collect();
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO sessions (user_id, title) SELECT u, 'x' FROM unnest($1::uuid[]) WITH ORDINALITY AS x(u, o) ORDER BY o RETURNING id",
    )
    .bind(&users)
    .fetch_all(&t.admin)
    .await
    .unwrap();
    let vectors: Vec<pgvector::Vector> = (0..n)
        .map(|i| pgvector::Vector::from(clustered(i, dims)))
        .collect();
    register(&t, "test-mini", 32).await;
    sqlx::query(
        "INSERT INTO rag_embeddings (source_type, source_id, content_hash, embedding, embedding_model, dimensions, token_count)
         SELECT 'session', id, 'h', v, 'test-mini', 32, 1 FROM unnest($1::uuid[], $2::vector[]) AS x(id, v)",
    )
    .bind(&ids)
    .bind(&vectors)
    .execute(&t.admin)
    .await
    .unwrap();
    build_index(&t, model, dims).await;
    sqlx::query("ANALYZE rag_embeddings")
        .execute(&t.admin)
        .await
        .unwrap();
    let mine: std::collections::HashSet<Uuid> = ids
        .iter()
        .zip(&users)
        .filter(|(_, u)| **u == owner)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(mine.len(), 5, "0.1% of the rows");

    let q = clustered(3, dims);
    let opts = search::SearchOptions {
        k: 5,
        as_user: Some(owner),
        ef_search: Some(40),
        ..Default::default()
    };
    let hits = search::search(&t.admin, &spec(model, dims), q.clone(), &opts)
        .await
        .unwrap()
        .hits;
    assert_eq!(hits.len(), 5, "k rows despite the filter");
    assert!(
        hits.iter().all(|h| mine.contains(&h.source_id)),
        "only the user's own rows"
    );

    let other = others[0];
    let hits = search::search(
        &t.admin,
        &spec(model, dims),
        q.clone(),
        &search::SearchOptions {
            as_user: Some(other),
            ..opts.clone()
        },
    )
    .await
    .unwrap()
    .hits;
    assert_eq!(hits.len(), 5);
    assert!(
        hits.iter().all(|h| !mine.contains(&h.source_id)),
        "never another user's rows"
    );

    // A user seeing few rows is ranked exactly: the true five nearest of their 50 rows.
    let theirs: Vec<(Uuid, Vec<f32>)> = ids
        .iter()
        .zip(&users)
        .enumerate()
        .filter(|(_, (_, u))| **u == heavy)
        .map(|(i, (id, _))| (*id, clustered(i, dims)))
        .collect();
    assert_eq!(theirs.len(), 50);
    assert_eq!(
        search::visible_rows(&t.admin, model, heavy, None)
            .await
            .unwrap(),
        50
    );
    set_exact_below(&t, 10).await;
    assert_eq!(
        search::visible_rows(&t.admin, model, others[0], None)
            .await
            .unwrap(),
        11,
        "the count stops past the cap"
    );
    set_exact_below(&t, 5000).await;
    let cosine_distance = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
        1.0 - dot / (na * nb)
    };
    let mut truth: Vec<(f32, Uuid)> = theirs
        .iter()
        .map(|(id, v)| (cosine_distance(&q, v), *id))
        .collect();
    truth.sort_by(|a, b| a.0.total_cmp(&b.0));
    let truth: Vec<Uuid> = truth.into_iter().take(5).map(|(_, id)| id).collect();
    let heavy_opts = search::SearchOptions {
        as_user: Some(heavy),
        ..opts.clone()
    };
    let hits = search::search(&t.admin, &spec(model, dims), q.clone(), &heavy_opts)
        .await
        .unwrap()
        .hits;
    assert_eq!(
        hits.iter().map(|h| h.source_id).collect::<Vec<_>>(),
        truth,
        "exact path: the true nearest, nearest first"
    );
    // Templates are visible to every user: one whose vector is the query comes first.
    let template: Uuid = sqlx::query_scalar(
        "INSERT INTO question_templates (focus, depth, body) VALUES ('harmony', 'quick', 'Voice a ii-V-I.') RETURNING id",
    )
    .fetch_one(&t.admin)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO rag_embeddings (source_type, source_id, content_hash, embedding, embedding_model, dimensions, token_count)
         VALUES ('template', $1, 'h', $2, 'test-mini', 32, 1)",
    )
    .bind(template)
    .bind(pgvector::Vector::from(q.clone()))
    .execute(&t.admin)
    .await
    .unwrap();
    assert_eq!(
        search::visible_rows(&t.admin, model, heavy, None)
            .await
            .unwrap(),
        51
    );
    let hits = search::search(&t.admin, &spec(model, dims), q.clone(), &heavy_opts)
        .await
        .unwrap()
        .hits;
    // Their row 3 is the query itself too: the two tie at distance 0, so compare as sets.
    let got: std::collections::HashSet<Uuid> = hits.iter().map(|h| h.source_id).collect();
    let want: std::collections::HashSet<Uuid> =
        truth[..4].iter().copied().chain([template]).collect();
    assert_eq!(
        got, want,
        "the template and their own nearest sessions: {hits:?}"
    );
    let sessions_only = search::search(
        &t.admin,
        &spec(model, dims),
        q.clone(),
        &search::SearchOptions {
            source_type: Some(embed_worker::source::SourceType::Session),
            ..heavy_opts.clone()
        },
    )
    .await
    .unwrap()
    .hits;
    assert_eq!(
        sessions_only
            .iter()
            .map(|h| h.source_id)
            .collect::<Vec<_>>(),
        truth
    );
    sqlx::query("DELETE FROM question_templates WHERE id = $1")
        .bind(template)
        .execute(&t.admin)
        .await
        .unwrap();

    // Forced onto the HNSW path: still only their rows.
    set_exact_below(&t, 0).await;
    let found = search::search(&t.admin, &spec(model, dims), q.clone(), &heavy_opts)
        .await
        .unwrap();
    assert!(
        matches!(found.path, search::SearchPath::Index(_)),
        "{:?}",
        found.path
    );
    let hits = found.hits;
    assert_eq!(hits.len(), 5);
    let ids_of_theirs: std::collections::HashSet<Uuid> = theirs.iter().map(|(id, _)| *id).collect();
    assert!(hits.iter().all(|h| ids_of_theirs.contains(&h.source_id)));

    // Without iterative scans, the same filtered query comes back short: why the option matters.
    let mut tx = app_user_tx(&t, owner).await;
    sqlx::query("SET LOCAL hnsw.ef_search = 40")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("SET LOCAL enable_seqscan = off")
        .execute(&mut *tx)
        .await
        .unwrap();
    let sql = search::index_statement(&t.admin, model, 5, None)
        .await
        .unwrap();
    let plain: Vec<search::Hit> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(pgvector::Vector::from(q))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
    assert!(
        plain.len() < 5,
        "a plain HNSW scan returned {} rows",
        plain.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backfill_wait_ends_when_the_queue_drains_and_counts_match() {
    let t = TestDb::migrated().await;
    embed_worker::db::apply_capture(&t.admin, false, false)
        .await
        .unwrap();
    let fake = fake(FakeConfig::default()).await;
    insert_sessions(&t.admin, Uuid::new_v4(), 120, |i| 3 + i % 30).await;
    seed_templates(&t.admin).await;
    assert_eq!(pending(&t).await, 0, "capture is off: nothing queued yet");
    let settings = worker_settings(&t, &fake);
    let w = RunningWorker::start(settings.clone()).await;
    let pool = t.worker_pool().await;
    let stale = freshness::find_stale(&pool, &settings.model.name, &Scope::default())
        .await
        .unwrap();
    let sources: Vec<_> = stale.iter().map(|s| s.source).collect();
    let estimate = freshness::estimate(&pool, &settings, &sources)
        .await
        .unwrap();
    // The command as an operator runs it (the prompt and progress bars are the CLI's).
    let mut backfill = worker_command(&t, &fake.base_url());
    backfill
        .args(["backfill", "--yes", "--wait"])
        .stderr(std::process::Stdio::piped());
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || backfill.output().unwrap()),
    )
    .await
    .expect("backfill --wait returns once the queue drains")
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    let queued: i64 = said
        .split("backfill: ")
        .find_map(|l| l.split(" jobs queued").next()?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no 'N jobs queued' in {said}"));
    w.stop().await;
    assert_eq!(queued, 140);
    assert_eq!(
        embed_worker::queue::open_jobs(&t.admin, "embed")
            .await
            .unwrap(),
        0
    );
    let (sources, tokens): (i64, i64) = sqlx::query_as("SELECT count(DISTINCT (source_type, source_id)), sum(token_count)::bigint FROM rag_embeddings")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(sources, 140);
    assert_eq!(
        tokens as u64, estimate.tokens,
        "the estimate is what was embedded"
    );
    assert_eq!(tokens as u64, fake.tokens_billed());
    let _ = SourceType::Session;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_survey_streams_past_one_round_and_prices_only_what_it_is_asked_to() {
    let t = TestDb::migrated().await;
    embed_worker::db::apply_capture(&t.admin, false, false)
        .await
        .unwrap();
    // 2,500 sources: the survey prices them in three rounds of at most 1,000.
    insert_sessions(&t.admin, Uuid::new_v4(), 2500, |i| 2 + i % 9).await;
    let s = t.settings();
    let stale = freshness::find_stale(&t.admin, &s.model.name, &Scope::default())
        .await
        .unwrap();
    assert_eq!(stale.len(), 2500);
    let sources: Vec<_> = stale.iter().map(|s| s.source).collect();
    let counted = freshness::estimate(&t.admin, &s, &sources).await.unwrap();
    let all = freshness::survey(&t.admin, &s, &s.model.name, &Scope::default(), |_| true)
        .await
        .unwrap();
    assert_eq!(all.estimate, counted);
    assert_eq!(
        all.counts.into_iter().collect::<Vec<_>>(),
        [(StaleReason::Missing, 2500)]
    );
    let none = freshness::survey(&t.admin, &s, &s.model.name, &Scope::default(), |r| {
        r != StaleReason::Missing
    })
    .await
    .unwrap();
    assert_eq!((none.estimate.sources, none.estimate.tokens), (0, 0));
    assert_eq!(none.counts.get(&StaleReason::Missing), Some(&2500));
    // A pool of one connection (the stream holds it while a round queries): the same survey.
    let one = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&t.url)
        .await
        .unwrap();
    let alone = freshness::survey(&one, &s, &s.model.name, &Scope::default(), |_| true)
        .await
        .unwrap();
    assert_eq!(alone.estimate, counted);
}

/// `search.exact_below` as `migrate` writes it to the database, where embed_worker.search reads it.
async fn set_exact_below(t: &TestDb, rows: i32) {
    sqlx::query("UPDATE embed_worker.search_settings SET exact_below = $1")
        .bind(rows)
        .execute(&t.admin)
        .await
        .unwrap();
}
