//! cl100k_base token counts without a regex engine: the worker's hot path.
//!
//! Why this exists: counting tokens is most of the worker's CPU (issue 23's profile: ~70% of the
//! worker's samples were tiktoken-rs, ~40% its `fancy_regex` pre-split alone). The pre-split
//! pattern of cl100k_base has a look-ahead and possessive repeats, so `fancy_regex` runs it in
//! its backtracking VM; written out by hand it is a few comparisons per character. What is
//! written here is only that pattern and the byte-pair merge loop; the ranks are tiktoken-rs's
//! own (read from its `CoreBPE` by `build.rs`), and the tests hold every piece equal to the
//! pattern run by `fancy_regex` and every token, not just the counts, equal to tiktoken-rs's
//! `encode_ordinary` over mixed-script and adversarial text.
//!
//! The pattern (tiktoken-rs 0.12, `cl100k_base`), alternatives tried in order at each position:
//! 1. `'(?i:[sdmt]|ll|ve|re)` — contractions (case-insensitive, so `ſ` counts as `s`);
//! 2. `[^\r\n\p{L}\p{N}]?+\p{L}++` — a letter run, with one leading non-letter/number/newline;
//! 3. `\p{N}{1,3}+` — up to three digits;
//! 4. ` ?[^\s\p{L}\p{N}]++[\r\n]*+` — punctuation, one optional leading space, trailing newlines;
//! 5. `\s++$` — whitespace to the end of the text;
//! 6. `\s*[\r\n]` — whitespace up to its last newline;
//! 7. `\s+(?!\S)` — whitespace but its last character (which then leads the next piece);
//! 8. `\s` — one whitespace character.
//!
//! The character classes come from `regex-syntax` (the tables the regex engines use), so the
//! letter, number and white-space sets are the same ones tiktoken-rs's regex matches against.

use std::collections::BinaryHeap;
use std::sync::OnceLock;

use rustc_hash::FxHashMap;

/// Token ranks by their bytes: cl100k_base's 100,256 ordinary tokens. Tokens of up to 15 bytes
/// (nearly all, and every pair the merge loop asks about early) are keyed by their bytes packed
/// into a `u128` with the length: no pointer chase or `memcmp` per lookup.
struct Ranks {
    short: FxHashMap<u128, u32>,
    long: FxHashMap<&'static [u8], u32>,
}

impl Ranks {
    #[inline]
    fn get(&self, bytes: &[u8]) -> Option<u32> {
        if bytes.len() < 16 {
            self.short.get(&pack(bytes)).copied()
        } else {
            self.long.get(bytes).copied()
        }
    }
}

/// Up to 15 bytes and their length in one key. Read as (overlapping) words, not copied into a
/// buffer byte by byte: a buffer read back as words stalls store forwarding on every lookup.
#[inline]
fn pack(bytes: &[u8]) -> u128 {
    let n = bytes.len();
    debug_assert!(n < 16);
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    let half = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as u64;
    let (lo, hi) = if n >= 8 {
        // The last 8 bytes, shifted so byte 8 lands at bit 0 (nothing when n == 8).
        let hi = if n > 8 {
            word(n - 8) >> ((16 - n) * 8)
        } else {
            0
        };
        (word(0), hi)
    } else if n >= 4 {
        // Two overlapping halves: overlapping bytes are equal, so OR keeps them.
        (half(0) | (half(n - 4) << ((n - 4) * 8)), 0)
    } else {
        let mut lo = 0u64;
        for (i, &b) in bytes.iter().enumerate() {
            lo |= (b as u64) << (i * 8);
        }
        (lo, 0)
    };
    (lo as u128) | ((hi as u128) << 64) | ((n as u128) << 120)
}

static RANKS: OnceLock<Ranks> = OnceLock::new();

/// cl100k_base's 100,256 ordinary tokens, each its length then its bytes, in rank order:
/// written by `build.rs` from tiktoken-rs.
static TABLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cl100k_ranks.bin"));

