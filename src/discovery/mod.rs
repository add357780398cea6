//! Endpoints and endpoint sets.
//!
//! Each discovery source (fixed addresses, endpoint files, DNS) reports the endpoints of
//! one target. `Endpoints` unions a listener's targets into one immutable `EndpointSet`
//! snapshot and publishes it with `ArcSwap`; the balancer `load`s that snapshot once per
//! connection. Per-endpoint live state (health, open connections, ejection) sits in an
//! `Arc<EndpointState>` that is carried from snapshot to snapshot by address, so a
//! re-resolve or a rewritten file never resets the health of an endpoint that stays.

pub(crate) mod dns;
pub mod endpoint_file;
pub(crate) mod file;
pub(crate) mod fixed;

use crate::clock::monotonic_ms;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What the active checks last concluded about an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// Not checked yet: gets no traffic (so /startup never turns 200 before a backend answered).
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Health {
    fn from_u8(value: u8) -> Health {
        match value {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }
}

/// Passive ejection back-off: 1s, 2s, 4s ... capped at 30s.
const EJECT_BASE_MS: u64 = 1_000;
const EJECT_MAX_MS: u64 = 30_000;

/// Live state of one endpoint, shared across snapshots and with the admin server.
#[derive(Debug, Default)]
pub(crate) struct EndpointState {
    health: AtomicU8,
    /// Client connections open to this endpoint now.
    pub(crate) active: AtomicUsize,
    /// `monotonic_ms()` until which the endpoint is passively ejected; 0 = not ejected.
    ejected_until: AtomicU64,
    connect_failures_in_row: AtomicU32,
    /// A check failed on what the endpoint answered (a replica, an error reply, a refused
    /// login, a timeout after connecting) since it last passed, as opposed to failing to
    /// connect at all. Such an endpoint is never dialled as a last resort.
    ruled_out: AtomicBool,
    /// `monotonic_ms()` when the endpoint was last known good (a passing check or a
    /// successful dial); 0 = never. Orders last-resort candidates.
    last_good_ms: AtomicU64,
    passes_in_row: AtomicU32,
    failures_in_row: AtomicU32,
    /// Wall-clock time and outcome of the last active check, for `/endpoints`.
    last_check: Mutex<Option<CheckRecord>>,
    /// Extra fact from the last check, such as a Redis role.
    detail: Mutex<Option<String>>,
    /// Cancelled (and replaced by a fresh token) when the endpoint turns unhealthy under
    /// `close_on_unhealthy`; each client connection takes a clone once, after its dial.
    /// An `ArcSwap` so taking it is lock-free.
    close: ArcSwap<CancellationToken>,
}

#[derive(Debug, Clone)]
pub(crate) struct CheckRecord {
    pub(crate) at: SystemTime,
    pub(crate) error: Option<String>,
}

impl EndpointState {
    pub(crate) fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Healthy and not passively ejected: may receive a new connection now.
    pub(crate) fn is_eligible(&self, now_ms: u64) -> bool {
        self.health() == Health::Healthy && self.ejected_until.load(Ordering::Relaxed) <= now_ms
    }

    pub(crate) fn ejected_for(&self, now_ms: u64) -> Option<Duration> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until > now_ms).then(|| Duration::from_millis(until - now_ms))
    }

    /// With `check = "none"` there is no active check to wait for.
    pub(crate) fn assume_healthy(&self) {
        self.health.store(Health::Healthy as u8, Ordering::Relaxed);
    }

    /// A dial succeeded: the back-off starts over, and an ejection ends (a last-resort
    /// dial succeeds while the endpoint is still ejected).
    pub(crate) fn connect_succeeded(&self, now_ms: u64) {
        if self.connect_failures_in_row.load(Ordering::Relaxed) != 0 {
            self.connect_failures_in_row.store(0, Ordering::Relaxed);
        }
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            self.ejected_until.store(0, Ordering::Relaxed);
        }
        // Ordering is only approximate between concurrent dials, and that is all it needs.
        if self.last_good_ms.load(Ordering::Relaxed) != now_ms {
            self.last_good_ms.store(now_ms, Ordering::Relaxed);
        }
    }

    /// Not eligible, but only because connecting to it failed: ejected after failed dials
    /// while its checks pass, or unhealthy because its last check could not connect. A new
    /// connection with nothing eligible may still try it. One ruled out by what it
    /// answered (a replica, an error reply) or not checked yet is never tried this way.
    pub(crate) fn is_last_resort(&self) -> bool {
        match self.health() {
            Health::Healthy => true,
            Health::Unhealthy => !self.ruled_out.load(Ordering::Relaxed),
            Health::Unknown => false,
        }
    }

    /// When the endpoint was last known good, in `monotonic_ms()`; 0 = never.
    pub(crate) fn last_good_ms(&self) -> u64 {
        self.last_good_ms.load(Ordering::Relaxed)
    }

    /// A check failed: `unreachable` if it could not connect at all, else the endpoint
    /// is ruled out by what it answered until a check passes.
    pub(crate) fn note_failure(&self, unreachable: bool) {
        if !unreachable {
            self.ruled_out.store(true, Ordering::Relaxed);
        }
    }

    /// A dial failed: eject for an exponentially growing period.
    pub(crate) fn connect_failed(&self, now_ms: u64) -> Duration {
        let failures = self
            .connect_failures_in_row
            .fetch_add(1, Ordering::Relaxed)
            .min(16);
        let backoff = (EJECT_BASE_MS << failures).min(EJECT_MAX_MS);
        self.ejected_until
            .store(now_ms + backoff, Ordering::Relaxed);
        Duration::from_millis(backoff)
    }

    /// Apply one active check result with rise/fall thresholds; returns true when the
    /// health state changed.
    #[cfg(test)]
    pub(crate) fn record_check(
        &self,
        result: Result<Option<String>, String>,
        healthy_after: u32,
        unhealthy_after: u32,
    ) -> bool {
        match result {
            Ok(detail) => self.record_result(Ok(()), detail, healthy_after, unhealthy_after),
            Err(error) => self.record_result(Err(error), None, healthy_after, unhealthy_after),
        }
    }

    /// Like `record_check`, but a failure may carry a detail too (a Redis replica's
    /// role, shown in `/endpoints`).
    pub(crate) fn record_result(
        &self,
        result: Result<(), String>,
        detail: Option<String>,
        healthy_after: u32,
        unhealthy_after: u32,
    ) -> bool {
        let before = self.health();
        let (ok, error) = match result {
            Ok(()) => (true, None),
            Err(error) => (false, Some(error)),
        };
        *lock(&self.detail) = detail;
        *lock(&self.last_check) = Some(CheckRecord {
            at: SystemTime::now(),
            error,
        });
        let after = if ok {
            self.ruled_out.store(false, Ordering::Relaxed);
            self.last_good_ms.store(monotonic_ms(), Ordering::Relaxed);
            self.failures_in_row.store(0, Ordering::Relaxed);
            let passes = self.passes_in_row.fetch_add(1, Ordering::Relaxed) + 1;
            // A passing check re-admits a passively ejected endpoint at once.
            self.ejected_until.store(0, Ordering::Relaxed);
            self.connect_failures_in_row.store(0, Ordering::Relaxed);
            if before == Health::Healthy || passes >= healthy_after {
                Health::Healthy
            } else {
                before
            }
        } else {
            self.passes_in_row.store(0, Ordering::Relaxed);
            let failures = self.failures_in_row.fetch_add(1, Ordering::Relaxed) + 1;
            match before {
                Health::Healthy if failures < unhealthy_after => Health::Healthy,
                _ => Health::Unhealthy,
            }
        };
        self.health.store(after as u8, Ordering::Relaxed);
        before != after
    }

    /// The signal that closes the client connections open to this endpoint now; take it
    /// once per connection, after the dial.
    pub(crate) fn close_signal(&self) -> CancellationToken {
        CancellationToken::clone(&self.close.load())
    }

    /// Close the client connections open to this endpoint (`close_on_unhealthy`): cancel
    /// the current signal and put a fresh one in its place for later connections.
    pub(crate) fn close_connections(&self) {
        self.close.swap(Arc::new(CancellationToken::new())).cancel();
    }

    pub(crate) fn last_check(&self) -> Option<CheckRecord> {
        lock(&self.last_check).clone()
    }

    pub(crate) fn detail(&self) -> Option<String> {
        lock(&self.detail).clone()
    }
}

