//! A minimal HTTP/1.1 client for legate's admin port: one request per connection
//! ([`http`]) and a parser for a whole response ([`parse_http_response`]), which tests of
//! the admin server's edge cases also call on raw bytes.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::client::read_to_end;

/// One HTTP/1.1 request over a fresh connection (`Connection: close`); returns status and body.
///
/// The admin server answers in milliseconds; a loopback connect within 2 s and an answer
/// within 5 s leave a loaded machine ample room while a poll of `/ready` that fails (legate
/// busy or gone) returns soon enough to be retried.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let (raw, error) = read_to_end(&mut stream);
    match parse_http_response(&raw) {
        Some(response) => Ok(response),
        None => Err(error.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "incomplete HTTP response: {:?}",
                    String::from_utf8_lossy(&raw)
                ),
            )
        })),
    }
}

/// Parses a whole HTTP/1.x response (Content-Length, chunked, or until close).
pub fn parse_http_response(raw: &[u8]) -> Option<(u16, String)> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let mut body = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let (key, value) = line.split_once(':')?;
        let key = key.trim().to_ascii_lowercase();
        let value = value.trim();
        if key == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if key == "content-length" {
            length = value.parse::<usize>().ok();
        }
    }
    let body = if chunked {
        let mut out = Vec::new();
        loop {
            let line_end = body.windows(2).position(|w| w == b"\r\n")?;
            let size_text = String::from_utf8_lossy(&body[..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
            body = &body[line_end + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(body.get(..size)?);
            body = body.get(size + 2..)?;
        }
        out
    } else if let Some(length) = length {
        body.get(..length)?.to_vec()
    } else {
        body.to_vec()
    };
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}
