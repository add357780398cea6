//! `mysql`: read and parse the server's greeting, the packet a MySQL or MariaDB server
//! sends first on every connection, and with `user` log in and leave with `COM_QUIT`.
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
//! Closing without `user`: `COM_QUIT` is only valid after authentication, so the check
//! reads the whole greeting and closes (a FIN, nothing left unread). The server sees a
//! client that went away during the handshake. Measured on MariaDB 10.11
//! (`tests/health_mysql.rs`): every such check is counted in `Aborted_connects` and
//! `Aborted_connects_preauth`, and it counts as a connection error of legate's host
//! toward `max_connect_errors` (default 100). A successful connection from the same host
//! resets that count, so an endpoint that carries traffic is safe; an endpoint that gets
//! none for `max_connect_errors` checks (a standby, say) is blocked (`ERR 1129 ...
//! flush-hosts`). Loopback connections are exempt from host blocking.
//!
//! With `user` (HAProxy's `mysql-check user`), the check logs in as that account with an
//! empty password, which must succeed, then sends `COM_QUIT`: a whole, polite session
//! that counts in no abort counter and resets the host's error count. The account needs
//! no privilege (`CREATE USER 'legate'@'10.%'`). Only empty passwords are supported: a
//! password would have to be sent hashed with the server's scramble, and a check account
//! that can do nothing has nothing to protect. If the account's plugin differs from the
//! one the greeting names, the server asks to switch (0xfe) and gets the empty response
//! again; `caching_sha2_password`'s "fast auth done" (0x01 0x03) is followed by the OK.

use super::{Check, CheckResult, Failure, Probe};
use std::future::Future;
use std::pin::Pin;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// The largest packet payload accepted from the server.
const MAX_PACKET: usize = 64 * 1024;
const HEADER: usize = 4;

/// Capability flags (the protocol's `CLIENT_*`), as far as the login uses them.
const CLIENT_LONG_PASSWORD: u32 = 0x1;
const CLIENT_PROTOCOL_41: u32 = 0x200;
const CLIENT_SECURE_CONNECTION: u32 = 0x8000;
const CLIENT_PLUGIN_AUTH: u32 = 0x8_0000;
/// utf8_general_ci: every server since 4.1 has it; the login carries no text but the
/// user name.
const CHARSET_UTF8: u8 = 33;
/// A login that takes more packets than this (switch, more data, ...) is not one legate
/// can finish with an empty password.
const MAX_LOGIN_PACKETS: usize = 4;

/// What the server said first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Greeting {
    Handshake { version: String, capabilities: u32 },
    Error { code: u16, message: String },
}

/// What the server answered to the login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LoginReply {
    /// 0x00: logged in.
    Ok,
    /// 0xff: refused, with the server's error code and message.
    Error { code: u16, message: String },
    /// 0xfe: the account uses another auth plugin; answer again for it.
    Switch { plugin: String },
    /// 0x01 0x03: `caching_sha2_password` accepted from its cache; the OK follows.
    FastAuthDone,
    /// 0x01 and anything else: the server wants more (a password, a key exchange).
    MoreData,
}

/// Frame the next packet in `buf`: `Ok(None)` while incomplete, else its sequence number
/// and the total length (header included). The length is checked from the header, so an
/// oversized packet is refused before it is read. `what` names the packet in errors.
fn frame(buf: &[u8], what: &str) -> Result<Option<(u8, usize)>, String> {
    if buf.len() < HEADER {
        return Ok(None);
    }
    let len = usize::from(buf[0]) | usize::from(buf[1]) << 8 | usize::from(buf[2]) << 16;
    if len > MAX_PACKET {
        return Err(format!(
            "not a MySQL {what}: {len} bytes is over the {} KiB limit",
            MAX_PACKET / 1024
        ));
    }
    if len == 0 {
        return Err(format!("not a MySQL {what}: empty"));
    }
    Ok((buf.len() >= HEADER + len).then_some((buf[3], HEADER + len)))
}

