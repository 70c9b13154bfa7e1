//! `seed-demo`: the demo's practice sessions for three users, generated deterministically
//! (no two alike) from the phrase tables in `super::corpus`.

use sqlx::PgPool;

use super::corpus::{FOCI, KEYS, OPENERS, REFLECTIONS};

/// The demo's three users (fixed ids, so searches "as a user" are reproducible).
pub const DEMO_USERS: [(&str, &str); 3] = [
    ("ada", "00000000-0000-4000-8000-00000000a0da"),
    ("bix", "00000000-0000-4000-8000-000000000b1c"),
    ("cyd", "00000000-0000-4000-8000-000000000cd0"),
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
