//! Endpoint files (`file:PATH` targets) against the real `legate` binary, with backends that
//! name themselves on accept (`TcpBackend::hello`) and, where a real server matters, two
//! `redis-server`s told apart by a key:
//! - the file switched between backend A and backend B by a rewrite in place, by
//!   write-then-rename, and by a Kubernetes ConfigMap-style `..data` swap: after each change
//!   new connections reach the new backend within one second (the delay from the change to the
//!   first connection on the new backend is printed as `SWAP-DELAY`, median and worst);
//! - a deleted file keeps the last good set and its recreation applies; a file that does not
//!   exist at start is no start-up error (the listener binds, `/ready` is 503 naming the
//!   target, 200 once the file appears);
//! - a malformed file (garbage, port 70000, IPv6 without brackets, a NUL byte, 2 MiB) keeps the
//!   old set and counts `legate_reloads_total{source="file",result="error"}`; a zero-byte file
//!   is ignored; a comment-only file empties the set on purpose; CRLF lines work; `weight=3`
//!   splits round-robin traffic 3:1; a `backup` gets traffic only while the primary is down;
//! - under load (four client threads: connect, read the greeting, close), 100 swaps
//!   alternating rename and `..data` swap: no failed client operation, and connections opened
//!   before the swaps still work after them (printed as `LOAD:`);
//! - `/endpoints` shows the file target's `updated` time and `file:PATH` among the endpoints'
//!   `sources`.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tempfile::TempDir;

/// The bound on waits other than a file change itself: start-up, 200 ms health checks and
/// `/endpoints` take milliseconds; 15 s is a loaded 2-core machine's slack.
const T: Duration = Duration::from_secs(15);
/// The contract: a change reaches new connections within one second.
const SWAP_LIMIT: Duration = Duration::from_secs(1);
/// How long a test polls for a change before giving up (so a slow change is measured, not
/// just failed): three times SWAP_LIMIT, while a change is the watcher's debounce (50 ms, at
/// most 500 ms), a read and, for a new endpoint, its first check (run at once).
const SWAP_DEADLINE: Duration = Duration::from_secs(3);
/// The bound on a change that is not measured against SWAP_LIMIT (an error counted, `/ready`
/// following a file that empties or fills): the same work as a swap, so SWAP_DEADLINE's 3 s.
const CHANGE: Duration = SWAP_DEADLINE;

// ---------------------------------------------------------------------------------------------
// Endpoint files, updated the ways real systems update them
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// open(O_TRUNC) + write on the same inode.
    InPlace,
    /// Write a temp file in the same directory, rename(2) it over the file.
    Rename,
    /// The kubelet's ConfigMap volume: `endpoints -> ..data/endpoints`,
    /// `..data -> ..2026_N`; a swap writes `..2026_N+1/`, points `..data_tmp` at it, renames
    /// `..data_tmp` over `..data` and removes the old directory.
    ConfigMap,
}

struct EndpointFile {
    dir: TempDir,
    method: Method,
    generation: usize,
}

impl EndpointFile {
    fn new(method: Method, content: &str) -> EndpointFile {
        let file = EndpointFile {
            dir: tempfile::tempdir().expect("tempdir"),
            method,
            generation: 0,
        };
        if method == Method::ConfigMap {
            let data = file.data_dir(0);
            std::fs::create_dir(&data).unwrap();
            std::fs::write(data.join("endpoints"), content).unwrap();
            std::os::unix::fs::symlink(file.data_name(0), file.dir.path().join("..data")).unwrap();
            std::os::unix::fs::symlink("..data/endpoints", file.path()).unwrap();
        } else {
            std::fs::write(file.path(), content).unwrap();
        }
        file
    }

    /// A file that does not exist yet (its directory does).
    fn missing(method: Method) -> EndpointFile {
        EndpointFile {
            dir: tempfile::tempdir().expect("tempdir"),
            method,
            generation: 0,
        }
    }

    fn data_name(&self, generation: usize) -> String {
        format!("..2026_11_26_08_00_00.{generation:06}")
    }

