//! Shared helpers for the end-to-end tests: they drive the real `legate` binary against real
//! servers on free loopback ports.
//!
//! - [`Legate`] / [`LegateBuilder`]: write a config file into a temp dir, spawn `legate run -c FILE`,
//!   wait until `/live` answers; talk to the admin port ([`Legate::get`], [`Legate::metrics`]),
//!   signal the process and wait for its exit. Drop kills it and, when the test is panicking, prints
//!   its log.
//! - [`RedisServer`], [`MariaDb`], [`Socat`]: real backends, each killed and waited on Drop.
//! - [`TcpBackend`]: a tiny in-test TCP server (echo, "say who I am", or any handler).
//! - [`eventually`] / [`wait_for`]: polling with a deadline; no bare sleeps for readiness.
//! - [`tls`]: certificates made in the test, a TLS-only redis-server, `redis-cli --tls`.
//! - [`dns`]: a real `dnsmasq` answering from a hosts file.
//!
//! A missing server binary is a test failure naming the package to install, never a skip.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod dns;
pub mod fault;
pub mod tls;

/// The `legate` binary cargo built for these tests.
pub const LEGATE: &str = env!("CARGO_BIN_EXE_legate");

/// A fast active health check, so a dead backend shows up in `/ready` within a second.
pub const FAST_HEALTH: &str = r#"{ check = "tcp", interval = "200ms", timeout = "200ms" }"#;

// ---------------------------------------------------------------------------------------------
// Small utilities
// ---------------------------------------------------------------------------------------------

/// A port that was free on 127.0.0.1 a moment ago (the kernel picks it), and that this
/// test process has not handed out before: the kernel may offer a port it just gave us
/// again (it is free until the test binds it), and two roles on one port make a test
/// fail for nothing.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// `127.0.0.1:port`
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Fails the test (never skips it) when a required tool is missing.
pub fn require_bin(name: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed; install it with `apt-get install -y {package}` (or run scripts/test)"
    );
}

/// Polls `check` until it returns true; panics with `what` after `timeout`.
pub fn eventually(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    wait_for(timeout, what, || check().then_some(()))
}

/// Polls `probe` until it returns `Some`; panics with `what` after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        thread::sleep(Duration::from_millis(25));
    }
}

/// Whether something is listening on 127.0.0.1:`port` (or on the wildcard address), read from
/// /proc/net/tcp so that checking does not open a connection.
pub fn is_listening(port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                fields.len() > 3 && fields[3] == "0A" && fields[1].ends_with(&suffix)
            })
    })
}

pub fn wait_listening(port: u16, timeout: Duration, what: &str) {
    eventually(timeout, &format!("{what} listening on port {port}"), || {
        is_listening(port)
    });
}

/// Connects to a listener that is expected to turn the client away and reports whether
/// the client was closed within `timeout`. legate resets a client it cannot serve, and
/// on loopback that reset can arrive before connect() has returned: then connect()
/// itself fails with ECONNRESET, which is the same outcome.
pub fn turned_away(addr: SocketAddr, timeout: Duration) -> bool {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(mut stream) => closed_within(&mut stream, timeout),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
        Err(e) => panic!("connect to {addr}: {e}"),
    }
}

/// Connects with a timeout and sets read/write timeouts on the stream.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Reads one `\n`-terminated line (byte by byte, so nothing after it is consumed).
pub fn read_line(stream: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Reads until EOF; returns what came before an error too (a reset after data still yields
/// the data, and the error).
pub fn read_to_end(stream: &mut TcpStream) -> (Vec<u8>, Option<io::Error>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (data, None),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (data, Some(e)),
        }
    }
}

