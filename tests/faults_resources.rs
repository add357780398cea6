//! Fault suite, resource exhaustion, admin abuse and lifecycle: descriptor exhaustion,
//! memory pressure, admin port abuse, a SIGHUP storm during a drain, SIGTERM with many
//! active connections. The connection cap is also tests/metrics.rs
//! `max_connections_rejects_the_excess_at_once` and tests/faults_client.rs
//! `silent_clients_hit_the_cap_and_admin_stays_reachable`; port conflicts at start are
//! tests/cli.rs (README.md's "Fault coverage" table lists them all). Each test ends with the
//! shared checker, or — where legate exits — with its exit status and a log without panics.

mod common;

use common::fault::{self, assert_same, scale, Expect, Probe};
use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// legate is ready after the first check (or none) of a backend that is up: milliseconds;
/// 10 s is a loaded 2-core machine's slack.
const READY: Duration = Duration::from_secs(10);

/// Legate under `RLIMIT_NOFILE` 64 with 100 held connections: accept(2) fails with
/// EMFILE and the loop backs off (counted in `legate_accept_errors_total{errno="EMFILE"}`,
/// no CPU spin), the admin port answers from its reserve, and everything recovers once the
/// held connections close — the clients left in the backlog are then served.
#[test]
fn fd_exhaustion_backs_off_and_recovers() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .nofile(64)
        .listener(
            Listener::new("svc")
                .upstream(backend.addr())
                .set("health", r#"{ check = "none" }"#),
        )
        .start();
    legate.wait_ready(READY);
    let addr = legate.addr("svc");
    assert_eq!(echo_roundtrip(addr, "warm").unwrap(), "warm");
    let probe = Probe::start(&legate);
    // While legate is out of descriptors, a connection it accepted but could not dial for
    // is reset (the contract's answer to a client it cannot serve), and that reset can
    // arrive before connect() returns; only the connections that got through are held.
    // (5 s: a loopback connect completes in the kernel, into the backlog if need be.)
    let held: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
        .collect();
    assert!(
        held.len() >= 20,
        "only {} of 100 connections got through: legate should hold about 60 descriptors' worth",
        held.len()
    );
    // The first accept past the limit fails at once; 10 s is a loaded machine's slack.
    eventually(Duration::from_secs(10), "EMFILE to be counted", || {
        legate
            .metrics()
            .value("legate_accept_errors_total", &[("errno", "EMFILE")])
            >= 1.0
    });
    // Admin, metrics and readiness from the reserve, while the data plane is out of fds.
    // The reserve descriptors race the data plane's own accept retries for each freed
    // descriptor, so under a CPU hog one request can wait out its read timeout: each path
    // must answer within the bound, not at the first try.
    for path in ["/live", "/metrics", "/ready"] {
        let status = wait_for(
            Duration::from_secs(30),
            &format!("{path} to answer"),
            || legate.request("GET", path).ok().map(|(status, _)| status),
        );
        assert!(status == 200 || status == 503, "{path}: {status}");
    }
    let cpu_before = fault::cpu_time(probe.pid);
    let started = Instant::now();
    // Two seconds out of descriptors: an accept loop that does not back off would burn most
    // of them.
    thread::sleep(Duration::from_secs(2));
    let (cpu, wall) = (fault::cpu_time(probe.pid) - cpu_before, started.elapsed());
    eprintln!("out of descriptors: {cpu:?} CPU over {wall:?}");
    assert!(
        cpu < wall / 4,
        "{cpu:?} CPU over {wall:?} while out of fds: spinning?"
    );
    // A held connection that got through still works; then everything closes.
    drop(held);
    // The accept loop's back-off ends and it serves the backlog, then new clients: seconds at
    // most; 15 s is a loaded machine's slack.
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
            // The default 15 s, plus 5 s for the backlog's connections to be served and closed.
            settle: Duration::from_secs(20),
            ..Expect::default()
        },
    );
}

