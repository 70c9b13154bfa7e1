//! A model's life: registered with its partition, `writing` (what the worker embeds with),
//! `serving` (what searches read), retired, pruned.
//!
//! Why in the database: the worker's config was the only record of "the model", so a config
//! change switched every search to a model that covered only what had been re-embedded so far,
//! and an app in another process could not know which model was complete. Now the config's model
//! becomes `writing` at `migrate`; the serving model changes only by a promotion, in one
//! transaction, recorded in `embed_worker.model_promotions`: by itself when the writing model
//! covers every source and its index is valid (`models.auto_promote`), or by hand
//! (`models promote`, `--force` past the checks). Rolling back is promoting the old model while
//! its partition still exists. While the two differ, the sync lane writes both (dual-write; see
//! `Pipeline::process`), so the serving model never serves stale text.
//!
//! Why prune detaches: a model's rows are its own partition; `DETACH PARTITION … CONCURRENTLY`
//! and `DROP TABLE` remove them in constant time without writing their WAL.

use anyhow::Context;
use sqlx::{PgConnection, PgPool};

use super::{IndexSpec, IndexState};
use crate::config::ModelSettings;

/// One row of `embed_worker.models`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Model {
    /// `embedding_model`.
    pub name: String,
    /// Vector dimensions.
    pub dimensions: i32,
    /// `vector` or `halfvec`: what its index stores.
    pub index_type: String,
    /// Its partition of `rag_embeddings`.
    pub partition: String,
    /// The worker embeds new and changed text with it.
    pub writing: bool,
    /// Searches read it.
    pub serving: bool,
    /// Since when it serves.
    pub serving_since: Option<chrono::DateTime<chrono::Utc>>,
}

impl Model {
    /// `writing`, `serving`, `writing, serving` or `retired`.
    pub fn role(&self) -> &'static str {
        match (self.writing, self.serving) {
            (true, true) => "writing, serving",
            (true, false) => "writing",
            (false, true) => "serving",
            (false, false) => "retired",
        }
    }
}

const COLUMNS: &str =
    "name::text AS name, dimensions, index_type, partition, writing, serving, serving_since";

/// Every registered model, serving first, then writing, then by name.
pub async fn models<'e>(db: impl sqlx::PgExecutor<'e>) -> anyhow::Result<Vec<Model>> {
    sqlx::query_as::<_, Model>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM embed_worker.models ORDER BY serving DESC, writing DESC, name"
    )))
    .fetch_all(db)
    .await
    .context("reading embed_worker.models (run `embed-worker migrate`)")
}

/// The serving model, if any is registered.
pub async fn serving<'e>(db: impl sqlx::PgExecutor<'e>) -> anyhow::Result<Option<Model>> {
    Ok(models(db).await?.into_iter().find(|m| m.serving))
}

/// The serving model's index spec: what searches read. An error before the first `migrate`.
pub async fn serving_spec(pool: &PgPool) -> anyhow::Result<IndexSpec> {
    let m = serving(pool).await?.context(
        "no serving model is registered in embed_worker.models: run `embed-worker migrate`",
    )?;
    Ok(IndexSpec::of(&m))
}

/// OpenAI's list price per million tokens of the embedding models it publishes (sync; the
/// Batch API bills half): what a model registered before prices were recorded costs.
fn list_price(model: &str) -> Option<f64> {
    match model {
        "text-embedding-ada-002" => Some(0.10),
        "text-embedding-3-small" => Some(0.02),
        "text-embedding-3-large" => Some(0.13),
        _ => None,
    }
}

/// `migrate`: the configured model's prices, recorded in its registry row so that whatever is
/// embedded with it later (a batch it left open, the serving model's dual-write) is charged at
/// its price, whichever model the collecting worker is configured with.
pub async fn record_price(pool: &PgPool, m: &ModelSettings) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE embed_worker.models
            SET usd_per_million_tokens = $2, batch_usd_per_million_tokens = $3
          WHERE name = $1",
    )
    .bind(&m.name)
    .bind(m.usd_per_million_tokens)
    .bind(m.batch_usd_per_million_tokens)
    .execute(pool)
    .await
    .with_context(|| format!("recording model {}'s price", m.name))?;
    Ok(())
}

