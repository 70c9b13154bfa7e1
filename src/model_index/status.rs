//! `embed-worker models`: each model's role, rows, coverage and index.

use sqlx::PgPool;

use super::{IndexSpec, IndexState, Progress};

/// One model as `embed-worker models` shows it.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    /// The model.
    pub model: String,
    /// Whether it is the configured model (`model.name`).
    pub active: bool,
    /// Its role in `embed_worker.models` (`writing`, `serving`, both, `retired`).
    pub role: String,
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
    /// A registered model's index as registered (the configured one for `model.name`;
    /// `Missing` while deferred).
    pub state: Option<IndexState>,
    /// A build in progress of that index.
    pub building: Option<Progress>,
}

/// Per model: role, rows, sources covered, completeness, its indexes; for each registered model
/// (the active one as configured), whether its index is ready, building or deferred. Listed even
/// before it has rows; serving first.
pub async fn status(pool: &PgPool, active: &IndexSpec) -> anyhow::Result<Vec<ModelStatus>> {
    let total = crate::source::count_with_text(pool).await?;
    let registry = super::lifecycle::models(pool).await.unwrap_or_default();
    let mut rows: Vec<(String, i64, i64)> = sqlx::query_as(
        // Sources as lifecycle::covered_by_model counts them: one chunk 0 each.
        "SELECT embedding_model::text, count(*), count(*) FILTER (WHERE chunk_index = 0)
           FROM rag_embeddings GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    for m in registry.iter().map(|m| &m.name).chain([&active.model]) {
        if !rows.iter().any(|(r, _, _)| r == m) {
            rows.push((m.clone(), 0, 0));
        }
    }
    let rank = |m: &str| match registry.iter().position(|r| r.name == m) {
        Some(i) => i,
        None => registry.len(),
    };
    rows.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then(a.0.cmp(&b.0)));
    let all = super::vector_indexes(pool).await?;
    let building = super::progress(pool).await.unwrap_or_default();
    Ok(rows
        .into_iter()
        .map(|(model, n, sources)| {
            let is_active = model == active.model;
            let registered = registry.iter().find(|r| r.name == model);
            let state = if is_active {
                Some(super::find(&all, active))
            } else {
                registered.map(|r| super::find(&all, &IndexSpec::of(r)))
            };
            let building = match &state {
                Some(IndexState::Building(name)) | Some(IndexState::Invalid(name)) => {
                    building.iter().find(|p| &p.index == name).cloned()
                }
                _ => None,
            };
            ModelStatus {
                active: is_active,
                role: registered.map_or("unregistered", |r| r.role()).to_string(),
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

/// `embed-worker models`: one line per model.
pub struct StatusTable(pub Vec<ModelStatus>);

impl std::fmt::Display for StatusTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{:<32} {:<17} {:>9} {:>9} {:>7}  index",
            "model", "role", "rows", "sources", "done"
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
                index.push(if m.active {
                    "configured index not built yet (deferred: built by `run` once the queue drains; \
                     `models build-index` builds it now)"
                        .into()
                } else {
                    "its registered index is missing".into()
                });
            }
            if index.is_empty() {
                index.push("MISSING".into());
            }
            writeln!(
                f,
                "{:<32} {:<17} {:>9} {:>9} {:>6.1}%  {}",
                m.model,
                m.role,
                m.rows,
                m.sources,
                m.percent,
                index.join("; ")
            )?;
        }
        Ok(())
    }
}
