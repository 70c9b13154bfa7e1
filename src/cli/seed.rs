//! Seed: the demo's question templates and practice sessions.

use std::process::ExitCode;

use anyhow::Context;

use embed_worker::config::Settings;
use embed_worker::{db, seed};

/// `embed-worker seed-sessions`.
pub(crate) async fn seed_sessions(settings: &Settings, count: usize) -> anyhow::Result<ExitCode> {
    let pool = db::connect_as_login(&settings.database.url).await?;
    let n = seed::seed_demo_sessions(&pool, count).await?;
    println!("demo sessions: {n} inserted");
    Ok(ExitCode::SUCCESS)
}

/// `embed-worker seed-templates`.
pub(crate) async fn seed_templates(
    settings: &Settings,
    file: std::path::PathBuf,
) -> anyhow::Result<ExitCode> {
    let seeds = seed::read_templates(&file)?;
    let pool = db::connect_as_login(&settings.database.url).await?;
    let (inserted, updated) = seed::seed_templates(&pool, &seeds)
        .await
        .context("seeding templates")?;
    println!(
        "templates: {} in file, {inserted} inserted, {updated} updated",
        seeds.len()
    );
    Ok(ExitCode::SUCCESS)
}
