//! Tokenizer throughput.

#[allow(unused_imports)]
use super::*;

/// (5) Tokenizer throughput on the corpus; returns CPU seconds to chunk the whole corpus.
pub(crate) fn bench_tokenizer(report: &mut Report, corpus: &[String]) -> f64 {
    let bytes: usize = corpus.iter().map(|t| t.len()).sum();
    let bpe = cl100k();
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
