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

/// The demo's three users (fixed ids, so searches "as a user" are reproducible).
pub const DEMO_USERS: [(&str, &str); 3] = [
    ("ada", "00000000-0000-4000-8000-00000000a0da"),
    ("bix", "00000000-0000-4000-8000-000000000b1c"),
    ("cyd", "00000000-0000-4000-8000-000000000cd0"),
];

/// What a practice session of each focus may say: titles, things done (past tense), what was
/// noticed (with `{tempo}`, `{bar}` and `{key}` filled in per session) and plans for next time.
struct Focus {
    name: &'static str,
    titles: &'static [&'static str],
    done: &'static [&'static str],
    noticed: &'static [&'static str],
    next: &'static [&'static str],
}

const FOCI: [Focus; 8] = [
    Focus {
        name: "harmony",
        titles: &[
            "Rootless voicings",
            "Blues substitutions",
            "Drop-2 on the bridge",
            "Guide tones",
            "Reharmonising a standard",
        ],
        done: &[
            "voiced a minor ii-V-I with rootless left-hand shapes",
            "worked through tritone substitutions over a blues",
            "spread drop-2 voicings across the bridge",
            "practised guide-tone lines through Autumn Leaves",
            "wrote out the upper-structure triads over a dominant",
            "compared quartal voicings with the usual shell chords",
            "moved the thirds and sevenths by step through a cycle of fifths",
            "reharmonised the last eight bars with passing diminished chords",
        ],
        noticed: &[
            "The seventh kept landing a beat late when the key changed to {key}.",
            "In {key} the left hand jumped instead of moving by half steps.",
            "Bar {bar} sounds muddy when the voicing sits below middle C.",
            "The altered dominant in bar {bar} finally resolved where my ear expected.",
            "At {tempo} bpm I could still hear each guide tone move.",
        ],
        next: &[
            "take the same voicings through all twelve keys",
            "sing the guide-tone line before playing it",
            "try the substitutions on a slower ballad",
        ],
    },
    Focus {
        name: "rhythm",
        titles: &[
            "Metronome on two and four",
            "Subdivisions",
            "Three against two",
            "Slow swing",
            "Odd meters",
        ],
        done: &[
            "played with the metronome on two and four",
            "counted sixteenth-note subdivisions aloud",
            "practised three-against-two between the hands",
            "locked in a swing feel at a slow tempo",
            "clapped the rhythm of the melody before playing a note",
            "set the click to beat one only and kept the time myself",
            "played along with a drummer recording and recorded the result",
            "worked through a bar of seven split as two, two and three",
        ],
        noticed: &[
            "With the click at {tempo} bpm I rushed every fill around bar {bar}.",
            "Keeping steady time felt natural below {tempo} bpm and shaky above it.",
            "The recording showed the offbeats drifting ahead of the metronome.",
            "Bar {bar} only grooved once I tapped my foot on the backbeat.",
            "I lost the downbeat twice, both times after a long rest.",
        ],
        next: &[
            "leave the click on beat four only",
            "push the tempo up by four clicks",
            "record a full chorus against the metronome",
        ],
    },
    Focus {
        name: "technique",
        titles: &[
            "Even scales",
            "Half-tempo bar",
            "Octaves",
            "Arpeggios",
            "Finger independence",
        ],
        done: &[
            "ran scales in four octaves with even fingers",
            "slowed the hardest bar down to half tempo",
            "worked on relaxed octave runs",
            "practised arpeggios with a loose wrist",
            "played slow scales in contrary motion listening for even tone",
            "did five-finger patterns with the weak fingers leading",
            "practised thumb-under crossings without accenting them",
            "played the scale in dotted rhythms, then straight again",
        ],
        noticed: &[
            "My fourth finger was weaker than the others in {key} major.",
            "At {tempo} bpm the scale stayed even; above it the thumb crossings bumped.",
            "The wrist tightened on the octave jump in bar {bar}.",
            "Playing slowly with a relaxed arm made the runs far more even.",
            "Tone got thin when I played faster than {tempo} bpm.",
        ],
        next: &[
            "keep the scales slow and listen to each note",
            "practise the octave passage in short bursts",
            "add the left hand to the arpeggio pattern",
        ],
    },
    Focus {
        name: "repertoire",
        titles: &[
            "Nocturne, second section",
            "Slow movement phrasing",
            "Full run-through",
            "Breathing points",
            "Memory work",
        ],
        done: &[
            "memorised the second section of the nocturne",
            "planned the phrasing of the slow movement",
            "ran the whole piece without stopping",
            "marked breathing points in the melody",
            "started the piece from five different bars to test my memory",
            "played only the left hand of the piece from memory",
            "listened to two recordings and compared their tempo choices",
            "fixed the fingering of the passage before the recapitulation",
        ],
        noticed: &[
            "The memory slip always happens at bar {bar}, right after the modulation to {key}.",
            "The run-through took longer than the score suggests at {tempo} bpm.",
            "The climax arrives too early if I crescendo from bar {bar}.",
            "Without stopping, small mistakes mattered less than I feared.",
            "The melody breathes better when the left hand gets softer.",
        ],
        next: &[
            "play the piece for a friend",
            "memorise the coda",
            "practise the transitions between sections",
        ],
    },
    Focus {
        name: "ear_training",
        titles: &[
            "Intervals",
            "Transcription",
            "Chord qualities",
            "Call and response",
            "Bass lines by ear",
        ],
        done: &[
            "sang intervals above each scale degree",
            "transcribed the first eight bars of a solo",
            "identified chord qualities by ear",
            "played back short melodies after one hearing",
            "wrote down the bass line of a song without an instrument",
            "sang the root of each chord while a recording played",
            "matched pitches from a drone before playing them",
            "guessed the key of five songs on the radio",
        ],
        noticed: &[
            "Minor sixths still sound like perfect fifths to me in {key}.",
            "The transcription went wrong at bar {bar}, where the solo leaves the chord.",
            "Half-diminished chords are the ones I confuse most.",
            "Melodies longer than four bars fall apart after one hearing.",
            "Singing first made the intervals much easier to find on the keys.",
        ],
        next: &[
            "transcribe four more bars",
            "drill minor sixths against a drone",
            "sing bass lines before writing them down",
        ],
    },
    Focus {
        name: "improvisation",
        titles: &[
            "Motif development",
            "Space in the solo",
            "Approach notes",
            "Trading fours",
            "Modal vamp",
        ],
        done: &[
            "developed a three-note motif over a dorian vamp",
            "left space between phrases in the solo",
            "used chromatic approach notes into chord tones",
            "traded fours with a backing track",
            "improvised using only two notes, then three",
            "played a solo that quoted the melody every chorus",
            "answered each of my phrases with a variation of it",
            "started every phrase on a different beat of the bar",
        ],
        noticed: &[
            "The motif ran out of ideas after about {bar} bars.",
            "Leaving space made the solo sound calmer at {tempo} bpm.",
            "Approach notes into the third of the chord sounded best in {key}.",
            "I kept starting phrases on beat one until I forced myself not to.",
            "The recording of the fours showed I rushed after every break.",
        ],
        next: &[
            "limit myself to one motif per chorus",
            "record a full solo and count the rests",
            "try the approach notes on a faster tune",
        ],
    },
    Focus {
        name: "sight_reading",
        titles: &[
            "Hymns at sight",
            "Reading ahead",
            "Duets",
            "Unfamiliar keys",
            "Rhythm reading",
        ],
        done: &[
            "read through four hymns without stopping",
            "kept my eyes a bar ahead of my hands",
            "sight-read the second part of a duet",
            "read short pieces in keys with many flats",
            "read only the rhythms of a page, clapping them",
            "played a new etude once at a steady tempo, mistakes and all",
            "read chord symbols from a lead sheet I had never seen",
            "scanned each piece for key changes before starting",
        ],
        noticed: &[
            "Reading in {key} slowed me down to about {tempo} bpm.",
            "I stopped at bar {bar} to fix a note instead of keeping the pulse.",
            "Looking ahead was easier when the left hand had long notes.",
            "Ledger lines above the staff are still my weak spot.",
            "Scanning for accidentals first saved me twice.",
        ],
        next: &[
            "read one new piece every day",
            "practise reading with the metronome on",
            "read alto clef once a week",
        ],
    },
    Focus {
        name: "theory",
        titles: &[
            "Modes",
            "Roman numerals",
            "Voice leading rules",
            "Circle of fifths",
            "Analysing a chorale",
        ],
        done: &[
            "wrote out the modes of the major scale from one root",
            "analysed a chorale with roman numerals",
            "checked my four-part writing for parallel fifths",
            "spelled every dominant seventh chord around the circle of fifths",
            "labelled the cadences in a short sonatina",
            "built secondary dominants for each degree of the scale",
            "compared the harmonic and melodic minor scales",
            "figured the bass line of a baroque aria",
        ],
        noticed: &[
            "The Neapolitan chord in bar {bar} surprised me.",
            "Spelling chords in {key} needs double flats I always forget.",
            "The cadences made more sense once I sang the bass line.",
            "Parallel fifths were hiding in bar {bar} between tenor and bass.",
            "Lydian finally sounds different to me from plain major.",
        ],
        next: &[
            "analyse the next chorale",
            "write a short progression using secondary dominants",
            "quiz myself on key signatures",
        ],
    },
];

