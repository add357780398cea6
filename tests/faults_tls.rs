//! Fault suite, TLS: garbage on a TLS port, handshake floods, bad and legacy certificates
//! and versions, truncated streams, certificate rotation (README.md's "Fault coverage" table
//! lists them): black-box tests against the real binary, each ending with the shared checker
//! (`common::fault::Probe::finish`). An upstream certificate from the wrong CA, expired or
//! for the wrong name is covered by tests/tls.rs
//! (`bad_upstream_certificates_fail_are_counted_and_nothing_goes_in_plaintext`); the test
//! here adds `not_yet_valid` and IP endpoints.

mod common;

use common::fault::{assert_same, delta, reset, Expect, Probe};
use common::tls::*;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const HANDSHAKE_ERRORS: &str = "legate_tls_handshake_errors_total";

/// legate is ready after the first check (a TLS handshake, or none) of a server that is up:
/// milliseconds; 10 s is a loaded 2-core machine's slack.
const READY: Duration = Duration::from_secs(10);

/// legate's handshake timeout (src/tls/mod.rs `HANDSHAKE_TIMEOUT`): a client that has not
/// finished its handshake by then is closed.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound on a TLS material reload (good or refused): the watcher's debounce (50 ms, at
/// most 500 ms), or its 2 s backstop poll (src/lifecycle/tls_reload.rs) should the event
/// be missed; 6 s is that plus a loaded machine's slack.
const RELOAD: Duration = Duration::from_secs(6);

/// `openssl s_client` with extra flags; whether a TLS session was established.
fn s_client(addr: SocketAddr, ca: &Path, flags: &str) -> (bool, String) {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!(
        "openssl s_client -connect {addr} -servername redis.test -CAfile {} {flags} </dev/null 2>&1",
        ca.display()
    ));
    // One handshake, milliseconds; 15 s is a loaded machine's slack.
    let output = run_with_timeout(cmd, Duration::from_secs(15));
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let ok = output.status.success() && text.contains("Verify return code: 0");
    (ok, text)
}

/// A TLS-terminating listener in front of a plaintext Redis.
struct Terminating {
    files: ServerFiles,
    _redis: RedisServer,
    legate: Legate,
}

fn terminating(extra: &str) -> Terminating {
    let files = ServerFiles::new((-1, 365));
    let redis = RedisServer::start();
    let server = format!(
        "{{ cert = {}, key = {}{extra} }}",
        toml_path(&files.cert_path),
        toml_path(&files.key_path)
    );
    let mut legate = Legate::builder()
        .listener(
            Listener::new("tls")
                .upstream(redis.addr())
                .set("tls_server", &server),
        )
        .start();
    legate.wait_ready(READY);
    let (ok, out) = redis_cli_tls(legate.addr("tls"), &files.ca_path, None);
    assert!(ok, "warm-up TLS client failed: {out}");
    Terminating {
        files,
        _redis: redis,
        legate,
    }
}

/// 1 MB of random bytes, and plaintext RESP, on a TLS port: closed at once, counted
/// as `bad_record`, no memory growth by the megabyte (rustls bounds a record), no panic.
#[test]
fn garbage_and_plaintext_on_a_tls_port() {
    let mut t = terminating("");
    let addr = t.legate.addr("tls");
    let probe = Probe::start(&t.legate);
    for round in 0..3 {
        let mut garbage = connect(addr);
        let noise = payload(1 << 20, 17 + round);
        // The write may fail part-way: legate closes as soon as the first record is bad.
        let _ = garbage.write_all(&noise);
        // Closed at once; at worst by the handshake timeout: 5 s + 1 s of slack.
        assert!(closed_within(&mut garbage, Duration::from_secs(6)));
    }
    let mut plain = connect(addr);
    plain.write_all(b"PING\r\n").unwrap();
    // As above: the handshake timeout (5 s) at worst, plus 2 s of slack.
    assert!(closed_within(&mut plain, Duration::from_secs(7)));
    let (ok, out) = redis_cli_tls(addr, &t.files.ca_path, None);
    assert!(ok, "{out}");
    probe.finish(
        &mut t.legate,
        Expect {
            moved: &[(
                HANDSHAKE_ERRORS,
                &[("side", "client"), ("reason", "bad_record")],
            )],
            rss_slack_kib: 1024 + 512,
            ..Expect::default()
        },
    );
}

