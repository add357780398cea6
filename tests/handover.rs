//! Handover: a new `legate run` takes the listening sockets over from the running one
//! (`[runtime] handoff_socket`, SCM_RIGHTS), so an upgrade drops no connection.
//! - twenty handovers in a row under ~1,000 new connections a second and twenty long hashed
//!   streams: nothing refused, reset or cut short, `/ready` never 503 nor refused, each
//!   newcomer counts `taken` once and gets the new connections, every old one drains and
//!   exits 0; the listening sockets are the very same kernel sockets throughout;
//! - a connection waiting in the accept queue is served: while the old one is frozen
//!   (SIGSTOP) during the handover, and while the new one is frozen right after the commit
//!   (the old one must not accept it, and must not take the queue with it when it exits);
//! - failures before the commit leave the old one serving: a broken config, a new listener
//!   whose address is taken, a newcomer SIGKILLed between receiving the sockets and
//!   committing (`aborted`), garbage and an oversized header on the handoff socket (`error`);
//! - a stale path-based handoff socket file is no obstacle; flag and env win over the file;
//! - two newcomers racing: one wins, the other says "another legate" (or takes over from
//!   the winner), and no address ever refuses;
//! - supervise mode refuses an explicit `--handoff-socket` and never hands over by default;
//! - OpenKruise SidecarSet hot upgrade (`SIDECARSET_VERSION`, `SIDECARSET_VERSION_ALT`) and
//!   `legate wait --handover`.
//!
//! Which process holds a socket is read from the kernel: the inode of a connection's
//! server side (sock_diag, an exact lookup that stays fast with tens of thousands of
//! TIME_WAIT sockets around) looked up among `/proc/PID/fd` of the candidate processes.

mod common;

use common::*;
use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const T: Duration = Duration::from_secs(30);
const HANDOFFS: &str = "legate_handoffs_total";
const CONNECTIONS: &str = "legate_connections_total";
const PONG: &[u8] = b"+PONG\r\n";

// ---------------------------------------------------------------------------------------------
// One test at a time for the load test; the others may share the machine with each other.
// ---------------------------------------------------------------------------------------------

static MACHINE: RwLock<()> = RwLock::new(());

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

fn shared() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// A legate process (with its own environment; killed on drop, its log printed on a panic)
// ---------------------------------------------------------------------------------------------

/// `legate` with no `LEGATE_*` nor `SIDECARSET_*` variables from the test's environment.
fn legate_cmd(env: &[(&str, &str)]) -> Command {
    let mut cmd = legate_command();
    cmd.env_remove("SIDECARSET_VERSION")
        .env_remove("SIDECARSET_VERSION_ALT");
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd
}

struct Node {
    name: String,
    child: Child,
    log_path: PathBuf,
    _dir: TempDir,
}

impl Node {
    fn spawn(name: &str, args: &[&str], env: &[(&str, &str)]) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("legate.log");
        let log = std::fs::File::create(&log_path).expect("create log");
        let child = legate_cmd(env)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn legate {args:?}: {e}"));
        Node {
            name: name.to_owned(),
            child,
            log_path,
            _dir: dir,
        }
    }

    /// `legate run -c CONFIG`.
    fn run(name: &str, config: &str) -> Node {
        Node::spawn(name, &["run", "-c", config], &[])
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            panic!(
                "{} (pid {}) exited early with {status}; log:\n{}",
                self.name,
                self.pid(),
                self.log()
            );
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        let rc = unsafe { libc::kill(self.pid() as libc::pid_t, signal) };
        assert_eq!(
            rc,
            0,
            "kill({}, {signal}): {}",
            self.pid(),
            io::Error::last_os_error()
        );
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} (pid {}) did not exit within {timeout:?}; log:\n{}",
                self.name,
                self.pid(),
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit and asserts it exited 0.
    fn assert_exits_zero(&mut self, timeout: Duration) {
        let status = self.wait_exit(timeout);
        assert_eq!(
            status.code(),
            Some(0),
            "{} (pid {}) exited with {status}; log:\n{}",
            self.name,
            self.pid(),
            self.log()
        );
    }

    /// Waits until the log contains `needle`; panics if the process exits first.
    fn wait_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Some(status) = self.exited() {
                // It may have written the line just before exiting.
                if self.log().contains(needle) {
                    return;
                }
                panic!(
                    "{} (pid {}) exited with {status} without logging {needle:?}; log:\n{}",
                    self.name,
                    self.pid(),
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} (pid {}) did not log {needle:?} within {timeout:?}; log:\n{}",
                self.name,
                self.pid(),
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2); a stopped process must be continued to die promptly.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGCONT);
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "----- {} (pid {}) log, last {} lines -----\n{}\n----- end of {} log -----",
                self.name,
                self.child.id(),
                tail.len(),
                tail.join("\n"),
                self.name
            );
        }
    }
}

/// Waits until every thread of `pid` is stopped (SIGSTOP takes effect asynchronously: on
/// a loaded machine a thread can keep running for a moment after kill(2) returned).
fn wait_stopped(pid: u32) {
    eventually(
        Duration::from_secs(10),
        &format!("pid {pid} to stop"),
        || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks.filter_map(|t| t.ok()).all(|task| {
                        std::fs::read_to_string(task.path().join("stat"))
                            .ok()
                            .and_then(|stat| {
                                let state = stat
                                    .rsplit_once(')')?
                                    .1
                                    .split_whitespace()
                                    .next()?
                                    .to_owned();
                                Some(state == "T" || state == "t")
                            })
                            .unwrap_or(true)
                    })
                })
                .unwrap_or(false)
        },
    );
}

/// Waits until `/ready` on `admin` answers 200 while `node` is running.
fn wait_ready(node: &mut Node, admin: SocketAddr, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        node.assert_running();
        let last = match http(admin, "GET", "/ready") {
            Ok((200, _)) => return,
            answer => format!("{answer:?}"),
        };
        assert!(
            Instant::now() < deadline,
            "{}: /ready on {admin} not 200 within {timeout:?} (last: {last}); log:\n{}",
            node.name,
            node.log()
        );
        thread::sleep(Duration::from_millis(25));
    }
}

/// The common set-up: a redis-server and a config with one `redis` listener in front of
/// it, on free ports, in a temporary directory.
struct OneRedis {
    redis: RedisServer,
    dir: tempfile::TempDir,
    admin: SocketAddr,
    port: u16,
    addr: SocketAddr,
    config: String,
}

impl OneRedis {
    fn new() -> OneRedis {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let admin = local(free_port());
        let port = free_port();
        let config = write_config(
            dir.path(),
            "legate.toml",
            &format!(
                "{}{}",
                admin_toml(admin, ""),
                listener_toml("redis", port, redis.addr(), "")
            ),
        );
        OneRedis {
            redis,
            dir,
            admin,
            port,
            addr: local(port),
            config,
        }
    }
}

fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path.display().to_string()
}

/// `[[listeners]]` with a plain TCP check.
fn listener_toml(name: &str, port: u16, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "\n[[listeners]]\nname = {name:?}\nlisten = \"127.0.0.1:{port}\"\nupstream = [\"{upstream}\"]\nhealth = {{ check = \"tcp\", interval = \"1s\", timeout = \"1s\" }}\n{extra}"
    )
}

fn admin_toml(admin: SocketAddr, runtime: &str) -> String {
    format!("[admin]\nlisten = \"{admin}\"\n\n[runtime]\ndrain_timeout = \"30s\"\n{runtime}\n")
}

fn default_handoff_name(admin: SocketAddr) -> String {
    format!("@legate-handoff:{admin}")
}

fn handoffs(metrics: &Metrics, result: &str) -> f64 {
    metrics.value(HANDOFFS, &[("result", result)])
}

fn no_panics(node: &Node) {
    let log = node.log();
    assert!(
        !log.contains("panicked"),
        "{} panicked; log:\n{log}",
        node.name
    );
}

// ---------------------------------------------------------------------------------------------
// Who holds which socket (sock_diag + /proc/PID/fd)
// ---------------------------------------------------------------------------------------------

