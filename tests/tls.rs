//! TLS, against real servers and real clients, with certificates made by the test (rcgen):
//! - origination to a TLS-only `redis-server`: plaintext RESP from the app works, and the
//!   `redis` health check runs inside TLS;
//! - mTLS: with `tls-auth-clients yes`, legate's client certificate is required;
//! - a wrong CA, an expired certificate and a name mismatch each fail, are counted by
//!   reason, and nothing is ever sent in plaintext (a recording backend sees a ClientHello);
//! - termination in front of a plaintext redis with `redis-cli --tls`; with `client_ca`,
//!   a client without a certificate is refused;
//! - the served certificate is replaced on disk (in place, then ConfigMap-style) and new
//!   handshakes get the new one without a restart; a broken replacement keeps the old;
//! - garbage and plaintext on a TLS listener are closed and counted, and a TLS client
//!   works meanwhile;
//! - broken material at start (a key that does not match, an expired certificate, no key,
//!   a missing file) stops legate with an error naming the file.

mod common;

use common::tls::*;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Certificates valid from a year ago to a year from now, and expired ones (from three years
/// ago to a year ago), in days.
const CURRENT: (i64, i64) = (-365, 365);
const EXPIRED: (i64, i64) = (-3 * 365, -365);

/// legate is ready after the first check of a running server (a TCP or TLS connect, a
/// PING): milliseconds; 10 s is a loaded 2-core machine's slack.
const READY: Duration = Duration::from_secs(10);

/// The bound on TLS material reloading (the watcher's debounce, 50 ms and at most 500 ms, and
/// a parse) and on a failed handshake reaching the recording backend: well under a second;
/// 5 s is a loaded machine's slack.
const RELOAD: Duration = Duration::from_secs(5);

/// Send a RESP command through a plaintext connection; the reply's first line. (5 s to
/// connect over loopback and 5 s for a reply that takes milliseconds: a loaded machine's
/// slack, and a bounded wait where no reply comes.)
fn resp(addr: SocketAddr, command: &str) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(command.as_bytes())?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => break,
            _ => {
                reply.push(byte[0]);
                if reply.ends_with(b"\r\n") {
                    break;
                }
            }
        }
    }
    if reply.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed without a reply",
        ));
    }
    Ok(String::from_utf8_lossy(&reply).trim_end().to_string())
}

fn tls_listener(name: &str, upstream: u16, tls: &str) -> Listener {
    Listener::new(name)
        .upstream(local(upstream))
        .set("tls", tls)
        .set("health", r#"{ check = "none" }"#)
}

/// A listener terminating TLS (`tls_server`) in front of a plaintext `upstream`.
fn terminating(name: &str, upstream: SocketAddr, tls_server: &str) -> Listener {
    Listener::new(name)
        .upstream(upstream)
        .fast_health()
        .set("tls_server", tls_server)
}

/// A TLS-only redis-server with the server certificate of `files`, trusting its CA.
fn tls_redis(files: &ServerFiles, auth_clients: bool) -> TlsRedis {
    TlsRedis::start(
        files.dir.path(),
        &files.cert_path,
        &files.key_path,
        &files.ca_path,
        auth_clients,
    )
}

/// `legate_tls_cert_expiry_timestamp_seconds{listener,role}` is a plausible unix time.
fn assert_expiry_exported(metrics: &Metrics, listener: &str, role: &str) {
    assert!(
        metrics.value(
            "legate_tls_cert_expiry_timestamp_seconds",
            &[("listener", listener), ("role", role)]
        ) > 1.0e9
    );
}

#[test]
fn origination_to_a_tls_redis_carries_plaintext_resp() {
    let files = ServerFiles::new(CURRENT);
    let redis = tls_redis(&files, false);
    let tls = origination(&files.ca_path);
    let mut legate = Legate::builder()
        .listener(tls_listener("redis", redis.port, &tls))
        // The redis check speaks RESP inside TLS, as the traffic does.
        .listener(
            Listener::new("checked")
                .upstream(local(redis.port))
                .set("tls", &tls)
                .set(
                    "health",
                    r#"{ check = "redis", interval = "200ms", timeout = "1s" }"#,
                ),
        )
        .start();
    legate.wait_ready(READY);
    assert_eq!(resp(legate.addr("checked"), "PING\r\n").unwrap(), "+PONG");
    let addr = legate.addr("redis");
    assert_eq!(resp(addr, "PING\r\n").unwrap(), "+PONG");
    assert_eq!(resp(addr, "SET k v\r\n").unwrap(), "+OK");
    assert_eq!(resp(addr, "GET k\r\n").unwrap(), "$1");
    let metrics = legate.metrics();
    assert!(
        metrics.value(
            "legate_tls_handshake_seconds_count",
            &[("listener", "redis"), ("side", "upstream")]
        ) >= 3.0
    );
    assert_eq!(
        metrics.value("legate_splice_bytes_total", &[("listener", "redis")]),
        0.0
    );
    assert_expiry_exported(&metrics, "redis", "ca");
}

#[test]
fn mutual_tls_needs_legates_client_certificate() {
    let files = ServerFiles::new(CURRENT);
    let (client_cert, client_key) = files.ca.leaf("legate", &["legate.test"], CURRENT);
    let client_cert_path = files.write("client.pem", &client_cert);
    let client_key_path = files.write("client.key", &client_key);
    let redis = tls_redis(&files, true);
    let with_cert = format!(
        r#"{{ sni = "redis.test", ca = {}, cert = {}, key = {} }}"#,
        toml_path(&files.ca_path),
        toml_path(&client_cert_path),
        toml_path(&client_key_path)
    );
    let without_cert = origination(&files.ca_path);
    let legate = Legate::builder()
        .listener(tls_listener("with", redis.port, &with_cert))
        .listener(tls_listener("without", redis.port, &without_cert))
        .start();
    assert_eq!(resp(legate.addr("with"), "PING\r\n").unwrap(), "+PONG");
    assert!(
        resp(legate.addr("without"), "PING\r\n").is_err(),
        "redis with tls-auth-clients must refuse legate without a client certificate"
    );
    assert_expiry_exported(&legate.metrics(), "with", "client");
}

/// A backend that records the first bytes of every connection and then closes.
fn recording_backend() -> (u16, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            // legate's ClientHello follows its connect at once; 2 s bounds a read that would
            // otherwise hold this thread.
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 16];
            let n = stream.read(&mut buf).unwrap_or(0);
            record.lock().unwrap().push(buf[..n].to_vec());
        }
    });
    (port, seen)
}

