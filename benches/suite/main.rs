//! The benchmark suite: `cargo bench --bench suite [-- --large] [-- --only e2e,quota,queue,collect,search,replicas,prune,build,insert,switch,pace,capture,adopt,real] [--real-rows 20000]`.
//!
//! Why a harness of our own and not criterion: what matters here is whole-system throughput
//! against real PostgreSQL 18 + pgvector and the ceilings beside it (a raw binary COPY into the
//! same indexed table; the provider's quota), measured once per configuration and appended to
//! BENCHMARKS.md with the machine and the command. Data are generated here: practice sessions
//! whose lengths spread log-uniformly from 20 to 2,000 tokens, a few transcripts over 8,191
//! tokens, some non-English text; search vectors are clustered (100 centres), never uniform
//! noise, because HNSW recall on uniform random vectors says nothing.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use embed_worker::config::IndexPrecision;
use embed_worker::config::{DatabaseSettings, Settings};
use embed_worker::fake_openai::fake_vector;
use embed_worker::pipeline::chunk::Chunker;
use embed_worker::pipeline::write::{self, ChunkWrite, SourceWrite};
use embed_worker::source::{EmbedSource, SourceType};
use embed_worker::{db, model_index};
use pgvector::Vector;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use uuid::Uuid;

/// The integration tests' harness (one fresh database per test, the fake, worker processes).
#[path = "../../tests/api/helpers.rs"]
mod helpers;

mod adopt;
mod capture;
mod collect;
mod corpus;
mod e2e;
mod harness;
mod insert;
mod prune;
mod queue;
mod quota;
mod real;
mod replicas;
mod report;
mod search;
mod switch;
mod tokenizer;

use adopt::*;
use capture::*;
use collect::*;
use corpus::*;
use e2e::*;
use harness::*;
use insert::*;
use prune::*;
use queue::*;
use quota::*;
use real::*;
use replicas::*;
use report::*;
use search::*;
use switch::*;
use tokenizer::*;

const DIMS: usize = 1536;
const MODEL: &str = "text-embedding-ada-002";

struct Args {
    only: Option<HashSet<String>>,
    e2e_sources: usize,
    search_rows: usize,
    quota_secs: u64,
    collect_inputs: usize,
    prune_rows: usize,
    adopt_rows: usize,
    real_rows: usize,
    build_rows: Vec<usize>,
    insert_rows: Vec<usize>,
}

/// `a,b,c` as numbers, or `default`.
fn list(v: Option<String>, default: &[usize]) -> Vec<usize> {
    v.map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let large = argv.iter().any(|a| a == "--large");
    Args {
        only: get("--only").map(|s| s.split(',').map(str::to_string).collect()),
        e2e_sources: get("--e2e-sources")
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000),
        search_rows: get("--search-rows")
            .and_then(|v| v.parse().ok())
            .unwrap_or(if large { 500_000 } else { 100_000 }),
        quota_secs: get("--quota-secs")
            .and_then(|v| v.parse().ok())
            .unwrap_or(90),
        collect_inputs: get("--collect-inputs")
            .and_then(|v| v.parse().ok())
            .unwrap_or(50_000),
        prune_rows: get("--prune-rows")
            .and_then(|v| v.parse().ok())
            .unwrap_or(500_000),
        adopt_rows: get("--adopt-rows")
            .and_then(|v| v.parse().ok())
            .unwrap_or(500_000),
        real_rows: get("--real-rows")
            .and_then(|v| v.parse().ok())
            .unwrap_or(20_000),
        build_rows: list(get("--build-rows"), &[20_000, 100_000]),
        insert_rows: list(
            get("--insert-rows"),
            if large {
                &[100_000, 500_000]
            } else {
                &[100_000]
            },
        ),
    }
}

