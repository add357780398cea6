//! Fault suite, client-side faults (client half-close, client RST mid-stream, slow
//! readers, silent clients, many idle connections, churn and port exhaustion; README.md's
//! "Fault coverage" table lists them): black-box tests against the real binary, each ending
//! with the shared checker (`common::fault::Probe::finish`).

mod common;

use common::fault::{self, assert_same, delta, in_new_netns, reset, scale, sh, Expect, Probe};
use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const NO_HEALTH: &str = r#"{ check = "none" }"#;

/// legate is ready after the first check (or none) of a backend that is up: milliseconds;
/// 10 s is a loaded 2-core machine's slack.
const READY: Duration = Duration::from_secs(10);

/// A ready legate with one listener, `svc`, in front of `upstream`, without health checks.
fn svc_without_health(upstream: SocketAddr) -> Legate {
    let mut legate = Legate::builder()
        .listener(
            Listener::new("svc")
                .upstream(upstream)
                .set("health", NO_HEALTH),
        )
        .start();
    legate.wait_ready(READY);
    legate
}

/// The client sends `PING`, half-closes and reads: the FIN reaches the backend as a
/// half-close, and its answer, sent 2 s later, still reaches the client.
#[test]
fn client_half_close_gets_a_delayed_answer() {
    let received = Received::default();
    let backend = {
        let received = received.clone();
        TcpBackend::start(move |mut s| {
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got); // until the client's FIN
            received.push(got);
            // "Delayed": 2 s, long after the FIN has crossed legate (milliseconds), so the
            // answer travels on a connection that is half-closed for certain.
            thread::sleep(Duration::from_secs(2));
            let _ = s.write_all(b"+PONG\r\n");
        })
    };
    let mut legate = svc_without_health(backend.addr());
    let probe = Probe::start(&legate);
    let mut client = connect(legate.addr("svc"));
    client.write_all(b"PING\r\n").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (answer, error) = read_to_end(&mut client);
    assert!(error.is_none(), "{error:?}");
    assert_eq!(answer, b"+PONG\r\n");
    assert_eq!(received.snapshot(), vec![b"PING\r\n".to_vec()]);
    drop(client);
    probe.finish(
        &mut legate,
        Expect {
            moved: &[("legate_bytes_total", &[("direction", "downstream")])],
            ..Expect::default()
        },
    );
}

/// The backend streams without end; the client resets after 10 MB. The upstream is
/// closed (the backend's writes fail) promptly, and buffers, pipes and descriptors are
/// released.
#[test]
fn client_reset_mid_stream_releases_everything() {
    let upstream_failed = Arc::new(Mutex::new(None::<Instant>));
    let backend = {
        let upstream_failed = upstream_failed.clone();
        TcpBackend::start(move |mut s| {
            let chunk = payload(256 * 1024, 12);
            let mut first = [0u8; 1];
            let _ = s.read(&mut first);
            while s.write_all(&chunk).is_ok() {}
            *upstream_failed.lock().unwrap() = Some(Instant::now());
        })
    };
    let mut legate = svc_without_health(backend.addr());
    let probe = Probe::start(&legate);
    for _ in 0..3 {
        *upstream_failed.lock().unwrap() = None;
        let mut client = connect(legate.addr("svc"));
        client.write_all(b"g").unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while total < 10 << 20 {
            let n = client.read(&mut buf).unwrap();
            assert!(n > 0, "EOF after {total} bytes");
            total += n;
        }
        let reset_at = Instant::now();
        reset(client);
        // The reset crosses legate in milliseconds and the backend's next write fails;
        // 10 s is a loaded machine's slack.
        let seen = wait_for(
            Duration::from_secs(10),
            "the backend's writes to fail",
            || *upstream_failed.lock().unwrap(),
        );
        eprintln!(
            "upstream closed {:?} after the client's reset",
            seen.saturating_duration_since(reset_at)
        );
    }
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                "legate_resets_total",
                &[("listener", "svc"), ("from", "client")],
            )],
            // Everything is released when the reset arrives (milliseconds): 5 s is a loaded
            // machine's slack.
            settle: Duration::from_secs(5),
            ..Expect::default()
        },
    );
}

