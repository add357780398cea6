//! Processes and ports: free loopback ports, [`Proc`] (a child killed and reaped on drop),
//! [`run_with_timeout`] for a command that must finish, and polling with a deadline
//! ([`eventually`], [`wait_for`], [`wait_listening`]) so no test sleeps for readiness.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

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

/// How often [`wait_for`] and [`eventually`] look again: a wait ends within 25 ms of its
/// condition, and 40 looks a second cost a loaded machine nothing.
pub(super) const POLL: Duration = Duration::from_millis(25);

/// Polls `check` until it returns true; panics with `what` after `timeout`.
///
/// `timeout` is a bound on a failure, never a speed requirement: each caller says why its
/// value is the time the awaited thing needs on a 2-core machine running a CPU hog beside
/// the tests, with slack; a passing wait takes only as long as the condition does.
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
        thread::sleep(POLL);
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

pub(super) fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        io::Error::last_os_error()
    );
}

pub(super) fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        // Looks again every 20 ms: an exit is noticed at once, at no cost.
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

pub(super) fn unsafe_kill_quiet_group(pgid: u32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; errors (already gone) are fine here.
    unsafe {
        libc::kill(-(pgid as libc::pid_t), signal);
    }
}

pub(super) fn unsafe_kill_quiet(pid: u32, signal: i32) {
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
