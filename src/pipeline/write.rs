//! Write: a batch's vectors into `rag_embeddings`, in one transaction per stream.
//!
//! Why this shape:
//! - one transaction per part of a batch (`write.streams` parts of whole sources, written at
//!   once over as many connections) and bulk statements — new vectors streamed by binary COPY into a
//!   temporary staging table and upserted from it, the rest as UNNEST arrays — so the database
//!   sees a handful of statements per batch rather than one per row;
//! - a transaction-scoped lock per source (a row of `embed_worker.source_locks`, which the app's
//!   role cannot lock), taken in a fixed order (no deadlocks), so two workers writing the same
//!   source serialize and leave exactly one consistent set of chunks;
//! - newest wins: under the lock the source's `updated_at` is compared with the one the text was
//!   read at; a source changed since is not written (a fresh job is queued for it instead), so
//!   an old text can never overwrite a newer one's vectors;
//! - chunks beyond the new count are deleted, so a shorter text leaves no stale tail.
//!
//! This module is the only one that writes `rag_embeddings`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use pgvector::Vector;
use sqlx::PgPool;
use uuid::Uuid;

use crate::source::{EmbedSource, SourceType};

/// A chunk to store. `vector` is `None` when the stored row already has this content hash.
#[derive(Debug, Clone)]
pub struct ChunkWrite {
    /// Chunk index.
    pub index: usize,
    /// Its content hash.
    pub content_hash: String,
    /// Its tokens.
    pub tokens: usize,
    /// The new vector, or `None` when unchanged.
    pub vector: Option<Vector>,
}

/// Everything to store for one source.
#[derive(Debug, Clone)]
pub struct SourceWrite {
    /// The source.
    pub source: EmbedSource,
    /// The source's `updated_at` when its text was read.
    pub read_at: DateTime<Utc>,
    /// All its chunks, in order.
    pub chunks: Vec<ChunkWrite>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
/// What the write did with a source.
pub enum WriteOutcome {
    /// Written (or verified unchanged).
    Written,
    /// The source changed after its text was read; a new job was queued.
    Superseded,
    /// The source no longer exists.
    Gone,
}

/// The COPY target of one connection's writes: temporary (no WAL, local buffers) and emptied
/// at every commit or rollback. Created on the connection's first write.
const COPY_TABLE: &str = "DO $$ BEGIN
    IF to_regclass('pg_temp.embed_copy') IS NULL THEN
        CREATE TEMP TABLE embed_copy (
            source_type text NOT NULL,
            source_id   uuid NOT NULL,
            chunk_index integer NOT NULL,
            content_hash text NOT NULL,
            embedding   vector NOT NULL,
            token_count integer NOT NULL
        ) ON COMMIT DELETE ROWS;
    END IF;
END $$";

/// Bytes buffered before a COPY chunk is sent: bounds the worker's and the connection's buffers
/// (each pooled connection keeps a write buffer as large as the largest message it sent, and
/// `write.streams` multiplies the connections writing at once: 256 KB put the e2e run's peak
/// RSS at 66 MB with two streams).
const COPY_CHUNK: usize = 64 * 1024;
/// Room past [`COPY_CHUNK`] for the row that crosses it (4,000 dimensions: ~16 KB).
const COPY_SLACK: usize = 32 * 1024;

/// Rows in PostgreSQL's binary COPY format: a header, then per row a field count and
/// length-prefixed big-endian fields, then a -1 trailer. Sent in chunks as it fills.
pub struct CopyRows {
    buf: Vec<u8>,
}

impl Default for CopyRows {
    fn default() -> Self {
        Self::new()
    }
}

impl CopyRows {
    /// An empty buffer with the COPY header.
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(COPY_CHUNK + COPY_SLACK);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        CopyRows { buf }
    }

    /// Starts a row of `fields` fields.
    pub fn row(&mut self, fields: i16) {
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    /// One field's bytes.
    pub fn field(&mut self, bytes: &[u8]) {
        self.buf
            .extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(bytes);
    }

    /// pgvector's binary form: dimensions (int16), unused (int16), float4s.
    pub fn vector(&mut self, v: &[f32]) {
        self.buf
            .extend_from_slice(&((4 + v.len() * 4) as i32).to_be_bytes());
        self.buf.extend_from_slice(&(v.len() as i16).to_be_bytes());
        self.buf.extend_from_slice(&0i16.to_be_bytes());
        for x in v {
            self.buf.extend_from_slice(&x.to_be_bytes());
        }
    }

    /// Bytes buffered.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// What is buffered so far, to send; the buffer starts over.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::replace(&mut self.buf, Vec::with_capacity(COPY_CHUNK + COPY_SLACK))
    }

