//! DNS targets: A/AAAA (`dns:HOST:PORT` and bare `HOST:PORT`) and SRV (`srv:NAME`).
//!
//! One [`DnsResolver`] per process wraps a hickory `TokioResolver`, built from `[dns]
//! servers` (UDP, with TCP for truncated answers, to each address in turn) or, when that is
//! empty, from `/etc/resolv.conf` (its search list, `ndots` and `/etc/hosts` included, like
//! the C library; without a readable resolv.conf it asks `127.0.0.1:53`, as glibc does).
//! hickory's cache is off: each target's task schedules its own refreshes, so a lookup
//! always goes to the server. Each query waits at most 2s and is sent twice, and a whole
//! lookup is cut off after [`LOOKUP_DEADLINE`]; lookups run in their own task and never
//! touch the accept path.
//!
//! For every target a task ([`run`], [`run_srv`]) loops:
//! - **Success**: the answer becomes the target's endpoints
//!   (`Endpoints::update`, which publishes only when the listener's union changed). The
//!   next lookup is due when the answer's TTL runs out, clamped to `[dns] min_ttl` ..
//!   `max_ttl` (and never sooner than [`MIN_REFRESH`], since `min_ttl` may be `0s`), plus up
//!   to 10% (at most 250ms) of jitter so targets sharing a TTL don't refresh in lockstep.
//!   Addresses are sorted, so a server that rotates its answers publishes nothing new.
//!   At most [`MAX_ENDPOINTS`] addresses per target are kept (the lowest, so the same ones
//!   on every refresh); every lookup cut that way counts
//!   `legate_dns_truncated_total{listener}`, and a warning is logged when a target's
//!   answers start being cut (an info line when they fit again), not on every refresh.
//! - **Empty answer** (NOERROR without an address, or an SRV answer whose targets have no
//!   address): a failure like the ones below, never an empty set.
//! - **Failure** (NXDOMAIN, an answer with no records, SERVFAIL, REFUSED or another rcode, a
//!   timeout, an unreachable server): the last good answer stays in use — a lookup never
//!   empties a set, there is no stale limit — and the error is recorded for `/ready` and
//!   `/endpoints` (`Endpoints::source_failed`; before the first success the target shows
//!   as not resolved). A warning is logged when the target starts failing or the reason
//!   changes, not on every retry; an info line when it recovers. Retries back off
//!   exponentially from 250ms to `min(max_ttl, 30s)`, each delay shortened by up to a
//!   quarter at random but never under [`MIN_REFRESH`].
//! - **Metrics**: `legate_reloads_total{source="dns",result="error"}` counts every failed
//!   lookup, retries included; `result="ok"` counts lookups that brought a new answer for
//!   the target (the first one and every change), not the refreshes that confirmed the
//!   answer already in use.
//!
//! SRV (RFC 2782): each SRV record's target host is resolved to addresses (from the
//! answer's additional section when the server sent them there, else by an A/AAAA lookup),
//! each with the record's port. The SRV weight becomes the endpoint weight; a weight of 0
//! counts as 1, because the balancers have no "only when nothing else" weight (RFC 2782
//! gives such targets a very small share). The lowest priority is the primary tier; every
//! higher priority is marked `backup`, and backups get traffic only while no primary is
//! eligible, so three or more tiers collapse into primary + backup (endpoints stay ordered
//! by priority, so the `first` balancer still tries tier 2 before tier 3). A target of `.`
//! ("service not available here") is skipped. A target host with no address (NXDOMAIN or no
//! records) is skipped with a warning; any other failure of a host lookup fails the whole
//! refresh, so a transient error never drops endpoints. The refresh is due at the smallest
//! TTL among the SRV records and the addresses used, clamped as above.

use super::EndpointSpec;
use crate::config::DnsConfig;
use crate::state::{ListenerState, Shared};
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
    ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record};
use hickory_resolver::TokioResolver;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How long one query waits for an answer before it is sent again.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Retries after a query timed out or failed to reach the server (so 2 sends in all).
const QUERY_RETRIES: usize = 1;
/// A bound on one whole lookup (search-list names and retries included), in case the
/// resolver's own timeouts add up to more.
const LOOKUP_DEADLINE: Duration = Duration::from_secs(5);
/// Refresh no more often than this, whatever `min_ttl` and the TTL say.
const MIN_REFRESH: Duration = Duration::from_millis(250);
/// Back-off after a failed lookup starts here and doubles ...
const BACKOFF_START: Duration = Duration::from_millis(250);
/// ... up to `min(max_ttl, BACKOFF_MAX)`.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Addresses kept per target; the rest of a huge answer is dropped (counted in
/// `legate_dns_truncated_total`, with a warning when it starts).
pub(crate) const MAX_ENDPOINTS: usize = 1024;

