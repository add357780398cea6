//! The TOML file as written (serde, with spans), and its validation into runtime types.
//!
//! Two stages, kept apart so nothing downstream sees an unchecked value:
//! 1. serde reads the text into the `Raw*` structs below, which mirror the file
//!    key for key (`deny_unknown_fields` everywhere). Values with their own
//!    grammar (durations, addresses, targets, enums) fail inside the
//!    deserializer, so the TOML parser attaches the value's span for free.
//! 2. [`validate`] applies the rules that span several values (positive
//!    durations, min_ttl ≤ max_ttl, duplicate listeners, ...) using the spans
//!    kept by `Spanned`, and fills in the defaults from `super`.
//!
//! Every error becomes `ConfigError::At` with a 1-based line and column, which is
//! what `legate check` prints as `FILE:LINE:COL: message`.
use super::duration::{parse_duration, show};
use super::target::{parse_host_port, validate_dns_name, HostPort, Target};
use super::{
    AdminConfig, Balance, CheckKind, Config, ConfigError, DnsConfig, Handoff, HealthConfig,
    ListenerConfig, RuntimeConfig, Secret, TlsClientConfig, TlsServerConfig, TlsVersion,
};
use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};
use serde::Deserialize;
use serde_spanned::Spanned;
use std::marker::PhantomData;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub(super) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let source = Source { text, path };
    let raw: RawFile = toml::from_str(text).map_err(|err| {
        let span = err.span().unwrap_or(0..0);
        source.error(span, err.message().trim_end())
    })?;
    validate(raw, &source)
}

/// The text being parsed, to turn byte spans into `FILE:LINE:COL` errors.
struct Source<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Source<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, col) = self.line_col(span.start);
        ConfigError::At {
            path: self.path.to_path_buf(),
            line,
            col,
            message: message.into(),
        }
    }

    /// 1-based line, and 1-based column counted in characters as an editor shows them.
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
        let line = before.matches('\n').count() + 1;
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.line_col(span.start).0
    }
}

// ---------------------------------------------------------------------------
// The file as written.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    admin: Option<RawAdmin>,
    runtime: Option<RawRuntime>,
    dns: Option<RawDns>,
    listeners: Option<Spanned<Listeners>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<Text<ListenAddr>>>,
    ready_file: Option<Text<FilePath>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    shutdown_delay: Option<Text<Duration>>,
    drain_timeout: Option<Spanned<Text<Duration>>>,
    handoff_socket: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    servers: Option<Vec<Text<DnsServer>>>,
    min_ttl: Option<Spanned<Text<Duration>>>,
    max_ttl: Option<Spanned<Text<Duration>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    listen: Spanned<Text<ListenAddr>>,
    upstream: Option<Spanned<Upstream>>,
    balance: Option<Text<Balance>>,
    connect_timeout: Option<Spanned<Text<Duration>>>,
    connect_attempts: Option<Spanned<u32>>,
    idle_timeout: Option<Spanned<Text<Duration>>>,
    tcp_user_timeout: Option<Spanned<Text<Duration>>>,
    socket_buffer: Option<Spanned<u64>>,
    max_connections: Option<Spanned<usize>>,
    required: Option<bool>,
    health: Option<RawHealth>,
    tls: Option<RawTlsClient>,
    tls_server: Option<RawTlsServer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    check: Option<Text<CheckKind>>,
    interval: Option<Spanned<Text<Duration>>>,
    timeout: Option<Spanned<Text<Duration>>>,
    healthy_after: Option<Spanned<u32>>,
    unhealthy_after: Option<Spanned<u32>>,
    close_on_unhealthy: Option<bool>,
    password: Option<Spanned<String>>,
    password_file: Option<Spanned<Text<FilePath>>>,
    user: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTlsClient {
    sni: Option<Spanned<String>>,
    ca: Option<Text<FilePath>>,
    cert: Option<Spanned<Text<FilePath>>>,
    key: Option<Spanned<Text<FilePath>>>,
    alpn: Option<Vec<Spanned<String>>>,
    min_version: Option<Text<TlsVersion>>,
    insecure_skip_verify: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTlsServer {
    cert: Text<FilePath>,
    key: Text<FilePath>,
    client_ca: Option<Text<FilePath>>,
    min_version: Option<Text<TlsVersion>>,
}

// ---------------------------------------------------------------------------
// Values with a grammar of their own: they fail while deserializing, so the
// TOML parser puts the value's own line and column on the error.

/// A value written as a string (or, for TLS versions, a bare number) and parsed by `T`.
struct Text<T>(T);

trait FromText: Sized {
    /// Completes "expected ..." in serde's wrong-type errors.
    const EXPECTING: &'static str;
    fn from_text(text: &str) -> Result<Self, String>;
    /// `min_version = 1.2` written without quotes; other values refuse numbers.
    fn from_float(_value: f64) -> Option<Result<Self, String>> {
        None
    }
}

impl<'de, T: FromText> Deserialize<'de> for Text<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor<T>(PhantomData<T>);

        impl<T: FromText> Visitor<'_> for TextVisitor<T> {
            type Value = Text<T>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(T::EXPECTING)
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
                T::from_text(text).map(Text).map_err(E::custom)
            }

            fn visit_f64<E: de::Error>(self, value: f64) -> Result<Self::Value, E> {
                match T::from_float(value) {
                    Some(result) => result.map(Text).map_err(E::custom),
                    None => Err(E::invalid_type(Unexpected::Float(value), &self)),
                }
            }
        }

        deserializer.deserialize_any(TextVisitor(PhantomData))
    }
}

impl FromText for Duration {
    const EXPECTING: &'static str = "a duration string like \"250ms\", \"2s\" or \"5m\"";
    fn from_text(text: &str) -> Result<Self, String> {
        parse_duration(text)
    }
}

impl FromText for Target {
    const EXPECTING: &'static str = "a target string like \"redis.internal:6379\"";
    fn from_text(text: &str) -> Result<Self, String> {
        text.parse()
            .map_err(|err: super::target::TargetError| err.0)
    }
}

impl FromText for Balance {
    const EXPECTING: &'static str = "one of \"round-robin\", \"least-conn\", \"random\", \"first\"";
    fn from_text(text: &str) -> Result<Self, String> {
        [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::Random,
            Balance::First,
        ]
        .into_iter()
        .find(|balance| balance.as_str() == text)
        .ok_or_else(|| {
            format!("unknown balance {text:?}: expected round-robin, least-conn, random or first")
        })
    }
}

impl FromText for CheckKind {
    const EXPECTING: &'static str =
        "one of \"none\", \"tcp\", \"redis\", \"redis-primary\", \"mysql\"";
    fn from_text(text: &str) -> Result<Self, String> {
        [
            CheckKind::None,
            CheckKind::Tcp,
            CheckKind::Redis,
            CheckKind::RedisPrimary,
            CheckKind::Mysql,
        ]
        .into_iter()
        .find(|check| check.as_str() == text)
        .ok_or_else(|| {
            format!("unknown check {text:?}: expected none, tcp, redis, redis-primary or mysql")
        })
    }
}

impl FromText for TlsVersion {
    const EXPECTING: &'static str = "\"1.2\" or \"1.3\"";
    fn from_text(text: &str) -> Result<Self, String> {
        match text {
            "1.2" => Ok(TlsVersion::Tls12),
            "1.3" => Ok(TlsVersion::Tls13),
            _ => Err(format!(
                "unknown TLS version {text:?}: expected \"1.2\" or \"1.3\""
            )),
        }
    }
    fn from_float(value: f64) -> Option<Result<Self, String>> {
        Some(if value == 1.2 {
            Ok(TlsVersion::Tls12)
        } else if value == 1.3 {
            Ok(TlsVersion::Tls13)
        } else {
            Err(format!(
                "unknown TLS version {value}: expected \"1.2\" or \"1.3\""
            ))
        })
    }
}

