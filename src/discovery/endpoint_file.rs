//! The endpoint-file format behind `file:PATH` targets.
//!
//! One endpoint per line: `HOST:PORT`, optionally followed by `weight=N` and/or
//! `backup`; `#` starts a comment, blank lines are ignored and lines may end in
//! CRLF. This module only turns text into [`EndpointLine`]s; reading, watching
//! and the zero-byte "write in progress" rule belong to the file watcher, which
//! keeps its last good set whenever this parser refuses a file. A file with any
//! bad line is refused whole, so a half-written or mistyped file is never partly
//! applied. `HOST:PORT` follows the same rules as an upstream target
//! (`crate::config::target`), so a line that works in one place works in the other.
use crate::config::target::{parse_host_port, HostPort};
use std::collections::HashMap;
use std::net::IpAddr;

/// The largest endpoint file legate reads; anything bigger is refused, not truncated.
pub(crate) const MAX_ENDPOINT_FILE_BYTES: usize = 1 << 20;

/// The most traffic share one endpoint may ask for relative to a `weight=1` peer.
const MAX_WEIGHT: u32 = 10_000;

/// One endpoint as written on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointLine {
    pub(crate) host: Host,
    pub(crate) port: u16,
    /// 1..=10000; 1 when not written.
    pub weight: u32,
    /// Gets traffic only while no other endpoint of the listener is healthy.
    pub backup: bool,
}

/// The host part of a line: an address to use as is, or a name to resolve.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Host {
    Ip(IpAddr),
    Name(String),
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Name(name) => f.write_str(name),
        }
    }
}

/// Why a file was refused. `line` is 1-based; 0 means the file as a whole (its size).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct EndpointFileError {
    pub(crate) line: usize,
    pub(crate) message: String,
}

/// Parse a whole endpoint file, refusing it entirely if any line is bad.
///
/// A text with only comments and blank lines gives an empty list (an operator
/// emptying the set on purpose). A zero-byte text gives an empty list too, but
/// callers must not get that far: a zero-byte file is a write in progress.
pub fn parse_endpoint_file(text: &str) -> Result<Vec<EndpointLine>, EndpointFileError> {
    if text.len() > MAX_ENDPOINT_FILE_BYTES {
        return Err(EndpointFileError {
            line: 0,
            message: format!(
                "the file is {} bytes, over the {MAX_ENDPOINT_FILE_BYTES}-byte (1 MiB) cap for endpoint files",
                text.len()
            ),
        });
    }
    // Windows editors write a byte-order mark; it is not part of the first host.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);

    let mut endpoints = Vec::new();
    // Keyed on the lowercased host, since DNS names are case-insensitive.
    let mut first_seen: HashMap<(String, u16), usize> = HashMap::new();
    for (index, raw_line) in text.split('\n').enumerate() {
        let line = index + 1;
        let error = |message: String| EndpointFileError { line, message };
        if raw_line.contains('\0') {
            return Err(error("contains a NUL byte; is this a binary file?".into()));
        }
        let content = raw_line.strip_suffix('\r').unwrap_or(raw_line);
        let content = match content.split_once('#') {
            Some((before, _comment)) => before,
            None => content,
        };
        let mut words = content.split_ascii_whitespace();
        let Some(address) = words.next() else {
            continue;
        };
        let (host, port) = match parse_host_port(address) {
            Ok(HostPort::Ip(addr)) => (Host::Ip(addr.ip()), addr.port()),
            Ok(HostPort::Name { host, port }) => (Host::Name(host), port),
            Err(why) => return Err(error(format!("invalid endpoint {address:?}: {why}"))),
        };
        let mut weight = None;
        let mut backup = false;
        for word in words {
            if word == "backup" {
                if backup {
                    return Err(error("backup is given twice".into()));
                }
                backup = true;
            } else if let Some(value) = word.strip_prefix("weight=") {
                if weight.is_some() {
                    return Err(error("weight is given twice".into()));
                }
                weight = Some(parse_weight(value).map_err(error)?);
            } else {
                return Err(error(format!(
                    "unknown option {word:?}: expected weight=N or backup"
                )));
            }
        }

        let key = (host.to_string().to_ascii_lowercase(), port);
        if let Some(first) = first_seen.get(&key) {
            return Err(error(format!(
                "{host}:{port} is listed twice (first on line {first})"
            )));
        }
        first_seen.insert(key, line);
        endpoints.push(EndpointLine {
            host,
            port,
            weight: weight.unwrap_or(1),
            backup,
        });
    }
    Ok(endpoints)
}

