//! Ordered failover: always the first eligible endpoint in target order.
use super::Candidates;

pub(super) fn pick(candidates: &Candidates<'_>) -> Option<usize> {
    candidates.iter().next().map(|(index, _)| index)
}