/// A poisoned lock only means another thread panicked mid-update of a plain value;
/// the value is still usable, so don't spread the panic.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// An endpoint as a discovery source reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EndpointSpec {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
}

impl EndpointSpec {
    pub(crate) fn plain(addr: SocketAddr) -> EndpointSpec {
        EndpointSpec {
            addr,
            weight: 1,
            backup: false,
        }
    }
}

/// One endpoint in a published snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
    /// The targets it came from, as written (`file:/x`, `dns:redis:6379`, ...).
    pub(crate) sources: Vec<Arc<str>>,
    pub(crate) state: Arc<EndpointState>,
}

/// An immutable snapshot of a listener's endpoints, in target order.
#[derive(Debug, Default)]
pub(crate) struct EndpointSet {
    pub(crate) endpoints: Vec<Endpoint>,
}

impl EndpointSet {
    pub(crate) fn healthy_count(&self, now_ms: u64) -> usize {
        self.endpoints
            .iter()
            .filter(|endpoint| endpoint.state.is_eligible(now_ms))
            .count()
    }
}

/// What one target last reported, and when.
#[derive(Debug, Clone)]
pub(crate) struct SourceStatus {
    pub(crate) target: Arc<str>,
    /// `None` until the first successful resolution or read.
    pub(crate) updated: Option<SystemTime>,
    pub(crate) error: Option<String>,
    pub(crate) endpoints: Vec<EndpointSpec>,
    /// False until the target has produced an answer once (a file that does not exist
    /// yet, a name that does not resolve yet).
    pub(crate) resolved: bool,
}