/// A handshake flood — 40 silent sockets, 20 garbage senders, a ClientHello header
/// dripped a byte a second — is reaped by the 5 s handshake timeout
/// (`reason="timeout"`), while a real TLS client is served meanwhile.
#[test]
fn handshake_flood_is_reaped_by_the_handshake_timeout() {
    let mut t = terminating("");
    let addr = t.legate.addr("tls");
    let probe = Probe::start(&t.legate);
    let silent: Vec<TcpStream> = (0..40).map(|_| connect(addr)).collect();
    let mut garbage: Vec<TcpStream> = (0..20)
        .map(|i| {
            let mut s = connect(addr);
            let _ = s.write_all(&payload(4096, 100 + i));
            s
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let dripper = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut s = connect(addr);
            // A handshake record header announcing 512 bytes, then a byte a second.
            for byte in [
                0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ] {
                if stop.load(Ordering::SeqCst) || s.write_all(&[byte]).is_err() {
                    break;
                }
                // A byte a second: 11 bytes would take 11 s, past the handshake timeout.
                thread::sleep(Duration::from_secs(1));
            }
            // Closed at the handshake timeout (5 s after connect); 10 s more is slack.
            closed_within(&mut s, Duration::from_secs(10))
        })
    };
    // A legitimate client is unaffected while all that is pending.
    let (ok, out) = redis_cli_tls(addr, &t.files.ca_path, None);
    assert!(ok, "a real client failed during the flood: {out}");
    // Garbage is refused at once, by the handshake timeout at worst: 5 s + 2 s of slack.
    for s in &mut garbage {
        assert!(closed_within(s, Duration::from_secs(7)));
    }
    // The silent sockets, opened before all this, go at the handshake timeout: 12 s from
    // here is HANDSHAKE_TIMEOUT plus 7 s of slack, shared by all of them.
    let started = Instant::now();
    for mut s in silent {
        let left = (HANDSHAKE_TIMEOUT + Duration::from_secs(7)).saturating_sub(started.elapsed());
        assert!(
            closed_within(&mut s, left.max(Duration::from_millis(100))),
            "a silent socket outlived the handshake timeout"
        );
    }
    assert!(
        dripper.join().unwrap(),
        "the dripping client was not reaped"
    );
    stop.store(true, Ordering::SeqCst);
    let after = t.legate.metrics();
    let timeouts = delta(
        &probe.before,
        &after,
        HANDSHAKE_ERRORS,
        &[("side", "client"), ("reason", "timeout")],
    );
    assert!(timeouts >= 41.0, "{timeouts} handshake timeouts");
    probe.finish(
        &mut t.legate,
        Expect {
            moved: &[(
                HANDSHAKE_ERRORS,
                &[("side", "client"), ("reason", "timeout")],
            )],
            ..Expect::default()
        },
    );
}