/// Whether the peer has closed (EOF or reset) within `timeout`, without sending anything.
pub fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + timeout;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {
                if Instant::now() >= deadline {
                    return false;
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Sends a line through a fresh connection and expects it echoed back.
pub fn echo_roundtrip(addr: SocketAddr, line: &str) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    read_line(&mut stream)
}

/// One client operation against [`TcpBackend::hello`] backends behind `addr`: connect, read
/// the greeting, close. An empty greeting (the proxy closed the connection) is an error.
pub fn try_which(addr: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    match read_line(&mut stream) {
        Ok(id) if !id.is_empty() => Ok(id),
        Ok(_) => Err("closed without a greeting (rejected)".into()),
        Err(e) => Err(format!("read: {e}")),
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so big payloads are not trivially compressible.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        io::Error::last_os_error()
    );
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A child process that is killed and reaped when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        send_signal(self.pid(), signal);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_child(&mut self.child, timeout)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // A stopped process still dies of SIGKILL; SIGCONT is harmless.
            unsafe_kill_quiet(self.child.id(), libc::SIGCONT);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn unsafe_kill_quiet_group(pgid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; errors (already gone) are fine here.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), signal);
    }
}

fn unsafe_kill_quiet(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; errors (already gone) are fine here.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Runs a command to completion with a deadline; the child is killed if it overruns.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let program = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => {
            waiter.join().unwrap();
            output.unwrap_or_else(|e| panic!("wait {program}: {e}"))
        }
        Err(_) => {
            unsafe_kill_quiet(pid, libc::SIGKILL);
            let _ = waiter.join();
            panic!("{program} did not finish within {timeout:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP (admin port) and Prometheus text
// ---------------------------------------------------------------------------------------------

/// One HTTP/1.1 request over a fresh connection (`Connection: close`); returns status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let (raw, error) = read_to_end(&mut stream);
    match parse_http_response(&raw) {
        Some(response) => Ok(response),
        None => Err(error.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "incomplete HTTP response: {:?}",
                    String::from_utf8_lossy(&raw)
                ),
            )
        })),
    }
}

