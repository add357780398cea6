//! DNS discovery against a real `dnsmasq` (on a free 127.0.0.1 port, answering from a hosts
//! file with a 1s TTL), with the `legate` binary and small TCP backends on 127.0.0.2 and
//! 127.0.0.3 that name themselves on accept:
//! - an A record rewritten (+ SIGHUP to dnsmasq) moves new connections to the new address
//!   within the TTL plus one second;
//! - with dnsmasq killed, the last answer stays in use and
//!   `legate_reloads_total{source="dns",result="error"}` rises;
//! - with dnsmasq stopped (SIGSTOP), lookups time out, the last answer stays, and after
//!   SIGCONT a change is followed again;
//! - a name that is NXDOMAIN at start is no start-up error: `/ready` is 503 naming the
//!   target, and 200 once the name exists;
//! - SRV: two targets of one priority share the traffic; with two priorities only the
//!   lower number gets traffic while it is up, and the other takes over when it is down.
//!
//! The dnsmasq, the backends and the polling come from `common`; this file starts legate
//! itself (`legate=debug` logging, one listener resolving through dnsmasq).

mod common;

use common::dns::{backend_port, Dnsmasq, BACKEND_A, BACKEND_B};
use common::{free_port, http, legate_command, local, wait_for, Proc, TcpBackend};
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The bound on legate's first answer (a lookup, then a 200 ms health check) and on a
/// failover to a second endpoint that is already checked: milliseconds of work; 10 s is a
/// loaded 2-core machine's slack.
const FIRST: Duration = Duration::from_secs(10);

/// The bound on a health verdict for endpoints just found: their first check runs at once,
/// 200 ms apart after that; 5 s is a loaded machine's slack.
const HEALTHY: Duration = Duration::from_secs(5);

/// A backend on `ip` that writes `NAME\n` on accept.
fn backend(ip: std::net::Ipv4Addr, port: u16, name: &str) -> TcpBackend {
    TcpBackend::hello_on(&format!("{ip}:{port}"), name)
}

/// dnsmasq answering `*.test.local` from `hosts` (and `srv` records, as `--srv-host`
/// values), TTL 1s; any other name under test.local is NXDOMAIN.
fn dnsmasq(hosts: &str, srv: &[String]) -> Dnsmasq {
    let srv: Vec<String> = srv.iter().map(|r| format!("--srv-host={r}")).collect();
    Dnsmasq::start(hosts, 1, "test.local", &srv)
}

/// dnsmasq answering `_redis._tcp.test.local` with SRV records for `targets` on `port`, in
/// this order: (host, priority), weight 10 each; `host1.test.local` is 127.0.0.2 and
/// `host2.test.local` 127.0.0.3.
fn srv_dnsmasq(port: u16, targets: [(&str, u16); 2]) -> Dnsmasq {
    let records: Vec<String> = targets
        .iter()
        .map(|(host, priority)| format!("_redis._tcp.test.local,{host},{port},{priority},10"))
        .collect();
    dnsmasq(
        "127.0.0.2 host1.test.local\n127.0.0.3 host2.test.local\n",
        &records,
    )
}

