//! `redis` and `redis-primary`: speak just enough RESP to ask a Redis server whether it
//! can take traffic.
//!
//! - `redis`: `PING` must answer `+PONG`. Any error reply (`-LOADING`, `-MASTERDOWN`,
//!   `-NOAUTH`, ...) fails the check with that error as the reason.
//! - `redis-primary`: `ROLE` must answer an array whose first element is `master`. A
//!   `slave`/`replica` or `sentinel` is "healthy but not eligible": it fails at once (not
//!   after `unhealthy_after`, since every write to it would fail with READONLY) and its
//!   role is the failure's detail, shown in `/endpoints`.
//!
//! With `health.password` (or `password_file`, read at every check so a rotated file is
//! picked up), `AUTH` is pipelined before the command. The password never appears in a
//! reason or a log.
//!
//! Replies are parsed by a small RESP2 reader that keeps at most `MAX_REPLY` bytes per
//! reply and never allocates from a length the server sent: a megabyte or garbage fails
//! the check with a clear reason. The connection is simply closed afterwards (Redis does
//! not mind; `QUIT` is deprecated since Redis 7.2).

use super::{Check, CheckResult, Failure, Probe};
use crate::config::Secret;
use std::future::Future;
use std::pin::Pin;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

/// The most bytes one reply may take; a longer one fails the check.
const MAX_REPLY: usize = 64 * 1024;
/// Arrays nested deeper than this are refused (ROLE nests two levels).
const MAX_DEPTH: usize = 8;
/// The longest password file we read.
const MAX_PASSWORD: u64 = 64 * 1024;

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// Why bytes are not a (small enough) RESP reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RespError {
    #[error("reply larger than {} KiB", MAX_REPLY / 1024)]
    TooLarge,
    #[error("not a RESP reply: {0}")]
    Malformed(String),
}

/// Parse one reply from the start of `buf`: `Ok(None)` while it is incomplete, else the
/// reply and the number of bytes it took.
pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    parse_at(buf, 0, 0)
}