/// Parses a whole HTTP/1.x response (Content-Length, chunked, or until close).
pub fn parse_http_response(raw: &[u8]) -> Option<(u16, String)> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut body = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let (key, value) = line.split_once(':')?;
        let key = key.trim().to_ascii_lowercase();
        let value = value.trim();
        if key == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if key == "content-length" {
            length = value.parse::<usize>().ok();
        }
    }
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let line_end = body.windows(2).position(|w| w == b"\r\n")?;
            let size_text = String::from_utf8_lossy(&body[..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            body = &body[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(body.get(..size)?);
            body = body.get(size + 2..)?;
        }
        out
    } else if let Some(length) = length {
        body.get(..length)?.to_vec()
    } else {
        body.to_vec()
    };
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` scrape.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| parse_sample(line).unwrap_or_else(|| panic!("bad metrics line: {line:?}")))
            .collect();
        Metrics {
            samples,
            text: text.to_owned(),
        }
    }

    /// Samples named `name` whose labels include all of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of the matching samples, or `None` when there is none.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = false;
        let sum = self
            .matching(name, labels)
            .inspect(|_| found = true)
            .map(|s| s.value)
            .sum();
        found.then_some(sum)
    }

    /// Like [`Metrics::get`], with 0 for a series that does not exist (yet).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(mut rest) = rest.strip_prefix('{') {
        loop {
            rest = rest.trim_start_matches([',', ' ']);
            if let Some(after) = rest.strip_prefix('}') {
                break after;
            }
            let eq = rest.find('=')?;
            let key = rest[..eq].trim().to_owned();
            rest = rest[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i,
                    other => value.push(other),
                }
            };
            labels.insert(key, value);
            rest = &rest[end + 1..];
        }
    } else {
        rest
    };
    let value_text = rest.split_whitespace().next()?;
    let value = match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        text => text.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

// ---------------------------------------------------------------------------------------------
// legate
// ---------------------------------------------------------------------------------------------

/// One `[[listeners]]` table; the listen port is picked by the builder.
#[derive(Debug, Clone)]
pub struct Listener {
    name: String,
    upstreams: Vec<String>,
    extra: Vec<(String, String)>,
}

impl Listener {
    pub fn new(name: &str) -> Listener {
        Listener {
            name: name.to_owned(),
            upstreams: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// Adds an upstream target (an address or any target of the grammar).
    pub fn upstream(mut self, target: impl Display) -> Listener {
        self.upstreams.push(target.to_string());
        self
    }

    /// Sets `key = value`, the value written as raw TOML (quote strings yourself).
    pub fn set(mut self, key: &str, raw_value: &str) -> Listener {
        self.extra.push((key.to_owned(), raw_value.to_owned()));
        self
    }

    /// `health = { check = "tcp", interval = "200ms", timeout = "200ms" }`
    pub fn fast_health(self) -> Listener {
        self.set("health", FAST_HEALTH)
    }
}

/// Builds a config file and starts `legate run -c FILE`.
pub struct LegateBuilder {
    dir: TempDir,
    admin_port: u16,
    ready_file: bool,
    runtime: Vec<(String, String)>,
    listeners: Vec<Listener>,
    raw: String,
    nofile: Option<u64>,
}

impl LegateBuilder {
    /// Starts legate with `RLIMIT_NOFILE` set to `limit` (soft and hard, clamped to the
    /// current hard limit), like `prlimit --nofile=N:N`.
    pub fn nofile(mut self, limit: u64) -> Self {
        self.nofile = Some(limit);
        self
    }

    pub fn listener(mut self, listener: Listener) -> Self {
        self.listeners.push(listener);
        self
    }

    /// Uses this admin port instead of a fresh one.
    pub fn admin_port(mut self, port: u16) -> Self {
        self.admin_port = port;
        self
    }

    /// Sets `[runtime] key = value` (raw TOML value).
    pub fn runtime(mut self, key: &str, raw_value: &str) -> Self {
        self.runtime.push((key.to_owned(), raw_value.to_owned()));
        self
    }

    /// Sets `[admin] ready_file` to a file in the temp dir (see [`Legate::ready_file`]).
    pub fn ready_file(mut self) -> Self {
        self.ready_file = true;
        self
    }

    /// Appends raw TOML to the end of the generated file.
    pub fn raw(mut self, toml: &str) -> Self {
        self.raw.push_str(toml);
        self.raw.push('\n');
        self
    }

    /// Writes the config and starts legate; returns once `/live` answers 200.
    pub fn start(self) -> Legate {
        let admin = local(self.admin_port);
        let ready_path = self.dir.path().join("ready");
        let mut toml = format!("[admin]\nlisten = \"{admin}\"\n");
        if self.ready_file {
            toml.push_str(&format!(
                "ready_file = {:?}\n",
                ready_path.display().to_string()
            ));
        }
        if !self.runtime.is_empty() {
            toml.push_str("\n[runtime]\n");
            for (key, value) in &self.runtime {
                toml.push_str(&format!("{key} = {value}\n"));
            }
        }
        let mut listeners = BTreeMap::new();
        for listener in &self.listeners {
            let port = free_port();
            listeners.insert(listener.name.clone(), local(port));
            let upstreams: Vec<String> = listener
                .upstreams
                .iter()
                .map(|u| format!("{u:?}"))
                .collect();
            toml.push_str(&format!(
                "\n[[listeners]]\nname = {:?}\nlisten = \"127.0.0.1:{port}\"\nupstream = [{}]\n",
                listener.name,
                upstreams.join(", ")
            ));
            for (key, value) in &listener.extra {
                toml.push_str(&format!("{key} = {value}\n"));
            }
        }
        toml.push_str(&self.raw);
        let config_path = self.dir.path().join("legate.toml");
        std::fs::write(&config_path, &toml).expect("write config");
        let config_arg = config_path.display().to_string();
        let mut legate =
            Legate::spawn_limited(self.dir, &["run", "-c", &config_arg], admin, self.nofile);
        legate.listeners = listeners;
        legate.config_path = Some(config_path);
        legate.ready_path = ready_path;
        legate.wait_live(Duration::from_secs(15));
        legate
    }
}

/// A running `legate` process; killed (and its log printed, if the test panics) on drop.
pub struct Legate {
    child: Option<Child>,
    /// The admin address (`[admin] listen`).
    pub admin: SocketAddr,
    listeners: BTreeMap<String, SocketAddr>,
    pub dir: TempDir,
    pub config_path: Option<PathBuf>,
    ready_path: PathBuf,
    log_path: PathBuf,
}

impl Legate {
    pub fn builder() -> LegateBuilder {
        LegateBuilder {
            dir: tempfile::tempdir().expect("tempdir"),
            admin_port: free_port(),
            ready_file: false,
            runtime: Vec::new(),
            listeners: Vec::new(),
            raw: String::new(),
            nofile: None,
        }
    }

    /// Spawns `legate ARGS` with its output going to `DIR/legate.log`. Does not wait for anything.
    pub fn spawn(dir: TempDir, args: &[&str], admin: SocketAddr) -> Legate {
        Legate::spawn_limited(dir, args, admin, None)
    }

    /// [`Legate::spawn`], with `RLIMIT_NOFILE` set to `nofile` when given.
    pub fn spawn_limited(
        dir: TempDir,
        args: &[&str],
        admin: SocketAddr,
        nofile: Option<u64>,
    ) -> Legate {
        let log_path = dir.path().join("legate.log");
        let log = File::create(&log_path).expect("create log file");
        let mut cmd = legate_command();
        if let Some(limit) = nofile {
            // SAFETY: setrlimit(2) is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    // Raising past the hard limit needs CAP_SYS_RESOURCE: clamp to it.
                    let mut current = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut current);
                    let limit = (limit as libc::rlim_t).min(current.rlim_max);
                    let rlim = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &rlim) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {LEGATE}: {e}"));
        Legate {
            child: Some(child),
            admin,
            listeners: BTreeMap::new(),
            ready_path: dir.path().join("ready"),
            dir,
            config_path: None,
            log_path,
        }
    }

    /// The listen address of the listener called `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        *self
            .listeners
            .get(name)
            .unwrap_or_else(|| panic!("no listener named {name}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("legate already reaped").id()
    }

    /// The `[admin] ready_file` path (set with [`LegateBuilder::ready_file`]).
    pub fn ready_file(&self) -> &Path {
        &self.ready_path
    }

    /// What legate has written to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn request(&self, method: &str, path: &str) -> io::Result<(u16, String)> {
        http(self.admin, method, path)
    }

    /// `GET path` on the admin port; panics (with the log) if the request fails.
    pub fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path)
            .unwrap_or_else(|e| panic!("GET {path} on {}: {e}\n{}", self.admin, self.log()))
    }

    pub fn post(&self, path: &str) -> (u16, String) {
        self.request("POST", path)
            .unwrap_or_else(|e| panic!("POST {path} on {}: {e}\n{}", self.admin, self.log()))
    }

    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {body}");
        Metrics::parse(&body)
    }

    fn status(&self, path: &str) -> Option<u16> {
        self.request("GET", path).ok().map(|(status, _)| status)
    }

    /// Panics with the log if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!("legate exited early with {status}; log:\n{}", self.log());
        }
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|child| child.try_wait().expect("try_wait"))
    }

    pub fn wait_live(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            self.assert_running();
            if self.status("/live") == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "legate's /live did not answer 200 within {timeout:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until `GET path` answers `status`.
    pub fn wait_status(&mut self, path: &str, status: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            self.assert_running();
            let answer = self.request("GET", path).ok();
            if answer.as_ref().map(|(s, _)| *s) == Some(status) {
                return;
            }
            last = answer.or(last);
            assert!(
                Instant::now() < deadline,
                "GET {path} did not answer {status} within {timeout:?} (last answer: {last:?}); log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn wait_ready(&mut self, timeout: Duration) {
        self.wait_status("/ready", 200, timeout);
    }

    pub fn wait_not_ready(&mut self, timeout: Duration) {
        self.wait_status("/ready", 503, timeout);
    }

    pub fn signal(&self, signal: i32) {
        send_signal(self.pid(), signal);
    }

    /// Waits for the process to exit; panics (with the log) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("legate already reaped");
        match wait_child(child, timeout) {
            Some(status) => status,
            None => panic!(
                "legate did not exit within {timeout:?}; log:\n{}",
                self.log()
            ),
        }
    }
}