/// An address legate binds: an IP and a port, never a name (port 0 picks a free port).
struct ListenAddr(SocketAddr);

impl FromText for ListenAddr {
    const EXPECTING: &'static str = "an address string like \"127.0.0.1:6379\"";
    fn from_text(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(ListenAddr(addr));
        }
        Err(match parse_host_port(text) {
            Ok(HostPort::Name { .. }) => format!(
                "invalid listen address {text:?}: it must be an IP address and port, \
                 like 127.0.0.1:6379 or [::1]:6379, not a host name"
            ),
            Ok(HostPort::Ip(_)) => {
                format!("invalid listen address {text:?}: expected IP:PORT, like 127.0.0.1:6379")
            }
            Err(why) => format!("invalid listen address {text:?}: {why}"),
        })
    }
}

/// A DNS server: an IP address with an optional port (53 when left out).
struct DnsServer(SocketAddr);

impl FromText for DnsServer {
    const EXPECTING: &'static str = "an address string like \"10.0.0.10\" or \"10.0.0.10:53\"";
    fn from_text(text: &str) -> Result<Self, String> {
        let bare = text
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .unwrap_or(text);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(DnsServer(SocketAddr::new(ip, 53)));
        }
        let not_an_ip = || {
            format!(
                "invalid DNS server {text:?}: it must be an IP address, like 10.0.0.10 or 10.0.0.10:53"
            )
        };
        // Without a colon it was meant as a bare address, and it is not one.
        if !text.is_empty() && !text.contains(':') {
            return Err(not_an_ip());
        }
        match parse_host_port(text) {
            Ok(HostPort::Ip(addr)) => Ok(DnsServer(addr)),
            Ok(HostPort::Name { .. }) => Err(not_an_ip()),
            Err(why) => Err(format!("invalid DNS server {text:?}: {why}")),
        }
    }
}

/// A file name: not empty, no NUL (which no file system accepts).
struct FilePath(PathBuf);

impl FromText for FilePath {
    const EXPECTING: &'static str = "a file path string";
    fn from_text(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("the path is empty".into());
        }
        if text.contains('\0') {
            return Err(format!("the path {text:?} contains a NUL byte"));
        }
        Ok(FilePath(PathBuf::from(text)))
    }
}

/// `upstream = ["a:1", "b:2"]`, or a single `upstream = "a:1"`.
enum Upstream {
    One(Target),
    Many(Vec<Spanned<Text<Target>>>),
}

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UpstreamVisitor;

        impl<'de> Visitor<'de> for UpstreamVisitor {
            type Value = Upstream;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a target string or an array of target strings")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<Upstream, E> {
                Target::from_text(text)
                    .map(Upstream::One)
                    .map_err(E::custom)
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Upstream, A::Error> {
                let mut targets = Vec::new();
                while let Some(target) = seq.next_element()? {
                    targets.push(target);
                }
                Ok(Upstream::Many(targets))
            }
        }

        deserializer.deserialize_any(UpstreamVisitor)
    }
}

/// `[[listeners]]`; a single `[listeners]` table gets a hint instead of "expected a sequence".
struct Listeners(Vec<Spanned<RawListener>>);

impl<'de> Deserialize<'de> for Listeners {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListenersVisitor;

        impl<'de> Visitor<'de> for ListenersVisitor {
            type Value = Listeners;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of listener tables ([[listeners]])")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Listeners, A::Error> {
                let mut listeners = Vec::new();
                while let Some(listener) = seq.next_element()? {
                    listeners.push(listener);
                }
                Ok(Listeners(listeners))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, _map: A) -> Result<Listeners, A::Error> {
                Err(de::Error::custom(
                    "listeners is a list of tables: write [[listeners]], with double brackets",
                ))
            }
        }

        deserializer.deserialize_any(ListenersVisitor)
    }
}

// ---------------------------------------------------------------------------
// Validation into the runtime types.

fn validate(raw: RawFile, source: &Source<'_>) -> Result<Config, ConfigError> {
    let (admin, admin_listen_span) = validate_admin(raw.admin);
    let runtime = validate_runtime(raw.runtime, source)?;
    let dns = validate_dns(raw.dns, source)?;

    let Some(listeners) = raw.listeners else {
        return Err(source.error(
            0..0,
            "no listeners: add a [[listeners]] table with name, listen and upstream",
        ));
    };
    let listeners_span = listeners.span();
    let raw_listeners = listeners.into_inner().0;
    if raw_listeners.is_empty() {
        return Err(source.error(
            listeners_span,
            "no listeners: add a [[listeners]] table with name, listen and upstream",
        ));
    }

    let mut claimed = Claimed {
        admin: admin.listen,
        admin_span: admin_listen_span,
        listeners: Vec::new(),
    };
    let mut validated = Vec::with_capacity(raw_listeners.len());
    for raw_listener in raw_listeners {
        let listener_span = raw_listener.span();
        let raw_listener = raw_listener.into_inner();
        let name_span = raw_listener.name.span();
        let listen_span = raw_listener.listen.span();
        let listener = validate_listener(raw_listener, listener_span, source)?;
        claimed.claim(&listener, name_span, listen_span, source)?;
        validated.push(listener);
    }

    Ok(Config {
        admin,
        runtime,
        dns,
        listeners: validated,
    })
}

/// The names and listen addresses taken so far (the admin server's too), with the spans
/// a duplicate's error points back at.
struct Claimed {
    admin: SocketAddr,
    /// `None` when `admin.listen` was not written (the default address).
    admin_span: Option<Range<usize>>,
    /// Name, its span, listen address, its span.
    listeners: Vec<(String, Range<usize>, SocketAddr, Range<usize>)>,
}

impl Claimed {
    /// Take `listener`'s name and listen address, or say which earlier one has it.
    fn claim(
        &mut self,
        listener: &ListenerConfig,
        name_span: Range<usize>,
        listen_span: Range<usize>,
        source: &Source<'_>,
    ) -> Result<(), ConfigError> {
        for (other_name, other_name_span, other_listen, other_listen_span) in &self.listeners {
            if *other_name == listener.name {
                return Err(source.error(
                    name_span,
                    format!(
                        "listener name {:?} is already used by the listener on line {}",
                        listener.name,
                        source.line(other_name_span)
                    ),
                ));
            }
            if let Some(how) = listen_conflict(*other_listen, listener.listen) {
                return Err(source.error(
                    listen_span,
                    format!(
                        "listen address {} {how} listener {other_name:?} (line {})",
                        listener.listen,
                        source.line(other_listen_span)
                    ),
                ));
            }
        }
        if let Some(how) = listen_conflict(self.admin, listener.listen) {
            return Err(source.error(
                listen_span.clone(),
                match &self.admin_span {
                    Some(span) => format!(
                        "listen address {} {how} admin.listen (line {})",
                        listener.listen,
                        source.line(span)
                    ),
                    None => format!(
                        "listen address {} {how} the admin server, which listens there by default; \
                         move one of them ([admin] listen = ...)",
                        listener.listen
                    ),
                },
            ));
        }
        self.listeners.push((
            listener.name.clone(),
            name_span,
            listener.listen,
            listen_span,
        ));
        Ok(())
    }
}

