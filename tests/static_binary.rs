//! The binary the Dockerfile ships: `scripts/build-static` builds it, `scripts/test` hands it
//! over in `LEGATE_STATIC_BIN`, and this smoke test runs it end to end. Without the variable
//! (a plain `cargo test`) the same smoke runs against cargo's own build.
//! - with `LEGATE_STATIC_BIN`: the file is a static ELF (no program interpreter);
//! - quick mode in front of a real `redis-server`: `/ready` turns 200, PING goes through;
//! - an endpoint file naming `localhost` resolves (a static glibc has no NSS plugins to load);
//! - supervise mode: `-- sh -c 'redis-cli ... ping'` runs once ready, its exit code is legate's;
//! - SIGTERM drains and exits 0.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

/// The bound on every wait here: start-up, `/ready` after one check of a running
/// redis-server, a PING and the drain take milliseconds; 15 s is a loaded 2-core machine's
/// slack.
const T: Duration = Duration::from_secs(15);

/// The binary under test and whether it is the static build.
fn binary() -> (String, bool) {
    match std::env::var("LEGATE_STATIC_BIN") {
        Ok(path) if !path.is_empty() => (path, true),
        _ => (LEGATE.to_string(), false),
    }
}

fn spawn(binary: &str, args: &[String], log: &std::path::Path) -> Proc {
    let log = std::fs::File::create(log).expect("log file");
    let child = Command::new(binary)
        .args(args)
        .env_remove("LEGATE_STATIC_BIN")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
    Proc {
        name: "legate".into(),
        child,
    }
}

fn wait_ready(admin: std::net::SocketAddr) {
    wait_for(T, "/ready to answer 200", || {
        http(admin, "GET", "/ready")
            .ok()
            .filter(|(status, _)| *status == 200)
    });
}

/// The ELF program headers name no interpreter: nothing to load at run time.
fn assert_static(path: &str) {
    let elf = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    assert_eq!(&elf[..4], b"\x7fELF", "{path} is not an ELF file");
    assert_eq!(elf[4], 2, "{path} is not a 64-bit ELF");
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    for index in 0..phnum {
        let at = phoff + index * phentsize;
        let kind = u32::from_le_bytes(elf[at..at + 4].try_into().unwrap());
        assert_ne!(kind, PT_INTERP, "{path} asks for a program interpreter");
    }
}

#[test]
fn the_shipped_binary_proxies_redis_and_drains() {
    let (binary, is_static) = binary();
    if is_static {
        assert_static(&binary);
    }
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), local(free_port()));
    let log = dir.path().join("legate.log");
    let args: Vec<String> = [
        "run",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--upstream",
        &redis.addr().to_string(),
        "--admin",
        &admin.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let mut legate = spawn(&binary, &args, &log);
    wait_ready(admin);
    let mut client = redis_connect(local(port)).expect("connect through legate");
    let pong: String = redis::cmd("PING").query(&mut client).expect("PING");
    assert_eq!(pong, "PONG");
    drop(client);
    legate.signal(libc::SIGTERM);
    let status = legate.wait_exit(T).unwrap_or_else(|| {
        panic!(
            "no exit after SIGTERM; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    assert!(status.success(), "exit {status}");
}

#[test]
fn the_shipped_binary_resolves_names_and_supervises() {
    require_bin("redis-cli", "redis-tools");
    let (binary, _) = binary();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), local(free_port()));
    let endpoints = dir.path().join("redis.endpoints");
    std::fs::write(&endpoints, format!("localhost:{}\n", redis.port)).unwrap();
    let log = dir.path().join("legate.log");
    let args: Vec<String> = vec![
        "run".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--upstream".into(),
        format!("file:{}", endpoints.display()),
        "--admin".into(),
        admin.to_string(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        format!("[ \"$(redis-cli -p {port} ping)\" = PONG ] && exit 42"),
    ];
    let mut legate = spawn(&binary, &args, &log);
    let status = legate
        .wait_exit(T)
        .expect("legate exits when its command does");
    assert_eq!(
        status.code(),
        Some(42),
        "log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}
