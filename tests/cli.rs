//! The command line:
//! - `legate check -c good.toml` exits 0 (also with `LEGATE_CONFIG` instead of `-c`);
//! - a broken file, an unknown key, a duplicate listener name, a zero duration and an unknown
//!   balance exit 1 printing `FILE:LINE:COL:`; `legate run` refuses a broken file the same way;
//! - `legate version` prints the version; a bad flag is a usage error (non-zero);
//! - `legate wait` times out with exit 1 and a clear message; with `-- CMD` it runs CMD only
//!   once legate is ready and exits with CMD's status;
//! - quick mode (`--listen`/`--upstream`/`--admin`) forwards without a file;
//! - a listen or admin address already taken makes `legate run` exit non-zero, naming the
//!   address.

mod common;

use common::*;
use std::fs::File;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

/// The bound on every wait here: `legate check`, `version` and start-up take milliseconds,
/// `/ready` follows a 200 ms health check; 15 s is a debug build on a loaded 2-core machine
/// many times over, and fails a hung command instead of hanging the test.
const T: Duration = Duration::from_secs(15);

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn check(path: &str) -> Output {
    let mut cmd = legate_command();
    cmd.args(["check", "-c", path]);
    run_with_timeout(cmd, T)
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Asserts that `out` contains `PATH:LINE:COL:` for one of `lines`, and returns the message.
fn assert_location(output: &Output, path: &str, lines: &[usize]) -> String {
    let out = text(output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "expected exit 1, got {}: {out}",
        output.status
    );
    let found = lines.iter().any(|line| {
        let prefix = format!("{path}:{line}:");
        out.match_indices(&prefix).any(|(i, _)| {
            let rest = &out[i + prefix.len()..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            digits > 0 && rest[digits..].starts_with(':')
        })
    });
    assert!(
        found,
        "expected `{path}:LINE:COL:` with LINE in {lines:?}, got: {out}"
    );
    out
}

fn good_config(admin: u16, listen: u16, upstream: u16) -> String {
    format!(
        r#"[admin]
listen = "127.0.0.1:{admin}"

[runtime]
shutdown_delay = "0s"
drain_timeout = "30s"

[[listeners]]
name = "redis"
listen = "127.0.0.1:{listen}"
upstream = ["127.0.0.1:{upstream}"]
balance = "round-robin"
connect_timeout = "1s"
connect_attempts = 3
max_connections = 100
health = {{ check = "tcp", interval = "2s", timeout = "500ms" }}
"#
    )
}

#[test]
fn check_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "good.toml",
        &good_config(free_port(), free_port(), 6379),
    );
    let output = check(&path);
    assert!(output.status.success(), "check failed: {}", text(&output));
}

#[test]
fn check_reads_legate_config_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "good.toml",
        &good_config(free_port(), free_port(), 6379),
    );
    let mut cmd = legate_command();
    cmd.arg("check").env("LEGATE_CONFIG", &path);
    let output = run_with_timeout(cmd, T);
    assert!(
        output.status.success(),
        "LEGATE_CONFIG check failed: {}",
        text(&output)
    );
}

#[test]
fn check_reports_a_syntax_error_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "broken.toml",
        "[admin]\nlisten = \"127.0.0.1:9901\"\n\n[[listeners]]\nname = \"a\nlisten = \"127.0.0.1:1\"\n",
    );
    // The unterminated string starts on line 5.
    assert_location(&check(&path), &path, &[5, 6]);
}

#[test]
fn check_reports_an_unknown_key_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config(free_port(), free_port(), 6379) + "bogus_key = 1\n";
    let line = config.lines().count();
    let path = write(dir.path(), "unknown.toml", &config);
    let out = assert_location(&check(&path), &path, &[line]);
    assert!(
        out.contains("bogus_key"),
        "the message should name the key: {out}"
    );
}

#[test]
fn check_reports_a_duplicate_listener_name_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = good_config(free_port(), free_port(), 6379);
    let header = config.lines().count() + 2;
    config.push_str(&format!(
        "\n[[listeners]]\nname = \"redis\"\nlisten = \"127.0.0.1:{}\"\nupstream = [\"127.0.0.1:6380\"]\n",
        free_port()
    ));
    let path = write(dir.path(), "dup.toml", &config);
    // Either the second table's header or its `name` line.
    let out = assert_location(&check(&path), &path, &[header, header + 1]);
    assert!(
        out.contains("redis"),
        "the message should name the duplicate: {out}"
    );
}

#[test]
fn check_reports_semantic_errors_with_their_location() {
    let dir = tempfile::tempdir().unwrap();
    for (key, bad) in [
        ("connect_timeout = \"1s\"", "connect_timeout = \"0s\""),
        ("balance = \"round-robin\"", "balance = \"fastest\""),
    ] {
        let config = good_config(free_port(), free_port(), 6379);
        let line = config.lines().position(|l| l == key).unwrap() + 1;
        let path = write(dir.path(), "semantic.toml", &config.replace(key, bad));
        assert_location(&check(&path), &path, &[line]);
    }
}

#[test]
fn run_refuses_a_broken_file_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config(free_port(), free_port(), 6379) + "bogus_key = 1\n";
    let line = config.lines().count();
    let path = write(dir.path(), "unknown.toml", &config);
    let mut cmd = legate_command();
    cmd.args(["run", "-c", &path]);
    assert_location(&run_with_timeout(cmd, T), &path, &[line]);
}