/// `base`'s settings for registered model `name` at `dimensions`, at that model's price: the
/// one `migrate` recorded, else OpenAI's list price for the name, else `base`'s own.
pub async fn settings_for(
    pool: &PgPool,
    base: &ModelSettings,
    name: &str,
    dimensions: usize,
) -> anyhow::Result<ModelSettings> {
    let mut m = base.for_model(name, dimensions);
    if name == base.name {
        return Ok(m);
    }
    let recorded: Option<(Option<f64>, Option<f64>)> = sqlx::query_as(
        "SELECT usd_per_million_tokens, batch_usd_per_million_tokens
           FROM embed_worker.models WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
    .with_context(|| format!("reading model {name}'s price"))?;
    let (usd, batch) = recorded.unwrap_or_default();
    match (usd.or_else(|| list_price(name)), batch) {
        (Some(usd), batch) => {
            m.usd_per_million_tokens = usd;
            m.batch_usd_per_million_tokens = batch.unwrap_or(usd / 2.0);
        }
        (None, Some(batch)) => m.batch_usd_per_million_tokens = batch,
        (None, None) => {}
    }
    Ok(m)
}

/// `migrate`'s first check, before it changes anything: the configured model, when registered
/// with rows, keeps its dimensions. A new size under the same name would cast every stored row
/// to the wrong size (every search fails) and leave the new index build INVALID.
pub async fn check_dimensions(pool: &PgPool, spec: &IndexSpec) -> anyhow::Result<()> {
    let registered: Option<(i32, String)> = sqlx::query_as(
        "SELECT m.dimensions, m.partition FROM embed_worker.models m
          WHERE to_regclass('embed_worker.models') IS NOT NULL AND m.name = $1",
    )
    .bind(&spec.model)
    .fetch_optional(pool)
    .await
    .or_else(|e| match &e {
        // A database `migrate` has not yet made: nothing registered.
        sqlx::Error::Database(d) if d.code().as_deref() == Some("42P01") => Ok(None),
        _ => Err(e),
    })?;
    let Some((dims, partition)) = registered else {
        return Ok(());
    };
    if dims as usize == spec.dimensions || !partition_exists(pool, &spec.model).await? {
        return Ok(());
    }
    let has_rows: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT EXISTS (SELECT 1 FROM {})",
        crate::db::quote_ident(&partition)
    )))
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(
        !has_rows,
        "refusing model.dimensions = {}: model {} is registered with {dims} dimensions and has \
         rows at that size; nothing was changed. A new size is a new model in the registry: \
         switch to a model name of its own (EMBED_WORKER__MODEL__NAME: another model, or this \
         one under another name where the provider serves one, such as an Azure deployment; \
         README, switching model without downtime), or, once {model} neither serves nor writes, \
         `embed-worker models prune {model}` and register it anew; or set model.dimensions = \
         {dims} back",
        spec.dimensions,
        spec.model,
        model = spec.model,
    );
    Ok(())
}

/// Registers `spec`'s model and creates its partition; needs the table's owner.
pub async fn ensure<'e>(db: impl sqlx::PgExecutor<'e>, spec: &IndexSpec) -> anyhow::Result<String> {
    sqlx::query_scalar("SELECT embed_worker.ensure_model($1, $2, $3)")
        .bind(&spec.model)
        .bind(spec.dimensions as i32)
        .bind(spec.type_name())
        .fetch_one(db)
        .await
        .with_context(|| {
            format!(
                "registering model {} and its partition (needs the owner of rag_embeddings: \
                 run `embed-worker migrate` with the login that owns it)",
                spec.model
            )
        })
}

