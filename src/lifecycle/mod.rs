//! The life of a `legate run` process: bind, serve, reload, drain, exit.
//!
//! Start: the admin port and every listener are bound up front, so a taken address is a
//! start-up error naming it. Then discovery, health checks, the readiness watcher, the
//! admin server and the accept loops run as tasks under cancellation tokens: one for
//! background work, one for accepting (a child per listener), one for open connections.
//!
//! Reload (the config file changed, or SIGHUP): the new file is validated whole and
//! every new address bound before anything changes; if either fails the running
//! configuration stays and `legate_reloads_total{source="config",result="error"}`
//! rises. Then listeners are added, removed (they stop accepting; their open
//! connections run on) and changed in place (upstreams, balance, timeouts, health).
//! Reloads run one at a time in the main loop, so a SIGHUP storm coalesces.
//!
//! Handover (`handover`): a new legate takes the listening sockets over; this process
//! stops accepting at the commit, drains and exits 0. SidecarSet hot upgrade
//! (`sidecarset`) decides whether a process serves at all.
//!
//! Shutdown (SIGTERM, SIGINT or `POST /quitquitquit`): `/ready` turns 503 at once (and
//! the ready file goes), listeners keep accepting for `shutdown_delay`, then stop (new
//! connections are refused at once), open connections get `drain_timeout` to finish,
//! the rest are closed, and the process exits 0 — a clean drain is not a failure. A
//! second SIGTERM or SIGINT ends the drain at once. SIGHUP during a drain is ignored.

pub mod handover;
pub mod sidecarset;

use crate::admin;
use crate::balance::Balancer;
use crate::config::{Config, Handoff, HandoffSocket, ListenerConfig, Target};
use crate::discovery;
use crate::discovery::dns::DnsResolver;
use crate::health;
use crate::proxy::listener;
use crate::state::{ListenerState, Shared};
use crate::supervise;
use crate::tls::{self, Expiry, ListenerTls};
use crate::watch::FileWatch;
use handover::protocol::Role;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the config file is re-read when no watch event arrives.
const CONFIG_POLL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {what} address {addr}: {error}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("cannot set up DNS: {0}")]
    Dns(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Handover(#[from] handover::HandoverError),
    #[error("handoff_socket is set, but supervise mode (`-- CMD`) cannot hand its sockets over: the app's life is this process's; remove one of the two")]
    SuperviseHandoff,
    #[error("{0}")]
    SidecarSet(String),
}

/// Where the configuration came from, so a reload can rebuild it the same way.
pub struct Source {
    /// `-c FILE`, watched for changes.
    pub path: Option<PathBuf>,
    /// Quick-mode listeners, appended to the file's on every reload.
    pub quick: Vec<ListenerConfig>,
    /// `--admin`, which wins over `[admin] listen`.
    pub admin: Option<SocketAddr>,
    /// `--handoff-socket`, which wins over `[runtime] handoff_socket`.
    pub handoff: Option<Handoff>,
}

impl Source {
    pub fn load(&self) -> Result<Config, crate::config::ConfigError> {
        let mut config = match &self.path {
            Some(path) => Config::load(path)?,
            None => Config {
                admin: Default::default(),
                runtime: Default::default(),
                dns: Default::default(),
                listeners: Vec::new(),
            },
        };
        config.listeners.extend(self.quick.iter().cloned());
        if let Some(admin) = self.admin {
            config.admin.listen = admin;
        }
        if let Some(handoff) = &self.handoff {
            config.runtime.handoff_socket = handoff.clone();
        }
        config.validate_quick()?;
        Ok(config)
    }
}

enum Event {
    Stop(&'static str),
    Hangup,
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

    async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.terminate.recv() => Event::Stop("SIGTERM"),
            _ = self.interrupt.recv() => Event::Stop("SIGINT"),
            _ = self.hangup.recv() => Event::Hangup,
        }
    }

    /// The next SIGTERM or SIGINT; SIGHUPs meanwhile are ignored (we are draining).
    async fn stop_requested(&mut self) -> &'static str {
        loop {
            match self.next().await {
                Event::Stop(signal) => return signal,
                Event::Hangup => tracing::info!("SIGHUP ignored: draining"),
            }
        }
    }
}