/// Connects through legate and returns the backend's name, or `None` if the connection
/// was refused or closed without a name (no endpoint eligible).
///
/// Callers poll it, so a miss only means "look again": a loopback connect (1 s) and a greeting
/// through legate (2 s) take milliseconds, and short bounds keep a failing poll cheap.
fn who(addr: SocketAddr) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while let Ok(1) = stream.read(&mut byte) {
        if byte[0] == b'\n' {
            return Some(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
    None
}

// ---------------------------------------------------------------------------------------------
// legate
// ---------------------------------------------------------------------------------------------

struct Legate {
    proc: Proc,
    admin: SocketAddr,
    listen: SocketAddr,
    dir: TempDir,
}

impl Legate {
    /// Starts `legate run -c FILE` with one listener on `upstream`, resolving through `dns`.
    fn start(dns: &Dnsmasq, upstream: &str) -> Legate {
        let dir = tempfile::tempdir().expect("tempdir");
        let admin = local(free_port());
        let listen = local(free_port());
        let config = format!(
            r#"[admin]
listen = "{admin}"

{dns}
[[listeners]]
name = "redis"
listen = "{listen}"
upstream = ["{upstream}"]
connect_timeout = "500ms"
health = {{ check = "tcp", interval = "200ms", timeout = "200ms" }}
"#,
            dns = dns.legate_table("1s", "5s")
        );
        let config_path = dir.path().join("legate.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("legate.log")).unwrap();
        let child = legate_command()
            .args(["run", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "legate=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn legate");
        let mut legate = Legate {
            proc: Proc {
                name: "legate".into(),
                child,
            },
            admin,
            listen,
            dir,
        };
        // /live answers within milliseconds of the start; 15 s is a debug build on a loaded
        // machine many times over (as common's LegateBuilder).
        let started = Instant::now();
        while !matches!(http(admin, "GET", "/live"), Ok((200, _))) {
            if let Ok(Some(status)) = legate.proc.child.try_wait() {
                panic!("legate exited with {status}: {}", legate.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "legate /live not 200 within 15s: {}",
                legate.log()
            );
            thread::sleep(Duration::from_millis(25)); // poll interval, as common's wait_for
        }
        legate
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("legate.log")).unwrap_or_default()
    }

    fn ready(&self) -> (u16, String) {
        http(self.admin, "GET", "/ready").unwrap_or((0, String::new()))
    }

    /// `legate_reloads_total{source="dns",result=RESULT}`, 0 when absent.
    fn dns_reloads(&self, result: &str) -> f64 {
        // A busy machine may delay one scrape; each failed try is printed. A scrape takes
        // milliseconds; 10 s of retries is a loaded machine's slack.
        let body = wait_for(Duration::from_secs(10), "GET /metrics", || {
            match http(self.admin, "GET", "/metrics") {
                Ok((200, body)) => Some(body),
                other => {
                    eprintln!("GET /metrics: {other:?}");
                    None
                }
            }
        });
        body.lines()
            .filter(|line| line.starts_with("legate_reloads_total{"))
            .filter(|line| {
                line.contains(r#"source="dns""#) && line.contains(&format!(r#"result="{result}""#))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn wait_ready(&self, timeout: Duration) {
        wait_for(timeout, "/ready 200", || {
            (self.ready().0 == 200).then_some(())
        });
    }

    /// Waits until `/endpoints` shows at least `count` healthy endpoints.
    fn wait_healthy(&self, count: usize, timeout: Duration) {
        wait_for(timeout, &format!("{count} healthy endpoints"), || {
            let (_, body) = http(self.admin, "GET", "/endpoints").ok()?;
            (body.matches("\"healthy\"").count() >= count).then_some(())
        });
    }

    /// Waits until a new connection through legate reaches `backend`; returns how long it took.
    fn wait_backend(&self, backend: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        wait_for(timeout, &format!("a connection reaching {backend}"), || {
            (who(self.listen).as_deref() == Some(backend)).then_some(())
        });
        started.elapsed()
    }
}

impl Drop for Legate {
    fn drop(&mut self) {
        // Ends the process first (Proc's own drop then finds it reaped), so the log is whole.
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        if thread::panicking() {
            eprintln!("---- legate log ----\n{}", self.log());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_record_change_moves_new_connections() {
    let port = backend_port();
    let _a = backend(BACKEND_A, port, "A");
    let _b = backend(BACKEND_B, port, "B");
    let dns = dnsmasq("127.0.0.2 redis.test.local\n", &[]);
    let legate = Legate::start(&dns, &format!("dns:redis.test.local:{port}"));
    legate.wait_backend("A", FIRST);
    for _ in 0..5 {
        assert_eq!(who(legate.listen).as_deref(), Some("A"));
    }

    dns.set_hosts("127.0.0.3 redis.test.local\n");
    // TTL 1s (min_ttl 1s) + 1s, plus slack for the first health check and a loaded machine.
    // Kept below max_ttl (5 s) on purpose: the bound is what shows legate followed the
    // record's 1 s TTL rather than refreshing only at max_ttl. The refresh is timer-driven,
    // so a CPU hog delays it by scheduling latency (milliseconds), not by seconds.
    let delay = legate.wait_backend("B", Duration::from_secs(4));
    eprintln!("DNS change followed after {delay:?}");
    for _ in 0..5 {
        assert_eq!(who(legate.listen).as_deref(), Some("B"));
    }
    assert!(legate.dns_reloads("ok") >= 2.0);
}

#[test]
fn dead_dns_server_keeps_the_last_answer_and_counts_errors() {
    let port = backend_port();
    let _a = backend(BACKEND_A, port, "A");
    let mut dns = dnsmasq("127.0.0.2 redis.test.local\n", &[]);
    let legate = Legate::start(&dns, &format!("dns:redis.test.local:{port}"));
    legate.wait_backend("A", FIRST);
    let errors_before = legate.dns_reloads("error");

    dns.proc.child.kill().unwrap();
    dns.proc.child.wait().unwrap();
    // With nothing listening the queries go unanswered: a lookup ends at its 5s bound.
    // 10 s: the next refresh (1 s TTL) plus that 5 s bound, plus a loaded machine's slack.
    let errors = wait_for(Duration::from_secs(10), "a DNS error counted", || {
        let errors = legate.dns_reloads("error");
        (errors > errors_before).then_some(errors)
    });
    assert!(errors > errors_before);
    // Several refresh intervals (1s) later the answer is still in use.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(who(legate.listen).as_deref(), Some("A"));
        thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = legate.ready();
    assert_eq!(status, 200, "/ready: {body}");
    let (_, endpoints) = http(legate.admin, "GET", "/endpoints").unwrap();
    assert!(
        endpoints.contains("DNS lookup failed"),
        "/endpoints should show the lookup error: {endpoints}"
    );
    // Retries go on (each lookup bounded at 5s) and each is counted. 12 s: the back-off
    // before the next lookup (at most max_ttl, 5 s), its 5 s bound, and 2 s of slack.
    wait_for(Duration::from_secs(12), "another DNS error counted", || {
        (legate.dns_reloads("error") > errors).then_some(())
    });
}

#[test]
fn stopped_dns_server_times_out_keeps_the_answer_and_recovers() {
    let port = backend_port();
    let _a = backend(BACKEND_A, port, "A");
    let _b = backend(BACKEND_B, port, "B");
    let dns = dnsmasq("127.0.0.2 redis.test.local\n", &[]);
    let legate = Legate::start(&dns, &format!("dns:redis.test.local:{port}"));
    legate.wait_backend("A", FIRST);
    let errors_before = legate.dns_reloads("error");

    dns.proc.signal(libc::SIGSTOP);
    // A lookup is bounded: 2s per query, 2 sends, 5s in all. The next refresh is due within
    // the 1 s TTL, so the first timeout is counted within about 6 s; 12 s is twice that.
    wait_for(Duration::from_secs(12), "a DNS timeout counted", || {
        (legate.dns_reloads("error") > errors_before).then_some(())
    });
    let log = legate.log();
    assert!(log.contains("timed out"), "timeout not logged: {log}");
    assert_eq!(who(legate.listen).as_deref(), Some("A"));
    assert_eq!(legate.ready().0, 200);

    // Rewrite while stopped (and SIGHUP); dnsmasq rereads once it runs again.
    dns.set_hosts("127.0.0.3 redis.test.local\n");
    dns.proc.signal(libc::SIGCONT);
    // The pending lookup may still be timing out (≤5s), then the back-off (≤ max_ttl 5s);
    // 15 s adds 5 s of slack for a loaded machine.
    legate.wait_backend("B", Duration::from_secs(15));
}

#[test]
fn nxdomain_at_start_is_not_fatal_and_ready_follows_the_name() {
    let port = backend_port();
    let _a = backend(BACKEND_A, port, "A");
    let dns = dnsmasq("127.0.0.9 other.test.local\n", &[]);
    let target = format!("dns:redis.test.local:{port}");
    let legate = Legate::start(&dns, &target);

    // The first lookup answers NXDOMAIN within milliseconds; 5 s is a loaded machine's slack.
    let (status, body) = wait_for(Duration::from_secs(5), "/ready naming the target", || {
        let (status, body) = legate.ready();
        body.contains(&target).then_some((status, body))
    });
    assert_eq!(status, 503, "/ready: {body}");
    assert!(body.contains("NXDOMAIN"), "/ready should say why: {body}");
    assert!(
        TcpStream::connect(legate.listen).is_ok(),
        "the listener should be bound"
    );
    assert!(legate.dns_reloads("error") >= 1.0);

    dns.set_hosts("127.0.0.9 other.test.local\n127.0.0.2 redis.test.local\n");
    legate.wait_ready(FIRST);
    assert_eq!(who(legate.listen).as_deref(), Some("A"));
}

#[test]
fn srv_same_priority_targets_share_traffic() {
    let port = backend_port();
    let _a = backend(BACKEND_A, port, "A");
    let _b = backend(BACKEND_B, port, "B");
    let dns = srv_dnsmasq(port, [("host1.test.local", 0), ("host2.test.local", 0)]);
    let legate = Legate::start(&dns, "srv:_redis._tcp.test.local");
    legate.wait_ready(FIRST);
    // Both endpoints must be healthy before the split is fair.
    legate.wait_healthy(2, HEALTHY);
    let (mut a, mut b) = (0, 0);
    for _ in 0..20 {
        match who(legate.listen).as_deref() {
            Some("A") => a += 1,
            Some("B") => b += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(a >= 5 && b >= 5, "traffic split A={a} B={b}");
}

#[test]
fn srv_lower_priority_number_wins_and_the_other_is_failover() {
    let port = backend_port();
    let a = backend(BACKEND_A, port, "A");
    let _b = backend(BACKEND_B, port, "B");
    let dns = srv_dnsmasq(port, [("host2.test.local", 20), ("host1.test.local", 10)]);
    let legate = Legate::start(&dns, "srv:_redis._tcp.test.local");
    legate.wait_backend("A", FIRST);
    // Give the backup time to turn healthy too: it still must get nothing.
    legate.wait_healthy(2, HEALTHY);
    for _ in 0..20 {
        assert_eq!(who(legate.listen).as_deref(), Some("A"));
    }

    drop(a);
    legate.wait_backend("B", FIRST);
}
