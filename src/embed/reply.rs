//! Reply: what a provider's answer means to the worker — one vector per input and the billed
//! tokens ([`Embedded`]), or an [`EmbedError`] classified by what to do next — and whether a
//! vector may be stored ([`check_vector`]).
//!
//! Why apart: every provider and the caller speak these terms, so they depend on this module
//! and it depends on none of them.

use std::time::Duration;

/// Why a request failed, by what the worker should do about it. Fields carry the provider's
/// HTTP status and message as received (secrets masked by [`EmbedError::redacted`]).
#[derive(Debug, Clone, thiserror::Error)]
#[allow(missing_docs)]
pub enum EmbedError {
    /// 429 rate limit: wait (`retry_after` when the provider said), never a job's attempt.
    #[error("rate limited by the provider: {message}")]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// 429 `insufficient_quota`: stop calling until an operator acts.
    #[error("provider quota exhausted: {message}")]
    QuotaExhausted { message: String },
    /// 401/403: the key is wrong, revoked or lacks access. Every request would fail the same
    /// way, so calls stop (like `insufficient_quota`) instead of burning the queue's attempts.
    #[error("provider refused the API key (HTTP {status}): {message}")]
    Unauthorized { status: u16, message: String },
    /// 408, 409, 5xx, timeouts, connection errors: retry with backoff. `unconfirmed`: the
    /// request may have reached the provider and been billed (a timeout or a reset after it was
    /// sent), so the budget counts it as spent.
    #[error("transient provider error{}: {message}", status_text(*status))]
    Transient {
        status: Option<u16>,
        message: String,
        unconfirmed: bool,
    },
    /// 400-class input errors: the input itself is bad; isolate it.
    #[error("invalid input (HTTP {status}): {message}")]
    InvalidInput { status: u16, message: String },
    /// The provider answered, but one vector is unusable (NaN, infinite, all zeros): that
    /// source fails permanently; the other inputs of the request are kept.
    #[error("unusable vector from the provider: {message}")]
    BadVector { message: String },
    /// This worker stopped calling the API (quota exhausted earlier, a refused key, or the
    /// monthly budget).
    #[error("API calls stopped: {reason}")]
    Stopped { reason: String },
    /// Anything else (404, a malformed answer): not fixed by retrying the same request.
    #[error("provider error{}: {message}", status_text(*status))]
    Fatal {
        status: Option<u16>,
        message: String,
    },
}

fn status_text(status: Option<u16>) -> String {
    status.map(|s| format!(" (HTTP {s})")).unwrap_or_default()
}

impl EmbedError {
    /// Whether retrying the same request may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            EmbedError::RateLimited { .. } | EmbedError::Transient { .. }
        )
    }
    /// A short label for metrics and job results.
    pub fn class(&self) -> &'static str {
        match self {
            EmbedError::RateLimited { .. } => "rate_limited",
            EmbedError::QuotaExhausted { .. } => "quota_exhausted",
            EmbedError::Unauthorized { .. } => "unauthorized",
            EmbedError::Transient { .. } => "transient",
            EmbedError::InvalidInput { .. } => "invalid_input",
            EmbedError::BadVector { .. } => "bad_vector",
            EmbedError::Stopped { .. } => "stopped",
            EmbedError::Fatal { .. } => "fatal",
        }
    }
    /// The HTTP status behind the error, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            EmbedError::RateLimited { .. } | EmbedError::QuotaExhausted { .. } => Some(429),
            EmbedError::Transient { status, .. } | EmbedError::Fatal { status, .. } => *status,
            EmbedError::InvalidInput { status, .. } | EmbedError::Unauthorized { status, .. } => {
                Some(*status)
            }
            EmbedError::Stopped { .. } | EmbedError::BadVector { .. } => None,
        }
    }
    /// Whether the provider may have billed the request although no answer arrived.
    pub fn may_have_been_billed(&self) -> bool {
        matches!(
            self,
            EmbedError::Transient {
                unconfirmed: true,
                ..
            }
        )
    }
    /// The same error with any secret the provider echoed (the key itself, or anything that
    /// looks like one) masked, before it reaches a log line, a metric or a stored job reason.
    pub fn redacted(self, key: Option<&str>) -> Self {
        let r = |m: String| crate::redact::secrets(&m, key);
        match self {
            EmbedError::RateLimited {
                retry_after,
                message,
            } => EmbedError::RateLimited {
                retry_after,
                message: r(message),
            },
            EmbedError::QuotaExhausted { message } => EmbedError::QuotaExhausted {
                message: r(message),
            },
            EmbedError::Unauthorized { status, message } => EmbedError::Unauthorized {
                status,
                message: r(message),
            },
            EmbedError::Transient {
                status,
                message,
                unconfirmed,
            } => EmbedError::Transient {
                status,
                message: r(message),
                unconfirmed,
            },
            EmbedError::InvalidInput { status, message } => EmbedError::InvalidInput {
                status,
                message: r(message),
            },
            EmbedError::BadVector { message } => EmbedError::BadVector {
                message: r(message),
            },
            EmbedError::Stopped { reason } => EmbedError::Stopped { reason: r(reason) },
            EmbedError::Fatal { status, message } => EmbedError::Fatal {
                status,
                message: r(message),
            },
        }
    }
}

