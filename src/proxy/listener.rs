//! The accept loop of one listener.
//!
//! Each accepted connection gets its own task (tracked, so the drain can wait for it);
//! the dial and the forwarding happen there, never in the loop, so one slow upstream
//! cannot stall accepting. Over `max_connections`, the connection is accepted and reset
//! at once and counted, never left waiting in the backlog. accept(2) errors such as
//! EMFILE back off (5ms doubling to 1s) instead of spinning.

use super::connect::{self, ConnectError};
use super::ending::{End, Outcome};
use super::forward;
use super::stream::ClientStream;
use crate::clock::monotonic_ms;
use crate::discovery::{EndpointState, Health};
use crate::metrics::RejectReason;
use crate::state::ListenerState;
use crate::tls::handshake::{self, AcceptError, Failed};
use socket2::SockRef;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bind a listening socket the way a proxy wants it.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // Restarting legate must not wait for TIME_WAIT of the previous process's sockets.
    socket.set_reuseaddr(true)?;
    // On Linux accepted sockets inherit TCP_NODELAY and the keepalive settings from the
    // listener, so setting them here once (as `proxy::tune` does) saves five setsockopt
    // calls per accepted connection.
    #[cfg(target_os = "linux")]
    {
        let listening = SockRef::from(&socket);
        listening.set_tcp_nodelay(true)?;
        // The probe count matters for admin connections, which get no user timeout.
        listening.set_tcp_keepalive(&super::keepalive().with_retries(6))?;
    }
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Accept until `listener.accept_token` is cancelled, then hand the socket back (a
/// reload may give the address to another listener; dropping it stops listening).
/// Connection tasks go to `tracker` and end early when `connections` is cancelled.
pub(crate) async fn serve(
    listener: Arc<ListenerState>,
    socket: TcpListener,
    tracker: TaskTracker,
    connections: CancellationToken,
) -> TcpListener {
    listener.bound.store(true, Relaxed);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            biased;
            _ = listener.accept_token.cancelled() => break,
            accepted = socket.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(accepted) => {
                backoff = Duration::from_millis(5);
                accepted
            }
            Err(error) => {
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                let errno = errno_name(&error);
                listener.metrics.accept_error(errno);
                if let Some(suppressed) = listener.warn_limit.allow(monotonic_ms(), 1000) {
                    tracing::warn!(listener = %listener.name, %error, errno, suppressed, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                }
                tokio::select! {
                    _ = listener.accept_token.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        listener.metrics.connections_total.inc();
        let max = listener.config.load().max_connections;
        if listener.active.load(Relaxed) >= max {
            listener
                .metrics
                .rejected(RejectReason::MaxConnections)
                .inc();
            // Reset rather than FIN: the client learns at once it was not served.
            super::reset_on_close(&client);
            drop(client);
            tracing::debug!(listener = %listener.name, %peer, max, "over max_connections; closed");
            continue;
        }
        let guard = ActiveGuard::new(&listener);
        let listener = Arc::clone(&listener);
        let connections = connections.clone();
        tracker.spawn(async move {
            handle(client, peer, &listener, &connections).await;
            drop(guard);
        });
    }
    listener.bound.store(false, Relaxed);
    tracing::info!(listener = %listener.name, "stopped accepting");
    socket
}

async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    listener: &ListenerState,
    connections: &CancellationToken,
) {
    let config = listener.config.load_full();
    // On Linux the client socket inherited the rest from the listener (see `bind`); the
    // user timeout is per listener config, which a reload may change under the socket.
    #[cfg(not(target_os = "linux"))]
    super::tune(&client, config.tcp_user_timeout);
    #[cfg(target_os = "linux")]
    super::set_user_timeout(&client, config.tcp_user_timeout);
    if let Some(size) = config.socket_buffer {
        super::set_buffers(&client, size);
    }
    // Terminate TLS first, then dial.
    let Some(client) = accept_client(client, peer, listener, connections).await else {
        return;
    };
    let dialled = tokio::select! {
        dialled = connect::connect(listener, &config) => dialled,
        _ = connections.cancelled() => return,
    };
    let upstream = match dialled {
        Ok(upstream) => upstream,
        Err(error) => {
            let reason = match error {
                ConnectError::NoEndpoint => RejectReason::NoEndpoint,
                ConnectError::Failed { .. } => RejectReason::ConnectFailed,
            };
            listener.metrics.rejected(reason).inc();
            // Reset, not FIN: the client must not take "no backend" for a served,
            // cleanly closed connection (the same as over max_connections).
            super::reset_on_close(client.tcp());
            tracing::debug!(listener = %listener.name, %peer, %error, "client reset: no upstream");
            return;
        }
    };
    // `close_on_unhealthy`: the health checker cancels this when the endpoint turns
    // unhealthy. Taken after the dial; if the endpoint turned unhealthy during the dial
    // the signal may be a fresh one, hence the health check right after.
    let closed = upstream.state.close_signal();
    if config.health.close_on_unhealthy && upstream.state.health() != Health::Healthy {
        tracing::debug!(listener = %listener.name, %peer, upstream = %upstream.addr, "client closed: endpoint turned unhealthy during the dial");
        return;
    }
    let endpoint = EndpointGuard::new(upstream.state);
    let forwarding = forward::forward_any(
        client,
        upstream.stream,
        &listener.metrics,
        config.idle_timeout,
        connections,
    );
    let closing = closed.cancelled();
    tokio::pin!(closing);
    let outcome = tokio::select! {
        outcome = forwarding => outcome,
        _ = forward::quiet(closing) => {
            // Dropping the forwarding closes both sockets, as a drain deadline does.
            tracing::debug!(listener = %listener.name, %peer, upstream = %upstream.addr, "connection closed: endpoint turned unhealthy (close_on_unhealthy)");
            return;
        }
    };
    drop(endpoint);
    log_end(listener, peer, upstream.addr, &outcome);
}

/// The client's side of a connection: as accepted, or with TLS terminated (inside the
/// connection's task, under a timeout, so a slow or silent client never stalls the accept
/// loop). `None` when the handshake failed or the connections are being closed.
async fn accept_client(
    client: TcpStream,
    peer: SocketAddr,
    listener: &ListenerState,
    connections: &CancellationToken,
) -> Option<ClientStream> {
    let Some(server) = listener.tls.server.load_full() else {
        return Some(ClientStream::Plain(client));
    };
    // Boxed: a handshake's state must not size every plaintext connection's task.
    let handshake = Box::pin(handshake::accept(&server, client, &listener.metrics));
    let result = tokio::select! {
        result = handshake => result,
        _ = connections.cancelled() => return None,
    };
    match result {
        Ok(stream) => {
            let (_, session) = stream.get_ref();
            tracing::debug!(
                listener = %listener.name, %peer,
                sni = session.server_name().unwrap_or("-"),
                client_cert = %crate::tls::certs::subject(session.peer_certificates()),
                "TLS accepted"
            );
            Some(ClientStream::Tls(Box::new(stream)))
        }
        Err(AcceptError::Failed(Failed { reason, error })) => {
            tracing::debug!(listener = %listener.name, %peer, reason, %error, "TLS handshake from client failed");
            None
        }
        Err(AcceptError::TimedOut) => {
            tracing::debug!(listener = %listener.name, %peer, "TLS handshake from client timed out");
            None
        }
    }
}

/// How a forwarded connection ended, at debug level.
fn log_end(listener: &ListenerState, peer: SocketAddr, upstream: SocketAddr, outcome: &Outcome) {
    match &outcome.end {
        End::Reset { from, error } => tracing::debug!(
            listener = %listener.name, %peer, %upstream,
            from = from.as_str(), %error,
            sent = outcome.upstream_bytes, received = outcome.downstream_bytes,
            "connection reset"
        ),
        end => tracing::debug!(
            listener = %listener.name, %peer, %upstream, ?end,
            sent = outcome.upstream_bytes, received = outcome.downstream_bytes,
            "connection closed"
        ),
    }
}

fn errno_name(error: &std::io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::ENFILE) => "ENFILE",
        Some(libc::ENOBUFS) => "ENOBUFS",
        Some(libc::ENOMEM) => "ENOMEM",
        _ => "other",
    }
}

/// Counts a client connection as open for as long as it lives, panics included.
struct ActiveGuard {
    listener: Arc<ListenerState>,
}

impl ActiveGuard {
    fn new(listener: &Arc<ListenerState>) -> ActiveGuard {
        listener.active.fetch_add(1, Relaxed);
        listener.metrics.connections_active.inc();
        ActiveGuard {
            listener: Arc::clone(listener),
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.listener.active.fetch_sub(1, Relaxed);
        self.listener.metrics.connections_active.dec();
    }
}

/// Counts a connection against its endpoint (least-conn, `/endpoints`).
struct EndpointGuard(Arc<EndpointState>);

impl EndpointGuard {
    fn new(state: Arc<EndpointState>) -> EndpointGuard {
        state.active.fetch_add(1, Relaxed);
        EndpointGuard(state)
    }
}

impl Drop for EndpointGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}
