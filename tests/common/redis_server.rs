//! A throwaway `redis-server` ([`RedisServer`]: stop, restart on the same port, SIGSTOP and
//! SIGCONT) and a real Redis client connection with timeouts ([`redis_connect`]). (Not
//! `redis.rs`: a module named `redis` would shadow the `redis` crate for `use super::*`.)

use std::fs::File;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use super::process::{free_port, local, require_bin, wait_for, Proc};

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
        // redis-server answers within milliseconds; 15 s covers a loaded machine.
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
    // A loopback connect, milliseconds (5 s: a loaded machine); replies may wait behind a
    // paused or slow server or a big transfer through legate, so 30 s per read or write.
    let con = client.get_connection_with_timeout(Duration::from_secs(5))?;
    con.set_read_timeout(Some(Duration::from_secs(30)))?;
    con.set_write_timeout(Some(Duration::from_secs(30)))?;
    Ok(con)
}