/// Parse the first packet from `buf`: `Ok(None)` while incomplete, `Err(reason)` when it
/// is not a usable greeting.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<Greeting>, String> {
    let Some((seq, end)) = frame(buf, "greeting")? else {
        return Ok(None);
    };
    if seq != 0 {
        return Err(format!(
            "not a MySQL greeting: sequence number {seq} (expected 0)"
        ));
    }
    let payload = &buf[HEADER..end];
    match payload[0] {
        0x0a => handshake(&payload[1..]).map(Some),
        0xff => {
            Ok(Some(error(&payload[1..]).map(|(code, message)| {
                Greeting::Error { code, message }
            })?))
        }
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
    let fixed = nul + 1 + 4 + 8 + 1;
    if rest.len() < fixed {
        return Err("truncated greeting: ends after the server version".into());
    }
    let version = super::printable(&rest[..nul], 100);
    // MariaDB prefixes "5.5.5-" for old clients; show the real version.
    let version = version
        .strip_prefix("5.5.5-")
        .map(str::to_string)
        .unwrap_or(version);
    // Then, optional in the oldest servers: the capabilities' lower 2 bytes, the
    // character set (1), the status flags (2) and the capabilities' upper 2 bytes.
    let u16_at = |at: usize| {
        rest.get(at..at + 2)
            .map_or(0, |b| u32::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let capabilities = u16_at(fixed) | u16_at(fixed + 5) << 16;
    Ok(Greeting::Handshake {
        version,
        capabilities,
    })
}

/// An ERR packet's body (after 0xff): the code and the message.
fn error(rest: &[u8]) -> Result<(u16, String), String> {
    if rest.len() < 2 {
        return Err("truncated ERR packet".into());
    }
    let code = u16::from_le_bytes([rest[0], rest[1]]);
    let mut message = &rest[2..];
    // Protocol 4.1 puts '#' and a 5-character SQL state before the message.
    if message.first() == Some(&b'#') && message.len() >= 6 {
        message = &message[6..];
    }
    Ok((code, super::printable(message, 200)))
}

/// Parse one reply to the login, from its payload.
pub(crate) fn parse_login_reply(payload: &[u8]) -> Result<LoginReply, String> {
    match payload {
        [0x00, ..] => Ok(LoginReply::Ok),
        [0xff, rest @ ..] => error(rest).map(|(code, message)| LoginReply::Error { code, message }),
        [0xfe, rest @ ..] => {
            let name = rest.split(|&b| b == 0).next().unwrap_or_default();
            Ok(LoginReply::Switch {
                plugin: super::printable(name, 64),
            })
        }
        [0x01, 0x03] => Ok(LoginReply::FastAuthDone),
        [0x01, ..] => Ok(LoginReply::MoreData),
        [other, ..] => Err(format!(
            "unexpected reply to the login: first payload byte 0x{other:02x}"
        )),
        [] => Err("unexpected reply to the login: an empty packet".into()),
    }
}

/// The HandshakeResponse41 for `user` with an empty password, in packet `seq`.
fn login_packet(user: &str, server_capabilities: u32, seq: u8) -> Vec<u8> {
    let capabilities =
        (CLIENT_LONG_PASSWORD | CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH)
            & server_capabilities;
    let mut payload = Vec::with_capacity(64 + user.len());
    payload.extend_from_slice(&capabilities.to_le_bytes());
    payload.extend_from_slice(&(16u32 << 20).to_le_bytes()); // max packet size
    payload.push(CHARSET_UTF8);
    payload.extend_from_slice(&[0; 23]);
    payload.extend_from_slice(user.as_bytes());
    payload.push(0);
    // The empty auth response: a zero length byte with CLIENT_SECURE_CONNECTION, an
    // empty NUL-terminated string without. Either way one 0 byte.
    payload.push(0);
    if capabilities & CLIENT_PLUGIN_AUTH != 0 {
        payload.extend_from_slice(b"mysql_native_password\0");
    }
    packet(seq, &payload)
}

fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    // Payloads here are a few dozen bytes: the length always fits in 3 bytes.
    let len = payload.len().to_le_bytes();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&len[..3]);
    out.push(seq);
    out.extend_from_slice(payload);
    out
}

