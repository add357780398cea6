//! Drain: stop accepting (after `shutdown_delay`), let open connections finish for up to
//! `drain_timeout`, then close the rest. A second SIGTERM or SIGINT ends it at once.

use super::listeners::Listeners;
use super::signals::Signals;
use crate::admin;
use crate::config::duration::show;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

impl Listeners {
    /// `announce`: turn `/ready` 503 first (a shutdown); not after a handover, where the
    /// address stays ready, served by the newcomer.
    pub(super) async fn drain(
        &mut self,
        signals: &mut Signals,
        cause: &str,
        delay: Duration,
        announce: bool,
    ) {
        let shared = &self.shared;
        if announce {
            shared.draining.store(true, Relaxed);
            admin::ready::refresh(shared);
        }
        // The offer holds duplicates of the listening sockets: once accepting stops they
        // must close, so new connections are refused rather than queued for no one. A
        // newcomer arriving now is refused (see `handover::serve`).
        self.fixed_offer.clear();
        let drain_timeout = self.config.runtime.drain_timeout;
        tracing::info!(
            cause,
            shutdown_delay = %show(delay),
            drain_timeout = %show(drain_timeout),
            "{}",
            if announce { "shutting down: /ready is 503" } else { "shutting down" }
        );
        let forced = tokio::select! {
            _ = tokio::time::sleep(delay) => None,
            signal = stop_requested(signals, announce) => Some(signal),
        };
        self.accepting.cancel();
        for running in std::mem::take(&mut self.running) {
            let _ = running.accept_loop.await;
        }
        self.offer.replace(Vec::new());
        self.tracker.close();
        let open = || -> usize {
            shared
                .listeners
                .load()
                .iter()
                .map(|l| l.active.load(Relaxed))
                .sum()
        };
        let forced = match forced {
            Some(signal) => Some(signal),
            None => {
                tracing::info!(
                    open = open(),
                    "stopped accepting; waiting for open connections"
                );
                tokio::select! {
                    _ = self.tracker.wait() => None,
                    _ = tokio::time::sleep(drain_timeout) => Some("drain_timeout"),
                    signal = stop_requested(signals, announce) => Some(signal),
                }
            }
        };
        match forced {
            None => tracing::info!("drained: every connection finished"),
            Some(why) => {
                tracing::info!(why, open = open(), "closing the connections still open");
                self.connections.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(2), self.tracker.wait()).await;
            }
        }
    }
}

/// The signal that ends a drain early. In a shutdown that is the second SIGTERM or
/// SIGINT (the first started it). After a handover, the drain started without one, so
/// only the second from now ends it: the first is what an orchestrator sends the old
/// container once the new one is ready (a SidecarSet hot upgrade swaps it for the empty
/// image), and it must not cut the connections still draining.
async fn stop_requested(signals: &mut Signals, announced: bool) -> &'static str {
    if !announced {
        let signal = signals.stop_requested().await;
        tracing::info!(
            signal,
            "still draining after a handover; a second signal ends the drain"
        );
    }
    signals.stop_requested().await
}
