//! Fault suite, upstream faults (a backend that refuses, freezes, blackholes, resets, speaks
//! first, flaps, fragments, or is removed with open connections; README.md's "Fault
//! coverage" table lists them): black-box tests against the real binary, each ending with
//! the shared checker (`common::fault::Probe::finish`). An upstream half-close is covered by
//! tests/half_close.rs.

mod common;

use common::fault::{self, assert_same, delta, in_new_netns, reset, scale, sh, Expect, Probe};
use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const NO_HEALTH: &str = r#"{ check = "none" }"#;

/// legate is ready after the first check (or none) of a backend that is up: milliseconds;
/// 10 s is a loaded 2-core machine's slack.
const READY: Duration = Duration::from_secs(10);
const CONNECT_ERRORS: &str = "legate_upstream_connect_errors_total";

fn warm_up(addr: SocketAddr) {
    assert_eq!(echo_roundtrip(addr, "warm").unwrap(), "warm");
}

fn redis_ping(addr: SocketAddr) -> redis::RedisResult<String> {
    let mut con = redis_connect(addr)?;
    redis::cmd("PING").query(&mut con)
}

/// Nothing listening. The client is closed at once, the dial is counted as
/// `reason="refused"`, tries are bounded, the warning is rate-limited.
#[test]
fn refused_backend_closes_the_client_at_once() {
    let live = TcpBackend::echo();
    let dead = local(free_port());
    let mut legate = Legate::builder()
        .listener(Listener::new("live").upstream(live.addr()))
        .listener(
            Listener::new("dead")
                .upstream(dead)
                .set("health", NO_HEALTH)
                .set("connect_attempts", "3")
                .set("required", "false"),
        )
        .start();
    legate.wait_ready(READY);
    warm_up(legate.addr("live"));
    let probe = Probe::start(&legate);
    for _ in 0..20 {
        let started = Instant::now();
        // A refused dial fails in microseconds. 2 s is generous for a loaded machine and
        // still below what timed-out dials would take (connect_attempts 3 × connect_timeout
        // 1 s), so it tells "refused, at once" from "waited for timeouts".
        assert!(
            turned_away(legate.addr("dead"), Duration::from_secs(2)),
            "client not closed"
        );
        // "within milliseconds": generous, CPU is shared in CI.
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    let after = legate.metrics();
    let refused = delta(
        &probe.before,
        &after,
        CONNECT_ERRORS,
        &[("reason", "refused")],
    );
    // One endpoint: one try per client at most (distinct endpoints only), fewer while it is
    // passively ejected (those are `no_endpoint`).
    assert!((1.0..=20.0).contains(&refused), "refused dials: {refused}");
    let warnings = legate.log().matches("upstream connect failed").count();
    assert!(
        warnings <= 5,
        "{warnings} connect warnings for 20 failures: not rate-limited"
    );
    warm_up(legate.addr("live"));
    probe.finish(
        &mut legate,
        Expect {
            moved: &[
                (
                    CONNECT_ERRORS,
                    &[("listener", "dead"), ("reason", "refused")],
                ),
                (
                    "legate_connections_rejected_total",
                    &[("listener", "dead"), ("reason", "connect_failed")],
                ),
            ],
            ..Expect::default()
        },
    );
}

/// A frozen (SIGSTOPped) Redis: connects still succeed, no bytes come back. Other
/// listeners are unaffected, memory stays bounded while the client keeps writing, the idle
/// timeout closes and counts the stuck connections, and after SIGCONT traffic resumes.
#[test]
fn frozen_backend_is_bounded_timed_out_and_recovers() {
    let frozen = RedisServer::start();
    let other = RedisServer::start();
    let mut legate = Legate::builder()
        .listener(
            Listener::new("frozen")
                .upstream(frozen.addr())
                .set("idle_timeout", "\"2s\"")
                .set("required", "false"),
        )
        .listener(Listener::new("other").upstream(other.addr()))
        .start();
    legate.wait_ready(READY);
    assert_eq!(redis_ping(legate.addr("frozen")).unwrap(), "PONG");
    let probe = Probe::start(&legate);

    frozen.pause();
    // A client that keeps writing into the frozen backend: legate stops reading from it
    // once the upstream stops draining, so what it holds is bounded by its buffers.
    let pushed = Arc::new(AtomicUsize::new(0));
    let writer = {
        let pushed = pushed.clone();
        let addr = legate.addr("frozen");
        thread::spawn(move || {
            let mut stream = connect(addr);
            // A stalled write returns after 1 s, so the loop sees its deadline; 10 s of
            // writing outlasts the RSS sample below (1.5 s) and the 2 s idle_timeout.
            stream
                .set_write_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            let chunk = b"*1\r\n$4\r\nPING\r\n".repeat(4096);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match stream.write(&chunk) {
                    Ok(n) => {
                        pushed.fetch_add(n, Ordering::SeqCst);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(_) => break,
                }
            }
        })
    };
    let mut silent = connect(legate.addr("frozen"));
    silent.write_all(b"PING\r\n").unwrap();
    // 1.5 s: the writer fills every buffer on the path within milliseconds, and the sample
    // comes before the 2 s idle_timeout ends the stuck connections.
    thread::sleep(Duration::from_millis(1500));
    // Writes stall: far less than the 10 s of writing gets in.
    let rss_during = fault::rss_kib(probe.pid);
    assert!(
        rss_during <= probe.baseline.rss_kib + 16 * 1024,
        "RSS grew from {} to {} KiB while a client wrote into a frozen backend",
        probe.baseline.rss_kib,
        rss_during
    );
    // Other listeners are unaffected.
    assert_eq!(redis_ping(legate.addr("other")).unwrap(), "PONG");
    // The idle timeout closes the stuck connection (no byte either way for 2 s).
    // 10 s: the 2 s idle_timeout plus a loaded machine's slack.
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)),
        "a connection to a frozen backend was not closed by idle_timeout"
    );
    writer.join().unwrap();
    eprintln!(
        "pushed {} KiB into the frozen backend's path before writes stalled",
        pushed.load(Ordering::SeqCst) / 1024
    );
    frozen.resume();
    // Redis answers at once after SIGCONT; 10 s is a loaded machine's slack.
    eventually(Duration::from_secs(10), "PONG after SIGCONT", || {
        redis_ping(legate.addr("frozen")).ok().as_deref() == Some("PONG")
    });
    probe.finish(
        &mut legate,
        Expect {
            moved: &[("legate_idle_timeouts_total", &[("listener", "frozen")])],
            ..Expect::default()
        },
    );
}

