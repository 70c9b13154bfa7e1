//! Write: a batch's vectors into `rag_embeddings`, in one transaction.
//!
//! Why this shape:
//! - one transaction per batch, bulk statements (UNNEST arrays), so the database sees a handful
//!   of statements per batch rather than one per row;
//! - a transaction-scoped advisory lock per source, taken in sorted order (no deadlocks), so two
//!   workers writing the same source serialize and leave exactly one consistent set of chunks;
//! - newest wins: under the lock the source's `updated_at` is compared with the one the text was
//!   read at; a source changed since is not written (a fresh job is queued for it instead), so
//!   an old text can never overwrite a newer one's vectors;
//! - chunks beyond the new count are deleted, so a shorter text leaves no stale tail.
//! This module is the only one that writes `rag_embeddings`.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use pgvector::Vector;
use sqlx::PgPool;
use uuid::Uuid;

use crate::queue::{EmbedSource, SourceType};

/// Stored content hashes by (source, chunk_index) for one model.
pub async fn existing_hashes(
    pool: &PgPool,
    model: &str,
    sources: &[EmbedSource],
) -> sqlx::Result<HashMap<(EmbedSource, usize), String>> {
    let types: Vec<&str> = sources.iter().map(|s| s.source_type.as_str()).collect();
    let ids: Vec<Uuid> = sources.iter().map(|s| s.source_id).collect();
    let rows: Vec<(String, Uuid, i32, String)> = sqlx::query_as(
        "SELECT e.source_type::text, e.source_id, e.chunk_index, e.content_hash
           FROM rag_embeddings e
           JOIN unnest($1::text[]::embedding_source[], $2::uuid[]) AS s(t, id)
             ON e.source_type = s.t AND e.source_id = s.id
          WHERE e.embedding_model = $3",
    )
    .bind(&types)
    .bind(&ids)
    .bind(model)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(t, id, idx, hash)| {
            let source_type: SourceType = t.parse().ok()?;
            Some((
                (
                    EmbedSource {
                        source_type,
                        source_id: id,
                    },
                    idx as usize,
                ),
                hash,
            ))
        })
        .collect())
}

/// A chunk to store. `vector` is `None` when the stored row already has this content hash.
#[derive(Debug, Clone)]
pub struct ChunkWrite {
    pub index: usize,
    pub content_hash: String,
    pub tokens: usize,
    pub vector: Option<Vector>,
}

/// Everything to store for one source.
#[derive(Debug, Clone)]
pub struct SourceWrite {
    pub source: EmbedSource,
    /// The source's `updated_at` when its text was read.
    pub read_at: DateTime<Utc>,
    pub chunks: Vec<ChunkWrite>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    Written,
    /// The source changed after its text was read; a new job was queued.
    Superseded,
    /// The source no longer exists.
    Gone,
}