/// The kernel's exact lookup of a TCP socket (NETLINK_SOCK_DIAG, no dump): the socket whose
/// local address is `local` and remote address is `remote` (`0.0.0.0:0` finds the listener
/// on `local`). Returns its state (1 established, 10 listening) and inode (0 while a
/// connection waits in the accept queue: no process holds it yet).
fn tcp_diag(local: SocketAddr, remote: SocketAddr) -> Option<(u8, u64)> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let (SocketAddr::V4(local), SocketAddr::V4(remote)) = (local, remote) else {
        panic!("tcp_diag: IPv4 only");
    };
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    let mut req: Vec<u8> = Vec::with_capacity(72);
    req.extend_from_slice(&72u32.to_ne_bytes()); // nlmsg_len
    req.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes()); // nlmsg_type
    req.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes()); // nlmsg_flags
    req.extend_from_slice(&1u32.to_ne_bytes()); // nlmsg_seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid
    req.push(libc::AF_INET as u8); // sdiag_family
    req.push(libc::IPPROTO_TCP as u8); // sdiag_protocol
    req.extend_from_slice(&[0, 0]); // idiag_ext, pad
    req.extend_from_slice(&u32::MAX.to_ne_bytes()); // idiag_states
    req.extend_from_slice(&local.port().to_be_bytes()); // idiag_sport
    req.extend_from_slice(&remote.port().to_be_bytes()); // idiag_dport
    req.extend_from_slice(&local.ip().octets()); // idiag_src
    req.extend_from_slice(&[0u8; 12]);
    req.extend_from_slice(&remote.ip().octets()); // idiag_dst
    req.extend_from_slice(&[0u8; 12]);
    req.extend_from_slice(&0u32.to_ne_bytes()); // idiag_if
    req.extend_from_slice(&[0xff; 8]); // idiag_cookie: INET_DIAG_NOCOOKIE
    assert_eq!(req.len(), 72);
    // SAFETY: plain socket calls on a descriptor we own; buffers outlive the calls.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        assert!(
            fd >= 0,
            "socket(NETLINK_SOCK_DIAG): {}",
            io::Error::last_os_error()
        );
        let fd = OwnedFd::from_raw_fd(fd);
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        let sent = libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr() as *const libc::c_void,
            req.len(),
            0,
            &kernel as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        );
        assert_eq!(
            sent,
            72,
            "sendto(sock_diag): {}",
            io::Error::last_os_error()
        );
        let mut buf = [0u8; 8192];
        let n = libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
        );
        assert!(n >= 16, "recv(sock_diag): {}", io::Error::last_os_error());
        let kind = u16::from_ne_bytes([buf[4], buf[5]]);
        if kind == NLMSG_ERROR {
            return None; // ENOENT: no such socket
        }
        assert_eq!(kind, SOCK_DIAG_BY_FAMILY, "sock_diag answered type {kind}");
        assert!(n >= 88, "short sock_diag answer ({n} bytes)");
        let state = buf[17];
        let inode = u32::from_ne_bytes([buf[84], buf[85], buf[86], buf[87]]);
        Some((state, inode as u64))
    }
}

const ANY: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    0,
));

/// The inode of the socket listening on 127.0.0.1:`port`.
fn listening_inode(port: u16) -> Option<u64> {
    match tcp_diag(local(port), ANY) {
        Some((10, inode)) => Some(inode),
        _ => None,
    }
}

/// The socket inodes `pid` holds.
fn socket_inodes(pid: u32) -> HashSet<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|entry| entry.ok())
                .filter_map(|entry| std::fs::read_link(entry.path()).ok())
                .filter_map(|target| {
                    target
                        .to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn holds(pid: u32, inode: u64) -> bool {
    socket_inodes(pid).contains(&inode)
}

/// Which of `pids` holds the server side of `client`'s connection (it accepted it); waits up
/// to `timeout` for someone to accept it.
fn served_by(client: &TcpStream, pids: &[u32], timeout: Duration) -> Option<u32> {
    // A connection the server already closed has no peer any more: nobody holds it.
    let (Ok(mine), Ok(server)) = (client.local_addr(), client.peer_addr()) else {
        return None;
    };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some((1, inode)) = tcp_diag(server, mine) {
            if inode != 0 {
                if let Some(pid) = pids.iter().copied().find(|&pid| holds(pid, inode)) {
                    return Some(pid);
                }
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `client`'s connection still waits in the accept queue (no process holds it).
fn still_queued(client: &TcpStream) -> bool {
    let (mine, server) = (client.local_addr().unwrap(), client.peer_addr().unwrap());
    matches!(tcp_diag(server, mine), Some((1, 0)))
}

/// `GET /metrics` on `admin`, and which of `pids` accepted that request's connection.
fn scrape_owned(admin: SocketAddr, pids: &[u32]) -> (Option<u32>, Metrics) {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to the admin port {admin}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let owner = served_by(&stream, pids, Duration::from_secs(10));
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: legate\r\nConnection: close\r\n\r\n")
        .expect("write the scrape");
    let (raw, error) = read_to_end(&mut stream);
    let (status, body) = parse_http_response(&raw)
        .unwrap_or_else(|| panic!("no HTTP answer to /metrics on {admin}: {error:?}"));
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    (owner, Metrics::parse(&body))
}

/// Listening Unix sockets: inode → path (`@name` for an abstract one).
fn unix_listeners() -> BTreeMap<u64, String> {
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Num RefCount Protocol Flags Type St Inode [Path]; Flags 00010000 = listening.
            (fields.len() >= 8 && fields[3] == "00010000")
                .then(|| Some((fields[6].parse().ok()?, fields[7].to_owned())))
                .flatten()
        })
        .collect()
}

/// Listening TCP sockets (any port) from /proc/net/tcp{,6}: their inodes.
fn tcp_listening_inodes() -> HashSet<u64> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .flat_map(|table| {
            std::fs::read_to_string(table)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    (fields.len() > 9 && fields[3] == "0A")
                        .then(|| fields[9].parse().ok())
                        .flatten()
                })
                .collect::<Vec<u64>>()
        })
        .collect()
}

/// The listening sockets (TCP or Unix) `pid` holds, described.
fn listening_sockets_of(pid: u32) -> Vec<String> {
    let mine = socket_inodes(pid);
    let tcp = tcp_listening_inodes();
    let unix = unix_listeners();
    let mut found: Vec<String> = mine
        .iter()
        .filter(|inode| tcp.contains(inode))
        .map(|inode| format!("tcp listener (inode {inode})"))
        .collect();
    found.extend(
        mine.iter()
            .filter_map(|inode| unix.get(inode).map(|path| format!("unix listener {path}"))),
    );
    found
}

fn unix_listener_at(path: &str) -> Option<u64> {
    unix_listeners()
        .into_iter()
        .find_map(|(inode, p)| (p == path).then_some(inode))
}

// ---------------------------------------------------------------------------------------------
// Clients: Redis PING, hashed streams, a /ready poller
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fail {
    Refused,
    ConnectError,
    Reset,
    Timeout,
    ShortRead,
    WrongAnswer,
    Other,
}

fn classify(error: &io::Error) -> Fail {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => Fail::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Fail::Reset,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Fail::Timeout,
        _ => Fail::Other,
    }
}

/// Reads one `+PONG\r\n` (exactly 7 bytes) from `stream`.
fn read_pong(stream: &mut TcpStream) -> Result<(), (Fail, String)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < PONG.len() {
        match stream.read(&mut buf) {
            Ok(0) => {
                return Err((
                    Fail::ShortRead,
                    format!("EOF after {:?}", String::from_utf8_lossy(&got)),
                ))
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err((
                    classify(&e),
                    format!("read after {:?}: {e}", String::from_utf8_lossy(&got)),
                ))
            }
        }
    }
    if got == PONG {
        Ok(())
    } else {
        Err((
            Fail::WrongAnswer,
            format!("answered {:?}", String::from_utf8_lossy(&got)),
        ))
    }
}