/// A slow reader while the backend pushes as fast as it can (64 MiB by default,
/// 500 MB with LEGATE_FAULTS_FULL): legate's RSS stays within baseline + one connection's
/// buffers, because it stops reading upstream while the client does not drain; then the
/// reader speeds up and every byte arrives, in order.
#[test]
fn slow_reader_backpressure_bounds_memory() {
    let size = scale(64usize << 20, 500 << 20);
    let body = Arc::new(payload(size, 13));
    let backend = {
        let body = body.clone();
        TcpBackend::start(move |mut s| {
            let mut first = [0u8; 1];
            let _ = s.read(&mut first);
            let _ = s.write_all(&body);
            let _ = s.shutdown(Shutdown::Write);
        })
    };
    let mut legate = svc_without_health(backend.addr());
    let probe = Probe::start(&legate);
    let mut client = connect(legate.addr("svc"));
    client.write_all(b"g").unwrap();
    let mut got = Vec::with_capacity(size);
    let mut buf = vec![0u8; 1024];
    // ~100 KiB/s for 3 s: 1 KiB every 10 ms.
    let mut peak = 0;
    let slow_until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < slow_until {
        let n = client.read(&mut buf).unwrap();
        got.extend_from_slice(&buf[..n]);
        peak = peak.max(fault::rss_kib(probe.pid));
        thread::sleep(Duration::from_millis(10));
    }
    let cap_kib = 16 * 1024;
    assert!(
        peak <= probe.baseline.rss_kib + cap_kib,
        "RSS peaked at {peak} KiB with a slow reader (baseline {} KiB)",
        probe.baseline.rss_kib
    );
    let (rest, error) = read_to_end(&mut client);
    assert!(error.is_none(), "{error:?}");
    got.extend_from_slice(&rest);
    assert_same("slow reader's stream", &body, &got);
    eprintln!(
        "slow reader: RSS peak {peak} KiB, baseline {} KiB",
        probe.baseline.rss_kib
    );
    drop(client);
    probe.finish(
        &mut legate,
        Expect {
            moved: &[("legate_bytes_total", &[("direction", "downstream")])],
            ..Expect::default()
        },
    );
}

/// Silent clients on the plaintext port (200 by default, 10 000 with
/// LEGATE_FAULTS_FULL) against `max_connections = 50`: the excess is reset at once and
/// counted, the admin port (outside the data-plane limit) keeps answering, the idle timeout
/// reaps the silent ones, and a real client gets through afterwards.
#[test]
fn silent_clients_hit_the_cap_and_admin_stays_reachable() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .listener(
            Listener::new("svc")
                .upstream(backend.addr())
                .set("max_connections", "50")
                .set("idle_timeout", "\"3s\""),
        )
        .start();
    legate.wait_ready(READY);
    let addr = legate.addr("svc");
    assert_eq!(echo_roundtrip(addr, "warm").unwrap(), "warm");
    let probe = Probe::start(&legate);
    let count = scale(200, 10_000);
    let mut silent = Vec::with_capacity(count);
    for n in 0..count {
        // (5 s: a loopback connect, at once unless legate's accept queue is full.)
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => silent.push(s),
            // Over the cap legate accepts and resets at once; the reset can reach the
            // client before its connect() has reported success. That is the rejection.
            Err(e) if n >= 50 && e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connect {n} failed: {e}"),
        }
    }
    // Admin, metrics and readiness answer while the data plane is full.
    for path in ["/live", "/ready", "/metrics"] {
        let started = Instant::now();
        assert_eq!(legate.get(path).0, 200, "{path}");
        // An answer takes milliseconds; 5 s tells "answers" from "stuck behind the full data
        // plane" with a loaded machine's slack.
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    let rejected = eventually_value(&legate, count as f64 - 50.0);
    assert!(rejected >= count as f64 - 50.0, "rejected {rejected}");
    // The idle timeout reaps the silent ones that were admitted: 3 s after they were opened;
    // 15 s is a loaded machine's slack.
    eventually(Duration::from_secs(15), "silent connections reaped", || {
        legate
            .metrics()
            .value("legate_connections_active", &[("listener", "svc")])
            == 0.0
    });
    drop(silent);
    assert_eq!(echo_roundtrip(addr, "after").unwrap(), "after");
    probe.finish(
        &mut legate,
        Expect {
            moved: &[
                (
                    "legate_connections_rejected_total",
                    &[("listener", "svc"), ("reason", "max_connections")],
                ),
                ("legate_idle_timeouts_total", &[("listener", "svc")]),
            ],
            ..Expect::default()
        },
    );
}