/// A Python listener with `listen(0)` that never accepts: once its one-slot queue is full,
/// the kernel drops further SYNs.
struct NeverAccepts {
    port: u16,
    _proc: Proc,
}

impl NeverAccepts {
    fn start() -> NeverAccepts {
        require_bin("python3", "python3");
        let port = free_port();
        let child = std::process::Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import socket,time\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                 s.bind(('127.0.0.1',{port}))\ns.listen(0)\ntime.sleep(1e9)"
            ))
            .spawn()
            .expect("spawn python3");
        // python3 starts and listens within a fraction of a second; 10 s is slack.
        wait_listening(port, Duration::from_secs(10), "python listen(0)");
        NeverAccepts {
            port,
            _proc: Proc {
                name: "python3".into(),
                child,
            },
        }
    }
}

/// The upstream's accept queue is full, so dials hang in SYN_SENT: connect_timeout
/// fires (`reason="timeout"`), the client is closed; 200 clients leave no pending tasks.
#[test]
fn full_accept_queue_hits_the_connect_timeout() {
    let full = NeverAccepts::start();
    // Fill its queue from here (the ones that do not fit just time out: a connect that fits
    // completes at once over loopback, so 300 ms only bounds the ones that hang).
    let fillers: Vec<TcpStream> = (0..4)
        .filter_map(|_| {
            TcpStream::connect_timeout(&local(full.port), Duration::from_millis(300)).ok()
        })
        .collect();
    assert!(
        !fillers.is_empty(),
        "could not reach the never-accepting listener"
    );
    let live = TcpBackend::echo();
    let mut legate = Legate::builder()
        .listener(Listener::new("live").upstream(live.addr()))
        .listener(
            Listener::new("full")
                .upstream(local(full.port))
                .set("health", NO_HEALTH)
                .set("connect_timeout", "\"500ms\"")
                .set("connect_attempts", "1")
                .set("required", "false"),
        )
        .start();
    legate.wait_ready(READY);
    warm_up(legate.addr("live"));
    let probe = Probe::start(&legate);
    // connect_timeout 500 ms, one attempt: 5 s is that plus a loaded machine's slack.
    assert!(
        turned_away(legate.addr("full"), Duration::from_secs(5)),
        "client not closed after connect_timeout"
    );
    // 200 clients at once: each is closed (timeout, or no_endpoint while ejected, which
    // can reset a client before its connect() returns).
    // (5 s: a loopback connect to legate, at once unless its accept queue is full.)
    let clients: Vec<TcpStream> = (0..200)
        .filter_map(|_| {
            match TcpStream::connect_timeout(&legate.addr("full"), Duration::from_secs(5)) {
                Ok(stream) => Some(stream),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
                Err(e) => panic!("connect: {e}"),
            }
        })
        .collect();
    // Each is closed after at most its 500 ms dial (the rest at once, while ejected); 10 s per
    // client, then 5 s for the gauge, are a loaded machine's slack.
    for mut c in clients {
        assert!(closed_within(&mut c, Duration::from_secs(10)));
    }
    eventually(Duration::from_secs(5), "no connection left open", || {
        legate
            .metrics()
            .value("legate_connections_active", &[("listener", "full")])
            == 0.0
    });
    warm_up(legate.addr("live"));
    drop(fillers);
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                CONNECT_ERRORS,
                &[("listener", "full"), ("reason", "timeout")],
            )],
            ..Expect::default()
        },
    );
}

