//! Logging, set up once per process.
//!
//! Why: operators grep JSON in production and read plain lines on a laptop; both come from the
//! same `tracing` spans. `RUST_LOG` filters (default `info`). Nothing here ever formats the API
//! key: it lives in a `SecretString` and is not a field of any span.

use tracing_subscriber::{EnvFilter, fmt};

/// How log lines are written (`log.format`, or `--log-format`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One plain line per event, for a terminal.
    Human,
    /// One JSON object per event, for a log pipeline.
    Json,
}

/// Sets up logging once (later calls do nothing).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,apalis=warn,apalis_core=warn"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

/// A unique name for this process (apalis's worker name, a lease's holder): the host (pod)
/// name plus a random suffix, so a restarted pod is a new name and the logs say which pod.
pub fn worker_name() -> String {
    let host = std::env::var("HOSTNAME")
        .or_else(|_| std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()))
        .unwrap_or_else(|_| "embed-worker".into());
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}