/// connect → PING → +PONG → close.
fn ping_once(addr: SocketAddr) -> Result<(), (Fail, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| {
        let kind = match classify(&e) {
            Fail::Refused | Fail::Reset => classify(&e),
            _ => Fail::ConnectError,
        };
        (kind, format!("connect: {e}"))
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"PING\r\n")
        .map_err(|e| (classify(&e), format!("write: {e}")))?;
    read_pong(&mut stream)
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failures: Mutex<BTreeMap<Fail, usize>>,
    samples: Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, at: Duration, kind: Fail, what: String) {
        *self.failures.lock().unwrap().entry(kind).or_default() += 1;
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 40 {
            samples.push(format!("{at:.3?} {kind:?}: {what}"));
        }
    }

    fn failed(&self) -> usize {
        self.failures.lock().unwrap().values().sum()
    }

    fn report(&self) -> String {
        format!(
            "{} ok, failures {:?}, first failures: {:#?}",
            self.ok.load(Ordering::SeqCst),
            self.failures.lock().unwrap(),
            self.samples.lock().unwrap()
        )
    }
}

/// `threads` clients doing connect → PING → +PONG → close in a loop until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    tally: Arc<Tally>,
    started: Instant,
}

impl Load {
    fn start(addr: SocketAddr, threads: usize, pause: Duration, t0: Instant) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let threads = (0..threads)
            .map(|_| {
                let (stop, tally) = (stop.clone(), tally.clone());
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match ping_once(addr) {
                            Ok(()) => {
                                tally.ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err((kind, what)) => tally.fail(t0.elapsed(), kind, what),
                        }
                        if !pause.is_zero() {
                            thread::sleep(pause);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            threads,
            tally,
            started: Instant::now(),
        }
    }

    fn ok(&self) -> usize {
        self.tally.ok.load(Ordering::Relaxed)
    }

    /// Stops the clients; the tally and how long the load ran.
    fn finish(self) -> (Arc<Tally>, Duration) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().expect("a load thread panicked");
        }
        (self.tally, self.started.elapsed())
    }
}

/// The legate processes of a test, by pid, so a bad answer can name who gave it.
type Known = Arc<Mutex<Vec<(u32, String)>>>;

fn who(known: &Known, pid: Option<u32>) -> String {
    match pid {
        None => "an unknown process (the connection was gone)".into(),
        Some(pid) => known
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, name)| format!("{name} (pid {pid})"))
            .unwrap_or_else(|| format!("pid {pid}")),
    }
}

/// Reads one HTTP/1.1 response with a Content-Length, leaving the connection open.
fn read_response(stream: &mut TcpStream) -> io::Result<(u16, String)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_string();
            let length = head
                .lines()
                .find_map(|line| {
                    let (key, value) = line.split_once(':')?;
                    key.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if raw.len() >= end + 4 + length {
                let status = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, head.clone()))?;
                let body = String::from_utf8_lossy(&raw[end + 4..end + 4 + length]).to_string();
                return Ok((status, body));
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("closed after {:?}", String::from_utf8_lossy(&raw)),
                ))
            }
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `GET /ready` over a fresh connection, the request sent at once as a probe does; then,
/// the connection kept alive for that, which known process answered it.
fn ready_probe(admin: SocketAddr, known: &Known) -> (Option<u32>, io::Result<(u16, String)>) {
    let mut stream = match TcpStream::connect_timeout(&admin, Duration::from_secs(2)) {
        Ok(stream) => stream,
        Err(e) => return (None, Err(e)),
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if let Err(e) = stream.write_all(b"GET /ready HTTP/1.1\r\nHost: legate\r\n\r\n") {
        return (None, Err(e));
    }
    let answer = read_response(&mut stream);
    let pids: Vec<u32> = known.lock().unwrap().iter().map(|(pid, _)| *pid).collect();
    let owner = served_by(&stream, &pids, Duration::from_millis(200));
    (owner, answer)
}

/// Polls `/ready` every 50 ms over a fresh connection, as kubelet does, recording every
/// answer other than 200 and every failed request, with the process that accepted it.
struct ReadyPoller {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
    polls: Arc<AtomicUsize>,
    bad: Arc<Mutex<Vec<String>>>,
}

impl ReadyPoller {
    fn start(admin: SocketAddr, t0: Instant, known: Known) -> ReadyPoller {
        let stop = Arc::new(AtomicBool::new(false));
        let polls = Arc::new(AtomicUsize::new(0));
        let bad = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, polls, bad) = (stop.clone(), polls.clone(), bad.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let at = t0.elapsed();
                    let (owner, answer) = ready_probe(admin, &known);
                    polls.fetch_add(1, Ordering::Relaxed);
                    match answer {
                        Ok((200, _)) => {}
                        Ok((status, body)) => bad.lock().unwrap().push(format!(
                            "{at:.3?} /ready {status} from {}: {}",
                            who(&known, owner),
                            body.trim()
                        )),
                        Err(e) => bad.lock().unwrap().push(format!(
                            "{at:.3?} /ready failed ({:?}), accepted by {}: {e}",
                            e.kind(),
                            who(&known, owner)
                        )),
                    }
                    thread::sleep(Duration::from_millis(50));
                }
            })
        };
        ReadyPoller {
            stop,
            thread,
            polls,
            bad,
        }
    }

    /// Stops polling; (polls, bad answers).
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the /ready poller panicked");
        let bad = self.bad.lock().unwrap().clone();
        (self.polls.load(Ordering::SeqCst), bad)
    }
}