/// `migrate`: the config's model (`spec`) is registered and becomes the writing model. When no
/// model serves yet (a fresh install, or the upgrade from one table), the model covering the
/// most sources serves (the config's on a tie or with no rows), recorded as `install`.
/// Returns what changed, in words.
pub async fn on_migrate(conn: &mut PgConnection, spec: &IndexSpec) -> anyhow::Result<String> {
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("LOCK TABLE embed_worker.models IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    ensure(&mut *tx, spec).await?;
    let before = models(&mut *tx).await?;
    let was_writing = before.iter().find(|m| m.writing).map(|m| m.name.clone());
    // Two statements: the unique "one writing" index is checked row by row.
    sqlx::query(
        "UPDATE embed_worker.models SET writing = false, writing_since = NULL
          WHERE writing AND name <> $1",
    )
    .bind(&spec.model)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE embed_worker.models SET writing = true, writing_since = now()
          WHERE name = $1 AND NOT writing",
    )
    .bind(&spec.model)
    .execute(&mut *tx)
    .await?;
    let mut said = match was_writing {
        Some(w) if w == spec.model => format!("writing model {}", spec.model),
        Some(w) => format!("writing model {} (was {w})", spec.model),
        None => format!("writing model {}", spec.model),
    };
    if !before.iter().any(|m| m.serving) {
        let covered = covered_by_model(&mut *tx).await?;
        let mine = covered
            .iter()
            .find(|(m, _)| *m == spec.model)
            .map_or(0, |(_, n)| *n);
        let pick = covered
            .iter()
            .filter(|(_, n)| *n > mine)
            .max_by_key(|(_, n)| *n)
            .map_or(spec.model.clone(), |(m, _)| m.clone());
        set_serving(&mut tx, &pick, None, "install", None).await?;
        said.push_str(&format!(", serving model {pick} (first registration)"));
    }
    tx.commit().await?;
    Ok(said)
}

/// Flips the serving flag to `model` and records it (inside the caller's transaction).
async fn set_serving(
    tx: &mut sqlx::PgConnection,
    model: &str,
    previous: Option<&str>,
    how: &str,
    coverage: Option<f64>,
) -> anyhow::Result<()> {
    // Two statements: the unique "one serving" index is checked row by row.
    sqlx::query(
        "UPDATE embed_worker.models SET serving = false, serving_since = NULL
          WHERE serving AND name <> $1",
    )
    .bind(model)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE embed_worker.models SET serving = true, serving_since = now() WHERE name = $1",
    )
    .bind(model)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO embed_worker.model_promotions (model, previous, how, coverage)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(model)
    .bind(previous)
    .bind(how)
    .bind(coverage)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Sources each model covers, by model. Every written source has its chunk 0 (the write stores
/// chunks 0..n): counting those rows counts sources, without a DISTINCT over every chunk.
pub async fn covered_by_model<'e>(
    db: impl sqlx::PgExecutor<'e>,
) -> anyhow::Result<Vec<(String, i64)>> {
    Ok(sqlx::query_as(
        "SELECT embedding_model::text, count(*) FROM rag_embeddings WHERE chunk_index = 0
          GROUP BY 1",
    )
    .fetch_all(db)
    .await?)
}

/// Sources `model` covers, and sources with text to embed.
pub async fn coverage(db: &mut sqlx::PgConnection, model: &str) -> anyhow::Result<(i64, i64)> {
    let covered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rag_embeddings WHERE embedding_model = $1 AND chunk_index = 0",
    )
    .bind(model)
    .fetch_one(&mut *db)
    .await?;
    Ok((covered, crate::source::count_with_text(&mut *db).await?))
}

/// Whether `model`'s partition is attached to `rag_embeddings`.
pub async fn partition_exists<'e>(
    db: impl sqlx::PgExecutor<'e>,
    model: &str,
) -> anyhow::Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_inherits
                         WHERE inhparent = to_regclass('public.rag_embeddings')
                           AND inhrelid = to_regclass(format('public.%I', $1::text)))",
    )
    .bind(super::partition_name(model))
    .fetch_one(db)
    .await?)
}

/// The share of sources covered (1 when there is nothing to cover).
pub fn ratio(covered: i64, total: i64) -> f64 {
    if total <= 0 {
        1.0
    } else {
        (covered as f64 / total as f64).min(1.0)
    }
}

/// A promotion that happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Promotion {
    /// The model that serves now.
    pub model: String,
    /// The one that served before.
    pub previous: Option<String>,
    /// `auto`, `manual` or `forced`.
    pub how: &'static str,
    /// Its coverage at the moment of the switch.
    pub coverage: f64,
}

impl std::fmt::Display for Promotion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "serving model is now {} (was {}; {}, coverage {:.1}%)",
            self.model,
            self.previous.as_deref().unwrap_or("none"),
            self.how,
            self.coverage * 100.0
        )
    }
}

