//! One upstream target (`--upstream`, the file's `upstream`): the target grammar, and Display read back.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = legate::fuzzing::target(data);
});
