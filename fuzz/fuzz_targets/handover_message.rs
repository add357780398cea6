//! A frame on the handoff socket: the handover protocol's parser.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = legate::fuzzing::handover_message(data);
});
