//! Bytes from a Redis server to a health check: the RESP parser and the PING/ROLE verdicts.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = legate::fuzzing::redis_reply(data);
});
