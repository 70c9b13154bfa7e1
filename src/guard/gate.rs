//! Gate: whether this process may call the provider right now.
//!
//! Why apart from readiness: it is a circuit breaker with its own protocol. A guard that finds
//! every request would fail alike (an exhausted quota, a refused key, the monthly budget)
//! closes it until a recheck time; when that passes, exactly one request goes out as the probe
//! while the others stay stopped; the probe's answer reopens the gate, closes it again, or —
//! on a transient error — lets the next request probe. Readiness reports a closed gate.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The API gate of one process.
#[derive(Debug, Default)]
pub struct ApiGate {
    /// Why calls are stopped, until when, and whether the probe after that is out.
    stopped: Mutex<Option<(String, Instant, bool)>>,
}

impl ApiGate {
    /// Stops calls until `until`, for `reason`.
    pub fn stop(&self, reason: String, until: Instant) {
        crate::meter::api_stopped(true);
        *self.stopped.lock().unwrap() = Some((reason, until, false));
    }

    /// Calls may go out again.
    pub fn resume(&self) {
        crate::meter::api_stopped(false);
        *self.stopped.lock().unwrap() = None;
    }

    /// Why calls are stopped, if they are and the stop has not yet expired (or its probe
    /// request is out).
    pub fn stopped(&self) -> Option<String> {
        let g = self.stopped.lock().unwrap();
        match &*g {
            Some((reason, until, probing)) if *probing || *until > Instant::now() => {
                Some(reason.clone())
            }
            _ => None,
        }
    }

    /// Like [`ApiGate::stopped`], but when the stop has expired the first caller gets
    /// `Ok(true)` and becomes the one probe request; the others stay stopped until it answers
    /// ([`ApiGate::resume`], a new [`ApiGate::stop`], or [`ApiGate::end_probe`]).
    /// `Ok(false)`: no stop at all.
    pub fn claim(&self) -> Result<bool, String> {
        let mut g = self.stopped.lock().unwrap();
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
        if let Some((_, _, probing)) = &mut *self.stopped.lock().unwrap() {
            *probing = false;
        }
    }

    /// How long the current stop has left (zero once expired); `None` when not stopped.
    pub fn remaining(&self) -> Option<Duration> {
        self.stopped
            .lock()
            .unwrap()
            .as_ref()
            .map(|(_, until, _)| until.saturating_duration_since(Instant::now()))
    }

    /// Whether a stop is recorded, including an expired one awaiting its probe request.
    pub fn is_recorded(&self) -> bool {
        self.stopped.lock().unwrap().is_some()
    }

    /// The stop's reason for readiness, expired or not.
    pub fn reason(&self) -> Option<String> {
        self.stopped
            .lock()
            .unwrap()
            .as_ref()
            .map(|(r, _, _)| r.clone())
    }
}
