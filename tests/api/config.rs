//! Configuration and what the binary prints: degenerate values refused at start naming the
//! key, passwords never printed, a busy address named.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// `embed-worker` with `env`, no database needed; returns (exit code, stdout + stderr).
fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_embed-worker"));
    c.args(args)
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn every_degenerate_configuration_is_refused_at_start_naming_the_key() {
    for (key, value, names) in [
        ("QUEUE__FETCH_BATCH", "0", "queue.fetch_batch = 0"),
        (
            "DATABASE__MAX_CONNECTIONS",
            "0",
            "database.max_connections = 0",
        ),
        ("QUEUE__CONCURRENCY", "0", "queue.concurrency = 0"),
        ("QUEUE__HEARTBEAT_SECS", "0", "queue.heartbeat_secs = 0"),
        (
            "QUEUE__MISSED_HEARTBEATS",
            "0",
            "queue.missed_heartbeats = 0",
        ),
        (
            "API__MAX_TOKENS_PER_REQUEST",
            "0",
            "api.max_tokens_per_request = 0",
        ),
        ("API__TIMEOUT_SECS", "0", "api.timeout_secs = 0"),
        ("BATCH__MAX_JOBS", "0", "batch.max_jobs = 0"),
        ("HTTP__ADDR", "localhost", "http.addr"),
        ("BUDGET__MONTHLY_USD", "NaN", "budget.monthly_usd = NaN"),
        ("LOG__FORMAT", "jsn", "log.format"),
    ] {
        let (code, out) = cli(&["config"], &[(&format!("EMBED_WORKER__{key}"), value)]);
        assert_eq!(code, 2, "{key}={value}: {out}");
        assert!(out.contains(names), "{key}={value} names the key: {out}");
        assert!(!out.contains("panicked"), "{out}");
    }
    let (code, out) = cli(&["config"], &[("EMBED_WORKER__QUEUE__FETCH_BATCH", "0")]);
    assert_eq!(code, 2);
    assert!(
        out.contains("allowed: 1..=10000"),
        "the range is given: {out}"
    );
    let (code, out) = cli(&["config"], &[]);
    assert_eq!(code, 0, "the defaults are valid: {out}");
}

#[test]
fn database_passwords_never_print_in_config_or_errors() {
    let port = free_port();
    let url =
        format!("postgres://worker:hunter2@127.0.0.1:{port}/app?password=hunter3&sslmode=disable");
    let (code, out) = cli(&["config"], &[("DATABASE_URL", &url)]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("hunter"), "{out}");
    let started = Instant::now();
    let (code, out) = cli(&["status"], &[("DATABASE_URL", &url)]);
    assert_ne!(code, 0);
    assert!(!out.contains("hunter"), "{out}");
    assert!(
        out.contains("connection refused") && out.contains("DATABASE_URL"),
        "names the cause and the knob: {out}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails fast: {:?}",
        started.elapsed()
    );
    assert_eq!(
        out.matches("connection refused").count(),
        1,
        "printed once: {out}"
    );
    for bad in ["NaN", "-5", "inf"] {
        let (code, out) = cli(&["budget", "set", "--", bad], &[("DATABASE_URL", &url)]);
        assert_ne!(code, 0);
        assert!(
            out.contains("must be a finite number of USD >= 0"),
            "{bad}: {out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_http_address_is_named() {
    let t = TestDb::migrated().await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut s = t.settings();
    s.http.addr = addr.clone();
    let err = match embed_worker::worker::Worker::build(s).await {
        Ok(_) => panic!("bound a busy address"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(&addr) && err.contains("http.addr"), "{err}");
}

/// Every key of `config/default.toml` whose value is an integer, as `section.key`.
fn integer_keys() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
        .unwrap();
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
        } else if let Some((k, v)) = line.split_once('=')
            && !line.starts_with('#')
            && v.trim().parse::<i64>().is_ok()
        {
            keys.push(format!("{section}.{}", k.trim()));
        }
    }
    keys
}

#[test]
fn nan_huge_and_fractional_values_of_every_integer_key_exit_2_naming_the_key() {
    let keys = integer_keys();
    assert!(keys.len() > 30, "found {} integer keys", keys.len());
    for key in &keys {
        let var = format!("EMBED_WORKER__{}", key.replace('.', "__").to_uppercase());
        for value in ["NaN", "1e30", "2.5"] {
            let (code, out) = cli(&["config"], &[(var.as_str(), value)]);
            assert_eq!(code, 2, "{var}={value} accepted: {out}");
            assert!(out.contains(&format!("{key} = ")), "{var}={value}: {out}");
        }
    }
}