fn ranks() -> &'static Ranks {
    RANKS.get_or_init(|| {
        let mut short = FxHashMap::with_capacity_and_hasher(100_256, Default::default());
        let mut long = FxHashMap::default();
        let mut at = 0;
        let mut rank = 0u32;
        while at < TABLE.len() {
            let len = TABLE[at] as usize;
            let bytes: &'static [u8] = &TABLE[at + 1..at + 1 + len];
            if len < 16 {
                short.insert(pack(bytes), rank);
            } else {
                long.insert(bytes, rank);
            }
            at += 1 + len;
            rank += 1;
        }
        assert_eq!(rank, 100_256, "cl100k_base has 100,256 ordinary tokens");
        Ranks { short, long }
    })
}

/// Loads the rank table now (the worker does it at start-up, not inside its first batch).
pub fn warm() {
    ranks();
}

/// Tokens of `text` in cl100k_base (= tiktoken-rs `encode_ordinary(text).len()`).
pub fn count(text: &str) -> usize {
    let ranks = ranks();
    PIECE_COUNTS.with_borrow_mut(|cache| {
        let mut n = 0;
        let mut scratch = Scratch::default();
        for piece in pieces(text) {
            let piece = piece.as_bytes();
            if piece.len() >= 16 {
                n += boundaries(piece, ranks, &mut scratch).len() - 1;
                continue;
            }
            // A piece's key carries its length, so an empty slot (0) matches none.
            let key = pack(piece);
            let slot = &mut cache[slot_of(key)];
            if slot.0 != key {
                *slot = (
                    key,
                    (boundaries(piece, ranks, &mut scratch).len() - 1) as u32,
                );
            }
            n += slot.1 as usize;
        }
        n
    })
}

/// Slots of the per-thread piece-count cache: 4,096 × 32 bytes = 128 KB, which stays in the
/// core's cache where the 100,256-token table (megabytes) does not. Direct-mapped: a colliding
/// piece replaces the older one, so it never grows. Text repeats its words (Zipf), so most
/// pieces are answered here; a miss costs what it cost without the cache.
const CACHE_SLOTS: usize = 4096;

thread_local! {
    static PIECE_COUNTS: std::cell::RefCell<Box<[(u128, u32)]>> =
        std::cell::RefCell::new(vec![(0u128, 0u32); CACHE_SLOTS].into_boxed_slice());
}

#[inline]
fn slot_of(key: u128) -> usize {
    let h =
        ((key as u64) ^ ((key >> 64) as u64).rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> (64 - CACHE_SLOTS.trailing_zeros())) as usize
}

/// Byte offsets in `text` where each of its cl100k tokens ends, in order (a token may end inside
/// a multi-byte character: the BPE works on bytes).
pub fn token_ends(text: &str) -> Vec<usize> {
    let ranks = ranks();
    let mut ends = Vec::with_capacity(text.len() / 4 + 1);
    let mut scratch = Scratch::default();
    let base = text.as_ptr() as usize;
    for piece in pieces(text) {
        let at = piece.as_ptr() as usize - base;
        ends.extend(
            boundaries(piece.as_bytes(), ranks, &mut scratch)[1..]
                .iter()
                .map(|e| at + e),
        );
    }
    ends
}

/// The token ids of `text` (the tests compare them with tiktoken-rs's).
#[cfg(test)]
fn encode(text: &str) -> Vec<u32> {
    let ranks = ranks();
    let mut out = Vec::new();
    let mut prev = 0;
    for end in token_ends(text) {
        out.push(
            ranks
                .get(&text.as_bytes()[prev..end])
                .expect("every token has a rank"),
        );
        prev = end;
    }
    out
}

/// The token boundaries of one piece (0, …, piece.len()): itself if it is a token, else its
/// byte-pair merges.
fn boundaries<'s>(piece: &[u8], ranks: &Ranks, scratch: &'s mut Scratch) -> &'s [usize] {
    if ranks.get(piece).is_some() {
        scratch.out.clear();
        scratch.out.extend([0, piece.len()]);
        return &scratch.out;
    }
    merge(piece, ranks, scratch)
}

