//! Load: a batch's sources read in bulk (one query per source type) and rendered to text.
//!
//! Why one query per type: a batch holds hundreds of sources; one round trip per source would
//! make the database, not the API, the bottleneck. Rendering is a configurable format so that
//! what is embedded (and so what a search matches) is an operator's decision, not code.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::RenderSettings;
use crate::source::{EmbedSource, SourceType};

/// A source as read: its rendered text and the `updated_at` it was read at.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The rendered text.
    pub text: String,
    /// The source's `updated_at` when read (newest wins at the write).
    pub read_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct SessionRow {
    id: Uuid,
    updated_at: DateTime<Utc>,
    title: Option<String>,
    focus: Option<String>,
    depth: Option<String>,
    notes: Option<String>,
    transcript: Option<String>,
}

#[derive(sqlx::FromRow)]
struct TemplateRow {
    id: Uuid,
    updated_at: DateTime<Utc>,
    body: String,
    focus: String,
    depth: String,
    category: Option<String>,
    placeholders: serde_json::Value,
}

/// Loads every source of the batch that still exists. Missing ones are simply absent.
pub async fn load(
    pool: &PgPool,
    render: &RenderSettings,
    sources: &[EmbedSource],
) -> sqlx::Result<HashMap<EmbedSource, Loaded>> {
    let ids = |ty| crate::source::ids_of(sources, ty);
    let mut out = HashMap::with_capacity(sources.len());
    let session_ids = ids(SourceType::Session);
    if !session_ids.is_empty() {
        let rows: Vec<SessionRow> = sqlx::query_as(
            "SELECT id, updated_at, title, focus::text AS focus, depth::text AS depth, notes, transcript
               FROM sessions WHERE id = ANY($1)",
        )
        .bind(&session_ids)
        .fetch_all(pool)
        .await?;
        for r in rows {
            let text = render_format(
                &render.session,
                &[
                    ("title", r.title.as_deref().unwrap_or("")),
                    ("focus", r.focus.as_deref().unwrap_or("")),
                    ("depth", r.depth.as_deref().unwrap_or("")),
                    ("notes", r.notes.as_deref().unwrap_or("")),
                    ("transcript", r.transcript.as_deref().unwrap_or("")),
                ],
            );
            let key = EmbedSource {
                source_type: SourceType::Session,
                source_id: r.id,
            };
            out.insert(
                key,
                Loaded {
                    text,
                    read_at: r.updated_at,
                },
            );
        }
    }
    let template_ids = ids(SourceType::Template);
    if !template_ids.is_empty() {
        let rows: Vec<TemplateRow> = sqlx::query_as(
            "SELECT id, updated_at, body, focus::text AS focus, depth::text AS depth,
                    category::text AS category, placeholders
               FROM question_templates WHERE id = ANY($1)",
        )
        .bind(&template_ids)
        .fetch_all(pool)
        .await?;
        for r in rows {
            let descriptions = placeholder_descriptions(&r.placeholders);
            let text = render_format(
                &render.template,
                &[
                    ("body", r.body.as_str()),
                    ("focus", r.focus.as_str()),
                    ("depth", r.depth.as_str()),
                    ("category", r.category.as_deref().unwrap_or("")),
                    ("placeholders", descriptions.as_str()),
                ],
            );
            let key = EmbedSource {
                source_type: SourceType::Template,
                source_id: r.id,
            };
            out.insert(
                key,
                Loaded {
                    text,
                    read_at: r.updated_at,
                },
            );
        }
    }
    Ok(out)
}

/// `{key} (description); …` from the structured placeholders document.
fn placeholder_descriptions(doc: &serde_json::Value) -> String {
    doc.get("placeholders")
        .and_then(|p| p.as_array())
        .map(|items| {
            items
                .iter()
                .filter_map(|p| {
                    let key = p.get("key")?.as_str()?;
                    let desc = p.get("description").and_then(|d| d.as_str()).unwrap_or("");
                    Some(format!("{key}: {desc}"))
                })
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

/// Replaces `{field}` in `format`; a line whose fields are all empty is dropped, so a session
/// without a transcript does not embed a dangling "Transcript:" label.
pub fn render_format(format: &str, fields: &[(&str, &str)]) -> String {
    let mut out = Vec::new();
    for line in format.split('\n') {
        let mut rendered = line.to_string();
        let mut had_field = false;
        let mut any_value = false;
        for (name, value) in fields {
            let pat = format!("{{{name}}}");
            if rendered.contains(&pat) {
                had_field = true;
                any_value |= !value.trim().is_empty();
                rendered = rendered.replace(&pat, value.trim());
            }
        }
        if !had_field || any_value {
            out.push(rendered);
        }
    }
    // With no field holding text, there is nothing to embed.
    let any = fields.iter().any(|(_, v)| !v.trim().is_empty());
    if any { out.join("\n") } else { String::new() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_drops_lines_whose_fields_are_empty() {
        let s = render_format(
            "Title: {title}\nNotes: {notes}\nEnd",
            &[("title", "Scales"), ("notes", " ")],
        );
        assert_eq!(s, "Title: Scales\nEnd");
    }

    #[test]
    fn render_of_all_empty_fields_is_empty() {
        assert_eq!(render_format("Title: {title}", &[("title", "")]), "");
    }

    #[test]
    fn placeholder_descriptions_are_listed() {
        let doc = serde_json::json!({"placeholders":[{"key":"chord","description":"A chord"}]});
        assert_eq!(placeholder_descriptions(&doc), "chord: A chord");
    }
}