    fn data_dir(&self, generation: usize) -> PathBuf {
        self.dir.path().join(self.data_name(generation))
    }

    /// The path legate watches (for a ConfigMap, the visible symlink).
    fn path(&self) -> PathBuf {
        self.dir.path().join("endpoints")
    }

    fn target(&self) -> String {
        format!("file:{}", self.path().display())
    }

    fn write(&mut self, content: impl AsRef<[u8]>) {
        let content = content.as_ref();
        self.generation += 1;
        match self.method {
            Method::InPlace => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(self.path())
                    .unwrap();
                file.write_all(content).unwrap();
            }
            Method::Rename => {
                let tmp = self
                    .dir
                    .path()
                    .join(format!(".endpoints.tmp.{}", self.generation));
                std::fs::write(&tmp, content).unwrap();
                std::fs::rename(&tmp, self.path()).unwrap();
            }
            Method::ConfigMap => {
                let old = self.data_dir(self.generation - 1);
                let new = self.data_dir(self.generation);
                std::fs::create_dir(&new).unwrap();
                std::fs::write(new.join("endpoints"), content).unwrap();
                let tmp_link = self.dir.path().join("..data_tmp");
                std::os::unix::fs::symlink(self.data_name(self.generation), &tmp_link).unwrap();
                std::fs::rename(&tmp_link, self.dir.path().join("..data")).unwrap();
                if old.exists() {
                    std::fs::remove_dir_all(&old).unwrap();
                }
                if !self.path().exists() {
                    // First write of a ConfigMap that did not exist: the visible link.
                    std::os::unix::fs::symlink("..data/endpoints", self.path()).unwrap();
                }
            }
        }
    }

    fn remove(&self) {
        std::fs::remove_file(self.path()).unwrap();
    }
}

fn line(addr: SocketAddr) -> String {
    format!("{addr}\n")
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

fn which(addr: SocketAddr) -> String {
    try_which(addr).unwrap_or_else(|e| panic!("a connection via {addr} failed: {e}"))
}

fn tally(addr: SocketAddr, connections: usize) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..connections {
        *counts.entry(which(addr)).or_insert(0) += 1;
    }
    counts
}

fn assert_all_reach(addr: SocketAddr, id: &str, connections: usize, context: &str) {
    let counts = tally(addr, connections);
    assert_eq!(
        counts.get(id),
        Some(&connections),
        "{context}: every connection should reach {id}, got {counts:?}"
    );
}

fn wait_reaches(addr: SocketAddr, id: &str, what: &str) {
    eventually(T, what, || try_which(addr).as_deref() == Ok(id));
}

/// Polls new connections until one reaches `id`; returns the delay since `since`. Failed
/// connections on the way are collected into `failures`.
fn first_on(
    addr: SocketAddr,
    id: &str,
    since: Instant,
    failures: &mut Vec<String>,
) -> Option<Duration> {
    loop {
        match try_which(addr) {
            Ok(got) if got == id => return Some(since.elapsed()),
            Ok(_) => {}
            Err(e) => failures.push(format!("{:?} after the change: {e}", since.elapsed())),
        }
        if since.elapsed() > SWAP_DEADLINE {
            return None;
        }
        // Every 5 ms: the delay is measured to within 5 ms.
        thread::sleep(Duration::from_millis(5));
    }
}

fn summary(label: &str, delays: &[Duration]) -> (Duration, Duration) {
    let mut sorted = delays.to_vec();
    sorted.sort();
    let median = sorted[sorted.len() / 2];
    let worst = *sorted.last().unwrap();
    println!(
        "SWAP-DELAY {label}: swaps={} median={median:?} worst={worst:?} all={sorted:?}",
        sorted.len()
    );
    (median, worst)
}

fn file_error_count(legate: &Legate) -> f64 {
    legate.metrics().value(
        "legate_reloads_total",
        &[("source", "file"), ("result", "error")],
    )
}

fn start_legate(target: &str) -> Legate {
    start_with(Listener::new("svc").upstream(target).fast_health())
}

