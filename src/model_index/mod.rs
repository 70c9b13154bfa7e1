//! Embedding models as the database sees them: one partition of `rag_embeddings` per model, one
//! HNSW expression index on it, and the model's role (writing, serving) in `lifecycle`.
//!
//! Why one place: the partition's name, the index's expression (a cast to `vector(d)` or
//! `halfvec(d)`) and its operator class must agree between `migrate`, the builder, `verify`,
//! `models`, `prune` and the search query, or the planner silently falls back to a sequential
//! scan. An [`IndexSpec`] says what a model's index must be; [`find`] finds a model's indexes by
//! their table and definition (not by name), so indexes named by earlier versions still count.
//!
//! Why two precisions: pgvector's HNSW indexes `vector` up to 2,000 dimensions and `halfvec` up
//! to 4,000; `text-embedding-3-large` (3,072) fits only as `halfvec`. The column keeps full
//! precision; only the index (and the query's cast) is half.
//!
//! Why names carry a hash: PostgreSQL cuts identifiers at 63 bytes, so two long model names
//! (Azure deployment names) sharing a prefix got one index name and the second model no index.

pub mod build;
pub mod lifecycle;
pub mod status;

pub use build::{BuildOutcome, build_if_due};
pub use lifecycle::{Model, Promotion, prune};
pub use status::{ModelStatus, StatusTable, status};

use sqlx::PgPool;

use crate::config::IndexPrecision;

const MAX_FULL_DIMS: usize = IndexPrecision::MAX_FULL_DIMS;
const MAX_HALF_DIMS: usize = IndexPrecision::MAX_HALF_DIMS;

/// One vector index as the catalog describes it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct VectorIndex {
    /// Index name.
    pub name: String,
    /// The table it is on (a model's partition).
    pub table: String,
    /// `hnsw` or `ivfflat` (or another).
    pub access_method: String,
    /// Storage options, e.g. `m=16`.
    pub options: Vec<String>,
    /// `CREATE INDEX` statement.
    pub definition: String,
    /// False while a concurrent build runs, and after one died.
    pub valid: bool,
    /// A build of it is running now: PostgreSQL reports its progress, or another backend
    /// holds a lock on it (the progress view is visible only to the building login).
    pub building: bool,
}

/// Every index on a `vector` column or expression of any table.
pub async fn vector_indexes<'e>(db: impl sqlx::PgExecutor<'e>) -> anyhow::Result<Vec<VectorIndex>> {
    Ok(sqlx::query_as::<_, VectorIndex>(
        r#"
        SELECT i.relname::text AS name,
               t.relname::text AS table,
               am.amname::text AS access_method,
               coalesce(i.reloptions, '{}')::text[] AS options,
               pg_get_indexdef(i.oid) AS definition,
               x.indisvalid AS valid,
               (NOT x.indisvalid
                AND (EXISTS (SELECT 1 FROM pg_stat_progress_create_index p WHERE p.index_relid = i.oid)
                     OR EXISTS (SELECT 1 FROM pg_locks l
                                 WHERE l.relation = i.oid AND l.pid <> pg_backend_pid())))
                 AS building
          FROM pg_index x
          JOIN pg_class i ON i.oid = x.indexrelid
          JOIN pg_class t ON t.oid = x.indrelid
          JOIN pg_am am ON am.oid = i.relam
         WHERE am.amname IN ('hnsw', 'ivfflat')
            OR EXISTS (SELECT 1 FROM pg_opclass oc
                         JOIN pg_type t ON t.oid = oc.opcintype
                        WHERE oc.oid = ANY (x.indclass) AND t.typname = 'vector')
         ORDER BY 1
        "#,
    )
    .fetch_all(db)
    .await?)
}

/// What one model's index must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSpec {
    /// `embedding_model`.
    pub model: String,
    /// Vector dimensions.
    pub dimensions: usize,
    /// `halfvec` (true) or `vector`.
    pub half: bool,
}

