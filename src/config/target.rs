//! The upstream target grammar (one grammar for the CLI and the file).
//!
//! `--upstream` flags and the file's `upstream` entries both go through
//! `Target::from_str`, so they accept exactly the same forms:
//! `IP:PORT` and `[IPv6]:PORT` (static), `HOST:PORT` and `dns:HOST:PORT` (A/AAAA),
//! `srv:NAME` (SRV) and `file:PATH` (a watched endpoint file). The `HOST:PORT`
//! part is also the first word of every endpoint-file line, so the endpoint-file
//! parser reuses [`parse_host_port`] rather than growing a second, subtly
//! different grammar.
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

/// One `upstream` entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `10.0.0.5:6379`, `[::1]:6379`
    Static(SocketAddr),
    /// `host:port` or `dns:host:port`: A/AAAA, re-resolved when the TTL runs out.
    Dns { host: String, port: u16 },
    /// `srv:_redis._tcp.example`
    Srv(String),
    /// `file:/etc/legate/redis.endpoints`
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TargetError(pub(crate) String);

const FORMS: &str =
    "expected HOST:PORT, IP:PORT, [IPv6]:PORT, dns:HOST:PORT, srv:NAME or file:PATH";

impl std::str::FromStr for Target {
    type Err = TargetError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let fail = |why: String| Err(TargetError(format!("invalid target {text:?}: {why}")));

        if text.is_empty() {
            return fail(format!("it is empty; {FORMS}"));
        }
        if text.trim() != text {
            return fail("remove the spaces around it".into());
        }
        if let Some(path) = text.strip_prefix("file:") {
            if path.is_empty() {
                return fail("file: needs a path, like file:/etc/legate/redis.endpoints".into());
            }
            if path.contains('\0') {
                return fail("the path contains a NUL byte".into());
            }
            return Ok(Target::File(PathBuf::from(path)));
        }
        if let Some(name) = text.strip_prefix("srv:") {
            if name.is_empty() {
                return fail("srv: needs a name, like srv:_redis._tcp.redis.example".into());
            }
            if name.contains(':') {
                return fail(
                    "an SRV record brings its own ports; write srv:NAME without :PORT".into(),
                );
            }
            return match validate_dns_name(name) {
                Ok(()) => Ok(Target::Srv(name.to_string())),
                Err(why) => fail(why),
            };
        }
        if let Some(rest) = text.strip_prefix("dns:") {
            return match parse_host_port(rest) {
                Ok(HostPort::Ip(addr)) => Ok(Target::Static(addr)),
                Ok(HostPort::Name { host, port }) => Ok(Target::Dns { host, port }),
                Err(why) => fail(why),
            };
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return fail(format!(
                "legate forwards TCP, so there is no {scheme}:// here; write HOST:PORT"
            ));
        }
        if let Some(kind) = unknown_kind(text) {
            return fail(format!("unknown kind {kind:?}; {FORMS}"));
        }
        match parse_host_port(text) {
            Ok(HostPort::Ip(addr)) => Ok(Target::Static(addr)),
            Ok(HostPort::Name { host, port }) => Ok(Target::Dns { host, port }),
            Err(why) => fail(why),
        }
    }
}

