//! Prometheus metrics on `/metrics`:
//! - every metric of PRODUCT.md's table (those that exist without TLS) is present, with its
//!   labels, after some traffic, a rejected connection and a config reload (SIGHUP);
//! - `legate_connections_total` rises by exactly the connections made;
//!   `legate_connections_active` follows the open connections;
//! - `legate_bytes_total{direction="upstream"|"downstream"}` equal exactly the bytes sent and
//!   received through an echo backend;
//! - `max_connections = 1`: a second connection is closed at once and counted in
//!   `legate_connections_rejected_total{reason="max_connections"}`; the first keeps working;
//! - a dead backend: the connection is closed and counted as `no_endpoint` or
//!   `connect_failed`; `legate_endpoints{state="unhealthy"}` counts it.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

/// The bound on every wait here: metrics move within milliseconds of the connection or
/// reload that moves them, a health verdict within 200 ms checks; 15 s adds a loaded 2-core
/// machine's slack.
const T: Duration = Duration::from_secs(15);

#[test]
fn every_documented_metric_is_present_with_its_labels() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .listener(Listener::new("live").upstream(backend.addr()).fast_health())
        .listener(
            Listener::new("dead")
                .upstream(local(free_port()))
                .set("required", "false")
                .set("health", r#"{ check = "none" }"#),
        )
        .start();
    legate.wait_ready(T);
    assert_eq!(
        echo_roundtrip(legate.addr("live"), "traffic").unwrap(),
        "traffic"
    );
    // The dead listener's only endpoint refuses: the client is closed, a failure is counted.
    assert!(turned_away(legate.addr("dead"), T));
    // A reload (same file) so `legate_reloads_total` has a sample.
    legate.signal(libc::SIGHUP);

    let wanted: &[(&str, &[&str])] = &[
        ("legate_connections_total", &["listener"]),
        ("legate_connections_active", &["listener"]),
        ("legate_connections_rejected_total", &["listener", "reason"]),
        ("legate_bytes_total", &["listener", "direction"]),
        (
            "legate_upstream_connect_seconds_bucket",
            &["listener", "le"],
        ),
        ("legate_upstream_connect_seconds_sum", &["listener"]),
        ("legate_upstream_connect_seconds_count", &["listener"]),
        (
            "legate_upstream_connect_failures_total",
            &["listener", "endpoint"],
        ),
        ("legate_endpoints", &["listener", "state"]),
        ("legate_reloads_total", &["source", "result"]),
        ("legate_ready", &[]),
    ];
    let mut last = String::new();
    let all_there = (0..200).any(|_| {
        let metrics = legate.metrics();
        last = metrics.text.clone();
        let ok = wanted.iter().all(|(name, labels)| {
            metrics
                .matching(name, &[])
                .any(|s| labels.iter().all(|l| s.labels.contains_key(*l)))
        }) && metrics
            .samples
            .iter()
            .any(|s| s.name.starts_with("process_"));
        if !ok {
            // 200 scrapes 50 ms apart: up to 10 s for the first health round and the reload
            // to show, which take well under a second.
            std::thread::sleep(Duration::from_millis(50));
        }
        ok
    });
    let missing: Vec<&str> = {
        let metrics = Metrics::parse(&last);
        wanted
            .iter()
            .filter(|(name, labels)| {
                !metrics
                    .matching(name, &[])
                    .any(|s| labels.iter().all(|l| s.labels.contains_key(*l)))
            })
            .map(|(name, _)| *name)
            .collect()
    };
    assert!(
        all_there,
        "missing metrics (or labels): {missing:?}; scrape:\n{last}"
    );

    let metrics = Metrics::parse(&last);
    assert_eq!(metrics.get("legate_ready", &[]), Some(1.0));
    // The scrape above may have come before the reload finished.
    eventually(T, "SIGHUP to count a good config reload", || {
        legate.metrics().value(
            "legate_reloads_total",
            &[("source", "config"), ("result", "ok")],
        ) >= 1.0
    });
    let failures = metrics.value(
        "legate_upstream_connect_failures_total",
        &[("listener", "dead")],
    );
    assert!(failures >= 1.0, "a refused connect should be counted");
    assert!(
        metrics.value(
            "legate_upstream_connect_seconds_count",
            &[("listener", "live")]
        ) >= 1.0
    );
}

