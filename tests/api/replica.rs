//! Reads past one server (issue 24): a streaming standby of a private cluster, made by
//! `scripts/db standby start`, answers searches of what the worker wrote on the primary, never
//! writes, and its lag is measured from the primary while its replay is paused and resumed.

use std::time::{Duration, Instant};

use crate::helpers::*;
use embed_worker::fake_openai::{FakeConfig, fake_vector};
use embed_worker::search::{self, SearchOptions, SearchPath};
use uuid::Uuid;

/// The worker's exported replica lag for `name` (None until sampled).
async fn exported_lag(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let prefix = format!("embed_worker_replica_lag_seconds{{application_name=\"{name}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_answers_searches_of_what_the_primary_wrote_and_its_lag_is_measured() {
    let mut cluster =
        PrivateCluster::new(&format!("standby-test-{}", std::process::id()), free_port());
    let url = cluster.db("start");
    let started = Instant::now();
    let standby_url = cluster.standby("start");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(30),
        "standby start took {took:?}"
    );
    // Idempotent, like `start`.
    assert_eq!(cluster.standby("start"), standby_url);
    let t = TestDb {
        name: "embed_worker".into(),
        url: url.clone(),
        admin: embed_worker::db::connect_as_login(&url).await.unwrap(),
    };
    migrate_as_the_cli(&t).await;
    let fake = fake(FakeConfig::default()).await;
    let mut s = worker_settings(&t, &fake);
    s.alerts.replica_lag_secs = 2;
    let w = RunningWorker::start(s.clone()).await;
    // Change capture queues them; the worker writes them on the primary.
    let sources = insert_sessions(&t.admin, Uuid::new_v4(), 60, |i| 3 + i % 9).await;
    wait_drained(&t.admin, Duration::from_secs(60)).await;

    // Once replayed, the standby holds them.
    let standby = embed_worker::db::connect_as_login(&standby_url)
        .await
        .unwrap();
    let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&standby)
        .await
        .unwrap();
    assert!(in_recovery, "a standby");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM rag_embeddings")
            .fetch_one(&standby)
            .await
            .unwrap();
        if n == 60 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} of 60 rows replayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // `search` on the standby (search.database_url): its index, read-only, and it says so.
    let out = worker_command(&t, &fake.base_url())
        .env("EMBED_WORKER__SEARCH__DATABASE_URL", &standby_url)
        .args(["search", "--k", "3", "Practice 7"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("3 hits, through index"), "{stdout}");
    assert!(
        stdout.contains(", from the standby (replay lag "),
        "{stdout}"
    );
    // The read-only reports read it too.
    let out = worker_command(&t, &fake.base_url())
        .env("EMBED_WORKER__SEARCH__DATABASE_URL", &standby_url)
        .arg("status")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("reading: the standby"),
        "{stdout}"
    );
    // The library's search, as an app calls it, on a pool of the standby.
    let found = search::search_serving(
        &standby,
        fake_vector("Practice 7", 1536),
        &SearchOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(found.hits.len(), 5);
    assert!(
        matches!(found.path, SearchPath::Index(_)),
        "{:?}",
        found.path
    );
    // Nothing the search ran wrote: the standby refuses writes, and the search succeeded. And the
    // standby says it refuses them (a write there is an error, not a silent no-op).
    let err = sqlx::query("UPDATE sessions SET notes = 'x'")
        .execute(&standby)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");

    // The primary's view: one streaming replica, caught up.
    let addr = w.worker.http_addr.unwrap();
    let lag = embed_worker::replica::lag(&t.admin).await.unwrap();
    assert_eq!(lag.len(), 1, "{lag:?}");
    assert_eq!(
        (lag[0].application_name.as_str(), lag[0].state.as_str()),
        ("embed_worker_standby", "streaming")
    );
    // Replay paused while the primary keeps writing: the exported lag passes the threshold.
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&standby)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut i = 0;
    let peak = loop {
        insert_sessions(&t.admin, Uuid::new_v4(), 5, |_| 4).await;
        i += 1;
        if let Some(v) = exported_lag(addr, "embed_worker_standby").await
            && v > 2.5
        {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "lag never passed 2.5 s ({i} writes)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let bytes = embed_worker::replica::lag(&t.admin).await.unwrap()[0]
        .lag_bytes
        .unwrap();
    assert!(bytes > 0.0, "{bytes}");
    // Resumed: it falls back below the threshold.
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&standby)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(v) = exported_lag(addr, "embed_worker_standby").await
            && v < 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lag stayed up after resume (peak {peak})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("embed_worker_replica_lag_alert_seconds 2"),
        "the threshold is exported"
    );
    // Cut off from the primary (its WAL receiver pointed at nothing): it still answers, as of
    // what it last replayed, and says so; the primary no longer lists it, and the exported lag
    // reads +Inf (its alert fires) instead of the series vanishing.
    let conninfo: String = sqlx::query_scalar("SHOW primary_conninfo")
        .fetch_one(&standby)
        .await
        .unwrap();
    for sql in [
        "ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port=1 connect_timeout=1'",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::raw_sql(sql).execute(&standby).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let said = embed_worker::replica::describe(&standby).await.unwrap();
        let exported = exported_lag(addr, "embed_worker_standby").await;
        if said.contains("NOT RECEIVING") && exported == Some(f64::INFINITY) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cut off: the standby says {said:?}, the worker exports {exported:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER SYSTEM SET primary_conninfo = '{}'",
        conninfo.replace('\'', "''")
    )))
    .execute(&standby)
    .await
    .unwrap();
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&standby)
        .await
        .unwrap();
    w.stop().await;
    standby.close().await;
    t.admin.close().await;
    assert_eq!(sources.len(), 60);
}