fn start_with(listener: Listener) -> Legate {
    Legate::builder().listener(listener).start()
}

/// A ready legate with two listeners: `plain` following `plain`, `cm` following `configmap`.
fn start_plain_and_cm(plain: &EndpointFile, configmap: &EndpointFile) -> Legate {
    let mut legate = Legate::builder()
        .listener(
            Listener::new("plain")
                .upstream(plain.target())
                .fast_health(),
        )
        .listener(
            Listener::new("cm")
                .upstream(configmap.target())
                .fast_health(),
        )
        .start();
    legate.wait_ready(T);
    legate
}

/// An endpoint file (updated by `method`) naming `backend`, and a ready legate whose listener
/// `svc` follows it; returns the file, legate and the listener's address.
fn serve_file(method: Method, backend: SocketAddr) -> (EndpointFile, Legate, SocketAddr) {
    let file = EndpointFile::new(method, &line(backend));
    let mut legate = start_legate(&file.target());
    legate.wait_ready(T);
    let listen = legate.addr("svc");
    (file, legate, listen)
}

/// For `duration`, every new connection via `addr` reaches `id`.
fn assert_stays_on(addr: SocketAddr, id: &str, duration: Duration, context: &str) {
    let until = Instant::now() + duration;
    while Instant::now() < until {
        assert_eq!(try_which(addr).as_deref(), Ok(id), "{context}");
        thread::sleep(Duration::from_millis(50)); // twenty connections a second
    }
}

// ---------------------------------------------------------------------------------------------
// Switching A <-> B
// ---------------------------------------------------------------------------------------------

fn switch_repeatedly(method: Method, swaps: usize) {
    let a = TcpBackend::hello("A");
    let b = TcpBackend::hello("B");
    let (mut file, mut legate, listen) = serve_file(method, a.addr());
    assert_all_reach(listen, "A", 5, "before any change");

    let mut delays = Vec::new();
    let mut failures = Vec::new();
    let mut late = Vec::new();
    for swap in 0..swaps {
        let (backend, id) = if swap % 2 == 0 { (&b, "B") } else { (&a, "A") };
        file.write(line(backend.addr()));
        let changed = Instant::now();
        match first_on(listen, id, changed, &mut failures) {
            Some(delay) => delays.push(delay),
            None => late.push(format!(
                "swap {swap}: no connection reached {id} within {SWAP_DEADLINE:?}"
            )),
        }
        // Once one connection reached the new backend, the old one is gone for good.
        if late.is_empty() {
            assert_all_reach(listen, id, 5, &format!("after swap {swap} ({method:?})"));
        }
        legate.assert_running();
    }
    let label = format!("{method:?}");
    if !delays.is_empty() {
        let (_, worst) = summary(&label, &delays);
        assert!(
            late.is_empty() && worst <= SWAP_LIMIT,
            "{method:?}: a change must reach new connections within {SWAP_LIMIT:?}; worst {worst:?}; {late:?}"
        );
    }
    assert!(late.is_empty(), "{late:?}");
    assert!(
        failures.is_empty(),
        "{method:?}: {} connections failed while the file changed: {failures:?}",
        failures.len()
    );
}

#[test]
fn rewrite_in_place_moves_new_connections_within_a_second() {
    switch_repeatedly(Method::InPlace, 10);
}

#[test]
fn write_then_rename_moves_new_connections_within_a_second() {
    switch_repeatedly(Method::Rename, 10);
}

#[test]
fn configmap_data_swap_moves_new_connections_within_a_second() {
    switch_repeatedly(Method::ConfigMap, 10);
}

