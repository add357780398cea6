//! A throwaway MariaDB server ([`MariaDb`]: a fresh datadir, with or without grant tables)
//! and the `mariadb` command-line client ([`mariadb_query`]).

use std::fs::File;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;

use super::process::{free_port, local, require_bin, run_with_timeout, wait_for, Proc};

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
        // mariadb-install-db takes a few seconds on an idle machine and several times that
        // on a busy 2-core one (installs also take turns here); 120 s fails a hung install
        // without failing a slow one.
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
        // mariadbd starts in one to a few seconds (InnoDB recovery, buffer pool), far longer
        // when the machine is loaded: 60 s.
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
    // `--connect-timeout=5` bounds the connect; queries are small, but a 64 MiB packet
    // through legate on a loaded machine may take seconds: 60 s fails only a hung client.
    run_with_timeout(cmd, Duration::from_secs(60))
}
