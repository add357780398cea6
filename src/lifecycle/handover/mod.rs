//! Upgrading legate without dropping a connection: a new process takes the listening
//! sockets over from the running one.
//!
//! The running legate serves the handoff socket (`[runtime] handoff_socket`). A new
//! legate with the same setting, its configuration already validated, connects there
//! and takes every listening socket — data listeners, the admin listener, and the
//! handoff socket itself — as descriptors (SCM_RIGHTS). They are the same sockets, not
//! rebound copies, so their accept queues survive: a connection waiting in the backlog
//! is served by whichever process accepts it. The newcomer binds fresh what only its
//! configuration has, runs its first discovery and health round, and only then commits:
//! the running process stops accepting, confirms, drains its open connections and
//! exits 0, and the newcomer starts accepting. Until the commit nothing of the running
//! process has changed, so a newcomer that fails, is killed or times out leaves it
//! serving as before.
//!
//! `protocol` is the messages and their parser; `wire` the socket and the descriptors;
//! this file the two sides of the conversation.

pub(crate) mod protocol;
mod wire;

use crate::config::HandoffSocket;
use crate::metrics::Metrics;
use protocol::{Message, Offered, Role};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
pub(crate) use wire::{bind, WireError};

/// The newcomer's Hello must come promptly: it was ready to talk when it connected.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// From the offer to the commit the newcomer runs its first discovery and health round,
/// which it bounds by `READY_WAIT`; the rest is slack for a loaded machine.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// The newcomer waits this long for its first discovery and health round.
pub(crate) const READY_WAIT: Duration = Duration::from_secs(10);
/// The running process answers as soon as it has been scheduled (a frozen or stopped
/// process does not answer at all; then the newcomer gives up and exits).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub(crate) enum HandoverError {
    #[error("cannot reach the handoff socket {socket}: {error}")]
    Connect {
        socket: String,
        error: std::io::Error,
    },
    #[error("the legate at {socket} refused the handover: {reason}")]
    Refused { socket: String, reason: String },
    #[error("handover through {socket} failed: {error}")]
    Wire { socket: String, error: WireError },
    #[error("handover through {socket} failed: expected {expected}, got {got:?}")]
    Unexpected {
        socket: String,
        expected: &'static str,
        got: Message,
    },
}

// ---------------------------------------------------------------------------------------------
// The newcomer's side
// ---------------------------------------------------------------------------------------------

/// What a newcomer took over, before it commits.
pub(crate) struct Taken {
    socket: HandoffSocket,
    session: UnixStream,
    pub(crate) old_pid: u32,
    sockets: Vec<(Offered, Option<OwnedFd>)>,
}

impl Taken {
    /// The offered listening TCP socket for `addr` in `role`, ready for tokio.
    pub(crate) fn tcp(&mut self, role: Role, addr: SocketAddr) -> Option<tokio::net::TcpListener> {
        let wanted = addr.to_string();
        let fd = self
            .sockets
            .iter_mut()
            .find(|(offered, fd)| offered.role == role && offered.addr == wanted && fd.is_some())
            .and_then(|(_, fd)| fd.take())?;
        let listener = std::net::TcpListener::from(fd);
        // Trust the socket, not the message: it must really listen on that address.
        if listener.local_addr().ok() != Some(addr) {
            tracing::warn!(%addr, "a handed-over socket does not listen where it was said to; binding afresh");
            return None;
        }
        listener.set_nonblocking(true).ok()?;
        tokio::net::TcpListener::from_std(listener).ok()
    }

    /// The handoff socket itself, so this process serves the next handover.
    pub(crate) fn handoff(&mut self) -> Option<tokio::net::UnixListener> {
        let fd = self
            .sockets
            .iter_mut()
            .find(|(offered, fd)| offered.role == Role::Handoff && fd.is_some())
            .and_then(|(_, fd)| fd.take())?;
        let listener = std::os::unix::net::UnixListener::from(fd);
        listener.set_nonblocking(true).ok()?;
        tokio::net::UnixListener::from_std(listener).ok()
    }

