//! `mysql`: read and parse the server's greeting, the packet a MySQL or MariaDB server
//! sends first on every connection.
//!
//! A packet is a 3-byte little-endian payload length, a 1-byte sequence number (0 for
//! the greeting) and the payload. The greeting's payload starts with the protocol version
//! (10), then the NUL-terminated server version, a 4-byte connection id, 8 bytes of
//! auth-plugin data and a filler byte; that much must be there. Instead of a greeting the
//! server may send an ERR packet (0xff, a 2-byte error code, the message), for example
//! 1040 "Too many connections" or 1129 "Host ... is blocked": that fails the check with
//! the message. A payload longer than `MAX_PACKET` (a real greeting is about 100 bytes)
//! is refused from its header, before it is read.
//!
//! Closing: we never authenticate, and `COM_QUIT` is only valid after authentication,
//! so the check reads the whole greeting and closes (a FIN, nothing left unread). The
//! server sees a client that went away during the handshake. Measured on MariaDB 10.11
//! (`tests/health_mysql.rs` prints the counters): every check is counted in
//! `Aborted_connects` and `Aborted_connects_preauth`, and it counts as a connection
//! error of legate's host toward `max_connect_errors` (default 100). A successful
//! connection from the same host resets that count, and the clients legate forwards
//! connect from legate's address, so an endpoint that carries traffic is safe; an
//! endpoint that gets none for `max_connect_errors` checks (a standby, say) is blocked
//! (`ERR 1129 ... flush-hosts`, which this check then reports). Raise
//! `max_connect_errors` on such servers. Loopback connections are exempt from host
//! blocking. (A failed login, by contrast, does not count toward the block, but it
//! would be logged as "Access denied" on every check.)

use super::{Check, CheckResult, Failure, Probe};
use std::future::Future;
use std::pin::Pin;
use tokio::time::Instant;

/// The largest greeting payload accepted.
pub const MAX_PACKET: usize = 64 * 1024;
const HEADER: usize = 4;

/// What the server said first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Greeting {
    Handshake { version: String },
    Error { code: u16, message: String },
}

/// Parse the first packet from `buf`: `Ok(None)` while incomplete, `Err(reason)` when it
/// is not a usable greeting.
pub fn parse(buf: &[u8]) -> Result<Option<Greeting>, String> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let len = usize::from(buf[0]) | usize::from(buf[1]) << 8 | usize::from(buf[2]) << 16;
    if len > MAX_PACKET {
        return Err(format!(
            "not a MySQL greeting: packet of {len} bytes is over the {} KiB limit",
            MAX_PACKET / 1024
        ));
    }
    if len == 0 {
        return Err("not a MySQL greeting: empty packet".into());
    }
    if buf[3] != 0 {
        return Err(format!(
            "not a MySQL greeting: sequence number {} (expected 0)",
            buf[3]
        ));
    }
    let Some(payload) = buf.get(HEADER..HEADER + len) else {
        return Ok(None);
    };
    match payload[0] {
        0x0a => handshake(&payload[1..]).map(Some),
        0xff => Ok(Some(error(&payload[1..])?)),
        version @ 1..=9 => Err(format!("unsupported MySQL protocol version {version}")),
        other => Err(format!(
            "not a MySQL greeting: first payload byte 0x{other:02x}"
        )),
    }
}

fn handshake(rest: &[u8]) -> Result<Greeting, String> {
    let Some(nul) = rest.iter().position(|&b| b == 0) else {
        return Err("truncated greeting: server version is not NUL-terminated".into());
    };
    // connection id (4), auth-plugin-data part 1 (8), filler (1)
    if rest.len() < nul + 1 + 4 + 8 + 1 {
        return Err("truncated greeting: ends after the server version".into());
    }
    let version = super::printable(&rest[..nul], 100);
    // MariaDB prefixes "5.5.5-" for old clients; show the real version.
    let version = version
        .strip_prefix("5.5.5-")
        .map(str::to_string)
        .unwrap_or(version);
    Ok(Greeting::Handshake { version })
}

fn error(rest: &[u8]) -> Result<Greeting, String> {
    if rest.len() < 2 {
        return Err("truncated ERR packet".into());
    }
    let code = u16::from_le_bytes([rest[0], rest[1]]);
    let mut message = &rest[2..];
    // Protocol 4.1 puts '#' and a 5-character SQL state before the message.
    if message.first() == Some(&b'#') && message.len() >= 6 {
        message = &message[6..];
    }
    Ok(Greeting::Error {
        code,
        message: super::printable(message, 200),
    })
}

pub struct MysqlCheck;

