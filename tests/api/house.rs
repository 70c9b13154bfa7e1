//! The house's own rules, checked: what a rename would otherwise break silently.

use std::path::Path;

/// Every test a nextest override names still exists: a renamed test would otherwise leave the
/// override matching nothing and run beside others (issue 32: a pacing test did, for weeks).
#[test]
fn every_test_named_in_the_nextest_config_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = std::fs::read_to_string(root.join(".config/nextest.toml")).unwrap();
    let mut fns = Vec::new();
    for entry in std::fs::read_dir(root.join("tests/api")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let line = line.trim_start();
            let rest = line
                .strip_prefix("async fn ")
                .or_else(|| line.strip_prefix("fn "));
            if let Some(name) = rest.and_then(|r| r.split('(').next()) {
                fns.push(name.to_string());
            }
        }
    }
    let named: Vec<&str> = config
        .split("test(")
        .skip(1)
        .filter_map(|s| s.split(')').next())
        .collect();
    assert!(
        !named.is_empty(),
        "no test(...) filter found in .config/nextest.toml"
    );
    // nextest's `test(x)` matches every test whose name contains x.
    let missing: Vec<&&str> = named
        .iter()
        .filter(|n| !fns.iter().any(|f| f.contains(**n)))
        .collect();
    assert!(
        missing.is_empty(),
        ".config/nextest.toml names tests that do not exist: {missing:?}"
    );
}