/// Two real redis-servers, told apart by a key each holds; the file moves between them by
/// rename and by `..data` swap, and a real Redis client through legate follows.
#[test]
fn real_redis_servers_follow_the_file() {
    let servers = [RedisServer::start(), RedisServer::start()];
    for (server, name) in servers.iter().zip(["redis-a", "redis-b"]) {
        let mut con = redis_connect(server.addr()).unwrap();
        let _: () = redis::cmd("SET")
            .arg("who")
            .arg(name)
            .query(&mut con)
            .unwrap();
    }
    let mut plain = EndpointFile::new(Method::Rename, &line(servers[0].addr()));
    let mut configmap = EndpointFile::new(Method::ConfigMap, &line(servers[0].addr()));
    let legate = start_plain_and_cm(&plain, &configmap);
    let who = |addr: SocketAddr| -> Result<String, String> {
        let mut con = redis_connect(addr).map_err(|e| e.to_string())?;
        redis::cmd("GET")
            .arg("who")
            .query::<String>(&mut con)
            .map_err(|e| e.to_string())
    };
    let mut delays = Vec::new();
    for round in 0..4 {
        let (index, name) = if round % 2 == 0 {
            (1, "redis-b")
        } else {
            (0, "redis-a")
        };
        for (file, listener) in [(&mut plain, "plain"), (&mut configmap, "cm")] {
            let addr = legate.addr(listener);
            file.write(line(servers[index].addr()));
            let changed = Instant::now();
            wait_for(
                SWAP_DEADLINE,
                &format!("{listener}: GET who through legate to answer {name}"),
                || (who(addr).ok()? == name).then_some(()),
            );
            delays.push(changed.elapsed());
            for _ in 0..5 {
                assert_eq!(who(addr).as_deref(), Ok(name), "{listener} round {round}");
            }
        }
    }
    let (_, worst) = summary("redis", &delays);
    assert!(worst <= SWAP_LIMIT, "worst delay {worst:?}");
}

// ---------------------------------------------------------------------------------------------
// Deleted, missing
// ---------------------------------------------------------------------------------------------

#[test]
fn a_deleted_file_keeps_the_last_set_and_its_recreation_applies() {
    let a = TcpBackend::hello("A");
    let b = TcpBackend::hello("B");
    let (mut file, legate, listen) = serve_file(Method::InPlace, a.addr());

    file.remove();
    // Longer than the debounce and a health-check round: nothing may change. (1.2 s: past the
    // watcher's 500 ms longest debounce and several 200 ms checks.)
    assert_stays_on(
        listen,
        "A",
        Duration::from_millis(1200),
        "with the file deleted, the last good set must stay",
    );
    assert_eq!(
        legate.get("/ready").0,
        200,
        "a deleted file must not take the listener out of rotation"
    );

    file.write(line(b.addr()));
    let changed = Instant::now();
    let mut failures = Vec::new();
    let delay = first_on(listen, "B", changed, &mut failures)
        .expect("the recreated file should move new connections to B");
    println!("SWAP-DELAY recreate: {delay:?}");
    assert!(delay <= SWAP_LIMIT, "recreation applied after {delay:?}");
    assert!(failures.is_empty(), "{failures:?}");
    assert_all_reach(listen, "B", 5, "after recreation");
}

#[test]
fn a_file_missing_at_start_is_no_startup_error() {
    let a = TcpBackend::hello("A");
    let mut file = EndpointFile::missing(Method::Rename);
    let mut legate = start_legate(&file.target());
    let listen = legate.addr("svc");
    wait_listening(listen.port(), T, "the listener of a missing file");
    let (status, body) = legate.get("/ready");
    assert_eq!(status, 503, "no endpoint yet: /ready must be 503: {body}");
    assert!(
        body.contains(&file.target()),
        "/ready should name the unresolved target {}: {body:?}",
        file.target()
    );
    assert_eq!(legate.get("/live").0, 200);

    file.write(line(a.addr()));
    let written = Instant::now();
    // The directory is watched: the event, the watcher's debounce (at most 500 ms), a read
    // and the first check take well under a second; 5 s is a loaded machine's slack.
    legate.wait_ready(Duration::from_secs(5));
    println!("file appeared -> /ready 200 after {:?}", written.elapsed());
    assert_all_reach(listen, "A", 5, "once the file exists");
}

