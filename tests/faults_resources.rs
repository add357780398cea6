//! Fault suite, resource exhaustion, admin abuse and lifecycle (FAULTS.md rows 32, 33, 36,
//! 37; row 34 is tests/metrics.rs `max_connections_rejects_the_excess_at_once` and
//! tests/faults_client.rs row 14; row 38's port conflict is tests/cli.rs). Each test ends
//! with the shared checker, or — for the rows where legate exits — with its exit status and
//! a log without panics.

mod common;

use common::fault::{self, assert_same, scale, Expect, Probe};
use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Row 33: legate under `RLIMIT_NOFILE` 64 with 100 held connections: accept(2) fails with
/// EMFILE and the loop backs off (counted in `legate_accept_errors_total{errno="EMFILE"}`,
/// no CPU spin), the admin port answers from its reserve, and everything recovers once the
/// held connections close — the clients left in the backlog are then served.
#[test]
fn row33_fd_exhaustion_backs_off_and_recovers() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .nofile(64)
        .listener(
            Listener::new("svc")
                .upstream(backend.addr())
                .set("health", r#"{ check = "none" }"#),
        )
        .start();
    legate.wait_ready(Duration::from_secs(10));
    let addr = legate.addr("svc");
    assert_eq!(echo_roundtrip(addr, "warm").unwrap(), "warm");
    let probe = Probe::start(&legate);
    let held: Vec<TcpStream> = (0..100).map(|_| connect(addr)).collect();
    eventually(Duration::from_secs(10), "EMFILE to be counted", || {
        legate
            .metrics()
            .value("legate_accept_errors_total", &[("errno", "EMFILE")])
            >= 1.0
    });
    // Admin, metrics and readiness from the reserve, while the data plane is out of fds.
    for path in ["/live", "/metrics", "/ready"] {
        let (status, _) = legate.get(path);
        assert!(status == 200 || status == 503, "{path}: {status}");
    }
    let cpu_before = fault::cpu_time(probe.pid);
    let started = Instant::now();
    thread::sleep(Duration::from_secs(2));
    let (cpu, wall) = (fault::cpu_time(probe.pid) - cpu_before, started.elapsed());
    eprintln!("out of descriptors: {cpu:?} CPU over {wall:?}");
    assert!(
        cpu < wall / 4,
        "{cpu:?} CPU over {wall:?} while out of fds: spinning?"
    );
    // A held connection that got through still works; then everything closes.
    drop(held);
    eventually(
        Duration::from_secs(15),
        "echo after the held connections closed",
        || echo_roundtrip(addr, "again").ok().as_deref() == Some("again"),
    );
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                "legate_accept_errors_total",
                &[("listener", "svc"), ("errno", "EMFILE")],
            )],
            settle: Duration::from_secs(20),
            ..Expect::default()
        },
    );
}

/// Sends raw bytes to the admin port; the status of the answer, if any.
fn admin_raw(admin: SocketAddr, bytes: &[u8]) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(bytes);
    let (raw, _) = read_to_end(&mut s);
    parse_http_response(&raw)
        .map(|(status, _)| status)
        .or_else(|| {
            let text = String::from_utf8_lossy(&raw);
            text.split_whitespace().nth(1)?.parse().ok()
        })
}