/// Byte-pair merges of one piece that is not itself a token: returns the token boundaries
/// (0, …, piece.len()). Lowest rank first, leftmost on a tie: tiktoken's order. Short pieces use
/// a vector scan (tiktoken's `_byte_pair_merge`), long ones a heap (its `_byte_pair_merge_large`),
/// so a 1 MB run of one character is not quadratic.
fn merge<'s>(piece: &[u8], ranks: &Ranks, scratch: &'s mut Scratch) -> &'s [usize] {
    scratch.out.clear();
    if piece.len() < 128 {
        merge_small(piece, ranks, &mut scratch.parts, &mut scratch.out);
    } else {
        merge_large(piece, ranks, &mut scratch.out);
    }
    &scratch.out
}

/// Buffers the merge loop reuses from piece to piece.
#[derive(Default)]
struct Scratch {
    parts: Vec<(usize, u32)>,
    out: Vec<usize>,
}

fn merge_small(piece: &[u8], ranks: &Ranks, parts: &mut Vec<(usize, u32)>, out: &mut Vec<usize>) {
    let rank = |a: usize, b: usize| ranks.get(&piece[a..b]).unwrap_or(u32::MAX);
    // parts[i] = (start, rank of merging part i with part i + 1).
    parts.clear();
    for i in 0..piece.len() - 1 {
        parts.push((i, rank(i, i + 2)));
    }
    parts.push((piece.len() - 1, u32::MAX));
    parts.push((piece.len(), u32::MAX));
    loop {
        let mut min = (u32::MAX, 0);
        for (i, &(_, r)) in parts[..parts.len() - 1].iter().enumerate() {
            if r < min.0 {
                min = (r, i);
            }
        }
        if min.0 == u32::MAX {
            break;
        }
        let i = min.1;
        let after = |parts: &Vec<(usize, u32)>, i: usize| {
            if i + 3 < parts.len() {
                rank(parts[i].0, parts[i + 3].0)
            } else {
                u32::MAX
            }
        };
        if i > 0 {
            parts[i - 1].1 = after(parts, i - 1);
        }
        parts[i].1 = after(parts, i);
        parts.remove(i + 1);
    }
    out.extend(parts.iter().map(|p| p.0));
}

#[derive(PartialEq, Eq)]
struct Candidate {
    rank: u32,
    start: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // A max-heap popping the lowest rank, then the leftmost start.
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.start.cmp(&self.start))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

fn merge_large(piece: &[u8], ranks: &Ranks, out: &mut Vec<usize>) {
    // Positions as u32 (a text field is under 1 GB): 12 bytes a byte of piece plus the heap's 8
    // a candidate, so a multi-megabyte run of letters without a space (a pasted sequence) stays
    // within the pod's memory; tiktoken's own large merge keeps 40 bytes a byte.
    let n = piece.len();
    let at = |i: u32| i as usize;
    // For the part starting at i: where it ends, where the part before it starts, and the rank of
    // merging it with the next part (u32::MAX: none, or stale).
    let mut end: Vec<u32> = (1..=n as u32).collect();
    let mut prev: Vec<u32> = (0..n as u32).map(|i| i.wrapping_sub(1)).collect();
    let mut next_rank = vec![u32::MAX; n];
    let mut heap = BinaryHeap::with_capacity(n);
    for i in 0..n - 1 {
        if let Some(r) = ranks.get(&piece[i..i + 2]) {
            next_rank[i] = r;
            heap.push(Candidate {
                rank: r,
                start: i as u32,
            });
        }
    }
    while let Some(Candidate { rank, start }) = heap.pop() {
        if next_rank[at(start)] != rank {
            continue; // stale: one of its two parts has merged since
        }
        let right = end[at(start)];
        let right_end = end[at(right)];
        end[at(start)] = right_end;
        next_rank[at(right)] = u32::MAX;
        // The merged part with the one after it.
        next_rank[at(start)] = u32::MAX;
        if at(right_end) < n {
            prev[at(right_end)] = start;
            if let Some(r) = ranks.get(&piece[at(start)..at(end[at(right_end)])]) {
                next_rank[at(start)] = r;
                heap.push(Candidate { rank: r, start });
            }
        }
        // The part before it with the merged part.
        if start > 0 {
            let p = prev[at(start)];
            next_rank[at(p)] = u32::MAX;
            if let Some(r) = ranks.get(&piece[at(p)..at(right_end)]) {
                next_rank[at(p)] = r;
                heap.push(Candidate { rank: r, start: p });
            }
        }
    }
    let mut i = 0;
    while i < n {
        out.push(i);
        i = at(end[i]);
    }
    out.push(n);
}