/// The process's resolver, built once from `[dns]`.
pub(crate) struct DnsResolver {
    resolver: TokioResolver,
    min_ttl: Duration,
    max_ttl: Duration,
}

impl DnsResolver {
    pub(crate) fn new(config: &DnsConfig) -> Result<DnsResolver, String> {
        let (resolver_config, mut options) = if config.servers.is_empty() {
            match hickory_resolver::system_conf::read_system_conf() {
                Ok(system) => system,
                Err(error) => {
                    tracing::warn!(%error, "cannot read /etc/resolv.conf; asking 127.0.0.1:53");
                    let mut options = ResolverOpts::default();
                    options.use_hosts_file = ResolveHosts::Always;
                    (
                        name_servers(&[SocketAddr::from((Ipv4Addr::LOCALHOST, 53))]),
                        options,
                    )
                }
            }
        } else {
            let mut options = ResolverOpts::default();
            // The servers were named explicitly: ask them, not /etc/hosts.
            options.use_hosts_file = ResolveHosts::Never;
            (name_servers(&config.servers), options)
        };
        // We schedule refreshes from the TTL ourselves; a cached answer would hide changes.
        options.cache_size = 0;
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.timeout = QUERY_TIMEOUT;
        options.attempts = QUERY_RETRIES;
        // A truncated UDP answer (many records) is asked again over TCP.
        options.try_tcp_on_error = true;
        let resolver =
            TokioResolver::builder_with_config(resolver_config, TokioRuntimeProvider::default())
                .with_options(options)
                .build()
                .map_err(|error| format!("cannot build the DNS resolver: {error}"))?;
        Ok(DnsResolver {
            resolver,
            min_ttl: config.min_ttl,
            max_ttl: config.max_ttl,
        })
    }

    /// One lookup of `host` (A and AAAA), for names written in endpoint files; bounded
    /// in time like every lookup here.
    pub(crate) async fn addresses(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        match tokio::time::timeout(LOOKUP_DEADLINE, self.resolve_host(host, port)).await {
            Ok(Ok(answer)) => Ok(answer.endpoints.into_iter().map(|e| e.addr).collect()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("{host}: timed out")),
        }
    }

    /// What `query` finds now.
    async fn resolve(&self, query: &Query) -> Result<Answer, LookupError> {
        match query {
            Query::Host { host, port } => self.resolve_host(host, *port).await,
            Query::Srv(name) => self.resolve_srv(name).await,
        }
    }

    /// A/AAAA addresses of `host`, each with `port`, sorted, and how long they are valid.
    async fn resolve_host(&self, host: &str, port: u16) -> Result<Answer, LookupError> {
        let (ips, ttl) = lookup_ip(&self.resolver, host).await?;
        Ok(Answer {
            endpoints: address_endpoints(ips, port),
            ttl,
        })
    }

    /// The endpoints an SRV name points at, with weights and backup tiers.
    async fn resolve_srv(&self, name: &str) -> Result<Answer, LookupError> {
        let lookup = bounded(name, self.resolver.srv_lookup(name)).await?;
        let mut ttl = remaining(lookup.valid_until());
        let records = srv_records(lookup.answers());
        if records.is_empty() {
            return Err(LookupError::NoRecords {
                name: name.to_string(),
            });
        }

        // Addresses the server volunteered in the additional section, by host.
        let mut targets: Vec<SrvTarget> = Vec::with_capacity(records.len());
        let mut pending: JoinSet<(usize, HostAddresses)> = JoinSet::new();
        for (index, (priority, weight, port, host)) in records.into_iter().enumerate() {
            let (addresses, additional_ttl) = additional_addresses(lookup.additionals(), &host);
            if addresses.is_empty() {
                let resolver = self.resolver.clone();
                let host = host.to_string();
                pending.spawn(async move { (index, lookup_ip(&resolver, &host).await) });
            } else if let Some(additional_ttl) = additional_ttl {
                ttl = ttl.min(additional_ttl);
            }
            targets.push(SrvTarget {
                priority,
                weight,
                port,
                host: host.to_string(),
                addresses,
            });
        }
        while let Some(joined) = pending.join_next().await {
            let (index, result) = joined.map_err(|error| LookupError::Other {
                name: name.to_string(),
                message: format!("target lookup task failed: {error}"),
            })?;
            match result {
                Ok((addresses, host_ttl)) => {
                    targets[index].addresses = addresses;
                    ttl = ttl.min(host_ttl);
                }
                Err(error @ (LookupError::NxDomain { .. } | LookupError::NoRecords { .. })) => {
                    // Authoritatively no address: leave the target out (its list stays empty).
                    tracing::warn!(srv = %name, %error, "SRV target has no address; skipped");
                }
                // A transient failure must not drop endpoints: fail the whole refresh.
                Err(error) => return Err(error),
            }
        }
        let endpoints = srv_endpoints(&targets);
        if endpoints.is_empty() {
            return Err(LookupError::NoAddresses {
                name: name.to_string(),
            });
        }
        Ok(Answer { endpoints, ttl })
    }

