//! Caller: one embeddings request through every guard, with the worker's retry policy.
//!
//! Why one place: the order matters and is easy to get wrong — an API stop (quota, a refused
//! key, the budget) is checked first, then a request slot, then the monthly budget reserves the
//! cost, then the rate limiter admits the request; after the answer the budget settles to what
//! was billed and the limiter learns from it. A 429 waits and never counts; a transient error
//! backs off with full jitter; `insufficient_quota` or a refused key stops all calls until one
//! probe after the recheck interval. The pipeline only sees an [`Embedded`] or an [`EmbedError`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::Semaphore;

use super::plan::full_jitter;
use super::provider::Embedder;
use super::ratelimit::RateLimiter;
use super::reply::{EmbedError, Embedded};
use crate::config::Settings;
use crate::guard::health::Health;
use crate::meter::Stats;

/// Sends requests for one process: what every request shares (the provider, its limits, the
/// guards and the counters).
pub(crate) struct Caller {
    settings: Arc<Settings>,
    embedder: Embedder,
    /// Requests in flight at once (`batch.max_in_flight`).
    api_slots: Semaphore,
    limiter: RateLimiter,
    budget: crate::guard::budget::Budget,
    health: Arc<Health>,
    stats: Arc<Stats>,
}

impl Caller {
    /// A caller for `embedder` under `settings`' limits; an in-process model gets no rate limit.
    pub(crate) fn new(
        pool: sqlx::PgPool,
        settings: Arc<Settings>,
        embedder: Embedder,
        health: Arc<Health>,
        stats: Arc<Stats>,
    ) -> Caller {
        let limits = if embedder.is_remote() {
            settings.rate_limit.clone()
        } else {
            crate::config::RateLimitSettings {
                requests_per_minute: 0,
                tokens_per_minute: 0,
                ..settings.rate_limit.clone()
            }
        };
        let limiter = RateLimiter::new(
            &limits,
            settings.api.max_tokens_per_request as u32,
            embedder.headers_handle(),
            if embedder.is_remote() {
                settings.batch.max_in_flight
            } else {
                0
            },
        );
        let budget = crate::guard::budget::Budget::new(
            pool,
            &settings.model.name,
            settings.model.usd_per_million_tokens,
        );
        Caller {
            api_slots: Semaphore::new(settings.batch.max_in_flight),
            settings,
            embedder,
            limiter,
            budget,
            health,
            stats,
        }
    }

    /// The monthly budget guard of the sync lane (the batch lane prices its own from it).
    pub(crate) fn budget(&self) -> &crate::guard::budget::Budget {
        &self.budget
    }

    /// The largest request (in budgeted tokens) the rate limiter can ever admit.
    pub(crate) fn max_request_tokens(&self) -> Option<u32> {
        self.limiter.max_request_tokens()
    }

    /// Stops API calls at the monthly budget (readiness says why) and returns the error for
    /// the jobs of the request that found it.
    fn stop_at_budget(&self, decision: &crate::guard::budget::Decision) -> EmbedError {
        let reason = match decision {
            crate::guard::budget::Decision::Exceeded { spent, budget } => {
                format!("monthly budget reached: ${spent:.4} spent of ${budget:.4}")
            }
            crate::guard::budget::Decision::Reserved => "monthly budget reached".to_string(),
        };
        let until = std::time::Instant::now()
            + std::time::Duration::from_secs(self.settings.budget.recheck_secs);
        if !self.health.api.is_recorded() {
            tracing::error!(%reason, "budget guard: API calls stopped, readiness false; queueing continues");
        }
        self.health.api.stop(reason.clone(), until);
        EmbedError::Stopped { reason }
    }