impl IndexSpec {
    /// The spec for `model` at `dimensions`; `precision` as configured. Refuses what pgvector's
    /// HNSW cannot index.
    pub fn new(model: &str, dimensions: usize, precision: IndexPrecision) -> anyhow::Result<Self> {
        anyhow::ensure!(
            (1..=MAX_HALF_DIMS).contains(&dimensions),
            "{model}: {dimensions} dimensions cannot be indexed: pgvector's HNSW takes `vector` up \
             to {MAX_FULL_DIMS} and `halfvec` up to {MAX_HALF_DIMS} dimensions"
        );
        let half = match precision {
            IndexPrecision::Auto => dimensions > MAX_FULL_DIMS,
            IndexPrecision::Half => true,
            IndexPrecision::Full => {
                anyhow::ensure!(
                    dimensions <= MAX_FULL_DIMS,
                    "{model}: index.precision = \"full\" takes at most {MAX_FULL_DIMS} dimensions \
                     (pgvector's HNSW `vector` limit), not {dimensions}: use \"half\" or \"auto\""
                );
                false
            }
        };
        Ok(IndexSpec {
            model: model.to_string(),
            dimensions,
            half,
        })
    }

    /// The active model's spec.
    pub fn from_settings(s: &crate::config::Settings) -> anyhow::Result<Self> {
        Self::new(&s.model.name, s.model.dimensions, s.index.precision)
    }

    /// A registered model's spec (its dimensions and index type as `embed_worker.models` has them).
    pub fn of(model: &lifecycle::Model) -> Self {
        IndexSpec {
            model: model.name.clone(),
            dimensions: model.dimensions as usize,
            half: model.index_type == "halfvec",
        }
    }

    /// `vector` or `halfvec`.
    pub fn type_name(&self) -> &'static str {
        if self.half { "halfvec" } else { "vector" }
    }

    /// `vector(1536)` or `halfvec(3072)`: the type the index stores.
    pub fn index_type(&self) -> String {
        format!("{}({})", self.type_name(), self.dimensions)
    }

    /// The model's partition of `rag_embeddings`.
    pub fn partition(&self) -> String {
        partition_name(&self.model)
    }

    /// The indexed expression, as search must write it for the planner to use the index.
    pub fn key(&self) -> String {
        format!("embedding::{}", self.index_type())
    }

    /// The query parameter `$1` cast to the index's type.
    pub fn query_param(&self) -> String {
        if self.half {
            format!("$1::{}", self.index_type())
        } else {
            "$1".into()
        }
    }

    /// The cosine operator class of the index's type.
    pub fn opclass(&self) -> &'static str {
        if self.half {
            "halfvec_cosine_ops"
        } else {
            "vector_cosine_ops"
        }
    }

    /// `idx_rag_emb_<model folded to [a-z0-9_], cut>_<v|h><dims>_<hash>`: readable, at most 63
    /// bytes, and distinct for distinct (model, dimensions, precision) even when names share a
    /// long prefix.
    pub fn name(&self) -> String {
        let folded = fold(&self.model);
        let tail = format!(
            "_{}{}_{:08x}",
            if self.half { 'h' } else { 'v' },
            self.dimensions,
            self.hash() as u32
        );
        let head = "idx_rag_emb_";
        let room = 63 - head.len() - tail.len();
        let prefix: String = folded.chars().take(room).collect();
        format!("{head}{prefix}{tail}")
    }

    /// FNV-1a of the full model name, dimensions and precision (stable across releases and
    /// platforms, unlike `std`'s hasher).
    fn hash(&self) -> u64 {
        let key = format!("{}\0{}\0{}", self.model, self.dimensions, self.half);
        key.bytes().fold(0xcbf29ce484222325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100000001b3)
        })
    }

    /// `CREATE INDEX [CONCURRENTLY]` on the model's partition with the design's parameters
    /// (m = 16, ef_construction = 64). No predicate: the partition holds only this model.
    pub fn create_sql(&self, concurrently: bool) -> String {
        format!(
            "CREATE INDEX {}{} ON {} USING hnsw (({}) {}) WITH (m = 16, ef_construction = 64)",
            if concurrently { "CONCURRENTLY " } else { "" },
            self.name(),
            crate::db::quote_ident(&self.partition()),
            self.key(),
            self.opclass(),
        )
    }

    /// Whether `ix` is this spec's index (whatever its name): HNSW on the model's partition, the
    /// same cast and operator class, or (full precision) the plain column's, as an adopted
    /// table's own index is ([`is_plain`]; the partition holds one model's size).
    pub fn matches(&self, ix: &VectorIndex) -> bool {
        ix.access_method == "hnsw"
            && of_model(ix, &self.model)
            && (ix.definition.contains(&format!(
                "((embedding)::{}) {}",
                self.index_type(),
                self.opclass()
            )) || (!self.half && is_plain(ix)))
    }
}

