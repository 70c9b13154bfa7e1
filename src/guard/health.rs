//! Health: what `/healthz` and `/readyz` report, shared by every part of the worker.
//!
//! Why one struct: readiness is the sum of facts owned by different stages (the database
//! answers, the process is not shutting down, the `ApiGate` is open),
//! and an operator at 3 a.m. wants the reason in one line, not a bare 503.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Default)]
/// What readiness is made of.
pub struct Health {
    shutting_down: AtomicBool,
    db_down: Mutex<Option<String>>,
    models: Mutex<Option<String>>,
    idle: Mutex<Option<String>>,
    /// Whether API calls may go out (quota, a refused key, the budget).
    pub api: super::gate::ApiGate,
}

impl Health {
    /// Shutdown has begun.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun (no restarts, readiness false).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// The database is unreachable (`Some(error)`) or back (`None`).
    pub fn set_db(&self, error: Option<String>) {
        *self.db_down.lock().unwrap() = error;
    }

    /// The serving and writing models, in words (sampled by `run`).
    pub fn set_models(&self, line: Option<String>) {
        *self.models.lock().unwrap() = line;
    }

    /// This worker takes no job, and why (`Some`), or takes them again (`None`). Returns whether
    /// that changed, so the caller logs the change once.
    pub fn set_idle(&self, why: Option<String>) -> bool {
        let mut idle = self.idle.lock().unwrap();
        let changed = *idle != why;
        *idle = why;
        changed
    }

    /// Whether this worker takes no job now ([`Health::set_idle`]).
    pub fn is_idle(&self) -> bool {
        self.idle.lock().unwrap().is_some()
    }

    /// What `/readyz` adds below its verdict: the serving and writing models.
    pub fn detail(&self) -> Option<String> {
        self.models.lock().unwrap().clone()
    }

    /// `Ok` when ready; otherwise every reason it is not.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        if self.shutting_down.load(Ordering::SeqCst) {
            why.push("shutting down".to_string());
        }
        if let Some(e) = &*self.db_down.lock().unwrap() {
            why.push(format!("database unreachable: {e}"));
        }
        if let Some(idle) = self.idle.lock().unwrap().clone() {
            why.push(format!("not taking jobs: {idle}"));
        }
        if let Some(reason) = self.api.reason() {
            why.push(format!("API calls stopped: {reason}"));
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }
}