/// One long-lived connection through an echo backend: `size` bytes written in `chunk`s with
/// `pause` between them while a reader takes the echo; then a half-close, the rest of the
/// echo, and the SHA-256 of what came back compared with what was sent.
fn spawn_stream(
    addr: SocketAddr,
    index: usize,
    size: usize,
    chunk: usize,
    pause: Duration,
) -> JoinHandle<Result<usize, String>> {
    thread::spawn(move || {
        let body = payload(size, 0x5eed_0000 + index as u64);
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| format!("stream {index}: connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut writer = stream.try_clone().unwrap();
        writer
            .set_write_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let to_send = body.clone();
        let sender = thread::spawn(move || -> io::Result<()> {
            for piece in to_send.chunks(chunk) {
                writer.write_all(piece)?;
                thread::sleep(pause);
            }
            writer.shutdown(Shutdown::Write)
        });
        let (got, error) = read_to_end(&mut stream);
        let sent = sender.join().expect("stream sender panicked");
        if let Err(e) = sent {
            return Err(format!(
                "stream {index}: write failed after {} bytes echoed: {e}",
                got.len()
            ));
        }
        if let Some(e) = error {
            return Err(format!(
                "stream {index}: read failed after {} of {size} bytes: {e}",
                got.len()
            ));
        }
        if got.len() != size || sha256_hex(&got) != sha256_hex(&body) {
            return Err(format!(
                "stream {index}: {} bytes back for {size} sent, sha256 {} vs {}",
                got.len(),
                sha256_hex(&got),
                sha256_hex(&body)
            ));
        }
        Ok(size)
    })
}

fn echo_line(addr: SocketAddr, line: &str) -> TcpStream {
    let mut stream = connect(addr);
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(
        read_line(&mut stream).expect("echo"),
        line,
        "echo via {addr}"
    );
    stream
}

fn ping_ok(addr: SocketAddr, what: &str) {
    if let Err((kind, detail)) = ping_once(addr) {
        panic!("PING via {addr} {what}: {kind:?}: {detail}");
    }
}

/// The old one handed over to the new one: both log lines, then the old one exits 0.
fn assert_handover(old: &mut Node, new: &mut Node) {
    new.wait_log("took over", T);
    old.wait_log("handed over", T);
    old.assert_exits_zero(T);
}

// ---------------------------------------------------------------------------------------------
// 1. Twenty handovers under load
// ---------------------------------------------------------------------------------------------

#[test]
fn twenty_handovers_under_load_drop_nothing() {
    let _machine = exclusive();
    let redis = RedisServer::start();
    let echo = TcpBackend::echo();
    let dir = tempfile::tempdir().unwrap();
    let admin = local(free_port());
    let (redis_port, stream_port) = (free_port(), free_port());
    let (redis_addr, stream_addr) = (local(redis_port), local(stream_port));
    // Two configs, the same addresses, a harmless difference.
    let config = |connect_timeout: &str| {
        let extra = format!("connect_timeout = \"{connect_timeout}\"\n");
        format!(
            "{}{}{}",
            admin_toml(admin, ""),
            listener_toml("redis", redis_port, redis.addr(), &extra),
            listener_toml("stream", stream_port, echo.addr(), &extra)
        )
    };
    let configs = [
        write_config(dir.path(), "a.toml", &config("1s")),
        write_config(dir.path(), "b.toml", &config("2s")),
    ];

    let t0 = Instant::now();
    let mut current = Node::run("legate #0", &configs[0]);
    wait_ready(&mut current, admin, T);
    assert!(
        !current.log().contains("took over"),
        "the first legate had nobody to take over from:\n{}",
        current.log()
    );
    ping_ok(redis_addr, "before the handovers");
    let listening: Vec<(u16, u64)> = [redis_port, stream_port, admin.port()]
        .iter()
        .map(|&port| {
            let inode = listening_inode(port)
                .unwrap_or_else(|| panic!("nothing listens on 127.0.0.1:{port}"));
            assert!(
                holds(current.pid(), inode),
                "legate #0 does not hold the listener on {port}"
            );
            (port, inode)
        })
        .collect();

    let known: Known = Arc::new(Mutex::new(vec![(current.pid(), current.name.clone())]));
    let load = Load::start(redis_addr, 4, Duration::ZERO, t0);
    let poller = ReadyPoller::start(admin, t0, known.clone());
    let mut streams = Vec::new();
    let mut draining: Vec<(Node, Instant)> = Vec::new();
    let mut exits: Vec<String> = Vec::new();
    // Kept to the end, so a failure prints every process's log.
    let mut finished: Vec<Node> = Vec::new();
    let mut timings = Vec::new();
    let mut old_pids: Vec<u32> = Vec::new();

    for k in 1..=20usize {
        // A long stream starts before each handover, so the streams overlap several of them.
        streams.push(spawn_stream(
            stream_addr,
            k,
            3 << 20,
            64 << 10,
            Duration::from_millis(100),
        ));
        thread::sleep(Duration::from_millis(200));
        let before = load.ok();
        let started = Instant::now();
        let mut next = Node::run(&format!("legate #{k}"), &configs[k % 2]);
        known.lock().unwrap().push((next.pid(), next.name.clone()));
        next.wait_log("took over", T);
        current.wait_log("handed over", T);
        let took = started.elapsed();
        let mut pids: Vec<u32> = old_pids.clone();
        pids.extend([current.pid(), next.pid()]);
        // The admin port is the newcomer's, and it counted one handover taken.
        let (owner, metrics) = scrape_owned(admin, &pids);
        assert_eq!(
            owner,
            Some(next.pid()),
            "handover {k}: /metrics was answered by {owner:?}, not by the newcomer {} (old {})",
            next.pid(),
            current.pid()
        );
        assert_eq!(
            metrics.get(HANDOFFS, &[("result", "taken")]),
            Some(1.0),
            "handover {k}: legate_handoffs_total{{result=\"taken\"}} on the newcomer:\n{}",
            metrics.text
        );
        // New connections land on the newcomer.
        let probe = echo_line(stream_addr, &format!("after handover {k}"));
        let holder = served_by(&probe, &pids, Duration::from_secs(10));
        assert_eq!(
            holder,
            Some(next.pid()),
            "handover {k}: a new connection was accepted by {holder:?}, not by the newcomer {}",
            next.pid()
        );
        drop(probe);
        let counted = metrics.value(CONNECTIONS, &[("listener", "redis")]);
        eventually(
            Duration::from_secs(10),
            &format!("handover {k}: the newcomer's legate_connections_total to rise"),
            || {
                let (owner, again) = scrape_owned(admin, &pids);
                owner == Some(next.pid())
                    && again.value(CONNECTIONS, &[("listener", "redis")]) > counted
            },
        );
        // The same kernel sockets, now held by the newcomer.
        for &(port, inode) in &listening {
            assert_eq!(
                listening_inode(port),
                Some(inode),
                "handover {k}: the listener on {port} is not the original socket any more"
            );
            assert!(
                holds(next.pid(), inode),
                "handover {k}: the newcomer does not hold the listener on {port}"
            );
        }
        timings.push(format!(
            "#{k}: took over in {took:.2?}, {} PINGs meanwhile",
            load.ok() - before
        ));
        old_pids.push(current.pid());
        draining.push((std::mem::replace(&mut current, next), Instant::now()));
        // Every old one drains and exits 0 within 30 s of its handover.
        let mut still = Vec::new();
        for (mut old, since) in draining.drain(..) {
            match old.exited() {
                Some(status) => {
                    assert_eq!(
                        status.code(),
                        Some(0),
                        "{} exited with {status}; log:\n{}",
                        old.name,
                        old.log()
                    );
                    no_panics(&old);
                    exits.push(format!(
                        "{} exited 0 {:.2?} after",
                        old.name,
                        since.elapsed()
                    ));
                    finished.push(old);
                }
                None => {
                    assert!(
                        since.elapsed() < T,
                        "{} still running {:?} after handing over; log:\n{}",
                        old.name,
                        since.elapsed(),
                        old.log()
                    );
                    still.push((old, since));
                }
            }
        }
        draining = still;
    }

    let mut stream_errors = Vec::new();
    let mut streamed = 0;
    for stream in streams {
        match stream.join().expect("stream thread panicked") {
            Ok(bytes) => streamed += bytes,
            Err(e) => stream_errors.push(e),
        }
    }
    let (tally, ran) = load.finish();
    let (polls, bad_ready) = poller.finish();
    for (mut old, since) in draining {
        let left = T
            .saturating_sub(since.elapsed())
            .max(Duration::from_secs(1));
        old.assert_exits_zero(left);
        no_panics(&old);
        exits.push(format!(
            "{} exited 0 {:.2?} after",
            old.name,
            since.elapsed()
        ));
        finished.push(old);
    }
    current.assert_running();
    wait_ready(&mut current, admin, T);
    ping_ok(redis_addr, "after the handovers");
    no_panics(&current);

    let served = tally.ok.load(Ordering::SeqCst);
    eprintln!(
        "20 handovers in {:.1?}: {served} PING connections in {ran:.1?} = {:.0} new connections/s; \
         {} failed; {} streams, {} MiB hashed, {} failed; /ready polled {polls} times, {} bad",
        t0.elapsed(),
        served as f64 / ran.as_secs_f64(),
        tally.failed(),
        20,
        streamed >> 20,
        stream_errors.len(),
        bad_ready.len()
    );
    eprintln!("handovers:\n  {}", timings.join("\n  "));
    eprintln!("old processes:\n  {}", exits.join("\n  "));
    assert_eq!(tally.failed(), 0, "PING clients: {}", tally.report());
    assert!(
        stream_errors.is_empty(),
        "long streams failed: {stream_errors:#?}"
    );
    assert!(
        bad_ready.is_empty(),
        "/ready poller saw {} bad answers out of {polls}: {bad_ready:#?}",
        bad_ready.len()
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The accept queue survives the handover
// ---------------------------------------------------------------------------------------------

/// Opens `n` connections to `addr` and writes a PING on each (they complete in the kernel's
/// accept queue whether or not anybody accepts).
fn queue_pings(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("queued connection {i}: connect: {e}"));
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            stream.write_all(b"PING\r\n").unwrap();
            stream
        })
        .collect()
}