/// Whether two listen addresses would collide when bound, and how to say so
/// ("is already used by", "overlaps 0.0.0.0:6379 of"). Port 0 asks the kernel
/// for a free port, so it never collides.
fn listen_conflict(first: SocketAddr, second: SocketAddr) -> Option<String> {
    if first.port() == 0 || first.port() != second.port() {
        return None;
    }
    if first == second {
        return Some("is already used by".into());
    }
    // Binding 0.0.0.0:P fails while 127.0.0.1:P is bound, and the other way round.
    let same_family = first.is_ipv4() == second.is_ipv4();
    if same_family && (first.ip().is_unspecified() || second.ip().is_unspecified()) {
        return Some(format!("overlaps {first} of"));
    }
    None
}

/// The admin settings, and the span of `admin.listen` when it was written.
fn validate_admin(raw: Option<RawAdmin>) -> (AdminConfig, Option<Range<usize>>) {
    let mut admin = AdminConfig::default();
    let mut listen_span = None;
    if let Some(raw) = raw {
        if let Some(listen) = raw.listen {
            listen_span = Some(listen.span());
            admin.listen = listen.into_inner().0 .0;
        }
        admin.ready_file = raw.ready_file.map(|path| path.0 .0);
    }
    (admin, listen_span)
}

fn validate_runtime(
    raw: Option<RawRuntime>,
    source: &Source<'_>,
) -> Result<RuntimeConfig, ConfigError> {
    let mut runtime = RuntimeConfig::default();
    let Some(raw) = raw else {
        return Ok(runtime);
    };
    if let Some(delay) = raw.shutdown_delay {
        runtime.shutdown_delay = delay.0;
    }
    if let Some(timeout) = raw.drain_timeout {
        runtime.drain_timeout = positive(timeout, "drain_timeout", source)?;
    }
    if let Some(handoff) = raw.handoff_socket {
        let span = handoff.span();
        runtime.handoff_socket =
            Handoff::parse(handoff.get_ref()).map_err(|message| source.error(span, message))?;
    }
    Ok(runtime)
}

fn validate_dns(raw: Option<RawDns>, source: &Source<'_>) -> Result<DnsConfig, ConfigError> {
    let mut dns = DnsConfig::default();
    let Some(raw) = raw else {
        return Ok(dns);
    };
    if let Some(servers) = raw.servers {
        dns.servers = servers.into_iter().map(|server| server.0 .0).collect();
    }
    let min_span = raw.min_ttl.as_ref().map(Spanned::span);
    if let Some(min_ttl) = raw.min_ttl {
        dns.min_ttl = min_ttl.into_inner().0;
    }
    let max_span = raw.max_ttl.as_ref().map(Spanned::span);
    if let Some(max_ttl) = raw.max_ttl {
        dns.max_ttl = positive(max_ttl, "max_ttl", source)?;
    }
    if dns.min_ttl > dns.max_ttl {
        // Point at whichever the user wrote; at least one of them was.
        let span = max_span.or(min_span).unwrap_or(0..0);
        return Err(source.error(
            span,
            format!(
                "min_ttl ({}) is greater than max_ttl ({})",
                show(dns.min_ttl),
                show(dns.max_ttl)
            ),
        ));
    }
    Ok(dns)
}

fn validate_listener(
    raw: RawListener,
    listener_span: Range<usize>,
    source: &Source<'_>,
) -> Result<ListenerConfig, ConfigError> {
    let name_span = raw.name.span();
    let name = raw.name.into_inner();
    validate_name(&name).map_err(|why| source.error(name_span.clone(), why))?;
    let listen = raw.listen.into_inner().0 .0;

    let upstream = validate_upstream(raw.upstream, &name, listener_span, source)?;
    let mut listener = ListenerConfig::with_defaults(name, listen, upstream);
    if let Some(balance) = raw.balance {
        listener.balance = balance.0;
    }
    if let Some(timeout) = raw.connect_timeout {
        listener.connect_timeout = positive(timeout, "connect_timeout", source)?;
    }
    if let Some(attempts) = raw.connect_attempts {
        listener.connect_attempts = at_least_one(attempts, "connect_attempts", source)?;
    }
    if let Some(timeout) = raw.idle_timeout {
        if timeout.get_ref().0.is_zero() {
            return Err(source.error(
                timeout.span(),
                "idle_timeout must be positive; leave it out for no idle timeout",
            ));
        }
        listener.idle_timeout = Some(timeout.into_inner().0);
    }
    if let Some(timeout) = raw.tcp_user_timeout {
        listener.tcp_user_timeout = validate_tcp_user_timeout(timeout, source)?;
    }
    if let Some(size) = raw.socket_buffer {
        listener.socket_buffer = validate_socket_buffer(size, source)?;
    }
    if let Some(max) = raw.max_connections {
        listener.max_connections = at_least_one(max, "max_connections", source)?;
    }
    if let Some(required) = raw.required {
        listener.required = required;
    }
    if let Some(health) = raw.health {
        listener.health = validate_health(health, source)?;
    }
    listener.tls = raw
        .tls
        .map(|tls| validate_tls_client(tls, source))
        .transpose()?;
    listener.tls_server = raw.tls_server.map(|tls| TlsServerConfig {
        cert: tls.cert.0 .0,
        key: tls.key.0 .0,
        client_ca: tls.client_ca.map(|path| path.0 .0),
        min_version: tls
            .min_version
            .map_or(TlsVersion::Tls12, |version| version.0),
    });
    Ok(listener)
}

/// A listener's targets: at least one, none twice.
fn validate_upstream(
    raw: Option<Spanned<Upstream>>,
    name: &str,
    listener_span: Range<usize>,
    source: &Source<'_>,
) -> Result<Vec<Target>, ConfigError> {
    let Some(upstream) = raw else {
        return Err(source.error(
            listener_span,
            format!("listener {name:?} has no upstream: add upstream = [\"HOST:PORT\"]"),
        ));
    };
    let span = upstream.span();
    match upstream.into_inner() {
        Upstream::One(target) => Ok(vec![target]),
        Upstream::Many(targets) => unique_targets(targets, name, span, source),
    }
}

fn validate_tcp_user_timeout(
    raw: Spanned<Text<Duration>>,
    source: &Source<'_>,
) -> Result<Duration, ConfigError> {
    let span = raw.span();
    let timeout = positive(raw, "tcp_user_timeout", source)?;
    // The kernel takes milliseconds in a 32-bit int.
    if timeout > MAX_TCP_USER_TIMEOUT {
        return Err(source.error(span, "tcp_user_timeout must be at most 24h"));
    }
    Ok(timeout)
}

fn validate_socket_buffer(
    raw: Spanned<u64>,
    source: &Source<'_>,
) -> Result<Option<u32>, ConfigError> {
    let span = raw.span();
    let size = raw.into_inner();
    if !(MIN_SOCKET_BUFFER..=MAX_SOCKET_BUFFER).contains(&size) {
        return Err(source.error(
            span,
            format!(
                "socket_buffer is {size} bytes; it must be from {MIN_SOCKET_BUFFER} (4 KiB) \
                 to {MAX_SOCKET_BUFFER} (64 MiB); leave it out for the kernel's autotuning"
            ),
        ));
    }
    Ok(u32::try_from(size).ok())
}

/// Listener names become metric labels and log fields, so keep them plain.
fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the listener name is empty".into());
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "listener name {name:?} contains {bad:?}; use only letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

fn unique_targets(
    targets: Vec<Spanned<Text<Target>>>,
    name: &str,
    span: Range<usize>,
    source: &Source<'_>,
) -> Result<Vec<Target>, ConfigError> {
    if targets.is_empty() {
        return Err(source.error(
            span,
            format!("listener {name:?} has no upstream: add at least one target to the list"),
        ));
    }
    let mut unique: Vec<Target> = Vec::with_capacity(targets.len());
    for target in targets {
        let span = target.span();
        let target = target.into_inner().0;
        if unique.contains(&target) {
            return Err(source.error(
                span,
                format!("upstream {target} is listed twice in listener {name:?}"),
            ));
        }
        unique.push(target);
    }
    Ok(unique)
}