/// A listener's endpoints: the per-target answers and the published union.
pub(crate) struct Endpoints {
    published: ArcSwap<EndpointSet>,
    sources: Mutex<Vec<SourceStatus>>,
    /// Woken when the published set changes, so health checks run at once for newcomers.
    pub(crate) changed: Notify,
    /// Woken when a new set is published or any endpoint's health changes: connections
    /// waiting for a newcomer's first check listen here.
    pub(crate) health_changed: Notify,
}

impl Endpoints {
    pub(crate) fn new(targets: &[String]) -> Endpoints {
        Endpoints {
            published: ArcSwap::from_pointee(EndpointSet::default()),
            sources: Mutex::new(
                targets
                    .iter()
                    .map(|target| SourceStatus {
                        target: Arc::from(target.as_str()),
                        updated: None,
                        error: None,
                        endpoints: Vec::new(),
                        resolved: false,
                    })
                    .collect(),
            ),
            changed: Notify::new(),
            health_changed: Notify::new(),
        }
    }

    /// The current snapshot; cheap, lock-free.
    pub(crate) fn load(&self) -> Arc<EndpointSet> {
        self.published.load_full()
    }

    pub(crate) fn sources(&self) -> Vec<SourceStatus> {
        lock(&self.sources).clone()
    }

    /// Change the listener's targets (a config reload): answers of targets that stay
    /// are kept, new targets start unresolved, and the union is republished.
    pub(crate) fn set_targets(&self, targets: &[String]) {
        let mut sources = lock(&self.sources);
        let mut next: Vec<SourceStatus> = Vec::with_capacity(targets.len());
        for target in targets {
            match sources.iter().find(|s| &*s.target == target.as_str()) {
                Some(existing) => next.push(existing.clone()),
                None => next.push(SourceStatus {
                    target: Arc::from(target.as_str()),
                    updated: None,
                    error: None,
                    endpoints: Vec::new(),
                    resolved: false,
                }),
            }
        }
        *sources = next;
        let merged = merge(&sources, &self.published.load());
        if !same_endpoints(&self.published.load(), &merged) {
            self.published.store(Arc::new(merged));
            drop(sources);
            self.changed.notify_waiters();
        }
    }

