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
    /// Why API calls are stopped, until when, and whether the probe after that is out.
    api_stopped: Mutex<Option<(String, Instant, bool)>>,
}

impl Health {
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun (no restarts, readiness false).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    pub fn set_db(&self, error: Option<String>) {
        *self.db_down.lock().unwrap() = error;
    }

    /// API calls stop (quota or budget) until `until`.
    pub fn stop_api(&self, reason: String, until: Instant) {
        crate::meter::api_stopped(true);
        *self.api_stopped.lock().unwrap() = Some((reason, until, false));
    }

    pub fn resume_api(&self) {
        crate::meter::api_stopped(false);
        *self.api_stopped.lock().unwrap() = None;
    }

    /// Why API calls are stopped, if they are and the stop has not yet expired (or its probe
    /// request is out).
    pub fn api_stopped(&self) -> Option<String> {
        let g = self.api_stopped.lock().unwrap();
        match &*g {
            Some((reason, until, probing)) if *probing || *until > Instant::now() => {
                Some(reason.clone())
            }
            _ => None,
        }
    }

    /// Like [`Health::api_stopped`], but when the stop has expired the first caller gets
    /// `Ok(true)` and becomes the one probe request; the others stay stopped until it answers
    /// ([`Health::resume_api`], a new [`Health::stop_api`], or [`Health::end_probe`]).
    /// `Ok(false)`: no stop at all.
    pub fn claim_api(&self) -> Result<bool, String> {
        let mut g = self.api_stopped.lock().unwrap();
        match &mut *g {
            Some((reason, until, probing)) => {
                if *probing || *until > Instant::now() {
                    Err(reason.clone())
                } else {
                    *probing = true;
                    Ok(true)
                }
            }
            None => Ok(false),
        }
    }

    /// The probe ended without settling the stop (a transient error): the next request may
    /// probe again.
    pub fn end_probe(&self) {
        if let Some((_, _, probing)) = &mut *self.api_stopped.lock().unwrap() {
            *probing = false;
        }
    }

    /// How long the current stop has left (zero once expired); `None` when not stopped.
    pub fn api_stop_remaining(&self) -> Option<std::time::Duration> {
        self.api_stopped
            .lock()
            .unwrap()
            .as_ref()
            .map(|(_, until, _)| until.saturating_duration_since(Instant::now()))
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
        if let Some((reason, _, _)) = &*self.api_stopped.lock().unwrap() {
            why.push(format!("API calls stopped: {reason}"));
        }
        if why.is_empty() { Ok(()) } else { Err(why) }
    }
}
