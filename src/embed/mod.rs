//! Embed: the providers behind one interface, and what their answers mean to the worker.
//!
//! Why a folder: the worker talks to two kinds of provider — an OpenAI-compatible HTTP API
//! ([`openai`]) and the in-process model ([`local`]) — and both must answer in the same terms:
//! one vector per input plus the billed tokens ([`Embedded`]), or an [`EmbedError`] classified by
//! what the worker should do next. [`reply`] holds those terms and depends on no provider; the
//! providers depend on it, and [`provider`] picks the configured one. Around a provider:
//! `ratelimit` (requests and tokens per minute, the provider's headers, pacing after a 429),
//! `plan` (packing inputs into requests) and `caller` (one request through the guards, the
//! limiter and the retries). This file only declares and re-exports: no module here imports a
//! module that imports it back.

pub(crate) mod caller;
#[cfg(feature = "local")]
pub mod local;
pub mod openai;
pub(crate) mod plan;
pub mod provider;
pub(crate) mod ratelimit;
pub mod reply;

pub use openai::OpenAiEmbedder;
pub use provider::Embedder;
pub use reply::{EmbedError, Embedded, check_vector, classify_status};
