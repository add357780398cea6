//! The fault suite's shared checker (tests/faults_*.rs; README.md's "Fault coverage" table
//! lists the faults and their tests).
//!
//! Every scenario ends the same way ([`Probe::finish`]): legate is alive, `/ready` answers
//! what the contract says, its descriptors, RSS and threads are back near the baseline taken
//! before the fault (read from /proc, with a tolerance and a bounded wait), the named metrics
//! moved, nothing panicked (`legate_panics_total` is 0 and no "panicked" in the log).
//! Completed transfers are compared by hash with [`assert_same`].

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::*;

/// Whether the long forms of the slow fault tests run (`LEGATE_FAULTS_FULL=1`).
pub fn full() -> bool {
    std::env::var("LEGATE_FAULTS_FULL").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `scaled` by default, `full` under `LEGATE_FAULTS_FULL=1`.
pub fn scale<T>(scaled: T, full_form: T) -> T {
    if full() {
        full_form
    } else {
        scaled
    }
}

/// Open descriptors of `pid` (`/proc/PID/fd`).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// Pipe descriptors of `pid` (splice pipes: each worker thread keeps a pool of up to
/// [`PIPE_POOL_PER_THREAD`] empty pipes for reuse, so these are bounded, not leaked).
pub fn pipe_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|t| t.to_string_lossy().starts_with("pipe:"))
                .count()
        })
        .unwrap_or(0)
}

/// src/proxy/splice.rs `POOL_PER_THREAD`.
pub const PIPE_POOL_PER_THREAD: usize = 32;

fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// Resident set size of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS")
}

/// Threads of `pid` (tokio workers plus its blocking pool: the closest thing to a task count
/// /proc shows).
pub fn threads(pid: u32) -> u64 {
    status_field(pid, "Threads")
}

/// CPU time (user + system) of `pid` so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ')'.
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// A point-in-time sample of legate's resources.
#[derive(Debug, Clone, Copy)]
pub struct Resources {
    /// Descriptors other than pipes.
    pub fds: usize,
    /// Pipe descriptors (two per pooled splice pipe).
    pub pipes: usize,
    pub rss_kib: u64,
    pub threads: u64,
}

impl Resources {
    pub fn of(pid: u32) -> Resources {
        let pipes = pipe_count(pid);
        Resources {
            fds: fd_count(pid).saturating_sub(pipes),
            pipes,
            rss_kib: rss_kib(pid),
            threads: threads(pid),
        }
    }
}

/// What a scenario expects at its end.
pub struct Expect<'a> {
    /// The status `/ready` must answer (eventually, within the settle time).
    pub ready: u16,
    /// Metrics that must have grown since the baseline: (name, labels).
    pub moved: &'a [(&'a str, &'a [(&'a str, &'a str)])],
    /// Descriptors allowed above the baseline once settled.
    pub fd_slack: usize,
    /// RSS (KiB) allowed above the baseline once settled: the allocator keeps some of what it
    /// grew to, so this is "bounded", not "identical".
    pub rss_slack_kib: u64,
    /// Threads allowed above the baseline (tokio's blocking pool lingers 10s).
    pub thread_slack: u64,
    /// How long resources may take to come back (and `/ready` to answer `ready`).
    pub settle: Duration,
}

impl Default for Expect<'_> {
    fn default() -> Self {
        Expect {
            ready: 200,
            moved: &[],
            fd_slack: 2,
            rss_slack_kib: 16 * 1024,
            thread_slack: 16,
            // tokio's blocking-pool threads linger 10 s after their last job, and the thread
            // count must come back; 5 s more is a loaded machine's slack.
            settle: Duration::from_secs(15),
        }
    }
}

/// The baseline of one scenario: resources and a metrics scrape taken before the fault.
pub struct Probe {
    pub pid: u32,
    pub baseline: Resources,
    pub before: Metrics,
}

impl Probe {
    /// Takes the baseline. Call it once legate is ready and has served a first connection,
    /// so lazily created state (a pipe pool, allocator arenas) is part of it.
    pub fn start(legate: &Legate) -> Probe {
        let pid = legate.pid();
        let before = legate.metrics();
        // Descriptors can still be closing from the warm-up; take the lowest of a few samples.
        let mut baseline = Resources::of(pid);
        // Five samples 40 ms apart: 200 ms in all, enough for descriptors still closing.
        for _ in 0..5 {
            thread::sleep(Duration::from_millis(40));
            let now = Resources::of(pid);
            baseline.fds = baseline.fds.min(now.fds);
            baseline.rss_kib = baseline.rss_kib.max(now.rss_kib);
            baseline.threads = baseline.threads.max(now.threads);
        }
        eprintln!("fault probe: baseline {baseline:?}");
        Probe {
            pid,
            baseline,
            before,
        }
    }