impl Drop for Legate {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "----- legate log ({}) -----\n{}\n----- end of legate log -----",
                self.log_path.display(),
                self.log()
            );
            if let Some(path) = &self.config_path {
                eprintln!(
                    "----- config -----\n{}",
                    std::fs::read_to_string(path).unwrap_or_default()
                );
            }
        }
    }
}

/// `legate` as a `Command`, with no `LEGATE_*` variables leaking in from the environment.
pub fn legate_command() -> Command {
    // scripts/test builds the static binary the Docker image ships and sets
    // LEGATE_STATIC_BIN, so the whole end-to-end suite runs against that artifact; a
    // plain `cargo test` runs cargo's own build.
    let binary = std::env::var("LEGATE_STATIC_BIN")
        .ok()
        .filter(|path| !path.is_empty())
        .unwrap_or_else(|| LEGATE.to_string());
    let mut cmd = Command::new(binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LEGATE_") {
            cmd.env_remove(&key);
        }
    }
    cmd
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// A throwaway `redis-server` on a free port.
pub struct RedisServer {
    pub port: u16,
    dir: TempDir,
    proc: Option<Proc>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        require_bin("redis-server", "redis-server");
        let mut server = RedisServer {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            proc: None,
        };
        server.restart();
        server
    }

    pub fn addr(&self) -> SocketAddr {
        local(self.port)
    }

    /// (Re)starts the server on the same port; waits for PING.
    pub fn restart(&mut self) {
        assert!(self.proc.is_none(), "redis-server is already running");
        let log = File::create(self.dir.path().join("redis.log")).expect("redis log");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--protected-mode", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn redis-server");
        self.proc = Some(Proc {
            name: "redis-server".into(),
            child,
        });
        let addr = self.addr();
        wait_for(
            Duration::from_secs(15),
            "redis-server to answer PING",
            || {
                if let Some(proc) = self.proc.as_mut() {
                    assert!(
                        proc.is_running(),
                        "redis-server exited: {}",
                        std::fs::read_to_string(self.dir.path().join("redis.log"))
                            .unwrap_or_default()
                    );
                }
                let mut con = redis_connect(addr).ok()?;
                let pong: String = redis::cmd("PING").query(&mut con).ok()?;
                (pong == "PONG").then_some(())
            },
        );
    }

    /// Kills the server (the port is then closed).
    pub fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
        }
    }

    /// SIGSTOP: connections are accepted by the kernel but never answered.
    pub fn pause(&self) {
        self.proc
            .as_ref()
            .expect("not running")
            .signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.proc
            .as_ref()
            .expect("not running")
            .signal(libc::SIGCONT);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real Redis client connection with timeouts.
pub fn redis_connect(addr: SocketAddr) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let con = client.get_connection_with_timeout(Duration::from_secs(5))?;
    con.set_read_timeout(Some(Duration::from_secs(30)))?;
    con.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(con)
}

