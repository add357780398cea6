//! Active health checks.
//!
//! One task per listener checks every endpoint of the current snapshot concurrently,
//! each under the configured timeout, and feeds the result through the rise/fall
//! thresholds into the endpoint's shared state. An endpoint that appears is checked at
//! once (woken by the endpoint set's change notification), not at the next interval;
//! periodic probes start with a little jitter so many endpoints (and many sidecars) are
//! not probed at the same instant. The checks run in their own tasks and never touch the
//! forwarding path.
//!
//! The check itself sits behind the `Check` trait: `tcp` (connect), `redis` (`PING`),
//! `redis-primary` (`ROLE`) and `mysql` (the server greeting). Every reply is read into
//! a buffer bounded at 64 KiB, so a backend that answers garbage or a megabyte fails the
//! check with a clear reason and bounded memory.
//!
//! A failure counts toward `unhealthy_after`, except a clear "not eligible" answer (a
//! Redis replica under `redis-primary`): that endpoint is unhealthy at once, since every
//! write sent to it would fail with READONLY. With `close_on_unhealthy`, an endpoint that
//! turns unhealthy has its open client connections closed, so clients reconnect and
//! land on an eligible endpoint (the new Redis primary).

pub(crate) mod mysql;
pub(crate) mod redis;
mod tcp;

use crate::config::duration::show;
use crate::config::{CheckKind, HealthConfig};
use crate::discovery::{EndpointSet, EndpointState, Health};
use crate::state::{ListenerState, Shared};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why a check did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// What went wrong, for logs and `/endpoints` (never a secret).
    pub(crate) reason: String,
    /// An extra fact still worth showing, such as a Redis replica's role.
    pub(crate) detail: Option<String>,
    /// The endpoint answered clearly that it must get no traffic (a replica under
    /// `redis-primary`): unhealthy at once, whatever `unhealthy_after` says.
    pub(crate) not_eligible: bool,
    /// The check could not connect at all (refused, timed out, unreachable): nothing the
    /// endpoint said rules it out, so it stays a last-resort candidate.
    pub(crate) unreachable: bool,
}

impl Failure {
    pub(crate) fn new(reason: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            detail: None,
            not_eligible: false,
            unreachable: false,
        }
    }

    /// The TCP connect itself failed or timed out.
    pub(crate) fn unreachable(reason: impl Into<String>) -> Failure {
        Failure {
            unreachable: true,
            ..Failure::new(reason)
        }
    }

    pub(crate) fn not_eligible(reason: impl Into<String>, detail: impl Into<String>) -> Failure {
        Failure {
            reason: reason.into(),
            detail: Some(detail.into()),
            not_eligible: true,
            unreachable: false,
        }
    }
}

/// `Ok(detail)` when the endpoint passed (detail: e.g. a Redis role), `Err` if not.
pub(crate) type CheckResult = Result<Option<String>, Failure>;

pub(crate) trait Check: Send + Sync + 'static {
    /// Probe `addr`; the check should give up at `deadline` with a reason that says
    /// what it was waiting for (the runner also enforces the deadline).
    fn check(
        &self,
        target: Probe,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = CheckResult> + Send + '_>>;
}

fn checker_for(config: &HealthConfig) -> Option<Arc<dyn Check>> {
    match config.check {
        CheckKind::None => None,
        CheckKind::Tcp => Some(Arc::new(tcp::TcpCheck)),
        CheckKind::Redis => Some(Arc::new(redis::RedisCheck::ping(config.password.clone()))),
        CheckKind::RedisPrimary => Some(Arc::new(redis::RedisCheck::role(config.password.clone()))),
        CheckKind::Mysql => Some(Arc::new(mysql::MysqlCheck {
            user: config.user.clone(),
        })),
    }
}

/// Where a check goes: the endpoint, and the listener's TLS settings when the upstream
/// speaks TLS (checks then run inside a TLS session, as the traffic does).
#[derive(Clone)]
pub(crate) struct Probe {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: Option<(
        Arc<crate::tls::ClientSide>,
        rustls::pki_types::ServerName<'static>,
    )>,
}

/// A connected check stream, plain or TLS.
trait ProbeStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ProbeStream for T {}

/// Connect (and handshake, for TLS) before `deadline`.
async fn connect(target: &Probe, deadline: Instant) -> Result<Box<dyn ProbeStream>, Failure> {
    let stream = match tokio::time::timeout_at(
        deadline,
        tokio::net::TcpStream::connect(target.addr),
    )
    .await
    {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            stream
        }
        Ok(Err(error)) => return Err(Failure::unreachable(format!("connect: {error}"))),
        Err(_) => return Err(Failure::unreachable("connect: timed out")),
    };
    let Some((tls, name)) = &target.tls else {
        return Ok(Box::new(stream));
    };
    match tokio::time::timeout_at(deadline, tls.connector.connect(name.clone(), stream)).await {
        Ok(Ok(stream)) => Ok(Box::new(stream)),
        Ok(Err(error)) => Err(Failure::new(format!(
            "TLS handshake failed ({}): {error}",
            crate::tls::failure_reason(&error)
        ))),
        Err(_) => Err(Failure::new("TLS handshake: timed out")),
    }
}

/// Read the next bytes of a reply into `buf`, never beyond `cap` bytes in all (the
/// buffer grows only as bytes arrive, never from a length the peer sent). `what` names
/// the reply in errors: "connection closed without a greeting", "... mid-reply".
pub(crate) async fn read_more(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    cap: usize,
    what: &str,
) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let room = cap.saturating_sub(buf.len()).min(chunk.len());
    let read = stream
        .read(&mut chunk[..room])
        .await
        .map_err(|error| format!("read: {error}"))?;
    if read == 0 {
        return Err(if buf.is_empty() {
            format!("connection closed without a {what}")
        } else {
            format!(
                "connection closed mid-{what} (truncated after {} bytes)",
                buf.len()
            )
        });
    }
    buf.extend_from_slice(&chunk[..read]);
    Ok(())
}