/// Sends raw bytes to the admin port; the status of the answer, if any.
fn admin_raw(admin: SocketAddr, bytes: &[u8]) -> Option<u16> {
    // A loopback connect (5 s) and an answer in milliseconds (10 s): a loaded machine's slack.
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

/// Admin port abuse — 64 KiB of headers (431), path traversal (404), GET on a
/// mutating path (405), a slowloris (closed by the header timeout), a burst of concurrent
/// scrapes (200, or 503 past the concurrency limit, none hanging) — while the data plane
/// keeps serving and nothing grows. (Random bytes and a 100 KB request line:
/// tests/admin_abuse.rs.)
#[test]
fn admin_port_abuse() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .listener(Listener::new("svc").upstream(backend.addr()))
        .start();
    legate.wait_ready(READY);
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
    // A header line every 500 ms, 1.5 s in all: trickling lines must not extend the 2 s
    // header timeout.
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(500));
        if slow.write_all(b"X-Slow: 1\r\n").is_err() {
            break;
        }
    }
    // Cut at 2 s; 10 s is a loaded machine's slack.
    assert!(closed_within(&mut slow, Duration::from_secs(10)));
    eprintln!("admin slowloris cut after {:?}", started.elapsed());
    // A burst of concurrent scrapes (1 000; LEGATE_FAULTS_FULL: 10 000 in waves).
    let total: usize = scale(1_000, 10_000);
    let statuses = Arc::new(Mutex::new(std::collections::BTreeMap::<u16, usize>::new()));
    for wave in 0..total.div_ceil(1_000) {
        let n = (total - wave * 1_000).min(1_000);
        let mut open: Vec<TcpStream> = Vec::with_capacity(n);
        for _ in 0..n {
            // (5 s: a loopback connect, at once unless the admin backlog is full.)
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
                        // 1 000 scrapes queue behind the admin server's concurrency limit;
                        // each is milliseconds, 20 s is the queue on a loaded machine.
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

/// A SIGHUP storm during a drain is ignored: no reload, no thread growth, the held
/// connection keeps working, and the process still exits 0 once it closes.
#[test]
fn sighup_storm_during_the_drain_is_ignored() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .runtime("drain_timeout", "\"20s\"")
        .listener(Listener::new("svc").upstream(backend.addr()))
        .start();
    legate.wait_ready(READY);
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
    // /ready turns 503 at the signal; 5 s is a loaded machine's slack.
    legate.wait_not_ready(Duration::from_secs(5));
    for _ in 0..1000 {
        legate.signal(libc::SIGHUP);
    }
    // Half a second for the storm's effects (a reload, threads) to show, were there any.
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
    // The drain ends with its last connection, at once (drain_timeout 20 s is not reached);
    // 15 s is a loaded machine's slack.
    let status = legate.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "exit status after the drain");
    let log = legate.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// SIGTERM with many active connections: `pumps` echo loops (100 by default, 1 000
/// with LEGATE_FAULTS_FULL) and 5 bulk flows of 8 MiB, SIGTERM once 1 MiB of the bulk went
/// through. `/ready` is 503 at once, the listener keeps accepting for `shutdown_delay`
/// (1 s) then refuses, every in-flight transfer completes with matching hashes, exit 0.
/// (A second signal ending the drain: tests/drain.rs; the drain deadline: same file.)
#[test]
fn sigterm_with_many_active_connections_completes_them() {
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
    legate.wait_ready(READY);
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
                    // 20 round trips 100 ms apart: each pump spans the 1 s shutdown_delay.
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
                // 8 MiB at 64 KiB per 10 ms takes about 1.3 s; 60 s (the drain_timeout) is a
                // loaded machine's slack, and ends a stuck read.
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                started.wait();
                let mut writer = s.try_clone().unwrap();
                let to_send = body.clone();
                let progress = progress.clone();
                let sender = thread::spawn(move || {
                    for chunk in to_send.chunks(64 * 1024) {
                        writer.write_all(chunk)?;
                        progress.fetch_add(chunk.len(), Ordering::SeqCst);
                        // Paced, so the flows are still running when SIGTERM comes.
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
    // 1 MiB over five paced flows takes a fraction of a second; 30 s is the slack for 105
    // clients starting on a loaded machine.
    eventually(Duration::from_secs(30), "1 MiB of bulk through", || {
        progress.load(Ordering::SeqCst) >= 1 << 20
    });
    legate.signal(libc::SIGTERM);
    let signalled = Instant::now();
    // /ready turns 503 at the signal. The bound stays short on purpose: the check below must
    // run within shutdown_delay (1 s) anyway, so a longer wait would only fail later.
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
    // shutdown_delay is 1 s, and the transfers joined above took longer: the listener is
    // already closed or closes within 5 s; a refused loopback connect fails at once (1 s).
    eventually(Duration::from_secs(5), "the listener to refuse", || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err()
            || !legate_alive(&mut legate)
    });
    // Every transfer has completed, so the drain ends at once; 30 s is slack for closing up
    // to 1 005 connections on a loaded machine.
    let status = legate.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0));
    let log = legate.log();
    assert!(!log.contains("panicked"), "{log}");
}

fn legate_alive(legate: &mut Legate) -> bool {
    legate.try_wait().is_none()
}

/// A memory cgroup of our own under the test's cgroup, with a hard limit; removed on Drop
/// (after the processes in it are gone). cgroup v2 when its memory controller is there,
/// else v1 (both need root, which CI is).
struct MemoryCgroup {
    dir: std::path::PathBuf,
    v2: bool,
}

impl MemoryCgroup {
    fn create(name: &str, limit: u64) -> MemoryCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let unified = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|controllers| controllers.split_whitespace().any(|c| c == "memory"));
        let (dir, v2) = if unified {
            let path = own
                .lines()
                .find_map(|line| line.strip_prefix("0::"))
                .expect("no cgroup v2 entry in /proc/self/cgroup");
            (
                std::path::Path::new("/sys/fs/cgroup")
                    .join(path.trim_start_matches('/'))
                    .join(name),
                true,
            )
        } else {
            let path = own
                .lines()
                .find_map(|line| {
                    let mut fields = line.splitn(3, ':');
                    let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
                    controllers
                        .split(',')
                        .any(|c| c == "memory")
                        .then_some(path)
                })
                .expect("no memory controller in /proc/self/cgroup (cgroup v1 or v2)");
            (
                std::path::Path::new("/sys/fs/cgroup/memory")
                    .join(path.trim_start_matches('/'))
                    .join(name),
                false,
            )
        };
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot create the memory cgroup {} ({e}): this test needs root and a writable \
                 memory controller (cgroup v1, or v2 with memory delegated)",
                dir.display()
            )
        });
        let cgroup = MemoryCgroup { dir, v2 };
        let limit = limit.to_string();
        if v2 {
            cgroup.write("memory.max", &limit);
            cgroup.write_if_there("memory.swap.max", "0");
        } else {
            cgroup.write("memory.limit_in_bytes", &limit);
            cgroup.write_if_there("memory.memsw.limit_in_bytes", &limit);
            // Socket buffers count against the limit only with TCP accounting on (v2 always
            // counts them); pages the process already has move with it where the kernel
            // still can (v1 move_charge is gone from recent kernels: its start-up pages,
            // a few MiB, then stay with the parent).
            cgroup.write_if_there("memory.kmem.tcp.limit_in_bytes", &limit);
            cgroup.write_if_there("memory.move_charge_at_immigrate", "3");
        }
        cgroup
    }

    fn write(&self, file: &str, value: &str) {
        std::fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("write {value} to {}/{file}: {e}", self.dir.display()));
    }

    fn write_if_there(&self, file: &str, value: &str) {
        if self.dir.join(file).exists() {
            if let Err(e) = std::fs::write(self.dir.join(file), value) {
                eprintln!("memory cgroup: {file} = {value} not applied: {e}");
            }
        }
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_else(|e| panic!("read {}/{file}: {e}", self.dir.display()))
    }

    fn add(&self, pid: u32) {
        self.write("cgroup.procs", &pid.to_string());
    }

    /// Processes the OOM killer killed in this cgroup.
    fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        self.read(file)
            .lines()
            .find_map(|line| line.strip_prefix("oom_kill ")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no oom_kill line in {file}"))
    }

    /// Socket buffer memory charged to the cgroup: v1's TCP peak, v2's current `sock`.
    fn socket_memory(&self) -> u64 {
        if self.v2 {
            self.read("memory.stat")
                .lines()
                .find_map(|line| line.strip_prefix("sock ")?.trim().parse().ok())
                .expect("no sock line in memory.stat")
        } else {
            self.read("memory.kmem.tcp.max_usage_in_bytes")
                .trim()
                .parse()
                .expect("a byte count")
        }
    }

    /// The most memory the cgroup was ever charged.
    fn peak(&self) -> u64 {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        self.read(file).trim().parse().expect("a byte count")
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // The cgroup empties when its processes are reaped; wait a moment for that (5 s:
        // reaping takes milliseconds; after that the directory is left behind, not fatal).
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Legate in a 64 MiB memory cgroup (`MemoryMax=64M`, socket buffers charged as
/// cgroup v2 charges them), with 500 connections (600 with LEGATE_FAULTS_FULL) whose
/// clients do not read while the backend pushes 256 KiB into each: no OOM kill; legate's
/// own memory stays bounded (splice keeps no bytes in user space) and, with
/// `socket_buffer`, so does the kernel's socket memory for it; admission stops at
/// `max_connections` with the excess counted; the admin port answers throughout; once the
/// clients read, every byte arrives, promptly.
///
/// The count is what fits: a stalled connection's client socket holds one packet in the
/// making, up to 64 KiB whatever SO_SNDBUF says, so 1 000 of them pass 64 MiB of socket
/// memory. Past the limit the kernel drops what the backends send and they retransmit with
/// exponential back-off (RTOs of 50 s were seen), so streams stall long after the clients
/// start reading. README: "Memory limits".
#[test]
fn memory_pressure_no_oom_and_admission_stops_at_the_cap() {
    const LIMIT: u64 = 64 << 20;
    let count = scale(500usize, 600);
    // The budget an operator would do (README, "Memory limits"): a stalled connection's
    // sockets hold up to 64 KiB on the client side plus 4 × socket_buffer on the upstream
    // side (the receive buffer, accounted at twice its size, with packet overhead); keep
    // them all within three quarters of the limit.
    let socket_buffer = scale(8_192u64, 4_096);
    let budget = count as u64 * (64 * 1024 + 4 * socket_buffer);
    assert!(budget <= LIMIT / 4 * 3);
    let per_connection = 256 << 10;
    let body = Arc::new(payload(per_connection, 35));
    let backend = {
        let body = body.clone();
        TcpBackend::start(move |mut s| {
            let mut first = [0u8; 1];
            if s.read(&mut first).ok() == Some(1) {
                let _ = s.write_all(&body);
                let _ = s.shutdown(Shutdown::Write);
            }
            // Hold the socket until the client is done with it.
            let _ = s.read(&mut first);
        })
    };
    let cgroup = MemoryCgroup::create(
        &format!("legate-memory-pressure-{}", std::process::id()),
        LIMIT,
    );
    let mut legate = Legate::builder()
        .nofile(4 * count as u64 + 256)
        .listener(
            Listener::new("svc")
                .upstream(backend.addr())
                .set("health", r#"{ check = "none" }"#)
                .set("max_connections", &count.to_string())
                .set("socket_buffer", &socket_buffer.to_string()),
        )
        .start();
    cgroup.add(legate.pid());
    legate.wait_ready(READY);
    let addr = legate.addr("svc");
    let probe = Probe::start(&legate);

    let mut clients = Vec::with_capacity(count);
    for n in 0..count {
        // (5 s: a loopback connect, at once unless legate's backlog is full.)
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {n}: {e}"));
        s.write_all(b"g").unwrap();
        clients.push(s);
        // In steps the in-test backend's accept backlog (128) can take: an overflow would
        // time dials out and eject the backend, which is faults_upstream's
        // full_accept_queue_hits_the_connect_timeout's business, not this one's.
        if n % 50 == 49 {
            // 50 accepts take milliseconds; 10 s is a loaded machine's slack.
            eventually(Duration::from_secs(10), "the backend accepts", || {
                backend.accepted() > n
            });
        }
    }
    // Each admission is a dial to a local backend (milliseconds); 60 s covers 600 of them in a
    // memory cgroup under pressure on a loaded machine.
    eventually(Duration::from_secs(60), "every connection admitted", || {
        legate
            .metrics()
            .value("legate_connections_active", &[("listener", "svc")])
            == count as f64
    });
    // Let the backends push while nobody reads (2 s: 256 KiB each fills every buffer on the
    // path in milliseconds; what is measured next is the filled state).
    thread::sleep(Duration::from_secs(2));
    // The watermark: past max_connections every new client is turned away and counted.
    for _ in 0..20 {
        // Over the cap legate resets at once; 5 s is a loaded machine's slack.
        assert!(
            turned_away(addr, Duration::from_secs(5)),
            "over the cap, admitted"
        );
    }
    for path in ["/live", "/ready", "/metrics"] {
        let (status, body) = legate.get(path);
        assert_eq!(status, 200, "{path} under memory pressure: {body}");
    }
    let metrics = legate.metrics();
    assert!(
        metrics.value(
            "legate_connections_rejected_total",
            &[("listener", "svc"), ("reason", "max_connections")]
        ) >= 20.0
    );
    let rss = fault::rss_kib(probe.pid);
    let sockets = cgroup.socket_memory();
    eprintln!(
        "memory pressure: {count} stalled connections, RSS {rss} KiB (baseline {} KiB), \
         socket memory {} KiB, cgroup peak {} KiB, limit {} KiB",
        probe.baseline.rss_kib,
        sockets >> 10,
        cgroup.peak() >> 10,
        LIMIT >> 10
    );
    // 16 KiB a connection is the idle budget
    // (faults_client::many_idle_connections_cost_little); a stalled one may also hold a pipe's
    // bookkeeping, never the bytes themselves in user space.
    assert!(
        rss <= probe.baseline.rss_kib + 16 * count as u64 + 16 * 1024,
        "RSS {rss} KiB with {count} stalled connections"
    );
    assert!(
        sockets <= budget,
        "socket memory {sockets} bytes over the budget of {budget}: socket_buffer did not bound it"
    );

    // The clients read now: every stream arrives whole, without retransmission stalls.
    let reading = Instant::now();
    for (n, client) in clients.iter_mut().enumerate() {
        // 30 s per read is the point: with socket memory past the limit, senders back off
        // exponentially and a stream stalls for 50 s (README, "Memory limits"); within budget
        // each stream is read in milliseconds.
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut got = vec![0u8; per_connection];
        client
            .read_exact(&mut got)
            .unwrap_or_else(|e| panic!("connection {n} after {:?}: {e}", reading.elapsed()));
        assert!(got == *body, "connection {n}: the bytes differ");
    }
    eprintln!(
        "memory pressure: all {count} streams read in {:?}",
        reading.elapsed()
    );
    drop(clients);
    assert_eq!(
        cgroup.oom_kills(),
        0,
        "the OOM killer ran in legate's cgroup"
    );
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                "legate_connections_rejected_total",
                &[("listener", "svc"), ("reason", "max_connections")],
            )],
            rss_slack_kib: 16 * 1024 + 16 * count as u64,
            // Closing 600 connections and their upstreams in a cgroup under pressure, then
            // the blocking pool's 10 s linger: 30 s.
            settle: Duration::from_secs(30),
            ..Expect::default()
        },
    );
    drop(legate);
    drop(cgroup);
}