/// A blackholed endpoint, in a network namespace of its own where every packet from
/// the backend's address 127.0.0.2 is dropped by a routing rule (`blackhole`): new dials
/// hang in SYN_SENT (connect timeout, counted as `timeout`, not `refused`) and established
/// connections go silent (closed by `idle_timeout`, never hung forever).
#[test]
fn blackholed_endpoint_new_dials_and_mid_stream() {
    in_new_netns(|| {
        // The local table is consulted after our rule, so the rule can drop loopback packets.
        sh("ip addr add 127.0.0.2/8 dev lo 2>/dev/null; ip rule add pref 100 lookup local && ip rule del pref 0");
        let backend = TcpBackend::start_on("127.0.0.2:0", |s| {
            let mut s = s;
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let mut legate = Legate::builder()
            .listener(
                Listener::new("hole")
                    .upstream(backend.addr())
                    .set("health", NO_HEALTH)
                    .set("connect_timeout", "\"500ms\"")
                    .set("connect_attempts", "1")
                    .set("idle_timeout", "\"2s\""),
            )
            // No idle_timeout (a database pool's setting): keepalive does not probe a
            // connection with bytes in flight, tcp_user_timeout must end it.
            .listener(
                Listener::new("busy")
                    .upstream(backend.addr())
                    .set("health", NO_HEALTH)
                    .set("tcp_user_timeout", "\"2s\""),
            )
            .start();
        legate.wait_ready(READY);
        let addr = legate.addr("hole");
        let mut held = connect(addr);
        held.write_all(b"before\n").unwrap();
        assert_eq!(read_line(&mut held).unwrap(), "before");
        let mut busy = connect(legate.addr("busy"));
        busy.write_all(b"before\n").unwrap();
        assert_eq!(read_line(&mut busy).unwrap(), "before");
        let probe = Probe::start(&legate);

        sh("ip rule add pref 10 from 127.0.0.2 blackhole");
        // Established: the echo never comes back; idle_timeout ends it (2 s; 10 s is slack).
        held.write_all(b"after\n").unwrap();
        assert!(
            closed_within(&mut held, Duration::from_secs(10)),
            "a blackholed connection was not closed"
        );
        // Established, no idle_timeout, bytes unacknowledged: TCP_USER_TIMEOUT fails the
        // upstream socket, and the client gets the reset (never a clean end).
        busy.write_all(b"after\n").unwrap();
        // tcp_user_timeout 2 s; 15 s is slack (a retransmission timer, not CPU, sets it).
        busy.set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        match busy.read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!(
                "a busy blackholed connection after {:?}: {other:?} (wanted a reset)",
                started.elapsed()
            ),
        }
        // New dials: no SYN-ACK ever arrives; connect_timeout 500 ms (5 s: slack).
        assert!(turned_away(addr, Duration::from_secs(5)));
        let metrics = legate.metrics();
        assert!(metrics.value(CONNECT_ERRORS, &[("reason", "timeout")]) >= 1.0);
        assert_eq!(
            delta(
                &probe.before,
                &metrics,
                CONNECT_ERRORS,
                &[("reason", "refused")]
            ),
            0.0,
            "a blackhole must not count as refused"
        );

        sh("ip rule del pref 10");
        // The timed-out dials ejected the endpoint (1 s, doubling) and the last-resort rule
        // dials it anyway: echo works again within seconds; 10 s is slack.
        eventually(
            Duration::from_secs(10),
            "echo after the blackhole is lifted",
            || echo_roundtrip(addr, "back").ok().as_deref() == Some("back"),
        );
        probe.finish(
            &mut legate,
            Expect {
                moved: &[
                    ("legate_idle_timeouts_total", &[("listener", "hole")]),
                    (
                        "legate_resets_total",
                        &[("listener", "busy"), ("from", "upstream")],
                    ),
                    (
                        CONNECT_ERRORS,
                        &[("listener", "hole"), ("reason", "timeout")],
                    ),
                ],
                ..Expect::default()
            },
        );
    });
}

/// Upstream RSTs, at accept and after 10 MB: the client is reset too (an error, never
/// a clean EOF), what arrived is an exact prefix, `legate_resets_total{from="upstream"}`
/// moves, no connection or descriptor is left.
#[test]
fn upstream_reset_at_accept_and_mid_stream_reaches_the_client_as_a_reset() {
    let body = Arc::new(payload(10 << 20, 5));
    let at_accept = TcpBackend::start(reset);
    let mid_stream = {
        let body = body.clone();
        TcpBackend::start(move |mut s| {
            let mut first = [0u8; 1];
            let _ = s.read(&mut first);
            let _ = s.write_all(&body);
            // A moment for the 10 MB to leave the socket, so the reset lands mid-stream.
            thread::sleep(Duration::from_millis(100));
            reset(s);
        })
    };
    let mut legate = Legate::builder()
        .listener(
            Listener::new("accept")
                .upstream(at_accept.addr())
                .set("health", NO_HEALTH),
        )
        .listener(
            Listener::new("mid")
                .upstream(mid_stream.addr())
                .set("health", NO_HEALTH),
        )
        .start();
    legate.wait_ready(READY);
    let probe = Probe::start(&legate);

    // The reset may reach legate while it is still dialling (then the dial fails and the
    // client is reset, possibly before its own connect() returns) or after: either way
    // the client must see an error, never a clean EOF.
    // (5 s: a loopback connect; 10 s: the reset follows at once, the rest is slack.)
    match TcpStream::connect_timeout(&legate.addr("accept"), Duration::from_secs(5)) {
        Ok(mut client) => {
            client
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let (data, error) = read_to_end(&mut client);
            assert!(data.is_empty());
            assert!(
                error.is_some(),
                "reset at accept reached the client as a clean EOF"
            );
        }
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }

    for round in 0..3 {
        let mut client = connect(legate.addr("mid"));
        client.write_all(b"go").unwrap();
        // Read slowly at first so the reset catches bytes still in flight.
        let (data, error) = read_to_end(&mut client);
        assert!(
            error.is_some(),
            "round {round}: a reset after {} bytes reached the client as a clean EOF",
            data.len()
        );
        assert_same("prefix before the reset", &body[..data.len()], &data);
    }
    probe.finish(
        &mut legate,
        Expect {
            moved: &[
                (
                    "legate_resets_total",
                    &[("listener", "accept"), ("from", "upstream")],
                ),
                (
                    "legate_resets_total",
                    &[("listener", "mid"), ("from", "upstream")],
                ),
            ],
            ..Expect::default()
        },
    );
    for name in ["accept", "mid"] {
        assert_eq!(
            legate
                .metrics()
                .value("legate_connections_active", &[("listener", name)]),
            0.0
        );
    }
}

/// The server speaks first (a 78-byte MySQL-like greeting on accept): it reaches a
/// client that sends nothing, at once — legate dials on accept.
#[test]
fn server_speaks_first_greeting_arrives_without_client_bytes() {
    let greeting: Vec<u8> = payload(78, 7);
    let backend = {
        let greeting = greeting.clone();
        TcpBackend::start(move |mut s| {
            let _ = s.write_all(&greeting);
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf);
        })
    };
    let mut legate = Legate::builder()
        .listener(Listener::new("mysql").upstream(backend.addr()))
        .start();
    legate.wait_ready(READY);
    let probe = Probe::start(&legate);
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let mut client = connect(legate.addr("mysql"));
        let mut got = vec![0u8; 78];
        client.read_exact(&mut got).unwrap();
        worst = worst.max(started.elapsed());
        assert_same("greeting", &greeting, &got);
        client.shutdown(Shutdown::Write).unwrap();
    }
    eprintln!("slowest greeting: {worst:?}");
    // Loopback takes about a millisecond; a detection timeout would take seconds.
    assert!(worst < Duration::from_secs(1), "greeting took {worst:?}");
    probe.finish(
        &mut legate,
        Expect {
            moved: &[("legate_bytes_total", &[("direction", "downstream")])],
            ..Expect::default()
        },
    );
}

