#![warn(missing_docs, unreachable_pub)]
//! embed-worker: keeps `rag_embeddings` (pgvector) in step with an application's text.
//!
//! # Layout
//!
//! One job, from claim to ack, one stage per place:
//!
//! | stage | where | may touch |
//! | --- | --- | --- |
//! | job: claim, payload, how it ends | [`worker`] (apalis), [`job`], [`source`] | `apalis.jobs` through apalis |
//! | batch: gather jobs | `pipeline::batcher` | memory only |
//! | start: clear the dedup key | [`queue`] | `apalis.jobs` (our columns, never waiting on a row lock) |
//! | prepare: load, render | [`pipeline::load`] | `sessions`, `question_templates` (read) |
//! | prepare: tokenize/split | [`pipeline::chunk`] | the tokenizer thread |
//! | prepare: skip what is paid for | `pipeline::paid` | `rag_embeddings` (read), `embed_worker.chunk_stage` |
//! | embed: pack, call, rate-limit | `pipeline::embed` → `embed::caller` → `embed::ratelimit`, [`guard`] → [`embed::openai`] / [`embed::local`] | the provider, `embed_worker.spend` |
//! | finish: write | [`pipeline::write`] | `rag_embeddings` (the only writer) |
//! | ack: release, back off, kill; the batch lane's ends | [`job::settle`], [`job::JobError::report`], [`job::end_unacked`] | `apalis.jobs` (through [`queue`]) |
//! | bulk lane in batch mode: submit, poll, collect | [`bulk`] (the same prepare and write steps; the Batch API instead of the embed step) | `apalis.jobs` (`<queue>.batch`), `embed_worker.batches`, the provider's files and batches |
//!
//! [`pipeline::Pipeline`] runs them as one sequence of public steps: `prepare → embed →
//! finish`. Every statement on `apalis.jobs` is in [`queue`]. Around them: [`config`] (typed
//! settings, each section's ranges beside it), [`db`] (connect, migrate), [`verify`],
//! [`model_index`] (one HNSW index per model, deferred builds), [`freshness`] (what is stale),
//! [`search`], [`meter`] and [`http`] (metrics, probes), [`telemetry`], [`redact`] (secrets never
//! leave), [`seed`] (the demo's data). The command line is the
//! binary's `cli` module; the fake provider is the `testing` feature's `fake_openai`.

pub mod bulk;
pub mod config;
pub mod db;
pub mod embed;
#[cfg(feature = "testing")]
pub mod fake_openai;
pub mod freshness;
pub mod guard;
pub mod http;
pub mod job;
pub mod meter;
pub mod model_index;
pub mod pipeline;
pub mod queue;
pub mod redact;
pub mod replica;
pub mod search;
pub mod seed;
pub mod source;
pub mod telemetry;
pub mod verify;
pub mod worker;

/// Installs rustls' ring crypto provider (once). sqlx already uses ring; choosing it for the
/// HTTP client too avoids building a second provider (aws-lc) on small build machines.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