fn parse_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Reply, usize)>, RespError> {
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some(line_end) = find_crlf(buf, pos + 1) else {
        return Ok(None);
    };
    let line = &buf[pos + 1..line_end];
    let next = line_end + 2;
    match kind {
        b'+' => Ok(Some((Reply::Simple(super::printable(line, 200)), next))),
        b'-' => Ok(Some((Reply::Error(super::printable(line, 200)), next))),
        b':' => Ok(Some((Reply::Integer(number(line)?), next))),
        b'$' => {
            let Some(len) = length(line)? else {
                return Ok(Some((Reply::Bulk(None), next)));
            };
            let end = next + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::Malformed(
                    "bulk string not followed by CRLF".into(),
                ));
            }
            Ok(Some((Reply::Bulk(Some(buf[next..end].to_vec())), end + 2)))
        }
        b'*' => {
            let Some(len) = length(line)? else {
                return Ok(Some((Reply::Array(None), next)));
            };
            if depth >= MAX_DEPTH {
                return Err(RespError::Malformed(format!(
                    "arrays nested more than {MAX_DEPTH} deep"
                )));
            }
            // No `with_capacity(len)`: the length is the server's word; the elements
            // themselves are bounded by the buffer.
            let mut items = Vec::new();
            let mut at = next;
            for _ in 0..len {
                match parse_at(buf, at, depth + 1)? {
                    Some((item, after)) => {
                        items.push(item);
                        at = after;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        other => Err(RespError::Malformed(format!(
            "unexpected type byte {:?}",
            super::printable(&[other], 4)
        ))),
    }
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|pair| pair == b"\r\n")
        .map(|at| from + at)
}

fn number(line: &[u8]) -> Result<i64, RespError> {
    std::str::from_utf8(line)
        .ok()
        .filter(|text| text.len() <= 20)
        .and_then(|text| text.parse::<i64>().ok())
        .ok_or_else(|| RespError::Malformed(format!("bad number {:?}", super::printable(line, 24))))
}

/// A bulk or array length: `None` for the null `-1`; longer than a reply may be is
/// refused before anything is read or allocated.
fn length(line: &[u8]) -> Result<Option<usize>, RespError> {
    match number(line)? {
        -1 => Ok(None),
        len if len < 0 => Err(RespError::Malformed(format!("negative length {len}"))),
        len if len as u64 > MAX_REPLY as u64 => Err(RespError::TooLarge),
        len => Ok(Some(len as usize)),
    }
}

/// Read one reply, keeping what follows it in `buf` (pipelined replies).
async fn read_reply(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Result<Reply, String> {
    loop {
        match parse(buf) {
            Ok(Some((reply, used))) => {
                buf.drain(..used);
                return Ok(reply);
            }
            Ok(None) if buf.len() >= MAX_REPLY => return Err(RespError::TooLarge.to_string()),
            Ok(None) => {}
            Err(error) => return Err(error.to_string()),
        }
        super::read_more(stream, buf, MAX_REPLY, "reply").await?;
    }
}

/// `*N\r\n$len\r\narg\r\n...`: a command as a RESP array of bulk strings.
fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    Ping,
    Role,
}

pub(crate) struct RedisCheck {
    ask: Ask,
    password: Option<Secret>,
}

impl RedisCheck {
    pub(crate) fn ping(password: Option<Secret>) -> RedisCheck {
        RedisCheck {
            ask: Ask::Ping,
            password,
        }
    }

    pub(crate) fn role(password: Option<Secret>) -> RedisCheck {
        RedisCheck {
            ask: Ask::Role,
            password,
        }
    }

    async fn password(&self) -> Result<Option<String>, Failure> {
        match &self.password {
            None => Ok(None),
            Some(Secret::Inline(password)) => Ok(Some(password.clone())),
            Some(Secret::File(path)) => {
                let mut text = String::new();
                let read = match tokio::fs::File::open(path).await {
                    Ok(file) => file.take(MAX_PASSWORD).read_to_string(&mut text).await,
                    Err(error) => Err(error),
                };
                match read {
                    Ok(_) => Ok(Some(text.trim_end_matches(['\r', '\n']).to_string())),
                    Err(error) => Err(Failure::new(format!(
                        "password_file {}: {error}",
                        path.display()
                    ))),
                }
            }
        }
    }

    async fn probe(&self, target: Probe, deadline: Instant) -> CheckResult {
        let password = self.password().await?;
        let mut stream = super::connect(&target, deadline).await?;
        let mut request = Vec::with_capacity(64);
        if let Some(password) = &password {
            command(&mut request, &[b"AUTH", password.as_bytes()]);
        }
        command(
            &mut request,
            &[match self.ask {
                Ask::Ping => b"PING",
                Ask::Role => b"ROLE",
            }],
        );
        let exchange = async {
            stream
                .write_all(&request)
                .await
                .map_err(|error| format!("write: {error}"))?;
            let mut buf = Vec::new();
            let auth = match password {
                Some(_) => Some(read_reply(&mut stream, &mut buf).await?),
                None => None,
            };
            let answer = read_reply(&mut stream, &mut buf).await?;
            Ok::<_, String>((auth, answer))
        };
        let waiting_for = match self.ask {
            Ask::Ping => "PING",
            Ask::Role => "ROLE",
        };
        let (auth, answer) = match tokio::time::timeout_at(deadline, exchange).await {
            Ok(Ok(replies)) => replies,
            Ok(Err(reason)) => return Err(Failure::new(reason)),
            Err(_) => {
                return Err(Failure::new(format!(
                    "no reply to {waiting_for} before the timeout"
                )))
            }
        };
        match auth {
            None | Some(Reply::Simple(_)) => {}
            Some(Reply::Error(error)) => return Err(Failure::new(format!("AUTH: {error}"))),
            Some(other) => {
                return Err(Failure::new(format!(
                    "AUTH: unexpected reply {}",
                    describe(&other)
                )))
            }
        }
        match self.ask {
            Ask::Ping => judge_ping(answer),
            Ask::Role => judge_role(answer),
        }
    }
}

pub(crate) fn judge_ping(reply: Reply) -> CheckResult {
    match reply {
        Reply::Simple(pong) if pong == "PONG" => Ok(None),
        Reply::Error(error) => Err(Failure::new(error)),
        other => Err(Failure::new(format!(
            "PING: expected +PONG, got {}",
            describe(&other)
        ))),
    }
}

pub(crate) fn judge_role(reply: Reply) -> CheckResult {
    let items = match reply {
        Reply::Error(error) => return Err(Failure::new(error)),
        Reply::Array(Some(items)) if !items.is_empty() => items,
        other => {
            return Err(Failure::new(format!(
                "ROLE: expected an array, got {}",
                describe(&other)
            )))
        }
    };
    let role = match &items[0] {
        Reply::Bulk(Some(role)) => super::printable(role, 32),
        Reply::Simple(role) => role.clone(),
        other => {
            return Err(Failure::new(format!(
                "ROLE: expected a role name, got {}",
                describe(other)
            )))
        }
    };
    let detail = format!("role: {role}");
    match role.as_str() {
        "master" => Ok(Some(detail)),
        "slave" | "replica" => {
            // ["slave", master host, master port, link state, offset]
            let text = |at: usize| match items.get(at) {
                Some(Reply::Bulk(Some(bytes))) => Some(super::printable(bytes, 64)),
                Some(Reply::Integer(value)) => Some(value.to_string()),
                _ => None,
            };
            let reason = match (text(1), text(2), text(3)) {
                (Some(host), Some(port), Some(link)) => {
                    format!("not the primary: {detail} (replica of {host}:{port}, link {link})")
                }
                _ => format!("not the primary: {detail}"),
            };
            Err(Failure::not_eligible(reason, detail))
        }
        "sentinel" => Err(Failure::not_eligible(
            format!("not the primary: {detail}"),
            detail,
        )),
        _ => Err(Failure::new(format!("ROLE: unknown role {role:?}"))),
    }
}

/// A short description of an unexpected reply, for a reason.
fn describe(reply: &Reply) -> String {
    match reply {
        Reply::Simple(text) => format!("+{text}"),
        Reply::Error(text) => format!("-{text}"),
        Reply::Integer(value) => format!(":{value}"),
        Reply::Bulk(None) => "a null bulk string".into(),
        Reply::Bulk(Some(bytes)) => format!("${:?}", super::printable(bytes, 64)),
        Reply::Array(None) => "a null array".into(),
        Reply::Array(Some(items)) => format!("an array of {}", items.len()),
    }
}

impl Check for RedisCheck {
    fn check(
        &self,
        target: Probe,
        deadline: Instant,
    ) -> Pin<Box<dyn Future<Output = CheckResult> + Send + '_>> {
        Box::pin(self.probe(target, deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(input: &[u8]) -> Reply {
        let (reply, used) = parse(input).unwrap().unwrap();
        assert_eq!(used, input.len());
        reply
    }

    #[test]
    fn good_replies() {
        assert_eq!(parsed(b"+PONG\r\n"), Reply::Simple("PONG".into()));
        assert_eq!(
            parsed(b"-LOADING Redis is loading the dataset in memory\r\n"),
            Reply::Error("LOADING Redis is loading the dataset in memory".into())
        );
        assert_eq!(parsed(b":-42\r\n"), Reply::Integer(-42));
        assert_eq!(parsed(b"$-1\r\n"), Reply::Bulk(None));
        assert_eq!(parsed(b"$0\r\n\r\n"), Reply::Bulk(Some(Vec::new())));
        assert_eq!(parsed(b"*-1\r\n"), Reply::Array(None));
        let role = parsed(b"*3\r\n$6\r\nmaster\r\n:3129659\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n9001\r\n$7\r\n3129242\r\n");
        let Reply::Array(Some(items)) = role else {
            panic!("not an array")
        };
        assert_eq!(items[0], Reply::Bulk(Some(b"master".to_vec())));
        assert_eq!(items.len(), 3);
    }

    #[test]
    fn pipelined_replies_parse_one_at_a_time() {
        let input = b"+OK\r\n+PONG\r\n";
        let (first, used) = parse(input).unwrap().unwrap();
        assert_eq!(first, Reply::Simple("OK".into()));
        assert_eq!(parsed(&input[used..]), Reply::Simple("PONG".into()));
    }

    #[test]
    fn every_truncation_is_incomplete_not_an_error() {
        let input: &[u8] =
            b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:3167038\r\n";
        assert!(parse(input).unwrap().is_some());
        for end in 0..input.len() {
            assert_eq!(parse(&input[..end]), Ok(None), "prefix of {end} bytes");
        }
    }

    #[test]
    fn oversized_lengths_are_refused_before_reading() {
        assert_eq!(parse(b"$1048576\r\n"), Err(RespError::TooLarge));
        assert_eq!(parse(b"*99999999999\r\n"), Err(RespError::TooLarge));
        assert!(matches!(parse(b"$-2\r\n"), Err(RespError::Malformed(_))));
        assert!(matches!(
            parse(b"$99999999999999999999999\r\n"),
            Err(RespError::Malformed(_))
        ));
    }

    #[test]
    fn garbage_is_refused() {
        for input in [
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
            b"$3\r\nabcd\r\n",
            b":12x\r\n",
            b"%1\r\n",
        ] {
            assert!(
                matches!(parse(input), Err(RespError::Malformed(_))),
                "{input:?}"
            );
        }
        let deep = b"*1\r\n".repeat(100);
        assert!(matches!(parse(&deep), Err(RespError::Malformed(_))));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = fastrand::Rng::with_seed(4);
        let alphabet = b"+-:$*\r\n0123456789-abc";
        for round in 0..20_000 {
            let len = rng.usize(0..256);
            let input: Vec<u8> = if round % 2 == 0 {
                (0..len).map(|_| rng.u8(..)).collect()
            } else {
                // Mostly RESP-looking bytes, to get past the first line more often.
                (0..len)
                    .map(|_| alphabet[rng.usize(..alphabet.len())])
                    .collect()
            };
            if let Ok(Some((_, used))) = parse(&input) {
                assert!(used <= input.len());
            }
        }
    }

    #[test]
    fn ping_verdicts() {
        assert_eq!(judge_ping(Reply::Simple("PONG".into())), Ok(None));
        let failure =
            judge_ping(Reply::Error("MASTERDOWN Link with MASTER is down".into())).unwrap_err();
        assert_eq!(failure.reason, "MASTERDOWN Link with MASTER is down");
        assert!(!failure.not_eligible);
        assert!(judge_ping(Reply::Integer(1)).is_err());
    }

    #[test]
    fn role_verdicts() {
        let bulk = |s: &str| Reply::Bulk(Some(s.as_bytes().to_vec()));
        assert_eq!(
            judge_role(Reply::Array(Some(vec![
                bulk("master"),
                Reply::Integer(0),
                Reply::Array(Some(vec![]))
            ]))),
            Ok(Some("role: master".into()))
        );
        let replica = judge_role(Reply::Array(Some(vec![
            bulk("slave"),
            bulk("127.0.0.1"),
            Reply::Integer(6379),
            bulk("connected"),
            Reply::Integer(10),
        ])))
        .unwrap_err();
        assert!(replica.not_eligible);
        assert_eq!(replica.detail.as_deref(), Some("role: slave"));
        assert!(replica.reason.contains("replica of 127.0.0.1:6379"));
        let sentinel = judge_role(Reply::Array(Some(vec![
            bulk("sentinel"),
            Reply::Array(None),
        ])))
        .unwrap_err();
        assert_eq!(sentinel.detail.as_deref(), Some("role: sentinel"));
        assert!(judge_role(Reply::Error("NOAUTH Authentication required.".into())).is_err());
        assert!(judge_role(Reply::Array(Some(vec![]))).is_err());
        assert!(!judge_role(bulk("master")).unwrap_err().not_eligible);
    }

    #[test]
    fn auth_is_a_resp_array() {
        let mut out = Vec::new();
        command(&mut out, &[b"AUTH", b"s3cret"]);
        command(&mut out, &[b"PING"]);
        assert_eq!(
            out,
            b"*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n*1\r\n$4\r\nPING\r\n".to_vec()
        );
    }

    async fn serve_once(reply: Vec<u8>) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 256];
            let _ = socket.read(&mut request).await;
            let _ = socket.write_all(&reply).await;
            // Keep the connection open a moment, as a server would.
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_megabyte_reply_fails_with_bounded_memory() {
        let mut reply = b"+".to_vec();
        reply.extend(std::iter::repeat_n(b'x', 1 << 20));
        let addr = serve_once(reply).await;
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let failure = RedisCheck::ping(None)
            .check(Probe { addr, tls: None }, deadline)
            .await
            .unwrap_err();
        assert_eq!(failure.reason, "reply larger than 64 KiB");
    }

    #[tokio::test]
    async fn a_truncated_reply_says_so() {
        let addr = serve_once(b"*5\r\n$5\r\nsla".to_vec()).await;
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let failure = RedisCheck::role(None)
            .check(Probe { addr, tls: None }, deadline)
            .await
            .unwrap_err();
        assert!(failure.reason.contains("truncated"), "{}", failure.reason);
    }

    #[tokio::test]
    async fn a_silent_server_times_out_with_a_reason() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let deadline = Instant::now() + std::time::Duration::from_millis(200);
        let failure = RedisCheck::ping(None)
            .check(Probe { addr, tls: None }, deadline)
            .await
            .unwrap_err();
        assert_eq!(failure.reason, "no reply to PING before the timeout");
        drop(listener);
    }
}