const MIN_SOCKET_BUFFER: u64 = 4096;
const MAX_SOCKET_BUFFER: u64 = 64 << 20;
const MAX_TCP_USER_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn validate_health(raw: RawHealth, source: &Source<'_>) -> Result<HealthConfig, ConfigError> {
    let mut health = HealthConfig::default();
    if let Some(check) = raw.check {
        health.check = check.0;
    }
    if let Some(interval) = raw.interval {
        health.interval = positive(interval, "interval", source)?;
    }
    if let Some(timeout) = raw.timeout {
        health.timeout = positive(timeout, "timeout", source)?;
    }
    if let Some(count) = raw.healthy_after {
        health.healthy_after = at_least_one(count, "healthy_after", source)?;
    }
    if let Some(count) = raw.unhealthy_after {
        health.unhealthy_after = at_least_one(count, "unhealthy_after", source)?;
    }
    if let Some(close) = raw.close_on_unhealthy {
        health.close_on_unhealthy = close;
    }
    let uses_password = matches!(health.check, CheckKind::Redis | CheckKind::RedisPrimary);
    match (raw.password, raw.password_file) {
        (Some(_), Some(file)) => {
            return Err(source.error(file.span(), "give password or password_file, not both"))
        }
        (Some(password), None) => {
            let span = password.span();
            if !uses_password {
                return Err(source.error(span, password_unused(health.check)));
            }
            let password = password.into_inner();
            if password.is_empty() {
                return Err(source.error(span, "the password is empty; leave it out for no AUTH"));
            }
            health.password = Some(Secret::Inline(password));
        }
        (None, Some(file)) => {
            if !uses_password {
                return Err(source.error(file.span(), password_unused(health.check)));
            }
            health.password = Some(Secret::File(file.into_inner().0 .0));
        }
        (None, None) => {}
    }
    if let Some(user) = raw.user {
        let span = user.span();
        if health.check != CheckKind::Mysql {
            return Err(source.error(
                span,
                format!(
                    "user is only used by the mysql check, not by check = {:?}",
                    health.check.as_str()
                ),
            ));
        }
        let user = user.into_inner();
        health.user = Some(
            validate_mysql_user(&user)
                .map(|()| user)
                .map_err(|why| source.error(span, why))?,
        );
    }
    Ok(health)
}

/// MySQL allows 32 characters in a user name, MariaDB 80 (in UTF-8, up to 4 bytes each).
fn validate_mysql_user(user: &str) -> Result<(), String> {
    if user.is_empty() {
        return Err("the user is empty; leave it out to only read the greeting".into());
    }
    if user.chars().count() > 80 {
        return Err(format!(
            "the user is {} characters long; MySQL and MariaDB allow at most 80",
            user.chars().count()
        ));
    }
    if user.chars().any(char::is_control) {
        return Err("the user contains a control character".into());
    }
    Ok(())
}

fn password_unused(check: CheckKind) -> String {
    format!(
        "a password is only used by the redis and redis-primary checks, not by check = {:?}",
        check.as_str()
    )
}

fn validate_tls_client(
    raw: RawTlsClient,
    source: &Source<'_>,
) -> Result<TlsClientConfig, ConfigError> {
    let sni = match raw.sni {
        None => None,
        Some(sni) => {
            let span = sni.span();
            let sni = sni.into_inner();
            if sni.parse::<IpAddr>().is_err() {
                validate_dns_name(&sni)
                    .map_err(|why| source.error(span, format!("invalid sni {sni:?}: {why}")))?;
            }
            Some(sni)
        }
    };
    let (cert, key) = match (raw.cert, raw.key) {
        (Some(cert), None) => {
            return Err(source.error(
                cert.span(),
                "cert needs key: give both for a client certificate, or neither",
            ))
        }
        (None, Some(key)) => {
            return Err(source.error(
                key.span(),
                "key needs cert: give both for a client certificate, or neither",
            ))
        }
        (cert, key) => (
            cert.map(|cert| cert.into_inner().0 .0),
            key.map(|key| key.into_inner().0 .0),
        ),
    };
    let mut alpn = Vec::new();
    for protocol in raw.alpn.unwrap_or_default() {
        let span = protocol.span();
        let protocol = protocol.into_inner();
        // ALPN protocol names are 1 to 255 bytes on the wire (RFC 7301).
        if protocol.is_empty() || protocol.len() > 255 {
            return Err(source.error(
                span,
                format!("ALPN protocol {protocol:?} must be 1 to 255 bytes long"),
            ));
        }
        alpn.push(protocol);
    }
    Ok(TlsClientConfig {
        sni,
        ca: raw.ca.map(|path| path.0 .0),
        cert,
        key,
        alpn,
        min_version: raw
            .min_version
            .map_or(TlsVersion::Tls12, |version| version.0),
        insecure_skip_verify: raw.insecure_skip_verify.unwrap_or(false),
    })
}

fn positive(
    value: Spanned<Text<Duration>>,
    key: &str,
    source: &Source<'_>,
) -> Result<Duration, ConfigError> {
    let duration = value.get_ref().0;
    if duration.is_zero() {
        return Err(source.error(
            value.span(),
            format!("{key} must be positive, not {}", show(duration)),
        ));
    }
    Ok(duration)
}