/// A not-yet-valid certificate fails with `not_yet_valid`; an IP endpoint whose
/// certificate has no IP SAN fails with `name_mismatch`, and the `sni` override makes the
/// same endpoint work.
#[test]
fn not_yet_valid_and_ip_endpoints() {
    // srv.pem is valid now (the IP endpoints' server); future.pem only in 30 days.
    let files = ServerFiles::new((-1, 365));
    let ca_path = &files.ca_path;
    let (future, future_key) = files.ca.leaf("redis.test", &["redis.test"], (30, 365));
    let future = TlsRedis::start(
        files.dir.path(),
        &files.write("future.pem", &future),
        &files.write("future.key", &future_key),
        ca_path,
        false,
    );
    let named = TlsRedis::start(
        files.dir.path(),
        &files.cert_path,
        &files.key_path,
        ca_path,
        false,
    );
    let none = r#"{ check = "none" }"#;
    let mut legate = Legate::builder()
        .listener(
            Listener::new("future")
                .upstream(local(future.port))
                .set("health", none)
                .set("required", "false")
                .set("tls", &origination(ca_path)),
        )
        .listener(
            Listener::new("ip")
                .upstream(local(named.port))
                .set("health", none)
                .set("required", "false")
                .set("tls", &format!(r#"{{ ca = {} }}"#, toml_path(ca_path))),
        )
        .listener(
            Listener::new("ip_sni")
                .upstream(local(named.port))
                .set("health", none)
                .set("tls", &origination(ca_path)),
        )
        .start();
    legate.wait_ready(READY);
    let probe = Probe::start(&legate);
    for name in ["future", "ip"] {
        // legate resets a client whose upstream handshake failed, and on a loaded machine
        // that reset can come before connect() has returned or before the write (as
        // `turned_away` allows): nothing went through either way. (5 s: a loopback connect;
        // 10 s: the reset follows the failed handshake within milliseconds.)
        let mut s = match TcpStream::connect_timeout(&legate.addr(name), Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => continue,
            Err(e) => panic!("connect to {name}: {e}"),
        };
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(b"PING\r\n");
        let (data, _) = read_to_end(&mut s);
        assert!(
            data.is_empty(),
            "{name}: got {data:?} through a failed handshake"
        );
    }
    let mut con = redis_connect(legate.addr("ip_sni")).unwrap();
    let pong: String = redis::cmd("PING").query(&mut con).unwrap();
    assert_eq!(pong, "PONG");
    drop(con);
    let log = legate.log();
    assert!(
        log.contains(&format!("127.0.0.1:{}", future.port)),
        "the log names the endpoint"
    );
    drop((future.proc, named.proc));
    probe.finish(
        &mut legate,
        Expect {
            moved: &[
                (
                    HANDSHAKE_ERRORS,
                    &[
                        ("listener", "future"),
                        ("side", "upstream"),
                        ("reason", "not_yet_valid"),
                    ],
                ),
                (
                    HANDSHAKE_ERRORS,
                    &[
                        ("listener", "ip"),
                        ("side", "upstream"),
                        ("reason", "name_mismatch"),
                    ],
                ),
                (
                    "legate_upstream_connect_errors_total",
                    &[("listener", "ip"), ("reason", "tls")],
                ),
            ],
            ..Expect::default()
        },
    );
}

/// `openssl s_server` on a free port with `flags`; its stdin is ours, to send data.
struct SServer {
    port: u16,
    proc: Proc,
}

impl SServer {
    fn start(cert: &Path, key: &Path, flags: &str) -> SServer {
        require_bin("openssl", "openssl");
        let port = free_port();
        let child = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "exec openssl s_server -accept 127.0.0.1:{port} -cert {} -key {} -quiet {flags}",
                cert.display(),
                key.display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl s_server");
        // openssl starts listening within a fraction of a second; 10 s is slack.
        wait_listening(port, Duration::from_secs(10), "openssl s_server");
        SServer {
            port,
            proc: Proc {
                name: "openssl s_server".into(),
                child,
            },
        }
    }
}

/// Legacy TLS is refused both ways (rustls has nothing below 1.2): a TLS 1.1
/// client against our listener, our origination against a TLS 1.1 server; and the
/// TLS-1.3-only option (`min_version = "1.3"`) refuses a TLS 1.2 client.
#[test]
fn legacy_tls_is_refused_both_ways() {
    let mut t = terminating("");
    let legacy = "-cipher DEFAULT@SECLEVEL=0";
    let (cert, key) = (&t.files.cert_path, &t.files.key_path);
    let old_server = SServer::start(cert, key, &format!("-tls1_1 {legacy}"));
    // A second legate: 1.3-only termination, and origination to the TLS 1.1 server.
    let mut second = Legate::builder()
        .listener(Listener::new("only13").upstream(t._redis.addr()).set(
            "tls_server",
            &format!(
                r#"{{ cert = {}, key = {}, min_version = "1.3" }}"#,
                toml_path(cert),
                toml_path(key)
            ),
        ))
        .listener(
            Listener::new("to_old")
                .upstream(local(old_server.port))
                .set("health", r#"{ check = "none" }"#)
                .set("required", "false")
                .set("tls", &origination(&t.files.ca_path)),
        )
        .start();
    second.wait_ready(READY);
    let probe = Probe::start(&t.legate);
    let probe2 = Probe::start(&second);

    let addr = t.legate.addr("tls");
    let (ok, out) = s_client(addr, &t.files.ca_path, &format!("-tls1_1 {legacy}"));
    assert!(!ok, "a TLS 1.1 client got a session:\n{out}");
    let (ok, out) = s_client(addr, &t.files.ca_path, "-tls1_2");
    assert!(ok, "TLS 1.2 must work by default:\n{out}");
    let only13 = second.addr("only13");
    let (ok, out) = s_client(only13, &t.files.ca_path, "-tls1_2");
    assert!(
        !ok,
        "a TLS 1.2 client got a session with min_version 1.3:\n{out}"
    );
    let (ok, out) = s_client(only13, &t.files.ca_path, "-tls1_3");
    assert!(ok, "TLS 1.3 must work:\n{out}");

    let mut s = connect(second.addr("to_old"));
    s.write_all(b"PING\r\n").unwrap();
    let (data, _) = read_to_end(&mut s);
    assert!(data.is_empty(), "data through a TLS 1.1 upstream: {data:?}");
    drop(old_server.proc);

    probe.finish(
        &mut t.legate,
        Expect {
            moved: &[(HANDSHAKE_ERRORS, &[("listener", "tls"), ("side", "client")])],
            ..Expect::default()
        },
    );
    probe2.finish(
        &mut second,
        Expect {
            moved: &[
                (
                    HANDSHAKE_ERRORS,
                    &[("listener", "only13"), ("side", "client")],
                ),
                (
                    HANDSHAKE_ERRORS,
                    &[("listener", "to_old"), ("side", "upstream")],
                ),
            ],
            ..Expect::default()
        },
    );
}

/// The TLS upstream is SIGKILLed mid-response (no close_notify): rustls reports an
/// unexpected EOF, and legate aborts the client connection (RST, an error on the client,
/// never a clean EOF), counted as `legate_resets_total{from="upstream"}`.
#[test]
fn truncated_tls_stream_is_passed_on_as_a_reset() {
    let files = ServerFiles::new((-1, 365));
    let ca_path = &files.ca_path;
    let mut server = SServer::start(&files.cert_path, &files.key_path, "");
    let mut legate = Legate::builder()
        .listener(
            Listener::new("tls")
                .upstream(local(server.port))
                .set("health", r#"{ check = "none" }"#)
                .set("required", "false")
                .set("tls", &origination(ca_path)),
        )
        .start();
    legate.wait_ready(READY);
    let probe = Probe::start(&legate);
    let mut client = connect(legate.addr("tls"));
    client.write_all(b"hello\n").unwrap();
    // s_server prints what it receives: once "hello" is there, the session is up.
    let mut stdout = server.proc.child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !seen.ends_with(b"hello\n") {
        assert_eq!(stdout.read(&mut byte).unwrap(), 1, "s_server closed");
        seen.push(byte[0]);
    }
    let body: Vec<u8> = (0..2000)
        .flat_map(|i| format!("line {i:06} of a response that will be cut\n").into_bytes())
        .collect();
    let mut stdin = server.proc.child.stdin.take().unwrap();
    stdin.write_all(&body).unwrap();
    stdin.flush().unwrap();
    // Read part of it, then kill the server: no close_notify is ever sent.
    let mut first = vec![0u8; 1000];
    client.read_exact(&mut first).unwrap();
    server.proc.signal(libc::SIGKILL);
    let (rest, error) = read_to_end(&mut client);
    let mut got = first;
    got.extend_from_slice(&rest);
    assert!(
        error.is_some(),
        "a TLS stream cut without close_notify reached the client as a clean EOF ({} bytes)",
        got.len()
    );
    assert_same(
        "prefix before the cut",
        &body[..got.len().min(body.len())],
        &got,
    );
    drop(client);
    drop(stdin);
    let log = legate.log();
    assert!(!log.contains("BEGIN"), "PEM material in the log");
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                "legate_resets_total",
                &[("listener", "tls"), ("from", "upstream")],
            )],
            ..Expect::default()
        },
    );
}