    /// Record a failed resolution or read of `target`: the last good answer stays.
    pub(crate) fn source_failed(&self, target: &str, error: String) {
        let mut sources = lock(&self.sources);
        if let Some(source) = sources.iter_mut().find(|s| &*s.target == target) {
            source.error = Some(error);
        }
    }

    /// Replace what `target` reports and publish the new union if it differs.
    /// Returns true when a new snapshot was published.
    pub(crate) fn update(&self, target: &str, endpoints: Vec<EndpointSpec>) -> bool {
        let mut sources = lock(&self.sources);
        let Some(source) = sources.iter_mut().find(|s| &*s.target == target) else {
            return false;
        };
        source.updated = Some(SystemTime::now());
        source.error = None;
        source.resolved = true;
        if source.endpoints == endpoints {
            return false;
        }
        source.endpoints = endpoints;
        let next = merge(&sources, &self.published.load());
        let current = self.published.load();
        if same_endpoints(&current, &next) {
            return false;
        }
        self.published.store(Arc::new(next));
        drop(sources);
        self.changed.notify_waiters();
        self.health_changed.notify_waiters();
        true
    }
}

/// Union of all sources in target order; an address reported twice appears once (the
/// first report's weight and backup flag win, the sources are all listed). Live state is
/// reused by address from the previous snapshot.
fn merge(sources: &[SourceStatus], previous: &EndpointSet) -> EndpointSet {
    let previous: HashMap<SocketAddr, &Arc<EndpointState>> = previous
        .endpoints
        .iter()
        .map(|endpoint| (endpoint.addr, &endpoint.state))
        .collect();
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for source in sources {
        for spec in &source.endpoints {
            if let Some(existing) = endpoints.iter_mut().find(|e| e.addr == spec.addr) {
                existing.sources.push(source.target.clone());
                continue;
            }
            let state = previous
                .get(&spec.addr)
                .map(|state| Arc::clone(state))
                .unwrap_or_default();
            endpoints.push(Endpoint {
                addr: spec.addr,
                weight: spec.weight,
                backup: spec.backup,
                sources: vec![source.target.clone()],
                state,
            });
        }
    }
    EndpointSet { endpoints }
}

