//! Bytes from an admin-port peer: the real hyper connection and router, in memory.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = legate::fuzzing::admin_request(data);
});