/// `tcp:host:6379` or `dsn:host:6379`: a word before a colon, then something with
/// another colon, which no host name or IPv6 literal looks like.
fn unknown_kind(text: &str) -> Option<String> {
    let (kind, rest) = text.split_once(':')?;
    let is_word = !kind.is_empty() && kind.chars().all(|c| c.is_ascii_alphabetic());
    if is_word && rest.contains(':') && !looks_like_bare_ipv6(text) {
        Some(format!("{kind}:"))
    } else {
        None
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Static(addr) => write!(f, "{addr}"),
            Target::Dns { host, port } => write!(f, "dns:{host}:{port}"),
            Target::Srv(name) => write!(f, "srv:{name}"),
            Target::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// A validated `HOST:PORT`: either a literal address or a DNS name to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostPort {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

/// Parse `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT` with the rules every part of legate
/// shares: ports 1–65535, IPv6 only in brackets, host names as in [`validate_dns_name`].
///
/// The error says what is wrong without repeating the text; callers add context.
pub(crate) fn parse_host_port(text: &str) -> Result<HostPort, String> {
    if text.is_empty() {
        return Err("expected HOST:PORT, like redis.internal:6379".into());
    }
    if let Some(bracketed) = text.strip_prefix('[') {
        let Some((inside, after)) = bracketed.split_once(']') else {
            return Err("missing ']' after the IPv6 address, like [::1]:6379".into());
        };
        let ip: Ipv6Addr = inside
            .parse()
            .map_err(|_| format!("{inside:?} is not an IPv6 address"))?;
        let Some(port) = after.strip_prefix(':') else {
            return Err(if after.is_empty() {
                "missing port: write [IPv6]:PORT, like [::1]:6379".into()
            } else {
                format!("unexpected {after:?} after ']'; write [IPv6]:PORT, like [::1]:6379")
            });
        };
        let port = parse_port(port)?;
        return Ok(HostPort::Ip(SocketAddr::new(IpAddr::V6(ip), port)));
    }
    if looks_like_bare_ipv6(text) {
        return Err("an IPv6 address needs brackets, like [::1]:6379".into());
    }
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err("missing port: write HOST:PORT, like redis.internal:6379".into());
    };
    if host.is_empty() {
        return Err("missing host before the port: write HOST:PORT".into());
    }
    if host.contains(':') {
        return Err("too many ':'; write HOST:PORT, or [IPv6]:PORT".into());
    }
    let port = parse_port(port)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(HostPort::Ip(SocketAddr::new(ip, port)));
    }
    validate_host_name(host)?;
    Ok(HostPort::Name {
        host: host.to_string(),
        port,
    })
}

/// `::1`, `fe80::1:6379` or `2001:db8::1:6379`: an IPv6 address, maybe with a
/// port glued on, that would otherwise be split at the wrong colon.
fn looks_like_bare_ipv6(text: &str) -> bool {
    if text.parse::<Ipv6Addr>().is_ok() {
        return true;
    }
    match text.rsplit_once(':') {
        Some((host, _)) => host.contains(':') && host.parse::<Ipv6Addr>().is_ok(),
        None => false,
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    if text.is_empty() {
        return Err("missing port after ':'".into());
    }
    if !text.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("invalid port {text:?}: expected a number 1-65535"));
    }
    match text.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("port {text} is out of range 1-65535")),
        Ok(port) => Ok(port),
    }
}

/// A name to resolve (A/AAAA): a DNS name whose last label is not all digits,
/// because `10.0.0.256` or `10.0.1` is a mistyped address, not a host.
fn validate_host_name(host: &str) -> Result<(), String> {
    validate_dns_name(host)?;
    let last = host.trim_end_matches('.').rsplit('.').next().unwrap_or("");
    if !last.is_empty() && last.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("{host:?} is not a valid IPv4 address or host name"));
    }
    Ok(())
}

