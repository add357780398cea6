//! Nothing lost at a reset: bytes that reached legate before a peer reset or closed are
//! delivered to the other side before that side is reset or closed, and only then is the
//! reset passed on (as a reset). Three shapes of it, each on the splice path (plaintext both
//! sides), with TLS origination (plaintext client, TLS backend) and with TLS termination (TLS
//! client, plaintext backend), the last two on the buffered copy path:
//!
//! - a real redis-server answers a bad request with `-ERR Protocol error` and closes while
//!   the client is still writing: the client gets the error;
//! - a backend answers `413 too large` after the first KiB of a 32 MiB upload and closes
//!   without reading the rest (so its kernel sends a reset): the client gets the answer;
//! - a client sends a last request line and resets at once while the backend is streaming
//!   to it (right after connecting, or once the stream has started arriving): the backend
//!   gets the line. With TLS termination only the second: a client resetting right after
//!   its side of the handshake can beat legate's side of it.
//!
//! Each test runs the same trials directly against the backend (the control: if the control
//! loses bytes, the test's setup is wrong, not legate) and through legate, alternately, and
//! asserts that both delivered in every trial. A trial accepts every ending the contract
//! allows: a write error while the peer goes away, a reset or an EOF after the bytes.

mod common;

use common::fault::reset;
use common::tls::*;
use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Trials per test, through legate and (as many) directly. The losses are races, some rare
/// on a loaded machine (a few in a hundred): a hundred trials make a lucky pass unlikely.
const TRIALS: usize = 100;
/// A test starts no new trial after this long (a trial takes milliseconds unless something
/// waits for a timeout)...
const BUDGET: Duration = Duration::from_secs(30);
/// ... but fails if fewer than this many ran by then.
const MIN_TRIALS: usize = 30;
/// Every socket wait of a client, and how long a trial waits for the backend to hear it.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a backend connection may live at most.
const BACKEND_DEADLINE: Duration = Duration::from_secs(10);

/// Redis answers a negative bulk length with `-ERR Protocol error: invalid bulk length` and
/// closes the connection.
const BAD_REDIS_REQUEST: &[u8] = b"*1\r\n$-10\r\n";
const REDIS_ERROR: &[u8] = b"-ERR Protocol error";
/// The client writes the bad request and garbage in writes of this size (64 KiB writes keep
/// legate busy writing toward Redis when Redis closes: KiB writes let it idle in between)...
const GARBAGE_WRITE: usize = 64 * 1024;
/// ... up to this much in all, unless the connection fails first.
const GARBAGE_TOTAL: usize = 1024 * 1024;

/// The upload the early-reply backend does not wait for.
const UPLOAD_TOTAL: usize = 32 * 1024 * 1024;
/// What the early-reply backend reads before it answers and closes.
const UPLOAD_READ: usize = 1024;
const EARLY_REPLY: &[u8] = b"413 too large\n";

/// What the streaming backend sends each connection at most.
const STREAM_TOTAL: usize = 4 * 1024 * 1024;

const NO_CHECK: &str = r#"{ check = "none" }"#;

// ---------------------------------------------------------------------------------------------
// Trials: the same client, directly and through legate
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Direct,
    Legate,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Legate => "legate",
        }
    }
}