// ---------------------------------------------------------------------------------------------
// MariaDB
// ---------------------------------------------------------------------------------------------

/// A throwaway MariaDB server (fresh datadir, no grant tables) on a free port.
pub struct MariaDb {
    pub port: u16,
    dir: TempDir,
    proc: Option<Proc>,
}

/// `mariadb-install-db` into `datadir`. Two installs at once in one test process (tests
/// run in parallel threads) were seen to fail, so installs take turns; a failed install is
/// tried again in a fresh directory, twice, before the test fails with every attempt's
/// output.
fn install_mariadb_datadir(datadir: &Path) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut failures = Vec::new();
    for attempt in 1..=3 {
        let _ = std::fs::remove_dir_all(datadir);
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--user=root")
            .arg("--skip-test-db");
        let output = run_with_timeout(install, Duration::from_secs(120));
        if output.status.success() {
            return;
        }
        failures.push(format!(
            "attempt {attempt}: {}\n{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    panic!(
        "mariadb-install-db failed 3 times:\n{}",
        failures.join("\n")
    );
}

impl MariaDb {
    pub fn start() -> MariaDb {
        MariaDb::start_with(false)
    }

    /// A server that checks accounts: root@127.0.0.1 with no password can create others.
    pub fn start_with_grants() -> MariaDb {
        MariaDb::start_with(true)
    }

    fn start_with(grants: bool) -> MariaDb {
        require_bin("mariadbd", "mariadb-server");
        require_bin("mariadb-install-db", "mariadb-server");
        require_bin("mariadb", "mariadb-client");
        let dir = tempfile::tempdir().expect("tempdir");
        let datadir = dir.path().join("data");
        install_mariadb_datadir(&datadir);
        let port = free_port();
        let log_path = dir.path().join("mariadb.log");
        let log = File::create(&log_path).expect("mariadb log");
        let mut command = Command::new("mariadbd");
        // --no-defaults is only honoured as the first argument.
        command.arg("--no-defaults");
        if !grants {
            command.arg("--skip-grant-tables");
        }
        let child = command
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.path().join("sock").display()))
            .arg(format!("--pid-file={}", dir.path().join("pid").display()))
            .arg("--user=root")
            .arg("--skip-log-bin")
            .arg("--skip-name-resolve")
            .arg("--innodb-buffer-pool-size=16M")
            .arg("--max-allowed-packet=64M")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn mariadbd");
        let mut server = MariaDb {
            port,
            dir,
            proc: Some(Proc {
                name: "mariadbd".into(),
                child,
            }),
        };
        let addr = server.addr();
        wait_for(
            Duration::from_secs(60),
            "mariadbd to answer SELECT 1",
            || {
                let proc = server.proc.as_mut().unwrap();
                assert!(
                    proc.is_running(),
                    "mariadbd exited: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
                let output = mariadb_query(addr, "SELECT 1");
                (output.status.success() && String::from_utf8_lossy(&output.stdout).trim() == "1")
                    .then_some(())
            },
        );
        server
    }

    pub fn addr(&self) -> SocketAddr {
        local(self.port)
    }
}

