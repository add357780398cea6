//! Dialling the upstream: pick, connect with `connect_timeout`, and on refusal or timeout
//! try the next distinct endpoint, up to `connect_attempts`. Only reached before any
//! client byte was forwarded, so a retry is always safe. A failed endpoint is passively
//! ejected with back-off.

use crate::config::{ListenerConfig, Target};
use crate::discovery::{monotonic_ms, EndpointState};
use crate::state::ListenerState;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;

/// The dialled upstream: plain TCP, or TLS when the listener originates TLS.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

pub struct Upstream {
    pub stream: UpstreamStream,
    pub addr: SocketAddr,
    pub state: Arc<EndpointState>,
}

#[derive(Debug)]
pub enum ConnectError {
    /// Nothing eligible to try.
    NoEndpoint,
    /// Every attempt failed; the last error says why.
    Failed { attempts: usize, last: String },
}

/// At most this many endpoints are tried for one connection, whatever the config says,
/// so the tried list lives on the stack.
const MAX_ATTEMPTS: usize = 16;

/// TCP connect, then the TLS handshake when the listener originates TLS. A handshake
/// or verification failure counts as a failed connect (the next endpoint is tried);
/// nothing is ever sent in plaintext instead.
async fn dial(
    listener: &ListenerState,
    addr: SocketAddr,
    target: Option<&str>,
) -> Result<UpstreamStream, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|error| error.to_string())?;
    super::tune(&stream);
    let Some(tls) = listener.tls.client.load_full() else {
        return Ok(UpstreamStream::Plain(stream));
    };
    let host = target.and_then(|target| match target.parse::<Target>() {
        Ok(Target::Dns { host, .. }) => Some(host),
        _ => None,
    });
    let name = crate::tls::client::server_name(&tls.config, host.as_deref(), addr.ip());
    let started = Instant::now();
    match tls.connector.connect(name, stream).await {
        Ok(stream) => {
            listener
                .metrics
                .tls_handshake_upstream
                .observe(started.elapsed().as_secs_f64());
            Ok(UpstreamStream::Tls(Box::new(stream)))
        }
        Err(error) => {
            let reason = crate::tls::failure_reason(&error);
            listener.metrics.tls_handshake_failed("upstream", reason);
            Err(format!("TLS handshake failed ({reason}): {error}"))
        }
    }
}

pub async fn connect(
    listener: &ListenerState,
    config: &ListenerConfig,
) -> Result<Upstream, ConnectError> {
    let set = listener.endpoints.load();
    let balancer = listener.balancer.load();
    let attempts = (config.connect_attempts as usize).clamp(1, MAX_ATTEMPTS);
    let mut tried = [usize::MAX; MAX_ATTEMPTS];
    let mut last = None;
    for attempt in 0..attempts {
        let Some(index) = balancer.pick(&set, &tried[..attempt], monotonic_ms()) else {
            break;
        };
        tried[attempt] = index;
        let endpoint = &set.endpoints[index];
        let started = Instant::now();
        let result = tokio::time::timeout(
            config.connect_timeout,
            dial(
                listener,
                endpoint.addr,
                endpoint.sources.first().map(|s| &**s),
            ),
        )
        .await;
        listener
            .metrics
            .connect_seconds
            .observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(Ok(stream)) => {
                endpoint.state.connect_succeeded();
                return Ok(Upstream {
                    stream,
                    addr: endpoint.addr,
                    state: Arc::clone(&endpoint.state),
                });
            }
            Ok(Err(error)) => error,
            Err(_) => format!(
                "timed out after {}",
                crate::health::show(config.connect_timeout)
            ),
        };
        let ejected = endpoint.state.connect_failed(monotonic_ms());
        listener.metrics.connect_failure(&endpoint.addr.to_string());
        if let Some(suppressed) = listener.warn_limit.allow(monotonic_ms(), 1000) {
            tracing::warn!(
                listener = %listener.name,
                endpoint = %endpoint.addr,
                %error,
                ejected_for = %crate::health::show(ejected),
                suppressed,
                "upstream connect failed"
            );
        }
        last = Some(error);
    }
    match last {
        None => Err(ConnectError::NoEndpoint),
        Some(last) => Err(ConnectError::Failed {
            attempts: tried.iter().filter(|&&i| i != usize::MAX).count(),
            last,
        }),
    }
}