/// A DNS name as legate accepts it: labels of 1–63 characters from `[A-Za-z0-9-_]`
/// (the underscore for SRV names like `_redis._tcp`), not starting or ending with
/// `-`, at most 253 characters in all; one trailing dot (a fully qualified name)
/// is allowed.
pub(crate) fn validate_dns_name(name: &str) -> Result<(), String> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() {
        return Err("the name is empty".into());
    }
    if bare.len() > 253 {
        return Err(format!(
            "the name is {} characters long; a DNS name has at most 253",
            bare.len()
        ));
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err(format!(
                "{name:?} has an empty label (two dots in a row, or a leading dot)"
            ));
        }
        if label.len() > 63 {
            return Err(format!(
                "the label {label:?} is {} characters long; a DNS label has at most 63",
                label.len()
            ));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "{name:?} contains {bad:?}; a host name has only letters, digits, '-', '_' and '.'"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "the label {label:?} must not start or end with '-'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Target {
        match text.parse::<Target>() {
            Ok(target) => target,
            Err(err) => panic!("{text:?} should parse, got {err}"),
        }
    }

    fn err(text: &str) -> String {
        match text.parse::<Target>() {
            Ok(target) => panic!("{text:?} should fail, got {target:?}"),
            Err(err) => err.0,
        }
    }

    fn dns(host: &str, port: u16) -> Target {
        Target::Dns {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn static_ipv4() {
        assert_eq!(
            ok("10.0.0.5:6379"),
            Target::Static("10.0.0.5:6379".parse().unwrap())
        );
        assert_eq!(
            ok("127.0.0.1:1"),
            Target::Static("127.0.0.1:1".parse().unwrap())
        );
        assert_eq!(
            ok("127.0.0.1:65535"),
            Target::Static("127.0.0.1:65535".parse().unwrap())
        );
    }

    #[test]
    fn static_ipv6_in_brackets() {
        assert_eq!(
            ok("[::1]:6379"),
            Target::Static("[::1]:6379".parse().unwrap())
        );
        assert_eq!(
            ok("[2001:db8::5]:3306"),
            Target::Static("[2001:db8::5]:3306".parse().unwrap())
        );
    }

    #[test]
    fn plain_host_port_is_dns() {
        assert_eq!(
            ok("redis.db.svc.cluster.local:6379"),
            dns("redis.db.svc.cluster.local", 6379)
        );
        assert_eq!(ok("localhost:6379"), dns("localhost", 6379));
        assert_eq!(ok("redis:6379"), dns("redis", 6379));
        assert_eq!(ok("my_host-1.example:80"), dns("my_host-1.example", 80));
        assert_eq!(ok("fqdn.example.:80"), dns("fqdn.example.", 80));
        assert_eq!(ok("3com.example:80"), dns("3com.example", 80));
    }

    #[test]
    fn dns_prefix() {
        assert_eq!(ok("dns:redis.internal:6379"), dns("redis.internal", 6379));
        assert_eq!(ok("dns:localhost:1"), dns("localhost", 1));
    }

    #[test]
    fn dns_prefix_with_ip_literal_is_static() {
        assert_eq!(
            ok("dns:10.0.0.5:6379"),
            Target::Static("10.0.0.5:6379".parse().unwrap())
        );
        assert_eq!(
            ok("dns:[::1]:6379"),
            Target::Static("[::1]:6379".parse().unwrap())
        );
    }

    #[test]
    fn srv() {
        assert_eq!(
            ok("srv:_redis._tcp.redis.db.svc.cluster.local"),
            Target::Srv("_redis._tcp.redis.db.svc.cluster.local".into())
        );
        assert_eq!(
            ok("srv:_mysql._tcp.example."),
            Target::Srv("_mysql._tcp.example.".into())
        );
    }

    #[test]
    fn file() {
        assert_eq!(
            ok("file:/etc/legate/redis.endpoints"),
            Target::File("/etc/legate/redis.endpoints".into())
        );
        assert_eq!(
            ok("file:relative.endpoints"),
            Target::File("relative.endpoints".into())
        );
        assert_eq!(
            ok("file:/dir with space/x"),
            Target::File("/dir with space/x".into())
        );
    }

    #[test]
    fn rejects_empty() {
        assert!(err("").contains("it is empty"));
        assert!(err("file:").contains("file: needs a path"));
        assert!(err("srv:").contains("srv: needs a name"));
        assert!(err("dns:").contains("expected HOST:PORT"));
    }

    #[test]
    fn rejects_surrounding_spaces() {
        assert!(err(" redis:6379").contains("remove the spaces"));
        assert!(err("redis:6379\n").contains("remove the spaces"));
    }

    #[test]
    fn rejects_nul_in_path() {
        assert!(err("file:/etc/x\0y").contains("NUL"));
    }

    #[test]
    fn rejects_bad_ports() {
        assert!(err("redis:0").contains("port 0 is out of range 1-65535"));
        assert!(err("redis:70000").contains("port 70000 is out of range 1-65535"));
        assert!(err("10.0.0.1:65536").contains("out of range"));
        assert!(err("10.0.0.1:99999999999999999999").contains("out of range"));
        assert!(err("redis:").contains("missing port"));
        assert!(err("redis:http").contains("invalid port \"http\""));
        assert!(err("redis:-1").contains("invalid port"));
        assert!(err("redis:+1").contains("invalid port"));
        assert!(err("[::1]:0").contains("out of range"));
    }

    #[test]
    fn rejects_missing_port() {
        assert!(err("redis.internal").contains("missing port"));
        assert!(err("10.0.0.1").contains("missing port"));
        assert!(err("[::1]").contains("missing port"));
        assert!(err("dns:redis").contains("missing port"));
    }

    #[test]
    fn rejects_ipv6_without_brackets() {
        let wanted = "an IPv6 address needs brackets, like [::1]:6379";
        for text in [
            "::1:6379",
            "::1",
            "2001:db8::1:6379",
            "fe80::1",
            "dns:::1:6379",
            "abcd::1:80",
        ] {
            assert!(err(text).contains(wanted), "{text:?}: {}", err(text));
        }
    }

    #[test]
    fn rejects_bad_brackets() {
        assert!(err("[::1:6379").contains("missing ']'"));
        assert!(err("[not-v6]:6379").contains("is not an IPv6 address"));
        assert!(err("[10.0.0.1]:6379").contains("is not an IPv6 address"));
        assert!(err("[::1]6379").contains("unexpected"));
        assert!(err("[::1]:").contains("missing port"));
    }

    #[test]
    fn rejects_missing_host() {
        assert!(err(":6379").contains("missing host"));
    }

    #[test]
    fn rejects_bad_host_names() {
        assert!(err("-redis:6379").contains("must not start or end with '-'"));
        assert!(err("redis-.example:6379").contains("must not start or end with '-'"));
        assert!(err("re dis:6379").contains("contains ' '"));
        assert!(err("redis!:6379").contains("contains '!'"));
        assert!(err("a..b:6379").contains("empty label"));
        assert!(err(".a:6379").contains("empty label"));
        assert!(err("a.b..:6379").contains("empty label"));
        assert!(err("ünicode.example:1").contains("contains 'ü'"));
        let long_label = format!("{}.example:1", "a".repeat(64));
        assert!(err(&long_label).contains("at most 63"));
        let long_name = format!("{}:1", vec!["a".repeat(63); 4].join("."));
        assert!(err(&long_name).contains("at most 253"));
    }

    #[test]
    fn accepts_names_at_the_limits() {
        let label = "a".repeat(63);
        assert_eq!(ok(&format!("{label}:1")), dns(&label, 1));
        // Four 61-character labels, four dots and a 5-character label: 253 characters.
        let name = format!("{}.{}", vec!["b".repeat(61); 4].join("."), "ccccc");
        assert_eq!(name.len(), 253);
        assert_eq!(ok(&format!("{name}:1")), dns(&name, 1));
    }

    #[test]
    fn rejects_mistyped_ipv4() {
        assert!(err("10.0.0.256:6379").contains("not a valid IPv4 address"));
        assert!(err("10.0.1:6379").contains("not a valid IPv4 address"));
        assert!(err("010.0.0.1:6379").contains("not a valid IPv4 address"));
    }

    #[test]
    fn rejects_bad_srv_names() {
        assert!(err("srv:_redis._tcp.example:6379").contains("without :PORT"));
        assert!(err("srv:bad name").contains("contains ' '"));
        assert!(err("srv:a..b").contains("empty label"));
        assert!(err("srv:.").contains("empty"));
    }

    #[test]
    fn rejects_unknown_kinds_and_schemes() {
        assert!(err("tcp:redis:6379").contains("unknown kind \"tcp:\""));
        assert!(err("DNS:redis:6379").contains("unknown kind \"DNS:\""));
        assert!(err("redis://redis:6379").contains("no redis://"));
        assert!(err("a:b:c").contains("unknown kind"));
        assert!(err("1:2:3").contains("too many ':'"));
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "10.0.0.5:6379",
            "[::1]:6379",
            "[2001:db8::5]:1",
            "redis:6379",
            "dns:redis.db.svc.cluster.local:6379",
            "dns:10.0.0.5:6379",
            "srv:_redis._tcp.redis.example",
            "file:/etc/legate/redis.endpoints",
            "file:a b",
        ] {
            let target = ok(text);
            let shown = target.to_string();
            assert_eq!(ok(&shown), target, "{text:?} shown as {shown:?}");
        }
    }

    #[test]
    fn display_forms() {
        assert_eq!(ok("redis:6379").to_string(), "dns:redis:6379");
        assert_eq!(ok("dns:[::1]:1").to_string(), "[::1]:1");
        assert_eq!(ok("srv:_a._tcp.b").to_string(), "srv:_a._tcp.b");
        assert_eq!(ok("file:/x").to_string(), "file:/x");
    }

    #[test]
    fn errors_quote_the_input() {
        assert!(err("redis:0").starts_with("invalid target \"redis:0\": "));
    }

    #[test]
    fn host_port_helper() {
        assert_eq!(
            parse_host_port("10.0.0.1:1"),
            Ok(HostPort::Ip("10.0.0.1:1".parse().unwrap()))
        );
        assert_eq!(
            parse_host_port("redis:1"),
            Ok(HostPort::Name {
                host: "redis".into(),
                port: 1
            })
        );
        assert!(parse_host_port("").is_err());
        assert!(parse_host_port("dns:redis:1").is_err());
    }
}
