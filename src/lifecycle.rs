//! The life of a `legate run` process: bind, serve, drain, exit.
//!
//! Start: the admin port and every listener are bound up front, so a taken address is a
//! start-up error naming it. Then discovery, health checks, the readiness watcher, the
//! admin server and the accept loops run as tasks under one root cancellation token.
//!
//! Shutdown (SIGTERM, SIGINT or `POST /quitquitquit`): `/ready` turns 503 at once (and
//! the ready file goes), listeners keep accepting for `shutdown_delay`, then stop (new
//! connections are refused at once), open connections get `drain_timeout` to finish,
//! the rest are closed, and the process exits 0 — a clean drain is not a failure. A
//! second SIGTERM or SIGINT ends the drain at once. SIGHUP during a drain is ignored.

use crate::admin;
use crate::config::{Config, Target};
use crate::discovery;
use crate::discovery::dns::DnsResolver;
use crate::health;
use crate::proxy::listener;
use crate::state::{ListenerState, Shared};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {what} address {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot set up DNS: {0}")]
    Dns(String),
}

struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> Result<Signals, StartError> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate()).map_err(StartError::Signals)?,
            interrupt: signal(SignalKind::interrupt()).map_err(StartError::Signals)?,
            hangup: signal(SignalKind::hangup()).map_err(StartError::Signals)?,
        })
    }

    /// The next SIGTERM or SIGINT (SIGHUPs are consumed and logged meanwhile).
    async fn stop_requested(&mut self) -> &'static str {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => return "SIGTERM",
                _ = self.interrupt.recv() => return "SIGINT",
                _ = self.hangup.recv() => {
                    tracing::info!("SIGHUP: configuration reload is not available yet; ignored");
                }
            }
        }
    }
}

/// Run until shut down; returns the exit code.
pub async fn run(config: Config) -> Result<i32, StartError> {
    let mut signals = Signals::install()?;
    let shared = Arc::new(Shared::new(config.admin.ready_file.clone()));
    // A ready file left by a killed predecessor must not claim readiness for us.
    if let Some(path) = &shared.ready_file {
        let _ = std::fs::remove_file(path);
    }

    let admin_socket = admin::server::bind(config.admin.listen)
        .await
        .map_err(|error| StartError::Bind {
            what: "admin",
            addr: config.admin.listen,
            error,
        })?;
    if !config.admin.listen.ip().is_loopback() {
        tracing::warn!(admin = %config.admin.listen, "the admin port is not on loopback: anyone who reaches it can stop legate");
    }

    let background = CancellationToken::new();
    let accepting = CancellationToken::new();
    let connections = CancellationToken::new();
    let tracker = TaskTracker::new();

    let mut sockets = Vec::new();
    let mut states = Vec::new();
    for listener_config in &config.listeners {
        let socket = listener::bind(listener_config.listen).map_err(|error| StartError::Bind {
            what: "listener",
            addr: listener_config.listen,
            error,
        })?;
        let state = Arc::new(ListenerState::new(
            listener_config.clone(),
            &shared.metrics,
            &accepting,
        ));
        sockets.push(socket);
        states.push(state);
    }
    shared.listeners.store(Arc::new(states.clone()));

    let resolver = Arc::new(DnsResolver::new(&config.dns).map_err(StartError::Dns)?);
    for state in &states {
        start_discovery(state, &shared, &resolver, &background);
        tokio::spawn(health::run(
            Arc::clone(state),
            Arc::clone(&shared),
            background.clone(),
        ));
    }
    tokio::spawn(admin::ready::watch(Arc::clone(&shared), background.clone()));
    tokio::spawn(admin::server::serve(
        admin_socket,
        Arc::clone(&shared),
        background.clone(),
    ));
    let mut accept_loops = Vec::new();
    for (state, socket) in states.iter().zip(sockets) {
        tracing::info!(listener = %state.name, listen = %state.config.load().listen, "listening");
        accept_loops.push(tokio::spawn(listener::serve(
            Arc::clone(state),
            socket,
            tracker.clone(),
            connections.clone(),
        )));
    }
    tracing::info!(admin = %config.admin.listen, "legate started");

    let cause = tokio::select! {
        signal = signals.stop_requested() => signal,
        _ = shared.shutdown.cancelled() => "/quitquitquit",
    };
    drain(
        &shared,
        &config,
        &mut signals,
        cause,
        &accepting,
        &connections,
        &tracker,
        accept_loops,
    )
    .await;
    background.cancel();
    // Let the readiness watcher remove the ready file before the runtime goes away.
    admin::ready::refresh(&shared);
    if let Some(path) = &shared.ready_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(0)
}

#[allow(clippy::too_many_arguments)]
async fn drain(
    shared: &Shared,
    config: &Config,
    signals: &mut Signals,
    cause: &str,
    accepting: &CancellationToken,
    connections: &CancellationToken,
    tracker: &TaskTracker,
    accept_loops: Vec<tokio::task::JoinHandle<()>>,
) {
    shared.draining.store(true, Relaxed);
    admin::ready::refresh(shared);
    let delay = config.runtime.shutdown_delay;
    let drain_timeout = config.runtime.drain_timeout;
    tracing::info!(
        cause,
        shutdown_delay = %health::show(delay),
        drain_timeout = %health::show(drain_timeout),
        "shutting down: /ready is 503"
    );
    let forced = tokio::select! {
        _ = tokio::time::sleep(delay) => None,
        signal = signals.stop_requested() => Some(signal),
    };
    accepting.cancel();
    for accept_loop in accept_loops {
        let _ = accept_loop.await;
    }
    tracker.close();
    let open = shared
        .listeners
        .load()
        .iter()
        .map(|l| l.active.load(Relaxed))
        .sum::<usize>();
    let forced = match forced {
        Some(signal) => Some(signal),
        None => {
            tracing::info!(open, "stopped accepting; waiting for open connections");
            tokio::select! {
                _ = tracker.wait() => None,
                _ = tokio::time::sleep(drain_timeout) => Some("drain_timeout"),
                signal = signals.stop_requested() => Some(signal),
            }
        }
    };
    match forced {
        None => tracing::info!("drained: every connection finished"),
        Some(why) => {
            let open = shared
                .listeners
                .load()
                .iter()
                .map(|l| l.active.load(Relaxed))
                .sum::<usize>();
            tracing::info!(why, open, "closing the connections still open");
            connections.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
        }
    }
}

fn start_discovery(
    state: &Arc<ListenerState>,
    shared: &Arc<Shared>,
    resolver: &Arc<DnsResolver>,
    background: &CancellationToken,
) {
    let listener_config = state.config.load_full();
    for target in &listener_config.upstream {
        let key = target.to_string();
        match target {
            Target::Static(addr) => discovery::fixed::publish(&state.endpoints, &key, *addr),
            Target::Dns { host, port } => {
                tokio::spawn(discovery::dns::run(
                    Arc::clone(resolver),
                    Arc::clone(state),
                    Arc::clone(shared),
                    key,
                    host.clone(),
                    *port,
                    background.clone(),
                ));
            }
            Target::Srv(name) => {
                tokio::spawn(discovery::dns::run_srv(
                    Arc::clone(resolver),
                    Arc::clone(state),
                    Arc::clone(shared),
                    key,
                    name.clone(),
                    background.clone(),
                ));
            }
            Target::File(path) => {
                tokio::spawn(discovery::file::run(
                    Arc::clone(state),
                    Arc::clone(shared),
                    key,
                    path.clone(),
                    background.clone(),
                ));
            }
        }
    }
    shared.readiness_changed.notify_one();
}