    /// One request through the budget guard and the rate limiter, with retries: a 429 waits
    /// (never counts), a transient error backs off with full jitter up to
    /// `retry.request_retries` times, `insufficient_quota` stops API calls for
    /// `retry.quota_recheck_secs`, the monthly budget stops them for `budget.recheck_secs`.
    /// `cap_tokens`: tokens as the provider's per-request cap counts them (the larger of the
    /// real count and 0.25 per byte; requests were planned under that cap); `tokens`: the real
    /// count, which is what is billed and what the tokens-per-minute limit is charged (charging
    /// the estimate left part of the quota unused: docs/decisions.md); a provider that counts its
    /// quota otherwise is followed through its `x-ratelimit-remaining-tokens`.
    pub(crate) async fn send(
        &self,
        texts: &[&str],
        cap_tokens: usize,
        tokens: usize,
    ) -> Result<Embedded, EmbedError> {
        let r = &self.settings.retry;
        let model = self.settings.model.name.clone();
        let mut transient_failures = 0u32;
        let mut probe;
        loop {
            if let Some(reason) = self.health.api.stopped() {
                return Err(EmbedError::Stopped { reason });
            }
            let result = {
                // A request slot first, then the budget and the limiter: spend and tokens are
                // accounted when the request is sent.
                let _slot = self.api_slots.acquire().await.expect("semaphore open");
                // After a stop has expired exactly one request goes out as the probe.
                probe = match self.health.api.claim() {
                    Ok(probe) => probe,
                    Err(reason) => return Err(EmbedError::Stopped { reason }),
                };
                let reservation = match self.budget.reserve(tokens as u64).await {
                    Ok((crate::guard::budget::Decision::Reserved, r)) => r,
                    Ok((exceeded, _)) => return Err(self.stop_at_budget(&exceeded)),
                    Err(e) => {
                        if probe {
                            self.health.api.end_probe();
                        }
                        return Err(EmbedError::Transient {
                            status: None,
                            message: format!("budget check failed: {e}"),
                            unconfirmed: false,
                        });
                    }
                };
                let permit = self.limiter.acquire(tokens as u32).await;
                tracing::debug!(waited = ?permit.waited, cap_tokens, inputs = texts.len(), "rate limiter admitted a request");
                self.stats.api_requests.fetch_add(1, Ordering::Relaxed);
                let started = std::time::Instant::now();
                // Owned copies only for the request in flight (the chunks keep the originals).
                let res = self
                    .embedder
                    .embed(texts.iter().map(|t| t.to_string()).collect())
                    .await;
                let sent_at = permit.sent_at;
                match &res {
                    Ok(_) => self.limiter.accepted(sent_at),
                    Err(EmbedError::RateLimited { retry_after, .. }) => self.limiter.refused(
                        retry_after.unwrap_or(std::time::Duration::from_secs(1)),
                        sent_at,
                    ),
                    Err(_) => {}
                }
                drop(permit);
                let (outcome, status) = match &res {
                    Ok(_) => ("ok", Some(200)),
                    Err(e) => (e.class(), e.status()),
                };
                crate::meter::api_request(
                    &model,
                    outcome,
                    status,
                    started.elapsed(),
                    texts.len(),
                    cap_tokens,
                );
                if let Some(reservation) = reservation {
                    // What the provider billed; a request that may have reached it without an
                    // answer (timeout, reset) counts as spent at the reserved estimate.
                    let billed = match &res {
                        Ok(d) => Some(d.prompt_tokens),
                        Err(e) if e.may_have_been_billed() => None,
                        Err(_) => Some(0),
                    };
                    if let Ok(d) = &res {
                        self.budget.observe_billing(tokens as u64, d.prompt_tokens);
                    }
                    match self.budget.settle(reservation, billed).await {
                        Ok(crate::guard::budget::Decision::Reserved) => {}
                        Ok(exceeded) => {
                            // Billed more than reserved (another tokenizer): stop now, so the
                            // month goes over by at most the requests already in flight.
                            let _ = self.stop_at_budget(&exceeded);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not settle the budget reservation")
                        }
                    }
                }
                res
            };
            if probe
                && !matches!(
                    result,
                    Ok(_)
                        | Err(EmbedError::QuotaExhausted { .. })
                        | Err(EmbedError::Unauthorized { .. })
                )
            {
                self.health.api.end_probe();
            }
            match result {
                Ok(done) => {
                    // Only the probe's answer reopens the gate: a request admitted before a stop
                    // (or the one whose settlement just stopped at the budget) must not undo it.
                    if probe && self.health.api.is_recorded() {
                        tracing::info!("API calls resumed");
                        self.health.api.resume();
                    }
                    return Ok(done);
                }
                Err(EmbedError::RateLimited {
                    retry_after,
                    message,
                }) => {
                    let wait = retry_after.unwrap_or(std::time::Duration::from_secs(1));
                    self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(?wait, spacing = ?self.limiter.interval(), %message,
                        "429 from the provider: pausing, then pacing requests");
                }
                Err(EmbedError::QuotaExhausted { message }) => {
                    let until = std::time::Instant::now()
                        + std::time::Duration::from_secs(r.quota_recheck_secs);
                    tracing::error!(%message, recheck_secs = r.quota_recheck_secs,
                        "provider quota exhausted (insufficient_quota): API calls stopped, readiness false");
                    self.health
                        .api
                        .stop(format!("insufficient_quota: {message}"), until);
                    return Err(EmbedError::QuotaExhausted { message });
                }
                Err(EmbedError::Unauthorized { status, message }) => {
                    // A revoked or wrong key fails every request alike: stop calling rather than
                    // turn the whole queue into dead letters; one probe after the recheck.
                    let until = std::time::Instant::now()
                        + std::time::Duration::from_secs(r.quota_recheck_secs);
                    tracing::error!(status, %message, recheck_secs = r.quota_recheck_secs,
                        "provider refused the API key: API calls stopped, readiness false; check OPENAI_API_KEY / OPENAI_API_KEY_FILE");
                    self.health.api.stop(
                        format!("provider refused the API key (HTTP {status}): {message}; check OPENAI_API_KEY / OPENAI_API_KEY_FILE"),
                        until,
                    );
                    return Err(EmbedError::Unauthorized { status, message });
                }
                Err(e) if e.is_retryable() && transient_failures < r.request_retries => {
                    transient_failures += 1;
                    let wait = full_jitter(r.base_ms, r.cap_ms, transient_failures);
                    tracing::warn!(error = %e, attempt = transient_failures, ?wait, "transient API error: retrying");
                    tokio::time::sleep(wait).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