fn same_endpoints(a: &EndpointSet, b: &EndpointSet) -> bool {
    a.endpoints.len() == b.endpoints.len()
        && a.endpoints.iter().zip(&b.endpoints).all(|(x, y)| {
            x.addr == y.addr
                && x.weight == y.weight
                && x.backup == y.backup
                && x.sources == y.sources
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn union_keeps_state_of_endpoints_that_stay() {
        let endpoints = Endpoints::new(&["a".into(), "b".into()]);
        assert!(endpoints.update("a", vec![EndpointSpec::plain(addr(1))]));
        assert!(endpoints.update("b", vec![EndpointSpec::plain(addr(2))]));
        let first = endpoints.load();
        assert_eq!(first.endpoints.len(), 2);
        first.endpoints[0].state.assume_healthy();
        assert!(endpoints.update(
            "a",
            vec![EndpointSpec::plain(addr(1)), EndpointSpec::plain(addr(3))]
        ));
        let second = endpoints.load();
        assert_eq!(second.endpoints.len(), 3);
        assert_eq!(second.endpoints[0].state.health(), Health::Healthy);
        assert_eq!(second.endpoints[2].state.health(), Health::Unknown);
        assert!(Arc::ptr_eq(
            &first.endpoints[0].state,
            &second.endpoints[0].state
        ));
    }

    #[test]
    fn changing_targets_keeps_answers_of_those_that_stay() {
        let endpoints = Endpoints::new(&["a".into(), "b".into()]);
        endpoints.update("a", vec![EndpointSpec::plain(addr(1))]);
        endpoints.update("b", vec![EndpointSpec::plain(addr(2))]);
        endpoints.set_targets(&["b".into(), "c".into()]);
        let set = endpoints.load();
        assert_eq!(set.endpoints.len(), 1);
        assert_eq!(set.endpoints[0].addr, addr(2));
        let sources = endpoints.sources();
        assert!(sources[0].resolved && !sources[1].resolved);
    }

    #[test]
    fn unchanged_answer_publishes_nothing() {
        let endpoints = Endpoints::new(&["a".into()]);
        assert!(endpoints.update("a", vec![EndpointSpec::plain(addr(1))]));
        assert!(!endpoints.update("a", vec![EndpointSpec::plain(addr(1))]));
    }

    #[test]
    fn duplicate_address_appears_once_with_both_sources() {
        let endpoints = Endpoints::new(&["a".into(), "b".into()]);
        endpoints.update("a", vec![EndpointSpec::plain(addr(1))]);
        endpoints.update("b", vec![EndpointSpec::plain(addr(1))]);
        let set = endpoints.load();
        assert_eq!(set.endpoints.len(), 1);
        assert_eq!(set.endpoints[0].sources.len(), 2);
    }

    #[test]
    fn rise_and_fall_thresholds() {
        let state = EndpointState::default();
        assert!(state.record_check(Ok(None), 1, 2));
        assert_eq!(state.health(), Health::Healthy);
        assert!(!state.record_check(Err("refused".into()), 1, 2));
        assert_eq!(state.health(), Health::Healthy);
        assert!(state.record_check(Err("refused".into()), 1, 2));
        assert_eq!(state.health(), Health::Unhealthy);
        assert!(!state.record_check(Ok(None), 2, 2));
        assert!(state.record_check(Ok(None), 2, 2));
        assert_eq!(state.health(), Health::Healthy);
    }

    #[test]
    fn only_endpoints_that_failed_to_connect_are_last_resort() {
        let unchecked = EndpointState::default();
        assert!(!unchecked.is_last_resort(), "never checked");

        let refused = EndpointState::default();
        refused.note_failure(true);
        refused.record_check(Err("connect: refused".into()), 1, 1);
        assert!(refused.is_last_resort());

        let ejected = EndpointState::default();
        ejected.assume_healthy();
        ejected.connect_failed(1000);
        assert!(!ejected.is_eligible(1001) && ejected.is_last_resort());
        ejected.connect_succeeded(1002);
        assert!(
            ejected.is_eligible(1002),
            "a successful dial ends the ejection"
        );

        // A replica (an answer) stays ruled out even after it also stops answering,
        // until a check passes.
        let replica = EndpointState::default();
        replica.note_failure(false);
        replica.record_check(Err("role: slave".into()), 1, 1);
        assert!(!replica.is_last_resort());
        replica.note_failure(true);
        replica.record_check(Err("connect: refused".into()), 1, 1);
        assert!(!replica.is_last_resort());
        replica.record_check(Ok(None), 1, 1);
        assert!(replica.is_eligible(0) && replica.last_good_ms() > 0);
    }

    #[test]
    fn unknown_endpoint_fails_at_once() {
        let state = EndpointState::default();
        assert!(state.record_check(Err("refused".into()), 1, 3));
        assert_eq!(state.health(), Health::Unhealthy);
    }

    #[test]
    fn closing_cancels_open_connections_only() {
        let state = EndpointState::default();
        let open = state.close_signal();
        state.close_connections();
        assert!(open.is_cancelled());
        assert!(!state.close_signal().is_cancelled());
    }

    #[test]
    fn failure_keeps_its_detail() {
        let state = EndpointState::default();
        state.record_result(Err("role: slave".into()), Some("role: slave".into()), 1, 2);
        assert_eq!(state.health(), Health::Unhealthy);
        assert_eq!(state.detail().as_deref(), Some("role: slave"));
    }

    #[test]
    fn passive_ejection_backs_off_and_check_readmits() {
        let state = EndpointState::default();
        state.assume_healthy();
        assert_eq!(state.connect_failed(1000), Duration::from_secs(1));
        assert!(!state.is_eligible(1500));
        assert!(state.is_eligible(2000));
        assert_eq!(state.connect_failed(2000), Duration::from_secs(2));
        assert_eq!(state.connect_failed(2000), Duration::from_secs(4));
        assert!(!state.is_eligible(3000));
        state.record_check(Ok(None), 1, 2);
        assert!(state.is_eligible(3000));
        assert_eq!(state.connect_failed(3000), Duration::from_secs(1));
    }
}