    /// When to look again after a successful answer valid for `ttl`.
    fn refresh_after(&self, ttl: Duration) -> Duration {
        with_jitter(clamp_ttl(ttl, self.min_ttl, self.max_ttl))
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.max_ttl.min(BACKOFF_MAX))
    }
}

/// One server entry per `[dns] servers` address, UDP with TCP beside it.
fn name_servers(servers: &[SocketAddr]) -> ResolverConfig {
    let name_servers = servers
        .iter()
        .map(|server| {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            NameServerConfig::new(server.ip(), true, vec![udp, tcp])
        })
        .collect();
    ResolverConfig::from_parts(None, Vec::new(), name_servers)
}

/// What a target looks up.
#[derive(Debug)]
enum Query {
    /// A and AAAA records of `host`, each address with `port` (`dns:HOST:PORT`, `HOST:PORT`).
    Host { host: String, port: u16 },
    /// SRV records of a name, each target's addresses with the record's port (`srv:NAME`).
    Srv(String),
}

/// A successful lookup: the endpoints and how long the answer is valid (unclamped).
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    endpoints: Vec<EndpointSpec>,
    ttl: Duration,
}

/// Why a lookup failed, in words short enough for `/ready`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum LookupError {
    #[error("{name}: NXDOMAIN")]
    NxDomain { name: String },
    #[error("{name}: no records")]
    NoRecords { name: String },
    #[error("{name}: {rcode}")]
    Rcode { name: String, rcode: String },
    #[error("{name}: timed out")]
    Timeout { name: String },
    #[error("{name}: no SRV target has an address")]
    NoAddresses { name: String },
    #[error("{name}: {message}")]
    Other { name: String, message: String },
}

impl LookupError {
    fn from_net(name: &str, error: &NetError) -> LookupError {
        let name = name.to_string();
        match error {
            NetError::Dns(DnsError::NoRecordsFound(no_records)) => {
                if no_records.response_code == ResponseCode::NXDomain {
                    LookupError::NxDomain { name }
                } else if no_records.response_code == ResponseCode::NoError {
                    LookupError::NoRecords { name }
                } else {
                    LookupError::Rcode {
                        name,
                        rcode: rcode_name(no_records.response_code),
                    }
                }
            }
            NetError::Dns(DnsError::ResponseCode(code)) => LookupError::Rcode {
                name,
                rcode: rcode_name(*code),
            },
            NetError::Timeout => LookupError::Timeout { name },
            other => LookupError::Other {
                name,
                message: other.to_string(),
            },
        }
    }

    /// A short label for logs: `nxdomain`, `servfail`, `timeout`, ...
    pub(crate) fn kind(&self) -> String {
        match self {
            LookupError::NxDomain { .. } => "nxdomain".into(),
            LookupError::NoRecords { .. } => "no_records".into(),
            LookupError::Rcode { rcode, .. } => rcode.to_ascii_lowercase(),
            LookupError::Timeout { .. } => "timeout".into(),
            LookupError::NoAddresses { .. } => "no_addresses".into(),
            LookupError::Other { .. } => "error".into(),
        }
    }
}

/// The RFC mnemonic (`SERVFAIL`, `REFUSED`, ...) rather than hickory's prose.
fn rcode_name(code: ResponseCode) -> String {
    format!("{code:?}").to_ascii_uppercase()
}

/// Run one resolver call under [`LOOKUP_DEADLINE`].
async fn bounded<T>(
    name: &str,
    lookup: impl std::future::Future<Output = Result<T, NetError>>,
) -> Result<T, LookupError> {
    match tokio::time::timeout(LOOKUP_DEADLINE, lookup).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(error)) => Err(LookupError::from_net(name, &error)),
        Err(_) => Err(LookupError::Timeout {
            name: name.to_string(),
        }),
    }
}

/// A host's addresses (sorted) and how long they are valid.
type HostAddresses = Result<(Vec<IpAddr>, Duration), LookupError>;

/// Both families of `host`; an answer without any address is "no records".
async fn lookup_ip(resolver: &TokioResolver, host: &str) -> HostAddresses {
    let lookup = bounded(host, resolver.lookup_ip(host)).await?;
    let mut addresses: Vec<IpAddr> = lookup.iter().collect();
    if addresses.is_empty() {
        return Err(LookupError::NoRecords {
            name: host.to_string(),
        });
    }
    addresses.sort();
    addresses.dedup();
    Ok((addresses, remaining(lookup.valid_until())))
}