    /// The rest, with the trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// Where and how a batch is written.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The model the vectors are of (its partition).
    pub model: &'a str,
    /// Their dimensions.
    pub dimensions: usize,
    /// Where a superseded source's fresh job goes, and its attempts.
    pub queue: &'a str,
    /// Attempts of that job.
    pub max_attempts: i32,
    /// Unchanged chunks are marked as verified now (the writing model's freshness); the serving
    /// model's dual-write passes false (moving `updated_at` on an unchanged row is an UPDATE, and
    /// a non-HOT one re-inserts the row into the model's HNSW graph).
    pub touch: bool,
    /// Connections the batch is split over, by source (`write.streams`).
    pub streams: usize,
}

/// Writes one batch: its sources split over up to `to.streams` connections at once, each a
/// transaction of whole sources (a source's chunks are never split), balanced by new vectors.
/// Why: pgvector inserts each new row into the HNSW graph in the backend that writes it, so one
/// connection keeps one core busy however many the server has; two streams halve a 100-row
/// write on two cores (BENCHMARKS.md). Returns the outcome per source. If one stream fails the
/// batch fails (and is retried); the streams that committed are then found unchanged by their
/// content hashes and cost nothing again.
pub async fn write_batch(
    pool: &PgPool,
    to: &Target<'_>,
    writes: &[SourceWrite],
) -> sqlx::Result<HashMap<EmbedSource, WriteOutcome>> {
    let parts = split(writes, to.streams);
    if parts.len() <= 1 {
        let all: Vec<&SourceWrite> = writes.iter().collect();
        return write_one(pool, to, &all).await;
    }
    let mut outcomes = HashMap::with_capacity(writes.len());
    for part in futures::future::try_join_all(parts.iter().map(|p| write_one(pool, to, p))).await? {
        outcomes.extend(part);
    }
    Ok(outcomes)
}

/// `writes` in up to `streams` parts of whole sources, the new vectors spread evenly (each
/// source to the part with the least so far, largest first; a source with none counts as
/// one). One part when at most one source has a new vector: only graph insertion gains.
fn split(writes: &[SourceWrite], streams: usize) -> Vec<Vec<&SourceWrite>> {
    let new = |w: &SourceWrite| w.chunks.iter().filter(|c| c.vector.is_some()).count();
    let with_new = writes.iter().filter(|w| new(w) > 0).count();
    let n = streams.clamp(1, with_new.max(1));
    if n == 1 {
        return vec![writes.iter().collect()];
    }
    let mut order: Vec<&SourceWrite> = writes.iter().collect();
    order.sort_by_key(|w| std::cmp::Reverse(new(w)));
    let mut parts: Vec<(usize, Vec<&SourceWrite>)> = vec![(0, Vec::new()); n];
    for w in order {
        let least = parts
            .iter_mut()
            .min_by_key(|(load, _)| *load)
            .expect("n >= 1");
        least.0 += new(w).max(1);
        least.1.push(w);
    }
    parts
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| !p.is_empty())
        .collect()
}

