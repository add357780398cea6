//! Dialling the upstream: pick, connect with `connect_timeout`, and on refusal or timeout
//! try the next distinct endpoint, up to `connect_attempts`. Only reached before any
//! client byte was forwarded, so a retry is always safe. A failed endpoint is passively
//! ejected with back-off.
//!
//! Last resort: when no endpoint is eligible only because connecting to them failed
//! (passively ejected, or unhealthy because their checks could not connect), the
//! remaining attempts still dial those, most recently good first, instead of resetting
//! the client. So the first connection after a lone backend comes back succeeds without
//! waiting for a check interval or an ejection back-off (Envoy's panic routing). An
//! endpoint ruled out by what it answered (a replica, an error reply) is never dialled
//! this way, and the attempts and `connect_timeout` bound the wait as for any dial.

use super::stream::UpstreamStream;
use crate::clock::monotonic_ms;
use crate::config::duration::show;
use crate::config::ListenerConfig;
use crate::discovery::{Endpoint, EndpointSet, EndpointState, Health};
use crate::state::ListenerState;
use crate::tls::handshake::{self, Failed};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;

pub(crate) struct Upstream {
    pub(crate) stream: UpstreamStream,
    pub(crate) addr: SocketAddr,
    pub(crate) state: Arc<EndpointState>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// Nothing eligible to try.
    #[error("no eligible endpoint")]
    NoEndpoint,
    /// Every attempt failed; the last error says why.
    #[error("{attempts} attempt(s) failed, the last: {last}")]
    Failed { attempts: usize, last: String },
}

/// At most this many endpoints are tried for one connection, whatever the config says,
/// so the tried list lives on the stack.
const MAX_ATTEMPTS: usize = 16;

fn awaiting_first_check(set: &EndpointSet) -> bool {
    set.endpoints
        .iter()
        .any(|endpoint| endpoint.state.health() == Health::Unknown)
}

/// Until an endpoint is eligible, or none is waiting for its first check any more, at
/// most `limit`. A wake-up can be for a set this connection already saw (publication and
/// notification are not one atomic step), so look again after every one.
async fn wait_for_health(listener: &ListenerState, limit: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let changed = listener.endpoints.health_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // Checked after arming, so a change between the check and the wait is not missed.
        let set = listener.endpoints.load();
        if set.healthy_count(monotonic_ms()) > 0 || !awaiting_first_check(&set) {
            return;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return;
        }
    }
}

/// The not-yet-tried last-resort candidate that was good most recently (the first in
/// target order on a tie).
fn last_resort_pick(set: &EndpointSet, tried: &[usize]) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    for (index, endpoint) in set.endpoints.iter().enumerate() {
        if tried.contains(&index) || !endpoint.state.is_last_resort() {
            continue;
        }
        let good = endpoint.state.last_good_ms();
        if best.is_none_or(|(_, best_good)| good > best_good) {
            best = Some((index, good));
        }
    }
    best.map(|(index, _)| index)
}

/// TCP connect, then the TLS handshake when the listener originates TLS. A handshake
/// or verification failure counts as a failed connect (the next endpoint is tried);
/// nothing is ever sent in plaintext instead.
async fn dial(
    listener: &ListenerState,
    addr: SocketAddr,
    target: Option<&str>,
    config: &ListenerConfig,
) -> Result<UpstreamStream, (&'static str, String)> {
    let failed = |error: std::io::Error| (error_reason(&error), error.to_string());
    let stream = match config.socket_buffer {
        None => TcpStream::connect(addr).await.map_err(failed)?,
        // Before connect, so the window offered in the handshake already fits.
        Some(size) => {
            let socket = match addr {
                SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
                SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
            }
            .map_err(failed)?;
            super::set_buffers(&socket, size);
            socket.connect(addr).await.map_err(failed)?
        }
    };
    super::tune(&stream, config.tcp_user_timeout);
    let Some(tls) = listener.tls.client.load_full() else {
        return Ok(UpstreamStream::Plain(stream));
    };
    let name = crate::tls::client::server_name(&tls.config, target, addr.ip());
    // Boxed: a handshake's state must not size every plaintext connection's task.
    match Box::pin(handshake::connect(&tls, name, stream, &listener.metrics)).await {
        Ok(stream) => Ok(UpstreamStream::Tls(Box::new(stream))),
        Err(Failed { reason, error }) => {
            Err(("tls", format!("TLS handshake failed ({reason}): {error}")))
        }
    }
}

/// Why a TCP connect failed, as the `reason` label of
/// `legate_upstream_connect_errors_total`: a refusal (nothing listening), an
/// unreachable network, local port exhaustion (EADDRNOTAVAIL, clears as TIME_WAIT ages
/// out) and descriptor exhaustion are told apart, since each asks for a different fix.
fn error_reason(error: &std::io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::ECONNREFUSED) => "refused",
        Some(libc::ETIMEDOUT) => "timeout",
        Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EINVAL) => "unreachable",
        Some(libc::EADDRNOTAVAIL) => "addr_not_available",
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => "fd_exhausted",
        Some(libc::ECONNRESET) => "reset",
        _ => "other",
    }
}

