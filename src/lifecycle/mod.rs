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
//! Shutdown (SIGTERM, SIGINT or `POST /quitquitquit`): `/ready` turns 503 at once (and
//! the ready file goes), listeners keep accepting for `shutdown_delay`, then stop (new
//! connections are refused at once), open connections get `drain_timeout` to finish,
//! the rest are closed, and the process exits 0 — a clean drain is not a failure. A
//! second SIGTERM or SIGINT ends the drain at once. SIGHUP during a drain is ignored.

use crate::admin;
use crate::balance::Balancer;
use crate::config::{Config, ListenerConfig, Target};
use crate::discovery;
use crate::discovery::dns::DnsResolver;
use crate::health;
use crate::proxy::listener;
use crate::state::{ListenerState, Shared};
use crate::supervise;
use crate::tls::{self, Expiry, ListenerTls};
use crate::watch::FileWatch;
use std::net::SocketAddr;
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
}

/// Where the configuration came from, so a reload can rebuild it the same way.
pub struct Source {
    /// `-c FILE`, watched for changes.
    pub path: Option<PathBuf>,
    /// Quick-mode listeners, appended to the file's on every reload.
    pub quick: Vec<ListenerConfig>,
    /// `--admin`, which wins over `[admin] listen`.
    pub admin: Option<SocketAddr>,
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
}

/// Run until shut down; returns the exit code.
pub async fn run(config: Config, source: Source) -> Result<i32, StartError> {
    run_supervising(config, source, Vec::new()).await
}

/// [`run`], and in supervise mode (`command` not empty) start the app once ready, pass
/// signals on to it, and when it exits drain and return its exit code (see `supervise`).
pub async fn run_supervising(
    config: Config,
    source: Source,
    command: Vec<String>,
) -> Result<i32, StartError> {
    let mut signals = Signals::install()?;
    let shared = Arc::new(Shared::new(config.admin.ready_file.clone()));
    // A ready file left by a killed predecessor must not claim readiness for us.
    if let Some(path) = &shared.ready_file {
        let _ = std::fs::remove_file(path);
    }
    let admin_socket = listener::bind(config.admin.listen).map_err(|error| StartError::Bind {
        what: "admin",
        addr: config.admin.listen,
        error,
    })?;
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
        sockets.push(
            listener::bind(listener_config.listen).map_err(|error| StartError::Bind {
                what: "listener",
                addr: listener_config.listen,
                error,
            })?,
        );
    }
    let resolver = Arc::new(DnsResolver::new(&config.dns).map_err(StartError::Dns)?);

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
    tokio::spawn(admin::server::serve(
        admin_socket,
        Arc::clone(&shared),
        supervisor.background.clone(),
    ));
    tracing::info!(admin = %config.admin.listen, listeners = config.listeners.len(), "legate started");

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
    // With the app gone there is no one left to wait for: no shutdown_delay.
    let delay = match app {
        Some(_) => Duration::ZERO,
        None => supervisor.config.runtime.shutdown_delay,
    };
    supervisor.drain(&mut signals, cause, delay).await;
    supervisor.background.cancel();
    admin::ready::refresh(&shared);
    if let Some(path) = &shared.ready_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(exit_code)
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
        let accept_loop = tokio::spawn(listener::serve(
            Arc::clone(&state),
            socket,
            self.tracker.clone(),
            self.connections.clone(),
        ));
        Running { state, accept_loop }
    }

    fn publish_listeners(&self) {
        let states = self.running.iter().map(|r| Arc::clone(&r.state)).collect();
        self.shared.listeners.store(Arc::new(states));
        self.shared.readiness_changed.notify_one();
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

    async fn drain(&mut self, signals: &mut Signals, cause: &str, delay: Duration) {
        let shared = &self.shared;
        shared.draining.store(true, Relaxed);
        admin::ready::refresh(shared);
        let drain_timeout = self.config.runtime.drain_timeout;
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
        self.accepting.cancel();
        for running in std::mem::take(&mut self.running) {
            let _ = running.accept_loop.await;
        }
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
