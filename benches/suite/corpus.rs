//! Corpus: generated practice sessions (log-uniform lengths, some long, some foreign) and
//! clustered search vectors.

#[allow(unused_imports)]
use super::*;

pub(crate) const WORDS: &[&str] = &[
    "scale",
    "arpeggio",
    "voicing",
    "tempo",
    "metronome",
    "rhythm",
    "swing",
    "chord",
    "melody",
    "phrase",
    "dynamics",
    "fingering",
    "octave",
    "cadence",
    "harmony",
    "tension",
    "release",
    "improvise",
    "motif",
    "bridge",
    "chorus",
    "slowly",
    "evenly",
    "relaxed",
    "wrist",
    "breath",
    "the",
    "left",
    "right",
    "hand",
    "practice",
    "today",
    "again",
    "bar",
    "beat",
    "groove",
    "dominant",
    "tonic",
    "subdominant",
    "modulation",
    "legato",
    "staccato",
    "accent",
    "pedal",
];
pub(crate) const FOREIGN: &[&str] = &[
    "Heute habe ich die Tonleitern langsam und gleichmäßig geübt.",
    "Hoy practiqué los acordes de séptima con el metrónomo.",
    "今日はメトロノームに合わせて音階を練習しました。",
    "J'ai travaillé le phrasé de la mélodie avec la main droite.",
];

/// A session text of about `tokens` tokens (cl100k), with some non-English sentences.
pub(crate) fn gen_text(rng: &mut StdRng, tokens: usize) -> String {
    let mut s = String::with_capacity(tokens * 6);
    let mut words = 0usize;
    while words * 5 / 4 < tokens {
        if rng.random_range(0..40) == 0 {
            s.push_str(FOREIGN[rng.random_range(0..FOREIGN.len())]);
            words += 12;
        } else {
            s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
            words += 1;
        }
        s.push(if rng.random_range(0..12) == 0 {
            '.'
        } else {
            ' '
        });
        if rng.random_range(0..12) == 0 {
            s.push(' ');
        }
    }
    s
}

/// Lengths log-uniform in 20..2,000 tokens, and one in 500 a transcript of 9,000..14,000.
pub(crate) fn gen_corpus(n: usize, seed: u64) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let tokens = if i % 500 == 499 {
                rng.random_range(9_000..14_000)
            } else {
                (20f64.ln() + rng.random::<f64>() * (2000f64.ln() - 20f64.ln())).exp() as usize
            };
            gen_text(&mut rng, tokens)
        })
        .collect()
}

/// A unit vector near one of 100 centres.
pub(crate) fn clustered(i: usize) -> Vec<f32> {
    let centre = fake_vector(&format!("centre {}", i % 100), DIMS);
    let noise = fake_vector(&format!("noise {i}"), DIMS);
    let v: Vec<f32> = centre
        .iter()
        .zip(&noise)
        .map(|(c, n)| c + 0.45 * n)
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

// ------------------------------------------------------------------------------ database ---