#[test]
fn bad_upstream_certificates_fail_are_counted_and_nothing_goes_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let other_ca = Ca::new("someone else");
    let (good, good_key) = ca.leaf("redis.test", &["redis.test"], CURRENT);
    let (expired, expired_key) = ca.leaf("redis.test", &["redis.test"], EXPIRED);
    let (wrong_name, wrong_name_key) = ca.leaf("other.test", &["other.test"], CURRENT);
    let ca_path = write(dir.path(), "ca.pem", &ca.pem());
    let other_ca_path = write(dir.path(), "other-ca.pem", &other_ca.pem());
    let start = |name: &str, cert: &str, key: &str| {
        let cert = write(dir.path(), &format!("{name}.pem"), cert);
        let key = write(dir.path(), &format!("{name}.key"), key);
        TlsRedis::start(dir.path(), &cert, &key, &ca_path, false)
    };
    let good_server = start("good", &good, &good_key);
    let expired_server = start("expired", &expired, &expired_key);
    let wrong_name_server = start("wrong", &wrong_name, &wrong_name_key);
    let (recording_port, seen) = recording_backend();
    let legate = Legate::builder()
        .listener(tls_listener(
            "wrong_ca",
            good_server.port,
            &origination(&other_ca_path),
        ))
        .listener(tls_listener(
            "expired",
            expired_server.port,
            &origination(&ca_path),
        ))
        .listener(tls_listener(
            "name",
            wrong_name_server.port,
            &origination(&ca_path),
        ))
        .listener(tls_listener(
            "recording",
            recording_port,
            &origination(&ca_path),
        ))
        .start();
    for (listener, reason) in [
        ("wrong_ca", "unknown_issuer"),
        ("expired", "expired"),
        ("name", "name_mismatch"),
    ] {
        assert!(
            resp(legate.addr(listener), "PING\r\n").is_err(),
            "{listener}: the connection must fail"
        );
        let metrics = legate.metrics();
        assert!(
            metrics.value(
                "legate_tls_handshake_errors_total",
                &[
                    ("listener", listener),
                    ("side", "upstream"),
                    ("reason", reason)
                ]
            ) >= 1.0,
            "{listener}: expected a handshake error with reason {reason}; log:\n{}",
            legate.log()
        );
        assert!(
            metrics.value(
                "legate_connections_rejected_total",
                &[("listener", listener), ("reason", "connect_failed")]
            ) >= 1.0
        );
        assert!(metrics.has("legate_upstream_connect_failures_total"));
    }
    // The recording backend never answers the handshake; what it got must be TLS.
    let _ = resp(legate.addr("recording"), "PING secret-in-plaintext\r\n");
    eventually(RELOAD, "the backend to see a connection", || {
        !seen.lock().unwrap().is_empty()
    });
    for first in seen.lock().unwrap().iter() {
        assert_eq!(
            first.first(),
            Some(&0x16),
            "not a TLS handshake record: {first:?}"
        );
        assert!(!first.starts_with(b"PING"));
    }
}

