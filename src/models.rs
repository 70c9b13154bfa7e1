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

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
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