/// One transaction: locks, newest wins, new vectors, touch, trim, re-queue the superseded.
async fn write_one(
    pool: &PgPool,
    to: &Target<'_>,
    writes: &[&SourceWrite],
) -> sqlx::Result<HashMap<EmbedSource, WriteOutcome>> {
    if writes.is_empty() {
        return Ok(HashMap::new());
    }
    let mut tx = pool.begin().await?;
    lock_sources(&mut tx, writes).await?;
    let (outcomes, fresh, superseded) = partition_fresh(&mut tx, writes).await?;
    copy_new(&mut tx, to.model, to.dimensions, &fresh).await?;
    if to.touch {
        touch_unchanged(&mut tx, to.model, &fresh).await?;
    }
    trim_tail(&mut tx, to.model, &fresh).await?;
    if !superseded.is_empty() {
        crate::queue::enqueue_many(&mut *tx, to.queue, to.max_attempts, &superseded).await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

type Tx<'c> = sqlx::Transaction<'c, sqlx::Postgres>;

/// Per-source locks for the transaction, in a fixed order (no deadlocks): two workers writing
/// the same source serialize ([`crate::db::locks::lock_sources`]).
async fn lock_sources(tx: &mut Tx<'_>, writes: &[&SourceWrite]) -> sqlx::Result<()> {
    crate::db::locks::lock_sources(tx, writes.iter().map(|w| w.source)).await
}

/// Newest wins, compared under the lock: a source gone since is `Gone`; one whose `updated_at`
/// moved since its text was read is `Superseded` (and re-queued); the rest are written.
async fn partition_fresh<'w>(
    tx: &mut Tx<'_>,
    writes: &[&'w SourceWrite],
) -> sqlx::Result<(
    HashMap<EmbedSource, WriteOutcome>,
    Vec<&'w SourceWrite>,
    Vec<EmbedSource>,
)> {
    let sources: Vec<EmbedSource> = writes.iter().map(|w| w.source).collect();
    let mut current: HashMap<EmbedSource, DateTime<Utc>> = HashMap::new();
    for ty in SourceType::ALL {
        let ids = crate::source::ids_of(&sources, ty);
        if ids.is_empty() {
            continue;
        }
        let rows: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, updated_at FROM {} WHERE id = ANY($1)",
            ty.table()
        )))
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
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
    let mut outcomes = HashMap::with_capacity(writes.len());
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
                fresh.push(*w);
            }
        }
    }
    Ok((outcomes, fresh, superseded))
}

/// New vectors: streamed by binary COPY into a temporary staging table, then one upsert from
/// it. Why not a bound UNNEST array: the whole batch's vectors then travel in one Bind
/// message, and each pooled connection keeps a write buffer as large as the largest batch it
/// ever sent (docs/decisions.md); COPY sends bounded chunks. It is also Postgres's fastest
/// way in (BENCHMARKS.md, bulk insert).
async fn copy_new(
    tx: &mut Tx<'_>,
    model: &str,
    dimensions: usize,
    fresh: &[&SourceWrite],
) -> sqlx::Result<()> {
    if !fresh
        .iter()
        .any(|w| w.chunks.iter().any(|c| c.vector.is_some()))
    {
        return Ok(());
    }
    sqlx::raw_sql(COPY_TABLE).execute(&mut **tx).await?;
    let mut copy = (**tx)
        .copy_in_raw("COPY pg_temp.embed_copy (source_type, source_id, chunk_index, content_hash, embedding, token_count) FROM STDIN (FORMAT binary)")
        .await?;
    let mut rows = CopyRows::new();
    for w in fresh {
        for c in &w.chunks {
            let Some(v) = &c.vector else { continue };
            rows.row(6);
            rows.field(w.source.source_type.as_str().as_bytes());
            rows.field(w.source.source_id.as_bytes());
            rows.field(&(c.index as i32).to_be_bytes());
            rows.field(c.content_hash.as_bytes());
            rows.vector(v.as_slice());
            rows.field(&(c.tokens as i32).to_be_bytes());
            if rows.len() >= COPY_CHUNK {
                copy.send(rows.take()).await?;
            }
        }
    }
    copy.send(rows.finish()).await?;
    copy.finish().await?;
    sqlx::query(
        "INSERT INTO rag_embeddings AS e (source_type, source_id, chunk_index, content_hash,
                                          embedding, embedding_model, dimensions, token_count)
         SELECT embed_worker.source_label(source_type), source_id, chunk_index, content_hash,
                embedding, $1, $2, token_count
           FROM pg_temp.embed_copy
         ON CONFLICT (source_type, source_id, embedding_model, chunk_index) DO UPDATE
            SET content_hash = EXCLUDED.content_hash, embedding = EXCLUDED.embedding,
                dimensions = EXCLUDED.dimensions, token_count = EXCLUDED.token_count,
                updated_at = now()",
    )
    .bind(model)
    .bind(dimensions as i32)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Unchanged chunks: marked as verified now (their `updated_at` moves, the vector stays), with
