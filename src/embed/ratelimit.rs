//! Rate-limit: requests- and tokens-per-minute, before every API request.
//!
//! Why three layers:
//! 1. governor (GCRA) on requests and on tokens — the worker knows each request's tokens before
//!    sending it — keeps this process at the configured rate. The token bucket's burst is the
//!    largest request, never a whole minute, so a cold start does not dump a minute's quota at once.
//!    The first answer's `x-ratelimit-limit-requests/-tokens` add a second pair at the provider's
//!    stated rates (never above the configured ones; requests evenly spaced, at 98% of the
//!    limit for arrival jitter): a provider that enforces "60 a minute" as one a second is paced
//!    at that from its first answer, with no 429 to learn from, and the slow-start window opens.
//! 2. The provider's `x-ratelimit-remaining-*` / `-reset-*` headers: several pods share one
//!    organisation quota and only the provider sees all of them, so when it says fewer tokens or
//!    requests remain than the next request needs, wait for the reset instead of earning a 429.
//! 3. A 429 pauses every request of this process until its `retry-after(-ms)`; then sending
//!    resumes at what the provider was seen to accept, like TCP's congestion control: one
//!    request in flight (slow start, +1 per answer), at most one request per Retry-After
//!    interval. The spacing shrinks by a sixteenth after every 16 accepted requests (a probe),
//!    never back to a spacing that drew a 429 until 128 more were accepted; a 429 right after a
//!    probe returns to the spacing before it, any other doubles it (once per round of requests).
//!    Why: providers quantise their headers (one that enforces 1 request/second says "60 per
//!    minute, 59 remaining"), so layer 2 lets a burst through; resuming everything at once
//!    after the pause drew a storm of 429s (docs/decisions.md), and probing by an eighth every
//!    8 requests drew one 429 in 5 at a 1 request/second provider (BENCHMARKS.md).

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota};

use crate::config::RateLimitSettings;

/// The provider's view of the shared quota, from the last successful response's headers.
#[derive(Debug, Clone, Default)]
pub struct RateLimitHeaders {
    /// `x-ratelimit-limit-requests`.
    pub limit_requests: Option<u64>,
    /// `x-ratelimit-limit-tokens`.
    pub limit_tokens: Option<u64>,
    /// `x-ratelimit-remaining-requests`.
    pub remaining_requests: Option<u64>,
    /// `x-ratelimit-remaining-tokens`.
    pub remaining_tokens: Option<u64>,
    /// `x-ratelimit-reset-requests`.
    pub reset_requests: Option<Duration>,
    /// `x-ratelimit-reset-tokens`.
    pub reset_tokens: Option<Duration>,
    /// When these headers arrived.
    pub seen_at: Option<Instant>,
}

/// This process's limiter: governor, provider headers, pacing after 429s.
pub(crate) struct RateLimiter {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
    token_burst: u32,
    /// Limiters at the provider's stated limits, from the first answer that states them.
    stated: std::sync::OnceLock<Stated>,
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
    /// The configured requests and tokens per period (0: none): the stated limits' ceiling.
    configured: (u32, u32),
    /// Pacing learnt from 429s (layer 3); `None` for an in-process model.
    adaptive: Option<Mutex<Adaptive>>,
    /// Woken when a request is answered (the slow-start window may have room).
    answered: tokio::sync::Notify,
    /// Requests past the window (being admitted or in flight), for the slow-start window.
    outstanding: std::sync::atomic::AtomicUsize,
}

/// The provider's stated limits as limiters (`None`: not stated, or not below the configured).
struct Stated {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
}

/// Accepted requests between two probes of a shorter spacing.
const PROBE_EVERY: u32 = 16;
/// Accepted requests after which a spacing that drew a 429 may be probed again.
const FORGET_REFUSAL_AFTER: u32 = 128;

/// One request's place in the slow-start window, from admission until its answer.
struct Slot<'a>(&'a RateLimiter);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0
            .outstanding
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        self.0.answered.notify_waiters();
    }
}

