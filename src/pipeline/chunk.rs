//! Tokenize and split: rendered text → chunks that each fit the model's input limit.
//!
//! Why here and why this way: the provider rejects an input over its limit (8,191 tokens for
//! OpenAI's embedding models) and silently truncating would store a vector for text nobody can
//! see. So every text is counted with the model's tokenizer (`cl100k_base` for ada-002 and
//! text-embedding-3-*), and a text over the limit is split with `text-splitter` at semantic
//! boundaries (paragraphs, sentences, words), with overlap, into chunks that are each checked
//! against the limit. The same counts become `token_count` and the cost metrics. cl100k counts
//! come from [`super::cl100k`] (tiktoken's ranks and pattern without its regex engine).

use sha2::{Digest, Sha256};
use text_splitter::{ChunkConfig, TextSplitter};

use super::cl100k;

/// cl100k tokens of `text`.
pub fn count_tokens(text: &str) -> usize {
    cl100k::count(text)
}

/// One piece of a source's text, ready to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Position in the source.
    pub index: usize,
    /// The chunk's text.
    pub text: String,
    /// Its tokens, counted exactly.
    pub tokens: usize,
    /// sha256(model, dimensions, text).
    pub content_hash: String,
}

/// The tokenizer that counts and splits: the model's own.
#[derive(Clone)]
pub enum Sizer {
    /// OpenAI's embedding models (ada-002, text-embedding-3-*).
    Cl100k,
    /// A Hugging Face tokenizer (the local model); counts include `[CLS]` and `[SEP]`.
    HuggingFace(std::sync::Arc<tokenizers::Tokenizer>),
}

impl Sizer {
    /// Tokens of `text` in this tokenizer.
    pub fn count(&self, text: &str) -> usize {
        match self {
            Sizer::Cl100k => count_tokens(text),
            Sizer::HuggingFace(t) => t
                .encode_fast(text, true)
                .map(|e| e.len())
                .unwrap_or(usize::MAX),
        }
    }
}

impl text_splitter::ChunkSizer for Sizer {
    fn size(&self, chunk: &str) -> usize {
        self.count(chunk)
    }
}

/// Tokens the boundary-sized splitter keeps below the limit, for the two ends of a slice
/// tokenizing differently from the whole text.
const BOUNDARY_MARGIN: usize = 32;

/// Sizes slices of one text by its token boundaries: `ends[i]` is the byte offset where token
/// `i` ends. A slice's size is the number of tokens overlapping it.
struct Boundaries {
    base: usize,
    len: usize,
    ends: Vec<usize>,
}

impl text_splitter::ChunkSizer for Boundaries {
    fn size(&self, chunk: &str) -> usize {
        let start = chunk.as_ptr() as usize;
        if chunk.is_empty() {
            return 0;
        }
        if start < self.base || start + chunk.len() > self.base + self.len {
            // Not a slice of the text (the splitter never does this): count it.
            return count_tokens(chunk);
        }
        let (s, e) = (start - self.base, start - self.base + chunk.len());
        let first = self.ends.partition_point(|&x| x <= s);
        let last = self.ends.partition_point(|&x| x < e);
        last - first + 1
    }
}

/// Splits `text` into chunks of at most `max_tokens` tokens with `overlap` tokens of overlap.
pub struct Chunker {
    max_tokens: usize,
    overlap: usize,
    sizer: Sizer,
    splitter: TextSplitter<Sizer>,
}

impl Chunker {
    /// A chunker counting with cl100k_base (OpenAI's embedding models).
    pub fn new(max_tokens: usize, overlap: usize) -> anyhow::Result<Self> {
        Self::with_sizer(Sizer::Cl100k, max_tokens, overlap)
    }

    /// A chunker for `sizer` with chunks of at most `max_tokens`.
    pub fn with_sizer(sizer: Sizer, max_tokens: usize, overlap: usize) -> anyhow::Result<Self> {
        if matches!(sizer, Sizer::Cl100k) {
            cl100k::warm();
        }
        let config = ChunkConfig::new(max_tokens)
            .with_overlap(overlap)?
            .with_trim(true)
            .with_sizer(sizer.clone());
        Ok(Chunker {
            max_tokens,
            overlap,
            sizer,
            splitter: TextSplitter::new(config),
        })
    }

    /// The chunker for the configured model: its tokenizer and input limit.
    pub fn for_model(model: &crate::config::ModelSettings) -> anyhow::Result<Self> {
        let sizer = match model.provider {
            #[cfg(feature = "local")]
            crate::config::Provider::Local => Sizer::HuggingFace(std::sync::Arc::new(
                crate::embed::local::load_tokenizer(std::path::Path::new(&model.local_path))?,
            )),
            _ => Sizer::Cl100k,
        };
        Self::with_sizer(sizer, model.max_input_tokens, model.chunk_overlap_tokens)
    }

