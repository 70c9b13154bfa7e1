//! Source: what can be embedded — a practice session or a question template — named the same
//! way in job payloads, in `rag_embeddings.source_type` (the `embedding_source` enum) and on the
//! command line.

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
    /// The name in payloads and SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceType::Session => "session",
            SourceType::Template => "template",
        }
    }
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