/// What the provider was seen to accept.
#[derive(Debug)]
struct Adaptive {
    /// Requests allowed in flight at once: 1 at the start and after a 429, +1 per accepted
    /// request, up to `max_window`.
    window: usize,
    max_window: usize,
    /// Minimum spacing between sends, learnt from the Retry-After of a 429; `None` until a
    /// request was refused (and again once the spacing has shrunk below 10 ms).
    interval: Option<Duration>,
    next_send: Instant,
    accepted_streak: u32,
    /// The spacing before the last probe, while no 16 requests have been accepted since it.
    before_probe: Option<Duration>,
    /// The spacing a 429 last came at, and requests accepted since: probes stop above it.
    refused_at: Option<(Duration, u32)>,
    /// When the last accepted request was sent: a 429's Retry-After counts from it, which
    /// gives the spacing the provider wants.
    last_accepted: Option<Instant>,
    /// The last decrease: a 429 for a request sent before it belongs to the same round.
    decreased_at: Option<Instant>,
}

/// Held while a request is in flight; dropping it marks the request answered.
pub(crate) struct Permit<'a> {
    limiter: &'a RateLimiter,
    _slot: Option<Slot<'a>>,
    id: u64,
    /// How long the request waited for admission.
    pub waited: Duration,
    /// When the request was let go (a 429 for it is judged against the last decrease).
    pub sent_at: Instant,
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
    /// `max_request_tokens`: the largest request the pipeline will send (the token burst);
    /// `max_in_flight`: requests at once, the most the slow-start window opens to (0: a local
    /// model, no provider to learn from).
    pub(crate) fn new(
        cfg: &RateLimitSettings,
        max_request_tokens: u32,
        headers: Arc<Mutex<RateLimitHeaders>>,
        max_in_flight: usize,
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
            stated: std::sync::OnceLock::new(),
            configured: (cfg.requests_per_minute, cfg.tokens_per_minute),
            paused_until: Mutex::new(None),
            headers,
            admitted: Mutex::new(std::collections::VecDeque::new()),
            in_flight: Mutex::new(std::collections::HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
            period,
            adaptive: (max_in_flight > 0).then(|| {
                Mutex::new(Adaptive {
                    window: 1,
                    max_window: max_in_flight,
                    interval: None,
                    next_send: Instant::now(),
                    accepted_streak: 0,
                    before_probe: None,
                    refused_at: None,
                    last_accepted: None,
                    decreased_at: None,
                })
            }),
            answered: tokio::sync::Notify::new(),
            outstanding: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Once the provider has stated its limits: limiters at them (within the configured ones),
    /// and, unless a 429 has taught a spacing already, the slow-start window fully open.
    fn learn_stated(&self) {
        if self.stated.get().is_some() {
            return;
        }
        let (limit_requests, limit_tokens) = {
            let h = self.headers.lock().unwrap();
            (h.limit_requests, h.limit_tokens)
        };
        if limit_requests.is_none() && limit_tokens.is_none() {
            return;
        }
        let within = |stated: Option<u64>, configured: u32| -> Option<u32> {
            let stated = u32::try_from(stated?).unwrap_or(u32::MAX);
            Some(match configured {
                0 => stated,
                c => stated.min(c),
            })
        };
        let requests = within(limit_requests, self.configured.0).and_then(|n| {
            // Evenly spaced, a little under the limit: arrival jitter must not make two
            // requests look closer than the provider's spacing.
            let paced = ((n as f64 * 0.98).floor() as u32).max(1);
            quota(paced, self.period, 1).map(DefaultDirectRateLimiter::direct)
        });
        let tokens = within(limit_tokens, self.configured.1).and_then(|n| {
            quota(n, self.period, self.token_burst.min(n).max(1))
                .map(DefaultDirectRateLimiter::direct)
        });
        // What was sent in the period so far counts against the new buckets: the request
        // whose answer stated the limits was sent just now.
        let sent: Vec<u64> = {
            let now = Instant::now();
            let log = self.admitted.lock().unwrap();
            log.iter()
                .filter(|(t, _)| now.duration_since(*t) <= self.period)
                .map(|(_, n)| *n)
                .collect()
        };
        if let Some(r) = &requests
            && !sent.is_empty()
        {
            let _ = r.check();
        }
        if let Some(t) = &tokens {
            let burst = self
                .token_burst
                .min(limit_tokens.unwrap_or(0) as u32)
                .max(1);
            let used = sent.iter().sum::<u64>().min(burst as u64) as u32;
            if let Some(n) = NonZeroU32::new(used) {
                let _ = t.check_n(n);
            }
        }
        let learnt = Stated { requests, tokens };
        if self.stated.set(learnt).is_ok() {
            tracing::info!(
                requests_per_period = limit_requests,
                tokens_per_period = limit_tokens,
                period_secs = self.period.as_secs(),
                "pacing at the provider's stated limits (x-ratelimit-limit-*)"
            );
            if let Some(adaptive) = &self.adaptive {
                let mut a = adaptive.lock().unwrap();
                if a.interval.is_none() {
                    a.window = a.max_window;
                }
            }
            self.answered.notify_waiters();
        }
    }

    /// Waits for room in the slow-start window and for the learnt spacing; claims the slot.
    async fn adaptive_turn(&self) -> Option<Slot<'_>> {
        let adaptive = self.adaptive.as_ref()?;
        loop {
            let answered = self.answered.notified();
            let wait = {
                let mut a = adaptive.lock().unwrap();
                let now = Instant::now();
                let outstanding = self.outstanding.load(std::sync::atomic::Ordering::SeqCst);
                if outstanding >= a.window {
                    None // wait for an answer
                } else if a.interval.is_some() && a.next_send > now {
                    Some(a.next_send - now)
                } else {
                    if let Some(i) = a.interval {
                        a.next_send = now + i;
                    }
                    self.outstanding
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    return Some(Slot(self));
                }
            };
            match wait {
                Some(w) => tokio::time::sleep(w).await,
                None => answered.await,
            }
        }
    }

    /// The provider accepted a request sent at `sent_at`: open the window; every
    /// [`PROBE_EVERY`] in a row, probe a spacing a sixteenth shorter (not one refused lately).
    pub(crate) fn accepted(&self, sent_at: Instant) {
        if let Some(adaptive) = &self.adaptive {
            let mut a = adaptive.lock().unwrap();
            a.last_accepted = a.last_accepted.max(Some(sent_at));
            a.accepted_streak += 1;
            // +1 per two answers: a provider that takes one request at a time then draws one
            // 429 (the second request, sent alone), not two sent together.
            if a.accepted_streak % 2 == 0 || a.window >= 2 {
                a.window = (a.window + 1).min(a.max_window);
            }
            if let Some((_, since)) = &mut a.refused_at {
                *since += 1;
            }
            if a.accepted_streak % PROBE_EVERY == 0 {
                a.before_probe = None;
                if let Some(i) = a.interval {
                    let probe = i.mul_f64(1.0 - 1.0 / PROBE_EVERY as f64);
                    let refused_near = a
                        .refused_at
                        .is_some_and(|(r, since)| probe <= r && since < FORGET_REFUSAL_AFTER);
                    if !refused_near {
                        a.before_probe = Some(i);
                        a.interval = (probe >= Duration::from_millis(10)).then_some(probe);
                    }
                }
            }
        }
        self.answered.notify_waiters();
    }

    /// The largest request (in budgeted tokens) this limiter can ever admit.
    pub(crate) fn max_request_tokens(&self) -> Option<u32> {
        self.tokens.as_ref().map(|_| self.token_burst)
    }

    /// Waits until a request of `tokens` may be sent; hold the permit until it is answered.
    pub(crate) async fn acquire(&self, tokens: u32) -> Permit<'_> {
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
        let slot = self.adaptive_turn().await;
        // After the window's wait: the answer that opened it may have stated the limits.
        self.learn_stated();
        let stated = self.stated.get();
        for r in [
            self.requests.as_ref(),
            stated.and_then(|s| s.requests.as_ref()),
        ]
        .into_iter()
        .flatten()
        {
            r.until_ready().await;
        }
        let n = NonZeroU32::new(tokens.clamp(1, self.token_burst)).unwrap();
        for t in [self.tokens.as_ref(), stated.and_then(|s| s.tokens.as_ref())]
            .into_iter()
            .flatten()
        {
            // Cannot fail for the configured bucket (n ≤ its burst); the stated one's burst is
            // the same unless the stated limit is below one request (then sent alone, slowly).
            if t.until_n_ready(n).await.is_err() {
                tokio::time::sleep(self.period).await;
            }
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
            _slot: slot,
            id,
            waited,
            sent_at: now,
        }
    }

    /// After a 429 for a request sent at `sent_at`: no request from this process before
    /// `after` from now; then one at a time, spaced by at least `after` (twice the last spacing
    /// if this round had one already).
    pub(crate) fn refused(&self, after: Duration, sent_at: Instant) {
        let now = Instant::now();
        let until = now + after;
        {
            let mut p = self.paused_until.lock().unwrap();
            if p.is_none_or(|cur| cur < until) {
                *p = Some(until);
            }
        }
        if let Some(adaptive) = &self.adaptive {
            let mut a = adaptive.lock().unwrap();
            a.window = 1;
            a.accepted_streak = 0;
            // Requests already on their way when we slowed down say nothing new.
            // The provider would have taken this request `after` later: spaced from the last
            // accepted one by their gap plus that, and 2% for arrival jitter.
            let gap = a
                .last_accepted
                .filter(|t| *t < sent_at)
                .map(|t| sent_at.duration_since(t))
                .filter(|g| *g < Duration::from_secs(10))
                .unwrap_or_default();
            let floor = (gap + after).mul_f64(1.02).max(Duration::from_millis(10));
            if a.decreased_at.is_none_or(|d| sent_at >= d) {
                a.refused_at = Some((a.interval.unwrap_or_default(), 0));
                a.interval = Some(match (a.before_probe.take(), a.interval) {
                    // Refused right after a probe: the spacing before it was accepted.
                    (Some(before), _) => before.max(floor),
                    // The provider's spacing, where its answer says more than ours.
                    (None, Some(i)) if floor > i => floor,
                    (None, Some(i)) => i * 2,
                    (None, None) => floor,
                });
                a.decreased_at = Some(now);
            } else if a.interval.is_some_and(|i| floor > i) {
                // Another answer of the same round says the provider wants more room.
                a.interval = Some(floor);
            }
            a.next_send = a.next_send.max(until);
        }
    }

    /// The learnt spacing between requests, if a 429 taught one.
    pub(crate) fn interval(&self) -> Option<Duration> {
        self.adaptive
            .as_ref()
            .and_then(|a| a.lock().unwrap().interval)
    }
}