    /// Whether it counts with cl100k (OpenAI's embedding models), as stored `token_count`s of
    /// those models did.
    pub fn counts_cl100k(&self) -> bool {
        matches!(self.sizer, Sizer::Cl100k)
    }

    /// Splits with the exact sizer: every candidate the splitter weighs is tokenized again.
    fn split_exact(&self, text: &str) -> Vec<(String, usize)> {
        self.splitter
            .chunks(text)
            .map(|c| (c.to_string(), self.sizer.count(c)))
            .collect()
    }

    /// Splits a text already tokenized: the splitter's candidates are slices of `text`, so their
    /// size is read off the token boundaries (a binary search) instead of re-tokenizing each one —
    /// the splitter weighs many candidates per chunk, and exact sizing made the few texts over
    /// the limit the worker's largest CPU cost (docs/decisions.md). Re-tokenizing a
    /// slice can differ from the boundary count at its two ends, so the splitter aims a margin
    /// under the limit and every chunk is counted exactly; one still over is split exactly.
    fn split_by_boundaries(&self, text: &str) -> Vec<(String, usize)> {
        let ends = cl100k::token_ends(text);
        let margin = BOUNDARY_MARGIN.min(self.max_tokens / 4);
        let sizer = Boundaries {
            base: text.as_ptr() as usize,
            len: text.len(),
            ends,
        };
        let Ok(config) = ChunkConfig::new(self.max_tokens - margin)
            .with_overlap(self.overlap.min(self.max_tokens - margin - 1))
            .map(|c| c.with_trim(true).with_sizer(sizer))
        else {
            return self.split_exact(text);
        };
        let mut out = Vec::new();
        for c in TextSplitter::new(config).chunks(text) {
            let n = count_tokens(c);
            if n <= self.max_tokens {
                out.push((c.to_string(), n));
            } else {
                out.extend(self.split_exact(c));
            }
        }
        out
    }

    /// Chunks of `text`, hashed for `model`/`dimensions`. Empty or whitespace-only text gives none.
    pub fn chunks(&self, text: &str, model: &str, dimensions: usize) -> Vec<Chunk> {
        if text.trim().is_empty() {
            return Vec::new();
        }
        let pieces: Vec<(String, usize)> = match &self.sizer {
            Sizer::Cl100k => {
                let tokens = cl100k::count(text);
                if tokens <= self.max_tokens {
                    vec![(text.to_string(), tokens)]
                } else {
                    self.split_by_boundaries(text)
                }
            }
            Sizer::HuggingFace(_) => {
                let whole = self.sizer.count(text);
                if whole <= self.max_tokens {
                    vec![(text.to_string(), whole)]
                } else {
                    self.split_exact(text)
                }
            }
        };
        pieces
            .into_iter()
            .enumerate()
            .map(|(index, (text, tokens))| {
                debug_assert!(tokens <= self.max_tokens);
                Chunk {
                    index,
                    content_hash: content_hash(&text, model, dimensions),
                    text,
                    tokens,
                }
            })
            .collect()
    }
}

type ChunkTask = Box<dyn FnOnce(&Chunker) + Send>;

/// The chunker on its own OS thread, fed by a channel. Why: tokenizing is the worker's largest
/// CPU cost and it is synchronous. On the async threads it would stall I/O and heartbeats;
/// through `block_in_place` it hopped between threads, and tiktoken's regex caches are fastest
/// on the one thread that first used them (docs/decisions.md; cl100k counts no longer use a
/// regex, the local model's tokenizer still does). One thread tokenizes far more
/// text than the database can write vectors for.
pub struct ChunkerThread {
    tx: std::sync::mpsc::Sender<ChunkTask>,
}

impl ChunkerThread {
    /// Starts the thread.
    pub fn spawn(chunker: Chunker) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<ChunkTask>();
        std::thread::Builder::new()
            .name("tokenizer".into())
            .spawn(move || {
                for task in rx {
                    // A panic fails that one call (its reply is dropped), not the thread.
                    let _ =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| task(&chunker)));
                }
            })?;
        Ok(ChunkerThread { tx })
    }

    /// Runs `f` on the tokenizer thread and waits for its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Chunker) -> R + Send + 'static,
    ) -> anyhow::Result<R> {
        let (reply, result) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move |c| {
                let _ = reply.send(f(c));
            }))
            .map_err(|_| anyhow::anyhow!("the tokenizer thread has stopped"))?;
        result
            .await
            .map_err(|_| anyhow::anyhow!("tokenizing failed (the tokenizer panicked)"))
    }
}

