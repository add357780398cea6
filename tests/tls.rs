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

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf for `names` (DNS names or IPs), valid in [from, to] years relative to now.
    fn leaf(&self, cn: &str, names: &[&str], valid: (i64, i64)) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let now = time_now();
        params.not_before = now + time::Duration::days(valid.0 * 365);
        params.not_after = now + time::Duration::days(valid.1 * 365);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A TLS-only redis-server (`--port 0`).
struct TlsRedis {
    port: u16,
    _proc: Proc,
}

impl TlsRedis {
    fn start(dir: &Path, cert: &Path, key: &Path, ca: &Path, auth_clients: bool) -> TlsRedis {
        require_bin("redis-server", "redis-server");
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .arg("--tls-ca-cert-file")
            .arg(ca)
            .args([
                "--tls-auth-clients",
                if auth_clients { "yes" } else { "no" },
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        let proc = Proc {
            name: "redis-server --tls-port".into(),
            child,
        };
        wait_listening(port, Duration::from_secs(15), "TLS redis-server");
        TlsRedis { port, _proc: proc }
    }
}

/// Send a RESP command through a plaintext connection; the reply's first line.
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

#[test]
fn origination_to_a_tls_redis_carries_plaintext_resp() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let (cert, key) = ca.leaf("redis.test", &["redis.test"], (-1, 1));
    let ca_path = write(dir.path(), "ca.pem", &ca.pem());
    let cert_path = write(dir.path(), "srv.pem", &cert);
    let key_path = write(dir.path(), "srv.key", &key);
    let redis = TlsRedis::start(dir.path(), &cert_path, &key_path, &ca_path, false);
    let tls = format!(
        r#"{{ sni = "redis.test", ca = {:?} }}"#,
        ca_path.display().to_string()
    );
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
    legate.wait_ready(Duration::from_secs(10));
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
    assert!(
        metrics.value(
            "legate_tls_cert_expiry_timestamp_seconds",
            &[("listener", "redis"), ("role", "ca")]
        ) > 1.0e9
    );
}

#[test]
fn mutual_tls_needs_legates_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let (cert, key) = ca.leaf("redis.test", &["redis.test"], (-1, 1));
    let (client_cert, client_key) = ca.leaf("legate", &["legate.test"], (-1, 1));
    let ca_path = write(dir.path(), "ca.pem", &ca.pem());
    let cert_path = write(dir.path(), "srv.pem", &cert);
    let key_path = write(dir.path(), "srv.key", &key);
    let client_cert_path = write(dir.path(), "client.pem", &client_cert);
    let client_key_path = write(dir.path(), "client.key", &client_key);
    let redis = TlsRedis::start(dir.path(), &cert_path, &key_path, &ca_path, true);
    let with_cert = format!(
        r#"{{ sni = "redis.test", ca = {:?}, cert = {:?}, key = {:?} }}"#,
        ca_path.display().to_string(),
        client_cert_path.display().to_string(),
        client_key_path.display().to_string()
    );
    let without_cert = format!(
        r#"{{ sni = "redis.test", ca = {:?} }}"#,
        ca_path.display().to_string()
    );
    let legate = Legate::builder()
        .listener(tls_listener("with", redis.port, &with_cert))
        .listener(tls_listener("without", redis.port, &without_cert))
        .start();
    assert_eq!(resp(legate.addr("with"), "PING\r\n").unwrap(), "+PONG");
    assert!(
        resp(legate.addr("without"), "PING\r\n").is_err(),
        "redis with tls-auth-clients must refuse legate without a client certificate"
    );
    let metrics = legate.metrics();
    assert!(
        metrics.value(
            "legate_tls_cert_expiry_timestamp_seconds",
            &[("listener", "with"), ("role", "client")]
        ) > 1.0e9
    );
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
    let (good, good_key) = ca.leaf("redis.test", &["redis.test"], (-1, 1));
    let (expired, expired_key) = ca.leaf("redis.test", &["redis.test"], (-3, -1));
    let (wrong_name, wrong_name_key) = ca.leaf("other.test", &["other.test"], (-1, 1));
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
    let trust = |ca: &Path| {
        format!(
            r#"{{ sni = "redis.test", ca = {:?} }}"#,
            ca.display().to_string()
        )
    };
    let legate = Legate::builder()
        .listener(tls_listener(
            "wrong_ca",
            good_server.port,
            &trust(&other_ca_path),
        ))
        .listener(tls_listener(
            "expired",
            expired_server.port,
            &trust(&ca_path),
        ))
        .listener(tls_listener(
            "name",
            wrong_name_server.port,
            &trust(&ca_path),
        ))
        .listener(tls_listener("recording", recording_port, &trust(&ca_path)))
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
    eventually(
        Duration::from_secs(5),
        "the backend to see a connection",
        || !seen.lock().unwrap().is_empty(),
    );
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
        Duration::from_secs(10),
    );
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    text.contains("CN").then_some(text)
}