/// A host's addresses, each with `port`: sorted, each address once.
fn address_endpoints(ips: impl IntoIterator<Item = IpAddr>, port: u16) -> Vec<EndpointSpec> {
    let mut endpoints: Vec<EndpointSpec> = ips
        .into_iter()
        .map(|ip| EndpointSpec::plain(SocketAddr::new(ip, port)))
        .collect();
    endpoints.sort_by_key(|spec| spec.addr);
    endpoints.dedup_by_key(|spec| spec.addr);
    endpoints
}

/// An SRV answer's records as (priority, weight, port, target), sorted; a target of `.`
/// ("service not available here") and other record types are left out.
fn srv_records(answers: &[Record]) -> Vec<(u16, u16, u16, Name)> {
    let mut records: Vec<(u16, u16, u16, Name)> = answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::SRV(srv) if !srv.target.is_root() => {
                Some((srv.priority, srv.weight, srv.port, srv.target.clone()))
            }
            _ => None,
        })
        .collect();
    records.sort();
    records
}

/// The endpoints one DNS response gives by itself, with no further lookups: the A/AAAA
/// answers with `port`, or, for an SRV answer, each target with the addresses the
/// additional section carries for it. The same functions as a live lookup, so the
/// `dns_answer` fuzz target (`fuzz/`) drives them with server-chosen bytes.
#[doc(hidden)]
pub(crate) fn endpoints_from_response(
    answers: &[Record],
    additionals: &[Record],
    port: u16,
) -> Vec<EndpointSpec> {
    let records = srv_records(answers);
    let mut endpoints = if records.is_empty() {
        address_endpoints(
            answers.iter().filter_map(|record| record.data.ip_addr()),
            port,
        )
    } else {
        let targets: Vec<SrvTarget> = records
            .into_iter()
            .map(|(priority, weight, port, host)| SrvTarget {
                priority,
                weight,
                port,
                addresses: additional_addresses(additionals, &host).0,
                host: host.to_string(),
            })
            .collect();
        srv_endpoints(&targets)
    };
    endpoints.truncate(MAX_ENDPOINTS);
    endpoints
}

/// A/AAAA records for `host` in an additional section, and their smallest TTL.
fn additional_addresses(additionals: &[Record], host: &Name) -> (Vec<IpAddr>, Option<Duration>) {
    let mut addresses = Vec::new();
    let mut ttl: Option<Duration> = None;
    for record in additionals {
        if record.name != *host {
            continue;
        }
        if let Some(ip) = record.data.ip_addr() {
            if !addresses.contains(&ip) {
                addresses.push(ip);
            }
            let record_ttl = Duration::from_secs(u64::from(record.ttl));
            ttl = Some(ttl.map_or(record_ttl, |ttl| ttl.min(record_ttl)));
        }
    }
    addresses.sort();
    (addresses, ttl)
}

fn remaining(valid_until: Instant) -> Duration {
    valid_until.saturating_duration_since(Instant::now())
}

/// One SRV record with the addresses of its target host.
#[derive(Debug, Clone, PartialEq)]
struct SrvTarget {
    priority: u16,
    weight: u16,
    port: u16,
    host: String,
    addresses: Vec<IpAddr>,
}

/// RFC 2782 records → endpoints: the lowest priority is the primary tier, every higher
/// one is `backup`; weight 0 counts as 1; ordered by priority, then address; an address
/// listed twice keeps its first (lowest-priority) entry.
fn srv_endpoints(targets: &[SrvTarget]) -> Vec<EndpointSpec> {
    let Some(primary) = targets
        .iter()
        .filter(|target| !target.addresses.is_empty())
        .map(|target| target.priority)
        .min()
    else {
        return Vec::new();
    };
    let mut entries: Vec<(u16, EndpointSpec)> = Vec::new();
    for target in targets {
        for ip in &target.addresses {
            entries.push((
                target.priority,
                EndpointSpec {
                    addr: SocketAddr::new(*ip, target.port),
                    weight: u32::from(target.weight.max(1)),
                    backup: target.priority > primary,
                },
            ));
        }
    }
    entries.sort_by_key(|(priority, spec)| (*priority, spec.addr));
    let mut endpoints: Vec<EndpointSpec> = Vec::with_capacity(entries.len());
    for (_, spec) in entries {
        if !endpoints.iter().any(|kept| kept.addr == spec.addr) {
            endpoints.push(spec);
        }
    }
    endpoints
}

/// `ttl` within `min`..`max` (and never under [`MIN_REFRESH`]).
fn clamp_ttl(ttl: Duration, min: Duration, max: Duration) -> Duration {
    let min = min.max(MIN_REFRESH);
    let max = max.max(min);
    ttl.clamp(min, max)
}

