//! The `legate` process under test. [`LegateBuilder`] writes a config file (an `[admin]`
//! table, `[runtime]` keys, one `[[listeners]]` table per [`Listener`] on a free port, raw
//! TOML) into a temp dir and starts `legate run -c FILE`; [`Legate`] talks to its admin port,
//! signals it and waits for its exit, and on drop kills it and, if the test is panicking,
//! prints its log and config. [`legate_command`] is the binary as a bare `Command`.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::http::http;
use super::metrics::Metrics;
use super::process::{free_port, local, send_signal, wait_child, POLL};

/// The `legate` binary cargo built for these tests.
pub const LEGATE: &str = env!("CARGO_BIN_EXE_legate");

/// A fast active health check, so a dead backend shows up in `/ready` within a second.
pub const FAST_HEALTH: &str = r#"{ check = "tcp", interval = "200ms", timeout = "200ms" }"#;

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
        // legate answers /live within tens of milliseconds of its start; 15 s is a debug build
        // on a loaded machine many times over, and fails only a legate that never comes up.
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
            thread::sleep(POLL);
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
            thread::sleep(POLL);
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
