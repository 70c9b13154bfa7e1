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

    /// SQL that is true when row `alias` of [`SourceType::table`] has text to embed: one of the
    /// columns the render settings name is not empty once trimmed of [`WHITE_SPACE`], as the
    /// worker renders it (an enum such as a session's focus counts: the worker embeds a
    /// focus-only session, so the database counts it too). Rows without
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

/// The characters a field's value is trimmed of before it counts as text: Unicode's
/// White_Space, which is what Rust's `str::trim` (the worker's rendering) trims. The SQL test of
/// "has text" trims the same set ([`white_space_sql`]), so the database and the worker agree on
/// which sources have text: a session whose only text was U+3000 used to be text to SQL and
/// empty to the worker, and its model could never be promoted.
pub const WHITE_SPACE: &[char] = &[
    '\u{9}', '\u{a}', '\u{b}', '\u{c}', '\u{d}', ' ', '\u{85}', '\u{a0}', '\u{1680}', '\u{2000}',
    '\u{2001}', '\u{2002}', '\u{2003}', '\u{2004}', '\u{2005}', '\u{2006}', '\u{2007}', '\u{2008}',
    '\u{2009}', '\u{200a}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}',
];

/// [`WHITE_SPACE`] as a SQL string literal, for `btrim(value, <this>)`.
pub fn white_space_sql() -> String {
    format!("'{}'", WHITE_SPACE.iter().collect::<String>())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn white_space_is_exactly_what_rust_trims() {
        let ours: Vec<char> = (0..=0x10ffff_u32)
            .filter_map(char::from_u32)
            .filter(|c| c.is_whitespace())
            .collect();
        assert_eq!(ours, WHITE_SPACE);
        assert!(!white_space_sql()[1..white_space_sql().len() - 1].contains('\''));
    }
}