/// Whether `ix` is on the plain `embedding` column (an adopted table's own index): searched
/// as `embedding <=> $1`, not through the cast the worker's own indexes are on.
pub fn is_plain(ix: &VectorIndex) -> bool {
    ix.definition
        .contains("USING hnsw (embedding vector_cosine_ops)")
}

/// Whether `ix` indexes `model`'s rows (it is on the model's partition).
pub fn of_model(ix: &VectorIndex, model: &str) -> bool {
    ix.table == partition_name(model)
}

/// A model name folded to `[a-z0-9_]` for identifiers (ASCII letters lower-cased, anything else
/// `_`), as SQL's `lower(regexp_replace(model, '[^A-Za-z0-9]', '_', 'g'))` does.
fn fold(model: &str) -> String {
    model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// `rag_embeddings_<model folded to [a-z0-9_], cut to 38>_<8 hex of its SHA-256>`: the model's
/// partition, as `embed_worker.partition_name` (migration 13) computes it.
pub fn partition_name(model: &str) -> String {
    use sha2::Digest;
    let folded: String = fold(model).chars().take(38).collect();
    let hash = sha2::Sha256::digest(model.as_bytes());
    let hex: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
    format!("rag_embeddings_{folded}_{hex}")
}

/// The stored type of an index, `vector(1536)` or `halfvec(3072)`, read from its definition
/// (an adopted index on the plain column: `vector (the column)`).
pub fn stored_type(ix: &VectorIndex) -> Option<String> {
    if is_plain(ix) {
        return Some("vector (the column)".into());
    }
    let at = ix.definition.find("((embedding)::")? + "((embedding)::".len();
    let rest = &ix.definition[at..];
    Some(rest[..rest.find(')')? + 1].to_string())
}

/// `s` as a quoted SQL literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Where a model's index stands.
#[derive(Debug, Clone, PartialEq)]
pub enum IndexState {
    /// Valid and usable.
    Ready(String),
    /// Present, not yet valid, and a build of it is running.
    Building(String),
    /// Present but not valid and no build running: the leftover of a build that died.
    Invalid(String),
    /// None of this spec (another precision may still exist).
    Missing,
}

/// The state of `spec`'s index among `all`.
pub fn find(all: &[VectorIndex], spec: &IndexSpec) -> IndexState {
    let mine: Vec<&VectorIndex> = all.iter().filter(|ix| spec.matches(ix)).collect();
    if let Some(ix) = mine.iter().find(|ix| ix.valid) {
        IndexState::Ready(ix.name.clone())
    } else if let Some(ix) = mine.iter().find(|ix| ix.building) {
        IndexState::Building(ix.name.clone())
    } else if let Some(ix) = mine.first() {
        IndexState::Invalid(ix.name.clone())
    } else {
        IndexState::Missing
    }
}

/// The state of `spec`'s index.
pub async fn state(pool: &PgPool, spec: &IndexSpec) -> anyhow::Result<IndexState> {
    Ok(find(&vector_indexes(pool).await?, spec))
}

/// A build in progress, from `pg_stat_progress_create_index` (only visible to the building
/// login, its members and `pg_read_all_stats`).
#[derive(Debug, Clone)]
pub struct Progress {
    /// The index being built.
    pub index: String,
    /// PostgreSQL's phase, e.g. `building index: loading tuples`.
    pub phase: String,
    /// Tuples loaded into the graph so far.
    pub tuples_done: i64,
    /// Rows to index (the model's rows when PostgreSQL does not say).
    pub tuples_total: i64,
    /// Seconds since the build started.
    pub secs: f64,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = if self.tuples_total > 0 {
            format!(
                " {:.0}%",
                (self.tuples_done as f64 * 100.0 / self.tuples_total as f64).min(100.0)
            )
        } else {
            String::new()
        };
        write!(
            f,
            "building{pct} ({}, {}/{} rows, {:.0} s)",
            self.phase, self.tuples_done, self.tuples_total, self.secs
        )
    }
}

/// (index, phase, tuples done, tuples total, seconds, model) as the catalog gives them.
type ProgressRow = (
    Option<String>,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<f64>,
    Option<String>,
);