fn eventually_value(legate: &Legate, at_least: f64) -> f64 {
    let mut last = 0.0;
    // Each rejection is counted as it happens, and the connects are done by now: 10 s is a
    // loaded machine's slack for the last ones (polled every 50 ms).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        last = legate.metrics().value(
            "legate_connections_rejected_total",
            &[("reason", "max_connections")],
        );
        if last >= at_least {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    last
}

/// Idle connections through legate to a real Redis (1 000 held 5 s by default;
/// LEGATE_FAULTS_FULL: 9 900 held 10 minutes): idle memory per connection within budget
/// (no per-connection buffers or pipes while idle), almost no CPU while idle, and a
/// `/metrics` scrape stays fast.
#[test]
fn many_idle_connections_cost_little() {
    let redis = RedisServer::start();
    let mut legate = Legate::builder()
        .nofile(65_536)
        .listener(Listener::new("redis").upstream(redis.addr()))
        .start();
    legate.wait_ready(READY);
    let addr = legate.addr("redis");
    let probe = Probe::start(&legate);
    let count = scale(1_000, 9_900);
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut s = connect(addr);
        if i % 100 == 0 {
            // A round trip now and then proves they are really through to Redis.
            s.write_all(b"PING\r\n").unwrap();
            assert_eq!(read_line(&mut s).unwrap(), "+PONG\r");
        }
        held.push(s);
    }
    // legate accepts and dials each in well under a millisecond, but up to 9 900 of them on
    // a loaded machine: 30 s.
    eventually(Duration::from_secs(30), "all connections open", || {
        legate
            .metrics()
            .value("legate_connections_active", &[("listener", "redis")])
            == count as f64
    });
    let rss = fault::rss_kib(probe.pid);
    let per_connection = (rss.saturating_sub(probe.baseline.rss_kib)) as f64 / count as f64;
    eprintln!("{count} idle connections: RSS {rss} KiB, {per_connection:.1} KiB each");
    assert!(
        per_connection <= 16.0,
        "{per_connection:.1} KiB per idle connection (budget 16 KiB)"
    );
    assert!(
        fault::pipe_count(probe.pid) <= probe.baseline.pipes + 4 * fault::PIPE_POOL_PER_THREAD,
        "idle connections hold pipes"
    );
    // Idle for 5 s (10 minutes in the full form): long enough for a timer or poll per
    // connection to show as CPU.
    let hold = scale(Duration::from_secs(5), Duration::from_secs(600));
    let cpu_before = fault::cpu_time(probe.pid);
    thread::sleep(hold);
    let cpu = fault::cpu_time(probe.pid) - cpu_before;
    eprintln!("CPU while idle: {cpu:?} over {hold:?}");
    // <1% is the goal; 5% leaves room for health checks on a shared CI machine.
    assert!(cpu <= hold / 20, "{cpu:?} of CPU over {hold:?} of idling");
    let started = Instant::now();
    let metrics = legate.metrics();
    let scrape = started.elapsed();
    // A scrape of a few KiB takes milliseconds whatever the connection count; 2 s tells that
    // from a scrape that walks every connection, with a loaded machine's slack.
    assert!(scrape < Duration::from_secs(2), "/metrics took {scrape:?}");
    assert_eq!(
        metrics.value("legate_connections_active", &[("listener", "redis")]),
        count as f64
    );
    drop(held);
    probe.finish(
        &mut legate,
        Expect {
            moved: &[("legate_connections_total", &[("listener", "redis")])],
            rss_slack_kib: 16 * 1024 + (count as u64 * 16),
            // Closing up to 9 900 connections and their upstreams, then the blocking pool's
            // 10 s linger: 30 s.
            settle: Duration::from_secs(30),
            ..Expect::default()
        },
    );
}