#[test]
fn the_batch_price_defaults_to_half_the_sync_price() {
    let (code, out) = cli(
        &["config"],
        &[("EMBED_WORKER__MODEL__USD_PER_MILLION_TOKENS", "0.02")],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("batch_usd_per_million_tokens = 0.01\n"),
        "{out}"
    );
    let (_, out) = cli(
        &["config"],
        &[
            ("EMBED_WORKER__MODEL__USD_PER_MILLION_TOKENS", "0.02"),
            ("EMBED_WORKER__MODEL__BATCH_USD_PER_MILLION_TOKENS", "0.015"),
        ],
    );
    assert!(
        out.contains("batch_usd_per_million_tokens = 0.015\n"),
        "set explicitly: {out}"
    );
}

#[test]
fn config_prints_toml_that_reads_back_as_the_same_settings() {
    let env = [
        ("OPENAI_API_KEY", "sk-never-printed"),
        ("EMBED_WORKER__QUEUE__FETCH_BATCH", "77"),
        ("EMBED_WORKER__INDEX__BUILD_PARALLEL_WORKERS", "auto"),
    ];
    let (code, first) = cli(&["config"], &env);
    assert_eq!(code, 0, "{first}");
    assert!(!first.contains("sk-never-printed"), "{first}");
    assert!(first.contains("[REDACTED]"), "says the key is set: {first}");
    assert!(
        first.contains("[queue]\n") && first.contains("fetch_batch = 77\n"),
        "{first}"
    );
    let file = tempdir().join("printed.toml");
    std::fs::write(&file, &first).unwrap();
    let (code, second) = cli(
        &["--config", file.to_str().unwrap(), "config"],
        &[("OPENAI_API_KEY", "sk-never-printed")],
    );
    assert_eq!(code, 0, "read back: {second}");
    // Each value says where it came from (issue 34, item 10).
    for (text, said) in [
        (
            &first,
            "# from env EMBED_WORKER__QUEUE__FETCH_BATCH\nfetch_batch = 77\n".to_string(),
        ),
        (
            &first,
            "[queue]\n# from config/default.toml\nname = \"embed\"\n".to_string(),
        ),
        (
            &first,
            "# derived\nbatch_usd_per_million_tokens = ".to_string(),
        ),
        (
            &second,
            format!("# from file {}\nfetch_batch = 77\n", file.display()),
        ),
    ] {
        assert!(text.contains(&said), "{said:?} in:\n{text}");
    }
    let values = |t: &str| -> String {
        t.lines()
            .filter(|l| !l.starts_with("# from ") && *l != "# derived")
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        values(&first),
        values(&second),
        "the printed settings read back as themselves"
    );
}

#[test]
fn a_closed_pipe_ends_a_command_quietly() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_embed-worker"))
        .arg("config")
        .env_remove("DATABASE_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read one line, then close the pipe, as `| head -1` does.
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 16];
    std::io::Read::read(&mut stdout, &mut first).unwrap();
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test]
async fn a_role_that_cannot_be_used_is_named_with_its_key_at_once() {
    let t = TestDb::migrated().await;
    let started = Instant::now();
    let (code, out) = cli(
        &["status"],
        &[
            ("DATABASE_URL", t.url.as_str()),
            ("EMBED_WORKER__DATABASE__ROLE", "no_such_role"),
        ],
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "not a pool time-out"
    );
    assert!(
        out.contains("database.role = \"no_such_role\"")
            && out.contains("EMBED_WORKER__DATABASE__ROLE"),
        "{out}"
    );
    assert_eq!(out.matches("does not exist").count(), 1, "said once: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_on_an_unmigrated_database_say_to_migrate_without_postgres_source_lines() {
    let t = TestDb::empty().await;
    for args in [
        &["status"][..],
        &["models"],
        &["verify"],
        &["search", "scales"],
        &["enqueue-stale", "--dry-run"],
        &["run", "--until-empty"],
    ] {
        let (code, out) = cli(
            args,
            &[("DATABASE_URL", &t.url), ("OPENAI_API_KEY", "sk-x")],
        );
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(
            out.contains("run `embed-worker migrate` first") && out.contains("does not exist"),
            "{args:?}: {out}"
        );
        // sqlx appends the line of PostgreSQL's C source that raised the error.
        assert!(!out.contains(" at line "), "{args:?}: {out}");
    }
}

#[test]
fn a_read_url_that_fails_is_named_as_search_database_url() {
    let port = free_port();
    let url = format!("postgres://reader:pw@127.0.0.1:{port}/app");
    for args in [&["search", "scales"][..], &["models"], &["status"]] {
        let (code, out) = cli(
            args,
            &[
                ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/unused"),
                ("EMBED_WORKER__SEARCH__DATABASE_URL", &url),
            ],
        );
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(
            out.contains("search.database_url / EMBED_WORKER__SEARCH__DATABASE_URL")
                && !out.contains("(database.url"),
            "{args:?} names the setting the URL came from: {out}"
        );
    }
}
