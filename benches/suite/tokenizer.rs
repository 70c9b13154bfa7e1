//! Tokenizer throughput.

#[allow(unused_imports)]
use super::*;

/// (5) Tokenizer throughput on the corpus; returns CPU seconds to chunk the whole corpus.
pub(crate) fn bench_tokenizer(report: &mut Report, corpus: &[String]) -> f64 {
    let bytes: usize = corpus.iter().map(|t| t.len()).sum();
    let bpe = tiktoken_rs::cl100k_base_singleton();
    let started = Instant::now();
    let mut tokens = 0usize;
    for t in corpus {
        tokens += bpe.encode_ordinary(t).len();
    }
    let secs = started.elapsed().as_secs_f64();
    report.add(
        "tokenizer",
        "tiktoken-rs cl100k encode (1 thread)",
        format!("{:.2} MB/s", bytes as f64 / 1e6 / secs),
        "",
        None,
    );
    // The worker's count: the same ranks, the pattern without a regex engine. Same corpus, same
    // thread, right after; the totals must agree.
    embed_worker::pipeline::cl100k::warm();
    let started = Instant::now();
    let mut counted = 0usize;
    for t in corpus {
        counted += embed_worker::pipeline::cl100k::count(t);
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        counted, tokens,
        "the worker's cl100k count differs from tiktoken-rs's"
    );
    report.add(
        "tokenizer",
        "worker cl100k count (pipeline::cl100k, 1 thread)",
        format!("{:.2} MB/s", bytes as f64 / 1e6 / secs),
        "",
        None,
    );
    // The corpus repeats 44 words, so the worker's piece cache answers nearly every piece. Prose
    // with a wide vocabulary (this repository's own documents) shows the count where it misses.
    let mut prose =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            prose.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    let prose: Vec<&str> = prose.split("\n\n").collect();
    let prose_bytes: usize = prose.iter().map(|p| p.len()).sum();
    // Each round on a new thread: the worker's cache starts empty, as in a new process.
    let rounds = (20_000_000 / prose_bytes.max(1)).max(1);
    let tiktoken = |t: &str| bpe.encode_ordinary(t).len();
    let worker = |t: &str| embed_worker::pipeline::cl100k::count(t);
    let mut totals = Vec::new();
    for (label, f) in [
        ("tiktoken-rs", &tiktoken as &(dyn Fn(&str) -> usize + Sync)),
        ("worker", &worker),
    ] {
        let started = Instant::now();
        let mut n = 0usize;
        for _ in 0..rounds {
            n += std::thread::scope(|s| {
                s.spawn(|| prose.iter().map(|t| f(t)).sum::<usize>())
                    .join()
                    .unwrap()
            });
        }
        let secs = started.elapsed().as_secs_f64();
        totals.push(n);
        report.add(
            "tokenizer",
            format!(
                "{label} cl100k on prose (README + docs/, {:.0} KB × {rounds}, a new thread each)",
                prose_bytes as f64 / 1e3
            ),
            format!("{:.2} MB/s", (prose_bytes * rounds) as f64 / 1e6 / secs),
            "",
            None,
        );
    }
    assert_eq!(
        totals[0], totals[1],
        "the worker's cl100k count differs from tiktoken-rs's on prose"
    );
    report.add(
        "tokenizer",
        "corpus",
        format!(
            "{} texts, {:.1} MB, {} tokens",
            corpus.len(),
            bytes as f64 / 1e6,
            tokens
        ),
        "",
        None,
    );
    let chunker = Chunker::new(8191, 200).unwrap();
    let started = Instant::now();
    let chunks: usize = corpus
        .iter()
        .map(|t| chunker.chunks(t, MODEL, DIMS).len())
        .sum();
    let chunk_secs = started.elapsed().as_secs_f64();
    report.add(
        "tokenizer",
        "count + split + hash the corpus (the worker's work)",
        format!("{chunk_secs:.2} s, {chunks} chunks"),
        "",
        None,
    );
    chunk_secs
}