#[test]
fn a_configmap_missing_at_start_is_followed_once_mounted() {
    let a = TcpBackend::hello("A");
    let mut file = EndpointFile::missing(Method::ConfigMap);
    let mut legate = start_legate(&file.target());
    let listen = legate.addr("svc");
    wait_listening(listen.port(), T, "the listener of a missing file");
    legate.wait_not_ready(T);

    // The whole ..data structure appears at once (the visible link last).
    let data = file.data_dir(1);
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("endpoints"), line(a.addr())).unwrap();
    std::os::unix::fs::symlink(file.data_name(1), file.dir.path().join("..data")).unwrap();
    file.generation = 1;
    std::os::unix::fs::symlink("..data/endpoints", file.path()).unwrap();
    // The directory is watched: the event, the watcher's debounce (at most 500 ms), a read
    // and the first check take well under a second; 5 s is a loaded machine's slack.
    legate.wait_ready(Duration::from_secs(5));
    assert_all_reach(listen, "A", 5, "once the ConfigMap is mounted");
}

// ---------------------------------------------------------------------------------------------
// Bad and unusual contents
// ---------------------------------------------------------------------------------------------

#[test]
fn a_malformed_file_keeps_the_old_set_and_counts_an_error() {
    let a = TcpBackend::hello("A");
    let b = TcpBackend::hello("B");
    let (mut file, mut legate, listen) = serve_file(Method::Rename, a.addr());
    assert_all_reach(listen, "A", 3, "at start");

    // Each bad file also names B on a good line, so a partly applied file would show.
    let good_b = line(b.addr());
    let mut huge = good_b.clone();
    while huge.len() < 2 << 20 {
        huge.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", format!("{good_b}garbage\n").into_bytes()),
        (
            "port 70000",
            format!("{good_b}127.0.0.1:70000\n").into_bytes(),
        ),
        (
            "IPv6 without brackets",
            format!("{good_b}::1:{}\n", b.addr().port()).into_bytes(),
        ),
        (
            "a NUL byte",
            format!("{good_b}127.0.0.1:{}\0\n", a.addr().port()).into_bytes(),
        ),
        ("2 MiB", huge.into_bytes()),
    ];
    for (what, content) in cases {
        let before = file_error_count(&legate);
        file.write(&content);
        eventually(
            CHANGE,
            &format!("{what}: legate_reloads_total{{source=\"file\",result=\"error\"}} to rise"),
            || file_error_count(&legate) > before,
        );
        assert_all_reach(listen, "A", 10, &format!("{what}: the old set must stay"));
        assert_eq!(legate.get("/ready").0, 200, "{what}: still ready");
        legate.assert_running();
    }
    let log = legate.log();
    let path = file.path().display().to_string();
    assert!(
        log.contains(&format!("{path}:2:")),
        "the log should say `{path}:LINE: what is wrong`, got:\n{log}"
    );

    // A good file after the bad ones applies.
    file.write(line(b.addr()));
    wait_reaches(listen, "B", "a good file after the bad ones to apply");
}

#[test]
fn a_zero_byte_file_is_ignored() {
    let a = TcpBackend::hello("A");
    let (mut file, legate, listen) = serve_file(Method::InPlace, a.addr());
    let errors = file_error_count(&legate);

    file.write(b"");
    // 1.2 s: past the watcher's 500 ms longest debounce and several 200 ms health checks.
    assert_stays_on(
        listen,
        "A",
        Duration::from_millis(1200),
        "a zero-byte file is a write in progress: the old set stays",
    );
    assert_eq!(legate.get("/ready").0, 200);
    assert_eq!(
        file_error_count(&legate),
        errors,
        "a zero-byte file is not an error"
    );
}