/// their content hash and tokens (an adopted vector's are recorded here, the first time).
async fn touch_unchanged(tx: &mut Tx<'_>, model: &str, fresh: &[&SourceWrite]) -> sqlx::Result<()> {
    let mut same_types = Vec::new();
    let mut same_ids = Vec::new();
    let mut same_idxs = Vec::new();
    let mut same_hashes = Vec::new();
    let mut same_tokens = Vec::new();
    for w in fresh {
        for c in w.chunks.iter().filter(|c| c.vector.is_none()) {
            same_types.push(w.source.source_type.as_str());
            same_ids.push(w.source.source_id);
            same_idxs.push(c.index as i32);
            same_hashes.push(c.content_hash.as_str());
            same_tokens.push(c.tokens as i32);
        }
    }
    if same_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE rag_embeddings e
            SET updated_at = now(), content_hash = u.h, token_count = u.n
           FROM unnest($1::text[], $2::uuid[], $3::int[], $5::text[], $6::int[])
                AS u(t, id, idx, h, n)
          WHERE e.source_type = embed_worker.source_label(u.t) AND e.source_id = u.id
            AND e.chunk_index = u.idx AND e.embedding_model = $4",
    )
    .bind(&same_types)
    .bind(&same_ids)
    .bind(&same_idxs)
    .bind(model)
    .bind(&same_hashes)
    .bind(&same_tokens)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Chunks beyond each source's new count (a shorter text, or an emptied one) are deleted.
async fn trim_tail(tx: &mut Tx<'_>, model: &str, fresh: &[&SourceWrite]) -> sqlx::Result<()> {
    if fresh.is_empty() {
        return Ok(());
    }
    let del_types: Vec<&str> = fresh
        .iter()
        .map(|w| w.source.source_type.as_str())
        .collect();
    let del_ids: Vec<Uuid> = fresh.iter().map(|w| w.source.source_id).collect();
    let del_counts: Vec<i32> = fresh.iter().map(|w| w.chunks.len() as i32).collect();
    sqlx::query(
        "DELETE FROM rag_embeddings e
          USING unnest($1::text[], $2::uuid[], $3::int[]) AS u(t, id, n)
          WHERE e.source_type = embed_worker.source_label(u.t) AND e.source_id = u.id AND e.embedding_model = $4
            AND e.chunk_index >= u.n",
    )
    .bind(&del_types)
    .bind(&del_ids)
    .bind(&del_counts)
    .bind(model)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(new: usize, same: usize) -> SourceWrite {
        let chunk = |index: usize, fresh: bool| ChunkWrite {
            index,
            content_hash: format!("h{index}"),
            tokens: 1,
            vector: fresh.then(|| Vector::from(vec![1.0, 0.0])),
        };
        SourceWrite {
            source: EmbedSource {
                source_type: SourceType::Session,
                source_id: Uuid::new_v4(),
            },
            read_at: Utc::now(),
            chunks: (0..new)
                .map(|i| chunk(i, true))
                .chain((new..new + same).map(|i| chunk(i, false)))
                .collect(),
        }
    }

    #[test]
    fn a_batch_splits_into_parts_of_whole_sources_with_even_new_vectors() {
        let writes: Vec<SourceWrite> = [5, 1, 1, 1, 1, 1, 0, 0]
            .iter()
            .map(|n| source(*n, 1))
            .collect();
        let parts = split(&writes, 2);
        assert_eq!(parts.len(), 2);
        let mut seen: Vec<EmbedSource> = parts.iter().flatten().map(|w| w.source).collect();
        seen.sort_by_key(|s| s.source_id);
        let mut all: Vec<EmbedSource> = writes.iter().map(|w| w.source).collect();
        all.sort_by_key(|s| s.source_id);
        assert_eq!(seen, all, "every source once, whole");
        let new = |p: &Vec<&SourceWrite>| -> usize {
            p.iter()
                .map(|w| w.chunks.iter().filter(|c| c.vector.is_some()).count())
                .sum()
        };
        assert_eq!((new(&parts[0]), new(&parts[1])), (5, 5));
        // Nothing to insert into the graph, or one source: one transaction.
        assert_eq!(split(&writes[6..], 2).len(), 1);
        assert_eq!(split(&writes[..1], 4).len(), 1);
        assert_eq!(split(&writes, 1).len(), 1);
        assert_eq!(split(&writes, 4).len(), 4);
    }
}
