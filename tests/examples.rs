//! Every example in `config/` passes `legate check`, and the endpoint-file example parses.

use std::path::Path;
use std::process::Command;

#[test]
fn every_example_config_passes_legate_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("readable entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let output = Command::new(env!("CARGO_BIN_EXE_legate"))
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .expect("legate runs");
        assert!(
            output.status.success(),
            "{} failed legate check: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        checked += 1;
    }
    assert!(
        checked >= 3,
        "expected the example configs in config/, found {checked}"
    );
}

#[test]
fn example_endpoint_file_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/redis.endpoints");
    let text = std::fs::read_to_string(path).expect("config/redis.endpoints exists");
    let lines = legate::discovery::endpoint_file::parse_endpoint_file(&text).expect("valid");
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0].weight, 2);
    assert!(lines[2].backup);
}
