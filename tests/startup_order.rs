//! The startup order promise, where there are no native sidecars: the app's entrypoint is
//! `legate wait -- APP`, started *before* legate itself.
//! - nothing of the app runs while legate is down or not ready;
//! - its first line of output comes after `/ready` turned 200 (the app asks `/ready` itself in
//!   that first line);
//! - its first connection through legate succeeds.

mod common;

use common::*;
use std::fs::File;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// How long the app may take to finish once legate is spawned. The app's `legate wait`
/// gives up after its own `--timeout 20s`; legate turns ready within a second of its start,
/// so 20 s is a loaded 2-core machine's slack either way.
const T: Duration = Duration::from_secs(20);

#[test]
fn an_app_behind_legate_wait_starts_after_ready_and_its_first_connection_works() {
    require_bin("redis-cli", "redis-tools");
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (admin, port) = (local(free_port()), free_port());
    let out_path = dir.path().join("app.out");
    let out = File::create(&out_path).unwrap();
    let app = format!(
        "if {LEGATE:?} wait --admin {admin} --timeout 1ms 2>/dev/null; then echo first-line-after-ready; else echo first-line-before-ready; fi\n\
         redis-cli -p {port} ping"
    );
    let child = legate_command()
        .args(["wait", "--admin", &admin.to_string(), "--timeout", "20s"])
        .args(["--", "sh", "-c", &app])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut app = Proc {
        name: "legate wait -- app".into(),
        child,
    };
    // legate is not running yet: the app waits. 500 ms is five of `wait`'s 100 ms polls, so
    // an app run early would show.
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        assert!(app.is_running(), "legate wait gave up or ran the app early");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read_to_string(&out_path).unwrap(), "");

    let listen = format!("127.0.0.1:{port}");
    let mut legate = Legate::spawn(
        tempfile::tempdir().unwrap(),
        &[
            "run",
            "--listen",
            &listen,
            "--upstream",
            &redis.addr().to_string(),
            "--admin",
            &admin.to_string(),
        ],
        admin,
    );
    let status = app.wait_exit(T).expect("the app finishes");
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert!(
        status.success(),
        "app: {status}: {out}; legate:\n{}",
        legate.log()
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["first-line-after-ready", "PONG"],
        "the app's output"
    );
    legate.assert_running();
}
