//! A config file's text: legate::config::Config::parse, then each target's Display read back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = legate::fuzzing::config(data);
});
