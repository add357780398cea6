//! Zero-copy forwarding for plaintext:
//! - after 8 MiB through an echo backend (16 MiB moved in all), the extra metric
//!   `legate_splice_bytes_total{listener}` is at least 8 MiB, and the data is intact;
//! - small request/response exchanges splice too: every byte counted in
//!   `legate_bytes_total` is also in `legate_splice_bytes_total` (nothing is copied
//!   through user space, whatever the message size);
//! - `strace -f -e trace=splice` attached to legate sees splice(2) calls carrying the bytes.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

/// The bound on every wait here: 16 MiB through an echo backend and the metric after it take
/// well under a second, but strace attaching to every thread of legate and tracing 1 MiB of
/// splices slows everything by an order of magnitude; 30 s covers that on a loaded machine.
const T: Duration = Duration::from_secs(30);
const MIB: usize = 1024 * 1024;

/// Sends `data` and reads the echo back concurrently; returns what came back.
fn echo_through(addr: SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let stream = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    let sender = thread::spawn(move || {
        writer.write_all(&data).expect("write");
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = stream;
    let mut back = Vec::new();
    reader.read_to_end(&mut back).expect("read echo");
    sender.join().unwrap();
    back
}

fn start() -> (TcpBackend, Legate) {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .listener(Listener::new("plain").upstream(backend.addr()))
        .start();
    legate.wait_ready(T);
    (backend, legate)
}

#[test]
fn plaintext_is_moved_with_splice() {
    let (_backend, legate) = start();
    let data = payload(8 * MIB, 42);
    let expected = sha256_hex(&data);
    let back = echo_through(legate.addr("plain"), data);
    assert_eq!(back.len(), 8 * MIB);
    assert_eq!(sha256_hex(&back), expected);
    eventually(T, "legate_splice_bytes_total >= 8 MiB", || {
        legate
            .metrics()
            .value("legate_splice_bytes_total", &[("listener", "plain")])
            >= (8 * MIB) as f64
    });
}

#[test]
fn small_messages_are_spliced_too() {
    let (_backend, legate) = start();
    let mut stream = connect(legate.addr("plain"));
    for n in 0..50 {
        let line = format!("PING {n}");
        stream.write_all(format!("{line}\n").as_bytes()).unwrap();
        assert_eq!(read_line(&mut stream).unwrap(), line);
    }
    drop(stream);
    eventually(T, "every forwarded byte to be counted as spliced", || {
        let metrics = legate.metrics();
        let moved = metrics.value("legate_bytes_total", &[("listener", "plain")]);
        let spliced = metrics.value("legate_splice_bytes_total", &[("listener", "plain")]);
        moved > 0.0 && spliced == moved
    });
}

#[test]
fn strace_sees_splice_calls() {
    require_bin("strace", "strace");
    let (_backend, legate) = start();
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let errors = dir.path().join("strace.err");
    let child = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=splice", "-o"])
        .arg(&trace)
        .args(["-p", &legate.pid().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errors).unwrap())
        .spawn()
        .expect("spawn strace");
    let mut strace = Proc {
        name: "strace".into(),
        child,
    };
    // strace announces nothing with -qq; wait until it is tracing (TracerPid set) instead.
    let pid = legate.pid();
    eventually(T, "strace to attach to legate", || {
        assert!(
            strace.is_running(),
            "strace exited: {}",
            std::fs::read_to_string(&errors).unwrap_or_default()
        );
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        tasks.flatten().all(|task| {
            std::fs::read_to_string(task.path().join("status"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
        })
    });

    let data = payload(MIB, 3);
    let back = echo_through(legate.addr("plain"), data.clone());
    assert_eq!(back, data);

    // SIGINT makes strace detach and flush.
    strace.signal(libc::SIGINT);
    strace.wait_exit(T).expect("strace to exit");
    let trace = std::fs::read_to_string(&trace).unwrap_or_default();
    let calls: Vec<&str> = trace.lines().filter(|l| l.contains("splice")).collect();
    let moved: i64 = calls
        .iter()
        .filter_map(|l| l.rsplit("= ").next()?.trim().parse::<i64>().ok())
        .filter(|n| *n > 0)
        .sum();
    assert!(
        moved >= MIB as i64,
        "splice(2) moved {moved} bytes in {} calls; expected at least 1 MiB; trace:\n{}",
        calls.len(),
        trace.lines().take(40).collect::<Vec<_>>().join("\n")
    );
}