    /// What was offered, for the log line: `redis=127.0.0.1:6379 admin=127.0.0.1:9901`.
    pub(crate) fn describe(&self) -> String {
        describe(self.sockets.iter().map(|(offered, _)| offered))
    }

    /// Offered sockets this process has no use for (the old process closes them after
    /// the commit), for the log line.
    pub(crate) fn unused(&self) -> String {
        describe(
            self.sockets
                .iter()
                .filter(|(_, fd)| fd.is_some())
                .map(|(offered, _)| offered),
        )
    }
}

fn describe<'a>(offered: impl Iterator<Item = &'a Offered>) -> String {
    let parts: Vec<String> = offered
        .map(|offered| match offered.role {
            Role::Listener => format!("{}={}", offered.name, offered.addr),
            Role::Admin => format!("admin={}", offered.addr),
            Role::Handoff => format!("handoff={}", offered.addr),
        })
        .collect();
    if parts.is_empty() {
        "nothing".into()
    } else {
        parts.join(" ")
    }
}

/// Take the sockets of the legate serving `socket`; `Ok(None)` when nobody serves it.
pub(crate) async fn take(socket: &HandoffSocket) -> Result<Option<Taken>, HandoverError> {
    let socket = socket.clone();
    blocking(move || {
        let name = socket.to_string();
        let Some(session) = wire::connect(&socket).map_err(|error| HandoverError::Connect {
            socket: name.clone(),
            error,
        })?
        else {
            return Ok(None);
        };
        let wire_error = |error: WireError| HandoverError::Wire {
            socket: name.clone(),
            error,
        };
        let hello = Message::Hello {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        // A refusal may already be waiting when the hello cannot be sent: read it, so
        // the reason is what the user sees, not a broken pipe.
        let sent = wire::send(&session, &hello, &[]);
        let received = wire::recv(&session, ANSWER_TIMEOUT);
        let (message, fds) = match (sent, received) {
            (_, Ok(received @ (Message::Refused { .. }, _))) => received,
            (Err(error), _) => return Err(wire_error(error.into())),
            (Ok(()), received) => received.map_err(wire_error)?,
        };
        let (pid, offered) = match message {
            Message::Offer { pid, sockets } => (pid, sockets),
            Message::Refused { reason } => {
                return Err(HandoverError::Refused {
                    socket: name,
                    reason,
                })
            }
            got => {
                return Err(HandoverError::Unexpected {
                    socket: name,
                    expected: "an offer",
                    got,
                })
            }
        };
        if fds.len() != offered.len() {
            return Err(wire_error(WireError::Io(std::io::Error::other(format!(
                "{} sockets offered, {} descriptors received",
                offered.len(),
                fds.len()
            )))));
        }
        let sockets = offered.into_iter().zip(fds.into_iter().map(Some)).collect();
        Ok(Some(Taken {
            socket,
            session,
            old_pid: pid,
            sockets,
        }))
    })
    .await
}

/// How a commit ended.
pub(crate) enum Committed {
    /// The old process stopped accepting and said so.
    Confirmed,
    /// The old process went away before it confirmed (it crashed, or was stopped): the
    /// sockets are this process's alone now.
    OldGone,
}

/// Ask the old process to stop accepting; returns once it has (or is gone). Whatever
/// `taken` still holds unused is closed here, as the old process closes it too.
pub(crate) async fn commit(taken: Taken) -> Result<Committed, HandoverError> {
    blocking(move || {
        let name = taken.socket.to_string();
        let wire_error = |error: WireError| HandoverError::Wire {
            socket: name.clone(),
            error,
        };
        wire::send(&taken.session, &Message::Commit, &[])
            .map_err(|error| wire_error(error.into()))?;
        match wire::recv(&taken.session, ANSWER_TIMEOUT) {
            Ok((Message::Committed, _)) => Ok(Committed::Confirmed),
            Ok((Message::Refused { reason }, _)) => Err(HandoverError::Refused {
                socket: name,
                reason,
            }),
            Ok((got, _)) => Err(HandoverError::Unexpected {
                socket: name,
                expected: "the commit's confirmation",
                got,
            }),
            Err(WireError::Closed) => Ok(Committed::OldGone),
            Err(error) => Err(wire_error(error)),
        }
    })
    .await
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, HandoverError> + Send + 'static,
) -> Result<T, HandoverError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(error) => Err(HandoverError::Wire {
            socket: String::new(),
            error: WireError::Io(std::io::Error::other(error.to_string())),
        }),
    }
}

