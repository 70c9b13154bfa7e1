//! Source: what can be embedded — a practice session or a question template — named the same
//! way in job payloads, in `rag_embeddings.source_type` (the `embedding_source` enum) and on the
//! command line; and what the worker needs to know of each type's table: its name and when a
//! row has text to embed. Queries over sources take those from here.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Which table a source lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceType {
    /// A practice session (`sessions`).
    Session,
    /// A question template (`question_templates`).
    Template,
}

impl SourceType {
    /// Every source type.
    pub const ALL: [SourceType; 2] = [SourceType::Session, SourceType::Template];

    /// The name in payloads and SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceType::Session => "session",
            SourceType::Template => "template",
        }
    }

    /// The app's table holding this type.
    pub fn table(self) -> &'static str {
        match self {
            SourceType::Session => "sessions",
            SourceType::Template => "question_templates",
        }
    }

    /// SQL that is true when row `alias` of [`SourceType::table`] has text to embed (one of its
    /// text columns named by the render settings is not empty or whitespace). Rows without
    /// text get no job. The test is a function `migrate` makes from the render settings
    /// (migration 19, `db::follow_render`); the planner inlines it into column tests, each
    /// column alone, shortest first: trimming their concatenation detoasted and copied every
    /// session's whole text, 208 of the 555 ms a 20,000-session backfill spent queueing
    /// (issue 23).
    pub fn has_text_sql(self, alias: &str) -> String {
        format!("embed_worker.{}({alias})", self.has_text_function())
    }

    /// The name of [`SourceType::has_text_sql`]'s function in schema `embed_worker`.
    pub fn has_text_function(self) -> &'static str {
        match self {
            SourceType::Session => "session_has_text",
            SourceType::Template => "template_has_text",
        }
    }
}

/// The ids of the `sources` of type `ty`, in order.
pub fn ids_of(sources: &[EmbedSource], ty: SourceType) -> Vec<Uuid> {
    sources
        .iter()
        .filter(|s| s.source_type == ty)
        .map(|s| s.source_id)
        .collect()
}

impl std::fmt::Display for SourceType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SourceType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "session" => Ok(SourceType::Session),
            "template" => Ok(SourceType::Template),
            other => Err(format!(
                "unknown source type {other:?} (expected session or template)"
            )),
        }
    }
}

/// The job payload: which source to (re-)embed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EmbedSource {
    /// Which table.
    pub source_type: SourceType,
    /// The row's id.
    pub source_id: Uuid,
}

impl EmbedSource {
    /// From a `(source_type text, id)` row; `None` for an unknown type.
    pub fn from_row((t, id): (String, Uuid)) -> Option<EmbedSource> {
        Some(EmbedSource {
            source_type: t.parse().ok()?,
            source_id: id,
        })
    }

    /// Its jobs' dedup key (`apalis.jobs.idempotency_key`, as `embed_worker.enqueue_many` sets
    /// it): `<type>:<id>`.
    pub fn dedup_key(&self) -> String {
        format!("{}:{}", self.source_type.as_str(), self.source_id)
    }
}

/// Sources with text to embed, counted as the stale scan counts them.
pub async fn count_with_text<'e>(db: impl sqlx::PgExecutor<'e>) -> sqlx::Result<i64> {
    let counts: Vec<String> = SourceType::ALL
        .iter()
        .map(|t| {
            format!(
                "(SELECT count(*) FROM {} x WHERE {})",
                t.table(),
                t.has_text_sql("x")
            )
        })
        .collect();
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT {}",
        counts.join(" + ")
    )))
    .fetch_one(db)
    .await
}