/// Read the next whole packet, which must carry sequence number `seq`; its payload.
async fn read_packet(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
    seq: u8,
    what: &str,
) -> Result<Vec<u8>, String> {
    loop {
        if let Some((got, end)) = frame(buf, "packet")? {
            if got != seq {
                return Err(format!(
                    "out of order {what}: sequence number {got} (expected {seq})"
                ));
            }
            let payload = buf[HEADER..end].to_vec();
            buf.drain(..end);
            return Ok(payload);
        }
        super::read_more(stream, buf, HEADER + MAX_PACKET, what).await?;
    }
}

pub(crate) struct MysqlCheck {
    /// Log in as this account (empty password) and leave with `COM_QUIT`; `None`: read
    /// the greeting and close.
    pub(crate) user: Option<String>,
}

async fn probe(target: Probe, deadline: Instant, user: Option<&str>) -> CheckResult {
    let mut stream = super::connect(&target, deadline).await?;
    let session = async {
        let mut buf = Vec::new();
        let greeting = loop {
            if let Some(greeting) = parse(&buf)? {
                break greeting;
            }
            super::read_more(&mut stream, &mut buf, HEADER + MAX_PACKET, "greeting").await?;
        };
        let (version, capabilities) = match greeting {
            Greeting::Handshake {
                version,
                capabilities,
            } => (version, capabilities),
            Greeting::Error { code, message } => return Err(format!("ERR {code}: {message}")),
        };
        if let Some(user) = user {
            // The greeting was the only packet so far: nothing follows it unasked.
            buf.clear();
            log_in(&mut stream, &mut buf, user, capabilities).await?;
        }
        Ok::<_, String>(version)
    };
    match tokio::time::timeout_at(deadline, session).await {
        Ok(Ok(version)) => Ok(Some(format!("version: {version}"))),
        Ok(Err(reason)) => Err(Failure::new(reason)),
        Err(_) if user.is_some() => Err(Failure::new(
            "no greeting or no answer to the login before the timeout",
        )),
        Err(_) => Err(Failure::new(
            "no greeting before the timeout (a MySQL server speaks first)",
        )),
    }
    // Dropping the stream closes it with a FIN: every reply was read.
}

async fn log_in(
    stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    buf: &mut Vec<u8>,
    user: &str,
    capabilities: u32,
) -> Result<(), String> {
    if capabilities & CLIENT_PROTOCOL_41 == 0 {
        return Err("the server does not speak protocol 4.1, which health.user needs".into());
    }
    let write = |error: std::io::Error| format!("write: {error}");
    stream
        .write_all(&login_packet(user, capabilities, 1))
        .await
        .map_err(write)?;
    let mut seq = 2u8;
    for _ in 0..MAX_LOGIN_PACKETS {
        let payload = read_packet(stream, buf, seq, "reply to the login").await?;
        match parse_login_reply(&payload)? {
            LoginReply::Ok => {
                // COM_QUIT starts a new command: sequence 0. The server closes after it.
                stream.write_all(&packet(0, &[0x01])).await.map_err(write)?;
                let _ = stream.shutdown().await;
                return Ok(());
            }
            LoginReply::Error { code, message } => {
                return Err(format!("login as {user:?} refused: ERR {code}: {message}"))
            }
            LoginReply::Switch { .. } => {
                // The empty password's response is empty for every plugin that takes
                // one (native, caching_sha2, ed25519 refuse it on their own terms).
                stream
                    .write_all(&packet(seq.wrapping_add(1), &[]))
                    .await
                    .map_err(write)?;
                seq = seq.wrapping_add(2);
            }
            LoginReply::FastAuthDone => seq = seq.wrapping_add(1),
            LoginReply::MoreData => {
                return Err(format!(
                    "the server wants a password for {user:?}; health.user needs an \
                     account with an empty password"
                ))
            }
        }
    }
    Err(format!(
        "the login as {user:?} did not finish within {MAX_LOGIN_PACKETS} packets"
    ))
}