/// `openssl s_client`: the subject CN of the certificate the server presents, if any.
fn served_subject(addr: SocketAddr) -> Option<String> {
    require_bin("openssl", "openssl");
    let output = run_with_timeout(
        {
            let mut cmd = Command::new("sh");
            cmd.arg("-c").arg(format!(
                "openssl s_client -connect {addr} -servername redis.test </dev/null 2>/dev/null | openssl x509 -noout -subject"
            ));
            cmd
        },
        // One handshake, milliseconds; 10 s is a loaded machine's slack.
        Duration::from_secs(10),
    );
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    text.contains("CN").then_some(text)
}

#[test]
fn termination_in_front_of_plaintext_redis_with_and_without_client_ca() {
    let files = ServerFiles::new(CURRENT);
    let ca_path = &files.ca_path;
    let (client_cert, client_key) = files.ca.leaf("app", &["app.test"], CURRENT);
    let client_cert_path = files.write("client.pem", &client_cert);
    let client_key_path = files.write("client.key", &client_key);
    let redis = RedisServer::start();
    let server = termination(&files.cert_path, &files.key_path);
    let server_mtls = format!(
        r#"{{ cert = {}, key = {}, client_ca = {} }}"#,
        toml_path(&files.cert_path),
        toml_path(&files.key_path),
        toml_path(ca_path)
    );
    let mut legate = Legate::builder()
        .listener(terminating("plain_app", redis.addr(), &server))
        .listener(terminating("mtls_app", redis.addr(), &server_mtls))
        .start();
    legate.wait_ready(READY);
    let (ok, out) = redis_cli_tls(legate.addr("plain_app"), ca_path, None);
    assert!(ok, "redis-cli --tls through legate: {out}");
    let (ok, out) = redis_cli_tls(legate.addr("mtls_app"), ca_path, None);
    assert!(!ok, "a client without a certificate must be refused: {out}");
    let (ok, out) = redis_cli_tls(
        legate.addr("mtls_app"),
        ca_path,
        Some((&client_cert_path, &client_key_path)),
    );
    assert!(ok, "a client with a certificate from client_ca: {out}");
    let metrics = legate.metrics();
    assert!(
        metrics.value(
            "legate_tls_handshake_errors_total",
            &[
                ("listener", "mtls_app"),
                ("side", "client"),
                ("reason", "no_client_cert")
            ]
        ) >= 1.0,
        "{}",
        legate.log()
    );
    assert_expiry_exported(&metrics, "mtls_app", "server");
}

#[test]
fn server_certificate_is_reloaded_in_place_and_by_configmap_swap() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let leaf = |cn: &str| ca.leaf(cn, &["redis.test"], CURRENT);
    // Kubernetes layout: ..v1/{tls.crt,tls.key}, ..data -> ..v1, tls.crt -> ..data/tls.crt
    let (cert, key) = leaf("one");
    let mut volume = SecretVolume::new(&dir.path().join("volume"), &cert, &key);
    let redis = RedisServer::start();
    let server = termination(&volume.cert(), &volume.key());
    let legate = Legate::builder()
        .listener(terminating("app", redis.addr(), &server))
        .start();
    let addr = legate.addr("app");
    let subject = served_subject(addr).expect("a certificate is served");
    assert!(subject.contains("one"), "{subject}");

    // ConfigMap-style swap: new directory ..v2, ..data re-pointed atomically, ..v1 removed.
    let (cert, key) = leaf("two");
    volume.swap(&cert, &key);
    eventually(RELOAD, "the swapped certificate to be served", || {
        served_subject(addr).is_some_and(|s| s.contains("two"))
    });

    // In place: both files rewritten inside the current version directory.
    let (cert, key) = leaf("three");
    write(&volume.current(), "tls.key", &key);
    write(&volume.current(), "tls.crt", &cert);
    eventually(RELOAD, "the rewritten certificate to be served", || {
        served_subject(addr).is_some_and(|s| s.contains("three"))
    });

    // A broken replacement keeps the last good certificate and counts an error.
    write(
        &volume.current(),
        "tls.crt",
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    eventually(RELOAD, "the broken reload to be counted", || {
        legate.metrics().value(
            "legate_reloads_total",
            &[("source", "tls"), ("result", "error")],
        ) >= 1.0
    });
    let subject = served_subject(addr).expect("still serving");
    assert!(subject.contains("three"), "{subject}");
    assert!(
        legate.metrics().value(
            "legate_reloads_total",
            &[("source", "tls"), ("result", "ok")]
        ) >= 2.0
    );
}

