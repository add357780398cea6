//! Linux zero-copy: splice(2) between a socket and a pipe.
//!
//! This is the only module with `unsafe`. It owns the pipes and the two syscalls; the
//! forwarding state machine in `forward.rs` stays in safe code. Pipes come from a small
//! per-thread pool and are held only while bytes are in flight, so an idle connection
//! holds none (10,000 idle connections must not cost 20,000 pipes). A pipe goes back to
//! the pool only when it is empty; one that still holds bytes (the peer failed mid-way)
//! is closed instead, so stale bytes can never leak into another connection.
#![allow(unsafe_code)]

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Bytes asked of one splice call: the default pipe capacity on Linux.
pub(crate) const CHUNK: usize = 64 * 1024;

/// Spare pipes kept per runtime thread. Enough for bursts; more would only pin memory.
const POOL_PER_THREAD: usize = 32;

pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid, writable array of two c_ints, as pipe2 requires.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by no one else;
        // wrapping them in OwnedFd makes this Pipe their only owner.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write })
    }

    /// Move up to `len` bytes from `socket` into the pipe. `Ok(0)` is end of stream.
    /// WouldBlock means the socket has nothing to read only because callers always
    /// drain the pipe before filling it again (a full pipe gives the same EAGAIN).
    pub(crate) fn fill_from(&self, socket: &impl AsRawFd, len: usize) -> io::Result<usize> {
        splice(socket.as_raw_fd(), self.write.as_raw_fd(), len)
    }

    /// Move up to `len` bytes from the pipe to `socket`. Callers only call this with
    /// bytes in the pipe, so WouldBlock means the socket's send buffer is full.
    pub(crate) fn drain_to(&self, socket: &impl AsRawFd, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), socket.as_raw_fd(), len)
    }
}

fn splice(from: libc::c_int, to: libc::c_int, len: usize) -> io::Result<usize> {
    // SAFETY: `from` and `to` are open descriptors borrowed from live objects for the
    // duration of the call; null offsets are required for pipes and sockets and tell
    // the kernel to use (and not touch our memory for) the file positions.
    let moved = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if moved < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(moved as usize)
    }
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe from this thread's pool, or a new one.
pub(crate) fn take() -> io::Result<Pipe> {
    match POOL.with(|pool| pool.borrow_mut().pop()) {
        Some(pipe) => Ok(pipe),
        None => Pipe::new(),
    }
}

/// Return an empty pipe to this thread's pool (or close it when the pool is full).
pub(crate) fn give_back(pipe: Pipe) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_PER_THREAD {
            pool.push(pipe);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn moves_bytes_socket_to_socket_through_a_pipe() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let listener2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let out = TcpStream::connect(listener2.local_addr().unwrap()).unwrap();
        let (mut sink, _) = listener2.accept().unwrap();

        client.write_all(b"hello splice").unwrap();
        let pipe = take().unwrap();
        let mut filled = 0;
        while filled == 0 {
            match pipe.fill_from(&server, CHUNK) {
                Ok(n) => filled = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(pipe.drain_to(&out, filled).unwrap(), filled);
        let mut buf = vec![0; filled];
        sink.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello splice");
        give_back(pipe);
        drop(client);
        // End of stream reads as 0 once the peer closed.
        let pipe = take().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match pipe.fill_from(&server, CHUNK) {
                Ok(0) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(std::time::Instant::now() < deadline);
                    std::thread::yield_now()
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
