//! Paid: what need not be paid for again, read before any API call.
//!
//! Two things: the stored content hashes of a source's chunks ([`stored_hashes`]: an unchanged
//! chunk is not sent), and vectors of long sources kept from the moment they are paid for
//! until their source is written ([`take`], [`put`], [`clear`]).
//!
//! Why the second: a source is written all or nothing, and a long one spans several requests. When one of
//! them failed (or the worker stopped half-way), the retry used to send — and pay for — every
//! chunk again. Vectors of sources with more than one chunk are staged by (model, content hash)
//! as each request returns; the next attempt takes them from here, and the write removes them.
//! Single-chunk sources (most sessions) never touch this table.

use std::collections::HashMap;

use pgvector::Vector;
use sqlx::PgPool;
use uuid::Uuid;

use crate::source::EmbedSource;

/// A stored chunk's content hash, and when its row was written. An empty hash is a vector
/// adopted with the app's table and not yet verified (db::adopt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub hash: String,
    pub updated_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl Stored {
    /// Whether this is an adopted vector that may stand for `chunk`, the only chunk of a
    /// source whose text was last changed at `read_at`: its row was written at or after
    /// that (without a timestamp, as `untimed` says). Never for a source split in several.
    pub(crate) fn adoptable(&self, read_at: chrono::DateTime<chrono::Utc>, untimed: bool) -> bool {
        self.hash.is_empty()
            && match self.updated_at {
                Some(at) => at >= read_at,
                None => untimed,
            }
    }
}

/// Stored content hashes by (source, chunk_index) for one model.
pub(crate) async fn stored_hashes(
    pool: &PgPool,
    model: &str,
    sources: &[EmbedSource],
) -> sqlx::Result<HashMap<(EmbedSource, usize), Stored>> {
    let types: Vec<&str> = sources.iter().map(|s| s.source_type.as_str()).collect();
    let ids: Vec<Uuid> = sources.iter().map(|s| s.source_id).collect();
    type Row = (
        String,
        Uuid,
        i32,
        String,
        Option<chrono::DateTime<chrono::Utc>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT e.source_type::text, e.source_id, e.chunk_index, e.content_hash, e.updated_at
           FROM rag_embeddings e
           JOIN unnest($1::text[], $2::uuid[]) AS s(t, id)
             ON e.source_type = embed_worker.source_label(s.t) AND e.source_id = s.id
          WHERE e.embedding_model = $3",
    )
    .bind(&types)
    .bind(&ids)
    .bind(model)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(t, id, idx, hash, updated_at)| {
            Some((
                (EmbedSource::from_row((t, id))?, idx as usize),
                Stored { hash, updated_at },
            ))
        })
        .collect())
}

/// Vectors kept for `hashes` of `model`: content hash → (vector, tokens).
pub(crate) async fn take(
    pool: &PgPool,
    model: &str,
    hashes: &[&str],
) -> sqlx::Result<HashMap<String, (Vector, usize)>> {
    if hashes.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(String, Vector, i32)> = sqlx::query_as(
        "SELECT content_hash, embedding, token_count FROM embed_worker.chunk_stage
          WHERE embedding_model = $1 AND content_hash = ANY($2)",
    )
    .bind(model)
    .bind(hashes)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(h, v, t)| (h, (v, t.max(0) as usize)))
        .collect())
}

/// Keeps vectors just paid for: (content hash, vector, tokens).
pub(crate) async fn put(
    pool: &PgPool,
    model: &str,
    chunks: &[(&str, &[f32], usize)],
) -> sqlx::Result<()> {
    if chunks.is_empty() {
        return Ok(());
    }
    let hashes: Vec<&str> = chunks.iter().map(|(h, _, _)| *h).collect();
    // Vectors travel as text literals: a few per long source, not the hot path.
    let vectors: Vec<String> = chunks
        .iter()
        .map(|(_, v, _)| {
            let parts: Vec<String> = v.iter().map(|x| x.to_string()).collect();
            format!("[{}]", parts.join(","))
        })
        .collect();
    let tokens: Vec<i32> = chunks.iter().map(|(_, _, t)| *t as i32).collect();
    sqlx::query(
        "INSERT INTO embed_worker.chunk_stage (embedding_model, content_hash, embedding, token_count)
         SELECT $1, h, v::vector, t FROM unnest($2::text[], $3::text[], $4::int[]) AS u(h, v, t)
         ON CONFLICT (embedding_model, content_hash) DO NOTHING",
    )
    .bind(model)
    .bind(&hashes)
    .bind(&vectors)
    .bind(&tokens)
    .execute(pool)
    .await?;
    Ok(())
}

/// Forgets kept vectors once their source is written.
pub(crate) async fn clear(pool: &PgPool, model: &str, hashes: &[String]) -> sqlx::Result<()> {
    if hashes.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "DELETE FROM embed_worker.chunk_stage WHERE embedding_model = $1 AND content_hash = ANY($2)",
    )
    .bind(model)
    .bind(hashes)
    .execute(pool)
    .await?;
    Ok(())
}

/// Retention: kept vectors older than `age` belong to sources that never completed.
pub(crate) async fn prune(pool: &PgPool, age: std::time::Duration) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM embed_worker.chunk_stage WHERE created_at < now() - make_interval(secs => $1)",
    )
    .bind(age.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}
