//! Guards: what may stop API calls, and what `/readyz` says about it.
//!
//! Why together: the monthly [`budget`], an exhausted quota and a refused key all stop the same
//! thing — calls to the provider — while queueing goes on; [`health`] holds that stop (with the
//! one probe request after it expires) next to the other readiness facts, so an operator reads
//! every reason in one line.

pub mod budget;
pub(crate) mod gate;
pub mod health;