/// Why `model` may not serve yet, if it may not: it is not registered, its partition is gone,
/// it covers less than every source, or its index is not valid.
pub async fn not_ready(
    db: &mut sqlx::PgConnection,
    model: &Model,
) -> anyhow::Result<(f64, Option<String>)> {
    let (covered, total) = coverage(&mut *db, &model.name).await?;
    let share = ratio(covered, total);
    if covered < total {
        return Ok((
            share,
            Some(format!(
                "{} covers {covered} of {total} sources ({:.1}% coverage); promotion needs 100%",
                model.name,
                share * 100.0
            )),
        ));
    }
    // The count passed (cheap, checked on every round of a switch); the set decides.
    let (missing, outdated) = crate::freshness::uncovered(&mut *db, &model.name).await?;
    if missing + outdated > 0 {
        let share = ratio(total - missing - outdated, total);
        return Ok((
            share,
            Some(format!(
                "{} has no current row for {} of {total} sources with text ({missing} missing, \
                 {outdated} edited since it wrote them: `migrate` with it as model.name makes \
                 it the writing model, whose stale scan re-embeds them); promotion needs every one",
                model.name,
                missing + outdated,
            )),
        ));
    }
    let spec = IndexSpec::of(model);
    let state = super::find(&super::vector_indexes(&mut *db).await?, &spec);
    let why = match state {
        IndexState::Ready(_) => None,
        IndexState::Building(name) => Some(format!("its index {name} is still being built")),
        IndexState::Invalid(name) => Some(format!(
            "its index {name} is invalid (`embed-worker models build-index` rebuilds it)"
        )),
        IndexState::Missing => Some(format!(
            "its index {} is not built yet (`embed-worker models build-index`)",
            spec.name()
        )),
    };
    Ok((share, why.map(|w| format!("{}: {w}", model.name))))
}

/// `ANALYZE` of the model's partition (as its owner): the planner then knows its rows and uses
/// its index for the search's `ORDER BY … LIMIT`.
pub async fn analyze(conn: &mut sqlx::PgConnection, spec: &IndexSpec) -> anyhow::Result<()> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ANALYZE {}",
        crate::db::quote_ident(&spec.partition())
    )))
    .execute(conn)
    .await
    .with_context(|| format!("analyzing {}", spec.partition()))?;
    Ok(())
}

/// Makes `model` the serving model in one transaction (the models table locked against a
/// concurrent promotion). Refused with the reason while it is not ready, unless `force`.
/// `auto` marks the worker's own promotion. Returns `None` when it already serves.
pub async fn promote(
    conn: &mut PgConnection,
    model: &str,
    force: bool,
    auto: bool,
) -> anyhow::Result<Option<Promotion>> {
    if let Some(m) = models(&mut *conn)
        .await?
        .into_iter()
        .find(|m| m.name == model && !m.serving)
    {
        // Fresh statistics first: searches switch to it at the commit.
        analyze(&mut *conn, &IndexSpec::of(&m)).await?;
    }
    let mut tx = sqlx::Connection::begin(conn).await?;
    sqlx::query("LOCK TABLE embed_worker.models IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let all = models(&mut *tx).await?;
    let Some(target) = all.iter().find(|m| m.name == model) else {
        let known: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
        anyhow::bail!(
            "refusing to promote {model}: not a registered model (registered: {}); a model is \
             registered by `migrate` with it as model.name",
            known.join(", ")
        );
    };
    if target.serving {
        return Ok(None);
    }
    anyhow::ensure!(
        partition_exists(&mut *tx, model).await?,
        "refusing to promote {model}: its partition {} is gone (pruned)",
        target.partition
    );
    let (share, why) = not_ready(&mut tx, target).await?;
    if let Some(why) = &why {
        anyhow::ensure!(
            force,
            "refusing to promote {why} (`--force` promotes anyway; searches then miss what it lacks)"
        );
    }
    let previous = all.iter().find(|m| m.serving).map(|m| m.name.clone());
    let how = match (auto, why.is_some()) {
        (true, _) => "auto",
        (false, true) => "forced",
        (false, false) => "manual",
    };
    set_serving(&mut tx, model, previous.as_deref(), how, Some(share)).await?;
    tx.commit().await?;
    let p = Promotion {
        model: model.to_string(),
        previous,
        how,
        coverage: share,
    };
    crate::meter::model_promoted(&p.model, p.how);
    tracing::info!(event = "model_promoted", model = %p.model, previous = ?p.previous,
        how = p.how, coverage = p.coverage, "serving model switched");
    Ok(Some(p))
}

/// The worker's check (after its index check): while the writing model is not the serving one,
/// promote it once it covers every source and its index is valid (`models.auto_promote`).
pub async fn promote_if_due(
    pool: &PgPool,
    s: &crate::config::Settings,
) -> anyhow::Result<Option<Promotion>> {
    if !s.models.auto_promote {
        return Ok(None);
    }
    let all = models(pool).await?;
    let (Some(writing), Some(serving)) = (
        all.iter().find(|m| m.writing),
        all.iter().find(|m| m.serving),
    ) else {
        return Ok(None);
    };
    if writing.name == serving.name || writing.name != s.model.name {
        return Ok(None);
    }
    if let Some(how) = displaced_by_hand(pool, &writing.name).await? {
        tracing::debug!(model = %writing.name, how, "not auto-promoted: an operator promoted another model over it");
        return Ok(None);
    }
    let mut conn = pool.acquire().await?;
    if not_ready(&mut conn, writing).await?.1.is_some() {
        return Ok(None);
    }
    drop(conn);
    // Checked again under the lock, in the promotion's own transaction, as the login (the
    // table's owner, as for index builds): the worker role may read the registry, not change it.
    let mut admin = crate::db::login_conn(pool).await?;
    let promoted = promote(&mut admin, &writing.name, false, true).await;
    drop(admin);
    match promoted {
        Ok(p) => Ok(p),
        // Another replica promoted it, or a source arrived since the check: next time.
        Err(e) if e.to_string().starts_with("refusing") => {
            tracing::debug!(error = %format!("{e:#}"), "auto-promotion not taken");
            Ok(None)
        }
        Err(e) => Err(e.context(format!("promoting {} to serving", writing.name))),
    }
}

/// How `model` was last displaced from serving when an operator did it (`manual`, `forced`):
/// a rollback (`models promote <old>`) is not undone by the worker's auto-promotion of the model
/// it rolled back from. `models promote <model>` (or a `migrate` to another model) decides again.
pub async fn displaced_by_hand(pool: &PgPool, model: &str) -> anyhow::Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT how FROM (SELECT how, previous FROM embed_worker.model_promotions
                            ORDER BY id DESC LIMIT 1) last
          WHERE previous = $1 AND how IN ('manual', 'forced')",
    )
    .bind(model)
    .fetch_optional(pool)
    .await?)
}