fn redis_cli_tls(addr: SocketAddr, ca: &Path, client: Option<(&Path, &Path)>) -> (bool, String) {
    require_bin("redis-cli", "redis-tools");
    let mut cmd = Command::new("redis-cli");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &addr.port().to_string(),
        "--tls",
        "--sni",
        "redis.test",
    ])
    .arg("--cacert")
    .arg(ca);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    cmd.arg("PING");
    let output = run_with_timeout(cmd, Duration::from_secs(10));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    (
        stdout.contains("PONG"),
        stdout + &String::from_utf8_lossy(&output.stderr),
    )
}

#[test]
fn termination_in_front_of_plaintext_redis_with_and_without_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let (cert, key) = ca.leaf("redis.test", &["redis.test"], (-1, 1));
    let (client_cert, client_key) = ca.leaf("app", &["app.test"], (-1, 1));
    let ca_path = write(dir.path(), "ca.pem", &ca.pem());
    let cert_path = write(dir.path(), "srv.pem", &cert);
    let key_path = write(dir.path(), "srv.key", &key);
    let client_cert_path = write(dir.path(), "client.pem", &client_cert);
    let client_key_path = write(dir.path(), "client.key", &client_key);
    let redis = RedisServer::start();
    let server = format!(
        r#"{{ cert = {:?}, key = {:?} }}"#,
        cert_path.display().to_string(),
        key_path.display().to_string()
    );
    let server_mtls = format!(
        r#"{{ cert = {:?}, key = {:?}, client_ca = {:?} }}"#,
        cert_path.display().to_string(),
        key_path.display().to_string(),
        ca_path.display().to_string()
    );
    let mut legate = Legate::builder()
        .listener(
            Listener::new("plain_app")
                .upstream(redis.addr())
                .fast_health()
                .set("tls_server", &server),
        )
        .listener(
            Listener::new("mtls_app")
                .upstream(redis.addr())
                .fast_health()
                .set("tls_server", &server_mtls),
        )
        .start();
    legate.wait_ready(Duration::from_secs(10));
    let (ok, out) = redis_cli_tls(legate.addr("plain_app"), &ca_path, None);
    assert!(ok, "redis-cli --tls through legate: {out}");
    let (ok, out) = redis_cli_tls(legate.addr("mtls_app"), &ca_path, None);
    assert!(!ok, "a client without a certificate must be refused: {out}");
    let (ok, out) = redis_cli_tls(
        legate.addr("mtls_app"),
        &ca_path,
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
    assert!(
        metrics.value(
            "legate_tls_cert_expiry_timestamp_seconds",
            &[("listener", "mtls_app"), ("role", "server")]
        ) > 1.0e9
    );
}

