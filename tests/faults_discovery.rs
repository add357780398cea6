//! Fault suite, discovery and configuration: a thousand ConfigMap `..data` swaps under
//! load, an endpoint file deleted, unreadable or its directory replaced, and a name that
//! turns NXDOMAIN or REFUSED. A truncated or malformed endpoint file is covered by
//! tests/file_discovery.rs (`a_malformed_file_keeps_the_old_set_and_counts_an_error`,
//! `a_zero_byte_file_is_ignored`, `a_comment_only_file_empties_the_set_on_purpose`,
//! `crlf_lines_work`), DNS at start and a dead or stopped DNS server by tests/dns.rs.
//! README.md's "Fault coverage" table lists them all. Each test ends with the shared checker.

mod common;

use common::dns::{backend_port, Dnsmasq, BACKEND_A, BACKEND_B};
use common::fault::{delta, Expect, Probe};
use common::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// legate is ready after its first read of the file (no health check here): milliseconds;
/// 10 s is a loaded 2-core machine's slack.
const READY: Duration = Duration::from_secs(10);

/// The bound on a file change reaching new connections: the watcher's debounce (50 ms, at
/// most 500 ms) and a read; 5 s is a loaded machine's slack.
const CHANGE: Duration = Duration::from_secs(5);

/// How long a test looks for a change that must not happen: the watcher's longest debounce
/// (500 ms; a single event waits 50 ms), so a change would have applied by then.
const NO_CHANGE: Duration = Duration::from_millis(500);

/// (5 s each: a loopback connect and a greeting through legate, milliseconds, on a loaded
/// machine.)
fn which(addr: SocketAddr) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    match read_line(&mut s) {
        Ok(id) if !id.is_empty() => Ok(id),
        Ok(_) => Err("closed without a greeting".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn seen(addr: SocketAddr, connections: usize) -> BTreeSet<String> {
    (0..connections).filter_map(|_| which(addr).ok()).collect()
}

/// The kubelet's AtomicWriter for a ConfigMap volume.
struct ConfigMapVolume {
    dir: PathBuf,
    version: usize,
}

impl ConfigMapVolume {
    fn new(dir: &Path, name: &str, content: &str) -> ConfigMapVolume {
        std::fs::create_dir_all(dir).unwrap();
        let mut volume = ConfigMapVolume {
            dir: dir.to_path_buf(),
            version: 0,
        };
        volume.swap(name, content);
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
        volume
    }

    /// `mkdir ..vN; write; ln -s ..vN ..data_tmp; mv -T ..data_tmp ..data; rm -rf ..vN-1`.
    fn swap(&mut self, name: &str, content: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        std::fs::write(self.dir.join(&version).join(name), content).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if self.version > 1 {
            std::fs::remove_dir_all(self.dir.join(format!("..v{}", self.version - 1))).unwrap();
        }
    }
}

/// 1 000 ConfigMap `..data` swaps, 0–5 ms apart, under load. Endpoint `a` is in
/// every set and `b`/`c` come and go: no client of `a` fails, the final set is exactly the
/// last write (no missed final update), bursts coalesce (far fewer reloads than swaps), and
/// no inotify watch or descriptor leaks.
#[test]
fn a_thousand_configmap_swaps_under_load() {
    let a = TcpBackend::hello("a");
    let b = TcpBackend::hello("b");
    let c = TcpBackend::hello("c");
    let dir = tempfile::tempdir().unwrap();
    let volume_dir = dir.path().join("volume");
    let line = |addr: SocketAddr| format!("{addr}\n");
    let mut volume = ConfigMapVolume::new(&volume_dir, "endpoints", &line(a.addr()));
    let mut legate = Legate::builder()
        .listener(
            Listener::new("svc")
                .upstream(format!("file:{}", volume_dir.join("endpoints").display()))
                .set("health", r#"{ check = "none" }"#),
        )
        .start();
    legate.wait_ready(READY);
    let addr = legate.addr("svc");
    assert_eq!(which(addr).unwrap(), "a");
    let probe = Probe::start(&legate);

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, ops, failures) = (stop.clone(), ops.clone(), failures.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match which(addr) {
                        Ok(_) => {}
                        Err(e) => failures.lock().unwrap().push(e),
                    }
                    ops.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let swaps = 1000;
    let sets = [
        format!("{}{}", line(a.addr()), line(b.addr())),
        line(a.addr()),
        format!("{}{}", line(a.addr()), line(c.addr())),
    ];
    for i in 0..swaps {
        volume.swap("endpoints", &sets[i % 3]);
        // 0-5 ms apart, irregularly: some swaps inside one debounce, some across it.
        thread::sleep(Duration::from_micros(fastrand_ish(i) % 5000));
    }
    // The last write: a and c (swaps % 3 == 1, so index (swaps-1) % 3 == 0 ... pick explicitly).
    volume.swap("endpoints", &sets[2]);
    eventually(CHANGE, "the final set {a, c}", || {
        let got = seen(addr, 12);
        got == BTreeSet::from(["a".to_string(), "c".to_string()])
    });
    stop.store(true, Ordering::SeqCst);
    for t in clients {
        t.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    let ops = ops.load(Ordering::SeqCst);
    let after = legate.metrics();
    let reloads = delta(
        &probe.before,
        &after,
        "legate_reloads_total",
        &[("source", "file")],
    );
    eprintln!(
        "{} swaps: {reloads} file reloads counted, {ops} client operations, {} failures",
        swaps + 1,
        failures.len()
    );
    // A connection may only fail if it was dialled to b or c just as it left the set; `a`
    // is in every set, and with one attempt per distinct endpoint the dial moves on to it.
    assert!(
        failures.is_empty(),
        "{} of {ops} client operations failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        reloads < (swaps / 2) as f64,
        "{reloads} reloads for {swaps} swaps: not coalesced"
    );
    // Stay here a little so a late watcher event would show up as a change (300 ms: six of
    // the watcher's 50 ms debounces).
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        seen(addr, 12),
        BTreeSet::from(["a".to_string(), "c".to_string()])
    );
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                "legate_reloads_total",
                &[("source", "file"), ("result", "ok")],
            )],
            ..Expect::default()
        },
    );
}