impl Check for MysqlCheck {
    fn check(
        &self,
        target: Probe,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = CheckResult> + Send + '_>> {
        Box::pin(probe(target, deadline, self.user.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                version: "10.11.6-MariaDB-0+deb12u1".into(),
                capabilities: 0x81ff_f7fe,
            }))
        );
        assert_eq!(
            parse(&greeting("8.0.36")),
            Ok(Some(Greeting::Handshake {
                version: "8.0.36".into(),
                capabilities: 0x81ff_f7fe,
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
        let failure = MysqlCheck { user: None }
            .check(Probe { addr, tls: None }, deadline)
            .await
            .unwrap_err();
        assert!(
            failure.reason.contains("over the 64 KiB limit"),
            "{}",
            failure.reason
        );
    }

    #[test]
    fn greeting_without_capabilities_reads_as_none() {
        // A 3.x-era greeting: nothing after the filler.
        let mut payload = vec![10];
        payload.extend_from_slice(b"3.23.58\0");
        payload.extend_from_slice(&[0; 13]);
        assert_eq!(
            parse(&packet(0, &payload)),
            Ok(Some(Greeting::Handshake {
                version: "3.23.58".into(),
                capabilities: 0
            }))
        );
    }

    #[test]
    fn login_packet_layout() {
        let server = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH | 0x4;
        let out = login_packet("legate", server, 1);
        let payload = &out[HEADER..];
        assert_eq!(usize::from(out[0]), payload.len());
        assert_eq!(out[3], 1, "sequence number");
        let capabilities = u32::from_le_bytes(payload[..4].try_into().unwrap());
        // Only what both sides speak; never a flag the server lacks (LONG_PASSWORD here).
        assert_eq!(
            capabilities,
            CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH
        );
        assert_eq!(payload[8], CHARSET_UTF8);
        assert!(payload[9..32].iter().all(|&b| b == 0), "filler");
        assert_eq!(&payload[32..], b"legate\0\0mysql_native_password\0");

        // Without plugin auth the name is left out.
        let out = login_packet("u", CLIENT_PROTOCOL_41, 1);
        assert_eq!(&out[HEADER + 32..], b"u\0\0");
    }

    #[test]
    fn login_replies() {
        assert_eq!(
            parse_login_reply(&[0, 0, 0, 2, 0, 0, 0]),
            Ok(LoginReply::Ok)
        );
        let mut denied = vec![0xff];
        denied.extend_from_slice(&1045u16.to_le_bytes());
        denied.extend_from_slice(b"#28000Access denied for user 'nobody'@'127.0.0.1'");
        assert_eq!(
            parse_login_reply(&denied),
            Ok(LoginReply::Error {
                code: 1045,
                message: "Access denied for user 'nobody'@'127.0.0.1'".into()
            })
        );
        assert_eq!(
            parse_login_reply(b"\xfecaching_sha2_password\0scramble\0"),
            Ok(LoginReply::Switch {
                plugin: "caching_sha2_password".into()
            })
        );
        assert_eq!(parse_login_reply(&[1, 3]), Ok(LoginReply::FastAuthDone));
        assert_eq!(parse_login_reply(&[1, 4]), Ok(LoginReply::MoreData));
        assert!(parse_login_reply(&[0x0a]).unwrap_err().contains("0x0a"));
        assert!(parse_login_reply(&[]).is_err());
        assert!(parse_login_reply(&[0xff, 1]).is_err());
    }

    /// A scripted server: sends `script`'s replies in turn, each after reading one packet
    /// from the check (the first, the greeting, at once); returns what the check sent.
    async fn scripted(
        greeting_packet: Vec<u8>,
        replies: Vec<Vec<u8>>,
        user: &str,
    ) -> (CheckResult, Vec<u8>) {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            socket.write_all(&greeting_packet).await.unwrap();
            let mut seen = Vec::new();
            for reply in replies {
                let mut chunk = [0u8; 512];
                let n = socket.read(&mut chunk).await.unwrap();
                seen.extend_from_slice(&chunk[..n]);
                socket.write_all(&reply).await.unwrap();
            }
            // Whatever comes after the last reply (COM_QUIT), until the check closes.
            let _ = socket.read_to_end(&mut seen).await;
            seen
        });
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let check = MysqlCheck {
            user: Some(user.into()),
        };
        let result = check.check(Probe { addr, tls: None }, deadline).await;
        (result, server.await.unwrap())
    }

    #[tokio::test]
    async fn login_then_quit() {
        let (result, seen) = scripted(
            greeting("8.0.36"),
            vec![packet(2, &[0, 0, 0, 2, 0, 0, 0])],
            "legate",
        )
        .await;
        assert_eq!(result, Ok(Some("version: 8.0.36".into())));
        let quit = packet(0, &[0x01]);
        assert!(seen.ends_with(&quit), "no COM_QUIT after the OK: {seen:?}");
        assert!(seen.windows(7).any(|w| w == b"legate\0"), "{seen:?}");
    }

    #[tokio::test]
    async fn login_after_a_plugin_switch_and_fast_auth() {
        let ok = packet(5, &[0, 0, 0, 2, 0, 0, 0]);
        let fast_then_ok = [packet(4, &[1, 3]), ok].concat();
        let (result, seen) = scripted(
            greeting("8.0.36"),
            vec![
                packet(2, b"\xfecaching_sha2_password\x0012345678901234567890\0"),
                fast_then_ok,
            ],
            "legate",
        )
        .await;
        assert_eq!(result, Ok(Some("version: 8.0.36".into())));
        assert!(
            seen.windows(4).any(|w| w == [0, 0, 0, 3]),
            "no empty auth response after the switch: {seen:?}"
        );
        assert!(seen.ends_with(&packet(0, &[0x01])), "no COM_QUIT: {seen:?}");
    }

    #[tokio::test]
    async fn refused_logins_and_odd_replies_fail_with_the_reason() {
        let mut denied = vec![0xff];
        denied.extend_from_slice(&1045u16.to_le_bytes());
        denied.extend_from_slice(b"#28000Access denied for user 'legate'@'127.0.0.1'");
        let cases = [
            (
                packet(2, &denied),
                "login as \"legate\" refused: ERR 1045: Access denied",
            ),
            (
                packet(2, &[1, 4]),
                "needs an account with an empty password",
            ),
            (packet(3, &[0, 0, 0]), "sequence number 3 (expected 2)"),
            (packet(2, b"\x0aagain"), "unexpected reply to the login"),
            (b"\xff\xff\xff\x02".to_vec(), "over the 64 KiB limit"),
        ];
        for (reply, expected) in cases {
            let (result, _) = scripted(greeting("10.11.6-MariaDB"), vec![reply], "legate").await;
            let failure = result.unwrap_err();
            assert!(failure.reason.contains(expected), "{}", failure.reason);
        }
        // A server without protocol 4.1 is refused before anything is sent.
        let mut payload = vec![10];
        payload.extend_from_slice(b"3.23.58\0");
        payload.extend_from_slice(&[0; 13]);
        let (result, seen) = scripted(packet(0, &payload), vec![], "legate").await;
        assert!(result.unwrap_err().reason.contains("protocol 4.1"));
        assert!(seen.is_empty(), "{seen:?}");
    }

    #[test]
    fn random_login_replies_never_panic() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut input: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if let Some(first) = input.first_mut() {
                *first = [0u8, 1, 0xfe, 0xff, 7][rng.usize(..5)];
            }
            let _ = parse_login_reply(&input);
        }
    }
}