const OPENERS: [&str; 10] = [
    "Short session before work.",
    "Long evening session, about {minutes} minutes in all.",
    "Warmed up with long tones first.",
    "Felt tired, so I kept the plan small.",
    "Practised on the old upright at school.",
    "Morning session with the windows open.",
    "Recorded myself for the first time in weeks.",
    "Split the hour into three short blocks.",
    "Came back to this after a few days away.",
    "My teacher suggested this on Tuesday.",
];

const REFLECTIONS: [&str; 10] = [
    "It felt easier than last week.",
    "Still tense in the shoulders by the end.",
    "Progress is slow but real.",
    "I enjoyed this more than I expected.",
    "Frustrating at first, better after a break.",
    "Hard to concentrate today.",
    "This is starting to feel automatic.",
    "I need to be more patient with the slow practice.",
    "Good energy throughout.",
    "The short breaks helped a lot.",
];

const KEYS: [&str; 12] = [
    "C", "G", "D", "A", "E", "B", "F", "B flat", "E flat", "A flat", "D flat", "G flat",
];

/// splitmix64: a tiny deterministic generator, so the demo's data (and output) is the same on
/// every run and machine.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// One demo session: (focus, title, notes). Session `i` of a run; `attempt` > 0 only when an
/// earlier attempt produced a body some other session already has.
fn demo_session(i: usize, attempt: u64) -> (&'static str, String, String) {
    let mut dice = Dice((i as u64) << 8 | attempt);
    // Users take turns; each user's sessions cycle through every focus.
    let focus = &FOCI[(i / DEMO_USERS.len()) % FOCI.len()];
    let fill = |s: &str, dice: &mut Dice| {
        s.replace("{tempo}", &(52 + 4 * dice.below(30)).to_string())
            .replace("{bar}", &(3 + dice.below(60)).to_string())
            .replace("{key}", dice.pick(&KEYS))
            .replace("{minutes}", &(60 + 15 * dice.below(5)).to_string())
    };
    let mut sentences = Vec::new();
    if dice.chance(55) {
        sentences.push(fill(dice.pick(&OPENERS), &mut dice));
    }
    let first = dice.below(focus.done.len());
    sentences.push(format!("Today I {}.", focus.done[first]));
    if dice.chance(60) {
        let second = (first + 1 + dice.below(focus.done.len() - 1)) % focus.done.len();
        let frame = dice.pick(&["Then I {}.", "After a break I {}.", "Later I also {}."]);
        sentences.push(frame.replace("{}", focus.done[second]));
    }
    for _ in 0..1 + dice.below(2) {
        let s = fill(dice.pick(focus.noticed), &mut dice);
        if !sentences.contains(&s) {
            sentences.push(s);
        }
    }
    if dice.chance(50) {
        sentences.push(dice.pick(&REFLECTIONS).to_string());
    }
    sentences.push(format!(
        "Next time: {} for {} minutes.",
        dice.pick(focus.next),
        10 + 5 * dice.below(8)
    ));
    let title = format!(
        "{}, day {}",
        dice.pick(focus.titles),
        i / DEMO_USERS.len() + 1
    );
    (focus.name, title, sentences.join(" "))
}

