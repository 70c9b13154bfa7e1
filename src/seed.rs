//! `seed-templates`: load the question templates from `config/templates.toml`.
//!
//! Why upsert by slug with `IS DISTINCT FROM`: a second run must change nothing — no new rows,
//! no bumped `updated_at`, and so no re-embed of text that did not change.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Placeholder {
    pub key: String,
    pub description: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub example: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TemplateSeed {
    pub slug: String,
    pub focus: String,
    pub depth: String,
    pub category: String,
    pub body: String,
    #[serde(default)]
    pub placeholders: Vec<Placeholder>,
}

#[derive(Debug, Deserialize)]
struct TemplateFile {
    template: Vec<TemplateSeed>,
}

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

/// The demo's three users (fixed ids, so searches "as a user" are reproducible).
pub const DEMO_USERS: [(&str, &str); 3] = [
    ("ada", "00000000-0000-4000-8000-00000000a0da"),
    ("bix", "00000000-0000-4000-8000-000000000b1c"),
    ("cyd", "00000000-0000-4000-8000-000000000cd0"),
];

const FOCI: [(&str, &[&str]); 6] = [
    (
        "harmony",
        &[
            "voiced a minor ii-V-I with rootless left-hand shapes",
            "worked through tritone substitutions over a blues",
            "spread drop-2 voicings across the bridge",
            "practised guide-tone lines through Autumn Leaves",
        ],
    ),
    (
        "rhythm",
        &[
            "played with the metronome on two and four",
            "counted sixteenth-note subdivisions aloud",
            "practised three-against-two between the hands",
            "locked in a swing feel at a slow tempo",
        ],
    ),
    (
        "technique",
        &[
            "ran scales in four octaves with even fingers",
            "slowed the hardest bar down to half tempo",
            "worked on relaxed octave runs",
            "practised arpeggios with a loose wrist",
        ],
    ),
    (
        "repertoire",
        &[
            "memorised the second section of the nocturne",
            "planned the phrasing of the slow movement",
            "ran the whole piece without stopping",
            "marked breathing points in the melody",
        ],
    ),
    (
        "ear_training",
        &[
            "sang intervals above each scale degree",
            "transcribed the first eight bars of a solo",
            "identified chord qualities by ear",
            "played back short melodies after one hearing",
        ],
    ),
    (
        "improvisation",
        &[
            "developed a three-note motif over a dorian vamp",
            "left space between phrases in the solo",
            "used chromatic approach notes into chord tones",
            "traded fours with a backing track",
        ],
    ),
];

/// About `n` practice sessions for the demo users, deterministic. Returns how many were inserted
/// (none when the demo users already have sessions).
pub async fn seed_demo_sessions(pool: &PgPool, n: usize) -> anyhow::Result<usize> {
    let users: Vec<uuid::Uuid> = DEMO_USERS
        .iter()
        .map(|(_, id)| id.parse().unwrap())
        .collect();
    let existing: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id = ANY($1)")
        .bind(&users)
        .fetch_one(pool)
        .await?;
    if existing > 0 {
        return Ok(0);
    }
    let depths = ["quick", "standard", "deep"];
    let (mut u, mut f, mut d, mut t, mut notes) = (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..n {
        // Users take turns; each user's sessions cycle through every focus.
        let (focus, phrases) = FOCI[(i / users.len()) % FOCI.len()];
        let a = phrases[i % phrases.len()];
        let b = phrases[(i / FOCI.len() + 1) % phrases.len()];
        u.push(users[i % users.len()]);
        f.push(focus.to_string());
        d.push(depths[i % 3].to_string());
        t.push(format!(
            "{} practice, day {}",
            focus.replace('_', " "),
            i / 3 + 1
        ));
        notes.push(format!(
            "Today I {a}. Then I {b}. Next time: {} for {} minutes.",
            phrases[(i + 2) % phrases.len()],
            10 + (i * 7) % 35
        ));
    }
    let inserted = sqlx::query(
        "INSERT INTO sessions (user_id, focus, depth, title, notes)
         SELECT u, f::interview_focus, d::interview_depth, t, n
           FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[]) AS x(u, f, d, t, n)",
    )
    .bind(&u)
    .bind(&f)
    .bind(&d)
    .bind(&t)
    .bind(&notes)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted as usize)
}