#[tokio::main]
async fn main() {
    embed_worker::init_tls();
    let a = args();
    let want = |s: &str| a.only.as_ref().is_none_or(|o| o.contains(s));
    let status = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/db"))
        .arg("start")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "scripts/db start");
    let started = Instant::now();
    let mut report = Report::default();
    let _ = Settings::load(None).unwrap();

    let corpus = gen_corpus(a.e2e_sources, 7);
    let mut tokenize_cpu = 0.0;
    if want("tokenizer") || want("e2e") {
        eprintln!("tokenizer …");
        tokenize_cpu = bench_tokenizer(&mut report, &corpus);
    }
    if want("e2e") || want("quota") {
        let (url, pool) = fresh_db("e2e").await;
        let users: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
        let ids = insert_sessions(&pool, &users, &corpus).await;
        let sources = helpers::session_sources(&ids);
        if want("e2e") {
            // --e2e-deferred: only the deferred-index runs at 0 ms (a profile, a quick check).
            let deferred_only = std::env::args().any(|a| a == "--e2e-deferred");
            for latency in [0u64, 200] {
                if deferred_only {
                    if latency == 0 {
                        eprintln!("e2e at 0 ms, deferred index …");
                        bench_e2e(&mut report, &url, &pool, &sources, 0, tokenize_cpu, true).await;
                    }
                    continue;
                }
                eprintln!("e2e at {latency} ms …");
                let live = bench_e2e(
                    &mut report,
                    &url,
                    &pool,
                    &sources,
                    latency,
                    tokenize_cpu,
                    false,
                )
                .await;
                eprintln!("e2e at {latency} ms, deferred index …");
                let deferred = bench_e2e(
                    &mut report,
                    &url,
                    &pool,
                    &sources,
                    latency,
                    tokenize_cpu,
                    true,
                )
                .await;
                let _ = (live.rows, live.cpu_s);
                let speedup = deferred.rows_per_s / live.rows_per_s;
                report.add(
                    &format!("e2e {latency}ms, deferred index"),
                    "rows/s, deferred build ÷ live index",
                    format!("{speedup:.2}"),
                    "≥ 3",
                    Some(speedup >= 3.0),
                );
            }
        }
        if want("quota") {
            eprintln!("quota …");
            bench_quota(&mut report, &url, &pool, &sources, a.quota_secs).await;
        }
        pool.close().await;
        drop_db(&url).await;
    }
    if want("switch") {
        eprintln!("switch …");
        let (url, pool) = fresh_db("switch").await;
        let users: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
        let ids = insert_sessions(&pool, &users, &corpus).await;
        bench_switch(&mut report, &url, &pool, &helpers::session_sources(&ids)).await;
        pool.close().await;
        drop_db(&url).await;
    }
    if want("pace") {
        eprintln!("pace …");
        let (url, pool) = fresh_db("pace").await;
        bench_pace(&mut report, &url, &pool).await;
        pool.close().await;
        drop_db(&url).await;
    }
    if want("build") {
        for &n in &a.build_rows {
            eprintln!("build {n} …");
            let (url, pool) = fresh_db("build").await;
            let workers: &[u32] = if n <= 20_000 { &[0, 1, 2] } else { &[1, 2] };
            bench_build(&mut report, &pool, n, workers).await;
            pool.close().await;
            drop_db(&url).await;
        }
    }
    if want("insert") {
        for &n in &a.insert_rows {
            eprintln!("insert into {n} …");
            let (url, pool) = fresh_db("insert").await;
            bench_insert(&mut report, &pool, n).await;
            pool.close().await;
            drop_db(&url).await;
        }
    }
    if want("queue") {
        eprintln!("queue …");
        let (url, pool) = fresh_db("queue").await;
        bench_queue(&mut report, &pool, 20_000).await;
        pool.close().await;
        drop_db(&url).await;
    }
    if want("collect") {
        let inputs = a.collect_inputs;
        eprintln!("collect {inputs} inputs …");
        let (url, pool) = fresh_db("collect").await;
        bench_collect(&mut report, &url, &pool, inputs).await;
        pool.close().await;
        drop_db(&url).await;
    }
    if want("search") {
        eprintln!("search on {} rows …", a.search_rows);
        let (url, pool) = fresh_db("search").await;
        bench_search(&mut report, &pool, a.search_rows).await;
        pool.close().await;
        drop_db(&url).await;
    }
    if want("replicas") {
        let (url, pool) = fresh_db("replicas").await;
        let users: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
        let ids = insert_sessions(&pool, &users, &corpus).await;
        let sources = helpers::session_sources(&ids);
        bench_replicas(&mut report, &url, &pool, &sources).await;
        pool.close().await;
        drop_db(&url).await;
    }
    if want("capture") {
        eprintln!("capture …");
        let (url, pool) = fresh_db("capture").await;
        bench_capture(&mut report, &url, &pool).await;
        pool.close().await;
        drop_db(&url).await;
    }
    if want("prune") {
        eprintln!("prune of {} rows …", a.prune_rows);
        let (url, pool) = fresh_db("prune").await;
        bench_prune(&mut report, &pool, a.prune_rows).await;
        pool.close().await;
        drop_db(&url).await;
    }
    if want("real") {
        eprintln!("real vectors, {} rows …", a.real_rows);
        bench_real(&mut report, a.real_rows).await;
    }
    if want("adopt") {
        eprintln!("adopt of {} rows …", a.adopt_rows);
        bench_adopt(&mut report, a.adopt_rows).await;
    }
    let total = started.elapsed();

    // Append to BENCHMARKS.md.
    let command = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect::<Vec<_>>()
        .join(" ");
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n## Run {} — `cargo bench --bench suite{}`\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        if command.is_empty() {
            String::new()
        } else {
            format!(" -- {command}")
        }
    );
    let _ = writeln!(md, "- machine: {}", machine(&server_info().await));
    let _ = writeln!(
        md,
        "- commit: {}",
        String::from_utf8_lossy(
            &Command::new("git")
                .args(["rev-parse", "--short", "HEAD"])
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default()
        )
        .trim()
    );
    let _ = writeln!(
        md,
        "- parameters: e2e {} sources (log-uniform 20–2,000 tokens, 1 in 500 over 8,191, ~2.5% non-English), fake API in its own process; search {} × {DIMS} clustered vectors (100 centres); quota window {} s",
        a.e2e_sources, a.search_rows, a.quota_secs
    );
    let _ = writeln!(md, "- total time: {:.1} min\n", total.as_secs_f64() / 60.0);
    let _ = writeln!(
        md,
        "| section | figure | value | goal | met |\n| --- | --- | --- | --- | --- |"
    );
    for (section, r) in &report.rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "",
        };
        let _ = writeln!(
            md,
            "| {section} | {} | {} | {} | {met} |",
            r.what, r.value, r.goal
        );
    }
    for n in &report.notes {
        let _ = writeln!(md, "\n{n}");
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/BENCHMARKS.md");
    let mut existing = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n\nEach run of `cargo bench --bench suite` appends a section (newest last).\n".into());
    existing.push_str(&md);
    std::fs::write(path, existing).unwrap();
    eprintln!(
        "appended to BENCHMARKS.md ({:.1} min)",
        total.as_secs_f64() / 60.0
    );
}
