//! Active health checks.
//!
//! One task per listener checks every endpoint of the current snapshot concurrently,
//! each under the configured timeout, and feeds the result through the rise/fall
//! thresholds into the endpoint's shared state. An endpoint that appears is checked at
//! once (woken by the endpoint set's change notification), not at the next interval.
//! The check itself sits behind the `Check` trait so protocol checks slot in beside `tcp`.

mod tcp;

use crate::config::{CheckKind, HealthConfig};
use crate::discovery::Health;
use crate::state::{ListenerState, Shared};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// `Ok(detail)` when the endpoint passed (detail: e.g. a Redis role), `Err(reason)` if not.
pub type CheckResult = Result<Option<String>, String>;

pub trait Check: Send + Sync + 'static {
    fn check(&self, addr: SocketAddr) -> Pin<Box<dyn Future<Output = CheckResult> + Send + '_>>;
}

fn checker_for(config: &HealthConfig) -> Option<Arc<dyn Check>> {
    match config.check {
        CheckKind::None => None,
        // TODO(issue 4): protocol checks (redis, redis-primary, mysql) replace the connect.
        CheckKind::Tcp | CheckKind::Redis | CheckKind::RedisPrimary | CheckKind::Mysql => {
            Some(Arc::new(tcp::TcpCheck))
        }
    }
}

/// Check `listener`'s endpoints until `token` is cancelled.
pub async fn run(listener: Arc<ListenerState>, shared: Arc<Shared>, token: CancellationToken) {
    let mut only_new = false;
    loop {
        let changed = listener.endpoints.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();

        let config = listener.config.load_full();
        let health = &config.health;
        let set = listener.endpoints.load();
        let mut any_change = false;
        match checker_for(health) {
            None => {
                for endpoint in &set.endpoints {
                    endpoint.state.assume_healthy();
                }
                any_change = true;
            }
            Some(checker) => {
                let mut checks = JoinSet::new();
                for endpoint in &set.endpoints {
                    if only_new && endpoint.state.health() != Health::Unknown {
                        continue;
                    }
                    let checker = Arc::clone(&checker);
                    let state = Arc::clone(&endpoint.state);
                    let addr = endpoint.addr;
                    let timeout = health.timeout;
                    checks.spawn(async move {
                        let result = match tokio::time::timeout(timeout, checker.check(addr)).await
                        {
                            Ok(result) => result,
                            Err(_) => Err(format!("timed out after {}", show(timeout))),
                        };
                        (addr, state, result)
                    });
                }
                while let Some(joined) = checks.join_next().await {
                    let Ok((addr, state, result)) = joined else {
                        continue;
                    };
                    let passed = result.is_ok();
                    listener
                        .metrics
                        .health_check(if passed { "pass" } else { "fail" });
                    let error = result.as_ref().err().cloned();
                    if state.record_check(result, health.healthy_after, health.unhealthy_after) {
                        any_change = true;
                        match error {
                            None => {
                                tracing::info!(listener = %listener.name, endpoint = %addr, "endpoint is healthy")
                            }
                            Some(error) => {
                                tracing::warn!(listener = %listener.name, endpoint = %addr, %error, "endpoint is unhealthy")
                            }
                        }
                    }
                }
            }
        }
        if any_change {
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

/// `1s`, `250ms`: durations as the user wrote them in config.
pub fn show(duration: Duration) -> String {
    if duration.subsec_millis() == 0 && duration.as_secs() > 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}
