//! DNS A/AAAA targets (`dns:HOST:PORT` and bare `HOST:PORT`).
//!
//! TODO(issue 3): resolve with hickory through `[dns] servers`, following each answer's
//! TTL clamped to `min_ttl`/`max_ttl`, and SRV. Until then names are resolved through
//! the system resolver and refreshed every `max_ttl`, keeping the last good answer on
//! failure.

use super::EndpointSpec;
use crate::state::{ListenerState, Shared};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub async fn run(
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    target: String,
    host: String,
    port: u16,
    refresh: Duration,
    token: CancellationToken,
) {
    let mut retry = Duration::from_millis(250);
    loop {
        let wait = match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(addrs) => {
                let mut specs: Vec<EndpointSpec> = Vec::new();
                for addr in addrs {
                    if !specs.iter().any(|s| s.addr == addr) {
                        specs.push(EndpointSpec::plain(addr));
                    }
                }
                shared.metrics.reload("dns", true);
                listener.endpoints.update(&target, specs);
                shared.readiness_changed.notify_one();
                retry = Duration::from_millis(250);
                refresh
            }
            Err(error) => {
                shared.metrics.reload("dns", false);
                tracing::warn!(%target, %error, "DNS lookup failed; keeping the last good answer");
                listener
                    .endpoints
                    .source_failed(&target, format!("lookup failed: {error}"));
                let wait = retry;
                retry = (retry * 2).min(Duration::from_secs(30));
                wait
            }
        };
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