/// A flapping Redis (killed and restarted every ~200 ms) under load: no crash, errors
/// only on connections that hit a down window, ten consecutive successes once it is stable,
/// resources back to the baseline. 6 s of flapping by default, 60 s with LEGATE_FAULTS_FULL.
#[test]
fn flapping_backend_under_load() {
    let mut redis = RedisServer::start();
    let mut legate = Legate::builder()
        .listener(
            Listener::new("redis")
                .upstream(redis.addr())
                .set(
                    "health",
                    r#"{ check = "redis", interval = "200ms", timeout = "200ms" }"#,
                )
                .set("connect_timeout", "\"500ms\""),
        )
        .start();
    legate.wait_ready(READY);
    let addr = legate.addr("redis");
    assert_eq!(redis_ping(addr).unwrap(), "PONG");
    let probe = Probe::start(&legate);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match redis_ping(addr) {
                        Ok(p) if p == "PONG" => ok.fetch_add(1, Ordering::SeqCst),
                        _ => failed.fetch_add(1, Ordering::SeqCst),
                    };
                    thread::sleep(Duration::from_millis(10)); // ~100 PINGs a second each
                }
            })
        })
        .collect();
    // 6 s of flapping (60 s in the full form): fifteen stop/start cycles under load.
    let until = Instant::now() + scale(Duration::from_secs(6), Duration::from_secs(60));
    let mut flaps = 0;
    // Down 200 ms, up 200 ms: one health-check interval each, so checks see both states.
    while Instant::now() < until {
        redis.stop();
        thread::sleep(Duration::from_millis(200));
        redis.restart();
        thread::sleep(Duration::from_millis(200));
        flaps += 1;
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.join().unwrap();
    }
    eprintln!(
        "{flaps} flaps: {} PINGs ok, {} failed",
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    legate.wait_ready(READY);
    // Ten consecutive successes once the backend is stable: the next 200 ms check re-admits
    // it (a passing check ends a passive ejection at once); 15 s is a loaded machine's slack.
    eventually(Duration::from_secs(15), "ten consecutive PONGs", || {
        (0..10).all(|_| redis_ping(addr).ok().as_deref() == Some("PONG"))
    });
    assert!(ok.load(Ordering::SeqCst) > 0);
    probe.finish(
        &mut legate,
        Expect {
            moved: &[("legate_health_checks_total", &[("result", "fail")])],
            ..Expect::default()
        },
    );
}

