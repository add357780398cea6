//! How a forwarded connection ends, and what each direction reports on the way: shared
//! by the splice path (`forward`) and the buffered copy (`copy`).

use std::io;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// How a forwarded connection ended.
#[derive(Debug)]
pub(crate) enum End {
    /// Both directions reached end of stream.
    Closed,
    /// A peer reset or failed; the other side was reset too.
    Reset {
        from: Side,
        error: io::Error,
    },
    IdleTimeout,
    /// The drain deadline passed.
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Client,
    Upstream,
}

impl Side {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

pub(crate) struct Outcome {
    pub(crate) end: End,
    /// Bytes sent toward the backend.
    pub(crate) upstream_bytes: u64,
    /// Bytes sent toward the client.
    pub(crate) downstream_bytes: u64,
}

/// Which socket of a direction failed.
pub(super) enum DirectionError {
    Read(io::Error),
    Write(io::Error),
}

impl DirectionError {
    /// A write failed: the destination reset or closed. Whatever it sent before that may
    /// still be waiting in its socket, so the opposite direction is salvaged before the
    /// reset is passed on. (A failed read needs no salvage: a direction always delivers
    /// what it read before reading again, and nothing can be delivered to a dead source.)
    pub(super) fn is_write(&self) -> bool {
        matches!(self, DirectionError::Write(_))
    }

    /// How the connection ends when the direction `from` → `to` failed: a reset from
    /// the side whose socket failed.
    pub(super) fn end(self, from: Side, to: Side) -> End {
        match self {
            DirectionError::Read(error) => End::Reset { from, error },
            DirectionError::Write(error) => End::Reset { from: to, error },
        }
    }
}

/// How long the opposite direction may go on delivering after one side reset or closed
/// (see [`DirectionError::is_write`]). The dead side's read returns its last bytes and then
/// the reset at once, so this bounds only a live side that does not read what it is sent.
/// Long enough for a sidecar paused by a CPU quota (tens of milliseconds at a time) to
/// catch up; short enough that a stuck client does not hold a dead connection.
pub(super) const SALVAGE: Duration = Duration::from_secs(2);

/// One direction's running totals, shared with the connection for its log line.
#[derive(Default)]
pub(super) struct Progress {
    pub(super) moved: AtomicU64,
    pub(super) spliced: AtomicU64,
}