/// The newcomer's side after taking the sockets: wait for the first discovery and health
/// round (bounded), so it is ready before it accepts, then commit and start accepting.
pub(crate) async fn take_over(
    taken: Taken,
    shared: &crate::state::Shared,
    go: &CancellationToken,
) -> Result<(), super::StartError> {
    let started = tokio::time::Instant::now();
    while !first_round_done(shared) && started.elapsed() < READY_WAIT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (old, offered, unused) = (taken.old_pid, taken.describe(), taken.unused());
    let committed = commit(taken).await?;
    go.cancel();
    shared.metrics.handoffs.with_label_values(&["taken"]).inc();
    let confirmed = matches!(committed, Committed::Confirmed);
    tracing::info!(
        old,
        offered,
        unused,
        confirmed,
        ready_after_ms = started.elapsed().as_millis() as u64,
        "took over: accepting now (the old legate drains and exits)"
    );
    Ok(())
}

/// Every target has answered (or failed) once and every endpoint has had its first check.
fn first_round_done(shared: &crate::state::Shared) -> bool {
    shared.listeners.load().iter().all(|listener| {
        listener
            .endpoints
            .sources()
            .iter()
            .all(|source| source.resolved || source.error.is_some())
            && listener
                .endpoints
                .load()
                .endpoints
                .iter()
                .all(|endpoint| endpoint.state.health() != crate::discovery::Health::Unknown)
    })
}

// ---------------------------------------------------------------------------------------------
// The running process's side
// ---------------------------------------------------------------------------------------------

/// The sockets this process would hand over now. Each descriptor is a duplicate of the
/// live socket's; the set is replaced whenever listeners change (a reload), so a
/// removed listener's socket is not kept open by it.
#[derive(Default)]
pub(crate) struct Offer(Mutex<Vec<(Offered, Arc<OwnedFd>)>>);

impl Offer {
    pub(crate) fn replace(&self, sockets: Vec<(Offered, Arc<OwnedFd>)>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = sockets;
    }

    fn snapshot(&self) -> Vec<(Offered, Arc<OwnedFd>)> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// What `offer` holds, for the log line.
pub(crate) fn describe_offer(offer: &Offer) -> String {
    describe(offer.snapshot().iter().map(|(offered, _)| offered))
}

/// A duplicate of `socket`'s descriptor for the offer.
pub(crate) fn offered(
    role: Role,
    name: &str,
    addr: String,
    socket: BorrowedFd<'_>,
) -> Option<(Offered, Arc<OwnedFd>)> {
    let fd = socket.try_clone_to_owned().ok()?;
    Some((
        Offered {
            role,
            name: name.to_string(),
            addr,
        },
        Arc::new(fd),
    ))
}

/// A newcomer that is ready and asks to commit: stop accepting, then [`confirm`].
pub(crate) struct CommitRequest {
    session: UnixStream,
    pub(crate) pid: u32,
}

/// Tell the newcomer the old process has stopped accepting.
pub(crate) async fn confirm(request: CommitRequest) {
    let _ =
        tokio::task::spawn_blocking(move || wire::send(&request.session, &Message::Committed, &[]))
            .await;
}

/// Serve handovers on `listener` until `token` is cancelled: one newcomer at a time
/// (another gets `Refused`); a newcomer that asks to commit is passed to `commits`.
pub(crate) async fn serve(
    listener: tokio::net::UnixListener,
    offer: Arc<Offer>,
    shared: Arc<crate::state::Shared>,
    commits: mpsc::Sender<CommitRequest>,
    token: CancellationToken,
) {
    let busy = Arc::new(AtomicBool::new(false));
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted.and_then(|(stream, _)| stream.into_std()) {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "handoff socket: accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let (offer, shared, commits, busy) = (
            Arc::clone(&offer),
            Arc::clone(&shared),
            commits.clone(),
            Arc::clone(&busy),
        );
        tokio::task::spawn_blocking(move || {
            let metrics = &shared.metrics;
            if busy.swap(true, SeqCst) {
                handoffs(metrics, "busy");
                tracing::warn!(
                    "handoff socket: refused a second newcomer while one is taking over"
                );
                refuse(
                    &stream,
                    "another legate is already taking over from this one",
                );
                return;
            }
            if shared.is_draining() {
                handoffs(metrics, "busy");
                refuse(&stream, "this legate is shutting down");
                busy.store(false, SeqCst);
                return;
            }
            let committing = session(stream, &offer, metrics, &commits);
            if !committing {
                busy.store(false, SeqCst);
            }
        });
    }
}

