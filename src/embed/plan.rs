//! Plan: which inputs go together in one request, and how long to back off between tries.
//!
//! Why apart from the caller: packing is pure arithmetic over the provider's limits (≤ 2,048
//! inputs, ≤ 300,000 budgeted tokens a request), testable without a provider or a database.

/// Exponential backoff with full jitter: uniform in [0, min(cap, base · 2^attempt)].
pub(crate) fn full_jitter(base_ms: u64, cap_ms: u64, attempt: u32) -> std::time::Duration {
    let ceiling = base_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(cap_ms)
        .max(1);
    std::time::Duration::from_millis(rand::random_range(0..=ceiling))
}

/// What the provider's per-request token cap is charged for an input: OpenAI estimates about
/// 0.25 token per UTF-8 byte when enforcing it, so a request is packed by the larger of that and
/// the real count.
pub(crate) fn request_cap_tokens(text: &str, tokens: usize) -> usize {
    tokens.max(text.len().div_ceil(4))
}

/// Packs inputs (given by their [`request_cap_tokens`]) into consecutive ranges, each at most
/// `max_inputs` long and `max_tokens` in total. An input is never split across requests.
pub(crate) fn plan_requests(
    cap_tokens: impl IntoIterator<Item = usize>,
    max_inputs: usize,
    max_tokens: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut tokens = 0;
    let mut i = 0;
    for b in cap_tokens {
        if i > start && (i - start == max_inputs || tokens + b > max_tokens) {
            ranges.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += b;
        i += 1;
    }
    if i > start {
        ranges.push(start..i);
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::{plan_requests, request_cap_tokens};

    #[test]
    fn the_cap_uses_the_byte_estimate_when_larger() {
        assert_eq!(request_cap_tokens("abcd", 10), 10);
        let cjk = "音".repeat(100); // 300 bytes
        assert_eq!(request_cap_tokens(&cjk, 50), 75);
    }

    #[test]
    fn requests_respect_input_and_token_caps() {
        assert_eq!(
            plan_requests(vec![1; 5000], 2048, 300_000),
            vec![0..2048, 2048..4096, 4096..5000]
        );
        assert_eq!(
            plan_requests(vec![8000; 80], 2048, 300_000),
            vec![0..37, 37..74, 74..80]
        );
        assert_eq!(
            plan_requests(Vec::<usize>::new(), 2048, 300_000),
            Vec::<std::ops::Range<usize>>::new()
        );
        for r in plan_requests((0..3000).map(|i| (i * 37) % 8000), 2048, 300_000) {
            assert!(r.len() <= 2048);
            let sum: usize = r.clone().map(|i| (i * 37) % 8000).sum();
            assert!(sum <= 300_000);
        }
    }
}
