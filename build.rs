//! Rebuild when a migration is added or changed: `sqlx::migrate!` embeds `migrations/` at
//! compile time, and on stable Rust the macro cannot tell Cargo to watch that directory (the
//! build script `sqlx migrate build-script` writes).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
