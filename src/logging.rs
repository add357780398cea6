//! Log setup (`--log-format text|json`, `--log-level`) and a rate limit for per-connection
//! warnings, so a dead backend under load logs a line a second, not a line a connection.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Install the global subscriber. `level` is a level (`info`) or a full filter
/// (`legate=debug,warn`).
pub fn init(format: LogFormat, level: &str) -> Result<(), String> {
    // notify reports its own housekeeping (a watch on a directory that was just
    // swapped away) at info/warn; that is expected here and only noise to users.
    // rustls narrates every handshake at debug; one line per connection is ours to log.
    let mut directives = level.to_string();
    if !level.contains("notify") {
        directives.push_str(",notify=error");
    }
    if !level.contains("rustls") {
        directives.push_str(",rustls=warn");
    }
    let filter = EnvFilter::try_new(&directives)
        .map_err(|error| format!("invalid --log-level {level:?}: {error}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|error| format!("cannot install the logger: {error}"))
}

/// At most one event per `period_ms`; counts what it held back.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// `Some(held_back_since_last)` when this event may be logged.
    pub(crate) fn allow(&self, now_ms: u64, period_ms: u64) -> Option<u64> {
        let last = self.last_ms.load(Relaxed);
        if last != 0 && now_ms < last + period_ms {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        if self
            .last_ms
            .compare_exchange(last, now_ms.max(1), Relaxed, Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimit;

    #[test]
    fn one_per_period_and_counts_the_rest() {
        let limit = RateLimit::default();
        assert_eq!(limit.allow(1000, 1000), Some(0));
        assert_eq!(limit.allow(1500, 1000), None);
        assert_eq!(limit.allow(1999, 1000), None);
        assert_eq!(limit.allow(2000, 1000), Some(2));
    }
}
