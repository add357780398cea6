//! Choosing an endpoint for a new connection.
//!
//! The balancer sees one `EndpointSet` snapshot and a list of endpoints already tried for
//! this connection. Candidates are the eligible (healthy, not ejected) endpoints not yet
//! tried; `backup` endpoints are candidates only while no other endpoint is. Each policy
//! lives in its own module and is a pure function of the candidates plus one counter, so
//! picking takes no lock and allocates nothing.

mod first;
mod least_conn;
mod random;
mod round_robin;

use crate::config::Balance;
use crate::discovery::{Endpoint, EndpointSet};
use std::sync::atomic::AtomicUsize;

pub(crate) struct Balancer {
    policy: Balance,
    /// Round-robin position, and the tie-breaking start for least-conn.
    next: AtomicUsize,
}

/// A candidate test over the snapshot's indices.
pub(crate) struct Candidates<'a> {
    set: &'a EndpointSet,
    tried: &'a [usize],
    now_ms: u64,
    backup_tier: bool,
}

impl<'a> Candidates<'a> {
    fn new(set: &'a EndpointSet, tried: &'a [usize], now_ms: u64) -> Candidates<'a> {
        let mut candidates = Candidates {
            set,
            tried,
            now_ms,
            backup_tier: false,
        };
        if candidates.iter().next().is_none() {
            candidates.backup_tier = true;
        }
        candidates
    }

    fn accepts(&self, index: usize, endpoint: &Endpoint) -> bool {
        endpoint.backup == self.backup_tier
            && endpoint.state.is_eligible(self.now_ms)
            && !self.tried.contains(&index)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, &'a Endpoint)> + '_ {
        self.set
            .endpoints
            .iter()
            .enumerate()
            .filter(move |(index, endpoint)| self.accepts(*index, endpoint))
    }
}

impl Balancer {
    pub(crate) fn new(policy: Balance) -> Balancer {
        Balancer {
            policy,
            next: AtomicUsize::new(0),
        }
    }

    /// The index in `set` of the endpoint to dial next, or `None` when no candidate is left.
    pub(crate) fn pick(&self, set: &EndpointSet, tried: &[usize], now_ms: u64) -> Option<usize> {
        let candidates = Candidates::new(set, tried, now_ms);
        match self.policy {
            Balance::RoundRobin => round_robin::pick(&candidates, &self.next),
            Balance::LeastConn => least_conn::pick(&candidates, &self.next),
            Balance::Random => random::pick(&candidates),
            Balance::First => first::pick(&candidates),
        }
    }
}

/// `a` carries less load per unit of weight than `b`.
fn less_loaded(a: &Endpoint, b: &Endpoint) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let load_a = a.state.active.load(Relaxed) as u128 * b.weight.max(1) as u128;
    let load_b = b.state.active.load(Relaxed) as u128 * a.weight.max(1) as u128;
    load_a < load_b
}

#[cfg(test)]
pub(crate) mod test_support {
    use crate::discovery::{Endpoint, EndpointSet, EndpointState};
    use std::net::SocketAddr;
    use std::sync::Arc;

    pub(crate) fn set(specs: &[(u32, bool, bool)]) -> EndpointSet {
        EndpointSet {
            endpoints: specs
                .iter()
                .enumerate()
                .map(|(index, &(weight, backup, healthy))| {
                    let state = EndpointState::default();
                    if healthy {
                        state.assume_healthy();
                    }
                    Endpoint {
                        addr: SocketAddr::from(([127, 0, 0, 1], 1000 + index as u16)),
                        weight,
                        backup,
                        sources: Vec::new(),
                        state: Arc::new(state),
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::set;
    use super::*;

    #[test]
    fn unhealthy_and_tried_are_skipped() {
        let set = set(&[(1, false, false), (1, false, true), (1, false, true)]);
        for policy in [
            Balance::RoundRobin,
            Balance::LeastConn,
            Balance::Random,
            Balance::First,
        ] {
            let balancer = Balancer::new(policy);
            for _ in 0..20 {
                assert_eq!(balancer.pick(&set, &[1], 1), Some(2), "{policy:?}");
            }
            assert_eq!(balancer.pick(&set, &[1, 2], 1), None, "{policy:?}");
        }
    }

    #[test]
    fn backup_only_when_no_primary_is_eligible() {
        let set = set(&[(1, false, true), (1, true, true)]);
        let balancer = Balancer::new(Balance::RoundRobin);
        for _ in 0..10 {
            assert_eq!(balancer.pick(&set, &[], 1), Some(0));
        }
        assert_eq!(balancer.pick(&set, &[0], 1), Some(1));
    }

    #[test]
    fn empty_set_has_no_pick() {
        let set = set(&[]);
        assert_eq!(Balancer::new(Balance::First).pick(&set, &[], 1), None);
    }
}
