//! embed-worker: keeps `rag_embeddings` (pgvector) in step with an application's text.
//!
//! Data flow, one module per stage:
//! job ([`queue`]) → batch ([`pipeline::batcher`]) → load ([`pipeline::load`]) →
//! tokenize/split ([`pipeline::chunk`]) → embed ([`embed`]) → write ([`pipeline::write`]) → ack.

pub mod config;
pub mod db;
pub mod embed;
pub mod fake_openai;
pub mod freshness;
pub mod guard;
pub mod http;
pub mod job;
pub mod meter;
pub mod models;
pub mod ops;
pub mod pipeline;
pub mod queue;
pub mod redact;
pub mod search;
pub mod seed;
pub mod source;
pub mod telemetry;
pub mod worker;

/// Installs rustls' ring crypto provider (once). sqlx already uses ring; choosing it for the
/// HTTP client too avoids building a second provider (aws-lc) on small build machines.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
