//! The client side of a TCP connection: connect with timeouts, read a line or to the end,
//! tell whether the peer closed, one round trip through an echo or "hello" backend, and the
//! test data sent through legate ([`payload`], compared by [`sha256_hex`]).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A loopback connect completes in the kernel without legate or the backend being scheduled
/// (unless an accept queue is full), so 5 s is a loaded machine's worst case many times over;
/// a test that cannot connect fails instead of hanging.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A read or write through legate to a local backend takes milliseconds; 10 s leaves a
/// 2-core machine under a CPU hog ample room and still ends a stuck test quickly.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to a listener that is expected to turn the client away and reports whether
/// the client was closed within `timeout`. legate resets a client it cannot serve, and
/// on loopback that reset can arrive before connect() has returned: then connect()
/// itself fails with ECONNRESET, which is the same outcome.
pub fn turned_away(addr: SocketAddr, timeout: Duration) -> bool {
    match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
        Ok(mut stream) => closed_within(&mut stream, timeout),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => true,
        Err(e) => panic!("connect to {addr}: {e}"),
    }
}

/// Connects with a timeout and sets read/write timeouts on the stream.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream
}

/// Reads one `\n`-terminated line (byte by byte, so nothing after it is consumed).
pub fn read_line(stream: &mut TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte)? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Reads until EOF; returns what came before an error too (a reset after data still yields
/// the data, and the error).
pub fn read_to_end(stream: &mut TcpStream) -> (Vec<u8>, Option<io::Error>) {
    let mut data = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (data, None),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (data, Some(e)),
        }
    }
}

/// Whether the peer has closed (EOF or reset) within `timeout`, without sending anything.
pub fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    stream.set_read_timeout(Some(timeout)).unwrap();
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + timeout;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {
                if Instant::now() >= deadline {
                    return false;
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Sends a line through a fresh connection and expects it echoed back.
pub fn echo_roundtrip(addr: SocketAddr, line: &str) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    read_line(&mut stream)
}

/// One client operation against [`TcpBackend::hello`] backends behind `addr`: connect, read
/// the greeting, close. An empty greeting (the proxy closed the connection) is an error.
pub fn try_which(addr: SocketAddr) -> Result<String, String> {
    // Tighter than CONNECT_TIMEOUT / IO_TIMEOUT: callers count failed operations in loops, so
    // a failing one should cost seconds, not tens; a loopback connect (2 s) and a greeting
    // through legate (5 s) still take milliseconds on a loaded machine.
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    match read_line(&mut stream) {
        Ok(id) if !id.is_empty() => Ok(id),
        Ok(_) => Err("closed without a greeting (rejected)".into()),
        Err(e) => Err(format!("read: {e}")),
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic pseudo-random bytes (xorshift), so big payloads are not trivially compressible.
pub fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}
