//! Start: the TLS material of every listener, then every socket this process listens
//! on, adopted from the process it takes over from where that one offers it, else bound
//! fresh, so a taken address is a start-up error naming it before anything serves.

use super::handover::{self, protocol::Role, Taken};
use super::listeners::Listeners;
use super::{gated, Source, StartError};
use crate::admin;
use crate::config::{Config, HandoffSocket};
use crate::discovery::dns::DnsResolver;
use crate::proxy::listener;
use crate::state::Shared;
use crate::tls::{Expiry, ListenerTls};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A started process: its listeners, the admin and handoff servers, and where a
/// newcomer's commit request arrives.
pub(super) struct Started {
    pub(super) listeners: Listeners,
    pub(super) servers: Servers,
    pub(super) commits: mpsc::Receiver<handover::CommitRequest>,
}

/// The servers that stop at a handover's commit.
pub(super) struct Servers {
    pub(super) admin: Server,
    pub(super) handoff: CancellationToken,
}

pub(super) struct Server {
    pub(super) stop: CancellationToken,
    pub(super) task: JoinHandle<()>,
}

/// Everything up to serving: TLS material, the sockets (taken over from the legate on
/// `handoff` if one serves it, else bound), the listeners, readiness, the admin and
/// handoff servers; when taking over, the first discovery and health round and the
/// commit, after which this process accepts.
pub(super) async fn start(
    config: &Config,
    source: Source,
    handoff: Option<HandoffSocket>,
) -> Result<Started, StartError> {
    // TLS material is read before anything else happens: a bad certificate must not
    // even reach the process we would take over from.
    let materials = materials(config)?;
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
    let bound = bind(config, handoff.as_ref(), &mut taken)?;
    if !config.admin.listen.ip().is_loopback() {
        // /quitquitquit answers loopback peers only, but the read-only endpoints do not.
        tracing::warn!(admin = %config.admin.listen, "the admin port is not on loopback: anyone who reaches it can read /endpoints and /metrics (backend addresses, health reasons)");
    }
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
        bound.admin.as_fd(),
    ));
    if let (Some(socket), Some(listener)) = (&handoff, &bound.handoff) {
        fixed_offer.extend(handover::offered(
            Role::Handoff,
            "",
            socket.to_string(),
            listener.as_fd(),
        ));
    }
    let mut listeners = Listeners {
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
    for ((listener_config, socket), material) in
        config.listeners.iter().zip(bound.listeners).zip(materials)
    {
        let running = listeners.start_listener(listener_config.clone(), material, socket);
        listeners.running.push(running);
    }
    listeners.publish_listeners();
    // Readiness (gauges, ready file), the admin port and the handoff socket, like the
    // listeners, start at `go`: until a takeover commits they are the old process's.
    tokio::spawn(gated(
        go.clone(),
        listeners.background.clone(),
        admin::ready::publish(Arc::clone(&shared), listeners.background.clone()),
    ));
    let admin_stop = listeners.background.child_token();
    let admin_server = tokio::spawn(gated(
        go.clone(),
        admin_stop.clone(),
        admin::server::serve(bound.admin, Arc::clone(&shared), admin_stop.clone()),
    ));
    let (commits_tx, commits) = mpsc::channel(1);
    let handoff_stop = listeners.background.child_token();
    // Not awaited at a commit: the handoff server ends with the session that commits.
    bound.handoff.map(|listener| {
        tokio::spawn(gated(
            go.clone(),
            handoff_stop.clone(),
            handover::serve(
                listener,
                Arc::clone(&listeners.offer),
                Arc::clone(&shared),
                commits_tx,
                handoff_stop.clone(),
            ),
        ))
    });
    if let Some(taken) = taken {
        handover::take_over(taken, &shared, &go).await?;
    }
    tracing::info!(admin = %config.admin.listen, listeners = config.listeners.len(), handoff_socket = handoff.as_ref().map(|s| s.to_string()), "legate started");
    Ok(Started {
        listeners,
        servers: Servers {
            admin: Server {
                stop: admin_stop,
                task: admin_server,
            },
            handoff: handoff_stop,
        },
        commits,
    })
}

/// Every socket the configuration asks for.
pub(super) struct Bound {
    pub(super) admin: TcpListener,
    /// In the configuration's listener order.
    pub(super) listeners: Vec<TcpListener>,
    /// Where the next newcomer finds this process; none when off or unavailable.
    pub(super) handoff: Option<UnixListener>,
}

pub(super) fn materials(config: &Config) -> Result<Vec<(ListenerTls, Vec<Expiry>)>, StartError> {
    config
        .listeners
        .iter()
        .map(|listener| {
            ListenerTls::build(listener)
                .map_err(|error| StartError::Tls(format!("listener {}: {error}", listener.name)))
        })
        .collect()
}

pub(super) fn bind(
    config: &Config,
    handoff: Option<&HandoffSocket>,
    taken: &mut Option<Taken>,
) -> Result<Bound, StartError> {
    let mut adopt_or_bind = |what: &'static str, role: Role, addr: SocketAddr| match taken
        .as_mut()
        .and_then(|taken| taken.tcp(role, addr))
    {
        Some(socket) => Ok(socket),
        None => listener::bind(addr).map_err(|error| StartError::Bind { what, addr, error }),
    };
    let admin = adopt_or_bind("admin", Role::Admin, config.admin.listen)?;
    let listeners = config
        .listeners
        .iter()
        .map(|listener| adopt_or_bind("listener", Role::Listener, listener.listen))
        .collect::<Result<Vec<_>, _>>()?;
    let handoff = match (handoff, taken.as_mut().and_then(|taken| taken.handoff())) {
        (_, Some(adopted)) => Some(adopted),
        (Some(socket), None) => bind_handoff(socket),
        (None, None) => None,
    };
    Ok(Bound {
        admin,
        listeners,
        handoff,
    })
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
