//! Small backends: [`Socat`] (a real `socat` listener: echo, `sha256sum`, any socat
//! address) and [`TcpBackend`] (an in-test TCP server in a thread: echo, "say who I am",
//! a sink, or any handler), with [`Received`] to collect what a handler got.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::process::{free_port, is_listening, local, require_bin, unsafe_kill_quiet_group, Proc};

/// A `socat TCP-LISTEN:PORT,fork ADDRESS` backend on a free port.
pub struct Socat {
    pub port: u16,
    proc: Proc,
}

impl Socat {
    /// Listens and connects each accepted connection to the socat `address` (e.g.
    /// `EXEC:sha256sum`, `PIPE`). `-t 30`: after one direction ends, socat waits up to 30 s for
    /// the other, so half-closed connections are not cut short.
    pub fn start(address: &str) -> Socat {
        require_bin("socat", "socat");
        let port = free_port();
        let child = Command::new("socat")
            .process_group(0)
            .args(["-t", "30"])
            .arg(format!("TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork"))
            .arg(address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn socat");
        let mut proc = Proc {
            name: "socat".into(),
            child,
        };
        // socat listens within milliseconds; 10 s covers a loaded machine and a slow fork.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_listening(port) {
            assert!(proc.is_running(), "socat exited early");
            assert!(
                Instant::now() < deadline,
                "socat is not listening on {port}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Socat { port, proc }
    }

    /// `EXEC:sha256sum`: answers the SHA-256 of everything received, after the client's FIN.
    pub fn sha256sum() -> Socat {
        require_bin("sha256sum", "coreutils");
        Socat::start("EXEC:sha256sum")
    }

    /// `PIPE`: echoes.
    pub fn echo() -> Socat {
        Socat::start("PIPE")
    }

    pub fn addr(&self) -> SocketAddr {
        local(self.port)
    }
}

impl Drop for Socat {
    fn drop(&mut self) {
        // socat forks a child per connection; they share socat's own process group, so the
        // whole group goes at once (the orphans are reaped by init).
        unsafe_kill_quiet_group(self.proc.pid(), libc::SIGKILL);
        let _ = self.proc.child.wait();
    }
}

type Handler = dyn Fn(TcpStream) + Send + Sync + 'static;

/// A tiny TCP server in a thread: each accepted connection is handed to a handler in its own
/// thread. Counts accepted connections. Stops accepting (and closes the port) on drop.
pub struct TcpBackend {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpBackend {
    pub fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> TcpBackend {
        TcpBackend::start_on("127.0.0.1:0", handler)
    }

    /// Like [`TcpBackend::start`], listening on `bind` (e.g. `127.0.0.2:0`).
    pub fn start_on(bind: &str, handler: impl Fn(TcpStream) + Send + Sync + 'static) -> TcpBackend {
        let listener = TcpListener::bind(bind).expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let thread = {
            let accepted = accepted.clone();
            let stop = stop.clone();
            thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let handler = handler.clone();
                    thread::spawn(move || handler(stream));
                }
            })
        };
        TcpBackend {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Echoes everything; passes the client's FIN on after the echo.
    pub fn echo() -> TcpBackend {
        TcpBackend::start(|stream| echo_stream(stream, None))
    }

    /// Writes `id\n` on accept, then echoes.
    pub fn hello(id: &str) -> TcpBackend {
        TcpBackend::hello_on("127.0.0.1:0", id)
    }

    /// Like [`TcpBackend::hello`], listening on `bind` (e.g. `127.0.0.2:PORT`).
    pub fn hello_on(bind: &str, id: &str) -> TcpBackend {
        let id = id.to_owned();
        TcpBackend::start_on(bind, move |stream| echo_stream(stream, Some(&id)))
    }

    /// Reads and discards everything; counts the bytes in `total`.
    pub fn sink(total: Arc<AtomicUsize>) -> TcpBackend {
        TcpBackend::start(move |mut stream| {
            let mut buf = [0u8; 64 * 1024];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total.fetch_add(n, Ordering::SeqCst);
            }
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many connections this backend has accepted (health checks included).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn echo_stream(mut stream: TcpStream, hello: Option<&str>) {
    if let Some(id) = hello {
        if stream.write_all(format!("{id}\n").as_bytes()).is_err() {
            return;
        }
    }
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop up so it sees the flag. If that connection cannot be made (a
        // fault test exhausted the ports) within 1 s (a loopback connect needs no scheduling
        // of ours), the thread is left behind rather than joined forever.
        let woken = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(thread) = self.thread.take() {
            if woken {
                let _ = thread.join();
            }
        }
    }
}

/// Collects what a handler received, for assertions from the test thread.
#[derive(Clone, Default)]
pub struct Received(pub Arc<Mutex<Vec<Vec<u8>>>>);

impl Received {
    pub fn push(&self, data: Vec<u8>) {
        self.0.lock().unwrap().push(data);
    }

    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().clone()
    }
}