/// The progress of builds on `rag_embeddings`, by index name.
pub async fn progress(pool: &PgPool) -> sqlx::Result<Vec<Progress>> {
    let rows: Vec<ProgressRow> = sqlx::query_as(
        "SELECT c.relname::text, p.phase, p.tuples_done, p.tuples_total,
                    extract(epoch FROM now() - a.query_start)::float8,
                    m.name::text
               FROM pg_stat_progress_create_index p
               JOIN pg_inherits h ON h.inhrelid = p.relid
                                 AND h.inhparent = to_regclass('public.rag_embeddings')
               LEFT JOIN pg_class c ON c.oid = p.index_relid
               LEFT JOIN pg_class t ON t.oid = p.relid
               LEFT JOIN embed_worker.models m ON m.partition = t.relname
               LEFT JOIN pg_stat_activity a ON a.pid = p.pid",
    )
    .fetch_all(pool)
    .await?;
    let mut out = Vec::new();
    for (name, phase, done, total, secs, model) in rows {
        let Some(name) = name else { continue };
        let mut total = total.unwrap_or(0);
        // pgvector reports tuples loaded but not the total: the model's rows are what it loads.
        if total == 0
            && let Some(model) = model
        {
            total = sqlx::query_scalar(
                "SELECT count(*) FROM rag_embeddings WHERE embedding_model = $1",
            )
            .bind(model)
            .fetch_one(pool)
            .await?;
        }
        out.push(Progress {
            index: name,
            phase: phase.unwrap_or_default(),
            tuples_done: done.unwrap_or(0),
            tuples_total: total,
            secs: secs.unwrap_or(0.0),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_long_shared_prefixes_do_not_collide() {
        let a = IndexSpec::new(
            &format!("{}-east", "x".repeat(60)),
            1536,
            IndexPrecision::Auto,
        )
        .unwrap();
        let b = IndexSpec::new(
            &format!("{}-west", "x".repeat(60)),
            1536,
            IndexPrecision::Auto,
        )
        .unwrap();
        assert!(a.name().len() <= 63 && b.name().len() <= 63);
        assert_ne!(a.name(), b.name());
        let ada = IndexSpec::new("text-embedding-ada-002", 1536, IndexPrecision::Auto).unwrap();
        assert!(
            ada.name()
                .starts_with("idx_rag_emb_text_embedding_ada_002_v1536_"),
            "{}",
            ada.name()
        );
        let half = IndexSpec::new("text-embedding-ada-002", 1536, IndexPrecision::Half).unwrap();
        assert_ne!(ada.name(), half.name());
    }

    #[test]
    fn precision_follows_pgvector_limits() {
        assert!(
            IndexSpec::new("m", 3072, IndexPrecision::Auto)
                .unwrap()
                .half
        );
        assert!(
            !IndexSpec::new("m", 1536, IndexPrecision::Auto)
                .unwrap()
                .half
        );
        assert!(IndexSpec::new("m", 3072, IndexPrecision::Full).is_err());
        let err = IndexSpec::new("m", 4096, IndexPrecision::Half)
            .unwrap_err()
            .to_string();
        assert!(err.contains("4000"), "{err}");
    }

    #[test]
    fn partition_names_are_bounded_and_distinct() {
        let p = partition_name("text-embedding-ada-002");
        assert!(
            p.starts_with("rag_embeddings_text_embedding_ada_002_"),
            "{p}"
        );
        let long = partition_name(&format!("{}-east", "x".repeat(90)));
        assert!(long.len() <= 63, "{long}");
        assert_ne!(long, partition_name(&format!("{}-west", "x".repeat(90))));
        assert_eq!(partition_name("it's"), partition_name("it's"));
    }

    #[test]
    fn an_index_is_matched_by_its_partition_and_expression() {
        let def = "CREATE INDEX a ON public.r USING hnsw (((embedding)::halfvec(3072)) halfvec_cosine_ops) WITH (m='16', ef_construction='64')";
        let ix = VectorIndex {
            table: partition_name("it's"),
            name: "a".into(),
            access_method: "hnsw".into(),
            options: vec![],
            definition: def.into(),
            valid: true,
            building: false,
        };
        assert_eq!(stored_type(&ix).as_deref(), Some("halfvec(3072)"));
        assert!(
            IndexSpec::new("it's", 3072, IndexPrecision::Auto)
                .unwrap()
                .matches(&ix)
        );
        assert!(
            !IndexSpec::new("it", 3072, IndexPrecision::Auto)
                .unwrap()
                .matches(&ix)
        );
    }
}
