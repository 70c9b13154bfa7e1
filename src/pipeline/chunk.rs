//! Tokenize and split: rendered text → chunks that each fit the model's input limit.
//!
//! Why here and why this way: the provider rejects an input over its limit (8,191 tokens for
//! OpenAI's embedding models) and silently truncating would store a vector for text nobody can
//! see. So every text is counted with the model's tokenizer (`cl100k_base` for ada-002 and
//! text-embedding-3-*), and a text over the limit is split with `text-splitter` at semantic
//! boundaries (paragraphs, sentences, words), with overlap, into chunks that are each checked
//! against the limit. The same counts become `token_count` and the cost metrics.

use sha2::{Digest, Sha256};
use text_splitter::{ChunkConfig, TextSplitter};
use tiktoken_rs::CoreBPE;

/// The tokenizer of OpenAI's embedding models.
pub fn cl100k() -> &'static CoreBPE {
    tiktoken_rs::cl100k_base_singleton()
}

pub fn count_tokens(text: &str) -> usize {
    cl100k().encode_ordinary(text).len()
}

/// One piece of a source's text, ready to embed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub index: usize,
    pub text: String,
    pub tokens: usize,
    pub content_hash: String,
}

/// The tokenizer that counts and splits: the model's own.
#[derive(Clone)]
pub enum Sizer {
    /// OpenAI's embedding models (ada-002, text-embedding-3-*).
    Cl100k,
    /// A Hugging Face tokenizer (the local model); counts include [CLS] and [SEP].
    HuggingFace(std::sync::Arc<tokenizers::Tokenizer>),
}

impl Sizer {
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

/// Splits `text` into chunks of at most `max_tokens` tokens with `overlap` tokens of overlap.
pub struct Chunker {
    max_tokens: usize,
    sizer: Sizer,
    splitter: TextSplitter<Sizer>,
}

impl Chunker {
    /// A chunker counting with cl100k_base (OpenAI's embedding models).
    pub fn new(max_tokens: usize, overlap: usize) -> anyhow::Result<Self> {
        Self::with_sizer(Sizer::Cl100k, max_tokens, overlap)
    }

    pub fn with_sizer(sizer: Sizer, max_tokens: usize, overlap: usize) -> anyhow::Result<Self> {
        let config = ChunkConfig::new(max_tokens)
            .with_overlap(overlap)?
            .with_trim(true)
            .with_sizer(sizer.clone());
        Ok(Chunker {
            max_tokens,
            sizer,
            splitter: TextSplitter::new(config),
        })
    }

    /// The chunker for the configured model: its tokenizer and input limit.
    pub fn for_model(model: &crate::config::ModelSettings) -> anyhow::Result<Self> {
        let sizer = match model.provider.as_str() {
            #[cfg(feature = "local")]
            "local" => Sizer::HuggingFace(std::sync::Arc::new(crate::local::load_tokenizer(
                std::path::Path::new(&model.local_path),
            )?)),
            _ => Sizer::Cl100k,
        };
        Self::with_sizer(sizer, model.max_input_tokens, model.chunk_overlap_tokens)
    }

    /// Chunks of `text`, hashed for `model`/`dimensions`. Empty or whitespace-only text gives none.
    pub fn chunks(&self, text: &str, model: &str, dimensions: usize) -> Vec<Chunk> {
        if text.trim().is_empty() {
            return Vec::new();
        }
        let whole = self.sizer.count(text);
        let pieces: Vec<(String, usize)> = if whole <= self.max_tokens {
            vec![(text.to_string(), whole)]
        } else {
            self.splitter
                .chunks(text)
                .map(|c| (c.to_string(), self.sizer.count(c)))
                .collect()
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

/// What the provider's per-request token cap is charged for an input: OpenAI estimates about
/// 0.25 token per UTF-8 byte when enforcing it, so budget by the larger of that and the real count.
pub fn request_budget_tokens(text: &str, tokens: usize) -> usize {
    tokens.max(text.len().div_ceil(4))
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

    #[test]
    fn budget_uses_the_byte_estimate_when_larger() {
        assert_eq!(request_budget_tokens("abcd", 10), 10);
        let cjk = "音".repeat(100); // 300 bytes
        assert_eq!(request_budget_tokens(&cjk, 50), 75);
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
