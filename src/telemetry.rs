//! Logging, set up once per process.
//!
//! Why: operators grep JSON in production and read plain lines on a laptop; both come from the
//! same `tracing` spans. `RUST_LOG` filters (default `info`). Nothing here ever formats the API
//! key: it lives in a `SecretString` and is not a field of any span.

use tracing_subscriber::{EnvFilter, fmt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

impl LogFormat {
    pub fn parse(s: &str) -> Self {
        if s.eq_ignore_ascii_case("json") {
            LogFormat::Json
        } else {
            LogFormat::Human
        }
    }
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,apalis=warn,apalis_core=warn"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Human => builder.try_init(),
    };
}