async fn probe(target: Probe, deadline: Instant) -> CheckResult {
    let mut stream = super::connect(&target, deadline).await?;
    let read = async {
        let mut buf = Vec::new();
        loop {
            if let Some(greeting) = parse(&buf)? {
                return Ok::<_, String>(greeting);
            }
            super::read_more(&mut stream, &mut buf, HEADER + MAX_PACKET, "greeting").await?;
        }
    };
    let greeting = match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(greeting)) => greeting,
        Ok(Err(reason)) => return Err(Failure::new(reason)),
        Err(_) => {
            return Err(Failure::new(
                "no greeting before the timeout (a MySQL server speaks first)",
            ))
        }
    };
    // Dropping the stream closes it with a FIN: the whole greeting was read.
    match greeting {
        Greeting::Handshake { version } => Ok(Some(format!("version: {version}"))),
        Greeting::Error { code, message } => Err(Failure::new(format!("ERR {code}: {message}"))),
    }
}

impl Check for MysqlCheck {
    fn check(
        &self,
        target: Probe,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = CheckResult> + Send + '_>> {
        Box::pin(probe(target, deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = len.to_le_bytes()[..3].to_vec();
        out.push(seq);
        out.extend_from_slice(payload);
        out
    }

    fn greeting(version: &str) -> Vec<u8> {
        let mut payload = vec![10];
        payload.extend_from_slice(version.as_bytes());
        payload.push(0);
        payload.extend_from_slice(&7u32.to_le_bytes());
        payload.extend_from_slice(b"abcdefgh");
        payload.push(0);
        payload.extend_from_slice(&[0xfe, 0xf7, 0x2d, 0x02, 0, 0xff, 0x81]);
        payload.extend_from_slice(&[0; 10]);
        payload.extend_from_slice(b"ijklmnopqrst\0mysql_native_password\0");
        packet(0, &payload)
    }

    #[test]
    fn good_greeting() {
        assert_eq!(
            parse(&greeting("5.5.5-10.11.6-MariaDB-0+deb12u1")),
            Ok(Some(Greeting::Handshake {
                version: "10.11.6-MariaDB-0+deb12u1".into()
            }))
        );
        assert_eq!(
            parse(&greeting("8.0.36")),
            Ok(Some(Greeting::Handshake {
                version: "8.0.36".into()
            }))
        );
    }

    #[test]
    fn err_packets() {
        let mut payload = vec![0xff];
        payload.extend_from_slice(&1040u16.to_le_bytes());
        payload.extend_from_slice(b"Too many connections");
        assert_eq!(
            parse(&packet(0, &payload)),
            Ok(Some(Greeting::Error {
                code: 1040,
                message: "Too many connections".into()
            }))
        );
        let mut payload = vec![0xff];
        payload.extend_from_slice(&1129u16.to_le_bytes());
        payload.extend_from_slice(
            b"#HY000Host '10.0.0.9' is blocked because of many connection errors",
        );
        let Ok(Some(Greeting::Error { code, message })) = parse(&packet(0, &payload)) else {
            panic!("not an error")
        };
        assert_eq!(code, 1129);
        assert!(message.starts_with("Host '10.0.0.9' is blocked"));
    }

    #[test]
    fn every_truncation_is_incomplete() {
        let full = greeting("10.11.6-MariaDB");
        for end in 0..full.len() {
            assert_eq!(parse(&full[..end]), Ok(None), "prefix of {end} bytes");
        }
    }

    #[test]
    fn short_or_odd_greetings_are_refused() {
        // A payload that ends right after the version.
        let mut payload = vec![10];
        payload.extend_from_slice(b"10.11\0");
        assert!(parse(&packet(0, &payload))
            .unwrap_err()
            .contains("truncated"));
        assert!(parse(&packet(0, b"\x0a10.11")).unwrap_err().contains("NUL"));
        assert!(parse(&packet(1, &greeting("x")[4..])).is_err());
        assert!(parse(&packet(0, b"\x09old"))
            .unwrap_err()
            .contains("version 9"));
        assert!(parse(&packet(0, b"")).is_err());
        assert!(parse(&packet(0, b"\xff\x01")).is_err());
    }

    #[test]
    fn oversized_packets_are_refused_from_the_header() {
        assert!(parse(b"\xff\xff\xff\x00").unwrap_err().contains("limit"));
        // What a Redis or HTTP server's first bytes look like as a header.
        assert!(parse(b"HTTP/1.1 400").is_err());
        assert!(parse(b"-ERR unknown").is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(10);
        for round in 0..20_000 {
            let len = rng.usize(0..200);
            let mut input: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if round % 2 == 0 && input.len() >= 5 {
                // A plausible header, so the payload parser is reached often.
                let payload_len = (input.len() - 4) as u8;
                input[..4].copy_from_slice(&[payload_len, 0, 0, 0]);
                input[4] = [10u8, 0xff][rng.usize(..2)];
            }
            let _ = parse(&input);
        }
    }

    #[tokio::test]
    async fn a_megabyte_packet_fails_without_reading_it() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut big = packet(0, &[]);
            big[..3].copy_from_slice(&[0, 0, 0x10]);
            big.extend(std::iter::repeat_n(b'x', 1 << 20));
            let _ = socket.write_all(&big).await;
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let failure = MysqlCheck
            .check(Probe { addr, tls: None }, deadline)
            .await
            .unwrap_err();
        assert!(
            failure.reason.contains("over the 64 KiB limit"),
            "{}",
            failure.reason
        );
    }
}