/// Row 36: admin port abuse — 64 KiB of headers (431), path traversal (404), GET on a
/// mutating path (405), a slowloris (closed by the header timeout), a burst of concurrent
/// scrapes (200, or 503 past the concurrency limit, none hanging) — while the data plane
/// keeps serving and nothing grows. (Random bytes and a 100 KB request line:
/// tests/admin_abuse.rs.)
#[test]
fn row36_admin_port_abuse() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .listener(Listener::new("svc").upstream(backend.addr()))
        .start();
    legate.wait_ready(Duration::from_secs(10));
    let admin = legate.admin;
    let data = legate.addr("svc");
    assert_eq!(echo_roundtrip(data, "warm").unwrap(), "warm");
    let probe = Probe::start(&legate);

    let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..1024 {
        big.extend_from_slice(format!("X-Pad-{i:04}: {}\r\n", "p".repeat(48)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    assert_eq!(admin_raw(admin, &big), Some(431), "64 KiB of headers");
    for path in [
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/metrics/../../etc/passwd",
    ] {
        let (status, body) = legate.request("GET", path).unwrap();
        assert!(status == 404 || status == 400, "{path}: {status} {body}");
        assert!(!body.contains("root:"), "{path} leaked a file");
    }
    assert_eq!(legate.request("GET", "/quitquitquit").unwrap().0, 405);
    assert_eq!(legate.request("PUT", "/quitquitquit").unwrap().0, 405);
    // Slowloris: an unfinished request head is cut off by the 2 s header timeout.
    let mut slow = connect(admin);
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(500));
        if slow.write_all(b"X-Slow: 1\r\n").is_err() {
            break;
        }
    }
    assert!(closed_within(&mut slow, Duration::from_secs(10)));
    eprintln!("admin slowloris cut after {:?}", started.elapsed());
    // A burst of concurrent scrapes (1 000; LEGATE_FAULTS_FULL: 10 000 in waves).
    let total: usize = scale(1_000, 10_000);
    let statuses = Arc::new(Mutex::new(std::collections::BTreeMap::<u16, usize>::new()));
    for wave in 0..total.div_ceil(1_000) {
        let n = (total - wave * 1_000).min(1_000);
        let mut open: Vec<TcpStream> = Vec::with_capacity(n);
        for _ in 0..n {
            if let Ok(mut s) = TcpStream::connect_timeout(&admin, Duration::from_secs(5)) {
                let _ =
                    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
                open.push(s);
            }
        }
        // Data plane meanwhile.
        assert_eq!(echo_roundtrip(data, "during").unwrap(), "during");
        let chunks: Vec<Vec<TcpStream>> = {
            let mut chunks = Vec::new();
            while !open.is_empty() {
                let rest = open.split_off(open.len().saturating_sub(100));
                chunks.push(rest);
            }
            chunks
        };
        let readers: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                let statuses = statuses.clone();
                thread::spawn(move || {
                    for mut s in chunk {
                        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                        let (raw, _) = read_to_end(&mut s);
                        let status = parse_http_response(&raw).map(|(s, _)| s).unwrap_or(0);
                        *statuses.lock().unwrap().entry(status).or_default() += 1;
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
    }
    let statuses = statuses.lock().unwrap().clone();
    eprintln!("concurrent scrapes: {statuses:?}");
    assert!(statuses.get(&200).copied().unwrap_or(0) > 0);
    assert!(
        statuses.keys().all(|s| [200, 503, 0].contains(s)),
        "unexpected statuses {statuses:?}"
    );
    // Status 0 = closed without an answer (over the limit): never more than the excess.
    assert_eq!(echo_roundtrip(data, "after").unwrap(), "after");
    probe.finish(
        &mut legate,
        Expect {
            moved: &[("legate_connections_total", &[("listener", "svc")])],
            ..Expect::default()
        },
    );
}

/// Row 32: a SIGHUP storm during a drain is ignored: no reload, no thread growth, the held
/// connection keeps working, and the process still exits 0 once it closes.
#[test]
fn row32_sighup_storm_during_the_drain_is_ignored() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .runtime("drain_timeout", "\"20s\"")
        .listener(Listener::new("svc").upstream(backend.addr()))
        .start();
    legate.wait_ready(Duration::from_secs(10));
    let addr = legate.addr("svc");
    let mut held = connect(addr);
    held.write_all(b"one\n").unwrap();
    assert_eq!(read_line(&mut held).unwrap(), "one");
    let pid = legate.pid();
    let threads_before = fault::threads(pid);
    let reloads_before = legate
        .metrics()
        .value("legate_reloads_total", &[("source", "config")]);
    legate.signal(libc::SIGTERM);
    legate.wait_not_ready(Duration::from_secs(5));
    for _ in 0..1000 {
        legate.signal(libc::SIGHUP);
    }
    thread::sleep(Duration::from_millis(500));
    legate.assert_running();
    let threads = fault::threads(pid);
    assert!(
        threads <= threads_before + 2,
        "threads grew from {threads_before} to {threads} during a SIGHUP storm"
    );
    let reloads = legate
        .metrics()
        .value("legate_reloads_total", &[("source", "config")]);
    assert_eq!(
        reloads, reloads_before,
        "a SIGHUP during the drain reloaded"
    );
    held.write_all(b"two\n").unwrap();
    assert_eq!(read_line(&mut held).unwrap(), "two");
    held.shutdown(Shutdown::Write).unwrap();
    let (rest, _) = read_to_end(&mut held);
    assert!(rest.is_empty());
    drop(held);
    let status = legate.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "exit status after the drain");
    let log = legate.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// Row 37: SIGTERM with many active connections: `pumps` echo loops (100 by default, 1 000
/// with LEGATE_FAULTS_FULL) and 5 bulk flows of 8 MiB, SIGTERM once 1 MiB of the bulk went
/// through. `/ready` is 503 at once, the listener keeps accepting for `shutdown_delay`
/// (1 s) then refuses, every in-flight transfer completes with matching hashes, exit 0.
/// (A second signal ending the drain: tests/drain.rs; the drain deadline: same file.)
#[test]
fn row37_sigterm_with_many_active_connections_completes_them() {
    let backend = TcpBackend::echo();
    let pumps = scale(100, 1_000);
    let mut legate = Legate::builder()
        .nofile(16_384)
        .runtime("shutdown_delay", "\"1s\"")
        .runtime("drain_timeout", "\"60s\"")
        .listener(
            Listener::new("svc")
                .upstream(backend.addr())
                .set("max_connections", "5000"),
        )
        .start();
    legate.wait_ready(Duration::from_secs(10));
    let addr = legate.addr("svc");
    let started = Arc::new(Barrier::new(pumps + 5 + 1));
    let progress = Arc::new(AtomicUsize::new(0));
    // Pumps: one connection each, 20 round trips of 1 KiB with a pause, hashes compared.
    let pump_threads: Vec<_> = (0..pumps)
        .map(|p| {
            let started = started.clone();
            thread::spawn(move || -> Result<(), String> {
                let mut s = connect(addr);
                started.wait();
                for i in 0..20 {
                    let msg = payload(1024, (p * 100 + i) as u64);
                    s.write_all(&msg)
                        .map_err(|e| format!("pump {p} write {i}: {e}"))?;
                    let mut got = vec![0u8; msg.len()];
                    s.read_exact(&mut got)
                        .map_err(|e| format!("pump {p} read {i}: {e}"))?;
                    if sha256_hex(&got) != sha256_hex(&msg) {
                        return Err(format!("pump {p}: hash mismatch at {i}"));
                    }
                    thread::sleep(Duration::from_millis(100));
                }
                Ok(())
            })
        })
        .collect();
    let bulk_threads: Vec<_> = (0..5)
        .map(|b| {
            let (started, progress) = (started.clone(), progress.clone());
            thread::spawn(move || -> Result<(), String> {
                let body = payload(8 << 20, 3700 + b);
                let mut s = connect(addr);
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                started.wait();
                let mut writer = s.try_clone().unwrap();
                let to_send = body.clone();
                let progress = progress.clone();
                let sender = thread::spawn(move || {
                    for chunk in to_send.chunks(64 * 1024) {
                        writer.write_all(chunk)?;
                        progress.fetch_add(chunk.len(), Ordering::SeqCst);
                        thread::sleep(Duration::from_millis(10));
                    }
                    writer.shutdown(Shutdown::Write)
                });
                let (got, error) = read_to_end(&mut s);
                sender
                    .join()
                    .unwrap()
                    .map_err(|e| format!("bulk {b} send: {e}"))?;
                if let Some(e) = error {
                    return Err(format!("bulk {b} read after {} bytes: {e}", got.len()));
                }
                assert_same(&format!("bulk {b}"), &body, &got);
                Ok(())
            })
        })
        .collect();
    started.wait();
    eventually(Duration::from_secs(30), "1 MiB of bulk through", || {
        progress.load(Ordering::SeqCst) >= 1 << 20
    });
    legate.signal(libc::SIGTERM);
    let signalled = Instant::now();
    legate.wait_not_ready(Duration::from_secs(2));
    eprintln!("/ready 503 {:?} after SIGTERM", signalled.elapsed());
    // Within shutdown_delay new connections are still accepted and served.
    assert_eq!(echo_roundtrip(addr, "late").unwrap(), "late");
    let mut errors = Vec::new();
    for t in pump_threads.into_iter().chain(bulk_threads) {
        if let Err(e) = t.join().unwrap() {
            errors.push(e);
        }
    }
    assert!(
        errors.is_empty(),
        "transfers failed during the drain: {errors:?}"
    );
    // After shutdown_delay the listener is closed: refused at once.
    eventually(Duration::from_secs(5), "the listener to refuse", || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
            || !legate_alive(&mut legate)
    });
    let status = legate.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
    let log = legate.log();
    assert!(!log.contains("panicked"), "{log}");
}

fn legate_alive(legate: &mut Legate) -> bool {
    legate.try_wait().is_none()
}