/// Why a vector cannot be stored: wrong length, a NaN or infinite component, or no direction
/// (norm 0, so cosine distance is undefined). pgvector rejects NaN and infinity, and one such
/// vector used to roll back its whole batch's write.
pub fn check_vector(v: &[f32], dimensions: usize) -> Result<(), String> {
    if v.len() != dimensions {
        return Err(format!("{} dimensions, expected {dimensions}", v.len()));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(format!("component {i} is {}", v[i]));
    }
    let norm2: f64 = v.iter().map(|x| (*x as f64) * (*x as f64)).sum();
    if norm2 <= f64::MIN_POSITIVE || !norm2.is_finite() {
        return Err("zero vector (norm 0): cosine distance is undefined".into());
    }
    Ok(())
}

/// What a request returned: one vector per input, in input order, and the billed tokens.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// One vector per input, in input order.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the provider billed.
    pub prompt_tokens: u64,
}

/// What an HTTP status (and OpenAI error code) means for the worker.
pub fn classify_status(
    status: u16,
    code: Option<&str>,
    message: String,
    retry_after: Option<Duration>,
) -> EmbedError {
    match status {
        429 if code == Some("insufficient_quota") => EmbedError::QuotaExhausted { message },
        429 => EmbedError::RateLimited {
            retry_after,
            message,
        },
        408 | 409 | 500..=599 => EmbedError::Transient {
            status: Some(status),
            message,
            // A 5xx may come from a proxy after the provider did the work.
            unconfirmed: status >= 500,
        },
        400 | 413 | 422 => EmbedError::InvalidInput { status, message },
        401 | 403 => EmbedError::Unauthorized { status, message },
        _ => EmbedError::Fatal {
            status: Some(status),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert!(matches!(
            classify_status(429, Some("insufficient_quota"), "".into(), None),
            EmbedError::QuotaExhausted { .. }
        ));
        assert!(matches!(
            classify_status(429, None, "".into(), None),
            EmbedError::RateLimited { .. }
        ));
        assert!(classify_status(503, None, "".into(), None).is_retryable());
        assert!(classify_status(408, None, "".into(), None).is_retryable());
        assert!(matches!(
            classify_status(400, None, "".into(), None),
            EmbedError::InvalidInput { .. }
        ));
        assert!(!classify_status(401, None, "".into(), None).is_retryable());
        assert!(matches!(
            classify_status(403, None, "".into(), None),
            EmbedError::Unauthorized { status: 403, .. }
        ));
    }

    #[test]
    fn errors_print_the_status_as_a_number_and_mask_echoed_keys() {
        let e = classify_status(404, None, "no such model".into(), None);
        assert_eq!(e.to_string(), "provider error (HTTP 404): no such model");
        let e = classify_status(
            401,
            Some("invalid_api_key"),
            "Incorrect API key provided: sk-live-abcdefghijklmnop1234.".into(),
            None,
        )
        .redacted(Some("sk-live-abcdefghijklmnop1234"));
        assert!(!e.to_string().contains("abcdefghijklmnop"), "{e}");
        assert!(e.to_string().contains("HTTP 401"), "{e}");
    }

    #[test]
    fn vectors_are_checked_before_the_write() {
        assert!(check_vector(&[0.6, 0.8], 2).is_ok());
        assert!(
            check_vector(&[0.6, 0.8, 0.0], 2)
                .unwrap_err()
                .contains("3 dimensions")
        );
        assert!(
            check_vector(&[f32::NAN, 1.0], 2)
                .unwrap_err()
                .contains("NaN")
        );
        assert!(
            check_vector(&[f32::INFINITY, 1.0], 2)
                .unwrap_err()
                .contains("inf")
        );
        assert!(
            check_vector(&[0.0, 0.0], 2)
                .unwrap_err()
                .contains("zero vector")
        );
    }
}