#[test]
fn a_comment_only_file_empties_the_set_on_purpose() {
    let a = TcpBackend::hello("A");
    let (mut file, mut legate, listen) = serve_file(Method::Rename, a.addr());
    let errors = file_error_count(&legate);
    let rejected = |legate: &Legate| {
        legate.metrics().value(
            "legate_connections_rejected_total",
            &[("listener", "svc"), ("reason", "no_endpoint")],
        )
    };
    let rejected_before = rejected(&legate);

    file.write("# drained on purpose\n\n   # nothing here\n");
    legate.wait_not_ready(CHANGE);
    let (_, body) = legate.get("/ready");
    assert!(
        body.contains("svc"),
        "/ready should name the listener: {body}"
    );
    let result = try_which(listen);
    assert!(
        result.is_err(),
        "with an empty set a connection must be rejected, got {result:?}"
    );
    eventually(CHANGE, "no_endpoint rejection counted", || {
        rejected(&legate) > rejected_before
    });
    assert_eq!(
        file_error_count(&legate),
        errors,
        "an empty set on purpose is not an error"
    );

    file.write(line(a.addr()));
    legate.wait_ready(CHANGE);
    assert_all_reach(listen, "A", 3, "after the set is filled again");
}

#[test]
fn crlf_lines_work() {
    let a = TcpBackend::hello("A");
    let b = TcpBackend::hello("B");
    let (mut file, legate, listen) = serve_file(Method::Rename, a.addr());
    let errors = file_error_count(&legate);

    file.write(format!(
        "# written on Windows\r\n\r\n{} weight=2\r\n",
        b.addr()
    ));
    wait_reaches(listen, "B", "a CRLF file to apply");
    assert_all_reach(listen, "B", 5, "CRLF file");
    assert_eq!(file_error_count(&legate), errors, "CRLF is no error");
}

#[test]
fn weight_3_splits_round_robin_traffic_3_to_1() {
    let a = TcpBackend::hello("A");
    let b = TcpBackend::hello("B");
    let file = EndpointFile::new(
        Method::Rename,
        &format!("{} weight=3\n{}\n", a.addr(), b.addr()),
    );
    let mut legate = start_with(
        Listener::new("svc")
            .upstream(file.target())
            .set("balance", "\"round-robin\"")
            .fast_health(),
    );
    legate.wait_ready(T);
    let listen = legate.addr("svc");
    // Both endpoints must have passed their first check before counting.
    eventually(T, "both endpoints to get traffic", || {
        let counts = tally(listen, 8);
        counts.contains_key("A") && counts.contains_key("B")
    });
    let counts = tally(listen, 80);
    println!("weight=3 vs 1 over 80 connections: {counts:?}");
    let got_a = counts.get("A").copied().unwrap_or(0);
    let got_b = counts.get("B").copied().unwrap_or(0);
    assert_eq!(got_a + got_b, 80, "{counts:?}");
    assert!(
        (58..=62).contains(&got_a),
        "weight=3 against weight=1 should split 60:20, got {counts:?}"
    );
}

#[test]
fn a_backup_gets_traffic_only_while_the_primary_is_down() {
    let a = TcpBackend::hello("A");
    let b = TcpBackend::hello("B");
    let file = EndpointFile::new(
        Method::Rename,
        &format!("{}\n{} backup\n", a.addr(), b.addr()),
    );
    let mut legate = start_legate(&file.target());
    legate.wait_ready(T);
    let listen = legate.addr("svc");
    // Give the backup time to pass its own first check too: it must still get nothing.
    eventually(T, "both endpoints checked healthy", || {
        let (_, body) = legate.get("/endpoints");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        json["listeners"][0]["endpoints"]
            .as_array()
            .is_some_and(|eps| eps.len() == 2 && eps.iter().all(|e| e["health"] == "healthy"))
    });
    assert_all_reach(listen, "A", 30, "with the primary up");

    drop(a);
    let down = Instant::now();
    wait_reaches(
        listen,
        "B",
        "the backup to take over once the primary is down",
    );
    println!("primary down -> backup after {:?}", down.elapsed());
    // Once the primary's death has been noticed, every connection goes to the backup. 600 ms:
    // three 200 ms checks, so its second failure (unhealthy_after 2) has been counted too.
    thread::sleep(Duration::from_millis(600));
    assert_all_reach(listen, "B", 20, "with the primary down");
}

// ---------------------------------------------------------------------------------------------
// Under load
// ---------------------------------------------------------------------------------------------

