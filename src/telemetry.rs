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