/// What the pattern distinguishes about a character.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    /// `\r` or `\n`.
    Newline,
    /// White space other than `\r` and `\n`.
    Space,
    /// Anything else (punctuation, symbols, marks, emoji).
    Other,
}

struct Classes {
    ascii: [Class; 128],
    letter: Vec<(char, char)>,
    number: Vec<(char, char)>,
    space: Vec<(char, char)>,
    /// Non-ASCII characters that match a contraction letter case-insensitively (Unicode simple
    /// case folding: `ſ` is `s`), with that letter.
    fold: Vec<(char, u8)>,
}

fn unicode_ranges(pattern: &str) -> Vec<(char, char)> {
    use regex_syntax::hir::{Class as HirClass, HirKind};
    let hir = regex_syntax::parse(pattern).expect("a valid class");
    match hir.kind() {
        HirKind::Class(HirClass::Unicode(c)) => {
            c.ranges().iter().map(|r| (r.start(), r.end())).collect()
        }
        other => panic!("{pattern} is not a Unicode class: {other:?}"),
    }
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let letter = unicode_ranges(r"\p{L}");
        let number = unicode_ranges(r"\p{N}");
        let space = unicode_ranges(r"\s");
        let mut fold = Vec::new();
        for a in *b"sdmtlver" {
            for (lo, hi) in unicode_ranges(&format!("(?i){}", a as char)) {
                fold.extend((lo..=hi).filter(|c| !c.is_ascii()).map(|c| (c, a)));
            }
        }
        let mut ascii = [Class::Other; 128];
        for (b, class) in ascii.iter_mut().enumerate() {
            *class = slow_class(b as u8 as char, &letter, &number, &space);
        }
        Classes {
            ascii,
            letter,
            number,
            space,
            fold,
        }
    })
}

fn contains(ranges: &[(char, char)], c: char) -> bool {
    ranges
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

fn slow_class(
    c: char,
    letter: &[(char, char)],
    number: &[(char, char)],
    space: &[(char, char)],
) -> Class {
    if c == '\r' || c == '\n' {
        Class::Newline
    } else if contains(space, c) {
        Class::Space
    } else if contains(letter, c) {
        Class::Letter
    } else if contains(number, c) {
        Class::Number
    } else {
        Class::Other
    }
}

/// `text`'s pieces under the cl100k pattern, in order; together they are the whole text.
pub fn pieces(text: &str) -> Pieces<'_> {
    Pieces {
        text,
        at: 0,
        classes: classes(),
    }
}

/// Iterator of [`pieces`].
pub struct Pieces<'t> {
    text: &'t str,
    at: usize,
    classes: &'static Classes,
}

impl<'t> Pieces<'t> {
    /// The character at byte `i` (< len) with its class and width.
    #[inline]
    fn at(&self, i: usize) -> (char, Class, usize) {
        let b = self.text.as_bytes()[i];
        if b < 0x80 {
            return (b as char, self.classes.ascii[b as usize], 1);
        }
        let c = self.text[i..].chars().next().expect("i is a char boundary");
        let k = &self.classes;
        (
            c,
            slow_class(c, &k.letter, &k.number, &k.space),
            c.len_utf8(),
        )
    }

    /// Class at byte `i`, or None at the end.
    #[inline]
    fn class_at(&self, i: usize) -> Option<(char, Class, usize)> {
        (i < self.text.len()).then(|| self.at(i))
    }

    /// End of the run of characters from `i` whose class passes `keep`.
    #[inline]
    fn run(&self, mut i: usize, keep: impl Fn(Class) -> bool) -> usize {
        while let Some((_, class, w)) = self.class_at(i) {
            if !keep(class) {
                break;
            }
            i += w;
        }
        i
    }

    /// Whether `c` matches the ASCII letter `ascii` case-insensitively.
    fn folds_to(&self, c: char, ascii: u8) -> bool {
        if c.is_ascii() {
            c.to_ascii_lowercase() == ascii as char
        } else {
            self.classes.fold.contains(&(c, ascii))
        }
    }