/// Pumps: `threads` clients doing SET/GET of random values through `addr` until stopped;
/// returns (operations, errors).
fn pumps(
    addr: SocketAddr,
    threads: usize,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<(usize, Vec<String>)> {
    thread::spawn(move || {
        let ops = Arc::new(AtomicUsize::new(0));
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (stop, ops) = (stop.clone(), ops.clone());
                thread::spawn(move || {
                    let mut errors = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let value = payload(4096, t as u64 * 1_000_000 + i);
                        let key = format!("pump{t}");
                        let result = (|| -> redis::RedisResult<Vec<u8>> {
                            let mut con = redis_connect(addr)?;
                            redis::cmd("SET")
                                .arg(&key)
                                .arg(&value)
                                .query::<()>(&mut con)?;
                            redis::cmd("GET").arg(&key).query(&mut con)
                        })();
                        match result {
                            Ok(got) if sha256_hex(&got) == sha256_hex(&value) => {}
                            Ok(_) => errors.push(format!("pump {t}: hash mismatch")),
                            Err(e) => errors.push(format!("pump {t}: {e}")),
                        }
                        ops.fetch_add(1, Ordering::SeqCst);
                        i += 1;
                    }
                    errors
                })
            })
            .collect();
        let errors = workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        (ops.load(Ordering::SeqCst), errors)
    })
}

