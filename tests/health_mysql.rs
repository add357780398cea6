//! The `mysql` health check against real servers, through the real binary:
//! - passes for a real MariaDB (its version shown in `/endpoints`), and queries go through;
//! - fails for a Redis port (which never speaks first) and for a port that accepts and stays
//!   silent, each with a reason that says no greeting came;
//! - politeness, measured: the checks read the greeting and close; MariaDB counts each in
//!   `Aborted_connects`/`Aborted_connects_preauth`, and the server keeps serving;
//! - with `user`, against a server that checks grants: the check logs in and leaves with
//!   `COM_QUIT`, so no abort counter moves; an account the server refuses fails the check
//!   with the server's reason.

mod common;

use common::*;
use serde_json::Value;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// legate is ready after the first `mysql` check of a running MariaDB (a greeting, or a
/// login): milliseconds; 10 s is a loaded 2-core machine's slack.
const READY: Duration = Duration::from_secs(10);

/// The bound on an unhealthy verdict: checks run every 200 ms with a 200-500 ms timeout and
/// two failures make it (`unhealthy_after` 2), about a second; 5 s is a loaded machine's slack.
const VERDICT: Duration = Duration::from_secs(5);

/// Accepts connections, holds them open and never writes a byte.
struct Silent {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Silent {
    fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => held.push(stream),
                    // Non-blocking, so `stop` is seen: look for a connection every 10 ms.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Silent {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn endpoint(legate: &Legate, listener: &str) -> Value {
    let (status, body) = legate.get("/endpoints");
    assert_eq!(status, 200, "/endpoints: {body}");
    let json: Value = serde_json::from_str(&body).expect("/endpoints is JSON");
    json["listeners"]
        .as_array()
        .and_then(|listeners| listeners.iter().find(|l| l["name"] == listener))
        .map(|listener| listener["endpoints"][0].clone())
        .unwrap_or_else(|| panic!("listener {listener} not in /endpoints: {body}"))
}

/// `SHOW GLOBAL STATUS` counters whose names start with `prefix`.
fn status(db: SocketAddr, prefix: &str) -> Vec<(String, u64)> {
    let output = mariadb_query(db, &format!("SHOW GLOBAL STATUS LIKE '{prefix}%'"));
    assert!(
        output.status.success(),
        "SHOW GLOBAL STATUS: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once('\t')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

fn counter(counters: &[(String, u64)], name: &str) -> u64 {
    counters
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("{name} not in {counters:?}"))
}

#[test]
fn mysql_check_passes_for_mariadb_and_fails_for_redis_and_a_silent_port() {
    let db = MariaDb::start();
    let redis = RedisServer::start();
    let silent = Silent::start();
    let health = r#"{ check = "mysql", interval = "200ms", timeout = "200ms" }"#;
    let before = status(db.addr(), "Aborted_connect");

    let mut legate = Legate::builder()
        .listener(
            Listener::new("db")
                .upstream(db.addr())
                .set("health", health),
        )
        .listener(
            Listener::new("redis")
                .upstream(redis.addr())
                .set("health", health)
                .set("required", "false"),
        )
        .listener(
            Listener::new("silent")
                .upstream(silent.addr)
                .set("health", health)
                .set("required", "false"),
        )
        .start();
    legate.wait_ready(READY);

    let db_endpoint = endpoint(&legate, "db");
    assert_eq!(db_endpoint["health"], "healthy", "{db_endpoint}");
    let detail = db_endpoint["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("version: ") && detail.contains("MariaDB"),
        "{db_endpoint}"
    );

    for name in ["redis", "silent"] {
        eventually(VERDICT, &format!("{name} marked unhealthy"), || {
            endpoint(&legate, name)["health"] == "unhealthy"
        });
        let shown = endpoint(&legate, name);
        assert!(
            shown["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("no greeting")),
            "{name}: {shown}"
        );
    }
    let metrics = legate.metrics();
    assert_eq!(
        metrics.value(
            "legate_endpoints",
            &[("listener", "db"), ("state", "healthy")]
        ),
        1.0
    );
    assert_eq!(
        metrics.value(
            "legate_endpoints",
            &[("listener", "silent"), ("state", "unhealthy")]
        ),
        1.0
    );

    // Queries go through legate to the checked server.
    let output = mariadb_query(legate.addr("db"), "SELECT 40 + 2");
    assert!(
        output.status.success(),
        "query through legate: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "42");

    // Let a few more checks run (1 s: five at 200 ms), then see what the server counted
    // (documented in src/health/mysql.rs) and that it still serves.
    std::thread::sleep(Duration::from_secs(1));
    let after = status(db.addr(), "Aborted_connect");
    let aborted = counter(&after, "Aborted_connects") - counter(&before, "Aborted_connects");
    println!(
        "mysql check politeness: before {before:?}, after {after:?} (about 5 checks/s); \
         Aborted_connects +{aborted}"
    );
    // What the README warns about, and what `user` is for.
    assert!(
        aborted >= 3,
        "checks without user were not counted as aborted: +{aborted}"
    );
    let output = mariadb_query(legate.addr("db"), "SELECT 1");
    assert!(output.status.success(), "query after the checks failed");
    assert_eq!(endpoint(&legate, "db")["health"], "healthy");
}

#[test]
fn mysql_check_with_user_logs_in_and_leaves_without_an_abort() {
    let db = MariaDb::start_with_grants();
    let output = mariadb_query(db.addr(), "CREATE USER 'legate'@'127.0.0.1'");
    assert!(
        output.status.success(),
        "CREATE USER: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let before = status(db.addr(), "");
    let health = r#"{ check = "mysql", user = "legate", interval = "200ms", timeout = "500ms" }"#;
    let mut legate = Legate::builder()
        .listener(
            Listener::new("db")
                .upstream(db.addr())
                .set("health", health),
        )
        .start();
    legate.wait_ready(READY);
    let shown = endpoint(&legate, "db");
    assert_eq!(shown["health"], "healthy", "{shown}");
    assert!(
        shown["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("version: ") && d.contains("MariaDB")),
        "{shown}"
    );
    // 1.5 s: seven checks at 200 ms, enough for the count below and for a failing login to
    // have turned the endpoint unhealthy.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(endpoint(&legate, "db")["health"], "healthy");
    // Read while legate runs: killing it could cut a check mid-login.
    let after = status(db.addr(), "");
    drop(legate);
    let delta = |name: &str| counter(&after, name) - counter(&before, name);
    println!(
        "mysql check with user: Connections +{}, Aborted_connects +{}, Aborted_clients +{}",
        delta("Connections"),
        delta("Aborted_connects"),
        delta("Aborted_clients")
    );
    // The status queries themselves are connections too; the checks are most of them.
    assert!(
        delta("Connections") >= 5,
        "too few checks ran: Connections +{}",
        delta("Connections")
    );
    assert_eq!(delta("Aborted_connects"), 0, "a check aborted its login");
    assert_eq!(delta("Aborted_clients"), 0, "a check left without COM_QUIT");

    // An account the server refuses: the check fails with the server's own reason.
    let mut legate = Legate::builder()
        .listener(
            Listener::new("db")
                .upstream(db.addr())
                .set(
                    "health",
                    r#"{ check = "mysql", user = "nobody", interval = "200ms", timeout = "500ms" }"#,
                )
                .set("required", "false"),
        )
        .start();
    legate.wait_ready(READY);
    eventually(VERDICT, "db marked unhealthy", || {
        endpoint(&legate, "db")["health"] == "unhealthy"
    });
    let shown = endpoint(&legate, "db");
    let error = shown["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("login as \"nobody\" refused: ERR 1045: Access denied for user 'nobody'"),
        "{shown}"
    );
}
