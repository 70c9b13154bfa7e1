//! The `embed-worker` command line. Each subcommand is one operator task; `--help` lists them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use embed_worker::config::Settings;
use embed_worker::telemetry::{self, LogFormat};
use embed_worker::{db, models, seed};

#[derive(Parser, Debug)]
#[command(name = "embed-worker", version, about = "Keeps pgvector embeddings in step with the app's text")]
struct Cli {
    /// Extra configuration file layered over config/default.toml.
    #[arg(long, global = true, env = "EMBED_WORKER_CONFIG")]
    config: Option<PathBuf>,
    /// Log format (default from config `log.format`).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply apalis-postgres's and embed-worker's migrations (idempotent).
    Migrate,
    /// Check the schema: vector indexes (HNSW, m=16, ef_construction=64), RLS, source trigger.
    Verify,
    /// Load the question templates from a TOML file (idempotent).
    SeedTemplates {
        #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/config/templates.toml"))]
        file: PathBuf,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("embed-worker: {e:#}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(cli.log_format.unwrap_or(LogFormat::parse(&settings.log.format)));
    match run(cli.command, settings).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "command failed");
            eprintln!("embed-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate => {
            let pool = db::connect_admin(&settings.database.url).await?;
            db::migrate(&pool).await?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify => {
            let pool = db::connect_admin(&settings.database.url).await?;
            let report = db::verify(&pool, &models::index_name(&settings.model.name)).await?;
            println!("{:<56} {:<8} {:<32} valid", "vector index", "method", "options");
            for ix in &report.indexes {
                println!(
                    "{:<56} {:<8} {:<32} {}",
                    ix.name,
                    ix.access_method,
                    ix.options.join(","),
                    ix.valid
                );
            }
            if report.problems.is_empty() {
                println!("verify: OK");
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &report.problems {
                    println!("verify: FAIL: {p}");
                }
                Ok(ExitCode::FAILURE)
            }
        }
        Command::SeedTemplates { file } => {
            let seeds = seed::read_templates(&file)?;
            let pool = db::connect_admin(&settings.database.url).await?;
            let (inserted, updated) = seed::seed_templates(&pool, &seeds)
                .await
                .context("seeding templates")?;
            println!(
                "templates: {} in file, {inserted} inserted, {updated} updated",
                seeds.len()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