/// Legate originating mTLS to a TLS Redis that requires client certificates, its client
/// certificate in a secret volume.
fn mtls_setup() -> (ServerFiles, SecretVolume, TlsRedis, Legate) {
    let files = ServerFiles::new((-1, 365));
    let ca_path = &files.ca_path;
    let redis = TlsRedis::start(
        files.dir.path(),
        &files.cert_path,
        &files.key_path,
        ca_path,
        true,
    );
    let (cert, key) = files.ca.leaf("legate-v1", &["legate.test"], (-1, 365));
    let volume = SecretVolume::new(&files.dir.path().join("client"), &cert, &key);
    let mut legate = Legate::builder()
        .listener(
            Listener::new("redis")
                .upstream(local(redis.port))
                .set(
                    "health",
                    r#"{ check = "redis", interval = "300ms", timeout = "1s" }"#,
                )
                .set(
                    "tls",
                    &format!(
                        r#"{{ sni = "redis.test", ca = {}, cert = {}, key = {} }}"#,
                        toml_path(ca_path),
                        toml_path(&volume.cert()),
                        toml_path(&volume.key())
                    ),
                ),
        )
        .start();
    // The first check is an mTLS handshake and a PING: milliseconds; 15 s is slack.
    legate.wait_ready(Duration::from_secs(15));
    (files, volume, redis, legate)
}

fn tls_reloads(legate: &Legate, result: &str) -> f64 {
    legate.metrics().value(
        "legate_reloads_total",
        &[("source", "tls"), ("result", result)],
    )
}

/// The client certificate rotated five times, 1 s apart, by `..data` swap, under 10
/// pumps (SET/GET with hashes through mTLS): zero pump errors, five good reloads.
#[test]
fn certificate_rotation_under_load() {
    let (files, mut volume, _redis, mut legate) = mtls_setup();
    let ca = &files.ca;
    let addr = legate.addr("redis");
    let probe = Probe::start(&legate);
    let ok_before = tls_reloads(&legate, "ok");
    let stop = Arc::new(AtomicBool::new(false));
    let pump = pumps(addr, 10, stop.clone());
    for round in 2..=6 {
        // 1 s apart: the pumps run across each rotation.
        thread::sleep(Duration::from_secs(1));
        let (cert, key) = ca.leaf(&format!("legate-v{round}"), &["legate.test"], (-1, 365));
        volume.swap(&cert, &key);
        let want = ok_before + (round - 1) as f64;
        eventually(RELOAD, "the rotation to be reloaded", || {
            tls_reloads(&legate, "ok") >= want
        });
    }
    stop.store(true, Ordering::SeqCst);
    let (ops, errors) = pump.join().unwrap();
    eprintln!("{ops} pump operations, {} errors", errors.len());
    assert!(errors.is_empty(), "pump errors during rotation: {errors:?}");
    assert!(ops > 0);
    let reloads = tls_reloads(&legate, "ok") - ok_before;
    assert!(reloads >= 5.0, "{reloads} good TLS reloads for 5 rotations");
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                "legate_reloads_total",
                &[("source", "tls"), ("result", "ok")],
            )],
            ..Expect::default()
        },
    );
}

/// Broken rotations — an empty key, a key that does not match the certificate, a
/// half-written PEM — keep the last good material: each counts
/// `legate_reloads_total{source="tls",result="error"}`, `/ready` stays 200, old and new
/// connections work throughout.
#[test]
fn broken_rotation_keeps_the_last_good_material() {
    let (files, mut volume, _redis, mut legate) = mtls_setup();
    let ca = &files.ca;
    let addr = legate.addr("redis");
    let probe = Probe::start(&legate);
    let mut old = redis_connect(addr).unwrap();
    let (good_cert, _) = ca.leaf("legate-v1", &["legate.test"], (-1, 365));
    let (_, other_key) = ca.leaf("other", &["other.test"], (-1, 365));
    let half = &good_cert[..good_cert.len() / 2];
    let broken: [(&str, &str, &str); 3] = [
        ("empty key", good_cert.as_str(), ""),
        ("mismatched key", good_cert.as_str(), other_key.as_str()),
        ("half-written PEM", half, other_key.as_str()),
    ];
    for (what, cert, key) in broken {
        let before = tls_reloads(&legate, "error");
        volume.swap(cert, key);
        eventually(RELOAD, &format!("{what} to be refused"), || {
            tls_reloads(&legate, "error") > before
        });
        assert_eq!(legate.get("/ready").0, 200, "{what}: /ready");
        let pong: String = redis::cmd("PING").query(&mut old).unwrap();
        assert_eq!(pong, "PONG", "{what}: an old connection");
        let mut new = redis_connect(addr).unwrap();
        let pong: String = redis::cmd("PING").query(&mut new).unwrap();
        assert_eq!(pong, "PONG", "{what}: a new connection");
    }
    drop(old);
    reset(connect(addr));
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                "legate_reloads_total",
                &[("source", "tls"), ("result", "error")],
            )],
            ..Expect::default()
        },
    );
}
