//! DNS targets: A/AAAA (`dns:HOST:PORT` and bare `HOST:PORT`) and SRV (`srv:NAME`).
//!
//! TODO(issue 3): hickory-resolver through `[dns] servers`, following each answer's TTL
//! clamped to `min_ttl`/`max_ttl`, SRV priorities and weights. Until then names are
//! resolved through the system resolver and refreshed every `max_ttl`, keeping the last
//! good answer on failure.

use super::EndpointSpec;
use crate::config::DnsConfig;
use crate::state::{ListenerState, Shared};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The process's resolver, built once from `[dns]`.
pub struct DnsResolver {
    config: DnsConfig,
}

impl DnsResolver {
    pub fn new(config: &DnsConfig) -> Result<DnsResolver, String> {
        Ok(DnsResolver {
            config: config.clone(),
        })
    }
}

/// Keep `target` (an A/AAAA name) resolved into `listener`'s endpoints until cancelled.
pub async fn run(
    resolver: Arc<DnsResolver>,
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    target: String,
    host: String,
    port: u16,
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
                resolver.config.max_ttl
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

/// Keep `target` (an SRV name) resolved into `listener`'s endpoints until cancelled.
pub async fn run_srv(
    resolver: Arc<DnsResolver>,
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    target: String,
    name: String,
    token: CancellationToken,
) {
    let _ = (resolver, shared, name, token);
    listener
        .endpoints
        .source_failed(&target, "SRV targets are not supported yet".into());
}