/// sha256 of model, dimensions and text: the same chunk for the same model is never paid twice.
pub fn content_hash(text: &str, model: &str, dimensions: usize) -> String {
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update([0]);
    h.update(dimensions.to_string().as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_chunk_with_its_token_count() {
        let c = Chunker::new(8191, 200).unwrap();
        let chunks = c.chunks("How do I voice a minor ii-V-I?", "m", 3);
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            chunks[0].tokens,
            count_tokens("How do I voice a minor ii-V-I?")
        );
        assert!(chunks[0].tokens > 5);
    }

    #[test]
    fn long_text_splits_under_the_limit_without_losing_text() {
        let c = Chunker::new(100, 10).unwrap();
        let text = (0..400)
            .map(|i| format!("Sentence number {i} about scales."))
            .collect::<Vec<_>>()
            .join(" ");
        let chunks = c.chunks(&text, "m", 3);
        assert!(chunks.len() > 5, "{}", chunks.len());
        for ch in &chunks {
            assert!(
                ch.tokens <= 100,
                "chunk {} has {} tokens",
                ch.index,
                ch.tokens
            );
        }
        assert!(chunks.last().unwrap().text.contains("Sentence number 399"));
        assert!(chunks[0].text.starts_with("Sentence number 0"));
        let idx: Vec<usize> = chunks.iter().map(|c| c.index).collect();
        assert_eq!(idx, (0..chunks.len()).collect::<Vec<_>>());
    }

    #[test]
    fn boundary_split_matches_exact_counts_and_stays_under_the_limit() {
        // Mixed scripts, emoji and punctuation runs: where slicing a text tokenizes differently
        // from the whole, if anywhere.
        let para = "Übung: Tonleitern — langsam!!! 今日はピアノの練習をしました。 \
                    Привет, арпеджио... 🎹🎶 ii–V–I in B♭; tempo=92bpm (metronome).\n\n";
        let text = para.repeat(300);
        let c = Chunker::new(500, 50).unwrap();
        let chunks = c.chunks(&text, "m", 3);
        let exact = c.split_exact(&text);
        assert!(chunks.len() > 10, "{}", chunks.len());
        for ch in &chunks {
            assert_eq!(
                ch.tokens,
                count_tokens(&ch.text),
                "token_count is the exact count"
            );
            assert!(
                ch.tokens <= 500,
                "chunk {} has {} tokens",
                ch.index,
                ch.tokens
            );
        }
        assert!(text.starts_with(&chunks[0].text));
        assert!(text.trim_end().ends_with(&chunks.last().unwrap().text));
        // The margin (32 of 500 tokens here, 32 of 8,191 in production) costs few extra chunks.
        assert!(
            chunks.len() * 10 <= exact.len() * 12,
            "{} chunks vs {} exact",
            chunks.len(),
            exact.len()
        );
    }

    #[test]
    fn empty_text_has_no_chunks() {
        let c = Chunker::new(100, 10).unwrap();
        assert!(c.chunks("  \n\t ", "m", 3).is_empty());
    }

    #[test]
    fn hash_depends_on_model_and_dimensions() {
        assert_ne!(content_hash("a", "m1", 3), content_hash("a", "m2", 3));
        assert_ne!(content_hash("a", "m1", 3), content_hash("a", "m1", 4));
        assert_eq!(content_hash("a", "m1", 3), content_hash("a", "m1", 3));
    }
}

#[cfg(test)]
mod big_text {
    use super::*;

    /// A 10 MB transcript is chunked (no chunk over the limit, nothing lost at the ends).
    #[test]
    fn ten_megabyte_transcript_is_chunked() {
        let sentence = "The left hand keeps a steady walking bass while the right hand comps on two and four. ";
        let text = sentence.repeat(10 * 1024 * 1024 / sentence.len());
        let started = std::time::Instant::now();
        let chunks = Chunker::new(8191, 200).unwrap().chunks(&text, "m", 3);
        let took = started.elapsed();
        assert!(chunks.len() > 200, "{}", chunks.len());
        assert!(chunks.iter().all(|c| c.tokens <= 8191));
        let total: usize = chunks.iter().map(|c| c.text.len()).sum();
        assert!(
            total >= text.trim().len(),
            "overlap means at least the whole text is covered"
        );
        eprintln!("10 MB: {} chunks in {took:?}", chunks.len());
    }
}