/// Runs `trial` [`TRIALS`] times directly and as many times through legate, alternately
/// (fewer if [`BUDGET`] runs out); a trial returns `Err(what happened)` when bytes were lost.
/// Asserts that the control delivered every time (else the setup is wrong), then that
/// legate did, then that at least [`MIN_TRIALS`] ran.
fn compare(case: &str, mut trial: impl FnMut(Via, usize) -> Result<(), String>) {
    let started = Instant::now();
    let mut direct_failures = Vec::new();
    let mut legate_failures = Vec::new();
    let mut trials = 0;
    while trials < TRIALS && started.elapsed() < BUDGET {
        let n = trials;
        if let Err(why) = trial(Via::Direct, n) {
            direct_failures.push(format!("trial {n}: {why}"));
        }
        if let Err(why) = trial(Via::Legate, n) {
            legate_failures.push(format!("trial {n}: {why}"));
        }
        trials += 1;
    }
    let direct = trials - direct_failures.len();
    let through = trials - legate_failures.len();
    eprintln!(
        "{case}: through legate {through}/{trials}, direct {direct}/{trials} ({:.1?})",
        started.elapsed()
    );
    for (via, failures) in [("direct", &direct_failures), ("legate", &legate_failures)] {
        for failure in failures.iter().take(3) {
            eprintln!("  {via} {failure}");
        }
    }
    assert!(
        direct_failures.is_empty(),
        "{case}: the direct control (no legate) lost the bytes in {} of {trials} trials, so \
         the test's setup is wrong, not legate; first: {}",
        direct_failures.len(),
        direct_failures[0]
    );
    assert!(
        legate_failures.is_empty(),
        "{case}: through legate the bytes were lost in {} of {trials} trials (directly: \
         delivered in all {trials}); first: {}",
        legate_failures.len(),
        legate_failures[0]
    );
    assert!(
        trials >= MIN_TRIALS,
        "{case}: only {trials} trials ran within {BUDGET:?}"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A short, printable view of received bytes.
fn shown(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(&data[..data.len().min(60)]).into_owned();
    format!("{} bytes {text:?}", data.len())
}

// ---------------------------------------------------------------------------------------------
// Clients: plaintext or TLS (rustls driven by hand, so reading never writes)
// ---------------------------------------------------------------------------------------------

/// Where a client connects, and whether it speaks TLS there.
#[derive(Clone)]
struct Route {
    addr: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
}

impl Route {
    fn plain(addr: SocketAddr) -> Route {
        Route { addr, tls: None }
    }

    fn tls(addr: SocketAddr, config: &Arc<ClientConfig>) -> Route {
        Route {
            addr,
            tls: Some(config.clone()),
        }
    }
}

struct Client {
    tcp: TcpStream,
    tls: Option<ClientConnection>,
}

impl Client {
    /// Connects (and completes the TLS handshake on a TLS route).
    fn connect(route: &Route) -> Result<Client, String> {
        let mut tcp = TcpStream::connect_timeout(&route.addr, IO_TIMEOUT)
            .map_err(|e| format!("connect to {}: {e}", route.addr))?;
        tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        // What the client writes leaves at once: Nagle would hold a small write back behind an
        // unacknowledged one (the TLS Finished, say), and the reset would discard it unsent.
        tcp.set_nodelay(true).unwrap();
        let tls = match &route.tls {
            None => None,
            Some(config) => {
                let name = ServerName::try_from(SERVER_NAME).unwrap();
                let mut conn = ClientConnection::new(config.clone(), name).unwrap();
                while conn.is_handshaking() {
                    conn.complete_io(&mut tcp)
                        .map_err(|e| format!("TLS handshake with {}: {e}", route.addr))?;
                }
                Some(conn)
            }
        };
        Ok(Client { tcp, tls })
    }

    /// Sends `data` to the socket; an error means the peer is gone (or stopped reading for
    /// [`IO_TIMEOUT`]).
    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        let Some(conn) = self.tls.as_mut() else {
            return self.tcp.write_all(data);
        };
        for piece in data.chunks(16 * 1024) {
            conn.writer().write_all(piece)?;
            while conn.wants_write() {
                conn.write_tls(&mut self.tcp)?;
            }
        }
        Ok(())
    }

    /// Reads (never writes) until the stream ends, fails, or is silent for [`IO_TIMEOUT`];
    /// returns what arrived and how it ended.
    fn receive(&mut self) -> (Vec<u8>, String) {
        let Some(conn) = self.tls.as_mut() else {
            let (data, error) = read_to_end(&mut self.tcp);
            return (data, error.map_or_else(|| "EOF".into(), |e| e.to_string()));
        };
        let mut data = Vec::new();
        loop {
            if let Some(end) = drain_plaintext(conn, &mut data) {
                return (data, end);
            }
            match conn.read_tls(&mut self.tcp) {
                Ok(0) => {
                    let _ = conn.process_new_packets();
                    let end = drain_plaintext(conn, &mut data);
                    return (data, end.unwrap_or_else(|| "TCP EOF".into()));
                }
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        drain_plaintext(conn, &mut data);
                        return (data, format!("TLS error: {e}"));
                    }
                }
                Err(e) => return (data, e.to_string()),
            }
        }
    }

    /// Waits for the first bytes from the server (and discards them).
    fn receive_some(&mut self) -> Result<(), String> {
        let mut buf = [0u8; 16 * 1024];
        let Some(conn) = self.tls.as_mut() else {
            return match self.tcp.read(&mut buf) {
                Ok(0) => Err("EOF".into()),
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            };
        };
        let mut data = Vec::new();
        loop {
            let end = drain_plaintext(conn, &mut data);
            if !data.is_empty() {
                return Ok(());
            }
            if let Some(end) = end {
                return Err(end);
            }
            match conn.read_tls(&mut self.tcp) {
                Ok(0) => return Err("TCP EOF".into()),
                Ok(_) => conn
                    .process_new_packets()
                    .map(|_| ())
                    .map_err(|e| format!("TLS error: {e}"))?,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Aborts the connection: `SO_LINGER` 0 on the TCP socket, so the peer gets an RST.
    fn reset(self) {
        reset(self.tcp);
    }
}

/// Moves what rustls has decrypted into `data`; `Some(how)` once the stream has ended.
fn drain_plaintext<D>(conn: &mut ConnectionCommon<D>, data: &mut Vec<u8>) -> Option<String> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.reader().read(&mut buf) {
            Ok(0) => return Some("close_notify".into()),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => return Some(e.to_string()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TLS material and servers
// ---------------------------------------------------------------------------------------------

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client trusting the CA of `files` (the server name is [`SERVER_NAME`]).
fn client_config(files: &ServerFiles) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&files.ca_path).unwrap())
        .unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// A server with the certificate of `files`. It sends no session tickets: a ticket written
/// after the handshake would fail against a client that already reset, and the direct
/// control must not lose a request to that.
fn server_config(files: &ServerFiles) -> Arc<ServerConfig> {
    let certs = CertificateDer::pem_file_iter(&files.cert_path)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&files.key_path).unwrap();
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// The server side of a TLS handshake on an accepted socket; `None` if it fails (a peer that
/// connects and goes away).
fn tls_accept(
    mut tcp: TcpStream,
    config: &Arc<ServerConfig>,
) -> Option<(ServerConnection, TcpStream)> {
    tcp.set_read_timeout(Some(IO_TIMEOUT)).ok()?;
    tcp.set_write_timeout(Some(IO_TIMEOUT)).ok()?;
    let mut conn = ServerConnection::new(config.clone()).ok()?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).ok()?;
    }
    Some((conn, tcp))
}