/// A running listener: its state and its accept loop, which hands the socket back when
/// it stops (so a reload can move an address from one listener to another).
struct Running {
    state: Arc<ListenerState>,
    accept_loop: JoinHandle<TcpListener>,
    /// A duplicate of its socket's descriptor, for a handover.
    offered: Option<(handover::protocol::Offered, Arc<OwnedFd>)>,
}

struct Supervisor {
    shared: Arc<Shared>,
    resolver: Arc<DnsResolver>,
    config: Config,
    source: Source,
    background: CancellationToken,
    accepting: CancellationToken,
    connections: CancellationToken,
    tracker: TaskTracker,
    running: Vec<Running>,
    /// Cancelled once accepting may begin: at once, or, when this process took the
    /// sockets over, at the commit (until then the old process accepts).
    go: CancellationToken,
    /// What a handover would offer now; the admin and handoff sockets never change.
    offer: Arc<handover::Offer>,
    fixed_offer: Vec<(handover::protocol::Offered, Arc<OwnedFd>)>,
}

/// Run until shut down (or handed over); returns the exit code. In supervise mode
/// (`command` not empty) start the app once ready, pass signals on to it, and when it
/// exits drain and return its exit code (see `supervise`).
pub async fn run_supervising(
    config: Config,
    source: Source,
    command: Vec<String>,
) -> Result<i32, StartError> {
    let mut signals = Signals::install()?;
    if let sidecarset::Role::Idle(why) = sidecarset::role().map_err(StartError::SidecarSet)? {
        tracing::info!(why, "binding nothing; waiting for SIGTERM");
        let signal = signals.stop_requested().await;
        tracing::info!(signal, "exiting");
        return Ok(0);
    }
    // Supervise mode: the app lives and dies with this process, so there is nothing a
    // newcomer could take over without leaving the app behind.
    let handoff = match (&config.runtime.handoff_socket, command.is_empty()) {
        (Handoff::At(_), false) => return Err(StartError::SuperviseHandoff),
        (_, false) => None,
        (handoff, true) => handoff.socket(config.admin.listen),
    };
    let mut taken = match &handoff {
        Some(socket) => handover::take(socket).await?,
        None => None,
    };
    let shared = Arc::new(Shared::new(config.admin.ready_file.clone()));
    // A ready file left by a killed predecessor must not claim readiness for us; one
    // kept by the process we take over from is true until the commit, and ours after.
    if let (Some(path), None) = (&shared.ready_file, &taken) {
        let _ = std::fs::remove_file(path);
    }
    let adopt = |taken: &mut Option<handover::Taken>, role: Role, addr: SocketAddr| {
        taken.as_mut().and_then(|taken| taken.tcp(role, addr))
    };
    let admin_socket = match adopt(&mut taken, Role::Admin, config.admin.listen) {
        Some(socket) => socket,
        None => listener::bind(config.admin.listen).map_err(|error| StartError::Bind {
            what: "admin",
            addr: config.admin.listen,
            error,
        })?,
    };
    if !config.admin.listen.ip().is_loopback() {
        // /quitquitquit answers loopback peers only, but the read-only endpoints do not.
        tracing::warn!(admin = %config.admin.listen, "the admin port is not on loopback: anyone who reaches it can read /endpoints and /metrics (backend addresses, health reasons)");
    }
    let mut materials = Vec::with_capacity(config.listeners.len());
    for listener_config in &config.listeners {
        let (tls, expiries) = ListenerTls::build(listener_config).map_err(|error| {
            StartError::Tls(format!("listener {}: {error}", listener_config.name))
        })?;
        materials.push((tls, expiries));
    }
    let mut sockets = Vec::with_capacity(config.listeners.len());
    for listener_config in &config.listeners {
        let socket = match adopt(&mut taken, Role::Listener, listener_config.listen) {
            Some(socket) => socket,
            None => listener::bind(listener_config.listen).map_err(|error| StartError::Bind {
                what: "listener",
                addr: listener_config.listen,
                error,
            })?,
        };
        sockets.push(socket);
    }
    let handoff_socket = match (&handoff, taken.as_mut().and_then(|t| t.handoff())) {
        (_, Some(adopted)) => Some(adopted),
        (Some(socket), None) => bind_handoff(socket),
        (None, None) => None,
    };
    let resolver = Arc::new(DnsResolver::new(&config.dns).map_err(StartError::Dns)?);

    let go = CancellationToken::new();
    if taken.is_none() {
        go.cancel();
    }
    let mut fixed_offer = Vec::new();
    fixed_offer.extend(handover::offered(
        Role::Admin,
        "",
        config.admin.listen.to_string(),
        admin_socket.as_fd(),
    ));
    if let (Some(socket), Some(listener)) = (&handoff, &handoff_socket) {
        fixed_offer.extend(handover::offered(
            Role::Handoff,
            "",
            socket.to_string(),
            listener.as_fd(),
        ));
    }
    let mut supervisor = Supervisor {
        shared: Arc::clone(&shared),
        resolver,
        config: config.clone(),
        source,
        background: CancellationToken::new(),
        accepting: CancellationToken::new(),
        connections: CancellationToken::new(),
        tracker: TaskTracker::new(),
        running: Vec::new(),
        go: go.clone(),
        offer: Arc::new(handover::Offer::default()),
        fixed_offer,
    };
    for ((listener_config, socket), material) in config.listeners.iter().zip(sockets).zip(materials)
    {
        let running = supervisor.start_listener(listener_config.clone(), material, socket);
        supervisor.running.push(running);
    }
    supervisor.publish_listeners();
    tokio::spawn(admin::ready::watch(
        Arc::clone(&shared),
        supervisor.background.clone(),
    ));
    // The admin port and the handoff socket, like the listeners, start serving at `go`.
    let admin_stop = supervisor.background.child_token();
    let mut admin_server = tokio::spawn(gated(
        go.clone(),
        admin_stop.clone(),
        admin::server::serve(admin_socket, Arc::clone(&shared), admin_stop.clone()),
    ));
    let (commits_tx, mut commits) = tokio::sync::mpsc::channel(1);
    let handoff_stop = supervisor.background.child_token();
    let _handoff_server = handoff_socket.map(|listener| {
        tokio::spawn(gated(
            go.clone(),
            handoff_stop.clone(),
            handover::serve(
                listener,
                Arc::clone(&supervisor.offer),
                Arc::clone(&shared),
                commits_tx,
                handoff_stop.clone(),
            ),
        ))
    });
    if let Some(taken) = taken {
        take_over(taken, &shared, &go).await?;
    }
    tracing::info!(admin = %config.admin.listen, listeners = config.listeners.len(), handoff_socket = handoff.as_ref().map(|s| s.to_string()), "legate started");

    let mut config_watch = supervisor
        .source
        .path
        .as_ref()
        .map(|path| FileWatch::new(path, CONFIG_POLL));
    let mut last_config_bytes = supervisor
        .source
        .path
        .as_ref()
        .and_then(|path| std::fs::read(path).ok());
    let mut app = (!command.is_empty()).then(|| supervise::App::new(command));
    // Supervise mode: a stop asked for while the app runs goes on to the app, and legate
    // drains once the app has exited (the app may need legate to finish its work).
    let mut app_stopping = false;
    let mut exit_code = 0;
    let mut handed_over = false;
    let cause = loop {
        let config_changed = async {
            match config_watch.as_mut() {
                Some(watch) => watch.changed().await,
                None => std::future::pending().await,
            }
        };
        let app_event = async {
            match app.as_mut() {
                Some(app) => app.next(&shared).await,
                None => std::future::pending().await,
            }
        };
        let quit_asked = shared.shutdown.is_cancelled();
        tokio::select! {
            Some(request) = commits.recv() => {
                let pid = request.pid;
                // Stop accepting everywhere first: from the confirmation on, only the
                // newcomer accepts, from the same sockets and their queues.
                supervisor.accepting.cancel();
                for running in std::mem::take(&mut supervisor.running) {
                    let _ = running.accept_loop.await;
                }
                admin_stop.cancel();
                let _ = (&mut admin_server).await;
                handoff_stop.cancel();
                handover::confirm(request).await;
                shared.metrics.handoffs.with_label_values(&["committed"]).inc();
                let open: usize = shared.listeners.load().iter().map(|l| l.active.load(Relaxed)).sum();
                tracing::info!(newcomer = pid, open, offered = %handover::describe_offer(&supervisor.offer), "handed over: the new legate accepts now; draining the open connections");
                handed_over = true;
                break "handed over";
            }
            event = signals.next() => match event {
                Event::Stop(signal) => match app.as_ref().filter(|app| app.is_running()) {
                    Some(app) => {
                        app.forward(if signal == "SIGINT" { supervise::Signal::INT } else { supervise::Signal::TERM });
                        app_stopping = begin_app_stop(&shared, app_stopping, signal);
                    }
                    None => break signal,
                },
                Event::Hangup => {
                    if let Some(app) = &app {
                        app.forward(supervise::Signal::HUP);
                    }
                    if app_stopping {
                        tracing::info!("SIGHUP: no reload, shutting down");
                        continue;
                    }
                    tracing::info!("SIGHUP: reloading the configuration");
                    last_config_bytes = supervisor.source.path.as_ref().and_then(|p| std::fs::read(p).ok());
                    supervisor.reload().await;
                }
            },
            _ = shared.shutdown.cancelled(), if !quit_asked || !app_stopping => {
                match app.as_ref().filter(|app| app.is_running()) {
                    Some(app) => {
                        app.forward(supervise::Signal::TERM);
                        app_stopping = begin_app_stop(&shared, app_stopping, "/quitquitquit");
                    }
                    None => break "/quitquitquit",
                }
            }
            event = app_event => match event {
                supervise::AppEvent::Started { .. } => {}
                supervise::AppEvent::CannotStart(message) => {
                    tracing::error!("{message}");
                    eprintln!("legate: {message}");
                    exit_code = supervise::CANNOT_START;
                    break "the supervised command could not start";
                }
                supervise::AppEvent::Exited(code) => {
                    tracing::info!(code, "the supervised command exited");
                    exit_code = code;
                    break "the supervised command exited";
                }
            },
            _ = config_changed => {
                let bytes = supervisor.source.path.as_ref().and_then(|p| std::fs::read(p).ok());
                // A missing or empty file is a write in progress or a mistake: the
                // running configuration stays, and the next change is picked up.
                if bytes.as_ref().is_some_and(|b| !b.is_empty()) && bytes != last_config_bytes {
                    last_config_bytes = bytes;
                    tracing::info!("configuration file changed: reloading");
                    supervisor.reload().await;
                }
            }
        }
    };
    // With the app gone there is no one left to wait for: no shutdown_delay. After a
    // handover the newcomer already accepts: nothing to wait for either.
    let delay = match app {
        Some(_) => Duration::ZERO,
        None if handed_over => Duration::ZERO,
        None => supervisor.config.runtime.shutdown_delay,
    };
    supervisor
        .drain(&mut signals, cause, delay, !handed_over)
        .await;
    supervisor.background.cancel();
    // After a handover, the address is ready (the newcomer's), and so is its ready file.
    if !handed_over {
        admin::ready::refresh(&shared);
        if let Some(path) = &shared.ready_file {
            let _ = std::fs::remove_file(path);
        }
    }
    Ok(exit_code)
}

