//! Least connections per unit of weight; ties are broken by a rotating start so equal
//! endpoints share new connections instead of the first one taking them all.
use super::{less_loaded, Candidates};
use std::sync::atomic::{AtomicUsize, Ordering};

pub(super) fn pick(candidates: &Candidates<'_>, next: &AtomicUsize) -> Option<usize> {
    let count = candidates.iter().count();
    if count == 0 {
        return None;
    }
    let start = next.fetch_add(1, Ordering::Relaxed) % count;
    let mut best: Option<(usize, &crate::discovery::Endpoint)> = None;
    let rotated = candidates
        .iter()
        .skip(start)
        .chain(candidates.iter().take(start));
    for (index, endpoint) in rotated {
        match best {
            Some((_, current)) if !less_loaded(endpoint, current) => {}
            _ => best = Some((index, endpoint)),
        }
    }
    best.map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::super::{test_support::set, Balancer};
    use crate::config::Balance;
    use std::sync::atomic::Ordering;

    #[test]
    fn prefers_fewest_connections() {
        let set = set(&[(1, false, true), (1, false, true), (1, false, true)]);
        set.endpoints[0].state.active.store(5, Ordering::Relaxed);
        set.endpoints[1].state.active.store(1, Ordering::Relaxed);
        set.endpoints[2].state.active.store(3, Ordering::Relaxed);
        let balancer = Balancer::new(Balance::LeastConn);
        for _ in 0..10 {
            assert_eq!(balancer.pick(&set, &[], 1), Some(1));
        }
    }

    #[test]
    fn weight_scales_load() {
        let set = set(&[(1, false, true), (4, false, true)]);
        set.endpoints[0].state.active.store(2, Ordering::Relaxed);
        set.endpoints[1].state.active.store(4, Ordering::Relaxed);
        let balancer = Balancer::new(Balance::LeastConn);
        assert_eq!(balancer.pick(&set, &[], 1), Some(1));
    }

    #[test]
    fn ties_rotate() {
        let set = set(&[(1, false, true), (1, false, true)]);
        let balancer = Balancer::new(Balance::LeastConn);
        let picks: Vec<_> = (0..4)
            .map(|_| balancer.pick(&set, &[], 1).unwrap())
            .collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
    }
}