/// Untrusted bytes made fit for a log line: lossy UTF-8, control characters escaped,
/// at most `max` characters.
pub(crate) fn printable(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == max {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Check `listener`'s endpoints until `token` is cancelled.
pub(crate) async fn run(
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    token: CancellationToken,
) {
    let mut only_new = false;
    // The first round runs at once, unspread: readiness (and a handover's commit) waits
    // for it, and processes start at different times anyway.
    let mut first = true;
    loop {
        let changed = listener.endpoints.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();

        let config = listener.config.load_full();
        let health = &config.health;
        let set = listener.endpoints.load();
        let any_change = match checker_for(health) {
            None => {
                for endpoint in &set.endpoints {
                    endpoint.state.assume_healthy();
                }
                true
            }
            // Newcomers are checked at once; periodic probes of many endpoints are
            // spread over up to a tenth of the interval.
            Some(checker) => {
                let spread = !(only_new || first);
                check_round(&listener, checker, health, &set, only_new, spread).await
            }
        };
        first = false;
        if any_change {
            listener.endpoints.health_changed.notify_waiters();
            shared.readiness_changed.notify_one();
        }

        // Jitter spreads the probes of many endpoints and many sidecars over time.
        let jitter = health.interval.mul_f64(fastrand::f64() * 0.1);
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(health.interval + jitter) => only_new = false,
            _ = &mut changed => only_new = true,
        }
    }
}

/// One round: every endpoint of `set` (with `only_new`, only those never checked) checked
/// concurrently, each started after a random delay when `spread`. Returns true when an
/// endpoint's health changed.
async fn check_round(
    listener: &ListenerState,
    checker: Arc<dyn Check>,
    health: &HealthConfig,
    set: &EndpointSet,
    only_new: bool,
    spread: bool,
) -> bool {
    let tls = listener.tls.client.load_full();
    let mut checks = JoinSet::new();
    for endpoint in &set.endpoints {
        if only_new && endpoint.state.health() != Health::Unknown {
            continue;
        }
        let addr = endpoint.addr;
        let probe = Probe {
            addr,
            tls: tls.as_ref().map(|tls| {
                let target = endpoint.sources.first().map(|source| &**source);
                let name = crate::tls::client::server_name(&tls.config, target, addr.ip());
                (Arc::clone(tls), name)
            }),
        };
        let delay = if spread {
            health.interval.mul_f64(fastrand::f64() * 0.1)
        } else {
            Duration::ZERO
        };
        checks.spawn(check_one(
            Arc::clone(&checker),
            probe,
            Arc::clone(&endpoint.state),
            health.timeout,
            delay,
        ));
    }
    let mut any_change = false;
    while let Some(joined) = checks.join_next().await {
        match joined {
            Ok((addr, state, result)) => {
                any_change |= record(listener, health, addr, &state, result)
            }
            Err(error) => {
                tracing::error!(listener = %listener.name, %error, "health check task failed")
            }
        }
    }
    any_change
}

/// One check of `probe` after `delay`, cut off after `timeout`.
async fn check_one(
    checker: Arc<dyn Check>,
    probe: Probe,
    state: Arc<EndpointState>,
    timeout: Duration,
    delay: Duration,
) -> (SocketAddr, Arc<EndpointState>, CheckResult) {
    tokio::time::sleep(delay).await;
    let addr = probe.addr;
    let deadline = Instant::now() + timeout;
    let result = match tokio::time::timeout_at(deadline, checker.check(probe, deadline)).await {
        Ok(result) => result,
        Err(_) => Err(Failure::new(format!("timed out after {}", show(timeout)))),
    };
    (addr, state, result)
}

/// Feed one check's result through the rise/fall thresholds into the endpoint's state, and
/// log (and with `close_on_unhealthy`, act on) a change. Returns true when health changed.
fn record(
    listener: &ListenerState,
    health: &HealthConfig,
    addr: SocketAddr,
    state: &EndpointState,
    result: CheckResult,
) -> bool {
    let passed = result.is_ok();
    listener
        .metrics
        .health_check(if passed { "pass" } else { "fail" });
    let (result, detail, unhealthy_after) = match result {
        Ok(detail) => (Ok(()), detail, health.unhealthy_after),
        Err(failure) => {
            tracing::debug!(listener = %listener.name, endpoint = %addr, reason = %failure.reason, "health check failed");
            state.note_failure(failure.unreachable);
            let unhealthy_after = if failure.not_eligible {
                1
            } else {
                health.unhealthy_after
            };
            (Err(failure.reason), failure.detail, unhealthy_after)
        }
    };
    let error = result.as_ref().err().cloned();
    if !state.record_result(result, detail, health.healthy_after, unhealthy_after) {
        return false;
    }
    match error {
        None => {
            tracing::info!(listener = %listener.name, endpoint = %addr, detail = state.detail(), "endpoint is healthy")
        }
        Some(error) => {
            tracing::warn!(listener = %listener.name, endpoint = %addr, %error, "endpoint is unhealthy");
            if health.close_on_unhealthy {
                let open = state.active.load(std::sync::atomic::Ordering::Relaxed);
                tracing::info!(listener = %listener.name, endpoint = %addr, open, "closing client connections (close_on_unhealthy)");
                state.close_connections();
            }
        }
    }
    true
}
