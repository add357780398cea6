//! A duration as written in the config: parse_duration.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = legate::fuzzing::duration(data);
});
