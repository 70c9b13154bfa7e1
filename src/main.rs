//! The `embed-worker` command line: parse, load the configuration, set up telemetry once,
//! dispatch to [`cli`] (one function per subcommand), print an error once.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use embed_worker::config::Settings;
use embed_worker::telemetry::{self, LogFormat};

#[tokio::main]
async fn main() -> ExitCode {
    quiet_on_closed_pipe();
    let cli = cli::Cli::parse();
    embed_worker::init_tls();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("embed-worker: {}", embed_worker::redact::error(&e));
            return ExitCode::from(2);
        }
    };
    telemetry::init(cli.log_format.unwrap_or(settings.log.format));
    let json_logs = cli.log_format.unwrap_or(settings.log.format) == LogFormat::Json;
    let migrating = matches!(cli.command, cli::Command::Migrate { .. });
    match cli::dispatch(cli.command, settings, cli.config.as_deref()).await {
        Ok(code) => code,
        Err(e) => {
            // Once: as a JSON log event where logs are JSON, else as a plain line.
            let mut message = embed_worker::redact::error(&e);
            if !migrating && embed_worker::db::needs_migrate(&e) {
                message.push_str(
                    "; this database lacks embed-worker's schema (or has an older one): run \
                     `embed-worker migrate` first, as the login that owns the tables",
                );
            }
            if json_logs {
                tracing::error!(error = %message, "command failed");
            } else {
                eprintln!("embed-worker: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

/// `embed-worker config | head -1`: once the reader has gone, stop quietly with 0, as `ls` and
/// `cat` do, instead of panicking on the next line printed (exit 101, a backtrace hint).
fn quiet_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.contains("Broken pipe") || message.contains("os error 32") {
            std::process::exit(0);
        }
        default(info);
    }));
}