#[test]
fn connection_counters_follow_the_traffic() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .listener(Listener::new("echo").upstream(backend.addr()))
        .start();
    legate.wait_ready(T);
    let l = [("listener", "echo")];
    let before = legate.metrics().value("legate_connections_total", &l);
    let mut held: Vec<_> = (0..3)
        .map(|i| {
            let mut s = connect(legate.addr("echo"));
            s.write_all(format!("{i}\n").as_bytes()).unwrap();
            assert_eq!(read_line(&mut s).unwrap(), i.to_string());
            s
        })
        .collect();
    eventually(T, "connections_total +3 and active == 3", || {
        let m = legate.metrics();
        m.value("legate_connections_total", &l) == before + 3.0
            && m.value("legate_connections_active", &l) == 3.0
    });
    held.clear();
    eventually(T, "connections_active back to 0", || {
        legate.metrics().value("legate_connections_active", &l) == 0.0
    });
    assert_eq!(
        legate.metrics().value("legate_connections_total", &l),
        before + 3.0
    );
}

#[test]
fn bytes_total_counts_exactly_what_moved() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .listener(Listener::new("echo").upstream(backend.addr()))
        .start();
    legate.wait_ready(T);
    let mut sent = 0usize;
    let mut received = 0usize;
    for (i, size) in [1usize, 1000, 123_457].into_iter().enumerate() {
        let data = payload(size, i as u64 + 1);
        let mut stream = connect(legate.addr("echo"));
        stream.write_all(&data).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let (back, error) = read_to_end(&mut stream);
        assert!(error.is_none(), "{error:?}");
        assert_eq!(back, data);
        sent += data.len();
        received += back.len();
    }
    let up = [("listener", "echo"), ("direction", "upstream")];
    let down = [("listener", "echo"), ("direction", "downstream")];
    eventually(T, "bytes_total to reach what was sent", || {
        let m = legate.metrics();
        m.value("legate_bytes_total", &up) >= sent as f64
            && m.value("legate_bytes_total", &down) >= received as f64
    });
    let m = legate.metrics();
    assert_eq!(m.value("legate_bytes_total", &up), sent as f64, "upstream");
    assert_eq!(
        m.value("legate_bytes_total", &down),
        received as f64,
        "downstream"
    );
}

#[test]
fn max_connections_rejects_the_excess_at_once() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .listener(
            Listener::new("one")
                .upstream(backend.addr())
                .set("max_connections", "1"),
        )
        .start();
    legate.wait_ready(T);
    let addr = legate.addr("one");
    let mut first = connect(addr);
    first.write_all(b"first\n").unwrap();
    assert_eq!(read_line(&mut first).unwrap(), "first");

    // The second is accepted and closed at once (or refused): never left waiting.
    // (5 s: a loopback connect's bound on a loaded machine; refused is fine too.)
    if let Ok(mut second) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        let _ = second.write_all(b"second\n");
        assert!(
            closed_within(&mut second, T),
            "the connection over max_connections should be closed at once"
        );
        let mut buf = [0u8; 16];
        assert!(
            !matches!(second.read(&mut buf), Ok(n) if n > 0),
            "the excess connection must not reach the backend"
        );
    }
    eventually(T, "a max_connections rejection to be counted", || {
        legate.metrics().value(
            "legate_connections_rejected_total",
            &[("listener", "one"), ("reason", "max_connections")],
        ) >= 1.0
    });
    first.write_all(b"first still works\n").unwrap();
    assert_eq!(read_line(&mut first).unwrap(), "first still works");

    drop(first);
    eventually(T, "a new connection to fit once the first closed", || {
        echo_roundtrip(addr, "again")
            .map(|l| l == "again")
            .unwrap_or(false)
    });
}

#[test]
fn a_dead_backend_is_counted_as_rejected() {
    let dead = local(free_port());
    let mut legate = Legate::builder()
        .listener(Listener::new("gone").upstream(dead).fast_health())
        .start();
    legate.wait_not_ready(T);
    eventually(T, "the endpoint to count as unhealthy", || {
        let m = legate.metrics();
        m.value(
            "legate_endpoints",
            &[("listener", "gone"), ("state", "unhealthy")],
        ) == 1.0
            && m.value(
                "legate_endpoints",
                &[("listener", "gone"), ("state", "healthy")],
            ) == 0.0
    });
    assert!(
        turned_away(legate.addr("gone"), T),
        "nowhere to go: the client is closed"
    );
    eventually(T, "the rejection to be counted", || {
        let m = legate.metrics();
        let l = |reason| [("listener", "gone"), ("reason", reason)];
        m.value("legate_connections_rejected_total", &l("no_endpoint"))
            + m.value("legate_connections_rejected_total", &l("connect_failed"))
            >= 1.0
    });
    assert_eq!(legate.metrics().get("legate_ready", &[]), Some(0.0));
}