/// `delay` plus up to 10% of it (at most 250ms) at random.
fn with_jitter(delay: Duration) -> Duration {
    let spread = (delay / 10).min(Duration::from_millis(250));
    delay + spread.mul_f64(fastrand::f64())
}

/// Exponential back-off between failed lookups: 250ms, 500ms, 1s ... up to `max`, each
/// delay shortened by up to a quarter at random so many targets don't retry together, but
/// never under [`MIN_REFRESH`] (a name flapping between good and failed answers is asked
/// no more often than one that answers).
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(max: Duration) -> Backoff {
        Backoff {
            next: BACKOFF_START,
            max: max.max(BACKOFF_START),
        }
    }

    /// The delay before the next retry, without jitter, and advance.
    fn step(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.step();
        (delay - (delay / 4).mul_f64(fastrand::f64())).max(MIN_REFRESH)
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START;
    }
}

/// What one target's task remembers between lookups.
struct Refresh {
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    target: String,
    /// The answer in use, `None` until the first success.
    last: Option<Vec<EndpointSpec>>,
    /// The error of the current failing streak, so it is logged once.
    failing: Option<LookupError>,
    /// The last answer was cut to [`MAX_ENDPOINTS`], so the warning is logged once.
    truncated: bool,
    backoff: Backoff,
}

impl Refresh {
    fn new(
        resolver: &DnsResolver,
        listener: Arc<ListenerState>,
        shared: Arc<Shared>,
        target: String,
    ) -> Refresh {
        Refresh {
            listener,
            shared,
            target,
            last: None,
            failing: None,
            truncated: false,
            backoff: resolver.backoff(),
        }
    }

    /// Apply one lookup's outcome; returns how long to wait before the next lookup.
    fn apply(&mut self, resolver: &DnsResolver, outcome: Result<Answer, LookupError>) -> Duration {
        match outcome {
            // The lookups already turn an answer without addresses into an error; this keeps
            // the policy in one place whatever a lookup returns: DNS never empties a set.
            Ok(answer) if answer.endpoints.is_empty() => {
                self.failed(LookupError::NoRecords {
                    name: self.target.clone(),
                });
                self.backoff.next_delay()
            }
            Ok(answer) => {
                let wait = resolver.refresh_after(answer.ttl);
                self.succeeded(answer.endpoints);
                wait
            }
            Err(error) => {
                self.failed(error);
                self.backoff.next_delay()
            }
        }
    }

    fn succeeded(&mut self, mut endpoints: Vec<EndpointSpec>) {
        self.backoff.reset();
        if endpoints.len() > MAX_ENDPOINTS {
            self.listener.metrics.dns_truncated.inc();
            if !self.truncated {
                tracing::warn!(
                    listener = %self.listener.name,
                    target = %self.target,
                    answered = endpoints.len(),
                    kept = MAX_ENDPOINTS,
                    "DNS answer too large; extra addresses dropped (counted in legate_dns_truncated_total)"
                );
                self.truncated = true;
            }
            endpoints.truncate(MAX_ENDPOINTS);
        } else if self.truncated {
            tracing::info!(
                listener = %self.listener.name,
                target = %self.target,
                answered = endpoints.len(),
                "DNS answer fits again; no address dropped"
            );
            self.truncated = false;
        }
        let recovered = self.failing.take();
        let new_answer = self.last.as_ref() != Some(&endpoints);
        if new_answer {
            self.shared.metrics.reload("dns", true);
            tracing::info!(
                listener = %self.listener.name,
                target = %self.target,
                endpoints = %show_endpoints(&endpoints),
                "DNS answer changed"
            );
        }
        if let Some(error) = recovered {
            tracing::info!(
                listener = %self.listener.name,
                target = %self.target,
                after = %error,
                "DNS lookup succeeded again"
            );
        }
        let published = self
            .listener
            .endpoints
            .update(&self.target, endpoints.clone());
        self.last = Some(endpoints);
        // The published set or the target's error changed: /ready may answer differently.
        if published || new_answer {
            self.shared.readiness_changed.notify_one();
        }
    }

    fn failed(&mut self, error: LookupError) {
        self.shared.metrics.reload("dns", false);
        self.listener
            .endpoints
            .source_failed(&self.target, format!("DNS lookup failed: {error}"));
        if self.failing.as_ref() == Some(&error) {
            tracing::debug!(listener = %self.listener.name, target = %self.target, %error, "DNS lookup failed again");
            return;
        }
        if self.last.is_some() {
            tracing::warn!(
                listener = %self.listener.name,
                target = %self.target,
                reason = %error.kind(),
                %error,
                "DNS lookup failed; keeping the last good answer"
            );
        } else {
            tracing::warn!(
                listener = %self.listener.name,
                target = %self.target,
                reason = %error.kind(),
                %error,
                "DNS lookup failed; target not resolved yet, retrying"
            );
        }
        self.failing = Some(error);
        self.shared.readiness_changed.notify_one();
    }
}