/// Every connection gets +PONG; returns how many each pid served.
fn collect_pongs(streams: &mut [TcpStream], pids: &[u32]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    let mut failures = Vec::new();
    for (i, stream) in streams.iter_mut().enumerate() {
        match read_pong(stream) {
            Ok(()) => {
                let owner = served_by(stream, pids, Duration::from_secs(2));
                *by.entry(format!("{owner:?}")).or_default() += 1;
            }
            Err((kind, detail)) => failures.push(format!("connection {i}: {kind:?}: {detail}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} queued connections were not served: {failures:#?}",
        failures.len(),
        streams.len()
    );
    by
}

#[test]
fn a_connection_queued_in_the_backlog_is_served() {
    let _machine = shared();
    let OneRedis {
        redis: _redis,
        dir: _dir,
        admin,
        port: _port,
        addr,
        config,
    } = OneRedis::new();
    let mut old = Node::run("legate (old)", &config);
    wait_ready(&mut old, admin, T);
    ping_ok(addr, "before the handover");

    // A: the old one is frozen while the connections queue up and the newcomer arrives.
    old.signal(libc::SIGSTOP);
    wait_stopped(old.pid());
    let mut queued = queue_pings(addr, 50);
    let mut new = Node::run("legate (new)", &config);
    // Time for the newcomer to start and knock on the (frozen) old one's handoff socket.
    thread::sleep(Duration::from_millis(1500));
    new.assert_running();
    old.signal(libc::SIGCONT);
    let split = collect_pongs(&mut queued, &[old.pid(), new.pid()]);
    eprintln!(
        "old (pid {}) frozen during the handover: served by {split:?}",
        old.pid()
    );
    drop(queued);
    assert_handover(&mut old, &mut new);
    wait_ready(&mut new, admin, T);
    ping_ok(addr, "after the first handover");

    // B: the newcomer is frozen right after the commit: nobody accepts, the old one exits,
    // the queue must survive it and be served once the newcomer runs again.
    let mut newer = Node::run("legate (newer)", &config);
    new.wait_log("handed over", T);
    newer.signal(libc::SIGSTOP);
    wait_stopped(newer.pid());
    let mut queued = queue_pings(addr, 50);
    thread::sleep(Duration::from_secs(1));
    let accepted: Vec<usize> = queued
        .iter()
        .enumerate()
        .filter(|(_, s)| !still_queued(s))
        .map(|(i, _)| i)
        .collect();
    let old_owner: Vec<Option<u32>> = queued
        .iter()
        .map(|s| served_by(s, &[new.pid()], Duration::ZERO))
        .collect();
    assert!(
        accepted.is_empty(),
        "with the newcomer frozen after the commit, connections {accepted:?} were accepted \
         (by the old one: {:?}) instead of waiting in the queue",
        old_owner.iter().filter(|o| o.is_some()).count()
    );
    // Give the old one the chance to exit (it has nothing to drain) while the queue is full.
    let deadline = Instant::now() + Duration::from_secs(5);
    while new.exited().is_none() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    let exited_while_frozen = new.exited().is_some();
    newer.signal(libc::SIGCONT);
    let split = collect_pongs(&mut queued, &[new.pid(), newer.pid()]);
    eprintln!(
        "newcomer (pid {}) frozen after the commit, old one exited meanwhile: \
         {exited_while_frozen}; served by {split:?}",
        newer.pid()
    );
    drop(queued);
    newer.wait_log("took over", T);
    new.assert_exits_zero(T);
    wait_ready(&mut newer, admin, T);
    ping_ok(addr, "after the second handover");
    for node in [&old, &new, &newer] {
        no_panics(node);
    }
}

// ---------------------------------------------------------------------------------------------
// 3. A newcomer that cannot start changes nothing
// ---------------------------------------------------------------------------------------------

/// The old one is alive and serves on `addr` and its admin port, and has neither handed
/// over nor taken over anything (an `aborted` is allowed).
fn assert_still_serving(old: &mut Node, admin: SocketAddr, addr: SocketAddr, what: &str) {
    old.assert_running();
    let stream = echo_line(addr, what);
    assert_eq!(
        served_by(&stream, &[old.pid()], Duration::from_secs(5)),
        Some(old.pid()),
        "{what}: the old one did not accept the connection"
    );
    let (status, body) = http(admin, "GET", "/ready").expect("/ready");
    assert_eq!(status, 200, "{what}: /ready {body}");
    let (owner, metrics) = scrape_owned(admin, &[old.pid()]);
    assert_eq!(
        owner,
        Some(old.pid()),
        "{what}: admin answered by {owner:?}"
    );
    for result in ["committed", "taken", "busy"] {
        assert_eq!(
            handoffs(&metrics, result),
            0.0,
            "{what}: legate_handoffs_total{{result={result:?}}} moved on the old one:\n{}",
            metrics.text
        );
    }
    assert!(
        !old.log().contains("handed over"),
        "{what}: the old one says it handed over:\n{}",
        old.log()
    );
}

#[test]
fn a_bad_config_leaves_the_old_one_serving() {
    let _machine = shared();
    let echo = TcpBackend::echo();
    let dir = tempfile::tempdir().unwrap();
    let admin = local(free_port());
    let port = free_port();
    let addr = local(port);
    let good = format!(
        "{}{}",
        admin_toml(admin, ""),
        listener_toml("app", port, echo.addr(), "")
    );
    let config = write_config(dir.path(), "good.toml", &good);
    let mut old = Node::run("legate (old)", &config);
    wait_ready(&mut old, admin, T);
    let held = echo_line(addr, "held across the failed attempts");
    let inode = listening_inode(port).expect("the listener");

    // A broken file: refused before anything is asked of the old one.
    let broken = write_config(
        dir.path(),
        "broken.toml",
        &format!(
            "{}{}",
            admin_toml(admin, ""),
            listener_toml("app", port, echo.addr(), "balance = \"sideways\"\n")
        ),
    );
    let mut cmd = legate_cmd(&[]);
    cmd.args(["run", "-c", &broken]);
    let output = run_with_timeout(cmd, T);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "a broken config must not start: {}\n{stderr}",
        output.status
    );
    assert!(
        stderr.contains("balance") || stderr.contains("sideways"),
        "the reason (the bad `balance`) is not on stderr: {stderr}"
    );
    eprintln!(
        "broken config: {} — {}",
        output.status,
        stderr.lines().next().unwrap_or("")
    );
    assert_still_serving(&mut old, admin, addr, "after a broken config");

    // A valid file whose new listener cannot be bound (the address is taken).
    let blocker = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = blocker.local_addr().unwrap();
    let clash = write_config(
        dir.path(),
        "clash.toml",
        &format!(
            "{good}{}",
            listener_toml("extra", taken.port(), echo.addr(), "")
        ),
    );
    let mut new = Node::run("legate (clash)", &clash);
    let status = new.wait_exit(T);
    assert!(
        !status.success(),
        "a newcomer whose listener {taken} is taken exited {status}; log:\n{}",
        new.log()
    );
    assert!(
        new.log().contains(&taken.to_string()),
        "the newcomer does not name the taken address {taken}; log:\n{}",
        new.log()
    );
    eprintln!(
        "taken address: {status} — {}",
        new.log().lines().last().unwrap_or("")
    );
    assert_still_serving(
        &mut old,
        admin,
        addr,
        "after a newcomer that could not bind",
    );
    assert_eq!(
        listening_inode(port),
        Some(inode),
        "the listener was replaced"
    );
    assert!(holds(old.pid(), inode), "the old one lost its listener");
    let mut held = held;
    held.write_all(b"still\n").unwrap();
    assert_eq!(read_line(&mut held).unwrap(), "still");
    let (_, metrics) = scrape_owned(admin, &[old.pid()]);
    eprintln!(
        "old one's handoffs: aborted {} error {}",
        handoffs(&metrics, "aborted"),
        handoffs(&metrics, "error")
    );
    no_panics(&old);
}

// ---------------------------------------------------------------------------------------------
// 4. A newcomer killed between receiving the sockets and committing
// ---------------------------------------------------------------------------------------------

#[test]
fn a_newcomer_killed_before_commit_leaves_the_old_one_serving() {
    let _machine = shared();
    let redis = RedisServer::start();
    let echo = TcpBackend::echo();
    // Accepts and reads, never answers: a `redis` check against it takes its whole timeout.
    let black_hole = TcpBackend::start(|mut stream| {
        let mut buf = [0u8; 1024];
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    });
    let dir = tempfile::tempdir().unwrap();
    let admin = local(free_port());
    let (redis_port, app_port, slow_port) = (free_port(), free_port(), free_port());
    let base = format!(
        "{}{}{}",
        admin_toml(admin, ""),
        listener_toml("redis", redis_port, redis.addr(), ""),
        listener_toml("app", app_port, echo.addr(), "")
    );
    let config = write_config(dir.path(), "old.toml", &base);
    let slow = write_config(
        dir.path(),
        "slow.toml",
        &format!(
            "{base}\n[[listeners]]\nname = \"slow\"\nlisten = \"127.0.0.1:{slow_port}\"\nupstream = [\"{}\"]\nhealth = {{ check = \"redis\", interval = \"10s\", timeout = \"5s\" }}\n",
            black_hole.addr()
        ),
    );
    let mut old = Node::run("legate (old)", &config);
    wait_ready(&mut old, admin, T);
    let inode = listening_inode(redis_port).expect("the redis listener");

    let mut new = Node::run("legate (slow newcomer)", &slow);
    let spawned = Instant::now();
    // The newcomer has the sockets once the old listener's inode shows in its descriptors.
    let deadline = Instant::now() + T;
    while !holds(new.pid(), inode) {
        new.assert_running();
        assert!(
            Instant::now() < deadline,
            "the newcomer never received the listening sockets; log:\n{}",
            new.log()
        );
        thread::sleep(Duration::from_millis(10));
    }
    let received = spawned.elapsed();
    assert!(
        !old.log().contains("handed over"),
        "the old one committed {received:?} after the newcomer started, although the \
         newcomer's first health round takes 5 s; old log:\n{}",
        old.log()
    );
    new.signal(libc::SIGKILL);
    let status = new.wait_exit(T);
    eprintln!("newcomer received the sockets {received:.2?} after spawning; killed: {status}");

    ping_ok(local(redis_port), "after the newcomer was killed");
    assert_still_serving(
        &mut old,
        admin,
        local(app_port),
        "after the newcomer was killed",
    );
    assert!(
        !is_listening(slow_port),
        "the killed newcomer's own listener {slow_port} is still open"
    );
    eventually(
        Duration::from_secs(15),
        "legate_handoffs_total{result=\"aborted\"} >= 1 on the old one",
        || handoffs(&scrape_owned(admin, &[old.pid()]).1, "aborted") >= 1.0,
    );
    // The old one can still hand over.
    let mut next = Node::run("legate (next)", &config);
    assert_handover(&mut old, &mut next);
    wait_ready(&mut next, admin, T);
    ping_ok(local(redis_port), "after the real handover");
    no_panics(&old);
    no_panics(&next);
}

// ---------------------------------------------------------------------------------------------
// 5. Garbage on the handoff socket
// ---------------------------------------------------------------------------------------------

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            line.strip_prefix("VmHWM:")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

#[test]
fn garbage_on_the_handoff_socket_is_counted_and_ignored() {
    let _machine = shared();
    let echo = TcpBackend::echo();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("h.sock").display().to_string();
    let admin = local(free_port());
    let port = free_port();
    let addr = local(port);
    let listeners = listener_toml("app", port, echo.addr(), "");
    let config = write_config(
        dir.path(),
        "legate.toml",
        &format!(
            "{}{listeners}",
            admin_toml(admin, &format!("handoff_socket = {socket:?}"))
        ),
    );
    let mut old = Node::run("legate (old)", &config);
    wait_ready(&mut old, admin, T);
    let peak_before = peak_rss_kib(old.pid());
    let old_pid = old.pid();
    let errors = move || handoffs(&scrape_owned(admin, &[old_pid]).1, "error");

    // Random bytes.
    let mut garbage = UnixStream::connect(&socket).expect("connect to the handoff socket");
    garbage
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let _ = garbage.write_all(&payload(4096, 666));
    let mut sink = Vec::new();
    let _ = garbage.read_to_end(&mut sink);
    drop(garbage);
    eventually(
        Duration::from_secs(20),
        "error >= 1 after random bytes",
        || errors() >= 1.0,
    );
    assert_still_serving(&mut old, admin, addr, "after random bytes");
    let after_random = errors();

    // A header claiming an enormous message; the connection stays open.
    let mut huge = UnixStream::connect(&socket).expect("connect to the handoff socket");
    let _ = huge.write_all(&[0xff; 16]);
    eventually(
        Duration::from_secs(20),
        "error counted for an oversized header",
        || errors() > after_random,
    );
    assert_still_serving(&mut old, admin, addr, "with an oversized header pending");
    drop(huge);

    // Connect and leave at once.
    drop(UnixStream::connect(&socket).expect("connect to the handoff socket"));
    thread::sleep(Duration::from_millis(300));
    assert_still_serving(&mut old, admin, addr, "after an empty connection");
    let peak_after = peak_rss_kib(old.pid());
    eprintln!(
        "handoff socket garbage: error count {}, peak RSS {peak_before} → {peak_after} KiB",
        errors()
    );
    assert!(
        peak_after < peak_before + 64 * 1024,
        "peak RSS went from {peak_before} to {peak_after} KiB: the oversized header was believed"
    );

    // A real handover still works; the newcomer names the path with the flag (its file does
    // not set handoff_socket).
    let plain = write_config(
        dir.path(),
        "plain.toml",
        &format!("{}{listeners}", admin_toml(admin, "")),
    );
    let mut new = Node::spawn(
        "legate (new, --handoff-socket)",
        &["run", "-c", &plain, "--handoff-socket", &socket],
        &[],
    );
    assert_handover(&mut old, &mut new);
    wait_ready(&mut new, admin, T);
    echo_line(addr, "after the handover");
    let (owner, metrics) = scrape_owned(admin, &[new.pid()]);
    assert_eq!(owner, Some(new.pid()));
    assert_eq!(handoffs(&metrics, "taken"), 1.0, "{}", metrics.text);
    no_panics(&old);
    no_panics(&new);
}

// ---------------------------------------------------------------------------------------------
// 6. A stale socket file
// ---------------------------------------------------------------------------------------------

#[test]
fn a_stale_handoff_socket_path_is_not_an_obstacle() {
    let _machine = shared();
    let echo = TcpBackend::echo();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("handoff.sock").display().to_string();
    drop(UnixListener::bind(&socket).expect("bind the soon stale socket"));
    assert!(
        Path::new(&socket).exists(),
        "the stale socket file is there"
    );
    assert!(unix_listener_at(&socket).is_none());
    let admin = local(free_port());
    let port = free_port();
    let addr = local(port);
    let listeners = listener_toml("app", port, echo.addr(), "");
    let config = write_config(
        dir.path(),
        "legate.toml",
        &format!(
            "{}{listeners}",
            admin_toml(admin, &format!("handoff_socket = {socket:?}"))
        ),
    );
    let mut first = Node::run("legate #1", &config);
    wait_ready(&mut first, admin, T);
    echo_line(addr, "fresh start");
    assert!(
        !first.log().contains("took over"),
        "nobody served the stale socket:\n{}",
        first.log()
    );
    let inode = unix_listener_at(&socket).unwrap_or_else(|| {
        panic!(
            "legate does not serve the handoff socket {socket}; log:\n{}",
            first.log()
        )
    });
    assert!(
        holds(first.pid(), inode),
        "the handoff socket at {socket} is not legate's"
    );

    let mut second = Node::run("legate #2", &config);
    assert_handover(&mut first, &mut second);
    wait_ready(&mut second, admin, T);
    echo_line(addr, "after the first handover");
    assert!(
        unix_listener_at(&socket).is_some_and(|inode| holds(second.pid(), inode)),
        "after the old one exited, {socket} is not served by the newcomer"
    );

    // Once more, the path now given by LEGATE_HANDOFF_SOCKET over a file without it.
    let plain = write_config(
        dir.path(),
        "plain.toml",
        &format!("{}{listeners}", admin_toml(admin, "")),
    );
    let mut third = Node::spawn(
        "legate #3 (LEGATE_HANDOFF_SOCKET)",
        &["run", "-c", &plain],
        &[("LEGATE_HANDOFF_SOCKET", &socket)],
    );
    assert_handover(&mut second, &mut third);
    wait_ready(&mut third, admin, T);
    echo_line(addr, "after the second handover");
    for node in [&first, &second, &third] {
        no_panics(node);
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Two newcomers at once
// ---------------------------------------------------------------------------------------------

#[test]
fn two_newcomers_racing_one_wins() {
    let _machine = shared();
    let OneRedis {
        redis: _redis,
        dir: _dir,
        admin,
        port: _port,
        addr,
        config,
    } = OneRedis::new();
    let t0 = Instant::now();
    let mut old = Node::run("legate (old)", &config);
    wait_ready(&mut old, admin, T);
    let known: Known = Arc::new(Mutex::new(vec![(old.pid(), old.name.clone())]));
    let load = Load::start(addr, 1, Duration::from_millis(2), t0);
    let poller = ReadyPoller::start(admin, t0, known.clone());

    let mut racers = [
        Node::run("legate (racer A)", &config),
        Node::run("legate (racer B)", &config),
    ];
    known
        .lock()
        .unwrap()
        .extend(racers.iter().map(|r| (r.pid(), r.name.clone())));
    let deadline = Instant::now() + T;
    while !old.log().contains("handed over") {
        let gone = racers
            .iter_mut()
            .filter_map(|r| r.exited().is_some().then_some(()))
            .count();
        assert!(
            gone < 2 && Instant::now() < deadline,
            "nobody took over ({gone} racers exited); old:\n{}\nA:\n{}\nB:\n{}",
            old.log(),
            racers[0].log(),
            racers[1].log()
        );
        thread::sleep(Duration::from_millis(20));
    }
    old.assert_exits_zero(T);
    // Settle: one racer left running (the other gave up, or took over first and then
    // handed over to the second in its turn).
    let deadline = Instant::now() + 2 * T;
    while racers
        .iter_mut()
        .filter_map(|r| r.exited().is_none().then_some(()))
        .count()
        > 1
    {
        assert!(
            Instant::now() < deadline,
            "both racers still running after {:?}; A:\n{}\nB:\n{}",
            2 * T,
            racers[0].log(),
            racers[1].log()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let winner = racers
        .iter_mut()
        .position(|r| r.exited().is_none())
        .unwrap_or_else(|| {
            panic!(
                "no racer is running; A:\n{}\nB:\n{}",
                racers[0].log(),
                racers[1].log()
            )
        });
    let loser = 1 - winner;
    assert!(
        racers[winner].log().contains("took over"),
        "the running racer did not take over:\n{}",
        racers[winner].log()
    );
    let loser_log = racers[loser].log();
    let loser_status = racers[loser].exited().expect("the loser has exited");
    if loser_log.contains("took over") {
        // It came first and handed over to the other in its turn.
        assert!(
            loser_log.contains("handed over") && loser_status.code() == Some(0),
            "the racer that took over first then exited {loser_status} without handing over:\n{loser_log}"
        );
        eprintln!("race: both took over in turn, {} last", racers[winner].name);
    } else {
        assert_eq!(
            loser_status.code(),
            Some(1),
            "the losing racer exited {loser_status}; log:\n{loser_log}"
        );
        assert!(
            loser_log.contains("another legate"),
            "the losing racer does not say \"another legate\":\n{loser_log}"
        );
        eprintln!(
            "race: {} won, {} said: {}",
            racers[winner].name,
            racers[loser].name,
            loser_log
                .lines()
                .find(|l| l.contains("another legate"))
                .unwrap_or("")
        );
    }
    let winner_pid = racers[winner].pid();
    wait_ready(&mut racers[winner], admin, T);
    let stream = ping_served_by(addr, winner_pid);
    drop(stream);
    let (owner, metrics) = scrape_owned(admin, &[winner_pid]);
    assert_eq!(owner, Some(winner_pid));
    assert_eq!(handoffs(&metrics, "taken"), 1.0, "{}", metrics.text);
    thread::sleep(Duration::from_millis(500));
    let (tally, ran) = load.finish();
    let (polls, bad_ready) = poller.finish();
    eprintln!(
        "race: {} PINGs in {ran:.1?}, {} failed; /ready polled {polls} times",
        tally.ok.load(Ordering::SeqCst),
        tally.failed()
    );
    assert_eq!(
        tally.failed(),
        0,
        "PINGs during the race: {}",
        tally.report()
    );
    assert!(
        bad_ready.is_empty(),
        "/ready during the race: {bad_ready:#?}"
    );
    no_panics(&old);
    for racer in &racers {
        no_panics(racer);
    }
}

/// A PING through `addr` answered, on a connection `pid` accepted.
fn ping_served_by(addr: SocketAddr, pid: u32) -> TcpStream {
    let mut stream = connect(addr);
    stream.write_all(b"PING\r\n").unwrap();
    read_pong(&mut stream).unwrap_or_else(|e| panic!("PING via {addr}: {e:?}"));
    assert_eq!(
        served_by(&stream, &[pid], Duration::from_secs(5)),
        Some(pid),
        "the connection was not accepted by pid {pid}"
    );
    stream
}

// ---------------------------------------------------------------------------------------------
// 8. Supervise mode
// ---------------------------------------------------------------------------------------------

#[test]
fn supervise_mode_and_an_explicit_handoff_socket_are_refused() {
    let _machine = shared();
    let echo = TcpBackend::echo();
    let dir = tempfile::tempdir().unwrap();
    let admin = local(free_port());
    let port = free_port();
    let config = write_config(
        dir.path(),
        "legate.toml",
        &format!(
            "{}{}",
            admin_toml(admin, ""),
            listener_toml("app", port, echo.addr(), "")
        ),
    );
    let mut cmd = legate_cmd(&[]);
    cmd.args([
        "run",
        "--handoff-socket",
        "@x",
        "-c",
        &config,
        "--",
        "sleep",
        "5",
    ]);
    let started = Instant::now();
    let output: Output = run_with_timeout(cmd, T);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "--handoff-socket with -- CMD: {}\n{text}",
        output.status
    );
    assert!(
        text.contains("supervise"),
        "the refusal does not mention supervise mode:\n{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused only after {:?} (did it run the command?)",
        started.elapsed()
    );
    assert!(!is_listening(port) && !is_listening(admin.port()));

    // Without the flag, supervise mode never hands over: next to a running legate with the
    // same addresses it cannot start, and the running one is untouched.
    let mut plain = Node::run("legate (plain)", &config);
    wait_ready(&mut plain, admin, T);
    let mut supervised = Node::spawn(
        "legate (supervise)",
        &["run", "-c", &config, "--", "sleep", "30"],
        &[],
    );
    let status = supervised.wait_exit(T);
    assert!(
        !status.success(),
        "supervise mode next to a running legate exited {status}; log:\n{}",
        supervised.log()
    );
    assert!(
        !supervised.log().contains("took over"),
        "supervise mode took over:\n{}",
        supervised.log()
    );
    assert_still_serving(
        &mut plain,
        admin,
        local(port),
        "after a supervise-mode start",
    );
    let (_, metrics) = scrape_owned(admin, &[plain.pid()]);
    assert_eq!(
        handoffs(&metrics, "aborted") + handoffs(&metrics, "error"),
        0.0,
        "supervise mode knocked on the handoff socket:\n{}",
        metrics.text
    );
    no_panics(&plain);
}

// ---------------------------------------------------------------------------------------------
// 9. OpenKruise SidecarSet hot upgrade
// ---------------------------------------------------------------------------------------------

/// `GET /ready`: status and the `legate-sidecarset-version` header.
fn ready_with_version(admin: SocketAddr) -> io::Result<(u16, Option<String>)> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /ready HTTP/1.1\r\nHost: legate\r\nConnection: close\r\n\r\n")?;
    let (raw, _) = read_to_end(&mut stream);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, text.clone()))?;
    let version = head.lines().skip(1).find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim()
            .eq_ignore_ascii_case("legate-sidecarset-version")
            .then(|| value.trim().to_owned())
    });
    Ok((status, version))
}