fn parse_weight(value: &str) -> Result<u32, String> {
    let out_of_range = || format!("weight={value} is out of range 1-{MAX_WEIGHT}");
    if value.is_empty() || !value.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "invalid weight {value:?}: expected a whole number 1-{MAX_WEIGHT}"
        ));
    }
    match value.parse::<u32>() {
        Ok(weight) if (1..=MAX_WEIGHT).contains(&weight) => Ok(weight),
        _ => Err(out_of_range()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Vec<EndpointLine> {
        match parse_endpoint_file(text) {
            Ok(lines) => lines,
            Err(err) => panic!("{text:?} should parse, got {err}"),
        }
    }

    fn err(text: &str) -> EndpointFileError {
        match parse_endpoint_file(text) {
            Ok(lines) => panic!("{text:?} should fail, got {lines:?}"),
            Err(err) => err,
        }
    }

    fn ip(text: &str, port: u16) -> EndpointLine {
        EndpointLine {
            host: Host::Ip(text.parse().unwrap()),
            port,
            weight: 1,
            backup: false,
        }
    }

    fn name(text: &str, port: u16) -> EndpointLine {
        EndpointLine {
            host: Host::Name(text.into()),
            port,
            weight: 1,
            backup: false,
        }
    }

    #[test]
    fn one_endpoint_per_line() {
        assert_eq!(
            ok("10.0.0.1:6379\n10.0.0.2:6379\n"),
            vec![ip("10.0.0.1", 6379), ip("10.0.0.2", 6379)]
        );
    }

    #[test]
    fn last_line_without_newline() {
        assert_eq!(ok("10.0.0.1:6379"), vec![ip("10.0.0.1", 6379)]);
    }

    #[test]
    fn ipv6_and_names() {
        assert_eq!(
            ok("[::1]:6379\nredis-0.redis.db.svc.cluster.local:6379\n"),
            vec![
                ip("::1", 6379),
                name("redis-0.redis.db.svc.cluster.local", 6379)
            ]
        );
    }

    #[test]
    fn weight_and_backup_in_any_order() {
        let lines = ok("a:1 weight=5\nb:1 backup\nc:1 weight=2 backup\nd:1 backup weight=10000\n");
        let got: Vec<(u32, bool)> = lines.iter().map(|l| (l.weight, l.backup)).collect();
        assert_eq!(got, vec![(5, false), (1, true), (2, true), (10_000, true)]);
    }

    #[test]
    fn comments_and_blank_lines() {
        let text = "# the primary\n\n   \n10.0.0.1:6379 # main\n10.0.0.2:6379 backup# spare\n\t# indented\n";
        let lines = ok(text);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], ip("10.0.0.1", 6379));
        assert!(lines[1].backup);
    }

    #[test]
    fn comment_only_is_empty() {
        assert_eq!(ok("# emptied on purpose\n"), vec![]);
        assert_eq!(ok("\n\n"), vec![]);
    }

    #[test]
    fn crlf_line_endings() {
        assert_eq!(
            ok("10.0.0.1:6379 weight=3\r\n10.0.0.2:6379\r\n"),
            vec![
                EndpointLine {
                    weight: 3,
                    ..ip("10.0.0.1", 6379)
                },
                ip("10.0.0.2", 6379)
            ]
        );
    }

    #[test]
    fn tabs_between_words() {
        assert_eq!(ok("a:1\tweight=2")[0].weight, 2);
    }

    #[test]
    fn byte_order_mark() {
        assert_eq!(ok("\u{feff}10.0.0.1:1\n"), vec![ip("10.0.0.1", 1)]);
    }

    #[test]
    fn rejects_ipv6_without_brackets() {
        let error = err("10.0.0.1:1\n::1:6379\n");
        assert_eq!(error.line, 2);
        assert!(
            error.message.contains("an IPv6 address needs brackets"),
            "{error}"
        );
    }

    #[test]
    fn rejects_bad_ports() {
        assert!(err("a:0").message.contains("port 0 is out of range"));
        assert!(err("a:70000")
            .message
            .contains("port 70000 is out of range"));
        assert!(err("a").message.contains("missing port"));
        assert!(err("a:x").message.contains("invalid port"));
    }

    #[test]
    fn rejects_bad_hosts() {
        assert!(err("-a:1")
            .message
            .contains("must not start or end with '-'"));
        assert!(err("a..b:1").message.contains("empty label"));
        assert!(err("10.0.0.300:1").message.contains("not a valid IPv4"));
    }

    #[test]
    fn rejects_target_prefixes() {
        // The file lists endpoints, not targets: no nesting of dns:/srv:/file:.
        assert!(err("dns:a:1").line == 1);
        assert!(err("file:/x").line == 1);
    }

    #[test]
    fn rejects_bad_weights() {
        assert!(err("a:1 weight=0")
            .message
            .contains("weight=0 is out of range 1-10000"));
        assert!(err("a:1 weight=10001").message.contains("out of range"));
        assert!(err("a:1 weight=99999999999")
            .message
            .contains("out of range"));
        assert!(err("a:1 weight=").message.contains("invalid weight"));
        assert!(err("a:1 weight=-1").message.contains("invalid weight"));
        assert!(err("a:1 weight=1.5").message.contains("invalid weight"));
        assert!(err("a:1 weight=2 weight=3")
            .message
            .contains("weight is given twice"));
        assert!(err("a:1 weight = 2")
            .message
            .contains("unknown option \"weight\""));
    }

    #[test]
    fn rejects_unknown_options() {
        let error = err("a:1 primary");
        assert!(error
            .message
            .contains("unknown option \"primary\": expected weight=N or backup"));
        assert!(err("a:1 BACKUP").message.contains("unknown option"));
        assert!(err("a:1 b:2").message.contains("unknown option"));
        assert!(err("a:1 backup backup")
            .message
            .contains("backup is given twice"));
    }

    #[test]
    fn rejects_duplicates() {
        let error = err("# list\n10.0.0.1:6379\n10.0.0.2:6379\n10.0.0.1:6379 backup\n");
        assert_eq!(error.line, 4);
        assert!(
            error
                .message
                .contains("10.0.0.1:6379 is listed twice (first on line 2)"),
            "{error}"
        );
        assert_eq!(err("Redis:1\nredis:1").line, 2);
        assert!(err("[::1]:1\n[0::1]:1")
            .message
            .contains("[::1]:1 is listed twice"));
    }

    #[test]
    fn same_host_other_port_is_fine() {
        assert_eq!(ok("a:1\na:2").len(), 2);
    }

    #[test]
    fn rejects_nul_bytes() {
        let error = err("a:1\nb:1\0\n");
        assert_eq!(error.line, 2);
        assert!(error.message.contains("NUL"));
        assert_eq!(err("# \0 in a comment").line, 1);
    }

    #[test]
    fn one_bad_line_refuses_the_whole_file() {
        let error = err("a:1\nb:1\nnot an endpoint\nc:1\n");
        assert_eq!(error.line, 3);
    }

    #[test]
    fn size_cap() {
        let mut text = "# pad\n".repeat(MAX_ENDPOINT_FILE_BYTES / 6);
        text.push_str("a:1\n");
        assert!(text.len() <= MAX_ENDPOINT_FILE_BYTES);
        assert_eq!(ok(&text).len(), 1);
        let text = "#".repeat(MAX_ENDPOINT_FILE_BYTES + 1);
        let error = err(&text);
        assert_eq!(error.line, 0);
        assert!(error.message.contains("1 MiB"), "{error}");
    }

    #[test]
    fn display() {
        let error = err("a:1 weight=0");
        assert_eq!(error.to_string(), format!("line 1: {}", error.message));
        assert_eq!(Host::Ip("::1".parse().unwrap()).to_string(), "[::1]");
        assert_eq!(Host::Name("a".into()).to_string(), "a");
    }

    #[test]
    fn zero_bytes_is_empty() {
        assert_eq!(ok(""), vec![]);
    }
}
