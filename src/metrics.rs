//! Prometheus metrics: one `Metrics` value owns its own `Registry` (never a global),
//! so two proxies in one process — as in tests — never collide.
//!
//! Names live here as constants and match the README's Metrics table exactly. Hot paths never look a
//! label up per chunk: each listener resolves its label handles once (`ListenerMetrics`).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

const CONNECTIONS_TOTAL: &str = "legate_connections_total";
const CONNECTIONS_ACTIVE: &str = "legate_connections_active";
const CONNECTIONS_REJECTED_TOTAL: &str = "legate_connections_rejected_total";
const LAST_RESORT_CONNECTIONS_TOTAL: &str = "legate_last_resort_connections_total";
const BYTES_TOTAL: &str = "legate_bytes_total";
const SPLICE_BYTES_TOTAL: &str = "legate_splice_bytes_total";
const UPSTREAM_CONNECT_SECONDS: &str = "legate_upstream_connect_seconds";
const UPSTREAM_CONNECT_FAILURES_TOTAL: &str = "legate_upstream_connect_failures_total";
const UPSTREAM_CONNECT_ERRORS_TOTAL: &str = "legate_upstream_connect_errors_total";
const RESETS_TOTAL: &str = "legate_resets_total";
const IDLE_TIMEOUTS_TOTAL: &str = "legate_idle_timeouts_total";
const ACCEPT_ERRORS_TOTAL: &str = "legate_accept_errors_total";
const ENDPOINTS: &str = "legate_endpoints";
const RELOADS_TOTAL: &str = "legate_reloads_total";
const READY: &str = "legate_ready";
const TLS_CERT_EXPIRY: &str = "legate_tls_cert_expiry_timestamp_seconds";
const HEALTH_CHECKS_TOTAL: &str = "legate_health_checks_total";
const PANICS_TOTAL: &str = "legate_panics_total";
const TLS_HANDSHAKE_ERRORS_TOTAL: &str = "legate_tls_handshake_errors_total";
const TLS_HANDSHAKE_SECONDS: &str = "legate_tls_handshake_seconds";
const DNS_TRUNCATED_TOTAL: &str = "legate_dns_truncated_total";
const HANDOFFS_TOTAL: &str = "legate_handoffs_total";

/// Panics anywhere in the process. A panic hook has no way to reach a `Metrics`
/// instance, and a panic is a process-wide event anyway, so this one count is global;
/// every registry reports it (`legate_panics_total`).
static PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Count panics and log them; the previous hook (which prints the message) still runs.
/// A panicking connection task is dropped by the runtime and its guards release its
/// counts, so the listener keeps serving.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(panic = %info, "a task panicked (a bug: please report it); legate keeps serving");
        previous(info);
    }));
}

/// Why a client connection was closed without being forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RejectReason {
    NoEndpoint,
    MaxConnections,
    ConnectFailed,
}

impl RejectReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RejectReason::NoEndpoint => "no_endpoint",
            RejectReason::MaxConnections => "max_connections",
            RejectReason::ConnectFailed => "connect_failed",
        }
    }
}

pub(crate) struct Metrics {
    registry: Registry,
    connections_total: IntCounterVec,
    connections_active: IntGaugeVec,
    connections_rejected: IntCounterVec,
    last_resort: IntCounterVec,
    bytes_total: IntCounterVec,
    splice_bytes: IntCounterVec,
    connect_seconds: HistogramVec,
    connect_failures: IntCounterVec,
    connect_errors: IntCounterVec,
    resets: IntCounterVec,
    idle_timeouts: IntCounterVec,
    accept_errors: IntCounterVec,
    health_checks: IntCounterVec,
    tls_handshake_errors: IntCounterVec,
    tls_handshake_seconds: HistogramVec,
    dns_truncated: IntCounterVec,
    pub(crate) endpoints: IntGaugeVec,
    pub(crate) reloads: IntCounterVec,
    pub(crate) ready: IntGauge,
    pub(crate) tls_cert_expiry: prometheus::GaugeVec,
    pub(crate) panics: IntCounter,
    /// Socket handovers by result: `committed` (handed over), `taken` (took over),
    /// `aborted` (the newcomer went away before committing), `error`, `busy`.
    pub(crate) handoffs: IntCounterVec,
}

