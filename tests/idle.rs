//! `idle_timeout`:
//! - a connection with no byte in either direction for `idle_timeout` is closed;
//! - it counts from the last byte in either direction, so a connection that keeps talking
//!   (client to backend, or backend to client) outlives several `idle_timeout`s;
//! - without `idle_timeout` a quiet connection stays open.

mod common;

use common::*;
use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

/// The bound on every wait here: the `idle_timeout`s are 1–2 s, so a quiet connection is
/// closed within 2 s of its last byte; 15 s adds a loaded 2-core machine's slack.
const T: Duration = Duration::from_secs(15);

fn start(backend: &TcpBackend, idle_timeout: Option<&str>) -> Legate {
    let mut listener = Listener::new("idle").upstream(backend.addr());
    if let Some(idle) = idle_timeout {
        listener = listener.set("idle_timeout", &format!("{idle:?}"));
    }
    let mut legate = Legate::builder().listener(listener).start();
    legate.wait_ready(T);
    legate
}

fn echo(stream: &mut TcpStream, line: &str) {
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(
        read_line(stream).expect("the busy connection was cut"),
        line,
        "the busy connection was cut"
    );
}

#[test]
fn a_quiet_connection_is_closed_after_idle_timeout() {
    let backend = TcpBackend::echo();
    let legate = start(&backend, Some("1s"));
    let mut stream = connect(legate.addr("idle"));
    echo(&mut stream, "one line, then silence");
    assert!(
        closed_within(&mut stream, T),
        "an idle connection should be closed after idle_timeout"
    );
}

#[test]
fn idle_timeout_counts_from_the_last_byte_not_from_the_start() {
    let backend = TcpBackend::echo();
    let legate = start(&backend, Some("2s"));
    let mut stream = connect(legate.addr("idle"));
    // Talk every 200 ms for 5 s: 2.5 idle timeouts of lifetime, never 2 s of silence.
    let until = Instant::now() + Duration::from_secs(5);
    let mut i = 0;
    while Instant::now() < until {
        echo(&mut stream, &format!("line {i}"));
        i += 1;
        thread::sleep(Duration::from_millis(200));
    }
    assert!(closed_within(&mut stream, T), "then silence closes it");
}

#[test]
fn backend_traffic_alone_keeps_the_connection_alive() {
    // The backend talks every 200 ms; the client never writes.
    let backend = TcpBackend::start(|mut stream| {
        for i in 0..25 {
            if stream.write_all(format!("tick {i}\n").as_bytes()).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(200));
        }
        let _ = stream.write_all(b"done\n");
        // Then silence, with the connection left open: 30 s, longer than T, so the close the
        // test waits for is legate's idle_timeout, never this handler ending.
        thread::sleep(Duration::from_secs(30));
    });
    let legate = start(&backend, Some("2s"));
    let mut stream = connect(legate.addr("idle"));
    for i in 0..25 {
        assert_eq!(
            read_line(&mut stream).unwrap(),
            format!("tick {i}"),
            "downstream-only traffic must count as activity"
        );
    }
    assert_eq!(read_line(&mut stream).unwrap(), "done");
    assert!(closed_within(&mut stream, T), "then silence closes it");
}

#[test]
fn without_idle_timeout_a_quiet_connection_stays_open() {
    let backend = TcpBackend::echo();
    let legate = start(&backend, None);
    let mut stream = connect(legate.addr("idle"));
    echo(&mut stream, "hello");
    // 3 s of silence is longer than any idle_timeout this file sets (1–2 s): a default
    // timeout of that order would close the connection here.
    assert!(
        !closed_within(&mut stream, Duration::from_secs(3)),
        "no idle_timeout configured: the connection must stay open"
    );
    echo(&mut stream, "still open");
}
