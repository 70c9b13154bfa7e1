//! Health: what `/healthz` and `/readyz` report, shared by every part of the worker.
//!
//! Why one struct: readiness is the sum of facts owned by different stages (the database
//! answers, the process is not shutting down, API calls are not stopped by quota or budget), and
//! an operator at 3 a.m. wants the reason in one line, not a bare 503.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Debug, Default)]
pub struct Health {
    shutting_down: AtomicBool,
    db_down: Mutex<Option<String>>,
    api_stopped: Mutex<Option<(String, Instant)>>,
}

impl Health {
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    pub fn set_db(&self, error: Option<String>) {
        *self.db_down.lock().unwrap() = error;
    }

    /// API calls stop (quota or budget) until `until`.
    pub fn stop_api(&self, reason: String, until: Instant) {
        crate::meter::api_stopped(true);
        *self.api_stopped.lock().unwrap() = Some((reason, until));
    }

    pub fn resume_api(&self) {
        crate::meter::api_stopped(false);
        *self.api_stopped.lock().unwrap() = None;
    }

    /// Why API calls are stopped, if they are and the stop has not yet expired.
    pub fn api_stopped(&self) -> Option<String> {
        let g = self.api_stopped.lock().unwrap();
        match &*g {
            Some((reason, until)) if *until > Instant::now() => Some(reason.clone()),
            _ => None,
        }
    }

    /// Whether API calls are stopped, including an expired stop awaiting its probe request.
    pub fn api_stop_recorded(&self) -> bool {
        self.api_stopped.lock().unwrap().is_some()
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
        if let Some((reason, _)) = &*self.api_stopped.lock().unwrap() {
            why.push(format!("API calls stopped: {reason}"));
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }
}