fn lock_key(s: &EmbedSource) -> i64 {
    // Stable 64-bit key; Postgres' advisory-lock space is shared, so prefix by purpose.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in b"embed-worker:"
        .iter()
        .chain(s.source_type.as_str().as_bytes())
        .chain(s.source_id.as_bytes())
    {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h as i64
}

/// Writes one batch. Returns the outcome per source.
pub async fn write_batch(
    pool: &PgPool,
    model: &str,
    dimensions: usize,
    queue: &str,
    max_attempts: i32,
    writes: &[SourceWrite],
) -> sqlx::Result<HashMap<EmbedSource, WriteOutcome>> {
    let mut outcomes = HashMap::with_capacity(writes.len());
    if writes.is_empty() {
        return Ok(outcomes);
    }
    let mut tx = pool.begin().await?;

    let mut keys: Vec<i64> = writes.iter().map(|w| lock_key(&w.source)).collect();
    keys.sort_unstable();
    keys.dedup();
    sqlx::query("SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::bigint[]) AS k")
        .bind(&keys)
        .execute(&mut *tx)
        .await?;

    // Newest wins: compare updated_at under the lock.
    let ids_of = |ty: SourceType| -> Vec<Uuid> {
        writes
            .iter()
            .filter(|w| w.source.source_type == ty)
            .map(|w| w.source.source_id)
            .collect()
    };
    let mut current: HashMap<EmbedSource, DateTime<Utc>> = HashMap::new();
    for (ty, sql) in [
        (
            SourceType::Session,
            "SELECT id, updated_at FROM sessions WHERE id = ANY($1)",
        ),
        (
            SourceType::Template,
            "SELECT id, updated_at FROM question_templates WHERE id = ANY($1)",
        ),
    ] {
        let ids = ids_of(ty);
        if ids.is_empty() {
            continue;
        }
        let rows: Vec<(Uuid, DateTime<Utc>)> =
            sqlx::query_as(sql).bind(&ids).fetch_all(&mut *tx).await?;
        for (id, at) in rows {
            current.insert(
                EmbedSource {
                    source_type: ty,
                    source_id: id,
                },
                at,
            );
        }
    }

    let mut fresh: Vec<&SourceWrite> = Vec::with_capacity(writes.len());
    let mut superseded: Vec<EmbedSource> = Vec::new();
    for w in writes {
        match current.get(&w.source) {
            None => {
                outcomes.insert(w.source, WriteOutcome::Gone);
            }
            Some(at) if *at != w.read_at => {
                outcomes.insert(w.source, WriteOutcome::Superseded);
                superseded.push(w.source);
            }
            Some(_) => {
                outcomes.insert(w.source, WriteOutcome::Written);
                fresh.push(w);
            }
        }
    }

    // New vectors: one UNNEST upsert.
    let mut types = Vec::new();
    let mut ids = Vec::new();
    let mut idxs = Vec::new();
    let mut hashes = Vec::new();
    let mut vectors = Vec::new();
    let mut tokens = Vec::new();
    // Unchanged chunks: mark as verified now (their updated_at moves, the vector stays).
    let mut same_types = Vec::new();
    let mut same_ids = Vec::new();
    let mut same_idxs = Vec::new();
    for w in &fresh {
        for c in &w.chunks {
            match &c.vector {
                Some(v) => {
                    types.push(w.source.source_type.as_str());
                    ids.push(w.source.source_id);
                    idxs.push(c.index as i32);
                    hashes.push(c.content_hash.as_str());
                    vectors.push(v);
                    tokens.push(c.tokens as i32);
                }
                None => {
                    same_types.push(w.source.source_type.as_str());
                    same_ids.push(w.source.source_id);
                    same_idxs.push(c.index as i32);
                }
            }
        }
    }
    if !ids.is_empty() {
        sqlx::query(
            "INSERT INTO rag_embeddings AS e (source_type, source_id, chunk_index, content_hash,
                                              embedding, embedding_model, dimensions, token_count)
             SELECT t, id, idx, h, v, $6, $7, n
               FROM unnest($1::text[]::embedding_source[], $2::uuid[], $3::int[], $4::text[],
                           $5::vector[], $8::int[]) AS u(t, id, idx, h, v, n)
             ON CONFLICT (source_type, source_id, embedding_model, chunk_index) DO UPDATE
                SET content_hash = EXCLUDED.content_hash, embedding = EXCLUDED.embedding,
                    dimensions = EXCLUDED.dimensions, token_count = EXCLUDED.token_count,
                    updated_at = now()",
        )
        .bind(&types)
        .bind(&ids)
        .bind(&idxs)
        .bind(&hashes)
        .bind(&vectors)
        .bind(model)
        .bind(dimensions as i32)
        .bind(&tokens)
        .execute(&mut *tx)
        .await?;
    }
    if !same_ids.is_empty() {
        sqlx::query(
            "UPDATE rag_embeddings e SET updated_at = now()
               FROM unnest($1::text[]::embedding_source[], $2::uuid[], $3::int[]) AS u(t, id, idx)
              WHERE e.source_type = u.t AND e.source_id = u.id AND e.chunk_index = u.idx
                AND e.embedding_model = $4",
        )
        .bind(&same_types)
        .bind(&same_ids)
        .bind(&same_idxs)
        .bind(model)
        .execute(&mut *tx)
        .await?;
    }

    // Chunks beyond each source's new count (a shorter text, or an emptied one).
    let del_types: Vec<&str> = fresh
        .iter()
        .map(|w| w.source.source_type.as_str())
        .collect();
    let del_ids: Vec<Uuid> = fresh.iter().map(|w| w.source.source_id).collect();
    let del_counts: Vec<i32> = fresh.iter().map(|w| w.chunks.len() as i32).collect();
    if !del_ids.is_empty() {
        sqlx::query(
            "DELETE FROM rag_embeddings e
              USING unnest($1::text[]::embedding_source[], $2::uuid[], $3::int[]) AS u(t, id, n)
              WHERE e.source_type = u.t AND e.source_id = u.id AND e.embedding_model = $4
                AND e.chunk_index >= u.n",
        )
        .bind(&del_types)
        .bind(&del_ids)
        .bind(&del_counts)
        .bind(model)
        .execute(&mut *tx)
        .await?;
    }

    if !superseded.is_empty() {
        crate::queue::enqueue_many(&mut *tx, queue, max_attempts, &superseded).await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// Distinct sources, in order.
pub fn distinct(sources: impl IntoIterator<Item = EmbedSource>) -> Vec<EmbedSource> {
    let mut seen = HashSet::new();
    sources.into_iter().filter(|s| seen.insert(*s)).collect()
}
