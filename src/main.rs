//! The `embed-worker` command line: parse, load the configuration, set up telemetry once,
//! dispatch to [`cli`] (one function per subcommand), print an error once.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use embed_worker::config::Settings;
use embed_worker::telemetry::{self, LogFormat};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    embed_worker::init_tls();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "embed-worker: {}",
                embed_worker::redact::secrets(&format!("{e:#}"), None)
            );
            return ExitCode::from(2);
        }
    };
    telemetry::init(cli.log_format.unwrap_or(settings.log.format));
    let json_logs = cli.log_format.unwrap_or(settings.log.format) == LogFormat::Json;
    match cli::dispatch(cli.command, settings).await {
        Ok(code) => code,
        Err(e) => {
            // Once: as a JSON log event where logs are JSON, else as a plain line.
            let message = embed_worker::redact::secrets(&format!("{e:#}"), None);
            if json_logs {
                tracing::error!(error = %message, "command failed");
            } else {
                eprintln!("embed-worker: {message}");
            }
            ExitCode::FAILURE
        }
    }
}
