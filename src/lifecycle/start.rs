//! Start: the TLS material of every listener, then every socket this process listens
//! on, adopted from the process it takes over from where that one offers it, else bound
//! fresh, so a taken address is a start-up error naming it before anything serves.

use super::handover::{self, protocol::Role, Taken};
use super::StartError;
use crate::config::{Config, HandoffSocket};
use crate::proxy::listener;
use crate::tls::{Expiry, ListenerTls};
use std::net::SocketAddr;
use tokio::net::{TcpListener, UnixListener};

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
