//! `/endpoints`: each listener, its targets (where endpoints came from, when they were
//! last read or resolved, the last error) and its endpoints (health, eligibility,
//! passive ejection, open connections, last check). Never includes secrets.

use crate::clock::monotonic_ms;
use crate::state::Shared;
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{SystemTime, UNIX_EPOCH};

fn unix(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| (d.as_millis() as f64) / 1000.0)
        .unwrap_or(0.0)
}

pub(crate) fn render(shared: &Shared) -> Vec<u8> {
    let now = monotonic_ms();
    let listeners: Vec<Value> = shared
        .listeners
        .load()
        .iter()
        .map(|listener| {
            let config = listener.config.load();
            let set = listener.endpoints.load();
            let targets: Vec<Value> = listener
                .endpoints
                .sources()
                .iter()
                .map(|source| {
                    json!({
                        "target": &*source.target,
                        "resolved": source.resolved,
                        "updated": source.updated.map(unix),
                        "error": source.error,
                        "endpoints": source.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let endpoints: Vec<Value> = set
                .endpoints
                .iter()
                .map(|endpoint| {
                    let state = &endpoint.state;
                    let check = state.last_check();
                    json!({
                        "address": endpoint.addr.to_string(),
                        "sources": endpoint.sources.iter().map(|s| &**s).collect::<Vec<_>>(),
                        "weight": endpoint.weight,
                        "backup": endpoint.backup,
                        "health": state.health().as_str(),
                        "eligible": state.is_eligible(now),
                        "ejected_for_ms": state.ejected_for(now).map(|d| d.as_millis() as u64),
                        "active_connections": state.active.load(Relaxed),
                        "last_check": check.as_ref().map(|c| unix(c.at)),
                        "last_error": check.and_then(|c| c.error),
                        "detail": state.detail(),
                    })
                })
                .collect();
            json!({
                "name": listener.name,
                "listen": config.listen.to_string(),
                "bound": listener.bound.load(Relaxed),
                "required": config.required,
                "balance": config.balance.as_str(),
                "check": config.health.check.as_str(),
                "active_connections": listener.active.load(Relaxed),
                "targets": targets,
                "endpoints": endpoints,
            })
        })
        .collect();
    let body = json!({
        "ready": super::ready::reasons(shared).is_empty(),
        "draining": shared.is_draining(),
        "listeners": listeners,
    });
    let mut out = serde_json::to_vec_pretty(&body).unwrap_or_default();
    out.push(b'\n');
    out
}
