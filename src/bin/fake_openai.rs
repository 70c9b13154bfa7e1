//! `fake-openai`: the project's OpenAI-compatible embeddings server, as a process, for the
//! README walkthrough, benchmarks and manual runs. See `embed_worker::fake_openai`.

use std::time::Duration;

use clap::Parser;
use embed_worker::fake_openai::{FakeConfig, FakeServer};

#[derive(Parser, Debug)]
#[command(
    name = "fake-openai",
    about = "OpenAI-compatible fake embeddings server"
)]
struct Args {
    #[arg(long, default_value_t = 8089)]
    port: u16,
    /// Latency added to every request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Extra latency per 1,000 tokens, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_per_1k_ms: u64,
    /// Requests per minute (0: unlimited).
    #[arg(long, default_value_t = 0)]
    rpm: u64,
    /// Tokens per minute (0: unlimited).
    #[arg(long, default_value_t = 0)]
    tpm: u64,
    /// Share of requests answered 503, 0..1.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Answer 429 insufficient_quota to everything.
    #[arg(long)]
    insufficient_quota: bool,
    /// Batch API: how long a batch stays in progress, in milliseconds.
    #[arg(long, default_value_t = 0)]
    batch_delay_ms: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let a = Args::parse();
    let config = FakeConfig {
        rpm: a.rpm,
        tpm: a.tpm,
        latency: Duration::from_millis(a.latency_ms),
        latency_per_1k_tokens: Duration::from_millis(a.latency_per_1k_ms),
        error_rate: a.error_rate,
        insufficient_quota: a.insufficient_quota,
        batch_delay: Duration::from_millis(a.batch_delay_ms),
        ..FakeConfig::default()
    };
    let server = FakeServer::start(config, a.port).await?;
    println!("{}", server.base_url());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
