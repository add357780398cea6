//! Supervise mode, `legate run -c FILE -- sh -c SCRIPT`, with a real child process:
//! - the command starts only once `/ready` is 200 (the child itself checks with `legate wait`)
//!   and its first request through legate succeeds;
//! - its exit code is legate's exit code (0, 3), 128+N when signal N killed it, and 127 with a
//!   clear message when it cannot be started;
//! - SIGHUP and SIGINT reach the child (a `trap` writes a file); SIGHUP still reloads legate;
//! - on SIGTERM legate turns `/ready` 503 but keeps proxying while the child shuts down: the
//!   child's TERM trap makes a request through legate, which succeeds, and only then does
//!   legate drain and exit with the child's code;
//! - `POST /quitquitquit` is passed on to the child as SIGTERM.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

/// The bound on every wait here: `/ready`, signals reaching the child, its marker files and
/// legate's exit take milliseconds (the child's scripts are a few shell lines); 15 s is a
/// loaded 2-core machine's slack.
const T: Duration = Duration::from_secs(15);

/// A legate with one listener "redis" in front of `redis`, supervising `sh -c script`.
/// The script sees `$DIR` (a temp dir for its marker files), `$PORT` (the listener), `$ADMIN`
/// and `$LEGATE` (this build's binary).
struct Supervised {
    legate: Legate,
    port: u16,
}

fn supervise(upstream: &str, script: &str) -> Supervised {
    require_bin("redis-cli", "redis-tools");
    spawn(upstream, |dir, port, admin| {
        let preamble = format!("DIR={dir:?}; PORT={port}; ADMIN={admin}; LEGATE={LEGATE:?}");
        vec!["sh".into(), "-c".into(), format!("{preamble}\n{script}")]
    })
}

/// `legate run -c FILE -- COMMAND`, COMMAND built from the temp dir, listener port and admin.
fn spawn(upstream: &str, command: impl FnOnce(&str, u16, SocketAddr) -> Vec<String>) -> Supervised {
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, admin) = (free_port(), local(free_port()));
    let config = dir.path().join("legate.toml");
    std::fs::write(
        &config,
        format!(
            "[admin]\nlisten = \"{admin}\"\n\n[[listeners]]\nname = \"redis\"\nlisten = \"127.0.0.1:{port}\"\nupstream = [{upstream:?}]\nhealth = {FAST_HEALTH}\n"
        ),
    )
    .expect("write config");
    let command = command(&dir.path().display().to_string(), port, admin);
    let mut args = vec![
        "run".to_string(),
        "-c".into(),
        config.display().to_string(),
        "--".into(),
    ];
    args.extend(command);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let legate = Legate::spawn(dir, &args, admin);
    Supervised { legate, port }
}

impl Supervised {
    fn file(&self, name: &str) -> std::path::PathBuf {
        self.legate.dir.path().join(name)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.file(name)).unwrap_or_default()
    }

    fn wait_file(&self, name: &str, contains: &str) {
        let path = self.file(name);
        wait_for(T, &format!("{name} to contain {contains:?}"), || {
            std::fs::read_to_string(&path)
                .ok()
                .filter(|text| text.contains(contains))
        });
    }

    fn exit(&mut self) -> ExitStatus {
        self.legate.wait_exit(T)
    }
}

fn redis_addr(redis: &RedisServer) -> String {
    redis.addr().to_string()
}

#[test]
fn exit_codes_pass_through() {
    let redis = RedisServer::start();
    for (script, code) in [("exit 0", 0), ("exit 3", 3), ("kill -KILL $$", 137)] {
        let mut app = supervise(&redis_addr(&redis), script);
        let status = app.exit();
        assert_eq!(
            status.code(),
            Some(code),
            "`{script}`: legate exited with {status}; log:\n{}",
            app.legate.log()
        );
    }
}

#[test]
fn a_command_that_cannot_start_exits_127_saying_why() {
    let redis = RedisServer::start();
    let mut app = spawn(&redis_addr(&redis), |_, _, _| {
        vec!["/nonexistent/app".into(), "--flag".into()]
    });
    let status = app.exit();
    let log = app.legate.log();
    assert_eq!(status.code(), Some(127), "log:\n{log}");
    assert!(
        log.contains("cannot run /nonexistent/app"),
        "the log says what could not run:\n{log}"
    );
}