/// `serve`, started once `go` is cancelled, unless `stop` comes first.
async fn gated<F: std::future::Future<Output = ()>>(
    go: CancellationToken,
    stop: CancellationToken,
    serve: F,
) {
    tokio::select! {
        biased;
        _ = stop.cancelled() => {}
        _ = go.cancelled() => serve.await,
    }
}

/// Serve `socket` for the next handover; without it this process can still run, only
/// not be upgraded in place, so a failure is a warning.
fn bind_handoff(socket: &HandoffSocket) -> Option<tokio::net::UnixListener> {
    let bound = handover_bind(socket);
    match bound {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::warn!(handoff_socket = %socket, %error, "cannot serve the handoff socket: this process cannot hand its sockets over");
            None
        }
    }
}

fn handover_bind(socket: &HandoffSocket) -> std::io::Result<tokio::net::UnixListener> {
    let listener = handover::bind(socket)?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// The newcomer's side after taking the sockets: wait for the first discovery and health
/// round (bounded), so it is ready before it accepts, then commit and start accepting.
async fn take_over(
    taken: handover::Taken,
    shared: &Shared,
    go: &CancellationToken,
) -> Result<(), StartError> {
    let started = tokio::time::Instant::now();
    while !first_round_done(shared) && started.elapsed() < handover::READY_WAIT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (old, offered, unused) = (taken.old_pid, taken.describe(), taken.unused());
    let committed = handover::commit(taken).await?;
    go.cancel();
    shared.metrics.handoffs.with_label_values(&["taken"]).inc();
    let confirmed = matches!(committed, handover::Committed::Confirmed);
    tracing::info!(
        old,
        offered,
        unused,
        confirmed,
        ready_after_ms = started.elapsed().as_millis() as u64,
        "took over: accepting now (the old legate drains and exits)"
    );
    Ok(())
}

/// Every target has answered (or failed) once and every endpoint has had its first check.
fn first_round_done(shared: &Shared) -> bool {
    shared.listeners.load().iter().all(|listener| {
        listener
            .endpoints
            .sources()
            .iter()
            .all(|source| source.resolved || source.error.is_some())
            && listener
                .endpoints
                .load()
                .endpoints
                .iter()
                .all(|endpoint| endpoint.state.health() != crate::discovery::Health::Unknown)
    })
}

/// Supervise mode: the first stop request turns `/ready` 503 while legate keeps
/// proxying for the app's own shutdown. Returns the new `app_stopping`.
fn begin_app_stop(shared: &Shared, already: bool, cause: &str) -> bool {
    if !already {
        shared.draining.store(true, Relaxed);
        admin::ready::refresh(shared);
        tracing::info!(
            cause,
            "shutting down: /ready is 503; waiting for the supervised command to exit"
        );
    }
    true
}

impl Supervisor {
    fn start_listener(
        &self,
        config: ListenerConfig,
        (tls, expiries): (ListenerTls, Vec<Expiry>),
        socket: TcpListener,
    ) -> Running {
        tls::publish_expiries(&self.shared, &config.name, &expiries);
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

    fn publish_listeners(&self) {
        let states = self.running.iter().map(|r| Arc::clone(&r.state)).collect();
        self.shared.listeners.store(Arc::new(states));
        self.shared.readiness_changed.notify_one();
        let mut offer = self.fixed_offer.clone();
        offer.extend(self.running.iter().filter_map(|r| r.offered.clone()));
        self.offer.replace(offer);
    }

    /// Start one discovery task per target under a fresh token (replacing the old).
    fn start_discovery(&self, state: &Arc<ListenerState>) {
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
        tokio::spawn(tls::watch(
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
    async fn stop_listener(running: Running) -> Option<TcpListener> {
        running.state.accept_token.cancel();
        running.state.tasks.cancel();
        running.accept_loop.await.ok()
    }

    async fn reload(&mut self) {
        let new = match self.source.load() {
            Ok(new) => new,
            Err(error) => {
                self.shared.metrics.reload("config", false);
                tracing::error!(%error, "configuration refused; the running configuration stays");
                return;
            }
        };
        if new.admin.listen != self.config.admin.listen {
            tracing::warn!(running = %self.config.admin.listen, new = %new.admin.listen, "admin.listen changes need a restart; keeping the running admin address");
        }
        if new.admin.ready_file != self.config.admin.ready_file {
            tracing::warn!("admin.ready_file changes need a restart; keeping the running one");
        }
        if new.dns != self.config.dns {
            tracing::warn!("[dns] changes need a restart; keeping the running resolver");
        }

        // Listeners that keep their name and address change in place; all others are
        // replaced. Bind every new address first, so a failure changes nothing.
        let keeps = |candidate: &ListenerConfig| {
            self.running.iter().any(|r| {
                r.state.name == candidate.name && r.state.config.load().listen == candidate.listen
            })
        };
        let freed: Vec<SocketAddr> = self
            .running
            .iter()
            .map(|r| (r.state.name.clone(), r.state.config.load().listen))
            .filter(|(name, listen)| {
                !new.listeners
                    .iter()
                    .any(|l| &l.name == name && l.listen == *listen)
            })
            .map(|(_, listen)| listen)
            .collect();
        // Certificates are checked up front too: a bad one refuses the whole reload.
        let mut materials: Vec<(String, (ListenerTls, Vec<Expiry>))> = Vec::new();
        for candidate in &new.listeners {
            let unchanged = self.running.iter().any(|r| {
                let current = r.state.config.load();
                current.name == candidate.name
                    && current.listen == candidate.listen
                    && current.tls == candidate.tls
                    && current.tls_server == candidate.tls_server
            });
            if unchanged {
                continue;
            }
            match ListenerTls::build(candidate) {
                Ok(material) => materials.push((candidate.name.clone(), material)),
                Err(error) => {
                    self.shared.metrics.reload("config", false);
                    tracing::error!(listener = %candidate.name, %error, "configuration refused: TLS material; the running configuration stays");
                    return;
                }
            }
        }
        let mut take_material = |name: &str| {
            materials
                .iter()
                .position(|(n, _)| n == name)
                .map(|index| materials.swap_remove(index).1)
        };
        let mut fresh: Vec<(ListenerConfig, Option<TcpListener>)> = Vec::new();
        for candidate in new.listeners.iter().filter(|l| !keeps(l)) {
            if freed.contains(&candidate.listen) {
                // The address moves from a listener being removed: take its socket over.
                fresh.push((candidate.clone(), None));
                continue;
            }
            match listener::bind(candidate.listen) {
                Ok(socket) => fresh.push((candidate.clone(), Some(socket))),
                Err(error) => {
                    self.shared.metrics.reload("config", false);
                    tracing::error!(listener = %candidate.name, listen = %candidate.listen, %error, "configuration refused: cannot listen; the running configuration stays");
                    return;
                }
            }
        }

        let (mut added, mut removed, mut changed) = (0, 0, 0);
        let mut handed_over: Vec<(SocketAddr, TcpListener)> = Vec::new();
        let mut kept = Vec::new();
        for running in std::mem::take(&mut self.running) {
            let current = running.state.config.load_full();
            match new
                .listeners
                .iter()
                .find(|l| l.name == current.name && l.listen == current.listen)
            {
                Some(next) => {
                    if *next != *current {
                        self.change_in_place(
                            &running.state,
                            next.clone(),
                            take_material(&next.name),
                        );
                        changed += 1;
                    }
                    kept.push(running);
                }
                None => {
                    let name = running.state.name.clone();
                    if let Some(socket) = Self::stop_listener(running).await {
                        handed_over.push((current.listen, socket));
                    }
                    tracing::info!(listener = %name, "listener removed; its open connections run on");
                    removed += 1;
                }
            }
        }
        self.running = kept;
        for (candidate, socket) in fresh {
            let socket = match socket {
                Some(socket) => socket,
                None => match handed_over
                    .iter()
                    .position(|(addr, _)| *addr == candidate.listen)
                {
                    Some(index) => handed_over.swap_remove(index).1,
                    None => match listener::bind(candidate.listen) {
                        Ok(socket) => socket,
                        Err(error) => {
                            tracing::error!(listener = %candidate.name, listen = %candidate.listen, %error, "cannot listen");
                            continue;
                        }
                    },
                },
            };
            let material = take_material(&candidate.name).unwrap_or_default();
            let running = self.start_listener(candidate, material, socket);
            self.running.push(running);
            added += 1;
        }
        // Keep the file's order in /endpoints and /ready.
        self.running.sort_by_key(|r| {
            new.listeners
                .iter()
                .position(|l| l.name == r.state.name)
                .unwrap_or(usize::MAX)
        });
        self.publish_listeners();
        self.config = new;
        self.shared.metrics.reload("config", true);
        tracing::info!(added, removed, changed, "configuration reloaded");
    }

    fn change_in_place(
        &self,
        state: &Arc<ListenerState>,
        next: ListenerConfig,
        material: Option<(ListenerTls, Vec<Expiry>)>,
    ) {
        let previous = state.config.load_full();
        let tls_changed = material.is_some();
        if let Some((tls, expiries)) = material {
            state.tls.replace_with(tls);
            tls::publish_expiries(&self.shared, &state.name, &expiries);
        }
        if next.balance != previous.balance {
            state.balancer.store(Arc::new(Balancer::new(next.balance)));
        }
        let targets_changed = next.upstream != previous.upstream;
        state.config.store(Arc::new(next.clone()));
        if targets_changed {
            let targets: Vec<String> = next.upstream.iter().map(|t| t.to_string()).collect();
            state.endpoints.set_targets(&targets);
        }
        if targets_changed || tls_changed {
            self.start_discovery(state);
        }
        // Wake the health checker so a changed check or interval applies now.
        state.endpoints.changed.notify_waiters();
        tracing::info!(listener = %state.name, "listener changed in place");
    }

    /// `announce`: turn `/ready` 503 first (a shutdown); not after a handover, where the
    /// address stays ready, served by the newcomer.
    async fn drain(&mut self, signals: &mut Signals, cause: &str, delay: Duration, announce: bool) {
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
            shutdown_delay = %health::show(delay),
            drain_timeout = %health::show(drain_timeout),
            "{}",
            if announce { "shutting down: /ready is 503" } else { "shutting down" }
        );
        let forced = tokio::select! {
            _ = tokio::time::sleep(delay) => None,
            signal = signals.stop_requested() => Some(signal),
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
                    signal = signals.stop_requested() => Some(signal),
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