    /// End of the piece starting at byte `i` (< len).
    fn piece_end(&self, i: usize) -> usize {
        let (c, class, w) = self.at(i);
        // 1. contractions
        if c == '\''
            && let Some((n1, _, w1)) = self.class_at(i + 1)
        {
            if [b's', b'd', b'm', b't']
                .iter()
                .any(|&a| self.folds_to(n1, a))
            {
                return i + 1 + w1;
            }
            if let Some((n2, _, w2)) = self.class_at(i + 1 + w1) {
                for (a, b) in [(b'l', b'l'), (b'v', b'e'), (b'r', b'e')] {
                    if self.folds_to(n1, a) && self.folds_to(n2, b) {
                        return i + 1 + w1 + w2;
                    }
                }
            }
        }
        let letters = |c: Class| c == Class::Letter;
        let other = |c: Class| c == Class::Other;
        // 2. a letter run, with one leading character that is no letter, number or newline
        if class == Class::Letter {
            return self.run(i + w, letters);
        }
        if matches!(class, Class::Space | Class::Other)
            && matches!(self.class_at(i + w), Some((_, Class::Letter, _)))
        {
            return self.run(i + w, letters);
        }
        // 3. up to three digits
        if class == Class::Number {
            let mut end = i + w;
            for _ in 0..2 {
                match self.class_at(end) {
                    Some((_, Class::Number, w)) => end += w,
                    _ => break,
                }
            }
            return end;
        }
        // 4. punctuation with an optional leading space, then newlines
        let punct_from = if class == Class::Other {
            Some(i + w)
        } else if c == ' ' && matches!(self.class_at(i + 1), Some((_, Class::Other, _))) {
            Some(i + 1)
        } else {
            None
        };
        if let Some(from) = punct_from {
            let end = self.run(from, other);
            return self.run(end, |c| c == Class::Newline);
        }
        // 5–8. white space: [i, run_end) is the whole run
        let mut run_end = i;
        let mut last_newline = None;
        let mut last_start = i;
        while let Some((_, class, w)) = self.class_at(run_end) {
            match class {
                Class::Newline => last_newline = Some(run_end),
                Class::Space => {}
                _ => break,
            }
            last_start = run_end;
            run_end += w;
        }
        if run_end == self.text.len() {
            run_end // 5. to the end of the text
        } else if let Some(nl) = last_newline {
            nl + 1 // 6. up to the last newline
        } else if last_start > i {
            last_start // 7. all but the last character
        } else {
            i + w // 8. one character
        }
    }
}

impl<'t> Iterator for Pieces<'t> {
    type Item = &'t str;

    fn next(&mut self) -> Option<&'t str> {
        if self.at >= self.text.len() {
            return None;
        }
        let start = self.at;
        self.at = self.piece_end(start);
        Some(&self.text[start..self.at])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(text: &str) -> Vec<u32> {
        tiktoken_rs::cl100k_base_singleton().encode_ordinary(text)
    }

    /// tiktoken-rs 0.12's cl100k_base pattern, run by its engine.
    const PATTERN: &str = "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}++|\\p{N}{1,3}+| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*+|\\s++$|\\s*[\\r\\n]|\\s+(?!\\S)|\\s";

    fn reference_pieces(text: &str) -> Vec<&str> {
        thread_local! {
            static RE: fancy_regex::Regex = fancy_regex::Regex::new(PATTERN).unwrap();
        }
        RE.with(|re| re.find_iter(text).map(|m| m.unwrap().as_str()).collect())
    }

    #[track_caller]
    fn same(text: &str) {
        assert_eq!(
            pieces(text).collect::<Vec<_>>(),
            reference_pieces(text),
            "pieces of {text:?}"
        );
        assert_eq!(encode(text), reference(text), "tokens of {text:?}");
        assert_eq!(count(text), reference(text).len(), "count of {text:?}");
    }

