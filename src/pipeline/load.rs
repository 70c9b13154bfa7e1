//! Load: a batch's sources read in bulk (one query per source type) and rendered to text.
//!
//! Why one query per type: a batch holds hundreds of sources; one round trip per source would
//! make the database, not the API, the bottleneck. Rendering is a configurable format so that
//! what is embedded (and so what a search matches) is an operator's decision, not code.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::{RenderSettings, render_fields};
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
struct Row {
    id: Uuid,
    updated_at: DateTime<Utc>,
    /// The render's columns, by name.
    fields: sqlx::types::Json<serde_json::Map<String, serde_json::Value>>,
}

/// Loads every source of the batch that still exists. Missing ones are simply absent.
pub async fn load(
    pool: &PgPool,
    render: &RenderSettings,
    sources: &[EmbedSource],
) -> sqlx::Result<HashMap<EmbedSource, Loaded>> {
    let mut out = HashMap::with_capacity(sources.len());
    for ty in SourceType::ALL {
        let ids = crate::source::ids_of(sources, ty);
        if ids.is_empty() {
            continue;
        }
        let format = match ty {
            SourceType::Session => &render.session,
            SourceType::Template => &render.template,
        };
        let fields = render_fields(format);
        let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(select_sql(ty, &fields)))
            .bind(&ids)
            .fetch_all(pool)
            .await?;
        for r in rows {
            let values: Vec<(&str, String)> = fields
                .iter()
                .map(|f| (f.as_str(), field_text(r.fields.get(f))))
                .collect();
            let pairs: Vec<(&str, &str)> = values.iter().map(|(k, v)| (*k, v.as_str())).collect();
            out.insert(
                EmbedSource {
                    source_type: ty,
                    source_id: r.id,
                },
                Loaded {
                    text: render_format(format, &pairs),
                    read_at: r.updated_at,
                },
            );
        }
    }
    Ok(out)
}

/// Exactly the render's columns of the batch's rows, as one JSON object per row (so any column
/// of any type reads the same way). The names come from the settings and are quoted.
fn select_sql(ty: SourceType, fields: &[String]) -> String {
    let pairs: Vec<String> = fields
        .iter()
        .map(|f| format!("'{f}', {}", crate::db::quote_ident(f)))
        .collect();
    format!(
        "SELECT id, updated_at::timestamptz AS updated_at, jsonb_build_object({}) AS fields
           FROM public.{} WHERE id = ANY($1)",
        pairs.join(", "),
        ty.table()
    )
}

/// A column's value as text: strings as they are, NULL as nothing, the worker's structured
/// placeholders as `key: description; …`, other JSON objects as `key: value; …`, arrays as
/// `a, b`, numbers and booleans as written.
fn field_text(v: Option<&serde_json::Value>) -> String {
    use serde_json::Value;
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) if o.get("placeholders").is_some_and(Value::is_array) => {
            placeholder_descriptions(v.unwrap_or(&Value::Null))
        }
        Some(Value::Object(o)) => o
            .iter()
            .map(|(k, v)| format!("{k}: {}", field_text(Some(v))))
            .collect::<Vec<_>>()
            .join("; "),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| field_text(Some(v)))
            .collect::<Vec<_>>()
            .join(", "),
        Some(other) => other.to_string(),
    }
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
    fn fields_of_any_shape_become_text() {
        let app_vars = serde_json::json!({"{chord}": "placeholder for chord name"});
        assert_eq!(
            field_text(Some(&app_vars)),
            "{chord}: placeholder for chord name"
        );
        assert_eq!(
            field_text(Some(&serde_json::json!(["a", 2, null]))),
            "a, 2, "
        );
        assert_eq!(field_text(Some(&serde_json::json!(true))), "true");
        assert_eq!(field_text(None), "");
    }

    #[test]
    fn placeholder_descriptions_are_listed() {
        let doc = serde_json::json!({"placeholders":[{"key":"chord","description":"A chord"}]});
        assert_eq!(placeholder_descriptions(&doc), "chord: A chord");
    }
}
