//! A DNS response: hickory's decoder, then the A/AAAA and SRV answer → endpoint mapping.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = legate::fuzzing::dns_answer(data);
});