/// Dial one endpoint under `connect_timeout`, with the bookkeeping of either outcome: the
/// dial's time, the end of an ejection on success; on failure the passive ejection, the
/// counters and a rate-limited warning. The error says why the dial failed.
async fn try_endpoint(
    listener: &ListenerState,
    config: &ListenerConfig,
    endpoint: &Endpoint,
) -> Result<Upstream, String> {
    let started = Instant::now();
    let result = tokio::time::timeout(
        config.connect_timeout,
        dial(
            listener,
            endpoint.addr,
            endpoint.sources.first().map(|s| &**s),
            config,
        ),
    )
    .await;
    listener
        .metrics
        .connect_seconds
        .observe(started.elapsed().as_secs_f64());
    let (reason, error) = match result {
        Ok(Ok(stream)) => {
            endpoint.state.connect_succeeded(monotonic_ms());
            return Ok(Upstream {
                stream,
                addr: endpoint.addr,
                state: Arc::clone(&endpoint.state),
            });
        }
        Ok(Err(failed)) => failed,
        Err(_) => (
            "timeout",
            format!("timed out after {}", show(config.connect_timeout)),
        ),
    };
    let ejected = endpoint.state.connect_failed(monotonic_ms());
    listener.metrics.connect_failure(&endpoint.addr.to_string());
    listener.metrics.connect_error(reason);
    if let Some(suppressed) = listener.warn_limit.allow(monotonic_ms(), 1000) {
        tracing::warn!(
            listener = %listener.name,
            endpoint = %endpoint.addr,
            %error,
            reason,
            ejected_for = %show(ejected),
            suppressed,
            "upstream connect failed"
        );
    }
    Err(error)
}

/// Pick and dial an endpoint, trying the next on failure, up to `connect_attempts`.
pub(crate) async fn connect(
    listener: &ListenerState,
    config: &ListenerConfig,
) -> Result<Upstream, ConnectError> {
    let mut set = listener.endpoints.load();
    let balancer = listener.balancer.load();
    let attempts = (config.connect_attempts as usize).clamp(1, MAX_ATTEMPTS);
    let mut tried = [usize::MAX; MAX_ATTEMPTS];
    let mut last = None;
    let mut waited = false;
    let mut last_resort = false;
    let mut attempt = 0;
    while attempt < attempts {
        let picked = if last_resort {
            last_resort_pick(&set, &tried[..attempt])
        } else {
            balancer.pick(&set, &tried[..attempt], monotonic_ms())
        };
        let index = match picked {
            Some(index) => index,
            // Endpoints that just appeared (a rewritten file, a new DNS answer) get no
            // traffic until their first check passes, which takes a moment. Rather than
            // fail a connection that arrives in that gap, wait for it, once, within
            // connect_timeout.
            None if attempt == 0 && !waited && awaiting_first_check(&set) => {
                waited = true;
                wait_for_health(listener, config.connect_timeout).await;
                set = listener.endpoints.load();
                continue;
            }
            None if !last_resort && set.healthy_count(monotonic_ms()) == 0 => {
                last_resort = true;
                let Some(index) = last_resort_pick(&set, &tried[..attempt]) else {
                    break;
                };
                listener.metrics.last_resort.inc();
                index
            }
            None => break,
        };
        tried[attempt] = index;
        match try_endpoint(listener, config, &set.endpoints[index]).await {
            Ok(upstream) => return Ok(upstream),
            Err(error) => last = Some(error),
        }
        attempt += 1;
    }
    match last {
        None => Err(ConnectError::NoEndpoint),
        Some(last) => Err(ConnectError::Failed {
            attempts: tried.iter().filter(|&&i| i != usize::MAX).count(),
            last,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::set;

    #[test]
    fn last_resort_takes_the_most_recently_good_untried_candidate() {
        // (weight, backup, healthy): all unhealthy.
        let set = set(&[(1, false, false), (1, false, false), (1, false, false)]);
        let [a, b, c] = [0, 1, 2].map(|i| &set.endpoints[i].state);
        for state in [a, b] {
            state.note_failure(true);
            state.record_check(Err("connect: refused".into()), 1, 1);
        }
        // c answered something that rules it out.
        c.note_failure(false);
        c.record_check(Err("-LOADING".into()), 1, 1);
        assert_eq!(
            last_resort_pick(&set, &[]),
            Some(0),
            "a tie goes to target order"
        );
        b.connect_succeeded(5_000);
        assert_eq!(last_resort_pick(&set, &[]), Some(1));
        assert_eq!(last_resort_pick(&set, &[1]), Some(0));
        assert_eq!(
            last_resort_pick(&set, &[0, 1]),
            None,
            "never the ruled-out one"
        );
    }
}