/// `n` demo sessions as (focus, title, notes), the same on every call; no two notes are equal
/// (a repeat is drawn again).
pub fn demo_sessions(n: usize) -> Vec<(&'static str, String, String)> {
    let mut seen = std::collections::HashSet::new();
    (0..n)
        .map(|i| {
            let mut attempt = 0;
            loop {
                let session = demo_session(i, attempt);
                if seen.insert(session.2.clone()) {
                    return session;
                }
                attempt += 1;
            }
        })
        .collect()
}

/// About `n` practice sessions for the demo users, deterministic, no two with the same notes.
/// Returns how many were inserted (none when the demo users already have sessions).
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
    for (i, (focus, title, body)) in demo_sessions(n).into_iter().enumerate() {
        u.push(users[i % users.len()]);
        f.push(focus.to_string());
        d.push(depths[i % 3].to_string());
        t.push(title);
        notes.push(body);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_sessions_differ_in_wording_length_and_topic_and_repeat_exactly() {
        let sessions = demo_sessions(200);
        assert_eq!(sessions, demo_sessions(200), "deterministic");
        let bodies: std::collections::HashSet<&str> =
            sessions.iter().map(|(_, _, b)| b.as_str()).collect();
        assert_eq!(bodies.len(), 200, "no two sessions share a body");
        let foci: std::collections::HashSet<&str> = sessions.iter().map(|(f, _, _)| *f).collect();
        assert_eq!(foci.len(), FOCI.len(), "every focus appears");
        let sentences: Vec<usize> = sessions
            .iter()
            .map(|(_, _, b)| b.matches(". ").count() + 1)
            .collect();
        let (min, max) = (
            sentences.iter().min().unwrap(),
            sentences.iter().max().unwrap(),
        );
        assert!(
            *min <= 3 && *max >= 6,
            "lengths vary: {min}..{max} sentences"
        );
        // Sessions of one focus do not open the same way: at least half start differently.
        let rhythm: Vec<&str> = sessions
            .iter()
            .filter(|(f, _, _)| *f == "rhythm")
            .map(|(_, _, b)| &b[..40.min(b.len())])
            .collect();
        let openings: std::collections::HashSet<&&str> = rhythm.iter().collect();
        assert!(
            openings.len() * 2 >= rhythm.len(),
            "{} of {}",
            openings.len(),
            rhythm.len()
        );
    }
}
