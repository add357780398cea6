//! TLS material and TLS servers for tests/tls.rs and tests/faults_tls.rs:
//!
//! - [`Ca`]: a CA made with rcgen, and the leaf certificates it signs;
//! - [`ServerFiles`]: a temp dir holding a fresh CA and a `redis.test` server certificate;
//! - [`TlsRedis`]: a TLS-only `redis-server`; [`redis_cli_tls`]: `redis-cli --tls PING`;
//! - [`SecretVolume`]: a Kubernetes secret volume whose `..data` is swapped as the kubelet does;
//! - [`origination`] / [`termination`]: the `tls` / `tls_server` tables of a listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

/// The name every server certificate of these tests is for (and the SNI legate sends).
pub const SERVER_NAME: &str = "redis.test";

/// A certificate authority whose key lives in the test.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf (server and client auth) for `names` (DNS names or IPs), valid from
    /// `valid_days.0` to `valid_days.1` days relative to now; returns (certificate PEM, key PEM).
    pub fn leaf(&self, cn: &str, names: &[&str], valid_days: (i64, i64)) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::days(valid_days.0);
        params.not_after = now + time::Duration::days(valid_days.1);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }
}

/// Writes `text` to `dir/name`; returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A path as a TOML string.
pub fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// `{ sni = "redis.test", ca = CA }`: a listener's `tls` table trusting `ca`.
pub fn origination(ca: &Path) -> String {
    format!(r#"{{ sni = "{SERVER_NAME}", ca = {} }}"#, toml_path(ca))
}

/// `{ cert = CERT, key = KEY }`: a listener's `tls_server` table.
pub fn termination(cert: &Path, key: &Path) -> String {
    format!("{{ cert = {}, key = {} }}", toml_path(cert), toml_path(key))
}

/// A temp dir holding a fresh CA (`ca.pem`) and a `redis.test` server certificate it signed
/// (`srv.pem`, `srv.key`).
pub struct ServerFiles {
    pub dir: TempDir,
    pub ca: Ca,
    pub ca_path: PathBuf,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl ServerFiles {
    /// The server certificate is valid from `valid_days.0` to `valid_days.1` days from now.
    pub fn new(valid_days: (i64, i64)) -> ServerFiles {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test ca");
        let (cert, key) = ca.leaf(SERVER_NAME, &[SERVER_NAME], valid_days);
        let ca_path = write(dir.path(), "ca.pem", &ca.pem());
        let cert_path = write(dir.path(), "srv.pem", &cert);
        let key_path = write(dir.path(), "srv.key", &key);
        ServerFiles {
            dir,
            ca,
            ca_path,
            cert_path,
            key_path,
        }
    }

    /// Writes `text` to a file of the temp dir; returns the path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        write(self.dir.path(), name, text)
    }
}

/// A TLS-only redis-server (`--port 0`) on a free port.
pub struct TlsRedis {
    pub port: u16,
    pub proc: Proc,
}

impl TlsRedis {
    pub fn start(dir: &Path, cert: &Path, key: &Path, ca: &Path, auth_clients: bool) -> TlsRedis {
        require_bin("redis-server", "redis-server");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--tls-port", &port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
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
        // redis-server listens within milliseconds; 15 s covers a loaded machine.
        wait_listening(port, Duration::from_secs(15), "TLS redis-server");
        TlsRedis { port, proc }
    }
}

/// `redis-cli --tls --sni redis.test PING` against `addr`, trusting `ca`, with a client
/// certificate and key when given; returns (whether PONG came back, stdout and stderr).
pub fn redis_cli_tls(
    addr: SocketAddr,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> (bool, String) {
    require_bin("redis-cli", "redis-tools");
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(["--tls", "--sni", SERVER_NAME, "--cacert"])
        .arg(ca);
    if let Some((cert, key)) = client {
        cmd.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    cmd.arg("PING");
    // One TLS handshake and a PING, milliseconds; 15 s covers a loaded machine and fails a
    // hung client instead of hanging the test.
    let output = run_with_timeout(cmd, Duration::from_secs(15));
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    (
        stdout.contains("PONG"),
        stdout + &String::from_utf8_lossy(&output.stderr),
    )
}

/// Kubernetes-style secret volume: `..vN/{tls.crt,tls.key}`, `..data -> ..vN`, and
/// `tls.crt -> ..data/tls.crt` (likewise `tls.key`).
pub struct SecretVolume {
    dir: PathBuf,
    version: usize,
}

impl SecretVolume {
    pub fn new(dir: &Path, cert: &str, key: &str) -> SecretVolume {
        let mut volume = SecretVolume {
            dir: dir.to_path_buf(),
            version: 0,
        };
        std::fs::create_dir_all(dir).unwrap();
        volume.swap(cert, key);
        std::os::unix::fs::symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", dir.join("tls.key")).unwrap();
        volume
    }

    /// The kubelet's AtomicWriter: write a new version directory, re-point `..data`, remove
    /// the old version.
    pub fn swap(&mut self, cert: &str, key: &str) {
        self.version += 1;
        let name = format!("..v{}", self.version);
        let new = self.dir.join(&name);
        std::fs::create_dir(&new).unwrap();
        write(&new, "tls.crt", cert);
        write(&new, "tls.key", key);
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if self.version > 1 {
            let _ = std::fs::remove_dir_all(self.dir.join(format!("..v{}", self.version - 1)));
        }
    }

    /// The current version directory (`..vN`), for writes in place.
    pub fn current(&self) -> PathBuf {
        self.dir.join(format!("..v{}", self.version))
    }

    /// The visible certificate path (`tls.crt`).
    pub fn cert(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    /// The visible key path (`tls.key`).
    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
}
