//! Weighted random with the power of two choices: draw two candidates by weight and
//! take the less loaded one, which avoids herding without shared state.
use super::{less_loaded, Candidates};

pub(super) fn pick(candidates: &Candidates<'_>) -> Option<usize> {
    let total: u64 = candidates.iter().map(|(_, e)| e.weight as u64).sum();
    if total == 0 {
        return None;
    }
    let draw = || {
        let mut point = fastrand::u64(0..total);
        for (index, endpoint) in candidates.iter() {
            let weight = endpoint.weight as u64;
            if point < weight {
                return Some((index, endpoint));
            }
            point -= weight;
        }
        None
    };
    let (first_index, first) = draw()?;
    let (second_index, second) = draw()?;
    Some(if less_loaded(second, first) {
        second_index
    } else {
        first_index
    })
}

#[cfg(test)]
mod tests {
    use super::super::{test_support::set, Balancer};
    use crate::config::Balance;

    #[test]
    fn spreads_by_weight() {
        let set = set(&[(1, false, true), (3, false, true)]);
        let balancer = Balancer::new(Balance::Random);
        let mut counts = [0u32; 2];
        for _ in 0..4000 {
            counts[balancer.pick(&set, &[], 1).unwrap()] += 1;
        }
        // Both get traffic and the heavier one more; loose bounds, it is random.
        assert!(counts[0] > 200 && counts[1] > counts[0], "{counts:?}");
    }
}
