//! Half-close (FIN) travels through legate as a half-close, not a reset:
//! - client side: the client writes, shuts down its write half, and still reads the answer
//!   (`socat ... EXEC:sha256sum` answers only after the FIN);
//! - the same with a larger body, written in pieces;
//! - upstream side: the backend sends, shuts down its write half; the client sees EOF and can
//!   still send, and the backend receives it all;
//! - resets travel as resets: a backend that resets makes the client see a reset (not a clean
//!   EOF that would make a truncated stream look complete), and a client that resets makes the
//!   backend see one.

mod common;

use common::fault::reset;
use common::*;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The bound on every wait here: start-up, one check of a live backend and a FIN or RST
/// crossing legate take milliseconds; 10 s is a loaded 2-core machine's slack.
const T: Duration = Duration::from_secs(10);

/// The in-test backends' read timeout: longer than T, so a backend never gives up before the
/// test has failed on its own bound.
const BACKEND_READ: Duration = Duration::from_secs(20);

fn legate_to(backend: std::net::SocketAddr) -> Legate {
    let mut legate = Legate::builder()
        .listener(Listener::new("half").upstream(backend))
        .start();
    // Ready after one check of a live backend: milliseconds (15 s: a loaded machine's slack).
    legate.wait_ready(Duration::from_secs(15));
    legate
}

fn hash_through(legate: &Legate, data: &[u8], pieces: usize) -> String {
    let mut stream = connect(legate.addr("half"));
    for chunk in data.chunks(data.len().div_ceil(pieces).max(1)) {
        stream.write_all(chunk).expect("write");
    }
    stream.shutdown(Shutdown::Write).expect("shutdown write");
    let (answer, error) = read_to_end(&mut stream);
    assert!(
        error.is_none(),
        "reading the answer after our FIN failed: {error:?} (got {:?})",
        String::from_utf8_lossy(&answer)
    );
    String::from_utf8(answer).expect("utf-8")
}

#[test]
fn client_half_close_reaches_the_backend_and_the_answer_comes_back() {
    let backend = Socat::sha256sum();
    let legate = legate_to(backend.addr());
    let data = b"the quick brown fox jumps over the lazy dog\n".repeat(100);
    let answer = hash_through(&legate, &data, 1);
    assert_eq!(answer, format!("{}  -\n", sha256_hex(&data)));
    // Nothing at all: the FIN alone must still produce the hash of the empty input.
    let answer = hash_through(&legate, b"", 1);
    assert_eq!(answer, format!("{}  -\n", sha256_hex(b"")));
}

#[test]
fn client_half_close_after_a_large_body_in_pieces() {
    let backend = Socat::sha256sum();
    let legate = legate_to(backend.addr());
    let data = payload(3 * 1024 * 1024 + 17, 7);
    let answer = hash_through(&legate, &data, 64);
    assert_eq!(answer, format!("{}  -\n", sha256_hex(&data)));
}

#[test]
fn upstream_half_close_leaves_the_client_able_to_send() {
    let received = Received::default();
    let backend = {
        let received = received.clone();
        TcpBackend::start(move |mut stream| {
            stream.set_read_timeout(Some(BACKEND_READ)).unwrap();
            if stream.write_all(b"hello, then FIN\n").is_err() {
                return;
            }
            let _ = stream.shutdown(Shutdown::Write);
            let (data, _) = read_to_end(&mut stream);
            received.push(data);
        })
    };
    let legate = legate_to(backend.addr());

    let mut stream = connect(legate.addr("half"));
    assert_eq!(read_line(&mut stream).unwrap(), "hello, then FIN");
    let mut buf = [0u8; 16];
    let n = stream
        .read(&mut buf)
        .expect("the backend's FIN arrives as EOF, not a reset or a hang");
    assert_eq!(n, 0, "expected EOF after the backend's half-close");

    // Our direction is still open.
    let message = b"still talking after the backend's FIN\n".repeat(1000);
    stream
        .write_all(&message)
        .expect("write after upstream FIN");
    stream.shutdown(Shutdown::Write).unwrap();
    eventually(
        T,
        "the backend to receive the client's data and FIN",
        || received.snapshot().iter().any(|d| !d.is_empty()),
    );
    // Health checks may have opened connections too; they send nothing.
    let got: Vec<Vec<u8>> = received
        .snapshot()
        .into_iter()
        .filter(|d| !d.is_empty())
        .collect();
    assert_eq!(got.len(), 1, "exactly one connection carried data");
    assert_eq!(got[0], message);
}

#[test]
fn an_upstream_reset_reaches_the_client_as_a_reset() {
    let backend = TcpBackend::start(|mut stream| {
        // Wait for the client's request, so health-check connections just go away.
        if read_line(&mut stream).ok().as_deref() == Some("go") {
            let _ = stream.write_all(b"partial answer\n");
            reset(stream);
        }
    });
    let legate = legate_to(backend.addr());
    let mut stream = connect(legate.addr("half"));
    stream.write_all(b"go\n").unwrap();
    let (data, error) = read_to_end(&mut stream);
    let error = error.unwrap_or_else(|| {
        panic!(
            "the backend reset, but the client saw a clean EOF after {:?}",
            String::from_utf8_lossy(&data)
        )
    });
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset,
        "expected a reset, got {error}"
    );
}

#[test]
fn a_client_reset_reaches_the_backend_as_a_reset() {
    let outcomes: Arc<Mutex<Vec<std::io::ErrorKind>>> = Arc::default();
    let backend = {
        let outcomes = outcomes.clone();
        TcpBackend::start(move |mut stream| {
            stream.set_read_timeout(Some(BACKEND_READ)).unwrap();
            if read_line(&mut stream).ok().as_deref() != Some("hello") {
                return;
            }
            let _ = stream.write_all(b"hi\n");
            let (_, error) = read_to_end(&mut stream);
            outcomes.lock().unwrap().push(
                error
                    .map(|e| e.kind())
                    .unwrap_or(std::io::ErrorKind::UnexpectedEof),
            );
        })
    };
    let legate = legate_to(backend.addr());
    let mut stream = connect(legate.addr("half"));
    stream.write_all(b"hello\n").unwrap();
    assert_eq!(read_line(&mut stream).unwrap(), "hi");
    reset(stream);
    eventually(T, "the backend to see the connection end", || {
        !outcomes.lock().unwrap().is_empty()
    });
    let outcome = outcomes.lock().unwrap()[0];
    assert_eq!(
        outcome,
        std::io::ErrorKind::ConnectionReset,
        "the client reset, the backend should see a reset (UnexpectedEof here means a clean FIN)"
    );
}
