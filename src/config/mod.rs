//! Validated runtime configuration.
//!
//! The pipeline is: TOML text → `file` (serde types exactly as written, with spans)
//! → `validate` → the types in this module, which the rest of legate consumes.
//! Nothing downstream ever sees an unvalidated value: durations are `Duration`,
//! addresses are parsed, targets follow the one grammar in `target`.
//!
//! Errors carry `FILE:LINE:COL` so `legate check` can point at the problem.

pub mod duration;
mod file;
pub(crate) mod target;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use target::Target;

/// The whole configuration of one legate process.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub admin: AdminConfig,
    pub runtime: RuntimeConfig,
    pub(crate) dns: DnsConfig,
    pub listeners: Vec<ListenerConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Default `127.0.0.1:9901`.
    pub listen: SocketAddr,
    /// Exists exactly while `/ready` is 200.
    pub(crate) ready_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuntimeConfig {
    /// Default 0s: on SIGTERM keep accepting this long while `/ready` is already 503.
    pub shutdown_delay: Duration,
    /// Default 30s: how long open connections may take to finish once accepting stopped.
    pub drain_timeout: Duration,
    /// Where a new legate finds this one to take its sockets over.
    pub(crate) handoff_socket: Handoff,
}

/// `[runtime] handoff_socket`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Handoff {
    /// Unset: `@legate-handoff:<admin listen address>`, so legates with different admin
    /// addresses (different instances) never take each other's sockets.
    #[default]
    Default,
    /// `"off"`: never hand over, never take over.
    Off,
    /// Set explicitly.
    At(HandoffSocket),
}

impl Handoff {
    /// `@name`, `off`, or a path (at most 107 bytes, the limit of a Unix socket address).
    pub(crate) fn parse(text: &str) -> Result<Handoff, String> {
        let socket = match text {
            "off" => return Ok(Handoff::Off),
            "" | "@" => {
                return Err("an empty handoff_socket (use \"off\" to turn handover off)".into())
            }
            _ => match text.strip_prefix('@') {
                Some(name) => HandoffSocket::Abstract(name.to_string()),
                None => HandoffSocket::Path(PathBuf::from(text)),
            },
        };
        if text.len() > 107 {
            return Err(format!(
                "handoff_socket {text:?} is {} bytes long; a Unix socket address holds at most 107",
                text.len()
            ));
        }
        Ok(Handoff::At(socket))
    }

    /// The socket to use with this admin address, or `None` when off.
    pub(crate) fn socket(&self, admin: SocketAddr) -> Option<HandoffSocket> {
        match self {
            Handoff::Default => Some(HandoffSocket::Abstract(format!("legate-handoff:{admin}"))),
            Handoff::Off => None,
            Handoff::At(socket) => Some(socket.clone()),
        }
    }
}

/// A Unix socket address: abstract (`@name`, Linux; reaches across the containers of a
/// Pod, which share a network namespace) or a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandoffSocket {
    Abstract(String),
    Path(PathBuf),
}

impl std::fmt::Display for HandoffSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandoffSocket::Abstract(name) => write!(f, "@{name}"),
            HandoffSocket::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DnsConfig {
    /// Empty: use the system's resolv.conf.
    pub(crate) servers: Vec<SocketAddr>,
    /// Default 1s.
    pub(crate) min_ttl: Duration,
    /// Default 5m.
    pub(crate) max_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub(crate) name: String,
    pub(crate) listen: SocketAddr,
    /// At least one target; the listener's endpoint set is their union.
    pub upstream: Vec<Target>,
    pub(crate) balance: Balance,
    /// Default 1s.
    pub(crate) connect_timeout: Duration,
    /// Default 3; at least 1.
    pub(crate) connect_attempts: u32,
    /// Default none: pooled database connections sit idle for hours.
    pub(crate) idle_timeout: Option<Duration>,
    /// TCP_USER_TIMEOUT on both sockets of a connection: how long sent bytes may go
    /// unacknowledged before the connection is given up. Default 2m, the same as the
    /// keepalive's 60s + 6 × 10s, so an idle and a busy dead peer are found alike.
    pub(crate) tcp_user_timeout: Duration,
    /// SO_SNDBUF/SO_RCVBUF in bytes on both sockets; default none: the kernel autotunes
    /// (up to net.ipv4.tcp_rmem/tcp_wmem's maximum, megabytes per socket).
    pub(crate) socket_buffer: Option<u32>,
    /// Default 10000; at least 1.
    pub(crate) max_connections: usize,
    /// Default true.
    pub(crate) required: bool,
    pub(crate) health: HealthConfig,
    pub(crate) tls: Option<TlsClientConfig>,
    pub(crate) tls_server: Option<TlsServerConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Balance {
    RoundRobin,
    LeastConn,
    Random,
    First,
}

impl Balance {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::LeastConn => "least-conn",
            Balance::Random => "random",
            Balance::First => "first",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CheckKind {
    None,
    Tcp,
    Redis,
    RedisPrimary,
    Mysql,
}

impl CheckKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CheckKind::None => "none",
            CheckKind::Tcp => "tcp",
            CheckKind::Redis => "redis",
            CheckKind::RedisPrimary => "redis-primary",
            CheckKind::Mysql => "mysql",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HealthConfig {
    /// Default tcp.
    pub(crate) check: CheckKind,
    /// Default 5s.
    pub(crate) interval: Duration,
    /// Default 1s.
    pub(crate) timeout: Duration,
    /// Consecutive passes before an endpoint turns healthy. Default 1.
    pub(crate) healthy_after: u32,
    /// Consecutive failures before a healthy endpoint turns unhealthy. Default 2.
    pub(crate) unhealthy_after: u32,
    /// Close open client connections to an endpoint when it turns unhealthy. Default false.
    pub(crate) close_on_unhealthy: bool,
    /// Redis AUTH password for `redis`/`redis-primary` checks (`password` or `password_file`).
    pub(crate) password: Option<Secret>,
    /// MySQL account (empty password) the `mysql` check logs in as, then leaves with
    /// `COM_QUIT`; none: the check reads the greeting and closes.
    pub(crate) user: Option<String>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            check: CheckKind::Tcp,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_after: 1,
            unhealthy_after: 2,
            close_on_unhealthy: false,
            password: None,
            user: None,
        }
    }
}