/// Records that worker `name` runs with `model` (`embed_worker.workers`), for [`prune`].
pub async fn seen(pool: &PgPool, name: &str, model: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO embed_worker.workers (name, model) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET model = EXCLUDED.model, seen_at = now()",
    )
    .bind(name)
    .bind(model)
    .execute(pool)
    .await?;
    // Rows of workers gone for a day: nobody reads them.
    sqlx::query("DELETE FROM embed_worker.workers WHERE seen_at < now() - interval '1 day'")
        .execute(pool)
        .await?;
    Ok(())
}

/// Worker `name` stopped (best effort: an unremoved row lapses after 60 s).
pub async fn left(pool: &PgPool, name: &str) {
    let _ = sqlx::query("DELETE FROM embed_worker.workers WHERE name = $1")
        .bind(name)
        .execute(pool)
        .await;
}

/// Drops `old`'s partition (its rows and index): `DETACH PARTITION … CONCURRENTLY`, then `DROP
/// TABLE`, then its registration. Refuses the serving and the writing model. Needs the table's
/// owner. Returns the rows the partition held.
pub async fn prune(pool: &PgPool, old: &str) -> anyhow::Result<i64> {
    let all = models(pool).await?;
    let m = all.iter().find(|m| m.name == old);
    if let Some(m) = m {
        anyhow::ensure!(
            !m.serving,
            "refusing to prune {old}: it is the serving model (searches read it); promote \
             another model first"
        );
        anyhow::ensure!(
            !m.writing,
            "refusing to prune {old}: it is the writing model (model.name)"
        );
    }
    let live: Vec<(String, f64)> = sqlx::query_as(
        "SELECT name, extract(epoch FROM now() - seen_at)::float8 FROM embed_worker.workers
          WHERE model = $1 AND seen_at > now() - interval '60 seconds' ORDER BY name",
    )
    .bind(old)
    .fetch_all(pool)
    .await?;
    if !live.is_empty() {
        let who: Vec<String> = live
            .iter()
            .map(|(name, ago)| format!("{name} (seen {ago:.0} s ago)"))
            .collect();
        anyhow::bail!(
            "refusing to prune {old}: {} running with model.name = {old}: {}; roll them out with \
             the current configuration first (a worker's presence lapses 60 s after it stops); \
             nothing was changed",
            if live.len() == 1 {
                "a worker is"
            } else {
                "workers are"
            },
            who.join(", ")
        );
    }
    let part = super::partition_name(old);
    let exists = partition_exists(pool, old).await?;
    anyhow::ensure!(
        exists || m.is_some(),
        "nothing to prune: {old} has no partition and is not registered"
    );
    let mut rows = 0;
    if exists {
        rows = sqlx::query_scalar("SELECT count(*) FROM rag_embeddings WHERE embedding_model = $1")
            .bind(old)
            .fetch_one(pool)
            .await?;
        let mut conn = pool.acquire().await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE rag_embeddings DETACH PARTITION {} CONCURRENTLY",
            crate::db::quote_ident(&part)
        )))
        .execute(&mut *conn)
        .await
        .with_context(|| {
            format!("detaching {part} (needs the owner of rag_embeddings; a detach interrupted half-way is finished by `ALTER TABLE rag_embeddings DETACH PARTITION {part} FINALIZE`)")
        })?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP TABLE {}",
            crate::db::quote_ident(&part)
        )))
        .execute(&mut *conn)
        .await
        .with_context(|| format!("dropping {part}"))?;
    }
    sqlx::query("DELETE FROM embed_worker.models WHERE name = $1 AND NOT serving AND NOT writing")
        .bind(old)
        .execute(pool)
        .await?;
    tracing::info!(event = "model_pruned", model = %old, rows, partition = %part, "model pruned");
    Ok(rows)
}