fn show_endpoints(endpoints: &[EndpointSpec]) -> String {
    let shown: Vec<String> = endpoints
        .iter()
        .take(8)
        .map(|spec| {
            let mut text = spec.addr.to_string();
            if spec.weight != 1 {
                text.push_str(&format!(" weight={}", spec.weight));
            }
            if spec.backup {
                text.push_str(" backup");
            }
            text
        })
        .collect();
    let mut text = shown.join(", ");
    if endpoints.len() > shown.len() {
        text.push_str(&format!(", ... ({} in all)", endpoints.len()));
    }
    text
}

/// Keep `target` (an A/AAAA name) resolved into `listener`'s endpoints until cancelled.
pub(crate) async fn run(
    resolver: Arc<DnsResolver>,
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    target: String,
    host: String,
    port: u16,
    token: CancellationToken,
) {
    let refresh = Refresh::new(&resolver, listener, shared, target);
    keep_resolved(resolver, Query::Host { host, port }, refresh, token).await;
}

/// Keep `target` (an SRV name) resolved into `listener`'s endpoints until cancelled.
pub(crate) async fn run_srv(
    resolver: Arc<DnsResolver>,
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    target: String,
    name: String,
    token: CancellationToken,
) {
    let refresh = Refresh::new(&resolver, listener, shared, target);
    keep_resolved(resolver, Query::Srv(name), refresh, token).await;
}

