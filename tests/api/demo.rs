//! The offline default end to end: the local model embeds the seeded templates and sessions
//! through the real worker, and searches mean something.
#![cfg(feature = "local")]

use std::time::Duration;

use crate::helpers::*;
use embed_worker::search::{self, SearchOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_local_model_ranks_a_harmony_template_first_and_rls_keeps_users_apart() {
    let t = TestDb::migrated().await;
    let mut s = t.settings();
    let local = embed_worker::config::Settings::load(Some(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/local.toml"
    ))))
    .unwrap();
    s.model = local.model.clone();
    s.model.local_path =
        concat!(env!("CARGO_MANIFEST_DIR"), "/.dev/models/all-MiniLM-L6-v2").into();
    s.batch = local.batch.clone();
    s.rate_limit = local.rate_limit.clone();
    s.http.addr = "127.0.0.1:0".into();
    build_index(&t, &s.model.name, s.model.dimensions).await;
    seed_templates(&t.admin).await;
    assert_eq!(
        embed_worker::seed::seed_demo_sessions(&t.admin, 60)
            .await
            .unwrap(),
        60
    );

    let w = RunningWorker::start(s.clone()).await;
    wait_drained(&t.admin, Duration::from_secs(120)).await;
    w.stop().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM rag_embeddings WHERE embedding_model = 'all-MiniLM-L6-v2' AND dimensions = 384")
        .fetch_one(&t.admin)
        .await
        .unwrap();
    assert_eq!(rows, 80);

    let model =
        embed_worker::embed::local::LocalEmbedder::load(std::path::Path::new(&s.model.local_path))
            .unwrap();
    let q = model
        .embed(vec!["how do I voice a minor ii-V-I".into()])
        .await
        .unwrap()
        .vectors
        .remove(0);
    let opts = SearchOptions {
        k: 3,
        source_type: Some(embed_worker::source::SourceType::Template),
        ..Default::default()
    };
    let hits = search::search(&t.admin, &spec(&s.model.name, 384), q, &opts)
        .await
        .unwrap()
        .hits;
    let focus: String =
        sqlx::query_scalar("SELECT focus::text FROM question_templates WHERE id = $1")
            .bind(hits[0].source_id)
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(
        focus, "harmony",
        "the harmony query ranks a harmony template first"
    );

    let ada: uuid::Uuid = embed_worker::seed::DEMO_USERS[0].1.parse().unwrap();
    let q = model
        .embed(vec!["slow scales with even fingers".into()])
        .await
        .unwrap()
        .vectors
        .remove(0);
    let opts = SearchOptions {
        k: 5,
        source_type: Some(embed_worker::source::SourceType::Session),
        as_user: Some(ada),
        ..Default::default()
    };
    let hits = search::search(&t.admin, &spec(&s.model.name, 384), q, &opts)
        .await
        .unwrap()
        .hits;
    assert_eq!(hits.len(), 5);
    for h in &hits {
        let (owner, focus): (uuid::Uuid, String) =
            sqlx::query_as("SELECT user_id, focus::text FROM sessions WHERE id = $1")
                .bind(h.source_id)
                .fetch_one(&t.admin)
                .await
                .unwrap();
        assert_eq!(owner, ada, "only ada's sessions");
        let _ = focus;
    }
    let (_, top_focus): (uuid::Uuid, String) =
        sqlx::query_as("SELECT user_id, focus::text FROM sessions WHERE id = $1")
            .bind(hits[0].source_id)
            .fetch_one(&t.admin)
            .await
            .unwrap();
    assert_eq!(
        top_focus, "technique",
        "a technique session answers a technique question"
    );
}
