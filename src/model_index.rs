//! Embedding models as the database sees them: one HNSW partial index per model.
//!
//! Why one place: the index name, its predicate and the cast to `vector(dims)` must agree
//! between the migration, `ensure_model_index`, `verify` and the search query, or the planner
//! silently falls back to a sequential scan.

use sqlx::PgPool;

/// `idx_rag_embeddings_vector_<model>`, with the model name folded to `[a-z0-9_]`, at most 63 bytes.
pub fn index_name(model: &str) -> String {
    let folded: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("idx_rag_embeddings_vector_{folded}");
    name.truncate(63);
    name
}

/// Creates the model's HNSW index (m=16, ef_construction=64, cosine) if it is absent.
/// `CONCURRENTLY`: writes continue while it builds. Cannot run inside a transaction.
pub async fn ensure_model_index(
    pool: &PgPool,
    model: &str,
    dimensions: usize,
) -> anyhow::Result<()> {
    let name = index_name(model);
    let sql = format!(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON rag_embeddings \
         USING hnsw ((embedding::vector({dimensions})) vector_cosine_ops) \
         WITH (m = 16, ef_construction = 64) WHERE embedding_model = {lit}",
        lit = quote_literal(model)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await?;
    Ok(())
}

/// `s` as a quoted SQL literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

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
    /// Its HNSW index, if any.
    pub index: Option<String>,
    /// Whether that index is valid.
    pub index_valid: bool,
}

/// Per model: rows, sources covered, completeness, index present and valid. The active model
/// is listed even before it has rows.
pub async fn status(pool: &PgPool, active: &str) -> anyhow::Result<Vec<ModelStatus>> {
    // Sources with text, counted as the stale scan counts them.
    let counts: Vec<String> = crate::source::SourceType::ALL
        .iter()
        .map(|t| {
            format!(
                "(SELECT count(*) FROM {} x WHERE {})",
                t.table(),
                t.has_text_sql("x")
            )
        })
        .collect();
    let total: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {}",
        counts.join(" + ")
    )))
    .fetch_one(pool)
    .await?;
    let mut rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT embedding_model::text, count(*), count(DISTINCT (source_type, source_id))
           FROM rag_embeddings GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    if !rows.iter().any(|(m, _, _)| m == active) {
        rows.push((active.to_string(), 0, 0));
    }
    let indexes = crate::db::vector_indexes(pool).await?;
    Ok(rows
        .into_iter()
        .map(|(model, n, sources)| {
            let name = index_name(&model);
            let ix = indexes.iter().find(|i| i.name == name);
            ModelStatus {
                active: model == active,
                percent: if total == 0 {
                    100.0
                } else {
                    (sources as f64 * 100.0 / total as f64).min(100.0)
                },
                index: ix.map(|i| i.name.clone()),
                index_valid: ix.is_some_and(|i| i.valid),
                model,
                rows: n,
                sources,
                total_sources: total,
            }
        })
        .collect())
}

/// Drops `old`'s rows and index. Refuses to prune the active model, or while the active model
/// covers less than 100% of the sources (the old vectors are still serving).
pub async fn prune(pool: &PgPool, old: &str, active: &str) -> anyhow::Result<u64> {
    anyhow::ensure!(old != active, "refusing to prune the active model {active}");
    let st = status(pool, active).await?;
    let a = st.iter().find(|m| m.active).expect("active model listed");
    anyhow::ensure!(
        a.sources >= a.total_sources,
        "refusing to prune {old}: the active model {active} covers {}/{} sources ({:.1}%); wait for 100%",
        a.sources,
        a.total_sources,
        a.percent
    );
    let deleted = sqlx::query("DELETE FROM rag_embeddings WHERE embedding_model = $1")
        .bind(old)
        .execute(pool)
        .await?
        .rows_affected();
    let sql = format!("DROP INDEX CONCURRENTLY IF EXISTS {}", index_name(old));
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await?;
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
            writeln!(
                f,
                "{:<32} {:>6} {:>9} {:>9} {:>6.1}%  {}",
                m.model,
                if m.active { "yes" } else { "" },
                m.rows,
                m.sources,
                m.percent,
                match (&m.index, m.index_valid) {
                    (Some(ix), true) => format!("{ix} (valid)"),
                    (Some(ix), false) => format!("{ix} (INVALID)"),
                    (None, _) => "MISSING".to_string(),
                }
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_are_folded_and_bounded() {
        assert_eq!(
            index_name("text-embedding-ada-002"),
            "idx_rag_embeddings_vector_text_embedding_ada_002"
        );
        assert!(index_name(&"x".repeat(200)).len() <= 63);
    }
}