/// A SidecarSet container: `legate run -c CONFIG` with Kruise's two variables.
fn kruise(name: &str, config: &str, version: &str, alt: Option<&str>) -> Node {
    let mut env = vec![("SIDECARSET_VERSION", version)];
    if let Some(alt) = alt {
        env.push(("SIDECARSET_VERSION_ALT", alt));
    }
    Node::spawn(name, &["run", "-c", config], &env)
}

/// After 2 s the idle container is running and holds no listening socket at all.
fn assert_binds_nothing(node: &mut Node) {
    thread::sleep(Duration::from_secs(2));
    node.assert_running();
    let bound = listening_sockets_of(node.pid());
    assert!(
        bound.is_empty(),
        "{} should bind nothing, holds {bound:?}; log:\n{}",
        node.name,
        node.log()
    );
}

/// `legate wait --handover` with `SIDECARSET_VERSION=version` (or none).
fn wait_handover_cmd(admin: SocketAddr, version: Option<&str>, timeout: &str) -> Command {
    let env: Vec<(&str, &str)> = version
        .map(|v| vec![("SIDECARSET_VERSION", v)])
        .unwrap_or_default();
    let mut cmd = legate_cmd(&env);
    cmd.args([
        "wait",
        "--handover",
        "--admin",
        &admin.to_string(),
        "--timeout",
        timeout,
    ]);
    cmd
}

