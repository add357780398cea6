//! The life of a `legate run` process, one file per stage; this file is the main loop
//! that ties them together.
//!
//! - `sidecarset`: whether this process serves at all (OpenKruise hot upgrade roles).
//! - `start`: TLS material, then every socket, adopted from a running legate
//!   (`handover`) or bound fresh, so a taken address is a start-up error naming it. Then
//!   discovery, health checks, the readiness watcher, the admin server and the accept
//!   loops run as tasks under cancellation tokens: one for background work, one for
//!   accepting (a child per listener), one for open connections.
//! - `listeners`: the running set of listeners, started, published and stopped.
//! - `reload` (the config file changed, or SIGHUP): validated whole and bound before
//!   anything changes. Reloads run one at a time in the main loop, so a SIGHUP storm
//!   coalesces.
//! - `handover`: a new legate takes the listening sockets over; this process stops
//!   accepting at the commit, drains and exits 0.
//! - `drain` (SIGTERM, SIGINT or `POST /quitquitquit`): `/ready` turns 503 at once (and
//!   the ready file goes), listeners keep accepting for `shutdown_delay`, then stop (new
//!   connections are refused at once), open connections get `drain_timeout` to finish,
//!   the rest are closed, and the process exits 0 — a clean drain is not a failure. A
//!   second SIGTERM or SIGINT ends the drain at once. SIGHUP during a drain is ignored.
//! - `supervise`: `legate run ... -- CMD`, the app started once ready, signals passed on.
//! - `signals`: SIGTERM and SIGINT stop, SIGHUP reloads.
//! - `tls_reload`: certificates re-read when their files change.

mod drain;
pub(crate) mod handover;
mod listeners;
mod reload;
pub(crate) mod sidecarset;
mod signals;
mod start;
mod supervise;
mod tls_reload;

use crate::admin;
use crate::config::{Config, Handoff, ListenerConfig};
use crate::state::Shared;
use crate::watch::{FileWatch, LastContents};
use listeners::Listeners;
use signals::{Event, Signals};
use start::Started;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
    /// A handover that failed before the commit (the running legate serves on).
    #[error("{0}")]
    Handover(String),
    #[error("handoff_socket is set, but supervise mode (`-- CMD`) cannot hand its sockets over: the app's life is this process's; remove one of the two")]
    SuperviseHandoff,
    #[error("{0}")]
    SidecarSet(String),
}

impl From<handover::HandoverError> for StartError {
    fn from(error: handover::HandoverError) -> StartError {
        StartError::Handover(error.to_string())
    }
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

/// Run until shut down (or handed over); returns the exit code. In supervise mode
/// (`command` not empty) start the app once ready, pass signals on to it, and when it
/// exits drain and return its exit code (see `supervise`).
pub async fn run(config: Config, source: Source, command: Vec<String>) -> Result<i32, StartError> {
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
    let Started {
        mut listeners,
        mut servers,
        mut commits,
    } = start::start(&config, source, handoff).await?;
    let shared = Arc::clone(&listeners.shared);

    let mut config_file = ConfigFile::new(listeners.source.path.clone());
    let mut app = (!command.is_empty()).then(|| supervise::App::new(command));
    // Supervise mode: a stop asked for while the app runs goes on to the app, and legate
    // drains once the app has exited (the app may need legate to finish its work).
    let mut app_stopping = false;
    let mut exit_code = 0;
    let mut handed_over = false;
    let cause = loop {
        let config_changed = config_file.changed();
        let app_event = async {
            match app.as_mut() {
                Some(app) => app.next(&shared).await,
                None => std::future::pending().await,
            }
        };
        let quit_asked = shared.shutdown.is_cancelled();
        tokio::select! {
            Some(request) = commits.recv() => {
                hand_over(&mut listeners, &mut servers, request).await;
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
                    config_file.reloading();
                    listeners.reload().await;
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
                supervise::AppEvent::Started => {}
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
            () = config_changed => {
                tracing::info!("configuration file changed: reloading");
                listeners.reload().await;
            }
        }
    };
    // With the app gone there is no one left to wait for: no shutdown_delay. After a
    // handover the newcomer already accepts: nothing to wait for either.
    let delay = match app {
        Some(_) => Duration::ZERO,
        None if handed_over => Duration::ZERO,
        None => listeners.config.runtime.shutdown_delay,
    };
    finish(listeners, &mut signals, cause, delay, handed_over).await;
    Ok(exit_code)
}

/// Drain, stop the background work, and (unless the sockets were handed over, when the
/// address and its ready file are the newcomer's) say not ready.
async fn finish(
    mut listeners: Listeners,
    signals: &mut Signals,
    cause: &str,
    delay: Duration,
    handed_over: bool,
) {
    listeners.drain(signals, cause, delay, !handed_over).await;
    listeners.background.cancel();
    if !handed_over {
        let shared = &listeners.shared;
        admin::ready::refresh(shared);
        if let Some(path) = &shared.ready_file {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A newcomer is ready and asks to commit: stop accepting everywhere — listeners, the
/// admin port, the handoff socket — then confirm. From the confirmation on only the
/// newcomer accepts, from the same sockets and their queues.
async fn hand_over(
    listeners: &mut Listeners,
    servers: &mut start::Servers,
    request: handover::CommitRequest,
) {
    let shared = Arc::clone(&listeners.shared);
    let pid = request.pid;
    shared.handing_over.store(true, Relaxed);
    listeners.accepting.cancel();
    for running in std::mem::take(&mut listeners.running) {
        let _ = running.accept_loop.await;
    }
    servers.admin.stop.cancel();
    let _ = (&mut servers.admin.task).await;
    servers.handoff.cancel();
    handover::confirm(request).await;
    shared
        .metrics
        .handoffs
        .with_label_values(&["committed"])
        .inc();
    let open: usize = shared
        .listeners
        .load()
        .iter()
        .map(|l| l.active.load(Relaxed))
        .sum();
    tracing::info!(
        newcomer = pid,
        open,
        offered = %handover::describe_offer(&listeners.offer),
        "handed over: the new legate accepts now; draining the open connections"
    );
}

/// The configuration file, watched: `changed` resolves when its contents changed to
/// something not acted on yet. A missing or empty file is a write in progress or a
/// mistake: the running configuration stays, and the next change is picked up.
struct ConfigFile {
    path: Option<PathBuf>,
    watch: Option<FileWatch>,
    contents: LastContents<Vec<u8>>,
}

impl ConfigFile {
    fn new(path: Option<PathBuf>) -> ConfigFile {
        let watch = path.as_ref().map(|path| FileWatch::new(path, CONFIG_POLL));
        let contents = LastContents::new(read(path.as_deref()));
        ConfigFile {
            path,
            watch,
            contents,
        }
    }

    async fn changed(&mut self) {
        let Some(watch) = self.watch.as_mut() else {
            return std::future::pending().await;
        };
        loop {
            watch.changed().await;
            let bytes = read(self.path.as_deref()).filter(|bytes| !bytes.is_empty());
            if bytes.is_some_and(|bytes| self.contents.changed(bytes)) {
                return;
            }
        }
    }

    /// A reload for another reason (SIGHUP) reads the file as it is now.
    fn reloading(&mut self) {
        self.contents.set(read(self.path.as_deref()));
    }
}

fn read(path: Option<&std::path::Path>) -> Option<Vec<u8>> {
    path.and_then(|path| std::fs::read(path).ok())
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