/// Cheap deterministic jitter for the swap loop.
fn fastrand_ish(i: usize) -> u64 {
    let mut x = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x
}

/// The endpoint file deleted, made unreadable, and its directory replaced
/// (`mv dir dir.old && mkdir dir`): the last good set stays each time, and the file is
/// picked up again when it reappears — in the new directory too.
#[test]
fn file_deleted_unreadable_and_directory_replaced() {
    let a = TcpBackend::hello("a");
    let b = TcpBackend::hello("b");
    let c = TcpBackend::hello("c");
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("conf");
    std::fs::create_dir(&dir).unwrap();
    let file = dir.join("endpoints");
    std::fs::write(&file, format!("{}\n", a.addr())).unwrap();
    let mut legate = Legate::builder()
        .listener(
            Listener::new("svc")
                .upstream(format!("file:{}", file.display()))
                .set("health", r#"{ check = "none" }"#),
        )
        .start();
    legate.wait_ready(READY);
    let addr = legate.addr("svc");
    assert_eq!(which(addr).unwrap(), "a");
    let probe = Probe::start(&legate);

    // Deleted: the set stays.
    std::fs::remove_file(&file).unwrap();
    thread::sleep(NO_CHANGE);
    assert_eq!(seen(addr, 5), BTreeSet::from(["a".to_string()]));
    legate.wait_status("/ready", 200, CHANGE);
    // Reappears: picked up.
    std::fs::write(&file, format!("{}\n", b.addr())).unwrap();
    eventually(CHANGE, "b after the file reappeared", || {
        seen(addr, 5) == BTreeSet::from(["b".to_string()])
    });

    // Unreadable: a directory where the file should be (EISDIR; chmod 000 means nothing to
    // root, which the suite runs as).
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    thread::sleep(NO_CHANGE);
    assert_eq!(seen(addr, 5), BTreeSet::from(["b".to_string()]));
    std::fs::remove_dir(&file).unwrap();

    // The directory replaced: the watch must follow the path, not the old inode.
    std::fs::write(&file, format!("{}\n", b.addr())).unwrap();
    let old = root.path().join("conf.old");
    std::fs::rename(&dir, &old).unwrap();
    std::fs::create_dir(&dir).unwrap();
    // The new directory has no file yet: the set stays (300 ms, six 50 ms debounces, for a
    // wrong change to show).
    thread::sleep(Duration::from_millis(300));
    assert_eq!(seen(addr, 5), BTreeSet::from(["b".to_string()]));
    std::fs::write(&file, format!("{}\n", c.addr())).unwrap();
    // The watch on the old directory never fires again; the periodic re-read (every 10 s,
    // src/discovery/file.rs POLL) notices the replacement and re-arms: 10 s plus 5 s of slack.
    eventually(
        Duration::from_secs(15),
        "c from the file in the replaced directory",
        || seen(addr, 5) == BTreeSet::from(["c".to_string()]),
    );
    // Writes into the old directory no longer count.
    std::fs::write(old.join("endpoints"), format!("{}\n", a.addr())).unwrap();
    thread::sleep(NO_CHANGE);
    assert_eq!(seen(addr, 5), BTreeSet::from(["c".to_string()]));
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                "legate_reloads_total",
                &[("source", "file"), ("result", "ok")],
            )],
            ..Expect::default()
        },
    );
}

