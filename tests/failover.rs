//! Failover and balancing across static endpoints:
//! - one dead endpoint (nothing listening) and one live: 100 sequential connections all
//!   succeed, both with the active health check and with `check = "none"` (so the dead one
//!   stays eligible and each connection has to fail over on connect);
//! - `round-robin` spreads connections over three live backends (each gets some);
//! - `balance = "first"` sends everything to the first live endpoint, and moves to the next
//!   when that one dies;
//! - `least-conn` sends each new connection to the endpoint with the fewest open ones;
//! - `random` reaches every endpoint.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

/// The bound on every wait here: legate is ready once one endpoint passes its first check
/// (run at once), and each other endpoint's first check follows within milliseconds (200 ms
/// intervals with `fast_health`); 15 s is a loaded 2-core machine's slack.
const T: Duration = Duration::from_secs(15);

/// Opens a connection and reads the backend's identifying line.
fn which_backend(addr: SocketAddr) -> String {
    let mut stream = connect(addr);
    let id = read_line(&mut stream).unwrap_or_else(|e| panic!("read greeting via {addr}: {e}"));
    assert!(
        !id.is_empty(),
        "connection via {addr} closed without reaching a backend"
    );
    id
}

fn tally(addr: SocketAddr, connections: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..connections {
        *counts.entry(which_backend(addr)).or_insert(0) += 1;
    }
    counts
}

fn dead_endpoint() -> SocketAddr {
    local(free_port())
}

fn dead_and_live(health: Option<&str>) {
    let live = TcpBackend::hello("live");
    let mut listener = Listener::new("svc")
        .upstream(dead_endpoint())
        .upstream(live.addr())
        .set("connect_attempts", "3")
        .set("connect_timeout", "\"1s\"");
    if let Some(health) = health {
        listener = listener.set("health", health);
    }
    let mut legate = Legate::builder().listener(listener).start();
    legate.wait_ready(T);
    let counts = tally(legate.addr("svc"), 100);
    assert_eq!(counts.get("live"), Some(&100), "got {counts:?}");
}

#[test]
fn one_dead_endpoint_is_skipped_with_health_checks() {
    dead_and_live(Some(FAST_HEALTH));
}

#[test]
fn one_dead_endpoint_is_skipped_on_connect_without_health_checks() {
    dead_and_live(Some(r#"{ check = "none" }"#));
}

#[test]
fn round_robin_spreads_over_three_backends() {
    let backends = [
        TcpBackend::hello("b1"),
        TcpBackend::hello("b2"),
        TcpBackend::hello("b3"),
    ];
    let mut listener = Listener::new("svc").set("balance", "\"round-robin\"");
    for backend in &backends {
        listener = listener.upstream(backend.addr());
    }
    let mut legate = Legate::builder().listener(listener).start();
    legate.wait_ready(T);
    // Every endpoint must have passed its first check before it gets traffic.
    eventually(T, "all three endpoints healthy", || {
        legate.metrics().get(
            "legate_endpoints",
            &[("listener", "svc"), ("state", "healthy")],
        ) == Some(3.0)
    });
    let counts = tally(legate.addr("svc"), 30);
    assert_eq!(counts.values().sum::<usize>(), 30);
    for id in ["b1", "b2", "b3"] {
        assert!(
            counts.get(id).copied().unwrap_or(0) > 0,
            "{id} got no connection: {counts:?}"
        );
    }
}

#[test]
fn first_sends_everything_to_the_first_live_endpoint() {
    let b1 = TcpBackend::hello("b1");
    let b2 = TcpBackend::hello("b2");
    let mut legate = Legate::builder()
        .listener(
            Listener::new("svc")
                .upstream(dead_endpoint())
                .upstream(b1.addr())
                .upstream(b2.addr())
                .set("balance", "\"first\"")
                .set("connect_attempts", "3")
                .fast_health(),
        )
        .start();
    legate.wait_ready(T);
    eventually(T, "both live endpoints healthy", || {
        legate.metrics().get(
            "legate_endpoints",
            &[("listener", "svc"), ("state", "healthy")],
        ) == Some(2.0)
    });
    let counts = tally(legate.addr("svc"), 20);
    assert_eq!(counts.get("b1"), Some(&20), "got {counts:?}");

    // b1 goes away: everything moves to b2, and no connection fails on the way.
    drop(b1);
    let counts = tally(legate.addr("svc"), 20);
    assert_eq!(counts.get("b2"), Some(&20), "got {counts:?}");
}

fn start_balanced(balance: &str, backends: &[&TcpBackend]) -> Legate {
    let mut listener = Listener::new("svc").set("balance", &format!("{balance:?}"));
    for backend in backends {
        listener = listener.upstream(backend.addr());
    }
    let mut legate = Legate::builder().listener(listener).start();
    legate.wait_ready(T);
    let n = backends.len() as f64;
    eventually(T, "every endpoint healthy", || {
        legate.metrics().get(
            "legate_endpoints",
            &[("listener", "svc"), ("state", "healthy")],
        ) == Some(n)
    });
    legate
}

#[test]
fn least_conn_balances_open_connections() {
    let b1 = TcpBackend::hello("b1");
    let b2 = TcpBackend::hello("b2");
    let legate = start_balanced("least-conn", &[&b1, &b2]);
    // Hold every connection open: each new one must go where fewer are open.
    let mut held = Vec::new();
    let mut counts = BTreeMap::new();
    for _ in 0..6 {
        let mut stream = connect(legate.addr("svc"));
        let id = read_line(&mut stream).unwrap();
        *counts.entry(id).or_insert(0) += 1;
        held.push(stream);
    }
    assert_eq!(counts.get("b1"), Some(&3), "got {counts:?}");
    assert_eq!(counts.get("b2"), Some(&3), "got {counts:?}");
}

#[test]
fn random_reaches_every_endpoint() {
    let backends = [
        TcpBackend::hello("b1"),
        TcpBackend::hello("b2"),
        TcpBackend::hello("b3"),
    ];
    let legate = start_balanced("random", &[&backends[0], &backends[1], &backends[2]]);
    // The chance that 60 uniform picks miss one of three is about 1e-10.
    let counts = tally(legate.addr("svc"), 60);
    assert_eq!(counts.values().sum::<usize>(), 60);
    for id in ["b1", "b2", "b3"] {
        assert!(
            counts.get(id).copied().unwrap_or(0) > 0,
            "{id} got nothing: {counts:?}"
        );
    }
}
