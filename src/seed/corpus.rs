//! The demo sessions' phrase tables: what a practice session of each focus may say.
//!
//! Why apart: they are data, not logic — ~260 lines of phrases that [`super::sessions`] draws
//! from with a fixed seed, so the demo's sessions (and its search output) are the same on
//! every run and machine.

/// What a practice session of each focus may say: titles, things done (past tense), what was
/// noticed (with `{tempo}`, `{bar}` and `{key}` filled in per session) and plans for next time.
pub(super) struct Focus {
    pub(super) name: &'static str,
    pub(super) titles: &'static [&'static str],
    pub(super) done: &'static [&'static str],
    pub(super) noticed: &'static [&'static str],
    pub(super) next: &'static [&'static str],
}

pub(super) const FOCI: [Focus; 8] = [
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

pub(super) const OPENERS: [&str; 10] = [
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

pub(super) const REFLECTIONS: [&str; 10] = [
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

pub(super) const KEYS: [&str; 12] = [
    "C", "G", "D", "A", "E", "B", "F", "B flat", "E flat", "A flat", "D flat", "G flat",
];