#[test]
fn garbage_and_plaintext_on_a_tls_listener_are_closed_and_counted() {
    let files = ServerFiles::new(CURRENT);
    let redis = RedisServer::start();
    let server = termination(&files.cert_path, &files.key_path);
    let mut legate = Legate::builder()
        .listener(terminating("app", redis.addr(), &server))
        .start();
    legate.wait_ready(READY);
    let addr = legate.addr("app");
    // Plaintext RESP on the TLS port.
    // Both are refused at once (not a TLS record); 6 s is the worst case, HANDSHAKE_TIMEOUT
    // (5 s, src/tls/mod.rs), plus a second of slack.
    let mut plain = connect(addr);
    plain.write_all(b"PING\r\n").unwrap();
    assert!(closed_within(&mut plain, Duration::from_secs(6)));
    // Random bytes.
    let mut garbage = connect(addr);
    let _ = garbage.write_all(&payload(64 * 1024, 7));
    assert!(closed_within(&mut garbage, Duration::from_secs(6)));
    // A real TLS client is unaffected.
    let (ok, out) = redis_cli_tls(addr, &files.ca_path, None);
    assert!(ok, "{out}");
    let metrics = legate.metrics();
    let errors: f64 = metrics
        .matching(
            "legate_tls_handshake_errors_total",
            &[("listener", "app"), ("side", "client")],
        )
        .map(|s| s.value)
        .sum();
    assert!(errors >= 2.0, "expected two handshake errors, got {errors}");
    legate.assert_running();
}

/// `legate run` with broken TLS material: exit 1 at once, naming the file and the fault.
fn start_fails_with(tls_server: &str) -> String {
    let mut cmd = legate_command();
    cmd.args(["run", "--admin", &local(free_port()).to_string(), "-c"]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("legate.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"{}\"\n[[listeners]]\nname = \"app\"\nlisten = \"{}\"\nupstream = [\"127.0.0.1:1\"]\ntls_server = {tls_server}\n",
            local(free_port()),
            local(free_port())
        ),
    )
    .unwrap();
    cmd.arg(&config);
    // legate refuses broken material before it serves anything: milliseconds; 10 s is a
    // loaded machine's slack.
    let output = run_with_timeout(cmd, Duration::from_secs(10));
    assert_eq!(output.status.code(), Some(1), "legate must refuse to start");
    String::from_utf8_lossy(&output.stderr).to_string()
}

#[test]
fn broken_tls_material_at_start_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let (cert, key) = ca.leaf("redis.test", &["redis.test"], CURRENT);
    let (_, other_key) = ca.leaf("other", &["other.test"], CURRENT);
    let (expired, expired_key) = ca.leaf("old", &["redis.test"], EXPIRED);
    let cert_path = write(dir.path(), "srv.pem", &cert);
    let key_path = write(dir.path(), "srv.key", &key);
    let other_key_path = write(dir.path(), "other.key", &other_key);
    let expired_path = write(dir.path(), "expired.pem", &expired);
    let expired_key_path = write(dir.path(), "expired.key", &expired_key);
    let not_a_key = write(dir.path(), "not-a-key.pem", &cert);

    let error = start_fails_with(&termination(&cert_path, &other_key_path));
    assert!(
        error.contains("does not match") && error.contains("other.key"),
        "{error}"
    );
    let error = start_fails_with(&termination(&expired_path, &expired_key_path));
    assert!(
        error.contains("expired") && error.contains("expired.pem"),
        "{error}"
    );
    let error = start_fails_with(&termination(&cert_path, &not_a_key));
    assert!(
        error.contains("no private key") && error.contains("not-a-key.pem"),
        "{error}"
    );
    let error = start_fails_with(&termination(&dir.path().join("missing.pem"), &key_path));
    assert!(
        error.contains("missing.pem") && error.contains("cannot read"),
        "{error}"
    );
}
