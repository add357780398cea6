//! The running set of listeners: each one's state, accept loop and socket, started,
//! published to the shared state (and to the handover offer), and stopped.

use super::handover::{self, protocol::Role};
use super::Source;
use crate::config::{Config, ListenerConfig, Target};
use crate::discovery;
use crate::discovery::dns::DnsResolver;
use crate::health;
use crate::proxy::listener;
use crate::state::{ListenerState, Shared};
use crate::tls::{self, Expiry, ListenerTls};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running listener: its state and its accept loop, which hands the socket back when
/// it stops (so a reload can move an address from one listener to another).
pub(super) struct Running {
    pub(super) state: Arc<ListenerState>,
    pub(super) accept_loop: JoinHandle<TcpListener>,
    /// A duplicate of its socket's descriptor, for a handover.
    pub(super) offered: Option<(handover::protocol::Offered, Arc<OwnedFd>)>,
}

pub(super) struct Listeners {
    pub(super) shared: Arc<Shared>,
    pub(super) resolver: Arc<DnsResolver>,
    pub(super) config: Config,
    pub(super) source: Source,
    pub(super) background: CancellationToken,
    pub(super) accepting: CancellationToken,
    pub(super) connections: CancellationToken,
    pub(super) tracker: TaskTracker,
    pub(super) running: Vec<Running>,
    /// Cancelled once accepting may begin: at once, or, when this process took the
    /// sockets over, at the commit (until then the old process accepts).
    pub(super) go: CancellationToken,
    /// What a handover would offer now; the admin and handoff sockets never change.
    pub(super) offer: Arc<handover::Offer>,
    pub(super) fixed_offer: Vec<(handover::protocol::Offered, Arc<OwnedFd>)>,
}

impl Listeners {
    pub(super) fn start_listener(
        &self,
        config: ListenerConfig,
        (tls, expiries): (ListenerTls, Vec<Expiry>),
        socket: TcpListener,
    ) -> Running {
        tls::publish_expiries(&self.shared.metrics, &config.name, &expiries);
        let state = Arc::new(ListenerState::new(
            config,
            tls,
            &self.shared.metrics,
            &self.accepting,
            &self.background,
        ));
        self.start_discovery(&state);
        tokio::spawn(health::run(
            Arc::clone(&state),
            Arc::clone(&self.shared),
            state.tasks.clone(),
        ));
        tracing::info!(listener = %state.name, listen = %state.config.load().listen, "listening");
        let listen = state.config.load().listen;
        let offered = handover::offered(
            Role::Listener,
            &state.name,
            listen.to_string(),
            socket.as_fd(),
        );
        let (go, stop) = (self.go.clone(), state.accept_token.clone());
        let (serving, tracker, connections) = (
            Arc::clone(&state),
            self.tracker.clone(),
            self.connections.clone(),
        );
        // Bound from now on, whether this process accepts yet or (before a takeover
        // commits) the old one still does: `/ready` must not call the address unbound the
        // moment the admin port starts answering, before the accept loop has run.
        state
            .bound
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let accept_loop = tokio::spawn(async move {
            // Before `go` (a handover not committed yet) the old process accepts.
            tokio::select! {
                biased;
                _ = stop.cancelled() => return socket,
                _ = go.cancelled() => {}
            }
            listener::serve(serving, socket, tracker, connections).await
        });
        Running {
            state,
            accept_loop,
            offered,
        }
    }

    pub(super) fn publish_listeners(&self) {
        let states = self.running.iter().map(|r| Arc::clone(&r.state)).collect();
        self.shared.listeners.store(Arc::new(states));
        self.shared.readiness_changed.notify_one();
        let mut offer = self.fixed_offer.clone();
        offer.extend(self.running.iter().filter_map(|r| r.offered.clone()));
        self.offer.replace(offer);
    }

    /// Start one discovery task per target under a fresh token (replacing the old).
    pub(super) fn start_discovery(&self, state: &Arc<ListenerState>) {
        let token = state.tasks.child_token();
        let previous = std::mem::replace(
            &mut *state
                .discovery
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            token.clone(),
        );
        previous.cancel();
        let config = state.config.load_full();
        tokio::spawn(super::tls_reload::follow(
            Arc::clone(state),
            Arc::clone(&self.shared),
            token.clone(),
        ));
        for target in &config.upstream {
            let key = target.to_string();
            let (listener, shared) = (Arc::clone(state), Arc::clone(&self.shared));
            match target {
                Target::Static(addr) => discovery::fixed::publish(&state.endpoints, &key, *addr),
                Target::Dns { host, port } => {
                    tokio::spawn(discovery::dns::run(
                        Arc::clone(&self.resolver),
                        listener,
                        shared,
                        key,
                        host.clone(),
                        *port,
                        token.clone(),
                    ));
                }
                Target::Srv(name) => {
                    tokio::spawn(discovery::dns::run_srv(
                        Arc::clone(&self.resolver),
                        listener,
                        shared,
                        key,
                        name.clone(),
                        token.clone(),
                    ));
                }
                Target::File(path) => {
                    tokio::spawn(discovery::file::run(
                        Arc::clone(&self.resolver),
                        listener,
                        shared,
                        key,
                        path.clone(),
                        token.clone(),
                    ));
                }
            }
        }
        self.shared.readiness_changed.notify_one();
    }

    /// Stop a listener's accept loop and background tasks; returns its socket.
    pub(super) async fn stop_listener(running: Running) -> Option<TcpListener> {
        running.state.accept_token.cancel();
        running.state.tasks.cancel();
        running.accept_loop.await.ok()
    }
}
