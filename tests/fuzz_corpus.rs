//! The fuzz corpora, replayed on stable by the ordinary `cargo test`:
//! - every seed in `fuzz/corpus/<target>/` and every crash the fuzzers found, kept in
//!   `fuzz/regressions/<target>/`, goes through the same `legate::fuzzing` function as the
//!   cargo-fuzz target of that name, and must not panic;
//! - seeds named `ok-*` must be accepted and `bad-*` refused (for `admin_request`: answered
//!   200, or not); other names (inputs a fuzzer kept) need only not panic;
//! - every directory there has a target here, and every target has seeds.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// Runs one input; true when it was accepted.
type Replay = fn(&[u8]) -> bool;

const TARGETS: &[(&str, Replay)] = &[
    ("config", |data| legate::fuzzing::config(data).is_ok()),
    ("target", |data| legate::fuzzing::target(data).is_ok()),
    ("duration", |data| legate::fuzzing::duration(data).is_ok()),
    ("endpoint_file", |data| {
        legate::fuzzing::endpoint_file(data).is_ok()
    }),
    ("dns_answer", |data| {
        legate::fuzzing::dns_answer(data).is_ok()
    }),
    ("redis_reply", |data| {
        legate::fuzzing::redis_reply(data).is_ok()
    }),
    ("mysql_greeting", |data| {
        legate::fuzzing::mysql_greeting(data).is_ok()
    }),
    ("handover_message", |data| {
        legate::fuzzing::handover_message(data).is_ok()
    }),
    ("admin_request", |data| {
        let response = legate::fuzzing::admin_request(data);
        response.starts_with(b"HTTP/1.1 200 ") || response.starts_with(b"HTTP/1.0 200 ")
    }),
];

fn fuzz_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
}

/// The files directly in `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("read_dir entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_seed_and_regression_replays() {
    let mut failures = Vec::new();
    for (target, replay) in TARGETS {
        let seeds = inputs(&fuzz_dir("corpus").join(target));
        assert!(!seeds.is_empty(), "fuzz/corpus/{target}/ has no seeds");
        let regressions = inputs(&fuzz_dir("regressions").join(target));
        for path in seeds.iter().chain(&regressions) {
            let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let name = path.file_name().unwrap().to_string_lossy();
            match catch_unwind(AssertUnwindSafe(|| replay(&data))) {
                Err(_) => failures.push(format!("{}: panicked", path.display())),
                Ok(false) if name.starts_with("ok-") => {
                    failures.push(format!("{}: refused, but named ok-", path.display()))
                }
                Ok(true) if name.starts_with("bad-") => {
                    failures.push(format!("{}: accepted, but named bad-", path.display()))
                }
                Ok(_) => {}
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn every_corpus_directory_has_a_target() {
    for kind in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz_dir(kind)) else {
            continue;
        };
        for entry in entries {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                TARGETS.iter().any(|(target, _)| *target == name),
                "fuzz/{kind}/{name}/ is replayed by no target in tests/fuzz_corpus.rs"
            );
        }
    }
}