/// A secret value that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Secret {
    Inline(String),
    File(PathBuf),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Inline(_) => f.write_str("Secret(<redacted>)"),
            Secret::File(path) => write!(f, "Secret(file {})", path.display()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsVersion {
    Tls12,
    Tls13,
}

/// `tls = { ... }`: originate TLS toward the upstream.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TlsClientConfig {
    /// Server name to send and verify; defaults to the target's host name.
    pub(crate) sni: Option<String>,
    /// CA bundle (PEM); default: the webpki roots.
    pub(crate) ca: Option<PathBuf>,
    /// Client certificate and key for mTLS; both or neither.
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    pub(crate) alpn: Vec<String>,
    /// Default TLS 1.2.
    pub(crate) min_version: TlsVersion,
    pub(crate) insecure_skip_verify: bool,
}

/// `tls_server = { ... }`: terminate TLS from the client.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TlsServerConfig {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    pub(crate) client_ca: Option<PathBuf>,
    pub(crate) min_version: TlsVersion,
}

impl ListenerConfig {
    /// A listener with every default, as quick mode (`--listen`/`--upstream`) builds it.
    pub(crate) fn with_defaults(name: String, listen: SocketAddr, upstream: Vec<Target>) -> Self {
        ListenerConfig {
            name,
            listen,
            upstream,
            balance: Balance::RoundRobin,
            connect_timeout: Duration::from_secs(1),
            connect_attempts: 3,
            idle_timeout: None,
            tcp_user_timeout: Duration::from_secs(120),
            socket_buffer: None,
            max_connections: 10_000,
            required: true,
            health: HealthConfig::default(),
            tls: None,
            tls_server: None,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            ready_file: None,
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            shutdown_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(30),
            handoff_socket: Handoff::Default,
        }
    }
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            servers: Vec::new(),
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(300),
        }
    }
}

/// A configuration error, displayed as `FILE:LINE:COL: message` when it has a position.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}:{line}:{col}: {message}")]
    At {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
    /// Errors without a file position (quick-mode flags).
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Read and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError::Read {
            path: path.to_path_buf(),
            message: err.to_string(),
        })?;
        Config::parse(&text, path)
    }

    /// Parse and validate configuration text; `path` is only used in error messages.
    pub(crate) fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        file::parse(text, path)
    }

    /// Checks that hold for any configuration, however it was built
    /// (file or quick mode): unique names and listen addresses, at least one listener.
    pub(crate) fn validate_quick(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(ConfigError::Invalid(
                "no listeners: give -c FILE or at least one --listen ADDR --upstream TARGET pair"
                    .into(),
            ));
        }
        for (index, listener) in self.listeners.iter().enumerate() {
            if listener.upstream.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "listener {} ({}) has no --upstream",
                    listener.name, listener.listen
                )));
            }
            for other in &self.listeners[..index] {
                if other.listen == listener.listen {
                    return Err(ConfigError::Invalid(format!(
                        "listen address {} is given twice",
                        listener.listen
                    )));
                }
                if other.name == listener.name {
                    return Err(ConfigError::Invalid(format!(
                        "listener name {} is given twice",
                        listener.name
                    )));
                }
            }
        }
        Ok(())
    }
}
