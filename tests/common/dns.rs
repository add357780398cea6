//! A real `dnsmasq` for the DNS discovery tests (tests/dns.rs, tests/faults_dns.rs,
//! tests/faults_discovery.rs): it answers from a hosts file only (no upstream servers), on a
//! free 127.0.0.1 port (UDP and TCP), logs to a file, and rereads the file on SIGHUP.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::*;

/// Two loopback addresses for backends that one DNS name can move between.
pub const BACKEND_A: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
pub const BACKEND_B: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// A port free on both [`BACKEND_A`] and [`BACKEND_B`] a moment ago.
pub fn backend_port() -> u16 {
    for _ in 0..50 {
        let first = TcpListener::bind((BACKEND_A, 0)).expect("bind 127.0.0.2");
        let port = first.local_addr().unwrap().port();
        if TcpListener::bind((BACKEND_B, port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

/// A running dnsmasq; killed (and its directory removed) on drop.
pub struct Dnsmasq {
    pub port: u16,
    /// Declared before `dir`, so the process is killed before its files go.
    pub proc: Proc,
    hosts: PathBuf,
    dir: TempDir,
}

impl Dnsmasq {
    /// Starts dnsmasq answering from `hosts` with a TTL of `ttl` seconds. A name under
    /// `local_domain` that is not in the file is NXDOMAIN (`--local`); any other missing name
    /// is REFUSED. `extra` are more arguments (`--srv-host=…`, `--txt-record=…`,
    /// `--log-queries`). Returns once it answers a query, within 10 s.
    pub fn start(hosts: &str, ttl: u32, local_domain: &str, extra: &[String]) -> Dnsmasq {
        let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"]
            .into_iter()
            .find(|path| Path::new(path).exists())
            .unwrap_or_else(|| {
                panic!("dnsmasq is not installed: run `apt-get install -y dnsmasq`")
            });
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts_path = dir.path().join("hosts");
        std::fs::write(&hosts_path, hosts).unwrap();
        // Free for TCP (free_port) and for UDP.
        let port = loop {
            let port = free_port();
            if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
                break port;
            }
        };
        let out = File::create(dir.path().join("dnsmasq.out")).unwrap();
        let child = Command::new(binary)
            .args(["-k", "-p", &port.to_string(), "--listen-address=127.0.0.1"])
            .args(["--bind-interfaces", "--no-resolv", "--no-hosts"])
            .arg(format!("--local-ttl={ttl}"))
            .arg(format!("--local=/{local_domain}/"))
            // As root it would drop to `nobody`, who cannot reread the file on SIGHUP.
            .args(["--user=root", "--pid-file="])
            .arg(format!("--addn-hosts={}", hosts_path.display()))
            .arg(format!(
                "--log-facility={}",
                dir.path().join("dnsmasq.log").display()
            ))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        let mut dnsmasq = Dnsmasq {
            port,
            proc: Proc {
                name: "dnsmasq".into(),
                child,
            },
            hosts: hosts_path,
            dir,
        };
        let probe = format!("probe.{local_domain}");
        // dnsmasq answers within milliseconds of its start; 10 s covers a loaded machine.
        let started = Instant::now();
        while !dnsmasq.answers(&probe) {
            if !dnsmasq.proc.is_running() {
                panic!("dnsmasq exited: {}", dnsmasq.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "dnsmasq did not answer within 10s: {}",
                dnsmasq.log()
            );
            thread::sleep(super::process::POLL);
        }
        dnsmasq
    }

    /// True when an A query for `name` gets any answer (NXDOMAIN and REFUSED included).
    fn answers(&self, name: &str) -> bool {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        // A miss only means "ask again" (the caller polls): 200 ms per try keeps the start-up
        // loop responsive, and a loopback answer takes well under a millisecond.
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
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

    /// Replaces the hosts file atomically and makes dnsmasq reread it (SIGHUP).
    pub fn set_hosts(&self, hosts: &str) {
        let tmp = self.hosts.with_extension("tmp");
        std::fs::write(&tmp, hosts).unwrap();
        std::fs::rename(&tmp, &self.hosts).unwrap();
        self.proc.signal(libc::SIGHUP);
    }

    /// `127.0.0.1:PORT`
    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A `[dns]` table for legate's config that resolves through this server.
    pub fn legate_table(&self, min_ttl: &str, max_ttl: &str) -> String {
        format!(
            "[dns]\nservers = [\"{}\"]\nmin_ttl = \"{min_ttl}\"\nmax_ttl = \"{max_ttl}\"\n",
            self.server()
        )
    }

    /// The log file (`--log-facility`; with `--log-queries`, one line per query).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("dnsmasq.log")
    }

    /// The log, and what dnsmasq wrote to stdout and stderr.
    pub fn log(&self) -> String {
        let read = |name: &str| std::fs::read_to_string(self.dir.path().join(name));
        format!(
            "{}{}",
            read("dnsmasq.out").unwrap_or_default(),
            read("dnsmasq.log").unwrap_or_default()
        )
    }
}