/// Label handles for one listener, resolved once.
#[derive(Clone)]
pub(crate) struct ListenerMetrics {
    pub(crate) connections_total: IntCounter,
    pub(crate) connections_active: IntGauge,
    rejected_no_endpoint: IntCounter,
    rejected_max_connections: IntCounter,
    rejected_connect_failed: IntCounter,
    /// Connections that dialled endpoints which were not eligible, since none was
    /// (the "last resort" rule in `proxy::connect`).
    pub(crate) last_resort: IntCounter,
    pub(crate) bytes_upstream: IntCounter,
    pub(crate) bytes_downstream: IntCounter,
    pub(crate) splice_bytes: IntCounter,
    pub(crate) connect_seconds: prometheus::Histogram,
    pub(crate) resets_from_client: IntCounter,
    pub(crate) resets_from_upstream: IntCounter,
    pub(crate) idle_timeouts: IntCounter,
    pub(crate) endpoints_healthy: IntGauge,
    pub(crate) endpoints_unhealthy: IntGauge,
    pub(crate) tls_handshake_client: prometheus::Histogram,
    pub(crate) tls_handshake_upstream: prometheus::Histogram,
    /// DNS answers (A/AAAA or SRV) cut to `discovery::dns::MAX_ENDPOINTS` addresses.
    pub(crate) dns_truncated: IntCounter,
    connect_failures: IntCounterVec,
    connect_errors: IntCounterVec,
    health_checks: IntCounterVec,
    accept_errors: IntCounterVec,
    tls_handshake_errors: IntCounterVec,
    name: String,
}

impl ListenerMetrics {
    pub(crate) fn rejected(&self, reason: RejectReason) -> &IntCounter {
        match reason {
            RejectReason::NoEndpoint => &self.rejected_no_endpoint,
            RejectReason::MaxConnections => &self.rejected_max_connections,
            RejectReason::ConnectFailed => &self.rejected_connect_failed,
        }
    }

    /// Rare (a failed dial), so the label lookup is fine here.
    pub(crate) fn connect_failure(&self, endpoint: &str) {
        self.connect_failures
            .with_label_values(&[self.name.as_str(), endpoint])
            .inc();
    }

    /// A failed dial by why it failed (`refused`, `timeout`, `unreachable`,
    /// `addr_not_available`, `fd_exhausted`, `reset`, `tls`, `other`); rare, so the label
    /// lookup is fine here.
    pub(crate) fn connect_error(&self, reason: &str) {
        self.connect_errors
            .with_label_values(&[self.name.as_str(), reason])
            .inc();
    }

    pub(crate) fn health_check(&self, result: &str) {
        self.health_checks
            .with_label_values(&[self.name.as_str(), result])
            .inc();
    }

    /// `side`: `client` (termination) or `upstream` (origination).
    pub(crate) fn tls_handshake_failed(&self, side: &str, reason: &str) {
        self.tls_handshake_errors
            .with_label_values(&[self.name.as_str(), side, reason])
            .inc();
    }

    pub(crate) fn accept_error(&self, errno: &str) {
        self.accept_errors
            .with_label_values(&[self.name.as_str(), errno])
            .inc();
    }
}

#[allow(
    clippy::expect_used,
    reason = "constant metric definitions into a fresh per-instance registry: the only failures \
              are a bad name or a name registered twice, which every test that builds a Metrics catches"
)]
fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(vec.clone()))
        .expect("metric registered once");
    vec
}

#[allow(
    clippy::expect_used,
    reason = "constant metric definitions into a fresh per-instance registry: the only failures \
              are a bad name or a name registered twice, which every test that builds a Metrics catches"
)]
fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(vec.clone()))
        .expect("metric registered once");
    vec
}

