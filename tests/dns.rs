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
//! Self-contained on purpose (no `common`): it needs only std and libc.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const BACKEND_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const BACKEND_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A port free for both UDP and TCP on 127.0.0.1 (dnsmasq listens on both).
fn free_dns_port() -> u16 {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP");
}

/// Polls `probe` until it returns `Some`, or panics after `timeout` naming `what`.
fn wait_for<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        thread::sleep(Duration::from_millis(25));
    }
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill: {}", io::Error::last_os_error());
}

/// Kills (SIGCONT first, in case it was stopped) and reaps a child.
fn reap(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        // SAFETY: kill(2) has no memory-safety preconditions; an error means it is gone.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGCONT) };
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    static COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "legate-dns-{tag}-{}-{}",
        std::process::id(),
        COUNT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// One HTTP/1.1 GET on a fresh connection; returns status and body.
fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, text.clone()))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

// ---------------------------------------------------------------------------------------------
// Backends: accept, write "NAME\n", close
// ---------------------------------------------------------------------------------------------

struct Backend {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Backend {
    fn start(ip: Ipv4Addr, port: u16, name: &'static str) -> Backend {
        let listener = TcpListener::bind((ip, port))
            .unwrap_or_else(|e| panic!("bind backend {ip}:{port}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.write_all(format!("{name}\n").as_bytes());
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Backend {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A port free on both backend addresses.
fn backend_port() -> u16 {
    for _ in 0..50 {
        let first = TcpListener::bind((BACKEND_A, 0)).expect("bind 127.0.0.2");
        let port = first.local_addr().unwrap().port();
        if TcpListener::bind((BACKEND_B, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// Connects through legate and returns the backend's name, or `None` if the connection
/// was refused or closed without a name (no endpoint eligible).
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
// dnsmasq
// ---------------------------------------------------------------------------------------------

struct Dnsmasq {
    child: Child,
    port: u16,
    hosts: PathBuf,
    dir: PathBuf,
}

impl Dnsmasq {
    /// Starts dnsmasq answering `*.test.local` from `hosts` (and `srv` records), TTL 1s;
    /// any other name under test.local is NXDOMAIN.
    fn start(hosts: &str, srv: &[String]) -> Dnsmasq {
        let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .unwrap_or_else(|| {
                panic!("dnsmasq is not installed: run `apt-get install -y dnsmasq`")
            });
        let dir = temp_dir("dnsmasq");
        let hosts_path = dir.join("hosts");
        std::fs::write(&hosts_path, hosts).unwrap();
        let port = free_dns_port();
        let mut command = Command::new(binary);
        command
            .arg("-k")
            .arg(format!("--port={port}"))
            .arg("--listen-address=127.0.0.1")
            .arg("--bind-interfaces")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg(format!("--addn-hosts={}", hosts_path.display()))
            .arg("--local-ttl=1")
            // Names under test.local that aren't in the file: NXDOMAIN, not REFUSED.
            .arg("--local=/test.local/")
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg("--log-facility=-")
            // As root it would drop to `nobody`, who cannot reread the file on SIGHUP.
            .arg("--user=root");
        for record in srv {
            command.arg(format!("--srv-host={record}"));
        }
        let log = std::fs::File::create(dir.join("dnsmasq.log")).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        let mut dnsmasq = Dnsmasq {
            child,
            port,
            hosts: hosts_path,
            dir,
        };
        let started = Instant::now();
        while !dnsmasq.answers() {
            if let Ok(Some(status)) = dnsmasq.child.try_wait() {
                panic!("dnsmasq exited with {status}: {}", dnsmasq.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "dnsmasq did not answer within 10s: {}",
                dnsmasq.log()
            );
            thread::sleep(Duration::from_millis(25));
        }
        dnsmasq
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }

    /// True when an A query for `probe.test.local` gets any answer.
    fn answers(&self) -> bool {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["probe", "test", "local"] {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        if socket.send_to(&query, ("127.0.0.1", self.port)).is_err() {
            return false;
        }
        let mut answer = [0u8; 512];
        matches!(socket.recv(&mut answer), Ok(n) if n >= 12 && answer[..2] == [0x12, 0x34])
    }

    /// Replaces the hosts file atomically and makes dnsmasq reread it.
    fn set_hosts(&self, hosts: &str) {
        let temp = self.dir.join("hosts.new");
        std::fs::write(&temp, hosts).unwrap();
        std::fs::rename(&temp, &self.hosts).unwrap();
        signal(&self.child, libc::SIGHUP);
    }

    fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        reap(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// legate
// ---------------------------------------------------------------------------------------------

struct Legate {
    child: Child,
    admin: SocketAddr,
    listen: SocketAddr,
    dir: PathBuf,
}

impl Legate {
    /// Starts `legate run -c FILE` with one listener on `upstream`, resolving through `dns`.
    fn start(dns: &Dnsmasq, upstream: &str) -> Legate {
        let dir = temp_dir("legate");
        let admin = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let listen = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()));
        let config = format!(
            r#"[admin]
listen = "{admin}"

[dns]
servers = ["{server}"]
min_ttl = "1s"
max_ttl = "5s"

[[listeners]]
name = "redis"
listen = "{listen}"
upstream = ["{upstream}"]
connect_timeout = "500ms"
health = {{ check = "tcp", interval = "200ms", timeout = "200ms" }}
"#,
            server = dns.server()
        );
        let config_path = dir.join("legate.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.join("legate.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_legate"))
            .args(["run", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "legate=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn legate");
        let mut legate = Legate {
            child,
            admin,
            listen,
            dir,
        };
        let started = Instant::now();
        while !matches!(http_get(admin, "/live"), Ok((200, _))) {
            if let Ok(Some(status)) = legate.child.try_wait() {
                panic!("legate exited with {status}: {}", legate.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "legate /live not 200 within 15s: {}",
                legate.log()
            );
            thread::sleep(Duration::from_millis(25));
        }
        legate
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("legate.log")).unwrap_or_default()
    }

    fn ready(&self) -> (u16, String) {
        http_get(self.admin, "/ready").unwrap_or((0, String::new()))
    }

    /// `legate_reloads_total{source="dns",result=RESULT}`, 0 when absent.
    fn dns_reloads(&self, result: &str) -> f64 {
        // A busy machine may delay one scrape; each failed try is printed.
        let body = wait_for(Duration::from_secs(10), "GET /metrics", || {
            match http_get(self.admin, "/metrics") {
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
        reap(&mut self.child);
        if thread::panicking() {
            eprintln!("---- legate log ----\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn a_record_change_moves_new_connections() {
    let port = backend_port();
    let _a = Backend::start(BACKEND_A, port, "A");
    let _b = Backend::start(BACKEND_B, port, "B");
    let dns = Dnsmasq::start("127.0.0.2 redis.test.local\n", &[]);
    let legate = Legate::start(&dns, &format!("dns:redis.test.local:{port}"));
    legate.wait_backend("A", Duration::from_secs(10));
    for _ in 0..5 {
        assert_eq!(who(legate.listen).as_deref(), Some("A"));
    }

    dns.set_hosts("127.0.0.3 redis.test.local\n");
    // TTL 1s (min_ttl 1s) + 1s, plus slack for the first health check and a loaded machine.
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
    let _a = Backend::start(BACKEND_A, port, "A");
    let mut dns = Dnsmasq::start("127.0.0.2 redis.test.local\n", &[]);
    let legate = Legate::start(&dns, &format!("dns:redis.test.local:{port}"));
    legate.wait_backend("A", Duration::from_secs(10));
    let errors_before = legate.dns_reloads("error");

    dns.child.kill().unwrap();
    dns.child.wait().unwrap();
    // With nothing listening the queries go unanswered: a lookup ends at its 5s bound.
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
    let (_, endpoints) = http_get(legate.admin, "/endpoints").unwrap();
    assert!(
        endpoints.contains("DNS lookup failed"),
        "/endpoints should show the lookup error: {endpoints}"
    );
    // Retries go on (each lookup bounded at 5s) and each is counted.
    wait_for(Duration::from_secs(12), "another DNS error counted", || {
        (legate.dns_reloads("error") > errors).then_some(())
    });
}

#[test]
fn stopped_dns_server_times_out_keeps_the_answer_and_recovers() {
    let port = backend_port();
    let _a = Backend::start(BACKEND_A, port, "A");
    let _b = Backend::start(BACKEND_B, port, "B");
    let dns = Dnsmasq::start("127.0.0.2 redis.test.local\n", &[]);
    let legate = Legate::start(&dns, &format!("dns:redis.test.local:{port}"));
    legate.wait_backend("A", Duration::from_secs(10));
    let errors_before = legate.dns_reloads("error");

    signal(&dns.child, libc::SIGSTOP);
    // A lookup is bounded: 2s per query, 2 sends, 5s in all.
    wait_for(Duration::from_secs(12), "a DNS timeout counted", || {
        (legate.dns_reloads("error") > errors_before).then_some(())
    });
    let log = legate.log();
    assert!(log.contains("timed out"), "timeout not logged: {log}");
    assert_eq!(who(legate.listen).as_deref(), Some("A"));
    assert_eq!(legate.ready().0, 200);

    // Rewrite while stopped; dnsmasq rereads on SIGHUP once it runs again.
    let temp = dns.dir.join("hosts.new");
    std::fs::write(&temp, "127.0.0.3 redis.test.local\n").unwrap();
    std::fs::rename(&temp, &dns.hosts).unwrap();
    signal(&dns.child, libc::SIGHUP);
    signal(&dns.child, libc::SIGCONT);
    // The pending lookup may still be timing out (≤5s), then the back-off (≤ max_ttl 5s).
    legate.wait_backend("B", Duration::from_secs(15));
}

#[test]
fn nxdomain_at_start_is_not_fatal_and_ready_follows_the_name() {
    let port = backend_port();
    let _a = Backend::start(BACKEND_A, port, "A");
    let dns = Dnsmasq::start("127.0.0.9 other.test.local\n", &[]);
    let target = format!("dns:redis.test.local:{port}");
    let legate = Legate::start(&dns, &target);

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
    wait_for(Duration::from_secs(10), "/ready 200", || {
        (legate.ready().0 == 200).then_some(())
    });
    assert_eq!(who(legate.listen).as_deref(), Some("A"));
}

#[test]
fn srv_same_priority_targets_share_traffic() {
    let port = backend_port();
    let _a = Backend::start(BACKEND_A, port, "A");
    let _b = Backend::start(BACKEND_B, port, "B");
    let dns = Dnsmasq::start(
        "127.0.0.2 host1.test.local\n127.0.0.3 host2.test.local\n",
        &[
            format!("_redis._tcp.test.local,host1.test.local,{port},0,10"),
            format!("_redis._tcp.test.local,host2.test.local,{port},0,10"),
        ],
    );
    let legate = Legate::start(&dns, "srv:_redis._tcp.test.local");
    wait_for(Duration::from_secs(10), "/ready 200", || {
        (legate.ready().0 == 200).then_some(())
    });
    // Both endpoints must be healthy before the split is fair.
    wait_for(Duration::from_secs(5), "both SRV targets healthy", || {
        let (_, body) = http_get(legate.admin, "/endpoints").ok()?;
        (body.matches("\"healthy\"").count() >= 2).then_some(())
    });
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
    let a = Backend::start(BACKEND_A, port, "A");
    let _b = Backend::start(BACKEND_B, port, "B");
    let dns = Dnsmasq::start(
        "127.0.0.2 host1.test.local\n127.0.0.3 host2.test.local\n",
        &[
            format!("_redis._tcp.test.local,host2.test.local,{port},20,10"),
            format!("_redis._tcp.test.local,host1.test.local,{port},10,10"),
        ],
    );
    let legate = Legate::start(&dns, "srv:_redis._tcp.test.local");
    legate.wait_backend("A", Duration::from_secs(10));
    // Give the backup time to turn healthy too: it still must get nothing.
    wait_for(Duration::from_secs(5), "both SRV targets healthy", || {
        let (_, body) = http_get(legate.admin, "/endpoints").ok()?;
        (body.matches("\"healthy\"").count() >= 2).then_some(())
    });
    for _ in 0..20 {
        assert_eq!(who(legate.listen).as_deref(), Some("A"));
    }

    drop(a);
    legate.wait_backend("B", Duration::from_secs(10));
}
