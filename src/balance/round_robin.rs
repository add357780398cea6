//! Weighted round-robin: endpoint i gets weight_i consecutive turns out of every
//! Σweight; with equal weights it is plain rotation.
use super::Candidates;
use std::sync::atomic::{AtomicUsize, Ordering};

pub(super) fn pick(candidates: &Candidates<'_>, next: &AtomicUsize) -> Option<usize> {
    let total: u64 = candidates.iter().map(|(_, e)| e.weight as u64).sum();
    if total == 0 {
        return None;
    }
    let mut turn = next.fetch_add(1, Ordering::Relaxed) as u64 % total;
    for (index, endpoint) in candidates.iter() {
        let weight = endpoint.weight as u64;
        if turn < weight {
            return Some(index);
        }
        turn -= weight;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::{test_support::set, Balancer};
    use crate::config::Balance;

    #[test]
    fn rotates_by_weight() {
        let set = set(&[(1, false, true), (2, false, true), (1, false, true)]);
        let balancer = Balancer::new(Balance::RoundRobin);
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[balancer.pick(&set, &[], 1).unwrap()] += 1;
        }
        assert_eq!(counts, [100, 200, 100]);
    }
}