impl Metrics {
    #[allow(
        clippy::expect_used,
        reason = "constant metric definitions into a fresh per-instance registry: the only failures \
                  are a bad name or a name registered twice, which every test that builds a Metrics catches"
    )]
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            // A failure here only loses process_* series; never worth refusing to start.
            let _ = registry.register(Box::new(process));
        }
        let connect_seconds = HistogramVec::new(
            HistogramOpts::new(
                UPSTREAM_CONNECT_SECONDS,
                "Time to establish an upstream connection, including failed attempts.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0,
            ]),
            &["listener"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(connect_seconds.clone()))
            .expect("metric registered once");
        let tls_handshake_seconds = HistogramVec::new(
            HistogramOpts::new(
                TLS_HANDSHAKE_SECONDS,
                "Duration of successful TLS handshakes.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["listener", "side"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(tls_handshake_seconds.clone()))
            .expect("metric registered once");
        let ready = IntGauge::new(READY, "1 while /ready answers 200.").expect("valid metric");
        registry
            .register(Box::new(ready.clone()))
            .expect("metric registered once");
        let panics = IntCounter::new(
            PANICS_TOTAL,
            "Connection or background tasks that panicked (a bug: please report).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(panics.clone()))
            .expect("metric registered once");
        let tls_cert_expiry = prometheus::GaugeVec::new(
            Opts::new(
                TLS_CERT_EXPIRY,
                "notAfter of each certificate in use, as a Unix timestamp.",
            ),
            &["listener", "role"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(tls_cert_expiry.clone()))
            .expect("metric registered once");
        let metrics = Metrics {
            connections_total: counter_vec(
                &registry,
                CONNECTIONS_TOTAL,
                "Client connections accepted.",
                &["listener"],
            ),
            connections_active: gauge_vec(
                &registry,
                CONNECTIONS_ACTIVE,
                "Client connections open now.",
                &["listener"],
            ),
            connections_rejected: counter_vec(
                &registry,
                CONNECTIONS_REJECTED_TOTAL,
                "Client connections closed without being forwarded.",
                &["listener", "reason"],
            ),
            last_resort: counter_vec(
                &registry,
                LAST_RESORT_CONNECTIONS_TOTAL,
                "Client connections that, with no endpoint eligible only because connecting to them failed, tried those endpoints anyway.",
                &["listener"],
            ),
            bytes_total: counter_vec(
                &registry,
                BYTES_TOTAL,
                "Bytes forwarded: upstream = toward the backend, downstream = toward the client.",
                &["listener", "direction"],
            ),
            splice_bytes: counter_vec(
                &registry,
                SPLICE_BYTES_TOTAL,
                "Bytes moved with splice(2), never copied through user space (both directions).",
                &["listener"],
            ),
            connect_seconds,
            connect_failures: counter_vec(
                &registry,
                UPSTREAM_CONNECT_FAILURES_TOTAL,
                "Failed upstream connection attempts (refused, timed out, TLS failure).",
                &["listener", "endpoint"],
            ),
            connect_errors: counter_vec(
                &registry,
                UPSTREAM_CONNECT_ERRORS_TOTAL,
                "Failed upstream connection attempts by reason (refused, timeout, unreachable, addr_not_available, fd_exhausted, reset, tls, other).",
                &["listener", "reason"],
            ),
            resets: counter_vec(
                &registry,
                RESETS_TOTAL,
                "Connections reset by a peer (from = client or upstream); the other side is reset too.",
                &["listener", "from"],
            ),
            idle_timeouts: counter_vec(
                &registry,
                IDLE_TIMEOUTS_TOTAL,
                "Connections closed by idle_timeout.",
                &["listener"],
            ),
            accept_errors: counter_vec(
                &registry,
                ACCEPT_ERRORS_TOTAL,
                "accept(2) failures such as EMFILE; the listener backs off.",
                &["listener", "errno"],
            ),
            health_checks: counter_vec(
                &registry,
                HEALTH_CHECKS_TOTAL,
                "Active health checks run, by result.",
                &["listener", "result"],
            ),
            tls_handshake_errors: counter_vec(
                &registry,
                TLS_HANDSHAKE_ERRORS_TOTAL,
                "Failed TLS handshakes by side (client = termination, upstream = origination) and reason.",
                &["listener", "side", "reason"],
            ),
            tls_handshake_seconds,
            dns_truncated: counter_vec(
                &registry,
                DNS_TRUNCATED_TOTAL,
                "DNS lookups whose answer had more addresses than a target keeps (1024); the rest were dropped.",
                &["listener"],
            ),
            endpoints: gauge_vec(
                &registry,
                ENDPOINTS,
                "Endpoints per listener: healthy = eligible for traffic now.",
                &["listener", "state"],
            ),
            reloads: counter_vec(
                &registry,
                RELOADS_TOTAL,
                "Reloads of configuration, endpoint files and DNS answers.",
                &["source", "result"],
            ),
            handoffs: counter_vec(
                &registry,
                HANDOFFS_TOTAL,
                "Listening-socket handovers to or from another legate process, by result (committed, taken, aborted, error, busy).",
                &["result"],
            ),
            ready,
            tls_cert_expiry,
            panics,
            registry,
        };
        for result in ["committed", "taken", "aborted", "error", "busy"] {
            metrics.handoffs.with_label_values(&[result]);
        }
        // Series that exist from the start read 0, not absent, so alerts can use rate().
        for source in ["config", "file", "dns", "tls"] {
            for result in ["ok", "error"] {
                metrics.reloads.with_label_values(&[source, result]);
            }
        }
        metrics
    }

    pub(crate) fn listener(&self, name: &str) -> ListenerMetrics {
        ListenerMetrics {
            connections_total: self.connections_total.with_label_values(&[name]),
            connections_active: self.connections_active.with_label_values(&[name]),
            rejected_no_endpoint: self
                .connections_rejected
                .with_label_values(&[name, RejectReason::NoEndpoint.as_str()]),
            rejected_max_connections: self
                .connections_rejected
                .with_label_values(&[name, RejectReason::MaxConnections.as_str()]),
            rejected_connect_failed: self
                .connections_rejected
                .with_label_values(&[name, RejectReason::ConnectFailed.as_str()]),
            last_resort: self.last_resort.with_label_values(&[name]),
            bytes_upstream: self.bytes_total.with_label_values(&[name, "upstream"]),
            bytes_downstream: self.bytes_total.with_label_values(&[name, "downstream"]),
            splice_bytes: self.splice_bytes.with_label_values(&[name]),
            connect_seconds: self.connect_seconds.with_label_values(&[name]),
            resets_from_client: self.resets.with_label_values(&[name, "client"]),
            resets_from_upstream: self.resets.with_label_values(&[name, "upstream"]),
            idle_timeouts: self.idle_timeouts.with_label_values(&[name]),
            endpoints_healthy: self.endpoints.with_label_values(&[name, "healthy"]),
            endpoints_unhealthy: self.endpoints.with_label_values(&[name, "unhealthy"]),
            tls_handshake_client: self
                .tls_handshake_seconds
                .with_label_values(&[name, "client"]),
            tls_handshake_upstream: self
                .tls_handshake_seconds
                .with_label_values(&[name, "upstream"]),
            dns_truncated: self.dns_truncated.with_label_values(&[name]),
            connect_failures: self.connect_failures.clone(),
            connect_errors: self.connect_errors.clone(),
            health_checks: self.health_checks.clone(),
            accept_errors: self.accept_errors.clone(),
            tls_handshake_errors: self.tls_handshake_errors.clone(),
            name: name.to_string(),
        }
    }

    /// Count a reload of `source` (`config`, `file`, `dns`).
    pub(crate) fn reload(&self, source: &str, ok: bool) {
        self.reloads
            .with_label_values(&[source, if ok { "ok" } else { "error" }])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub(crate) fn render(&self) -> Vec<u8> {
        let panics = PANICS.load(std::sync::atomic::Ordering::Relaxed);
        let seen = self.panics.get();
        if panics > seen {
            self.panics.inc_by(panics - seen);
        }
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
