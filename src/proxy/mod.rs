//! The data plane: accept (`listener`), dial with failover (`connect`), move bytes
//! (`forward`, with `splice` on Linux, or `copy` through buffers for TLS). `stream` and
//! `ending` hold what those share, so the modules depend on each other one way only.

// `forbid` on each module but splice, the crate's one user of `unsafe` (see lib.rs).
#[forbid(unsafe_code)]
pub(crate) mod connect;
#[forbid(unsafe_code)]
mod copy;
#[forbid(unsafe_code)]
mod ending;
#[forbid(unsafe_code)]
pub(crate) mod forward;
#[forbid(unsafe_code)]
pub(crate) mod listener;
#[cfg(target_os = "linux")]
mod splice;
#[forbid(unsafe_code)]
mod stream;

use socket2::{SockRef, TcpKeepalive};
use std::time::Duration;
use tokio::net::TcpStream;

/// TCP_NODELAY (requests are forwarded as they come, never held back for Nagle) and
/// keepalive (a peer that vanished without a FIN is found within about two minutes
/// even when `idle_timeout` is off) on both sides of every connection. Keepalive only
/// probes an idle connection; `user_timeout` covers the busy one, whose unacknowledged
/// bytes would otherwise be retransmitted for about 15 minutes (tcp_retries2).
pub(crate) fn tune(stream: &TcpStream, user_timeout: Duration) {
    let _ = stream.set_nodelay(true);
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive());
    set_user_timeout(stream, user_timeout);
}

/// Probe after 60 s idle, then every 10 s. On Linux TCP_USER_TIMEOUT (set on every
/// proxied socket) also decides when unanswered probes end the connection and the probe
/// count is ignored, so it is not set there: one setsockopt saved per socket.
pub(crate) fn keepalive() -> TcpKeepalive {
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    #[cfg(target_os = "macos")]
    let keepalive = keepalive.with_retries(6);
    keepalive
}

/// SO_LINGER 0: the coming close() sends RST instead of FIN, so the peer cannot take a
/// refused or cut connection for a served, cleanly finished one.
pub(crate) fn reset_on_close(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// SO_SNDBUF and SO_RCVBUF (`socket_buffer`): a fixed size instead of the kernel's
/// autotuning, so the kernel memory a stalled connection can hold is bounded (the kernel
/// doubles the value for its bookkeeping and caps it at net.core.wmem_max/rmem_max).
pub(crate) fn set_buffers<S: std::os::fd::AsFd>(socket: &S, size: u32) {
    let socket = SockRef::from(socket);
    let _ = socket.set_send_buffer_size(size as usize);
    let _ = socket.set_recv_buffer_size(size as usize);
}

/// TCP_USER_TIMEOUT (Linux): a connection whose sent bytes stay unacknowledged this long
/// fails with ETIMEDOUT, which forwarding passes on as a reset.
pub(crate) fn set_user_timeout(stream: &TcpStream, timeout: Duration) {
    #[cfg(target_os = "linux")]
    let _ = SockRef::from(stream).set_tcp_user_timeout(Some(timeout));
    #[cfg(not(target_os = "linux"))]
    let _ = (stream, timeout);
}