    #[test]
    fn each_alternative_of_the_pattern_matches_tiktoken() {
        for t in [
            "",
            "a",
            "Hello, world!",
            "don't I'LL we've THEY'RE she'd 'S 'ſ 'm 'x 'sam",
            "'ſam x'ſt 'Ll 'lL 'vE 'Re 'ſſ",
            "'",
            "''",
            "12345 1 22 333 4444 ²³ ½ Ⅻ ٣٤٥",
            "  !!  ?? (x) [y] ...\n\n\r\n",
            "trailing spaces   ",
            "a  b   c\t\td \t\n e\n\n\nf",
            "\n",
            " \n \n x",
            "\u{a0}word \u{3000}語 \u{85}x",
            "e\u{301}te\u{301} naïve",
            "今日はピアノの練習をしました。 Привет, арпеджио... 🎹🎶",
            "ii–V–I in B♭; tempo=92bpm (metronome).",
            "\r\r\r",
            "tab\tthen\u{b}vt\u{c}ff",
            "K\u{212a}elvin 'K",
        ] {
            same(t);
        }
    }

    #[test]
    fn long_pieces_merge_like_tiktoken() {
        for t in [
            "a".repeat(1000),
            " ".repeat(5000),
            "!".repeat(700),
            "ab".repeat(400),
            "語".repeat(300),
            "\n".repeat(300) + "x",
            "x".repeat(130) + "y" + &"x".repeat(130),
        ] {
            same(&t);
        }
        // A pasted sequence: 100 KB of letters without a space is one piece.
        let mut seed = 7u32;
        let dna: String = (0..100_000)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                b"ACGTacgtNn"[(seed >> 16) as usize % 10] as char
            })
            .collect();
        assert_eq!(count(&dna), reference(&dna).len());
        assert_eq!(token_ends(&dna).len(), reference(&dna).len());
    }

    #[test]
    fn a_megabyte_of_spaces_then_a_letter_is_counted_where_tiktoken_panics() {
        // tiktoken-rs 0.12.1 and Python tiktoken panic on it (issue 34, item 10). The pieces are
        // the run of spaces less one, then " a" (cl100k's `\s+(?!\S)`), counted apart.
        let spaces = 1 << 20;
        let text = " ".repeat(spaces) + "a";
        let n = count(&text);
        assert_eq!(n, count(&" ".repeat(spaces - 1)) + count(" a"));
        assert!(n > 0 && n < spaces / 8, "{n}");
    }

    #[test]
    fn random_text_from_the_hard_characters_matches_tiktoken() {
        let alphabet: Vec<char> = "aZsdmtlvreSDLL'’ \t\r\n\u{b}\u{a0}\u{85}\u{3000}0123²½Ⅻ.,!?-–—()[]{}\"#$%&*+/:;<=>@\\^_`|~éèü\u{301}\u{308}ſK語日本Приветعربيةהעברית🎹🎶👍🏽\u{200d}\u{feff}"
            .chars()
            .collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let t: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            same(&t);
        }
    }

    #[test]
    fn the_table_is_tiktokens_token_for_token() {
        let bpe = tiktoken_rs::cl100k_base_singleton();
        let ranks = ranks();
        assert_eq!(ranks.short.len() + ranks.long.len(), 100_256);
        for rank in 0..100_256u32 {
            let bytes = bpe.decode_bytes(&[rank]).unwrap();
            assert_eq!(ranks.get(&bytes), Some(rank), "{bytes:?}");
        }
    }

    #[test]
    fn packed_keys_are_the_bytes_and_their_length() {
        let bytes: Vec<u8> = (1..=15).collect();
        for n in 0..16 {
            let mut buf = [0u8; 16];
            buf[..n].copy_from_slice(&bytes[..n]);
            buf[15] = n as u8;
            assert_eq!(pack(&bytes[..n]), u128::from_le_bytes(buf), "{n} bytes");
        }
    }

    #[test]
    fn token_ends_cover_the_text() {
        let t = "Übung: Tonleitern — langsam!!! 今日は 🎹\n\n";
        let ends = token_ends(t);
        assert_eq!(ends.last(), Some(&t.len()));
        assert!(ends.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ends.len(), reference(t).len());
        let joined: String = pieces(t).collect();
        assert_eq!(joined, t);
    }
}