/// A name that resolved turns NXDOMAIN, another turns REFUSED (a transient server
/// failure): the last good answer stays — traffic keeps flowing to it, `/ready` stays 200 —
/// and every failed lookup counts `legate_reloads_total{source="dns",result="error"}`. When
/// the name comes back, the new answer applies.
#[test]
fn nxdomain_and_refused_keep_the_last_good_answer() {
    let port = backend_port();
    let _a = TcpBackend::hello_on(&format!("{BACKEND_A}:{port}"), "a");
    let _b = TcpBackend::hello_on(&format!("{BACKEND_B}:{port}"), "b");
    // Names under local.test that are not in the file get NXDOMAIN, any other missing name
    // REFUSED (no upstream servers).
    let dns = Dnsmasq::start(
        "127.0.0.2 redis.local.test\n127.0.0.2 redis.other.test\n",
        1,
        "local.test",
        &[],
    );
    let mut legate = Legate::builder()
        .raw(&dns.legate_table("1s", "2s"))
        .listener(
            Listener::new("nx")
                .upstream(format!("dns:redis.local.test:{port}"))
                .set("health", r#"{ check = "none" }"#),
        )
        .listener(
            Listener::new("refused")
                .upstream(format!("dns:redis.other.test:{port}"))
                .set("health", r#"{ check = "none" }"#),
        )
        .start();
    // Two first lookups (milliseconds); 15 s is a loaded machine's slack.
    legate.wait_ready(Duration::from_secs(15));
    for name in ["nx", "refused"] {
        assert_eq!(which(legate.addr(name)).unwrap(), "a");
    }
    let probe = Probe::start(&legate);
    // Both names gone: NXDOMAIN for the local domain, REFUSED for the other.
    dns.set_hosts("127.0.0.9 unrelated.local.test\n");
    let errors = |l: &Legate| {
        l.metrics().value(
            "legate_reloads_total",
            &[("source", "dns"), ("result", "error")],
        )
    };
    let before = errors(&legate);
    // The next refresh of each name is due within its 1 s TTL and fails at once (NXDOMAIN,
    // REFUSED): 10 s is a loaded machine's slack.
    eventually(Duration::from_secs(10), "failed lookups counted", || {
        errors(&legate) >= before + 2.0
    });
    // Several refreshes later (3 s: retries back off up to max_ttl, 2 s) the last good answer
    // is still in use, and /ready is 200.
    thread::sleep(Duration::from_secs(3));
    for name in ["nx", "refused"] {
        assert_eq!(
            seen(legate.addr(name), 5),
            BTreeSet::from(["a".to_string()]),
            "{name}"
        );
    }
    assert_eq!(legate.get("/ready").0, 200);
    let (_, endpoints) = legate.get("/endpoints");
    assert!(
        endpoints.contains("NXDOMAIN") || endpoints.contains("no record"),
        "{endpoints}"
    );
    // Back, with a new address: followed.
    dns.set_hosts("127.0.0.3 redis.local.test\n127.0.0.3 redis.other.test\n");
    for name in ["nx", "refused"] {
        // The next retry (at most max_ttl, 2 s, away) gets the new answer; 15 s is slack.
        eventually(
            Duration::from_secs(15),
            &format!("{name}: the new answer"),
            || seen(legate.addr(name), 5) == BTreeSet::from(["b".to_string()]),
        );
    }
    probe.finish(
        &mut legate,
        Expect {
            moved: &[(
                "legate_reloads_total",
                &[("source", "dns"), ("result", "error")],
            )],
            ..Expect::default()
        },
    );
}
