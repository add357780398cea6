//! The process clock: milliseconds since about process start, on a monotonic clock. Endpoint
//! ejections and last-good times, rate-limited warnings and idle timers all read it, so a
//! time is one `u64` that fits in an atomic.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Milliseconds on a monotonic clock that starts near process start; 0 never occurs
/// after the first call, so 0 can mean "not set".
pub(crate) fn monotonic_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(|| Instant::now() - Duration::from_millis(1));
    start.elapsed().as_millis() as u64
}
