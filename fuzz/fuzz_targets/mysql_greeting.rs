//! Bytes from a MySQL/MariaDB server to a health check: the greeting and login-reply parsers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = legate::fuzzing::mysql_greeting(data);
});