// ---------------------------------------------------------------------------------------------
// The three paths: where legate listens, where the backend listens, who speaks TLS
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Plaintext on both sides: splice.
    Plain,
    /// Plaintext client, TLS to the backend (`tls = ...`).
    Origination,
    /// TLS client (`tls_server = ...`), plaintext backend.
    Termination,
}

/// Certificates for the TLS paths, and the configs made from them.
struct Tls {
    files: ServerFiles,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

impl Tls {
    fn new() -> Tls {
        let files = ServerFiles::new((-1, 365));
        let client = client_config(&files);
        let server = server_config(&files);
        Tls {
            files,
            client,
            server,
        }
    }
}

/// legate in front of `backend` on `path`, ready; returns it with the route through it and
/// the route straight to the backend (the control).
fn legate_on(path: Path, backend: SocketAddr, tls: &Tls) -> (Legate, Route, Route) {
    let mut listener = Listener::new("x").upstream(backend).set("health", NO_CHECK);
    match path {
        Path::Plain => {}
        Path::Origination => listener = listener.set("tls", &origination(&tls.files.ca_path)),
        Path::Termination => {
            listener = listener.set(
                "tls_server",
                &termination(&tls.files.cert_path, &tls.files.key_path),
            )
        }
    }
    let mut legate = Legate::builder().listener(listener).start();
    legate.wait_ready(Duration::from_secs(15));
    let addr = legate.addr("x");
    let (through, direct) = match path {
        Path::Plain => (Route::plain(addr), Route::plain(backend)),
        Path::Origination => (Route::plain(addr), Route::tls(backend, &tls.client)),
        Path::Termination => (Route::tls(addr, &tls.client), Route::plain(backend)),
    };
    (legate, through, direct)
}

fn backend_tls(path: Path, tls: &Tls) -> Option<Arc<ServerConfig>> {
    (path == Path::Origination).then(|| tls.server.clone())
}

// ---------------------------------------------------------------------------------------------
// Case 1: Redis answers a protocol error and closes while the client is still writing
// ---------------------------------------------------------------------------------------------

fn redis_protocol_error_trial(route: &Route) -> Result<(), String> {
    let mut client = Client::connect(route)?;
    // The bad request and the first garbage in one write: Redis reads 16 KiB at a time, so
    // it closes with bytes unread (its kernel answers them with a reset) while the client
    // is still writing.
    let mut first = BAD_REDIS_REQUEST.to_vec();
    first.resize(GARBAGE_WRITE, b'x');
    let garbage = vec![b'x'; GARBAGE_WRITE];
    let mut sent = 0;
    let mut write_end = "wrote it all".to_string();
    let mut next: &[u8] = &first;
    while sent < GARBAGE_TOTAL {
        // A write error is an allowed ending: Redis may be gone already.
        match client.send(next) {
            Ok(()) => sent += next.len(),
            Err(e) => {
                write_end = e.to_string();
                break;
            }
        }
        next = &garbage;
    }
    let (got, end) = client.receive();
    if contains(&got, REDIS_ERROR) {
        Ok(())
    } else {
        Err(format!(
            "no `-ERR Protocol error`: wrote {sent} bytes ({write_end}), then read {} ({end})",
            shown(&got)
        ))
    }
}

fn redis_protocol_error_case(case: &str, path: Path) {
    let tls = Tls::new();
    // Keep the server alive for the whole test.
    let (_plain, _tls_redis, backend) = match path {
        Path::Origination => {
            let redis = TlsRedis::start(
                tls.files.dir.path(),
                &tls.files.cert_path,
                &tls.files.key_path,
                &tls.files.ca_path,
                false,
            );
            let addr = local(redis.port);
            (None, Some(redis), addr)
        }
        _ => {
            let redis = RedisServer::start();
            let addr = redis.addr();
            (Some(redis), None, addr)
        }
    };
    let (_legate, through, direct) = legate_on(path, backend, &tls);
    compare(case, |via, _| {
        redis_protocol_error_trial(if via == Via::Legate {
            &through
        } else {
            &direct
        })
    });
}

#[test]
fn redis_protocol_error_reply_reaches_a_client_still_writing() {
    redis_protocol_error_case(
        "redis_protocol_error_reply_reaches_a_client_still_writing",
        Path::Plain,
    );
}

#[test]
fn tls_origination_redis_protocol_error_reply_reaches_a_client_still_writing() {
    redis_protocol_error_case(
        "tls_origination_redis_protocol_error_reply_reaches_a_client_still_writing",
        Path::Origination,
    );
}

#[test]
fn tls_termination_redis_protocol_error_reply_reaches_a_client_still_writing() {
    redis_protocol_error_case(
        "tls_termination_redis_protocol_error_reply_reaches_a_client_still_writing",
        Path::Termination,
    );
}

// ---------------------------------------------------------------------------------------------
// Case 2: an early reply, then a close with the upload unread (the kernel sends a reset)
// ---------------------------------------------------------------------------------------------

/// Reads [`UPLOAD_READ`] bytes, answers [`EARLY_REPLY`] and drops the stream with the rest
/// of the upload unread. A connection that sends less (and closes) gets nothing.
fn early_reply(mut stream: impl Read + Write) {
    let mut first = [0u8; UPLOAD_READ];
    if stream.read_exact(&mut first).is_err() {
        return;
    }
    let _ = stream.write_all(EARLY_REPLY);
    let _ = stream.flush();
}

fn early_reply_backend(tls: Option<Arc<ServerConfig>>) -> TcpBackend {
    TcpBackend::start(move |tcp| match &tls {
        None => {
            let _ = tcp.set_read_timeout(Some(BACKEND_DEADLINE));
            let _ = tcp.set_write_timeout(Some(BACKEND_DEADLINE));
            early_reply(tcp);
        }
        Some(config) => {
            if let Some((conn, tcp)) = tls_accept(tcp, config) {
                early_reply(rustls::StreamOwned::new(conn, tcp));
            }
        }
    })
}

fn early_reply_trial(route: &Route) -> Result<(), String> {
    let mut client = Client::connect(route)?;
    let chunk = vec![b'u'; 64 * 1024];
    let mut sent = 0;
    let mut write_end = "wrote it all".to_string();
    while sent < UPLOAD_TOTAL {
        match client.send(&chunk) {
            Ok(()) => sent += chunk.len(),
            Err(e) => {
                write_end = e.to_string();
                break;
            }
        }
    }
    let (got, end) = client.receive();
    if contains(&got, EARLY_REPLY) {
        Ok(())
    } else {
        Err(format!(
            "no `413 too large`: uploaded {sent} bytes ({write_end}), then read {} ({end})",
            shown(&got)
        ))
    }
}

fn early_reply_case(case: &str, path: Path) {
    let tls = Tls::new();
    let backend = early_reply_backend(backend_tls(path, &tls));
    let (_legate, through, direct) = legate_on(path, backend.addr(), &tls);
    compare(case, |via, _| {
        early_reply_trial(if via == Via::Legate {
            &through
        } else {
            &direct
        })
    });
}

#[test]
fn early_reply_during_a_large_upload_reaches_the_client() {
    early_reply_case(
        "early_reply_during_a_large_upload_reaches_the_client",
        Path::Plain,
    );
}

#[test]
fn tls_origination_early_reply_during_a_large_upload_reaches_the_client() {
    early_reply_case(
        "tls_origination_early_reply_during_a_large_upload_reaches_the_client",
        Path::Origination,
    );
}

#[test]
fn tls_termination_early_reply_during_a_large_upload_reaches_the_client() {
    early_reply_case(
        "tls_termination_early_reply_during_a_large_upload_reaches_the_client",
        Path::Termination,
    );
}

// ---------------------------------------------------------------------------------------------
// Case 3: a client's last request, then its reset, while the backend streams to it
// ---------------------------------------------------------------------------------------------

/// One backend connection as the backend saw it.
#[derive(Default)]
struct Heard {
    data: Vec<u8>,
    ended: bool,
}

/// What every connection of the streaming backend read, in accept order.
#[derive(Clone, Default)]
struct Hearing(Arc<Mutex<Vec<Heard>>>);

impl Hearing {
    fn open(&self) -> usize {
        let mut all = self.0.lock().unwrap();
        all.push(Heard::default());
        all.len() - 1
    }

