//! Build-time inputs.
//!
//! - Rebuild when a migration is added or changed: `sqlx::migrate!` embeds `migrations/` at
//!   compile time, and on stable Rust the macro cannot tell Cargo to watch that directory (the
//!   build script `sqlx migrate build-script` writes).
//! - cl100k_base's token table for `pipeline/cl100k.rs`, read from tiktoken-rs here once: at run
//!   time building tiktoken-rs's `CoreBPE` to read it (base64 parsing, three maps, a regex per
//!   thread) and dropping it again cost every worker process ~135 ms of CPU at start (`perf`,
//!   4% of a 20,000-row run). The file is each token's bytes, length-prefixed, in rank order.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=build.rs");
    let bpe = tiktoken_rs::cl100k_base().expect("tiktoken-rs's cl100k_base loads");
    let mut out = Vec::with_capacity(900_000);
    for rank in 0..100_256u32 {
        let bytes = bpe
            .decode_bytes(&[rank])
            .expect("cl100k_base's ordinary ranks are 0..100,256");
        assert!(!bytes.is_empty() && bytes.len() < 256);
        out.push(bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    let path = std::path::Path::new(&std::env::var("OUT_DIR").unwrap()).join("cl100k_ranks.bin");
    std::fs::write(path, out).unwrap();
}