/// `run`'s start: the config's model must have its partition (a row of a model without one has
/// nowhere to go). Registered here when missing (as the login, the table's owner). Roles are
/// `migrate`'s, except where no model serves yet (a fresh install whose `migrate` predates
/// this version): then this one writes and serves, as `migrate` would make it. Warns when
/// `migrate` has not made it the writing model.
pub async fn ensure_for_run(pool: &PgPool, s: &crate::config::Settings) -> anyhow::Result<()> {
    let spec = IndexSpec::from_settings(s)?;
    let mut all = models(pool).await?;
    let exists = partition_exists(pool, &spec.model).await?;
    let install = !all.iter().any(|m| m.serving);
    if !exists || install {
        let mut admin = crate::db::login_conn(pool).await?;
        let made = if install {
            on_migrate(&mut admin, &spec).await.map(|said| {
                tracing::info!(%said, "no serving model was registered");
            })
        } else {
            ensure(&mut *admin, &spec).await.map(|_| ())
        };
        drop(admin);
        made.with_context(|| {
            format!(
                "model.name = {} has no partition of rag_embeddings yet",
                spec.model
            )
        })?;
        all = models(pool).await?;
    }
    match all.iter().find(|m| m.writing) {
        Some(w) if w.name == spec.model => {}
        other => tracing::warn!(
            configured = %spec.model,
            writing = other.map_or("none", |m| m.name.as_str()),
            "model.name is not the writing model in embed_worker.models: run `embed-worker migrate` \
             with this configuration (until then no automatic promotion)"
        ),
    }
    Ok(())
}

/// The models' coverage gauges, once; returns the serving/writing line `/readyz` and `status`
/// show.
pub async fn sample(pool: &PgPool) -> anyhow::Result<String> {
    let all = models(pool).await?;
    let mut conn = pool.acquire().await?;
    let total = crate::source::count_with_text(&mut *conn).await?;
    let covered = covered_by_model(&mut *conn).await?;
    let share = |m: &str| {
        ratio(
            covered.iter().find(|(c, _)| c == m).map_or(0, |(_, n)| *n),
            total,
        )
    };
    let gauges: Vec<(String, Vec<&'static str>, f64)> = all
        .iter()
        .map(|m| {
            let mut roles = Vec::new();
            if m.writing {
                roles.push("writing");
            }
            if m.serving {
                roles.push("serving");
            }
            if roles.is_empty() {
                roles.push("retired");
            }
            (m.name.clone(), roles, share(&m.name))
        })
        .collect();
    crate::meter::model_coverage(&gauges);
    let say = |m: Option<&Model>| {
        m.map_or("none".to_string(), |m| {
            format!("{} ({:.1}%)", m.name, share(&m.name) * 100.0)
        })
    };
    Ok(format!(
        "serving model: {}; writing model: {}",
        say(all.iter().find(|m| m.serving)),
        say(all.iter().find(|m| m.writing))
    ))
}
