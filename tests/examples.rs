//! Every shipped example config parses without a single error.

use std::path::Path;

use llmtrace_rotator::config::Config;

#[test]
fn every_example_config_is_valid() {
    let mut seen = 0;
    for entry in
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples")).unwrap()
    {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Err(error) = Config::load(&path) {
                panic!("{}: {error}", path.display());
            }
            seen += 1;
        }
    }
    assert!(seen >= 5, "examples found: {seen}");
}