#[test]
fn sidecarset_decision_table() {
    let _machine = shared();
    let OneRedis {
        redis: _redis,
        dir: _dir,
        admin,
        port,
        addr,
        config,
    } = OneRedis::new();
    let handoff = default_handoff_name(admin);

    // (a) The "empty" container of a fresh Pod (VERSION=0) starts first: it binds nothing.
    let mut empty = kruise("legate (VERSION=0 ALT=1)", &config, "0", Some("1"));
    assert_binds_nothing(&mut empty);
    assert!(
        !is_listening(admin.port()),
        "the idle container bound the admin port"
    );
    assert!(!is_listening(port), "the idle container bound the listener");
    assert!(
        unix_listener_at(&handoff).is_none(),
        "the idle container serves {handoff}"
    );
    // `legate wait --handover` in the idle container's own environment returns at once.
    let started = Instant::now();
    let output = run_with_timeout(wait_handover_cmd(admin, Some("0"), "20s"), T);
    assert!(
        output.status.success() && started.elapsed() < Duration::from_secs(5),
        "wait --handover with SIDECARSET_VERSION=0: {} after {:?}: {}",
        output.status,
        started.elapsed(),
        String::from_utf8_lossy(&output.stderr)
    );

    // (d) The working container (VERSION=1, ALT=0) starts normally, from scratch.
    let mut v1 = kruise("legate (VERSION=1 ALT=0)", &config, "1", Some("0"));
    wait_ready(&mut v1, admin, T);
    ping_ok(addr, "version 1");
    assert!(!v1.log().contains("took over"), "{}", v1.log());
    assert_eq!(
        ready_with_version(admin).expect("/ready"),
        (200, Some("1".to_string())),
        "/ready of version 1"
    );
    empty.signal(libc::SIGTERM);
    empty.assert_exits_zero(T);
    let output = run_with_timeout(wait_handover_cmd(admin, Some("1"), "20s"), T);
    assert!(
        output.status.success(),
        "wait --handover for version 1: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = run_with_timeout(wait_handover_cmd(admin, None, "20s"), T);
    assert!(
        output.status.success(),
        "wait --handover without SIDECARSET_VERSION: {}",
        String::from_utf8_lossy(&output.stderr)
    );

    // (c) Upgrade: the empty container becomes VERSION=2 ALT=1 and takes over. Its
    // `legate wait --handover` waits until version 2 answers /ready.
    let mut wait2 = wait_handover_cmd(admin, Some("2"), "40s");
    let mut wait2 = wait2
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn legate wait");
    thread::sleep(Duration::from_secs(1));
    assert!(
        wait2.try_wait().unwrap().is_none(),
        "wait --handover for version 2 returned while version 1 serves"
    );
    let mut v2 = kruise("legate (VERSION=2 ALT=1)", &config, "2", Some("1"));
    assert_handover(&mut v1, &mut v2);
    ping_ok(addr, "version 2");
    let deadline = Instant::now() + T;
    let waited = loop {
        if let Some(status) = wait2.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = wait2.kill();
            let _ = wait2.wait();
            panic!("wait --handover for version 2 still waiting after the handover");
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(waited.success(), "wait --handover for version 2: {waited}");
    assert_eq!(
        ready_with_version(admin).expect("/ready"),
        (200, Some("2".to_string())),
        "/ready of version 2"
    );
    let started = Instant::now();
    let output = run_with_timeout(wait_handover_cmd(admin, Some("3"), "2s"), T);
    assert_eq!(
        output.status.code(),
        Some(1),
        "wait --handover for version 3 while version 2 serves: {} {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));

    // (a) again, after the upgrade: the old container becomes the empty one (VERSION=0).
    let mut idle = kruise("legate (VERSION=0 ALT=2)", &config, "0", Some("2"));
    assert_binds_nothing(&mut idle);
    // (b) The old container restarted after a crash (VERSION=1 < ALT=2): binds nothing.
    let mut stale = kruise("legate (VERSION=1 ALT=2)", &config, "1", Some("2"));
    assert_binds_nothing(&mut stale);
    let stream = ping_served_by(addr, v2.pid());
    drop(stream);
    let (owner, metrics) = scrape_owned(admin, &[v2.pid()]);
    assert_eq!(owner, Some(v2.pid()), "version 2 lost its admin port");
    assert_eq!(handoffs(&metrics, "taken"), 1.0, "{}", metrics.text);
    for result in ["committed", "aborted", "error", "busy"] {
        assert_eq!(
            handoffs(&metrics, result),
            0.0,
            "an idle container knocked on version 2 ({result}):\n{}",
            metrics.text
        );
    }
    for node in [&mut idle, &mut stale] {
        node.signal(libc::SIGTERM);
        node.assert_exits_zero(T);
    }

    // (d) ALT unset: a normal start, which takes over from whoever serves.
    let mut v3 = kruise("legate (VERSION=3, no ALT)", &config, "3", None);
    assert_handover(&mut v2, &mut v3);
    ping_ok(addr, "version 3");
    let output = run_with_timeout(wait_handover_cmd(admin, Some("3"), "20s"), T);
    assert!(
        output.status.success(),
        "wait --handover for version 3: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    for node in [&v1, &v2, &v3] {
        no_panics(node);
    }
}

// ---------------------------------------------------------------------------------------------
// 10. The ready file across a handover
// ---------------------------------------------------------------------------------------------

/// `ready_file` names one file for both processes: the newcomer keeps it (it is ready
/// before it commits), and the old process, draining and exiting, must not remove it.
#[test]
fn the_ready_file_stays_through_a_handover() {
    let _machine = shared();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let ready_file = dir.path().join("ready");
    let admin = local(free_port());
    let port = free_port();
    let config = write_config(
        dir.path(),
        "legate.toml",
        &format!(
            "[admin]\nlisten = \"{admin}\"\nready_file = \"{}\"\n\n[runtime]\ndrain_timeout = \"5s\"\n{}",
            ready_file.display(),
            listener_toml("redis", port, redis.addr(), "")
        ),
    );
    let mut old = Node::run("legate (old)", &config);
    wait_ready(&mut old, admin, T);
    eventually(T, "the ready file to appear", || ready_file.exists());
    let mut new = Node::run("legate (new)", &config);
    let status = old.wait_exit(T);
    assert!(status.success(), "the old legate exited {status}");
    wait_ready(&mut new, admin, T);
    assert!(
        ready_file.exists(),
        "the old legate removed the ready file on its way out; old log:\n{}",
        old.log()
    );
    ping_ok(local(port), "after the handover");
}
