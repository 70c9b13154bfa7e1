//! Plan: which inputs go together in one request, and how long to back off between tries.
//!
//! Why apart from the caller: packing is pure arithmetic over the provider's limits (≤ 2,048
//! inputs, ≤ 300,000 budgeted tokens a request), testable without a provider or a database.

/// Exponential backoff with full jitter: uniform in [0, min(cap, base · 2^attempt)].
pub fn full_jitter(base_ms: u64, cap_ms: u64, attempt: u32) -> std::time::Duration {
    let ceiling = base_ms
        .saturating_mul(1u64 << attempt.min(20))
        .min(cap_ms)
        .max(1);
    std::time::Duration::from_millis(rand::random_range(0..=ceiling))
}

/// Packs inputs (given by their budgeted token counts) into consecutive ranges, each at most
/// `max_inputs` long and `max_tokens` in total. An input is never split across requests.
pub fn plan_requests(
    budgets: impl IntoIterator<Item = usize>,
    max_inputs: usize,
    max_tokens: usize,
) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut tokens = 0;
    let mut i = 0;
    for b in budgets {
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
    use super::plan_requests;

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