/// Turn a newcomer away with `reason`. Its hello is read first: closing with it unread
/// would reset the connection, and the newcomer would see a broken pipe, not the reason.
fn refuse(stream: &UnixStream, reason: &str) {
    let _ = wire::recv(stream, HELLO_TIMEOUT);
    let _ = stream.set_write_timeout(Some(HELLO_TIMEOUT));
    let refused = Message::Refused {
        reason: reason.into(),
    };
    let _ = wire::send(stream, &refused, &[]);
}

fn handoffs(metrics: &Metrics, result: &str) {
    metrics.handoffs.with_label_values(&[result]).inc();
}

/// One newcomer's conversation up to its commit request; true when that request went to
/// the main loop (this process is then handing over and stays busy).
fn session(
    stream: UnixStream,
    offer: &Offer,
    metrics: &Metrics,
    commits: &mpsc::Sender<CommitRequest>,
) -> bool {
    let _ = stream.set_write_timeout(Some(HELLO_TIMEOUT));
    let pid = match wire::recv(&stream, HELLO_TIMEOUT) {
        Ok((Message::Hello { pid, version }, _)) => {
            tracing::info!(
                newcomer = pid,
                version,
                "handoff socket: a new legate is taking over"
            );
            pid
        }
        Ok((other, _)) => {
            handoffs(metrics, "error");
            tracing::warn!(?other, "handoff socket: expected a hello; still serving");
            return false;
        }
        Err(error) => {
            handoffs(metrics, "error");
            tracing::warn!(%error, "handoff socket: a bad hello; still serving");
            let _ = wire::send(
                &stream,
                &Message::Refused {
                    reason: error.to_string(),
                },
                &[],
            );
            return false;
        }
    };
    let sockets = offer.snapshot();
    let (offered, fds): (Vec<Offered>, Vec<Arc<OwnedFd>>) = sockets.into_iter().unzip();
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| fd.as_fd()).collect();
    let message = Message::Offer {
        pid: std::process::id(),
        sockets: offered,
    };
    if let Err(error) = wire::send(&stream, &message, &borrowed) {
        handoffs(metrics, "aborted");
        tracing::warn!(newcomer = pid, %error, "handoff socket: sending the sockets failed; still serving");
        return false;
    }
    match wire::recv(&stream, COMMIT_TIMEOUT) {
        Ok((Message::Commit, _)) => {
            let request = CommitRequest {
                session: stream,
                pid,
            };
            if commits.blocking_send(request).is_err() {
                // Already shutting down: the newcomer sees the close and keeps the sockets.
                return false;
            }
            true
        }
        Ok((other, _)) => {
            handoffs(metrics, "error");
            tracing::warn!(
                newcomer = pid,
                ?other,
                "handoff socket: expected a commit; still serving"
            );
            false
        }
        Err(error) => {
            let result = match error {
                WireError::Closed | WireError::TimedOut(_) => "aborted",
                _ => "error",
            };
            handoffs(metrics, result);
            tracing::warn!(newcomer = pid, %error, "handoff socket: the new legate did not commit; still serving");
            false
        }
    }
}
