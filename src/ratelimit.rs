//! Rate-limit: requests- and tokens-per-minute, before every API request.
//!
//! Why three layers:
//! 1. governor (GCRA) on requests and on tokens — the worker knows each request's tokens before
//!    sending it — keeps this process at the configured rate. The token bucket's burst is the
//!    largest request, never a whole minute, so a cold start does not dump a minute's quota at once.
//! 2. The provider's `x-ratelimit-remaining-*` / `-reset-*` headers: several pods share one
//!    organisation quota and only the provider sees all of them, so when it says fewer tokens or
//!    requests remain than the next request needs, wait for the reset instead of earning a 429.
//! 3. A 429 pauses every request of this process until its `retry-after(-ms)`.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota};

use crate::config::RateLimitSettings;
use crate::embed::RateLimitHeaders;

pub struct RateLimiter {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
    token_burst: u32,
    paused_until: Mutex<Option<Instant>>,
    headers: Arc<Mutex<RateLimitHeaders>>,
    /// Requests admitted recently: (when, tokens). The provider's headers lag behind requests
    /// still in flight, so what was sent after the headers were seen is subtracted from them.
    admitted: Mutex<std::collections::VecDeque<(Instant, u64)>>,
    /// Requests admitted and not yet answered: (when, tokens) by permit id. Those admitted before
    /// the headers were seen may not be counted in them either.
    in_flight: Mutex<std::collections::HashMap<u64, (Instant, u64)>>,
    next_id: std::sync::atomic::AtomicU64,
    period: Duration,
}

/// Held while a request is in flight; dropping it marks the request answered.
pub struct Permit<'a> {
    limiter: &'a RateLimiter,
    id: u64,
    pub waited: Duration,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.limiter.in_flight.lock().unwrap().remove(&self.id);
    }
}

fn quota(per_period: u32, period: Duration, burst: u32) -> Option<Quota> {
    let n = NonZeroU32::new(per_period)?;
    let replenish = period / n.get();
    Some(
        Quota::with_period(replenish.max(Duration::from_nanos(1)))?
            .allow_burst(NonZeroU32::new(burst.max(1))?),
    )
}

impl RateLimiter {
    /// `max_request_tokens`: the largest request the pipeline will send (the token burst).
    pub fn new(
        cfg: &RateLimitSettings,
        max_request_tokens: u32,
        headers: Arc<Mutex<RateLimitHeaders>>,
    ) -> RateLimiter {
        let period = Duration::from_secs(cfg.period_secs.max(1));
        let token_burst = max_request_tokens.min(cfg.tokens_per_minute.max(1));
        // A small request burst (a tenth of the rate, at least one) smooths the start likewise.
        let request_burst = (cfg.requests_per_minute / 10).max(1);
        RateLimiter {
            requests: quota(cfg.requests_per_minute, period, request_burst)
                .map(DefaultDirectRateLimiter::direct),
            tokens: quota(cfg.tokens_per_minute, period, token_burst)
                .map(DefaultDirectRateLimiter::direct),
            token_burst,
            paused_until: Mutex::new(None),
            headers,
            admitted: Mutex::new(std::collections::VecDeque::new()),
            in_flight: Mutex::new(std::collections::HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
            period,
        }
    }

    /// The largest request (in budgeted tokens) this limiter can ever admit.
    pub fn max_request_tokens(&self) -> Option<u32> {
        self.tokens.as_ref().map(|_| self.token_burst)
    }

    /// Waits until a request of `tokens` may be sent; hold the permit until it is answered.
    pub async fn acquire(&self, tokens: u32) -> Permit<'_> {
        let start = Instant::now();
        loop {
            let pause = *self.paused_until.lock().unwrap();
            match pause {
                Some(until) if until > Instant::now() => {
                    tokio::time::sleep_until(until.into()).await
                }
                _ => break,
            }
        }
        if let Some(r) = &self.requests {
            r.until_ready().await;
        }
        if let Some(t) = &self.tokens {
            let n = NonZeroU32::new(tokens.clamp(1, self.token_burst)).unwrap();
            // Cannot fail: n ≤ burst.
            let _ = t.until_n_ready(n).await;
        }
        // The provider's view of the shared quota, less what this process sent since.
        loop {
            let now = Instant::now();
            let wait = {
                let mut h = self.headers.lock().unwrap().clone();
                let mut log = self.admitted.lock().unwrap();
                while log
                    .front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > self.period)
                {
                    log.pop_front();
                }
                if let Some(seen) = h.seen_at {
                    let mut unseen: Vec<u64> = log
                        .iter()
                        .filter(|(t, _)| *t > seen)
                        .map(|(_, n)| *n)
                        .collect();
                    unseen.extend(
                        self.in_flight
                            .lock()
                            .unwrap()
                            .values()
                            .filter(|(t, _)| *t <= seen)
                            .map(|(_, n)| *n),
                    );
                    h.remaining_requests = h
                        .remaining_requests
                        .map(|r| r.saturating_sub(unseen.len() as u64));
                    h.remaining_tokens = h
                        .remaining_tokens
                        .map(|r| r.saturating_sub(unseen.iter().sum()));
                }
                provider_wait(&h, tokens as u64, now)
            };
            match wait {
                Some(w) => {
                    crate::meter::provider_wait();
                    tokio::time::sleep(w).await;
                }
                None => break,
            }
        }
        let now = Instant::now();
        self.admitted
            .lock()
            .unwrap()
            .push_back((now, tokens as u64));
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.in_flight
            .lock()
            .unwrap()
            .insert(id, (now, tokens as u64));
        let waited = start.elapsed();
        crate::meter::limiter_wait(waited);
        Permit {
            limiter: self,
            id,
            waited,
        }
    }

    /// After a 429: no request from this process before `after` from now.
    pub fn pause_for(&self, after: Duration) {
        let until = Instant::now() + after;
        let mut p = self.paused_until.lock().unwrap();
        if p.is_none_or(|cur| cur < until) {
            *p = Some(until);
        }
    }
}

