//! Graceful shutdown:
//! - SIGTERM with `shutdown_delay = "0s"`: `/ready` turns 503 and the `ready_file` goes,
//!   new connections are refused
//!   at once, an open connection keeps working, the admin port keeps answering, and legate exits
//!   0 as soon as that connection closes;
//! - `POST /quitquitquit` does the same; `GET /quitquitquit` is 405 and changes nothing;
//! - an expiring `drain_timeout` closes the held connection and still exits 0;
//! - SIGHUP during a drain is ignored; a second SIGTERM ends the drain at once and exits 0;
//! - during `shutdown_delay` new connections are still accepted while `/ready` is 503.

mod common;

use common::*;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The bound on every wait here: SIGTERM, the listener closing, `/ready` turning 503 and the
/// exit after the last connection take milliseconds, the drain in
/// `an_expired_drain_timeout_...` 1 s; 15 s adds a loaded machine's slack. The drains that
/// must be cut short (`10m`, `60s` with the held connection dropped) are far longer than T,
/// so an exit within T shows they were.
const T: Duration = Duration::from_secs(15);

fn start(backend: &TcpBackend, shutdown_delay: &str, drain_timeout: &str) -> Legate {
    let mut legate = Legate::builder()
        .ready_file()
        .runtime("shutdown_delay", &format!("{shutdown_delay:?}"))
        .runtime("drain_timeout", &format!("{drain_timeout:?}"))
        .listener(Listener::new("app").upstream(backend.addr()))
        .start();
    legate.wait_ready(T);
    legate
}

fn assert_echo(stream: &mut TcpStream, line: &str) {
    stream
        .write_all(format!("{line}\n").as_bytes())
        .expect("write on the held connection");
    assert_eq!(
        read_line(stream).expect("read on the held connection"),
        line
    );
}

fn refused(addr: SocketAddr) -> bool {
    // A closed loopback port refuses at once; 1 s only bounds a connect that would hang.
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
}

/// After shutdown began: refused at once, held connection alive, admin up; then close and exit 0.
fn drains_then_exits_zero(legate: &mut Legate, mut held: TcpStream) {
    let addr = legate.addr("app");
    eventually(T, "new connections to be refused", || refused(addr));
    let (status, _) = legate.get("/ready");
    assert_eq!(status, 503, "/ready during the drain");
    eventually(T, "the ready_file to go once /ready is 503", || {
        !legate.ready_file().exists()
    });
    assert_eq!(
        legate.get("/live").0,
        200,
        "the admin port answers during the drain"
    );
    assert!(
        legate.try_wait().is_none(),
        "legate exited while a connection was open"
    );
    assert_echo(&mut held, "still here during the drain");
    assert!(
        legate.try_wait().is_none(),
        "legate exited while a connection was open"
    );
    drop(held);
    let status = legate.wait_exit(T);
    assert_eq!(
        status.code(),
        Some(0),
        "a clean drain exits 0, got {status}"
    );
}

#[test]
fn sigterm_drains_open_connections_then_exits_zero() {
    let backend = TcpBackend::echo();
    let mut legate = start(&backend, "0s", "60s");
    let mut held = connect(legate.addr("app"));
    assert_echo(&mut held, "before SIGTERM");
    legate.signal(libc::SIGTERM);
    drains_then_exits_zero(&mut legate, held);
}

#[test]
fn quitquitquit_needs_post_and_drains_like_sigterm() {
    let backend = TcpBackend::echo();
    let mut legate = start(&backend, "0s", "60s");
    let mut held = connect(legate.addr("app"));
    assert_echo(&mut held, "before quitquitquit");

    let (status, _) = legate.get("/quitquitquit");
    assert_eq!(status, 405, "GET /quitquitquit must be refused");
    assert_eq!(
        legate.get("/ready").0,
        200,
        "a GET must not start the shutdown"
    );
    assert_echo(
        &mut connect(legate.addr("app")),
        "new connections still work",
    );

    let (status, body) = legate.post("/quitquitquit");
    assert!(
        (200..300).contains(&status),
        "POST /quitquitquit: {status} {body}"
    );
    drains_then_exits_zero(&mut legate, held);
}

#[test]
fn an_expired_drain_timeout_closes_held_connections_and_exits_zero() {
    let backend = TcpBackend::echo();
    let mut legate = start(&backend, "0s", "1s");
    let mut held = connect(legate.addr("app"));
    assert_echo(&mut held, "before SIGTERM");
    legate.signal(libc::SIGTERM);
    assert!(
        closed_within(&mut held, T),
        "the held connection should be closed when drain_timeout expires"
    );
    let status = legate.wait_exit(T);
    assert_eq!(
        status.code(),
        Some(0),
        "an expired drain still exits 0, got {status}"
    );
}

#[test]
fn a_second_sigterm_ends_the_drain_at_once() {
    let backend = TcpBackend::echo();
    let mut legate = start(&backend, "0s", "10m");
    let mut held = connect(legate.addr("app"));
    assert_echo(&mut held, "before SIGTERM");
    legate.signal(libc::SIGTERM);
    let addr = legate.addr("app");
    eventually(T, "new connections to be refused", || refused(addr));
    // SIGHUP during the drain changes nothing.
    legate.signal(libc::SIGHUP);
    assert_echo(&mut held, "after SIGHUP");
    assert!(
        refused(addr),
        "SIGHUP must not reopen the listener during a drain"
    );
    assert_eq!(legate.get("/ready").0, 503);
    assert!(legate.try_wait().is_none(), "SIGHUP must not end the drain");
    legate.signal(libc::SIGTERM);
    let status = legate.wait_exit(T);
    assert_eq!(
        status.code(),
        Some(0),
        "second SIGTERM exits 0, got {status}"
    );
    assert!(closed_within(&mut held, T), "the held connection is closed");
}

#[test]
fn shutdown_delay_keeps_accepting_while_not_ready() {
    let backend = TcpBackend::echo();
    let mut legate = start(&backend, "10m", "10m");
    legate.signal(libc::SIGTERM);
    legate.wait_not_ready(T);
    // Still accepting (and forwarding) during the delay.
    let mut stream = connect(legate.addr("app"));
    assert_echo(&mut stream, "accepted during shutdown_delay");
    drop(stream);
    assert!(legate.try_wait().is_none());
    // A second SIGTERM cuts it short.
    legate.signal(libc::SIGTERM);
    let status = legate.wait_exit(T);
    assert_eq!(status.code(), Some(0), "got {status}");
}