/// The one loop behind every DNS target: look up, apply the outcome, wait as long as it
/// says, until cancelled.
async fn keep_resolved(
    resolver: Arc<DnsResolver>,
    query: Query,
    mut refresh: Refresh,
    token: CancellationToken,
) {
    loop {
        let outcome = tokio::select! {
            _ = token.cancelled() => return,
            outcome = resolver.resolve(&query) => outcome,
        };
        let wait = refresh.apply(&resolver, outcome);
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    fn target(priority: u16, weight: u16, port: u16, ips: &[[u8; 4]]) -> SrvTarget {
        SrvTarget {
            priority,
            weight,
            port,
            host: format!("host{port}.test."),
            addresses: ips.iter().map(|ip| IpAddr::from(*ip)).collect(),
        }
    }

    fn spec(ip: [u8; 4], port: u16, weight: u32, backup: bool) -> EndpointSpec {
        EndpointSpec {
            addr: SocketAddr::from((ip, port)),
            weight,
            backup,
        }
    }

    #[test]
    fn ttl_is_clamped_to_min_and_max() {
        let (min, max) = (Duration::from_secs(1), Duration::from_secs(300));
        assert_eq!(clamp_ttl(Duration::ZERO, min, max), min);
        assert_eq!(clamp_ttl(ms(400), min, max), min);
        assert_eq!(
            clamp_ttl(Duration::from_secs(30), min, max),
            Duration::from_secs(30)
        );
        assert_eq!(clamp_ttl(Duration::from_secs(86_400), min, max), max);
    }

    #[test]
    fn refresh_has_a_floor_even_with_zero_min_ttl() {
        assert_eq!(
            clamp_ttl(Duration::ZERO, Duration::ZERO, Duration::from_secs(5)),
            MIN_REFRESH
        );
        // A max below the floor cannot produce an inverted range.
        assert_eq!(clamp_ttl(ms(10), Duration::ZERO, ms(100)), MIN_REFRESH);
    }

    #[test]
    fn jitter_is_small_and_never_negative() {
        for _ in 0..1000 {
            let second = with_jitter(Duration::from_secs(1));
            assert!(
                second >= Duration::from_secs(1) && second <= ms(1100),
                "{second:?}"
            );
            let hour = with_jitter(Duration::from_secs(3600));
            assert!(hour <= Duration::from_secs(3600) + ms(250), "{hour:?}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let steps: Vec<Duration> = (0..7).map(|_| backoff.step()).collect();
        assert_eq!(
            steps,
            [
                ms(250),
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(5000),
                ms(5000)
            ]
        );
        backoff.reset();
        assert_eq!(backoff.step(), ms(250));
    }

    #[test]
    fn backoff_cap_is_max_ttl_or_30s_and_jitter_stays_below_the_step() {
        let resolver_cap = Duration::from_secs(300).min(BACKOFF_MAX);
        let mut backoff = Backoff::new(resolver_cap);
        for _ in 0..20 {
            backoff.step();
        }
        assert_eq!(backoff.step(), Duration::from_secs(30));
        let mut backoff = Backoff::new(ms(100));
        assert_eq!(backoff.step(), BACKOFF_START);
        assert_eq!(backoff.step(), BACKOFF_START);
        let mut backoff = Backoff::new(Duration::from_secs(30));
        for expected in [250, 500, 1000, 2000] {
            let delay = backoff.next_delay();
            assert!(
                delay <= ms(expected) && delay >= ms(expected * 3 / 4),
                "{delay:?}"
            );
        }
    }

    #[test]
    fn backoff_never_goes_under_the_refresh_floor() {
        let mut backoff = Backoff::new(Duration::from_secs(30));
        for _ in 0..1000 {
            assert!(backoff.next_delay() >= MIN_REFRESH);
            backoff.reset();
        }
    }

    /// A listener with one target, and a `Refresh` feeding it, as `run` builds them.
    fn refresh_for_one_target() -> (Refresh, DnsResolver, Arc<Shared>) {
        let shared = Arc::new(Shared::new(None));
        let seed = SocketAddr::from(([192, 0, 2, 1], 6379));
        let upstream = crate::config::Target::Static(seed);
        let target = upstream.to_string();
        let config = crate::config::ListenerConfig::with_defaults(
            "dns".into(),
            SocketAddr::from(([127, 0, 0, 1], 6380)),
            vec![upstream],
        );
        let token = CancellationToken::new();
        let listener = Arc::new(ListenerState::new(
            config,
            Default::default(),
            &shared.metrics,
            &token,
            &token,
        ));
        let resolver = DnsResolver::new(&DnsConfig {
            servers: vec![SocketAddr::from(([127, 0, 0, 1], 9))],
            min_ttl: Duration::ZERO,
            max_ttl: Duration::from_secs(5),
        })
        .unwrap();
        let refresh = Refresh::new(&resolver, listener, Arc::clone(&shared), target);
        (refresh, resolver, shared)
    }

    fn answer(count: usize) -> Answer {
        Answer {
            endpoints: address_endpoints(
                (0..count).map(|i| IpAddr::from([127, 1, (i / 250) as u8, (i % 250 + 1) as u8])),
                7000,
            ),
            ttl: Duration::ZERO,
        }
    }

    fn dns_reloads(shared: &Shared, result: &str) -> u64 {
        shared
            .metrics
            .reloads
            .with_label_values(&["dns", result])
            .get()
    }

    #[tokio::test]
    async fn an_empty_answer_keeps_the_last_good_set_and_counts_an_error() {
        let (mut refresh, resolver, shared) = refresh_for_one_target();
        refresh.apply(&resolver, Ok(answer(3)));
        assert_eq!(refresh.listener.endpoints.load().endpoints.len(), 3);
        assert_eq!(dns_reloads(&shared, "error"), 0);
        let wait = refresh.apply(&resolver, Ok(answer(0)));
        assert!(wait >= MIN_REFRESH, "{wait:?}");
        assert_eq!(refresh.listener.endpoints.load().endpoints.len(), 3);
        assert_eq!(refresh.last.as_ref().map(Vec::len), Some(3));
        assert_eq!(dns_reloads(&shared, "error"), 1);
        let sources = refresh.listener.endpoints.sources();
        assert!(
            sources[0]
                .error
                .as_deref()
                .is_some_and(|error| error.contains("no records")),
            "{sources:?}"
        );
        // The lookup's own "no records" error takes the same path.
        refresh.apply(
            &resolver,
            Err(LookupError::NoRecords {
                name: "x.test".into(),
            }),
        );
        assert_eq!(refresh.listener.endpoints.load().endpoints.len(), 3);
        assert_eq!(dns_reloads(&shared, "error"), 2);
    }

    #[tokio::test]
    async fn an_oversized_answer_is_capped_and_every_capped_lookup_is_counted() {
        fn refresh_truncated(refresh: &Refresh) -> u64 {
            refresh.listener.metrics.dns_truncated.get()
        }
        let (mut refresh, resolver, _shared) = refresh_for_one_target();
        refresh.apply(&resolver, Ok(answer(MAX_ENDPOINTS)));
        assert_eq!(refresh_truncated(&refresh), 0);
        assert!(!refresh.truncated);
        refresh.apply(&resolver, Ok(answer(1100)));
        let set = refresh.listener.endpoints.load();
        assert_eq!(set.endpoints.len(), MAX_ENDPOINTS);
        // The lowest addresses are kept, so each refresh keeps the same ones.
        assert_eq!(set.endpoints[0].addr, answer(1).endpoints[0].addr);
        assert_eq!(refresh_truncated(&refresh), 1);
        assert!(refresh.truncated);
        refresh.apply(&resolver, Ok(answer(1100)));
        assert_eq!(refresh_truncated(&refresh), 2);
        // A failure in between keeps the capped set and the state.
        refresh.apply(
            &resolver,
            Err(LookupError::Timeout {
                name: "x.test".into(),
            }),
        );
        assert!(refresh.truncated);
        assert_eq!(
            refresh.listener.endpoints.load().endpoints.len(),
            MAX_ENDPOINTS
        );
        refresh.apply(&resolver, Ok(answer(2)));
        assert!(!refresh.truncated);
        assert_eq!(refresh_truncated(&refresh), 2);
        assert_eq!(refresh.listener.endpoints.load().endpoints.len(), 2);
    }

    #[test]
    fn srv_same_priority_shares_the_primary_tier_with_weights() {
        let endpoints = srv_endpoints(&[
            target(10, 60, 6379, &[[10, 0, 0, 2]]),
            target(10, 20, 6380, &[[10, 0, 0, 1]]),
        ]);
        assert_eq!(
            endpoints,
            [
                spec([10, 0, 0, 1], 6380, 20, false),
                spec([10, 0, 0, 2], 6379, 60, false)
            ]
        );
    }

    #[test]
    fn srv_higher_priorities_become_backups_in_priority_order() {
        let endpoints = srv_endpoints(&[
            target(30, 1, 3, &[[10, 0, 0, 3]]),
            target(5, 1, 1, &[[10, 0, 0, 9]]),
            target(20, 1, 2, &[[10, 0, 0, 2]]),
        ]);
        assert_eq!(
            endpoints,
            [
                spec([10, 0, 0, 9], 1, 1, false),
                spec([10, 0, 0, 2], 2, 1, true),
                spec([10, 0, 0, 3], 3, 1, true)
            ]
        );
    }

    #[test]
    fn srv_zero_weight_counts_as_one() {
        let endpoints = srv_endpoints(&[target(0, 0, 1, &[[10, 0, 0, 1]])]);
        assert_eq!(endpoints, [spec([10, 0, 0, 1], 1, 1, false)]);
    }

    #[test]
    fn srv_primary_tier_is_the_lowest_priority_that_has_addresses() {
        // The priority-1 host has no address: priority 2 is what gets traffic.
        let endpoints = srv_endpoints(&[
            target(1, 1, 1, &[]),
            target(2, 5, 2, &[[10, 0, 0, 2], [10, 0, 0, 1]]),
        ]);
        assert_eq!(
            endpoints,
            [
                spec([10, 0, 0, 1], 2, 5, false),
                spec([10, 0, 0, 2], 2, 5, false)
            ]
        );
        assert!(srv_endpoints(&[target(1, 1, 1, &[])]).is_empty());
    }

    #[test]
    fn srv_address_in_two_tiers_keeps_the_primary_entry() {
        let endpoints = srv_endpoints(&[
            target(2, 9, 7000, &[[10, 0, 0, 1]]),
            target(1, 3, 7000, &[[10, 0, 0, 1]]),
        ]);
        assert_eq!(endpoints, [spec([10, 0, 0, 1], 7000, 3, false)]);
    }

    #[test]
    fn srv_ipv6_targets_keep_the_port() {
        let mut v6 = target(0, 1, 443, &[]);
        v6.addresses = vec!["::1".parse().unwrap()];
        let endpoints = srv_endpoints(&[v6]);
        assert_eq!(endpoints[0].addr, "[::1]:443".parse().unwrap());
    }

    #[test]
    fn rcodes_read_as_their_mnemonics() {
        assert_eq!(rcode_name(ResponseCode::ServFail), "SERVFAIL");
        assert_eq!(rcode_name(ResponseCode::Refused), "REFUSED");
        assert_eq!(rcode_name(ResponseCode::NXDomain), "NXDOMAIN");
        let error = LookupError::from_net(
            "x.test",
            &NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail)),
        );
        assert_eq!(error.to_string(), "x.test: SERVFAIL");
        assert_eq!(error.kind(), "servfail");
        let error = LookupError::from_net("x.test", &NetError::Timeout);
        assert_eq!(error.to_string(), "x.test: timed out");
    }

    #[test]
    fn additional_section_addresses_match_the_host_only() {
        let host = Name::from_ascii("a.test.").unwrap();
        let other = Name::from_ascii("b.test.").unwrap();
        let records = [
            Record::from_rdata(host.clone(), 7, RData::A(Ipv4Addr::new(10, 0, 0, 2).into())),
            Record::from_rdata(other, 1, RData::A(Ipv4Addr::new(10, 0, 0, 9).into())),
            Record::from_rdata(host.clone(), 3, RData::A(Ipv4Addr::new(10, 0, 0, 1).into())),
        ];
        let (addresses, ttl) = additional_addresses(&records, &host);
        assert_eq!(
            addresses,
            [IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2])]
        );
        assert_eq!(ttl, Some(Duration::from_secs(3)));
    }
}