/// How long to wait, per the provider's last headers, before sending `tokens` more.
/// `reset` is the time until the limit is back to its initial state (OpenAI's meaning); with the
/// limit known, the provider replenishes continuously, so only the missing share is waited for.
pub(crate) fn provider_wait(h: &RateLimitHeaders, tokens: u64, now: Instant) -> Option<Duration> {
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

    /// A limiter of `tokens_per_minute` per `period_secs` (no request limit), requests of at most
    /// 1,000 tokens, `max_in_flight` (0: no slow start).
    fn limiter(tokens_per_minute: u32, period_secs: u64, max_in_flight: usize) -> RateLimiter {
        let cfg = RateLimitSettings {
            requests_per_minute: 0,
            tokens_per_minute,
            period_secs,
        };
        RateLimiter::new(
            &cfg,
            1000,
            Arc::new(Mutex::new(RateLimitHeaders::default())),
            max_in_flight,
        )
    }

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
    async fn after_a_429_requests_go_one_at_a_time_spaced_by_the_retry_after() {
        let rl = limiter(0, 60, 4);
        // Slow start: the second request waits for the first answer.
        let first = rl.acquire(1).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), rl.acquire(1))
                .await
                .is_err()
        );
        rl.accepted(first.sent_at);
        drop(first);
        // The window opens by one per two answers.
        let second = rl.acquire(1).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), rl.acquire(1))
                .await
                .is_err()
        );
        rl.accepted(second.sent_at);
        drop(second);
        let (a, b) = (rl.acquire(1).await, rl.acquire(1).await);
        // Both refused in the same round: the spacing is learnt once, not doubled twice.
        rl.refused(Duration::from_millis(200), a.sent_at);
        rl.refused(Duration::from_millis(200), b.sent_at);
        drop((a, b));
        // The Retry-After counted from the last accepted request (sent ~50 ms earlier: the
        // timeout above), +2%.
        let learnt = rl.interval().unwrap();
        assert!(
            learnt >= Duration::from_millis(255) && learnt < Duration::from_millis(350),
            "{learnt:?}"
        );
        let start = Instant::now();
        for _ in 0..3 {
            let p = rl.acquire(1).await;
            rl.accepted(p.sent_at);
            drop(p);
        }
        let took = start.elapsed();
        // The pause, then two more 200 ms gaps.
        assert!(took >= Duration::from_millis(580), "{took:?}");
        // A later 429 halves the rate.
        let p = rl.acquire(1).await;
        rl.refused(Duration::from_millis(50), p.sent_at);
        drop(p);
        // Spaced from the last accepted request by the gap plus the Retry-After.
        let later = rl.interval().unwrap();
        assert!(
            later > learnt + Duration::from_millis(40),
            "{later:?} after {learnt:?}"
        );
        // A 429 never shortens the spacing.
        let p = rl.acquire(1).await;
        rl.refused(Duration::ZERO, p.sent_at);
        drop(p);
        assert!(rl.interval().unwrap() >= later, "{:?}", rl.interval());
    }

    #[tokio::test]
    async fn probes_are_rare_and_a_refused_probe_returns_to_the_spacing_before_it() {
        let rl = limiter(0, 60, 4);
        let p = rl.acquire(1).await;
        rl.refused(Duration::from_millis(20), p.sent_at);
        drop(p);
        let learnt = rl.interval().unwrap();
        assert_eq!(learnt, Duration::from_millis(20).mul_f64(1.02));
        for n in 1..=PROBE_EVERY {
            let p = rl.acquire(1).await;
            rl.accepted(p.sent_at);
            drop(p);
            if n < PROBE_EVERY {
                assert_eq!(rl.interval(), Some(learnt), "no probe before {PROBE_EVERY}");
            }
        }
        let probe = rl.interval().unwrap();
        assert!(probe < learnt, "{probe:?} probes below {learnt:?}");
        // Refused right after the probe: back to the spacing before it, not twice it.
        let p = rl.acquire(1).await;
        rl.refused(Duration::ZERO, p.sent_at);
        drop(p);
        let back = rl.interval().unwrap();
        assert!(
            back >= learnt && back < learnt * 2,
            "{back:?} after {learnt:?}"
        );
        // And no probe at or below the refused spacing for a while.
        for _ in 0..PROBE_EVERY * 2 {
            let p = rl.acquire(1).await;
            rl.accepted(p.sent_at);
            drop(p);
            assert!(rl.interval().unwrap() > probe, "{:?}", rl.interval());
        }
    }

    #[tokio::test]
    async fn token_bucket_paces_requests() {
        let rl = limiter(6000, 1, 0);
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
