//! `embed-worker models` and `models prune`: each model's rows, coverage and index, and
//! dropping an old model once the active one covers everything.

use sqlx::PgPool;

use super::{IndexSpec, IndexState, Progress};

/// One model as `embed-worker models` shows it.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    /// The model.
    pub model: String,
    /// Whether it is the configured model.
    pub active: bool,
    /// Rows of this model.
    pub rows: i64,
    /// Sources it covers.
    pub sources: i64,
    /// Sources with text to embed (the denominator of `percent`).
    pub total_sources: i64,
    /// Share of all sources covered.
    pub percent: f64,
    /// Its HNSW indexes: (name, stored type, valid).
    pub indexes: Vec<(String, String, bool)>,
    /// The active model only: its index as configured (`Missing` while deferred).
    pub state: Option<IndexState>,
    /// The active model only: a build in progress.
    pub building: Option<Progress>,
}

/// Per model: rows, sources covered, completeness, its indexes; for the active model (`active`),
/// whether its configured index is ready, building or deferred. Listed even before it has rows.
pub async fn status(pool: &PgPool, active: &IndexSpec) -> anyhow::Result<Vec<ModelStatus>> {
    let total = crate::source::count_with_text(pool).await?;
    let mut rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT embedding_model::text, count(*), count(DISTINCT (source_type, source_id))
           FROM rag_embeddings GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    if !rows.iter().any(|(m, _, _)| *m == active.model) {
        rows.push((active.model.clone(), 0, 0));
    }
    let all = super::vector_indexes(pool).await?;
    let building = super::progress(pool).await.unwrap_or_default();
    Ok(rows
        .into_iter()
        .map(|(model, n, sources)| {
            let is_active = model == active.model;
            let state = is_active.then(|| super::find(&all, active));
            let building = match &state {
                Some(IndexState::Building(name)) | Some(IndexState::Invalid(name)) => {
                    building.iter().find(|p| &p.index == name).cloned()
                }
                _ => None,
            };
            ModelStatus {
                active: is_active,
                percent: if total == 0 {
                    100.0
                } else {
                    (sources as f64 * 100.0 / total as f64).min(100.0)
                },
                indexes: all
                    .iter()
                    .filter(|ix| super::of_model(ix, &model))
                    .map(|ix| {
                        (
                            ix.name.clone(),
                            super::stored_type(ix).unwrap_or_else(|| "?".into()),
                            ix.valid,
                        )
                    })
                    .collect(),
                state,
                building,
                model,
                rows: n,
                sources,
                total_sources: total,
            }
        })
        .collect())
}

/// Drops `old`'s rows and indexes. Refuses to prune the active model, or while the active model
/// covers less than 100% of the sources (the old vectors are still serving).
pub async fn prune(pool: &PgPool, old: &str, active: &IndexSpec) -> anyhow::Result<u64> {
    anyhow::ensure!(
        old != active.model,
        "refusing to prune the active model {}",
        active.model
    );
    let st = status(pool, active).await?;
    let a = st.iter().find(|m| m.active).expect("active model listed");
    anyhow::ensure!(
        a.sources >= a.total_sources,
        "refusing to prune {old}: the active model {} covers {}/{} sources ({:.1}%); wait for 100%",
        active.model,
        a.sources,
        a.total_sources,
        a.percent
    );
    let deleted = sqlx::query("DELETE FROM rag_embeddings WHERE embedding_model = $1")
        .bind(old)
        .execute(pool)
        .await?
        .rows_affected();
    for ix in super::vector_indexes(pool).await? {
        if super::of_model(&ix, old) {
            super::build::drop_index(pool, &ix.name).await?;
        }
    }
    Ok(deleted)
}

/// `embed-worker models`: one line per model.
pub struct StatusTable(pub Vec<ModelStatus>);

impl std::fmt::Display for StatusTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<32} {:>6} {:>9} {:>9} {:>7}  index",
            "model", "active", "rows", "sources", "done"
        )?;
        for m in &self.0 {
            let mut index: Vec<String> = m
                .indexes
                .iter()
                .map(|(name, ty, valid)| {
                    let how = match (&m.building, valid) {
                        (_, true) => "valid".to_string(),
                        (Some(p), false) if &p.index == name => p.to_string(),
                        (_, false) => "INVALID".to_string(),
                    };
                    format!("{name} {ty} ({how})")
                })
                .collect();
            if m.state == Some(IndexState::Missing) {
                index.push(
                    "configured index not built yet (deferred: built by `run` once the queue drains; \
                     `models build-index` builds it now)"
                        .into(),
                );
            }
            if index.is_empty() {
                index.push("MISSING".into());
            }
            writeln!(
                f,
                "{:<32} {:>6} {:>9} {:>9} {:>6.1}%  {}",
                m.model,
                if m.active { "yes" } else { "" },
                m.rows,
                m.sources,
                m.percent,
                index.join("; ")
            )?;
        }
        Ok(())
    }
}