#[test]
fn a_hundred_swaps_under_load_fail_no_client_operation() {
    let a = TcpBackend::hello("A");
    let b = TcpBackend::hello("B");
    let mut plain = EndpointFile::new(Method::Rename, &line(a.addr()));
    let mut configmap = EndpointFile::new(Method::ConfigMap, &line(a.addr()));
    let mut legate = start_plain_and_cm(&plain, &configmap);
    let listeners = [legate.addr("plain"), legate.addr("cm")];

    // Long-lived connections, opened before the swaps (to A), used after them.
    let mut long_lived: Vec<TcpStream> = Vec::new();
    for addr in listeners {
        for _ in 0..2 {
            let mut stream = connect(addr);
            assert_eq!(read_line(&mut stream).unwrap(), "A");
            long_lived.push(stream);
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = Arc::new(Mutex::new(BTreeMap::<(usize, String), usize>::new()));
    let started = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let addr = listeners[i % 2];
            let (stop, ops, failures, seen) =
                (stop.clone(), ops.clone(), failures.clone(), seen.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match try_which(addr) {
                        Ok(id) => {
                            *seen.lock().unwrap().entry((i % 2, id)).or_insert(0) += 1;
                        }
                        Err(e) => failures.lock().unwrap().push(format!(
                            "client {i} ({addr}) at {:?}: {e}",
                            started.elapsed()
                        )),
                    }
                    ops.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    let file_ok = |legate: &Legate| {
        legate.metrics().value(
            "legate_reloads_total",
            &[("source", "file"), ("result", "ok")],
        )
    };
    let applied_before = file_ok(&legate);
    // The clients are under way (hundreds of operations) before the first swap.
    thread::sleep(Duration::from_millis(300));
    let mut last = ["A", "A"];
    let mut last_write = [Instant::now(); 2];
    for swap in 0..100 {
        let which_file = swap % 2;
        let (backend, id) = if (swap / 2) % 2 == 0 {
            (&b, "B")
        } else {
            (&a, "A")
        };
        let file = if which_file == 0 {
            &mut plain
        } else {
            &mut configmap
        };
        file.write(line(backend.addr()));
        last[which_file] = id;
        last_write[which_file] = Instant::now();
        // A few ms apart, irregularly: a fixed period could alias with the watcher's
        // 50ms debounce so that every read lands on the same content.
        thread::sleep(Duration::from_millis(
            2 + (payload(1, swap as u64 + 7)[0] % 28) as u64,
        ));
    }
    let swaps_done = started.elapsed();
    // Under load too, the last write of each file reaches new connections within a second:
    // measured until five connections in a row reach it.
    let mut settle = Vec::new();
    for (index, addr) in listeners.iter().enumerate() {
        let mut in_a_row = 0;
        let delay = wait_for(SWAP_DEADLINE, "the last write to apply under load", || {
            match try_which(*addr) {
                Ok(id) if id == last[index] => in_a_row += 1,
                Ok(_) => in_a_row = 0,
                Err(e) => {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("main thread after the swaps: {e}"));
                    in_a_row = 0;
                }
            }
            (in_a_row >= 5).then(|| last_write[index].elapsed())
        });
        settle.push(delay);
    }
    println!("SWAP-DELAY under load (last write -> five connections in a row on it): {settle:?}");
    // Keep the load on a little longer (half a second: a watcher's longest debounce).
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().unwrap();
    }

    let total = ops.load(Ordering::SeqCst);
    let applied = file_ok(&legate) - applied_before;
    let failures = failures.lock().unwrap().clone();
    let seen = seen.lock().unwrap().clone();
    println!(
        "LOAD: client operations={total} failures={} (100 swaps took {swaps_done:?}, legate applied {applied} file reads); per (listener, backend): {seen:?}",
        failures.len()
    );
    for failure in failures.iter().take(20) {
        println!("LOAD failure: {failure}");
    }
    let metrics = legate.metrics();
    for sample in metrics.matching("legate_connections_rejected_total", &[]) {
        if sample.value > 0.0 {
            println!("LOAD rejected: {:?} = {}", sample.labels, sample.value);
        }
    }

    // Every long-lived connection still carries data both ways.
    for (n, stream) in long_lived.iter_mut().enumerate() {
        let message = format!("still-here-{n}");
        stream
            .write_all(format!("{message}\n").as_bytes())
            .unwrap_or_else(|e| panic!("long-lived connection {n}: write: {e}"));
        let echoed =
            read_line(stream).unwrap_or_else(|e| panic!("long-lived connection {n}: read: {e}"));
        assert_eq!(echoed, message, "long-lived connection {n}");
    }
    // The last write of each file is what new connections get now.
    for (index, addr) in listeners.iter().enumerate() {
        assert_all_reach(*addr, last[index], 5, "after the swaps");
    }
    legate.assert_running();
    // The swaps moved traffic (the debounce may coalesce many of them; the last one of each
    // file is checked above).
    assert!(
        seen.keys().any(|(_, id)| id == "B"),
        "no client ever reached B under load: {seen:?}"
    );
    assert!(applied >= 2.0, "legate applied only {applied} file reads");
    assert!(total > 100, "only {total} client operations ran");
    for delay in &settle {
        assert!(
            *delay <= SWAP_LIMIT,
            "under load the last write applied only after {delay:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {total} client operations failed during 100 swaps; first: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
}

// ---------------------------------------------------------------------------------------------
// Visibility
// ---------------------------------------------------------------------------------------------

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn file_target_json(legate: &Legate, target: &str) -> (serde_json::Value, serde_json::Value) {
    let (status, body) = legate.get("/endpoints");
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/endpoints is not JSON ({e}): {body}"));
    let listener = json["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "svc"))
        .unwrap_or_else(|| panic!("no listener svc in {body}"))
        .clone();
    let source = listener["targets"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["target"] == target))
        .unwrap_or_else(|| panic!("no target {target} in {body}"))
        .clone();
    (listener, source)
}

fn endpoint_sources(listener: &serde_json::Value, addr: SocketAddr) -> Vec<String> {
    listener["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["address"] == addr.to_string()))
        .unwrap_or_else(|| panic!("no endpoint {addr} in {listener}"))["sources"]
        .as_array()
        .unwrap_or_else(|| panic!("endpoint {addr} has no sources list: {listener}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn endpoints_shows_the_file_source_and_its_update_time() {
    let a = TcpBackend::hello("A");
    let b = TcpBackend::hello("B");
    let mut file = EndpointFile::new(Method::ConfigMap, &line(a.addr()));
    let target = file.target();
    let mut legate = start_legate(&target);
    legate.wait_ready(T);

    let (listener, source) = file_target_json(&legate, &target);
    let updated = source["updated"]
        .as_f64()
        .unwrap_or_else(|| panic!("`updated` should be a unix time: {source}"));
    let now = now_unix();
    assert!(
        updated > now - 60.0 && updated <= now + 1.0,
        "`updated` {updated} is not a recent unix time (now {now})"
    );
    assert_eq!(source["resolved"], true, "{source}");
    let sources = endpoint_sources(&listener, a.addr());
    assert!(
        sources.contains(&target),
        "endpoint {} should list {target} among its sources: {sources:?}",
        a.addr()
    );

    // A change moves `updated` forward and the new endpoint carries the file as its source.
    // (20 ms first, so the new `updated` differs from the old at millisecond resolution.)
    thread::sleep(Duration::from_millis(20));
    file.write(line(b.addr()));
    let (listener, source) = wait_for(T, "/endpoints to show B from the file", || {
        let (listener, source) = file_target_json(&legate, &target);
        listener["endpoints"]
            .as_array()?
            .iter()
            .any(|e| e["address"] == b.addr().to_string())
            .then_some((listener, source))
    });
    let later = source["updated"]
        .as_f64()
        .expect("updated after the change");
    assert!(
        later > updated,
        "`updated` should move forward: {updated} -> {later}"
    );
    assert!(endpoint_sources(&listener, b.addr()).contains(&target));
    assert!(
        Path::new(&target["file:".len()..]).exists(),
        "sanity: the target is the visible path"
    );
}