/// Churn: 6 threads × 100 short connections (LEGATE_FAULTS_FULL: 6 × 8 400, about
/// 50k): every round trip exact, fds, threads and RSS back to the baseline.
#[test]
fn connection_churn_returns_to_baseline() {
    let backend = TcpBackend::echo();
    let mut legate = svc_without_health(backend.addr());
    let addr = legate.addr("svc");
    assert_eq!(echo_roundtrip(addr, "warm").unwrap(), "warm");
    let probe = Probe::start(&legate);
    let per_thread = scale(100, 8_400);
    let failures = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..6)
        .map(|t| {
            let failures = failures.clone();
            thread::spawn(move || {
                for i in 0..per_thread {
                    let line = format!("t{t}-{i}");
                    if echo_roundtrip(addr, &line).ok().as_deref() != Some(line.as_str()) {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0, "failed round trips");
    probe.finish(
        &mut legate,
        Expect {
            moved: &[("legate_connections_total", &[("listener", "svc")])],
            ..Expect::default()
        },
    );
}

/// Port exhaustion: in a network namespace whose ephemeral port range is narrowed to
/// 16 ports, the test holds every port toward the backend; legate's dial then fails with
/// EADDRNOTAVAIL, counted as `reason="addr_not_available"` (not refused), without spinning;
/// once the ports are released (reset, so no TIME_WAIT), dials work again.
#[test]
fn port_exhaustion_has_its_own_reason_and_clears() {
    in_new_netns(|| {
        let backend = TcpBackend::echo();
        let mut legate = Legate::builder()
            .listener(
                Listener::new("svc")
                    .upstream(backend.addr())
                    .set("health", NO_HEALTH)
                    .set("connect_attempts", "1"),
            )
            .start();
        legate.wait_ready(READY);
        let addr = legate.addr("svc");
        assert_eq!(echo_roundtrip(addr, "warm").unwrap(), "warm");
        // Narrowed only now: free_port() and the listeners need the usual range.
        sh("sysctl -qw net.ipv4.ip_local_port_range='40000 40015'");
        let probe = Probe::start(&legate);
        // Take every ephemeral port toward the backend.
        let mut hogs = Vec::new();
        // A connect that gets a port completes at once; with none left it fails at once
        // (EADDRNOTAVAIL), so 2 s only bounds a connect that would hang.
        while let Ok(s) = TcpStream::connect_timeout(&backend.addr(), Duration::from_secs(2)) {
            hogs.push(s);
            assert!(hogs.len() <= 64, "the port range was not narrowed");
        }
        for _ in 0..5 {
            // The dial fails at once (no port); 5 s is a loaded machine's slack.
            assert!(turned_away(addr, Duration::from_secs(5)));
        }
        let metrics = legate.metrics();
        assert!(
            delta(
                &probe.before,
                &metrics,
                "legate_upstream_connect_errors_total",
                &[("reason", "addr_not_available")]
            ) >= 1.0,
            "{}",
            metrics.text
        );
        // Still out of ports: nothing retries in a loop meanwhile.
        let cpu_before = fault::cpu_time(probe.pid);
        let started = Instant::now();
        // One second: a retry loop would burn most of it.
        thread::sleep(Duration::from_secs(1));
        let (cpu, wall) = (fault::cpu_time(probe.pid) - cpu_before, started.elapsed());
        assert!(
            cpu < wall / 5,
            "{cpu:?} CPU in {wall:?}: spinning on EADDRNOTAVAIL?"
        );
        for hog in hogs {
            reset(hog);
        }
        // The ports come back at once (reset, no TIME_WAIT); the failed dials' ejection (1 s,
        // doubling) ends or the last-resort rule dials anyway, within seconds; 15 s is slack.
        eventually(Duration::from_secs(15), "dials work again", || {
            echo_roundtrip(addr, "again").ok().as_deref() == Some("again")
        });
        // Wide again, so the helpers' own connections (a backend's wake-up on drop) work.
        sh("sysctl -qw net.ipv4.ip_local_port_range='32768 60999'");
        probe.finish(
            &mut legate,
            Expect {
                moved: &[(
                    "legate_upstream_connect_errors_total",
                    &[("listener", "svc"), ("reason", "addr_not_available")],
                )],
                ..Expect::default()
            },
        );
    });
}
