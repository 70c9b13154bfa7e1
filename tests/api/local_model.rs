//! The local provider reproduces sentence-transformers: all-MiniLM-L6-v2 vectors for fixed
//! sentences match reference vectors made once with sentence-transformers (cosine ≥ 0.999).
#![cfg(feature = "local")]

use std::path::PathBuf;

use embed_worker::embed::local::{self, LocalEmbedder};

fn model_dir() -> PathBuf {
    std::env::var_os("EMBED_WORKER_LOCAL_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/.dev/models/all-MiniLM-L6-v2"
            ))
        })
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_sentence_transformers_reference_vectors() {
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/minilm_reference.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let sentences: Vec<String> = reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let want: Vec<Vec<f32>> = reference["vectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let model = LocalEmbedder::load(&model_dir())
        .expect("scripts/fetch-model puts the weights in .dev/models (scripts/test runs it)");
    let got = model.embed(sentences.clone()).await.unwrap();
    assert_eq!(got.vectors.len(), sentences.len());
    for (i, (g, w)) in got.vectors.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), local::DIMENSIONS);
        let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "L2-normalised");
        let c = cosine(g, w);
        assert!(c >= 0.999, "sentence {i} {:?}: cosine {c}", sentences[i]);
        eprintln!("{c:.6}  {}", sentences[i]);
    }
    // Batching and padding do not change a sentence's vector.
    let alone = model.embed(vec![sentences[0].clone()]).await.unwrap();
    assert!(cosine(&alone.vectors[0], &got.vectors[0]) > 0.99999);
    // Meaning: the harmony question is closer to a harmony sentence than to a rhythm one.
    let q = model
        .embed(vec!["voicing a minor two-five-one progression".into()])
        .await
        .unwrap();
    assert!(cosine(&q.vectors[0], &got.vectors[0]) > cosine(&q.vectors[0], &got.vectors[1]));
}
