//! An endpoint file's contents: parse_endpoint_file.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = legate::fuzzing::endpoint_file(data);
});