/// A fragmenting upstream (1-byte writes, TCP_NODELAY, a pause every few bytes) and a
/// slow one: byte-exact whatever the segmentation, and no CPU spin (legate's CPU time stays a
/// fraction of the wall time).
#[test]
fn fragmenting_and_slow_upstream_is_byte_exact_without_spinning() {
    let body = Arc::new(payload(scale(8 * 1024, 64 * 1024), 9));
    let fragmenting = {
        let body = body.clone();
        TcpBackend::start(move |mut s| {
            let _ = s.set_nodelay(true);
            let mut first = [0u8; 1];
            let _ = s.read(&mut first);
            for (i, byte) in body.iter().enumerate() {
                if s.write_all(&[*byte]).is_err() {
                    return;
                }
                if i % 8 == 0 {
                    // A pause every 8 bytes, so the segments arrive apart.
                    thread::sleep(Duration::from_micros(100));
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        })
    };
    // 10 bytes every 100 ms for 3 s: mostly waiting.
    let slow_body = Arc::new(payload(300, 10));
    let slow = {
        let body = slow_body.clone();
        TcpBackend::start(move |mut s| {
            let mut first = [0u8; 1];
            let _ = s.read(&mut first);
            for chunk in body.chunks(10) {
                if s.write_all(chunk).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
            let _ = s.shutdown(Shutdown::Write);
        })
    };
    let mut legate = Legate::builder()
        .listener(Listener::new("frag").upstream(fragmenting.addr()))
        .listener(Listener::new("slow").upstream(slow.addr()))
        .start();
    legate.wait_ready(READY);
    let probe = Probe::start(&legate);

    let mut client = connect(legate.addr("frag"));
    client.write_all(b"g").unwrap();
    let (got, error) = read_to_end(&mut client);
    assert!(error.is_none(), "{error:?}");
    assert_same("fragmented stream", &body, &got);
    drop(client);

    let cpu_before = fault::cpu_time(probe.pid);
    let wall = Instant::now();
    let mut client = connect(legate.addr("slow"));
    client.write_all(b"g").unwrap();
    let (got, error) = read_to_end(&mut client);
    assert!(error.is_none(), "{error:?}");
    assert_same("slow stream", &slow_body, &got);
    drop(client);
    let (cpu, wall) = (fault::cpu_time(probe.pid) - cpu_before, wall.elapsed());
    eprintln!("slow stream: {cpu:?} CPU over {wall:?}");
    assert!(
        cpu < wall / 5,
        "legate used {cpu:?} of CPU over {wall:?} of a mostly idle stream: spinning?"
    );
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                "legate_bytes_total",
                &[("listener", "frag"), ("direction", "downstream")],
            )],
            ..Expect::default()
        },
    );
}