/// How long to wait, per the provider's last headers, before sending `tokens` more.
/// `reset` is the time until the limit is back to its initial state (OpenAI's meaning); with the
/// limit known, the provider replenishes continuously, so only the missing share is waited for.
pub fn provider_wait(h: &RateLimitHeaders, tokens: u64, now: Instant) -> Option<Duration> {
    let seen = h.seen_at?;
    let wait_for = |remaining: Option<u64>,
                    limit: Option<u64>,
                    need: u64,
                    reset: Option<Duration>|
     -> Option<Duration> {
        let (rem, reset) = (remaining?, reset?);
        if rem >= need {
            return None;
        }
        let full = match limit {
            Some(l) if l > rem => reset.mul_f64(((need - rem) as f64 / (l - rem) as f64).min(1.0)),
            _ => reset,
        };
        let until = seen + full;
        (until > now).then(|| until - now)
    };
    let a = wait_for(h.remaining_requests, h.limit_requests, 1, h.reset_requests);
    let b = wait_for(h.remaining_tokens, h.limit_tokens, tokens, h.reset_tokens);
    a.max(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_the_provider_reset_when_too_little_remains() {
        let now = Instant::now();
        let h = RateLimitHeaders {
            limit_requests: None,
            limit_tokens: None,
            remaining_requests: Some(10),
            remaining_tokens: Some(100),
            reset_requests: Some(Duration::from_secs(1)),
            reset_tokens: Some(Duration::from_secs(3)),
            seen_at: Some(now),
        };
        assert_eq!(provider_wait(&h, 50, now), None);
        assert_eq!(provider_wait(&h, 500, now), Some(Duration::from_secs(3)));
        let later = now + Duration::from_secs(4);
        assert_eq!(provider_wait(&h, 500, later), None, "reset already passed");
        // With the limit known, only the missing share of the reset is waited for.
        let h = RateLimitHeaders {
            limit_tokens: Some(1100),
            ..h
        };
        assert_eq!(
            provider_wait(&h, 600, now),
            Some(Duration::from_millis(1500))
        );
    }

    #[tokio::test]
    async fn token_bucket_paces_requests() {
        let cfg = RateLimitSettings {
            requests_per_minute: 0,
            tokens_per_minute: 6000,
            period_secs: 1,
        };
        let rl = RateLimiter::new(
            &cfg,
            1000,
            Arc::new(Mutex::new(RateLimitHeaders::default())),
        );
        let start = Instant::now();
        for _ in 0..4 {
            drop(rl.acquire(1000).await);
        }
        // Burst 1,000 then 6,000 tokens/s: 3 more × 1,000 tokens ≈ 0.5 s.
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took < Duration::from_millis(1500),
            "{took:?}"
        );
    }
}
