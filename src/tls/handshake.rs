//! The two handshakes of a proxied TLS connection and their bookkeeping, one function per
//! direction: `accept` terminates the client's TLS, `connect` originates TLS toward the
//! upstream. A handshake that completes is timed into `legate_tls_handshake_seconds`; one
//! that fails is counted in `legate_tls_handshake_errors_total` under a short reason
//! (`failure_reason`), and the caller gets that reason back for its log line or error.

use super::{failure_reason, ClientSide, ServerSide, HANDSHAKE_TIMEOUT};
use crate::metrics::ListenerMetrics;
use rustls::pki_types::ServerName;
use std::io;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio_rustls::{client, server};

/// A handshake that failed, already counted under `reason`.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) reason: &'static str,
    pub(crate) error: io::Error,
}

/// Why a client's handshake did not complete, already counted.
#[derive(Debug)]
pub(crate) enum AcceptError {
    /// Not finished within [`HANDSHAKE_TIMEOUT`] (counted with reason `timeout`).
    TimedOut,
    Failed(Failed),
}

/// Terminate `client`'s TLS, under [`HANDSHAKE_TIMEOUT`].
pub(crate) async fn accept(
    server: &ServerSide,
    client: TcpStream,
    metrics: &ListenerMetrics,
) -> Result<server::TlsStream<TcpStream>, AcceptError> {
    let started = Instant::now();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, server.acceptor.accept(client)).await {
        Ok(result) => settle(result, started, metrics, Side::Client).map_err(AcceptError::Failed),
        Err(_) => {
            metrics.tls_handshake_failed(Side::Client.label(), "timeout");
            Err(AcceptError::TimedOut)
        }
    }
}

/// Originate TLS to the upstream over `stream`, sending and verifying `name`. Not bounded
/// here: the caller's `connect_timeout` covers the whole dial.
pub(crate) async fn connect(
    tls: &ClientSide,
    name: ServerName<'static>,
    stream: TcpStream,
    metrics: &ListenerMetrics,
) -> Result<client::TlsStream<TcpStream>, Failed> {
    let started = Instant::now();
    let result = tls.connector.connect(name, stream).await;
    settle(result, started, metrics, Side::Upstream)
}

/// Which peer the handshake was with: the `side` label.
#[derive(Debug, Clone, Copy)]
enum Side {
    Client,
    Upstream,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

/// Time a completed handshake, or count a failed one.
fn settle<T>(
    result: io::Result<T>,
    started: Instant,
    metrics: &ListenerMetrics,
    side: Side,
) -> Result<T, Failed> {
    match result {
        Ok(stream) => {
            let seconds = match side {
                Side::Client => &metrics.tls_handshake_client,
                Side::Upstream => &metrics.tls_handshake_upstream,
            };
            seconds.observe(started.elapsed().as_secs_f64());
            Ok(stream)
        }
        Err(error) => {
            let reason = failure_reason(&error);
            metrics.tls_handshake_failed(side.label(), reason);
            Err(Failed { reason, error })
        }
    }
}