/// An endpoint removed from the endpoint file while it has open connections: new
/// connections go only to the remaining one within a reload, the `legate_endpoints` gauge
/// follows, and the open connections are kept (the default).
#[test]
fn endpoint_removed_with_active_connections() {
    let a = TcpBackend::hello("a");
    let b = TcpBackend::hello("b");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints");
    std::fs::write(&file, format!("{}\n{}\n", a.addr(), b.addr())).unwrap();
    let mut legate = Legate::builder()
        .listener(
            Listener::new("svc")
                .upstream(format!("file:{}", file.display()))
                .fast_health(),
        )
        .start();
    legate.wait_ready(READY);
    // Each endpoint's first check runs at once (200 ms after that): 5 s is slack.
    eventually(Duration::from_secs(5), "both endpoints healthy", || {
        legate
            .metrics()
            .value("legate_endpoints", &[("state", "healthy")])
            == 2.0
    });
    let addr = legate.addr("svc");
    let probe = Probe::start(&legate);
    let mut held: Vec<(String, TcpStream)> = (0..scale(40, 100))
        .map(|_| {
            let mut s = connect(addr);
            (read_line(&mut s).unwrap(), s)
        })
        .collect();
    assert!(held.iter().any(|(id, _)| id == "b"));

    let tmp = dir.path().join("endpoints.tmp");
    std::fs::write(&tmp, format!("{}\n", a.addr())).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    // The watcher's debounce (50 ms, at most 500 ms) and a read; 3 s is slack.
    eventually(Duration::from_secs(3), "gauge shows one endpoint", || {
        let m = legate.metrics();
        m.value("legate_endpoints", &[("state", "healthy")]) == 1.0
            && m.value("legate_endpoints", &[("state", "unhealthy")]) == 0.0
    });
    for _ in 0..10 {
        let mut s = connect(addr);
        assert_eq!(
            read_line(&mut s).unwrap(),
            "a",
            "a new connection reached the removed endpoint"
        );
    }
    // Open connections, to b included, are kept and still carry bytes.
    for (i, (id, s)) in held.iter_mut().enumerate() {
        let line = format!("still-{id}-{i}");
        s.write_all(format!("{line}\n").as_bytes()).unwrap();
        assert_eq!(read_line(s).unwrap(), line);
    }
    drop(held);
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                "legate_reloads_total",
                &[("source", "file"), ("result", "ok")],
            )],
            ..Expect::default()
        },
    );
}
