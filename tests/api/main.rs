//! The integration tests, in one binary (it links once instead of eleven times, which matters
//! on 2 cores). Each module is one area; `helpers` is the shared harness: one fresh database per
//! test on the dev server `scripts/db` starts, the fake provider, worker processes.

mod helpers;

mod adopt;
mod bulk;
mod config;
mod demo;
mod deploy;
mod freshness;
mod hostile;
mod house;
mod index;
mod lifecycle;
mod local_model;
mod managed;
mod operate;
mod pipeline;
mod prometheus;
mod provider;
mod queue;
mod replica;
mod resilience;
mod schema;
mod search;
mod security;
mod shutdown;
