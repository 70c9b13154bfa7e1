//! Administration: the configuration, the schema, the models' indexes and the budget.

use std::process::ExitCode;

use embed_worker::config::Settings;
use embed_worker::{db, model_index};

use super::{BudgetAction, ModelsAction};

/// `embed-worker config`: the settings in effect (defaults, the file, the environment, and what
/// is derived from them), as TOML, the form `config/` holds, so it can be read back with
/// `--config`, each value under a comment saying where it came from; passwords masked, the API
/// key only said to be set.
pub(crate) async fn config(
    settings: &Settings,
    file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let origins = embed_worker::config::Origins::new(file);
    print!(
        "{}",
        embed_worker::config::with_origins(&toml::to_string(settings)?, &origins)
    );
    let key = match settings.api.api_key {
        Some(_) => "[REDACTED]",
        None => "not set",
    };
    println!("\n# api key (OPENAI_API_KEY or OPENAI_API_KEY_FILE, never from a file): {key}");
    Ok(ExitCode::SUCCESS)
}

/// `embed-worker migrate [--plan]`: the plan first (read from the catalog, printed), then,
/// unless `--plan` or a conflict stops it, the migrations.
pub(crate) async fn migrate(settings: &Settings, plan_only: bool) -> anyhow::Result<ExitCode> {
    let pool = db::connect_as_login(&settings.database.url).await?;
    let plan = db::plan::plan(
        &mut *pool.acquire().await?,
        &settings.render,
        &settings.model.name,
        settings.model.dimensions,
    )
    .await?;
    print!("{plan}");
    if plan_only {
        println!("nothing changed (--plan)");
        return Ok(if plan.conflicts.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    if let Some(refusal) = plan.refusal() {
        anyhow::bail!(refusal);
    }
    let spec = model_index::IndexSpec::from_settings(settings)?;
    model_index::lifecycle::check_dimensions(&pool, &spec).await?;
    db::migrate_adopting(&pool, plan.adopt.as_ref(), &settings.render.session_owner).await?;
    db::register_queue(&pool, &settings.queue.name).await?;
    for line in db::render::follow_render(&pool, &settings.render).await? {
        println!("{line}");
    }
    let owner = &settings.render.session_owner;
    if let Some(line) = db::render::follow_owner(&pool, owner).await? {
        println!("{line}");
    }
    db::render::drop_owner_placeholder(&pool, owner).await?;
    embed_worker::search::apply_settings(&pool, &settings.search, owner).await?;
    db::apply_capture(&pool, settings.capture.sessions, settings.capture.templates).await?;
    db::apply_listen(&pool, settings.queue.listen).await?;
    embed_worker::guard::budget::set(&pool, settings.budget.monthly_usd).await?;
    let roles = model_index::lifecycle::on_migrate(&mut *pool.acquire().await?, &spec).await?;
    model_index::lifecycle::record_price(&pool, &settings.model).await?;
    let index = model_index::build::on_migrate(&pool, settings).await?;
    println!(
        "migrations applied; change capture sessions={} templates={}; notify={}; {roles}; {index}",
        settings.capture.sessions, settings.capture.templates, settings.queue.listen,
    );
    Ok(ExitCode::SUCCESS)
}

/// `embed-worker verify`.
pub(crate) async fn verify(settings: &Settings) -> anyhow::Result<ExitCode> {
    let pool = db::connect_as_login(&settings.database.url).await?;
    let report = embed_worker::verify::verify(&pool, settings).await?;
    print!("{report}");
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `embed-worker models`.
pub(crate) async fn models(
    settings: &Settings,
    action: Option<ModelsAction>,
) -> anyhow::Result<ExitCode> {
    let Some(action) = action else {
        // Only reads: from search.database_url when set (a standby), as `search` does.
        let pool = db::connect_reads(settings, false).await?;
        let spec = model_index::IndexSpec::from_settings(settings)?;
        print!(
            "{}",
            model_index::StatusTable(model_index::status(&pool, &spec).await?)
        );
        return Ok(ExitCode::SUCCESS);
    };
    let pool = db::connect_as_login(&settings.database.url).await?;
    match action {
        ModelsAction::Prune { model } => {
            let started = std::time::Instant::now();
            let n = model_index::prune(&pool, &model).await?;
            println!(
                "pruned {model}: its partition ({n} rows) detached and dropped in {:.2} s",
                started.elapsed().as_secs_f64()
            );
        }
        ModelsAction::Promote { model, force } => {
            match model_index::lifecycle::promote(&mut *pool.acquire().await?, &model, force, false)
                .await?
            {
                Some(p) => println!("{p}"),
                None => println!("{model} is already the serving model"),
            }
        }
        ModelsAction::BuildIndex { when_due } => {
            let outcome = model_index::build_if_due(&pool, settings, !when_due, None).await?;
            println!("{outcome}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `embed-worker budget`.
pub(crate) async fn budget(
    settings: &Settings,
    action: Option<BudgetAction>,
) -> anyhow::Result<ExitCode> {
    if let Some(BudgetAction::Set { usd }) = action {
        anyhow::ensure!(
            usd.is_finite() && usd >= 0.0,
            "budget set {usd}: the monthly budget must be a finite number of USD >= 0 (0 = none)"
        );
    }
    let pool = db::connect_as_login(&settings.database.url).await?;
    if let Some(BudgetAction::Set { usd }) = action {
        embed_worker::guard::budget::set(&pool, usd).await?;
    }
    let (spent, budget) = embed_worker::guard::budget::month(&pool).await?;
    println!("spend this month: ${spent:.4}; budget: ${budget:.2} (0 = none)");
    Ok(ExitCode::SUCCESS)
}