#[test]
fn version_prints_the_version() {
    let mut cmd = legate_command();
    cmd.arg("version");
    let output = run_with_timeout(cmd, T);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains(env!("CARGO_PKG_VERSION")),
        "version output: {}",
        text(&output)
    );
}

#[test]
fn a_bad_flag_is_a_usage_error() {
    for args in [
        &["run", "--no-such-flag"][..],
        &["check", "--no-such-flag"],
        &["frobnicate"],
        &["wait", "--timeout", "soon"],
    ] {
        let mut cmd = legate_command();
        cmd.args(args);
        let output = run_with_timeout(cmd, T);
        assert!(
            !output.status.success(),
            "legate {args:?} should fail, got {}",
            output.status
        );
        let err = String::from_utf8_lossy(&output.stderr).to_lowercase();
        assert!(
            err.contains("usage") || err.contains("error"),
            "legate {args:?} should print a usage error, got: {err}"
        );
    }
}

#[test]
fn wait_times_out_with_exit_1_and_a_message() {
    let admin = local(free_port());
    let mut cmd = legate_command();
    cmd.args(["wait", "--admin", &admin.to_string(), "--timeout", "300ms"]);
    let output = run_with_timeout(cmd, T);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let out = text(&output).to_lowercase();
    assert!(
        out.contains("ready") || out.contains("time") || out.contains(&admin.to_string()),
        "a clear message is expected, got: {out}"
    );
}

#[test]
fn wait_runs_the_command_once_ready_and_exits_with_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let admin = local(free_port());
    let out_path = dir.path().join("wait.out");
    let out = File::create(&out_path).unwrap();
    let child = legate_command()
        .args(["wait", "--admin", &admin.to_string(), "--timeout", "30s"])
        .args(["--", "sh", "-c", "echo started; exit 7"])
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut wait = Proc {
        name: "legate wait".into(),
        child,
    };

    // legate comes up, but its only backend is not there yet: live, not ready.
    let mut redis = RedisServer::start();
    redis.stop();
    let mut legate = Legate::builder()
        .admin_port(admin.port())
        .listener(Listener::new("late").upstream(redis.addr()).fast_health())
        .start();
    legate.wait_not_ready(T);
    // Observe for a while (bounded) that `wait` keeps waiting while /ready is 503: 1.5 s is
    // fifteen of its 100 ms polls and seven 200 ms health checks, so an early exit would show.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        assert!(wait.is_running(), "legate wait exited before ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !std::fs::read_to_string(&out_path)
            .unwrap()
            .contains("started"),
        "the command ran before legate was ready"
    );

    redis.restart();
    legate.wait_ready(T);
    let status = wait
        .wait_exit(T)
        .expect("legate wait should finish once ready");
    assert_eq!(
        status.code(),
        Some(7),
        "wait should exit with the command's status"
    );
    let out = std::fs::read_to_string(&out_path).unwrap();
    assert!(out.contains("started"), "the command's output: {out:?}");
}

#[test]
fn quick_mode_forwards_without_a_file() {
    let backend = TcpBackend::echo();
    let listen = local(free_port());
    let admin = local(free_port());
    let mut legate = Legate::spawn(
        tempfile::tempdir().unwrap(),
        &[
            "run",
            "--listen",
            &listen.to_string(),
            "--upstream",
            &backend.addr().to_string(),
            "--admin",
            &admin.to_string(),
        ],
        admin,
    );
    legate.wait_live(T);
    legate.wait_ready(T);
    assert_eq!(
        echo_roundtrip(listen, "quick mode").expect("echo through quick mode"),
        "quick mode"
    );
}

fn assert_taken_address_is_fatal(
    args: &[&str],
    taken: std::net::SocketAddr,
    admin: std::net::SocketAddr,
) {
    let mut legate = Legate::spawn(tempfile::tempdir().unwrap(), args, admin);
    // legate exits as soon as the bind fails (the README says within a second); the bound is
    // T, not 2 s as it was, so a debug build starting on a loaded 2-core machine beside a CPU
    // hog cannot fail this test for being slow: what it checks is the exit and the message.
    let status = legate.wait_exit(T);
    assert!(
        !status.success(),
        "legate should fail when {taken} is taken"
    );
    let log = legate.log();
    assert!(
        log.contains(&taken.to_string()),
        "the error should name {taken}, got: {log}"
    );
}

#[test]
fn a_taken_listen_address_is_a_startup_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let backend = TcpBackend::echo();
    let admin = local(free_port());
    assert_taken_address_is_fatal(
        &[
            "run",
            "--listen",
            &taken_addr.to_string(),
            "--upstream",
            &backend.addr().to_string(),
            "--admin",
            &admin.to_string(),
        ],
        taken_addr,
        admin,
    );
}

#[test]
fn a_taken_admin_address_is_a_startup_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let backend = TcpBackend::echo();
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "legate.toml",
        &good_config(taken_addr.port(), free_port(), backend.addr().port()),
    );
    assert_taken_address_is_fatal(&["run", "-c", &path], taken_addr, taken_addr);
}
