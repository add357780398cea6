//! Reload (the config file changed, or SIGHUP): the new file is validated whole and
//! every new address bound before anything changes; if either fails the running
//! configuration stays and `legate_reloads_total{source="config",result="error"}`
//! rises. Then listeners are added, removed (they stop accepting; their open
//! connections run on) and changed in place (upstreams, balance, timeouts, health).

use super::listeners::Listeners;
use crate::balance::Balancer;
use crate::config::{Config, ListenerConfig};
use crate::proxy::listener;
use crate::state::ListenerState;
use crate::tls::{self, Expiry, ListenerTls};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// A reload's preparation: TLS material by listener name, and each listener to add with
/// its freshly bound socket (`None`: it takes over the socket of a listener removed).
struct Plan {
    materials: Vec<(String, (ListenerTls, Vec<Expiry>))>,
    fresh: Vec<(ListenerConfig, Option<TcpListener>)>,
}

impl Listeners {
    pub(super) async fn reload(&mut self) {
        let new = match self.source.load() {
            Ok(new) => new,
            Err(error) => {
                self.shared.metrics.reload("config", false);
                tracing::error!(%error, "configuration refused; the running configuration stays");
                return;
            }
        };
        self.warn_restart_only(&new);
        let Some(plan) = self.prepare(&new) else {
            self.shared.metrics.reload("config", false);
            return;
        };
        self.apply(new, plan).await;
    }

    /// `admin.*` and `[dns]` are read at start only: say so when they change.
    fn warn_restart_only(&self, new: &Config) {
        if new.admin.listen != self.config.admin.listen {
            tracing::warn!(running = %self.config.admin.listen, new = %new.admin.listen, "admin.listen changes need a restart; keeping the running admin address");
        }
        if new.admin.ready_file != self.config.admin.ready_file {
            tracing::warn!("admin.ready_file changes need a restart; keeping the running one");
        }
        if new.dns != self.config.dns {
            tracing::warn!("[dns] changes need a restart; keeping the running resolver");
        }
    }

    /// What the new configuration needs before anything changes: TLS material for every
    /// listener whose TLS settings are new, and the new addresses bound. `None` (logged)
    /// refuses the whole reload.
    fn prepare(&self, new: &Config) -> Option<Plan> {
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
                    tracing::error!(listener = %candidate.name, %error, "configuration refused: TLS material; the running configuration stays");
                    return None;
                }
            }
        }
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
                    tracing::error!(listener = %candidate.name, listen = %candidate.listen, %error, "configuration refused: cannot listen; the running configuration stays");
                    return None;
                }
            }
        }

        Some(Plan { materials, fresh })
    }

    /// Change in place, remove and add listeners as `plan` prepared them.
    async fn apply(&mut self, new: Config, plan: Plan) {
        let Plan {
            mut materials,
            fresh,
        } = plan;
        let mut take_material = |name: &str| {
            materials
                .iter()
                .position(|(n, _)| n == name)
                .map(|index| materials.swap_remove(index).1)
        };
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
            tls::publish_expiries(&self.shared.metrics, &state.name, &expiries);
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
}