#[test]
fn the_command_starts_only_once_ready_and_its_first_request_succeeds() {
    let redis = RedisServer::start();
    // The endpoint file does not exist yet, so legate cannot be ready.
    let script = r#"
        if "$LEGATE" wait --admin "$ADMIN" --timeout 1ms; then echo ready > "$DIR/at-start"; else echo not-ready > "$DIR/at-start"; fi
        redis-cli -p "$PORT" ping > "$DIR/pong" 2>&1
        exit 0
    "#;
    let dir_probe = tempfile::tempdir().unwrap();
    let endpoints = dir_probe.path().join("redis.endpoints");
    let mut app = supervise(&format!("file:{}", endpoints.display()), script);
    app.legate.wait_live(T);
    // Not ready, and nothing started: give it a few readiness rounds to misbehave (10 × 50 ms,
    // half a second: legate's readiness watcher wakes at least every 250 ms).
    for _ in 0..10 {
        assert_eq!(app.legate.get("/ready").0, 503);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !app.file("at-start").exists(),
        "the command started before /ready was 200"
    );
    std::fs::write(&endpoints, format!("{}\n", redis.addr())).unwrap();
    let status = app.exit();
    assert!(status.success(), "{status}; log:\n{}", app.legate.log());
    assert_eq!(
        app.read("at-start").trim(),
        "ready",
        "/ready was not 200 when the command started"
    );
    assert_eq!(
        app.read("pong").trim(),
        "PONG",
        "the first request through legate"
    );
}

#[test]
fn sighup_and_sigint_reach_the_child_and_sighup_still_reloads() {
    let redis = RedisServer::start();
    let script = r#"
        trap 'echo hup >> "$DIR/signals"' HUP
        trap 'echo int >> "$DIR/signals"; exit 5' INT
        echo started > "$DIR/started"
        while :; do sleep 0.05; done
    "#;
    let mut app = supervise(&redis_addr(&redis), script);
    app.wait_file("started", "started");
    app.legate.signal(libc::SIGHUP);
    app.wait_file("signals", "hup");
    eventually(T, "legate to log the SIGHUP reload", || {
        app.legate.log().contains("SIGHUP: reloading")
    });
    app.legate.assert_running();
    assert_eq!(
        app.legate.get("/ready").0,
        200,
        "a SIGHUP is not a shutdown"
    );
    app.legate.signal(libc::SIGINT);
    let status = app.exit();
    assert_eq!(status.code(), Some(5), "log:\n{}", app.legate.log());
    assert_eq!(app.read("signals"), "hup\nint\n");
}

#[test]
fn legate_outlives_the_childs_own_shutdown() {
    let redis = RedisServer::start();
    // On TERM the app finishes its work through legate, but only once the test says "go".
    let script = r#"
        trap 'echo term > "$DIR/term"
              while [ ! -e "$DIR/go" ]; do sleep 0.05; done
              redis-cli -p "$PORT" ping > "$DIR/pong" 2>&1
              exit 0' TERM
        echo started > "$DIR/started"
        while :; do sleep 0.05; done
    "#;
    let mut app = supervise(&redis_addr(&redis), script);
    app.wait_file("started", "started");
    app.legate.signal(libc::SIGTERM);
    app.wait_file("term", "term");
    // The child is shutting down: legate says it is going away, but still proxies.
    app.legate.wait_not_ready(T);
    let mut client = redis_connect(local(app.port)).expect("connect through legate");
    let pong: String = redis::cmd("PING").query(&mut client).expect("PING");
    assert_eq!(pong, "PONG");
    drop(client);
    app.legate.assert_running();
    std::fs::write(app.file("go"), "").unwrap();
    let status = app.exit();
    assert!(status.success(), "{status}; log:\n{}", app.legate.log());
    assert_eq!(
        app.read("pong").trim(),
        "PONG",
        "the child's request during its shutdown"
    );
    let log = app.legate.log();
    let exited = log.find("the supervised command exited").expect("logged");
    let drained = log.find("drained").expect("logged");
    assert!(
        exited < drained,
        "legate drained before the child exited:\n{log}"
    );
}

#[test]
fn quitquitquit_is_passed_on_as_sigterm() {
    let redis = RedisServer::start();
    let script = r#"
        trap 'exit 4' TERM
        echo started > "$DIR/started"
        while :; do sleep 0.05; done
    "#;
    let mut app = supervise(&redis_addr(&redis), script);
    app.wait_file("started", "started");
    assert_eq!(app.legate.post("/quitquitquit").0, 200);
    let status = app.exit();
    assert_eq!(status.code(), Some(4), "log:\n{}", app.legate.log());
    assert!(Path::new(&app.file("started")).exists());
}
