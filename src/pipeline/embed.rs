//! The sync lane's embed step: a batch's chunks packed into requests within the provider's
//! limits, sent concurrently through the [`Caller`](crate::embed::caller::Caller), each vector
//! checked; a request the provider rejects as invalid is split until the bad input is alone.
//!
//! Why in the pipeline and not in `embed/`: it keeps what it paid for (vectors of long sources
//! go to [`super::paid`] as soon as their request returns) and it meters tokens per batch; the
//! provider side knows neither.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use sqlx::PgPool;

use crate::config::Settings;
use crate::embed::EmbedError;
use crate::embed::caller::Caller;
use crate::embed::plan::{plan_requests, request_cap_tokens};
use crate::meter::Stats;
use crate::source::EmbedSource;

use super::chunk::Chunk;

/// One input to embed: which source and chunk it belongs to.
pub(super) struct Input<'a> {
    pub(super) source: EmbedSource,
    pub(super) chunk: &'a Chunk,
    /// The source has several chunks: keep the vector as soon as it is paid for.
    pub(super) keep_paid: bool,
}

/// What the embed step uses of the pipeline.
pub(super) struct Step<'p> {
    pub(super) caller: &'p Caller,
    pub(super) pool: &'p PgPool,
    pub(super) settings: &'p Settings,
    pub(super) stats: &'p Stats,
}

/// A checked vector for (source, chunk index).
pub(super) type Embedded = Vec<((EmbedSource, usize), pgvector::Vector)>;

/// Embeds `inputs`. Returns the checked vectors and the sources that failed, with the first
/// error of each.
pub(super) async fn embed_all(
    p: &Step<'_>,
    inputs: &[Input<'_>],
) -> (Embedded, HashMap<EmbedSource, EmbedError>) {
    let s = p.settings;
    // Identical chunks (a paragraph pasted twice, the same template text) are sent once: the
    // content hash covers model, dimensions and text, so their vectors are the same.
    let mut first_of: HashMap<&str, usize> = HashMap::new();
    let mut unique: Vec<&Input> = Vec::new();
    let mut copies: HashMap<usize, Vec<&Input>> = HashMap::new();
    for i in inputs {
        match first_of.get(i.chunk.content_hash.as_str()) {
            Some(&u) => copies.entry(u).or_default().push(i),
            None => {
                first_of.insert(&i.chunk.content_hash, unique.len());
                unique.push(i);
            }
        }
    }
    let plan = plan_requests(
        unique
            .iter()
            .map(|i| request_cap_tokens(&i.chunk.text, i.chunk.tokens)),
        s.api.max_inputs_per_request,
        p.caller
            .max_request_tokens()
            .map_or(s.api.max_tokens_per_request, |b| {
                (b as usize).min(s.api.max_tokens_per_request)
            }),
    );
    let request_results = futures::future::join_all(
        plan.iter()
            .map(|range| isolating(p, unique[range.clone()].to_vec())),
    )
    .await;
    let mut vectors = Vec::new();
    let mut failures: HashMap<EmbedSource, EmbedError> = HashMap::new();
    for (range, res) in plan.iter().zip(request_results) {
        for (u, r) in range.clone().zip(res) {
            let same: Vec<&Input> = std::iter::once(unique[u])
                .chain(copies.remove(&u).into_iter().flatten())
                .collect();
            let checked =
                r.and_then(
                    |v| match crate::embed::check_vector(&v, s.model.dimensions) {
                        Ok(()) => Ok(v),
                        Err(why) => Err(EmbedError::BadVector {
                            message: format!("chunk {}: {why}", unique[u].chunk.index),
                        }),
                    },
                );
            match checked {
                Ok(v) => {
                    for i in &same[1..] {
                        vectors
                            .push(((i.source, i.chunk.index), pgvector::Vector::from(v.clone())));
                    }
                    // Moved, not copied: this Vec is what the write encodes.
                    vectors.push((
                        (same[0].source, same[0].chunk.index),
                        pgvector::Vector::from(v),
                    ));
                }
                // Only these sources fail; their batch-mates are written.
                Err(e) => {
                    for i in same {
                        failures.entry(i.source).or_insert_with(|| e.clone());
                    }
                }
            }
        }
    }
    (vectors, failures)
}

/// Embeds `inputs` in one request; when the provider rejects the request as invalid, splits
/// it in halves until the bad input is alone, so the good inputs are still embedded.
fn isolating<'a>(
    p: &'a Step<'a>,
    inputs: Vec<&'a Input<'a>>,
) -> futures::future::BoxFuture<'a, Vec<Result<Vec<f32>, EmbedError>>> {
    Box::pin(async move {
        let texts: Vec<&str> = inputs.iter().map(|i| i.chunk.text.as_str()).collect();
        let cap_tokens = inputs
            .iter()
            .map(|i| request_cap_tokens(&i.chunk.text, i.chunk.tokens))
            .sum();
        let model = p.settings.model.name.clone();
        let tokens = inputs.iter().map(|i| i.chunk.tokens).sum();
        match p.caller.send(&texts, cap_tokens, tokens).await {
            Ok(done) => {
                let to_keep: Vec<(&str, &[f32], usize)> = inputs
                    .iter()
                    .zip(&done.vectors)
                    .filter(|(i, v)| {
                        i.keep_paid
                            && crate::embed::check_vector(v, p.settings.model.dimensions).is_ok()
                    })
                    .map(|(i, v)| (i.chunk.content_hash.as_str(), v.as_slice(), i.chunk.tokens))
                    .collect();
                if let Err(e) = super::paid::put(p.pool, &model, &to_keep).await {
                    tracing::warn!(error = %e, "could not keep paid-for chunks of a long source");
                }
                p.stats
                    .tokens_embedded
                    .fetch_add(done.prompt_tokens, Ordering::Relaxed);
                crate::meter::tokens_embedded(
                    &model,
                    done.prompt_tokens,
                    p.settings.model.usd_per_million_tokens,
                );
                done.vectors.into_iter().map(Ok).collect()
            }
            Err(EmbedError::InvalidInput { .. }) if inputs.len() > 1 => {
                let right = inputs[inputs.len() / 2..].to_vec();
                let left = inputs[..inputs.len() / 2].to_vec();
                let (mut a, b) = futures::join!(isolating(p, left), isolating(p, right));
                a.extend(b);
                a
            }
            Err(e) => {
                tracing::warn!(class = e.class(), error = %e, inputs = inputs.len(), "embedding request failed");
                inputs.iter().map(|_| Err(e.clone())).collect()
            }
        }
    })
}
