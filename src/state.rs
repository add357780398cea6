//! Shared state: what the data plane, the health checks and the admin server all read.
//!
//! `Shared` is built once per process; each listener has a `ListenerState` whose
//! configuration, balancer and endpoints can be swapped at run time (reloads) without
//! locks on the connection path.

use crate::balance::Balancer;
use crate::config::ListenerConfig;
use crate::discovery::Endpoints;
use crate::logging::RateLimit;
use crate::metrics::{ListenerMetrics, Metrics};
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub(crate) struct Shared {
    pub(crate) metrics: Metrics,
    pub(crate) listeners: ArcSwap<Vec<Arc<ListenerState>>>,
    /// Set once on SIGTERM or `/quitquitquit`: `/ready` turns 503 for good.
    pub(crate) draining: AtomicBool,
    /// Set when this process hands its sockets over to a newcomer: its listeners stop
    /// accepting, but their addresses stay bound (the newcomer accepts on them), so
    /// `/ready` must not call them unbound.
    pub(crate) handing_over: AtomicBool,
    /// `/startup` latch: set the first time the process is ready, never cleared.
    pub(crate) started: AtomicBool,
    pub(crate) ready_file: Option<PathBuf>,
    /// Wakes the readiness watcher early (health or endpoint changes, drain).
    pub(crate) readiness_changed: Notify,
    /// Cancelled to ask for a graceful shutdown (the admin `/quitquitquit` path).
    pub(crate) shutdown: CancellationToken,
    /// `SIDECARSET_VERSION` from the environment (OpenKruise hot upgrade), sent with every
    /// `/ready` answer so `legate wait --handover` can tell which container answers.
    pub(crate) sidecarset_version: Option<String>,
}

impl Shared {
    pub(crate) fn new(ready_file: Option<PathBuf>) -> Shared {
        Shared {
            metrics: Metrics::new(),
            listeners: ArcSwap::from_pointee(Vec::new()),
            draining: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            started: AtomicBool::new(false),
            ready_file,
            readiness_changed: Notify::new(),
            shutdown: CancellationToken::new(),
            sidecarset_version: std::env::var(crate::lifecycle::sidecarset::VERSION)
                .ok()
                .filter(|version| !version.is_empty()),
        }
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

pub(crate) struct ListenerState {
    pub(crate) name: String,
    pub(crate) config: ArcSwap<ListenerConfig>,
    pub(crate) balancer: ArcSwap<Balancer>,
    pub(crate) endpoints: Endpoints,
    pub(crate) metrics: ListenerMetrics,
    /// True while the listening socket is open.
    pub(crate) bound: AtomicBool,
    /// Client connections open now (the `max_connections` count).
    pub(crate) active: AtomicUsize,
    /// Cancelled when this listener is removed or the process stops accepting.
    pub(crate) accept_token: CancellationToken,
    /// Cancelled when this listener is removed: its health checks and discovery.
    pub(crate) tasks: CancellationToken,
    /// The discovery tasks of the current targets; replaced when the targets change.
    pub(crate) discovery: std::sync::Mutex<CancellationToken>,
    /// TLS material (origination and/or termination), swapped on certificate reload.
    pub(crate) tls: crate::tls::ListenerTls,
    /// Keeps per-connection warnings (connect failures, accept errors) to one a second.
    pub(crate) warn_limit: RateLimit,
}

impl ListenerState {
    pub(crate) fn new(
        config: ListenerConfig,
        tls: crate::tls::ListenerTls,
        metrics: &Metrics,
        accepting: &CancellationToken,
        background: &CancellationToken,
    ) -> Self {
        let tasks = background.child_token();
        let targets: Vec<String> = config.upstream.iter().map(|t| t.to_string()).collect();
        ListenerState {
            name: config.name.clone(),
            metrics: metrics.listener(&config.name),
            balancer: ArcSwap::from_pointee(Balancer::new(config.balance)),
            endpoints: Endpoints::new(&targets),
            config: ArcSwap::from_pointee(config),
            bound: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            accept_token: accepting.child_token(),
            discovery: std::sync::Mutex::new(tasks.child_token()),
            tasks,
            warn_limit: RateLimit::default(),
            tls,
        }
    }
}
