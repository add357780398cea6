//! Readiness: `/ready` is 200 while every required listener is bound and has at least
//! one endpoint eligible for traffic, and the process is not draining. `/startup` is a
//! latch: 200 from the first time the process was ready, for good.
//!
//! A watcher task keeps the outside views in step — the `legate_ready` gauge, the
//! `legate_endpoints` gauges and the `ready_file` — waking on health or endpoint changes
//! and at least every 250ms (passive ejections expire by the clock alone).

use crate::clock::monotonic_ms;
use crate::discovery::Health;
use crate::state::Shared;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Why the process is not ready, one line per cause; empty when ready.
pub(crate) fn reasons(shared: &Shared) -> Vec<String> {
    let mut reasons = Vec::new();
    if shared.is_draining() {
        reasons.push("draining: shutting down".to_string());
    }
    let now = monotonic_ms();
    for listener in shared.listeners.load().iter() {
        let config = listener.config.load();
        if !config.required {
            continue;
        }
        let prefix = format!("listener {} ({})", listener.name, config.listen);
        if !listener.bound.load(Relaxed) && !shared.handing_over.load(Relaxed) {
            reasons.push(format!("{prefix}: not bound"));
            continue;
        }
        let set = listener.endpoints.load();
        if set.healthy_count(now) > 0 {
            continue;
        }
        let mut why = Vec::new();
        for source in listener.endpoints.sources() {
            if !source.resolved {
                let error = source
                    .error
                    .as_deref()
                    .unwrap_or("waiting for the first answer");
                why.push(format!("target {} not resolved: {error}", source.target));
            }
        }
        for endpoint in &set.endpoints {
            let state = &endpoint.state;
            let detail = match (state.health(), state.ejected_for(now)) {
                (Health::Healthy, Some(left)) => {
                    format!("ejected for {}ms after a failed connect", left.as_millis())
                }
                (Health::Unknown, _) => "not checked yet".to_string(),
                (health, _) => {
                    let error = state
                        .last_check()
                        .and_then(|check| check.error)
                        .or_else(|| state.detail())
                        .unwrap_or_default();
                    format!("{} {error}", health.as_str())
                        .trim_end()
                        .to_string()
                }
            };
            why.push(format!("{} {detail}", endpoint.addr));
        }
        if set.endpoints.is_empty() && why.is_empty() {
            why.push("no endpoints".to_string());
        }
        reasons.push(format!(
            "{prefix}: no healthy endpoint ({})",
            why.join("; ")
        ));
    }
    reasons
}

pub(crate) fn latch_started(shared: &Shared) {
    if !shared.started.swap(true, Relaxed) {
        tracing::info!("ready: every required listener has a healthy endpoint");
    }
}

/// Bring the gauges, the startup latch and the ready file in line with the state now.
pub(crate) fn refresh(shared: &Shared) {
    let now = monotonic_ms();
    for listener in shared.listeners.load().iter() {
        let set = listener.endpoints.load();
        let healthy = set.healthy_count(now);
        listener.metrics.endpoints_healthy.set(healthy as i64);
        listener
            .metrics
            .endpoints_unhealthy
            .set((set.endpoints.len() - healthy) as i64);
    }
    let ready = reasons(shared).is_empty();
    shared.metrics.ready.set(ready as i64);
    if ready {
        latch_started(shared);
    }
    // After a handover the ready file is the newcomer's to keep.
    if shared.handing_over.load(Relaxed) {
        return;
    }
    if let Some(path) = &shared.ready_file {
        let exists = path.exists();
        let result = match (ready, exists) {
            (true, false) => std::fs::write(path, b"ready\n"),
            (false, true) => std::fs::remove_file(path),
            _ => Ok(()),
        };
        if let Err(error) = result {
            tracing::warn!(path = %path.display(), %error, "cannot update ready_file");
        }
    }
}

/// Keep the outside views of readiness current until `token` is cancelled; the ready
/// file is removed on the way out.
pub(crate) async fn publish(shared: Arc<Shared>, token: CancellationToken) {
    loop {
        refresh(&shared);
        tokio::select! {
            _ = token.cancelled() => break,
            _ = shared.readiness_changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
    // After a handover the ready file is the newcomer's to keep.
    if let (Some(path), false) = (&shared.ready_file, shared.handing_over.load(Relaxed)) {
        let _ = std::fs::remove_file(path);
    }
}