fn at_least_one<T: Copy + PartialEq + From<u8>>(
    value: Spanned<T>,
    key: &str,
    source: &Source<'_>,
) -> Result<T, ConfigError> {
    let number = *value.get_ref();
    if number == T::from(0) {
        return Err(source.error(value.span(), format!("{key} must be at least 1, not 0")));
    }
    Ok(number)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LISTENER: &str =
        "[[listeners]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"b:1\"\n";

    fn ok(text: &str) -> Config {
        match parse(text, Path::new("test.toml")) {
            Ok(config) => config,
            Err(err) => panic!("should parse, got {err}\n{text}"),
        }
    }

    /// `(line, col, message)` of the error the text must produce.
    fn err(text: &str) -> (usize, usize, String) {
        match parse(text, Path::new("test.toml")) {
            Ok(config) => panic!("should fail, got {config:?}\n{text}"),
            Err(ConfigError::At {
                path,
                line,
                col,
                message,
            }) => {
                assert_eq!(path, Path::new("test.toml"));
                (line, col, message)
            }
            Err(other) => panic!("expected a positioned error, got {other:?}"),
        }
    }

    /// The error of one listener with `extra` appended to its table.
    fn listener_err(extra: &str) -> (usize, usize, String) {
        err(&format!("{LISTENER}{extra}\n"))
    }

    fn listener_ok(extra: &str) -> ListenerConfig {
        ok(&format!("{LISTENER}{extra}\n")).listeners.remove(0)
    }

    fn assert_message(got: &(usize, usize, String), line: usize, col: usize, wanted: &str) {
        assert_eq!((got.0, got.1), (line, col), "position of {:?}", got.2);
        assert!(
            got.2.contains(wanted),
            "{:?} should contain {wanted:?}",
            got.2
        );
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn product_example() {
        let text = include_str!("../../tests/config_fixtures/good/product_example.toml");
        let config = ok(text);
        assert_eq!(
            config.admin,
            AdminConfig {
                listen: "127.0.0.1:9901".parse().unwrap(),
                ready_file: Some("/run/legate/ready".into()),
            }
        );
        assert_eq!(config.runtime, RuntimeConfig::default());
        assert_eq!(
            config.dns,
            DnsConfig {
                servers: vec!["127.0.0.1:53".parse().unwrap()],
                ..DnsConfig::default()
            }
        );
        let expected = ListenerConfig {
            balance: Balance::RoundRobin,
            idle_timeout: Some(secs(1800)),
            health: HealthConfig {
                check: CheckKind::RedisPrimary,
                interval: secs(2),
                timeout: Duration::from_millis(500),
                ..HealthConfig::default()
            },
            tls: Some(TlsClientConfig {
                sni: Some("redis.example.com".into()),
                ca: Some("/etc/legate/ca.pem".into()),
                cert: Some("/etc/legate/client.pem".into()),
                key: Some("/etc/legate/client.key".into()),
                alpn: vec![],
                min_version: TlsVersion::Tls12,
                insecure_skip_verify: false,
            }),
            ..ListenerConfig::with_defaults(
                "redis".into(),
                "127.0.0.1:6379".parse().unwrap(),
                vec![
                    Target::Dns {
                        host: "redis.db.svc.cluster.local".into(),
                        port: 6379,
                    },
                    Target::File("/etc/legate/redis.endpoints".into()),
                ],
            )
        };
        assert_eq!(config.listeners, vec![expected]);
    }

    #[test]
    fn defaults() {
        let config = ok(LISTENER);
        assert_eq!(config.admin, AdminConfig::default());
        assert_eq!(config.runtime, RuntimeConfig::default());
        assert_eq!(config.dns, DnsConfig::default());
        assert_eq!(
            config.listeners,
            vec![ListenerConfig::with_defaults(
                "a".into(),
                "127.0.0.1:1".parse().unwrap(),
                vec![Target::Dns {
                    host: "b".into(),
                    port: 1
                }],
            )]
        );
        let listener = &config.listeners[0];
        assert_eq!(listener.connect_timeout, secs(1));
        assert_eq!(listener.connect_attempts, 3);
        assert_eq!(listener.idle_timeout, None);
        assert_eq!(listener.tcp_user_timeout, secs(120));
        assert_eq!(listener.socket_buffer, None);
        assert_eq!(listener.max_connections, 10_000);
        assert!(listener.required);
        assert_eq!(listener.health.check, CheckKind::Tcp);
        assert_eq!(listener.health.interval, secs(5));
        assert_eq!(listener.health.timeout, secs(1));
        assert_eq!(listener.health.healthy_after, 1);
        assert_eq!(listener.health.unhealthy_after, 2);
    }

    #[test]
    fn every_key() {
        let text = include_str!("../../tests/config_fixtures/good/every_key.toml");
        let config = ok(text);
        assert_eq!(config.admin.listen, "[::1]:9902".parse().unwrap());
        assert_eq!(config.runtime.shutdown_delay, secs(5));
        assert_eq!(config.runtime.drain_timeout, secs(60));
        assert_eq!(
            config.dns.servers,
            vec![
                "10.0.0.10:53".parse().unwrap(),
                "10.0.0.11:5353".parse().unwrap(),
                "[fd00::10]:53".parse().unwrap(),
                "[fd00::11]:53".parse().unwrap(),
            ]
        );
        assert_eq!(config.dns.min_ttl, Duration::ZERO);
        assert_eq!(config.dns.max_ttl, secs(3600));

        let mysql = &config.listeners[0];
        assert_eq!(mysql.name, "mysql.primary-1");
        assert_eq!(mysql.upstream.len(), 4);
        assert_eq!(mysql.balance, Balance::First);
        assert_eq!(mysql.connect_timeout, Duration::from_millis(250));
        assert_eq!(mysql.connect_attempts, 1);
        assert_eq!(mysql.idle_timeout, Some(secs(8 * 3600)));
        assert_eq!(mysql.tcp_user_timeout, secs(30));
        assert_eq!(mysql.socket_buffer, Some(65536));
        assert_eq!(mysql.max_connections, 1);
        assert!(!mysql.required);
        assert_eq!(
            mysql.health,
            HealthConfig {
                check: CheckKind::Mysql,
                interval: Duration::from_millis(1500),
                timeout: secs(1),
                healthy_after: 3,
                unhealthy_after: 1,
                close_on_unhealthy: true,
                password: None,
                user: Some("legate_check".into()),
            }
        );
        let tls = mysql.tls.as_ref().unwrap();
        assert_eq!(tls.alpn, vec!["mysql".to_string(), "x".to_string()]);
        assert_eq!(tls.min_version, TlsVersion::Tls13);
        assert!(tls.insecure_skip_verify);
        assert_eq!((tls.cert.as_ref(), tls.key.as_ref()), (None, None));
        assert_eq!(
            mysql.tls_server,
            Some(TlsServerConfig {
                cert: "/etc/legate/server.pem".into(),
                key: "/etc/legate/server.key".into(),
                client_ca: Some("/etc/legate/clients.pem".into()),
                min_version: TlsVersion::Tls13,
            })
        );

        let cache = &config.listeners[1];
        assert_eq!(cache.balance, Balance::LeastConn);
        assert_eq!(
            cache.health.password,
            Some(Secret::File("/run/secrets/redis".into()))
        );
        assert_eq!(cache.tls.as_ref().unwrap().min_version, TlsVersion::Tls12);

        let session = &config.listeners[2];
        assert_eq!(session.balance, Balance::Random);
        assert_eq!(
            session.health.password,
            Some(Secret::Inline("s3cret".into()))
        );
    }

    #[test]
    fn upstream_as_one_string_or_a_list() {
        let one = listener_ok("");
        assert_eq!(one.upstream.len(), 1);
        let text = "[[listeners]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = [\"b:1\", \"10.0.0.1:2\"]\n";
        let many = ok(text).listeners.remove(0);
        assert_eq!(
            many.upstream,
            vec![
                Target::Dns {
                    host: "b".into(),
                    port: 1
                },
                Target::Static("10.0.0.1:2".parse().unwrap()),
            ]
        );
    }

    #[test]
    fn health_as_a_table() {
        let listener = listener_ok("[listeners.health]\ncheck = \"redis\"\ninterval = \"10s\"");
        assert_eq!(listener.health.check, CheckKind::Redis);
        assert_eq!(listener.health.interval, secs(10));
        assert_eq!(listener.health.timeout, secs(1));
    }

    #[test]
    fn every_check_and_balance() {
        for check in ["none", "tcp", "redis", "redis-primary", "mysql"] {
            let listener = listener_ok(&format!("health = {{ check = \"{check}\" }}"));
            assert_eq!(listener.health.check.as_str(), check);
        }
        for balance in ["round-robin", "least-conn", "random", "first"] {
            let listener = listener_ok(&format!("balance = \"{balance}\""));
            assert_eq!(listener.balance.as_str(), balance);
        }
    }

    #[test]
    fn handoff_socket_is_abstract_a_path_or_off() {
        use crate::config::HandoffSocket;
        let admin: SocketAddr = "127.0.0.1:9901".parse().unwrap();
        let socket = |text: &str| {
            ok(&format!(
                "[runtime]\nhandoff_socket = \"{text}\"\n{LISTENER}"
            ))
            .runtime
            .handoff_socket
            .socket(admin)
        };
        assert_eq!(socket("@up"), Some(HandoffSocket::Abstract("up".into())));
        assert_eq!(
            socket("/run/legate/h.sock"),
            Some(HandoffSocket::Path("/run/legate/h.sock".into()))
        );
        assert_eq!(socket("off"), None);
        assert_eq!(
            ok(LISTENER).runtime.handoff_socket.socket(admin),
            Some(HandoffSocket::Abstract(
                "legate-handoff:127.0.0.1:9901".into()
            )),
            "the default is named after the admin address"
        );
        let (line, col, message) = err(&format!("[runtime]\nhandoff_socket = \"\"\n{LISTENER}"));
        assert_eq!((line, col), (2, 18));
        assert!(message.contains("empty handoff_socket"), "{message}");
        let long = "x".repeat(108);
        let (_, _, message) = err(&format!(
            "[runtime]\nhandoff_socket = \"@{long}\"\n{LISTENER}"
        ));
        assert!(message.contains("at most 107"), "{message}");
    }

    #[test]
    fn shutdown_delay_may_be_zero() {
        let config = ok(&format!("[runtime]\nshutdown_delay = \"0s\"\n{LISTENER}"));
        assert_eq!(config.runtime.shutdown_delay, Duration::ZERO);
    }

    #[test]
    fn tls_versions_as_numbers() {
        assert_eq!(
            listener_ok("tls = { min_version = 1.3 }")
                .tls
                .unwrap()
                .min_version,
            TlsVersion::Tls13
        );
        assert_eq!(
            listener_ok("tls = { min_version = 1.2 }")
                .tls
                .unwrap()
                .min_version,
            TlsVersion::Tls12
        );
    }

    #[test]
    fn ip_literal_sni() {
        assert_eq!(
            listener_ok("tls = { sni = \"10.0.0.1\" }").tls.unwrap().sni,
            Some("10.0.0.1".into())
        );
    }

    #[test]
    fn port_zero_listeners_do_not_collide() {
        let text = include_str!("../../tests/config_fixtures/good/quick_ports.toml");
        assert_eq!(ok(text).listeners.len(), 2);
    }

    #[test]
    fn syntax_error_position() {
        let got = err("[[listeners]]\nname = \"a\nlisten = 1\n");
        assert_eq!(got.0, 2);
    }

    #[test]
    fn duplicate_toml_key() {
        let got = err(&format!("{LISTENER}name = \"b\"\n"));
        assert_eq!(got.0, 5, "{got:?}");
    }

    #[test]
    fn unknown_keys_everywhere() {
        let at = |text: &str, line, col, key: &str| {
            assert_message(&err(text), line, col, &format!("unknown field `{key}`"));
        };
        at(&format!("bogus = 1\n{LISTENER}"), 1, 1, "bogus");
        at(&format!("[admin]\nport = 1\n{LISTENER}"), 2, 1, "port");
        at(
            &format!("[runtime]\ngrace = \"1s\"\n{LISTENER}"),
            2,
            1,
            "grace",
        );
        at(
            &format!("[dns]\nserver = \"1.1.1.1\"\n{LISTENER}"),
            2,
            1,
            "server",
        );
        at(&format!("{LISTENER}weight = 1\n"), 5, 1, "weight");
        at(
            &format!("{LISTENER}health = {{ port = 1 }}\n"),
            5,
            12,
            "port",
        );
        at(
            &format!("{LISTENER}tls = {{ verify = true }}\n"),
            5,
            9,
            "verify",
        );
        at(
            &format!("{LISTENER}tls_server = {{ cert = \"c\", key = \"k\", ca = \"x\" }}\n"),
            5,
            39,
            "ca",
        );
    }

    #[test]
    fn wrong_types() {
        assert_message(
            &listener_err("connect_attempts = \"3\""),
            5,
            20,
            "invalid type: string \"3\", expected u32",
        );
        assert_message(&listener_err("required = 1"), 5, 12, "expected a boolean");
        assert_message(&listener_err("health = \"tcp\""), 5, 10, "invalid type");
        assert_message(
            &listener_err("tls = { alpn = \"h2\" }"),
            5,
            16,
            "invalid type",
        );
        assert_message(&listener_err("balance = 1"), 5, 11, "expected one of");
        assert_message(
            &err("[[listeners]]\nname = 5\nlisten = \"127.0.0.1:1\"\nupstream = \"b:1\"\n"),
            2,
            8,
            "expected a string",
        );
        assert_message(
            &err(&format!("[dns]\nservers = \"1.1.1.1\"\n{LISTENER}")),
            2,
            11,
            "invalid type",
        );
        assert_message(&err("admin = 1\n"), 1, 9, "invalid type");
        assert_message(
            &listener_err("max_connections = -5"),
            5,
            19,
            "expected usize",
        );
        assert_message(
            &listener_err("connect_attempts = 1.5"),
            5,
            20,
            "invalid type",
        );
    }

    #[test]
    fn bad_durations() {
        assert_message(
            &listener_err("connect_timeout = \"5\""),
            5,
            19,
            "invalid duration \"5\": add a unit: ms, s, m or h",
        );
        assert_message(
            &listener_err("idle_timeout = \"5y\""),
            5,
            16,
            "unknown unit \"y\"",
        );
        assert_message(
            &listener_err("health = { timeout = \"-1s\" }"),
            5,
            22,
            "cannot be negative",
        );
        assert_message(
            &err(&format!("[dns]\nmin_ttl = \"\"\n{LISTENER}")),
            2,
            11,
            "invalid duration \"\"",
        );
    }

    #[test]
    fn zero_where_positive_is_needed() {
        let zero = |key: &str, extra: &str, col| {
            assert_message(
                &listener_err(extra),
                5,
                col,
                &format!("{key} must be positive"),
            );
        };
        zero("connect_timeout", "connect_timeout = \"0s\"", 19);
        zero("interval", "health = { interval = \"0ms\" }", 23);
        zero("timeout", "health = { timeout = \"0s\" }", 22);
        zero("tcp_user_timeout", "tcp_user_timeout = \"0s\"", 20);
        assert_message(
            &listener_err("tcp_user_timeout = \"25h\""),
            5,
            20,
            "tcp_user_timeout must be at most 24h",
        );
        assert_message(
            &listener_err("idle_timeout = \"0s\""),
            5,
            16,
            "idle_timeout must be positive; leave it out",
        );
        assert_message(
            &err(&format!("[runtime]\ndrain_timeout = \"0s\"\n{LISTENER}")),
            2,
            17,
            "drain_timeout must be positive, not 0s",
        );
        assert_message(
            &err(&format!(
                "[dns]\nmin_ttl = \"0s\"\nmax_ttl = \"0s\"\n{LISTENER}"
            )),
            3,
            11,
            "max_ttl must be positive",
        );
    }

    #[test]
    fn counts_at_least_one() {
        let one = |extra: &str, col, key: &str| {
            assert_message(
                &listener_err(extra),
                5,
                col,
                &format!("{key} must be at least 1, not 0"),
            );
        };
        one("connect_attempts = 0", 20, "connect_attempts");
        one("max_connections = 0", 19, "max_connections");
        one("health = { healthy_after = 0 }", 28, "healthy_after");
        one("health = { unhealthy_after = 0 }", 30, "unhealthy_after");
    }

    #[test]
    fn ttl_order() {
        assert_message(
            &err(&format!(
                "[dns]\nmin_ttl = \"10m\"\nmax_ttl = \"5m\"\n{LISTENER}"
            )),
            3,
            11,
            "min_ttl (10m) is greater than max_ttl (5m)",
        );
        // Only min_ttl written: the default max_ttl (5m) is what it clashes with.
        assert_message(
            &err(&format!("[dns]\nmin_ttl = \"6m\"\n{LISTENER}")),
            2,
            11,
            "min_ttl (6m) is greater than max_ttl (5m)",
        );
        assert_message(
            &err(&format!("[dns]\nmax_ttl = \"500ms\"\n{LISTENER}")),
            2,
            11,
            "min_ttl (1s) is greater than max_ttl (500ms)",
        );
        let config = ok(&format!(
            "[dns]\nmin_ttl = \"5m\"\nmax_ttl = \"5m\"\n{LISTENER}"
        ));
        assert_eq!(config.dns.min_ttl, config.dns.max_ttl);
    }

    #[test]
    fn unknown_balance_message() {
        assert_message(
            &listener_err("balance = \"x\""),
            5,
            11,
            "unknown balance \"x\": expected round-robin, least-conn, random or first",
        );
    }

    #[test]
    fn unknown_check_message() {
        assert_message(
            &listener_err("health = { check = \"redis_primary\" }"),
            5,
            20,
            "unknown check \"redis_primary\": expected none, tcp, redis, redis-primary or mysql",
        );
    }

    #[test]
    fn bad_targets() {
        let base = "[[listeners]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n";
        let target_err = |upstream: &str| err(&format!("{base}upstream = {upstream}\n"));
        assert_message(&target_err("\"b:0\""), 4, 12, "port 0 is out of range");
        assert_message(
            &target_err("[\"b:1\", \"::1:6379\"]"),
            4,
            20,
            "an IPv6 address needs brackets, like [::1]:6379",
        );
        assert_message(&target_err("[\"srv:\"]"), 4, 13, "srv: needs a name");
        assert_message(&target_err("[\"b\"]"), 4, 13, "missing port");
        assert_message(
            &target_err("[\"b:1\", \"dns:b:1\"]"),
            4,
            20,
            "upstream dns:b:1 is listed twice in listener \"a\"",
        );
    }

    #[test]
    fn missing_or_empty_upstream() {
        assert_message(
            &err("\n[[listeners]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\n"),
            2,
            1,
            "listener \"a\" has no upstream",
        );
        assert_message(
            &err("[[listeners]]\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = []\n"),
            4,
            12,
            "listener \"a\" has no upstream",
        );
    }

    #[test]
    fn no_listeners() {
        assert_message(&err(""), 1, 1, "no listeners");
        assert_message(&err("# nothing\n"), 1, 1, "no listeners");
        assert_message(&err("# c\nlisteners = []\n"), 2, 13, "no listeners");
        assert_message(&err("listeners = []\n"), 1, 13, "no listeners");
    }

    #[test]
    fn single_listeners_table() {
        assert_message(
            &err("[listeners]\nname = \"a\"\n"),
            1,
            1,
            "write [[listeners]], with double brackets",
        );
    }

    #[test]
    fn missing_required_keys() {
        assert_message(
            &err("[[listeners]]\nlisten = \"127.0.0.1:1\"\nupstream = \"b:1\"\n"),
            1,
            1,
            "missing field `name`",
        );
        assert_message(
            &err("[[listeners]]\nname = \"a\"\nupstream = \"b:1\"\n"),
            1,
            1,
            "missing field `listen`",
        );
        assert_message(
            &listener_err("tls_server = { key = \"k\" }"),
            5,
            14,
            "missing field `cert`",
        );
    }

    #[test]
    fn duplicate_names_point_at_the_second() {
        let text = format!("{LISTENER}\n[[listeners]]\nname = \"a\"\nlisten = \"127.0.0.1:2\"\nupstream = \"b:1\"\n");
        assert_message(
            &err(&text),
            7,
            8,
            "listener name \"a\" is already used by the listener on line 2",
        );
    }

    #[test]
    fn duplicate_listen_points_at_the_second() {
        let text = format!("{LISTENER}\n[[listeners]]\nname = \"z\"\nlisten = \"127.0.0.1:1\"\nupstream = \"b:1\"\n");
        assert_message(
            &err(&text),
            8,
            10,
            "listen address 127.0.0.1:1 is already used by listener \"a\" (line 3)",
        );
    }

    #[test]
    fn wildcard_listen_overlaps() {
        let text = format!(
            "{LISTENER}[[listeners]]\nname = \"z\"\nlisten = \"0.0.0.0:1\"\nupstream = \"b:1\"\n"
        );
        assert_message(
            &err(&text),
            7,
            10,
            "listen address 0.0.0.0:1 overlaps 127.0.0.1:1 of listener \"a\" (line 3)",
        );
        // Other ports and other families do not overlap.
        let text = format!("{LISTENER}[[listeners]]\nname = \"y\"\nlisten = \"0.0.0.0:2\"\nupstream = \"b:1\"\n[[listeners]]\nname = \"z\"\nlisten = \"[::1]:1\"\nupstream = \"b:1\"\n");
        assert_eq!(ok(&text).listeners.len(), 3);
    }

    #[test]
    fn listen_on_the_admin_address() {
        let text = "[admin]\nlisten = \"127.0.0.1:7000\"\n[[listeners]]\nname = \"a\"\nlisten = \"127.0.0.1:7000\"\nupstream = \"b:1\"\n";
        assert_message(
            &err(text),
            5,
            10,
            "listen address 127.0.0.1:7000 is already used by admin.listen (line 2)",
        );
        let text = "[[listeners]]\nname = \"a\"\nlisten = \"127.0.0.1:9901\"\nupstream = \"b:1\"\n";
        assert_message(&err(text), 3, 10, "listens there by default");
    }

    #[test]
    fn bad_listen_addresses() {
        let listen_err = |listen: &str| {
            err(&format!(
                "[[listeners]]\nname = \"a\"\nlisten = \"{listen}\"\nupstream = \"b:1\"\n"
            ))
        };
        assert_message(&listen_err("localhost:6379"), 3, 10, "not a host name");
        assert_message(&listen_err("::1:6379"), 3, 10, "needs brackets");
        assert_message(&listen_err("127.0.0.1"), 3, 10, "missing port");
        assert_message(&listen_err("127.0.0.1:70000"), 3, 10, "out of range");
        assert_message(&listen_err(""), 3, 10, "invalid listen address \"\"");
        assert_message(
            &err(&format!("[admin]\nlisten = \"admin:1\"\n{LISTENER}")),
            2,
            10,
            "not a host name",
        );
    }

    #[test]
    fn ipv6_listen() {
        let text = "[[listeners]]\nname = \"a\"\nlisten = \"[::1]:6379\"\nupstream = \"b:1\"\n";
        assert_eq!(ok(text).listeners[0].listen, "[::1]:6379".parse().unwrap());
    }

    #[test]
    fn bad_dns_servers() {
        let server_err =
            |server: &str| err(&format!("[dns]\nservers = [\"{server}\"]\n{LISTENER}"));
        assert_message(&server_err("dns.google"), 2, 12, "must be an IP address");
        assert_message(&server_err("10.0.0.1:0"), 2, 12, "out of range");
        assert_message(&server_err(""), 2, 12, "invalid DNS server");
    }

    #[test]
    fn bad_listener_names() {
        let name_err = |name: &str| {
            err(&format!(
                "[[listeners]]\nname = \"{name}\"\nlisten = \"127.0.0.1:1\"\nupstream = \"b:1\"\n"
            ))
        };
        assert_message(&name_err(""), 2, 8, "the listener name is empty");
        assert_message(&name_err("my redis"), 2, 8, "contains ' '");
        assert_message(&name_err("a\\\"b"), 2, 8, "contains '\"'");
        assert_message(&name_err("rédis"), 2, 8, "contains 'é'");
        assert_message(&name_err("a{b}"), 2, 8, "contains '{'");
    }

    #[test]
    fn passwords() {
        assert_message(
            &listener_err(
                "health = { check = \"redis\", password = \"x\", password_file = \"/s\" }",
            ),
            5,
            61,
            "give password or password_file, not both",
        );
        assert_message(
            &listener_err("health = { password = \"x\" }"),
            5,
            23,
            "only used by the redis and redis-primary checks, not by check = \"tcp\"",
        );
        assert_message(
            &listener_err("health = { check = \"mysql\", password_file = \"/s\" }"),
            5,
            45,
            "not by check = \"mysql\"",
        );
        assert_message(
            &listener_err("health = { check = \"redis\", password = \"\" }"),
            5,
            40,
            "the password is empty",
        );
        assert_message(
            &listener_err("health = { check = \"redis\", password_file = \"\" }"),
            5,
            45,
            "the path is empty",
        );
    }

    #[test]
    fn socket_buffer_bounds() {
        assert_eq!(
            listener_ok("socket_buffer = 4096").socket_buffer,
            Some(4096)
        );
        assert_eq!(
            listener_ok("socket_buffer = 67108864").socket_buffer,
            Some(64 << 20)
        );
        for bad in ["0", "4095", "67108865", "1099511627776"] {
            assert_message(
                &listener_err(&format!("socket_buffer = {bad}")),
                5,
                17,
                "it must be from 4096 (4 KiB) to 67108864 (64 MiB)",
            );
        }
        let (line, _, message) = listener_err("socket_buffer = -1");
        assert_eq!(line, 5, "{message}");
        let (line, _, message) = listener_err("socket_buffer = \"64KiB\"");
        assert_eq!(line, 5, "{message}");
        assert!(
            message.contains("invalid type: string \"64KiB\""),
            "{message}"
        );
    }

    #[test]
    fn mysql_user() {
        let listener = listener_ok("health = { check = \"mysql\", user = \"légate\" }");
        assert_eq!(listener.health.user.as_deref(), Some("légate"));
        assert_message(
            &listener_err("health = { check = \"tcp\", user = \"legate\" }"),
            5,
            34,
            "user is only used by the mysql check, not by check = \"tcp\"",
        );
        assert_message(
            &listener_err("health = { user = \"legate\" }"),
            5,
            19,
            "not by check = \"tcp\"",
        );
        assert_message(
            &listener_err("health = { check = \"mysql\", user = \"\" }"),
            5,
            36,
            "the user is empty",
        );
        let long = "x".repeat(81);
        assert_message(
            &listener_err(&format!(
                "health = {{ check = \"mysql\", user = \"{long}\" }}"
            )),
            5,
            36,
            "at most 80",
        );
        assert_message(
            &listener_err("health = { check = \"mysql\", user = \"a\\u0000b\" }"),
            5,
            36,
            "control character",
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let listener = listener_ok("health = { check = \"redis\", password = \"hunter2\" }");
        let shown = format!("{listener:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn client_certificate_needs_both_halves() {
        assert_message(
            &listener_err("tls = { cert = \"c\" }"),
            5,
            16,
            "cert needs key",
        );
        assert_message(
            &listener_err("tls = { key = \"k\" }"),
            5,
            15,
            "key needs cert",
        );
    }

    #[test]
    fn bad_tls_values() {
        assert_message(
            &listener_err("tls = { sni = \"a b\" }"),
            5,
            15,
            "invalid sni \"a b\"",
        );
        assert_message(
            &listener_err("tls = { alpn = [\"h2\", \"\"] }"),
            5,
            23,
            "1 to 255 bytes",
        );
        assert_message(
            &listener_err("tls = { min_version = \"1.1\" }"),
            5,
            23,
            "unknown TLS version \"1.1\": expected \"1.2\" or \"1.3\"",
        );
        assert_message(
            &listener_err("tls = { min_version = 1.0 }"),
            5,
            23,
            "unknown TLS version 1",
        );
        assert_message(
            &listener_err("tls = { min_version = 13 }"),
            5,
            23,
            "invalid type",
        );
        assert_message(
            &listener_err("tls = { ca = \"\" }"),
            5,
            14,
            "the path is empty",
        );
        assert_message(
            &listener_err("tls_server = { cert = \"c\", key = \"k\", min_version = \"1.0\" }"),
            5,
            53,
            "unknown TLS version",
        );
    }

    #[test]
    fn columns_count_characters() {
        // "é" is two bytes but one column.
        let text = "# é\n[[listeners]] # é\nname = \"a\"\nlisten = \"127.0.0.1:1\"\nupstream = \"b:1\"\n\"é\" = 1 # x\n";
        assert_message(&err(text), 6, 1, "unknown field `é`");
        let text = format!("{LISTENER}health = {{ check = \"é\" }}\n");
        let got = err(&text);
        assert_eq!((got.0, got.1), (5, 20));
        let text = format!("{LISTENER}tls = {{ sni = \"é\", cert = \"c\" }}\n");
        assert_eq!(err(&text).0, 5);
    }

    #[test]
    fn crlf_positions() {
        let text = LISTENER.replace('\n', "\r\n") + "balance = \"x\"\r\n";
        assert_message(&err(&text), 5, 11, "unknown balance");
    }

    #[test]
    fn display_is_file_line_col() {
        let error = parse(
            &format!("{LISTENER}balance = \"x\"\n"),
            Path::new("/etc/legate.toml"),
        )
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("/etc/legate.toml:5:11: unknown balance"),
            "{error}"
        );
    }

    /// Every prefix of a rich file, and a few thousand single-byte mutations of it,
    /// must give a config or an error: never a panic.
    #[test]
    fn never_panics() {
        let text = include_str!("../../tests/config_fixtures/good/every_key.toml");
        for end in (0..=text.len()).filter(|end| text.is_char_boundary(*end)) {
            let _ = parse(&text[..end], Path::new("t.toml"));
        }
        let replacements = b"\"'[]{}=,.:#\n\\ 0-_az\x00\xff";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            // xorshift64: deterministic, no dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let mut bytes = text.as_bytes().to_vec();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = replacements[(next() % replacements.len() as u64) as usize];
            }
            if let Ok(mutated) = std::str::from_utf8(&bytes) {
                if let Err(ConfigError::At { line, col, .. }) = parse(mutated, Path::new("t.toml"))
                {
                    assert!(line >= 1 && col >= 1);
                }
            }
        }
    }

    /// `tests/config_fixtures/good/*.toml` parse; each `bad/*.toml` opens with
    /// `# expect LINE:COL: substring` and fails exactly there with that message.
    #[test]
    fn fixtures() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config_fixtures");
        let files = |dir: &str| {
            let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
                .unwrap_or_else(|err| panic!("{dir}: {err}"))
                .map(|entry| entry.unwrap().path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
                .collect();
            paths.sort();
            assert!(!paths.is_empty(), "no fixtures in {dir}");
            paths
        };
        for path in files("good") {
            if let Err(err) = Config::load(&path) {
                panic!("{} should parse: {err}", path.display());
            }
        }
        for path in files("bad") {
            let text = std::fs::read_to_string(&path).unwrap();
            let first = text.lines().next().unwrap_or("");
            let Some(expect) = first.strip_prefix("# expect ") else {
                panic!(
                    "{}: first line must be `# expect LINE:COL: substring`",
                    path.display()
                );
            };
            let (position, wanted) = expect
                .split_once(": ")
                .unwrap_or((expect.trim_end_matches(':'), ""));
            let (line, col) = position.split_once(':').unwrap();
            let (line, col): (usize, usize) = (line.parse().unwrap(), col.parse().unwrap());
            match Config::load(&path) {
                Ok(_) => panic!("{} should fail", path.display()),
                Err(ConfigError::At {
                    line: got_line,
                    col: got_col,
                    message,
                    ..
                }) => {
                    assert_eq!(
                        (got_line, got_col),
                        (line, col),
                        "{}: {message}",
                        path.display()
                    );
                    assert!(
                        message.contains(wanted),
                        "{}: {message:?} should contain {wanted:?}",
                        path.display()
                    );
                }
                Err(other) => panic!(
                    "{}: expected a positioned error, got {other}",
                    path.display()
                ),
            }
        }
    }
}