impl Drop for MariaDb {
    fn drop(&mut self) {
        // Proc's drop kills and reaps mariadbd before the datadir is removed.
        self.proc.take();
    }
}

/// Runs `sql` with the `mariadb` command-line client against `addr` (over TCP), batch mode,
/// no column names.
pub fn mariadb_query(addr: SocketAddr, sql: &str) -> Output {
    let mut cmd = Command::new("mariadb");
    cmd.arg("--no-defaults")
        .arg("--protocol=TCP")
        .arg(format!("--host={}", addr.ip()))
        .arg(format!("--port={}", addr.port()))
        .arg("--user=root")
        .arg("--connect-timeout=5")
        .arg("--max-allowed-packet=64M")
        .arg("--batch")
        .arg("--skip-column-names")
        .arg("--execute")
        .arg(sql);
    run_with_timeout(cmd, Duration::from_secs(60))
}

// ---------------------------------------------------------------------------------------------
// socat
// ---------------------------------------------------------------------------------------------

/// A `socat TCP-LISTEN:PORT,fork ADDRESS` backend on a free port.
pub struct Socat {
    pub port: u16,
    proc: Proc,
}

impl Socat {
    /// Listens and connects each accepted connection to the socat `address` (e.g.
    /// `EXEC:sha256sum`, `PIPE`). `-t 30`: after one direction ends, socat waits up to 30 s for
    /// the other, so half-closed connections are not cut short.
    pub fn start(address: &str) -> Socat {
        require_bin("socat", "socat");
        let port = free_port();
        let child = Command::new("socat")
            .process_group(0)
            .args(["-t", "30"])
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
            .arg(address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn socat");
        let mut proc = Proc {
            name: "socat".into(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_listening(port) {
            assert!(proc.is_running(), "socat exited early");
            assert!(
                Instant::now() < deadline,
                "socat is not listening on {port}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Socat { port, proc }
    }

    /// `EXEC:sha256sum`: answers the SHA-256 of everything received, after the client's FIN.
    pub fn sha256sum() -> Socat {
        require_bin("sha256sum", "coreutils");
        Socat::start("EXEC:sha256sum")
    }

    /// `PIPE`: echoes.
    pub fn echo() -> Socat {
        Socat::start("PIPE")
    }

    pub fn addr(&self) -> SocketAddr {
        local(self.port)
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        // socat forks a child per connection; they share socat's own process group, so the
        // whole group goes at once (the orphans are reaped by init).
        unsafe_kill_quiet_group(self.proc.pid(), libc::SIGKILL);
        let _ = self.proc.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// In-test TCP backend
// ---------------------------------------------------------------------------------------------

type Handler = dyn Fn(TcpStream) + Send + Sync + 'static;

/// A tiny TCP server in a thread: each accepted connection is handed to a handler in its own
/// thread. Counts accepted connections. Stops accepting (and closes the port) on drop.
pub struct TcpBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpBackend {
    pub fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> TcpBackend {
        TcpBackend::start_on("127.0.0.1:0", handler)
    }

    /// Like [`TcpBackend::start`], listening on `bind` (e.g. `127.0.0.2:0`).
    pub fn start_on(bind: &str, handler: impl Fn(TcpStream) + Send + Sync + 'static) -> TcpBackend {
        let listener = TcpListener::bind(bind).expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let accepted = accepted.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    thread::spawn(move || handler(stream));
                }
            })
        };
        TcpBackend {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Echoes everything; passes the client's FIN on after the echo.
    pub fn echo() -> TcpBackend {
        TcpBackend::start(|stream| echo_stream(stream, None))
    }

    /// Writes `id\n` on accept, then echoes.
    pub fn hello(id: &str) -> TcpBackend {
        TcpBackend::hello_on("127.0.0.1:0", id)
    }

    /// Like [`TcpBackend::hello`], listening on `bind` (e.g. `127.0.0.2:PORT`).
    pub fn hello_on(bind: &str, id: &str) -> TcpBackend {
        let id = id.to_owned();
        TcpBackend::start_on(bind, move |stream| echo_stream(stream, Some(&id)))
    }

    /// Reads and discards everything; counts the bytes in `total`.
    pub fn sink(total: Arc<AtomicUsize>) -> TcpBackend {
        TcpBackend::start(move |mut stream| {
            let mut buf = [0u8; 64 * 1024];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total.fetch_add(n, Ordering::SeqCst);
            }
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections this backend has accepted (health checks included).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn echo_stream(mut stream: TcpStream, hello: Option<&str>) {
    if let Some(id) = hello {
        if stream.write_all(format!("{id}\n").as_bytes()).is_err() {
            return;
        }
    }
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop up so it sees the flag. If that connection cannot be made (a
        // fault test exhausted the ports), the thread is left behind rather than joined
        // forever.
        let woken = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(thread) = self.thread.take() {
            if woken {
                let _ = thread.join();
            }
        }
    }
}

/// Collects what a handler received, for assertions from the test thread.
#[derive(Clone, Default)]
pub struct Received(pub Arc<Mutex<Vec<Vec<u8>>>>);

impl Received {
    pub fn push(&self, data: Vec<u8>) {
        self.0.lock().unwrap().push(data);
    }

    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().clone()
    }
}