#[test]
fn server_certificate_is_reloaded_in_place_and_by_configmap_swap() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let volume = dir.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    // Kubernetes layout: ..v1/{tls.crt,tls.key}, ..data -> ..v1, tls.crt -> ..data/tls.crt
    let version = |name: &str, cn: &str| {
        let (cert, key) = ca.leaf(cn, &["redis.test"], (-1, 1));
        let path = volume.join(name);
        std::fs::create_dir(&path).unwrap();
        write(&path, "tls.crt", &cert);
        write(&path, "tls.key", &key);
    };
    version("..v1", "one");
    std::os::unix::fs::symlink("..v1", volume.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tls.crt", volume.join("tls.crt")).unwrap();
    std::os::unix::fs::symlink("..data/tls.key", volume.join("tls.key")).unwrap();
    let redis = RedisServer::start();
    let server = format!(
        r#"{{ cert = {:?}, key = {:?} }}"#,
        volume.join("tls.crt").display().to_string(),
        volume.join("tls.key").display().to_string()
    );
    let legate = Legate::builder()
        .listener(
            Listener::new("app")
                .upstream(redis.addr())
                .fast_health()
                .set("tls_server", &server),
        )
        .start();
    let addr = legate.addr("app");
    let subject = served_subject(addr).expect("a certificate is served");
    assert!(subject.contains("one"), "{subject}");

    // ConfigMap-style swap: new directory, ..data re-pointed atomically.
    version("..v2", "two");
    std::os::unix::fs::symlink("..v2", volume.join("..data_tmp")).unwrap();
    std::fs::rename(volume.join("..data_tmp"), volume.join("..data")).unwrap();
    std::fs::remove_dir_all(volume.join("..v1")).unwrap();
    eventually(
        Duration::from_secs(5),
        "the swapped certificate to be served",
        || served_subject(addr).is_some_and(|s| s.contains("two")),
    );

    // In place: both files rewritten inside the current version directory.
    let (cert, key) = ca.leaf("three", &["redis.test"], (-1, 1));
    write(&volume.join("..v2"), "tls.key", &key);
    write(&volume.join("..v2"), "tls.crt", &cert);
    eventually(
        Duration::from_secs(5),
        "the rewritten certificate to be served",
        || served_subject(addr).is_some_and(|s| s.contains("three")),
    );

    // A broken replacement keeps the last good certificate and counts an error.
    write(
        &volume.join("..v2"),
        "tls.crt",
        "-----BEGIN CERTIFICATE-----\nnot base64\n",
    );
    eventually(
        Duration::from_secs(5),
        "the broken reload to be counted",
        || {
            legate.metrics().value(
                "legate_reloads_total",
                &[("source", "tls"), ("result", "error")],
            ) >= 1.0
        },
    );
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
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let (cert, key) = ca.leaf("redis.test", &["redis.test"], (-1, 1));
    let ca_path = write(dir.path(), "ca.pem", &ca.pem());
    let cert_path = write(dir.path(), "srv.pem", &cert);
    let key_path = write(dir.path(), "srv.key", &key);
    let redis = RedisServer::start();
    let server = format!(
        r#"{{ cert = {:?}, key = {:?} }}"#,
        cert_path.display().to_string(),
        key_path.display().to_string()
    );
    let mut legate = Legate::builder()
        .listener(
            Listener::new("app")
                .upstream(redis.addr())
                .fast_health()
                .set("tls_server", &server),
        )
        .start();
    legate.wait_ready(Duration::from_secs(10));
    let addr = legate.addr("app");
    // Plaintext RESP on the TLS port.
    let mut plain = connect(addr);
    plain.write_all(b"PING\r\n").unwrap();
    assert!(closed_within(&mut plain, Duration::from_secs(6)));
    // Random bytes.
    let mut garbage = connect(addr);
    let _ = garbage.write_all(&payload(64 * 1024, 7));
    assert!(closed_within(&mut garbage, Duration::from_secs(6)));
    // A real TLS client is unaffected.
    let (ok, out) = redis_cli_tls(addr, &ca_path, None);
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
    let output = run_with_timeout(cmd, Duration::from_secs(10));
    assert_eq!(output.status.code(), Some(1), "legate must refuse to start");
    String::from_utf8_lossy(&output.stderr).to_string()
}

#[test]
fn broken_tls_material_at_start_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("test ca");
    let (cert, key) = ca.leaf("redis.test", &["redis.test"], (-1, 1));
    let (_, other_key) = ca.leaf("other", &["other.test"], (-1, 1));
    let (expired, expired_key) = ca.leaf("old", &["redis.test"], (-3, -1));
    let cert_path = write(dir.path(), "srv.pem", &cert);
    let key_path = write(dir.path(), "srv.key", &key);
    let other_key_path = write(dir.path(), "other.key", &other_key);
    let expired_path = write(dir.path(), "expired.pem", &expired);
    let expired_key_path = write(dir.path(), "expired.key", &expired_key);
    let not_a_key = write(dir.path(), "not-a-key.pem", &cert);
    let show = |p: &Path| p.display().to_string();
    let table =
        |cert: &Path, key: &Path| format!("{{ cert = {:?}, key = {:?} }}", show(cert), show(key));

    let error = start_fails_with(&table(&cert_path, &other_key_path));
    assert!(
        error.contains("does not match") && error.contains("other.key"),
        "{error}"
    );
    let error = start_fails_with(&table(&expired_path, &expired_key_path));
    assert!(
        error.contains("expired") && error.contains("expired.pem"),
        "{error}"
    );
    let error = start_fails_with(&table(&cert_path, &not_a_key));
    assert!(
        error.contains("no private key") && error.contains("not-a-key.pem"),
        "{error}"
    );
    let error = start_fails_with(&table(&dir.path().join("missing.pem"), &key_path));
    assert!(
        error.contains("missing.pem") && error.contains("cannot read"),
        "{error}"
    );
}
