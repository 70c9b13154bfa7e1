//! `seed-templates`: load the question templates from `config/templates.toml`.
//!
//! Why upsert by slug with `IS DISTINCT FROM`: a second run must change nothing — no new rows,
//! no bumped `updated_at`, and so no re-embed of text that did not change.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Clone, Deserialize, Serialize)]
/// One structured placeholder of a template.
pub struct Placeholder {
    /// snake_case key, used as `{key}` in the body.
    pub key: String,
    /// What it stands for.
    pub description: String,
    #[serde(rename = "type")]
    /// One of the known types.
    pub kind: String,
    #[serde(default)]
    /// Whether it must be filled.
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// An example value.
    pub example: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
/// One template of `config/templates.toml`.
pub struct TemplateSeed {
    /// Stable key (upserts by it).
    pub slug: String,
    /// `interview_focus` value.
    pub focus: String,
    /// `interview_depth` value.
    pub depth: String,
    /// `template_category` value.
    pub category: String,
    /// The prompt with `{key}` placeholders.
    pub body: String,
    #[serde(default)]
    /// Its placeholders.
    pub placeholders: Vec<Placeholder>,
}

#[derive(Debug, Deserialize)]
struct TemplateFile {
    template: Vec<TemplateSeed>,
}

/// Reads templates from a TOML file.
pub fn read_templates(path: &Path) -> anyhow::Result<Vec<TemplateSeed>> {
    let file: TemplateFile = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .with_context(|| format!("reading templates from {}", path.display()))?;
    Ok(file.template)
}

/// Upserts templates; returns (inserted, updated).
pub async fn seed_templates(pool: &PgPool, seeds: &[TemplateSeed]) -> anyhow::Result<(u64, u64)> {
    let mut inserted = 0;
    let mut updated = 0;
    let mut tx = pool.begin().await?;
    for t in seeds {
        let placeholders = serde_json::json!({ "placeholders": t.placeholders });
        let row: Option<(bool,)> = sqlx::query_as(
            r#"
            INSERT INTO question_templates (slug, focus, depth, category, body, placeholders)
            VALUES ($1, $2::interview_focus, $3::interview_depth, $4::template_category, $5, $6)
            ON CONFLICT (slug) DO UPDATE
               SET focus = EXCLUDED.focus, depth = EXCLUDED.depth, category = EXCLUDED.category,
                   body = EXCLUDED.body, placeholders = EXCLUDED.placeholders, updated_at = now()
             WHERE (question_templates.focus, question_templates.depth, question_templates.category,
                    question_templates.body, question_templates.placeholders)
                   IS DISTINCT FROM
                   (EXCLUDED.focus, EXCLUDED.depth, EXCLUDED.category, EXCLUDED.body,
                    EXCLUDED.placeholders)
            RETURNING (xmax = 0)
            "#,
        )
        .bind(&t.slug)
        .bind(&t.focus)
        .bind(&t.depth)
        .bind(&t.category)
        .bind(&t.body)
        .bind(&placeholders)
        .fetch_optional(&mut *tx)
        .await
        .with_context(|| format!("template {}", t.slug))?;
        match row {
            Some((true,)) => inserted += 1,
            Some((false,)) => updated += 1,
            None => {}
        }
    }
    tx.commit().await?;
    Ok((inserted, updated))
}