    fn append(&self, conn: usize, data: &[u8]) {
        self.0.lock().unwrap()[conn].data.extend_from_slice(data);
    }

    fn end(&self, conn: usize) {
        self.0.lock().unwrap()[conn].ended = true;
    }

    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Among the connections accepted from `first` on: `Ok` once one read `needle`,
    /// `Err(what they read)` once there is one and all have ended without it, else `None`.
    fn verdict(&self, first: usize, needle: &[u8]) -> Option<Result<(), String>> {
        let all = self.0.lock().unwrap();
        let since = &all[first.min(all.len())..];
        if since.iter().any(|c| contains(&c.data, needle)) {
            return Some(Ok(()));
        }
        if !since.is_empty() && since.iter().all(|c| c.ended) {
            let read: Vec<String> = since.iter().map(|c| shown(&c.data)).collect();
            return Some(Err(format!(
                "the backend's connection ended having read {}",
                read.join(", ")
            )));
        }
        None
    }
}

/// Streams up to [`STREAM_TOTAL`] bytes to the peer (a thread) while recording what it reads,
/// until EOF or an error.
fn stream_and_record_plain(mut tcp: TcpStream, hearing: &Hearing, conn: usize) {
    let _ = tcp.set_read_timeout(Some(BACKEND_DEADLINE));
    if let Ok(mut writer) = tcp.try_clone() {
        let _ = writer.set_write_timeout(Some(BACKEND_DEADLINE));
        thread::spawn(move || {
            let chunk = vec![b's'; 64 * 1024];
            for _ in 0..STREAM_TOTAL / chunk.len() {
                if writer.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
    }
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hearing.append(conn, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
}

/// [`stream_and_record_plain`] inside TLS: one non-blocking loop (a rustls connection is not
/// split between threads), reading whenever there is something to read.
fn stream_and_record_tls(
    mut conn: ServerConnection,
    mut tcp: TcpStream,
    hearing: &Hearing,
    id: usize,
) {
    if tcp.set_nonblocking(true).is_err() {
        return;
    }
    let chunk = vec![b's'; 16 * 1024];
    let mut sent = 0;
    let mut writing = true;
    let deadline = Instant::now() + BACKEND_DEADLINE;
    let mut data = Vec::new();
    while Instant::now() < deadline {
        let ended = drain_plaintext(&mut conn, &mut data).is_some();
        hearing.append(id, &data);
        data.clear();
        if ended {
            return;
        }
        let mut idle = true;
        match conn.read_tls(&mut tcp) {
            Ok(0) => {
                let _ = conn.process_new_packets();
                drain_plaintext(&mut conn, &mut data);
                hearing.append(id, &data);
                return;
            }
            Ok(_) => {
                idle = false;
                if conn.process_new_packets().is_err() {
                    drain_plaintext(&mut conn, &mut data);
                    hearing.append(id, &data);
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            // Everything before the error was read (and drained) already.
            Err(_) => return,
        }
        if writing {
            if !conn.wants_write() && sent < STREAM_TOTAL {
                match conn.writer().write_all(&chunk) {
                    Ok(()) => sent += chunk.len(),
                    Err(_) => writing = false,
                }
            }
            if conn.wants_write() {
                match conn.write_tls(&mut tcp) {
                    Ok(_) => idle = false,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => writing = false,
                }
            } else if sent >= STREAM_TOTAL {
                writing = false;
            }
        }
        if idle {
            let mut events = libc::POLLIN;
            if writing {
                events |= libc::POLLOUT;
            }
            let mut fd = libc::pollfd {
                fd: tcp.as_raw_fd(),
                events,
                revents: 0,
            };
            // SAFETY: one valid pollfd for a descriptor this function owns.
            unsafe { libc::poll(&mut fd, 1, 10) };
        }
    }
}

fn streaming_backend(tls: Option<Arc<ServerConfig>>, hearing: Hearing) -> TcpBackend {
    TcpBackend::start(move |tcp| {
        let id = hearing.open();
        match &tls {
            None => stream_and_record_plain(tcp, &hearing, id),
            Some(config) => {
                if let Some((conn, tcp)) = tls_accept(tcp, config) {
                    stream_and_record_tls(conn, tcp, &hearing, id);
                }
            }
        }
        hearing.end(id);
    })
}

/// When the client sends its last request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum When {
    /// Right after connecting (and the TLS handshake, if any).
    Connected,
    /// Once the backend's stream has started arriving: the connection is set up end to end
    /// and legate is busy moving the stream toward the client.
    MidStream,
}

/// Connects, (waits for the first streamed bytes on [`When::MidStream`]), sends `needle`
/// and resets at once, never reading more; then waits (bounded) for the backend to have
/// read `needle`.
fn last_request_trial(
    route: &Route,
    hearing: &Hearing,
    needle: &str,
    when: When,
) -> Result<(), String> {
    let first = hearing.len();
    let mut client = Client::connect(route)?;
    if when == When::MidStream {
        client
            .receive_some()
            .map_err(|e| format!("waiting for the backend's first bytes: {e}"))?;
    }
    client
        .send(needle.as_bytes())
        .map_err(|e| format!("sending {needle:?}: {e}"))?;
    client.reset();
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match hearing.verdict(first, needle.as_bytes()) {
            Some(Ok(())) => return Ok(()),
            Some(Err(why)) => return Err(format!("{needle:?} not received: {why}")),
            None if Instant::now() >= deadline => {
                return Err(format!(
                    "{needle:?} not received within {IO_TIMEOUT:?} (the backend's connection \
                     had not ended either)"
                ))
            }
            None => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn last_request_case(case: &str, path: Path, when: When) {
    let tls = Tls::new();
    let hearing = Hearing::default();
    let backend = streaming_backend(backend_tls(path, &tls), hearing.clone());
    let (_legate, through, direct) = legate_on(path, backend.addr(), &tls);
    compare(case, |via, n| {
        let route = if via == Via::Legate {
            &through
        } else {
            &direct
        };
        let needle = format!("LAST {}-{n}\n", via.label());
        last_request_trial(route, &hearing, &needle, when)
    });
}

#[test]
fn a_clients_last_request_reaches_the_server_before_its_reset() {
    last_request_case(
        "a_clients_last_request_reaches_the_server_before_its_reset",
        Path::Plain,
        When::Connected,
    );
}

#[test]
fn a_clients_last_request_mid_stream_reaches_the_server_before_its_reset() {
    last_request_case(
        "a_clients_last_request_mid_stream_reaches_the_server_before_its_reset",
        Path::Plain,
        When::MidStream,
    );
}

#[test]
fn tls_origination_a_clients_last_request_reaches_the_server_before_its_reset() {
    last_request_case(
        "tls_origination_a_clients_last_request_reaches_the_server_before_its_reset",
        Path::Origination,
        When::Connected,
    );
}

#[test]
fn tls_origination_a_clients_last_request_mid_stream_reaches_the_server_before_its_reset() {
    last_request_case(
        "tls_origination_a_clients_last_request_mid_stream_reaches_the_server_before_its_reset",
        Path::Origination,
        When::MidStream,
    );
}

/// Only mid-stream: a client that resets right after its side of the handshake may reset
/// before legate's side is done (its session tickets are still to be written), and that
/// is not what these tests are about.
#[test]
fn tls_termination_a_clients_last_request_mid_stream_reaches_the_server_before_its_reset() {
    last_request_case(
        "tls_termination_a_clients_last_request_mid_stream_reaches_the_server_before_its_reset",
        Path::Termination,
        When::MidStream,
    );
}