    /// The shared end-of-scenario check; returns the final scrape.
    pub fn finish(&self, legate: &mut Legate, expect: Expect<'_>) -> Metrics {
        legate.assert_running();
        // /ready as the contract says.
        legate.wait_status("/ready", expect.ready, expect.settle);
        // Resources back near the baseline, within a bounded wait.
        let deadline = Instant::now() + expect.settle;
        let mut last;
        loop {
            legate.assert_running();
            last = Resources::of(self.pid);
            // Pooled pipes are reused, not leaked: at most the pools' size (2 fds a pipe).
            let pipe_cap = self
                .baseline
                .pipes
                .max(2 * PIPE_POOL_PER_THREAD * last.threads.max(self.baseline.threads) as usize);
            let ok = last.fds <= self.baseline.fds + expect.fd_slack
                && last.pipes <= pipe_cap
                && last.rss_kib <= self.baseline.rss_kib + expect.rss_slack_kib
                && last.threads <= self.baseline.threads + expect.thread_slack;
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "resources did not come back within {:?}: baseline {:?}, now {last:?} \
                 (slack: {} fds, {} KiB, {} threads); fds now: {:?}\nlog:\n{}",
                expect.settle,
                self.baseline,
                expect.fd_slack,
                expect.rss_slack_kib,
                expect.thread_slack,
                fd_targets(self.pid),
                tail(&legate.log(), 60)
            );
            // Each look reads several /proc files: every 100 ms is often enough.
            thread::sleep(Duration::from_millis(100));
        }
        eprintln!("fault probe: end {last:?} (baseline {:?})", self.baseline);
        let after = legate.metrics();
        for (name, labels) in expect.moved {
            let before = self.before.value(name, labels);
            let now = after.value(name, labels);
            assert!(
                now > before,
                "{name}{labels:?} did not move: {before} -> {now}\nmetrics:\n{}",
                relevant(&after.text, name)
            );
        }
        assert_eq!(
            after.value("legate_panics_total", &[]),
            0.0,
            "legate_panics_total is not 0; log:\n{}",
            legate.log()
        );
        let log = legate.log();
        assert!(
            !log.contains("panicked"),
            "legate's log shows a panic:\n{log}"
        );
        after
    }
}

/// The growth of `name{labels}` between two scrapes.
pub fn delta(before: &Metrics, after: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value(name, labels) - before.value(name, labels)
}

/// Byte-exact: compares lengths and SHA-256 (a mismatch prints hashes, not megabytes).
pub fn assert_same(what: &str, expected: &[u8], got: &[u8]) {
    assert!(
        expected.len() == got.len() && sha256_hex(expected) == sha256_hex(got),
        "{what}: expected {} bytes (sha256 {}), got {} bytes (sha256 {})",
        expected.len(),
        sha256_hex(expected),
        got.len(),
        sha256_hex(got)
    );
}

fn relevant(text: &str, name: &str) -> String {
    let prefix = name.split('{').next().unwrap_or(name);
    text.lines()
        .filter(|line| line.contains(prefix))
        .collect::<Vec<_>>()
        .join("\n")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn fd_targets(pid: u32) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|t| t.display().to_string())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Runs `body` on a thread moved into a fresh network namespace (`unshare(CLONE_NEWNET)`,
/// loopback up). Every socket the body opens, and every process it spawns (legate included),
/// lives in that namespace; it disappears with them, so there is nothing to clean up.
pub fn in_new_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let handle = thread::spawn(move || {
        // SAFETY: unshare(2) has no memory-safety preconditions; CLONE_NEWNET affects only
        // this thread (and what it spawns from now on).
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "unshare(CLONE_NEWNET) (the fault suite runs as root): {}",
            io::Error::last_os_error()
        );
        sh("ip link set lo up");
        body()
    });
    match handle.join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Runs a shell command (in the caller's network namespace) and asserts it succeeded.
pub fn sh(command: &str) -> String {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(command);
    // `ip`, `sysctl` and the like finish in milliseconds; 30 s fails a hung one.
    let output = run_with_timeout(cmd, Duration::from_secs(30));
    assert!(
        output.status.success(),
        "`{command}` failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Closes `stream` abortively: `SO_LINGER` 0, so the peer gets an RST instead of a FIN.
pub fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a descriptor we own, with a correctly sized linger value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", io::Error::last_os_error());
    drop(stream);
}

/// Sends `data`, half-closes, reads everything back (a thread writes while this one reads, so
/// large payloads cannot deadlock on full buffers).
pub fn roundtrip(addr: SocketAddr, data: &[u8]) -> io::Result<Vec<u8>> {
    // A loopback connect (5 s: a loaded machine); 30 s per read, since the payloads here
    // run to tens of MiB and the backend may be a socat fork hashing them.
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut writer = stream.try_clone()?;
    let data = data.to_vec();
    let sender = thread::spawn(move || -> io::Result<()> {
        writer.write_all(&data)?;
        writer.shutdown(Shutdown::Write)
    });
    let (got, error) = read_to_end(&mut stream);
    sender
        .join()
        .map_err(|_| io::Error::other("writer panicked"))??;
    match error {
        Some(error) => Err(error),
        None => Ok(got),
    }
}
