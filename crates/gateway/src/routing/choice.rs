//! Picking one target of a weighted group: at random, or sticky (the same
//! caller always lands on the same target while the weights stay the same).
//!
//! Sticky choice hashes a caller identity (key, tenant or the request's
//! `user`) with a fixed, seeded function, so every replica picks the same
//! target for the same caller.

use std::hash::{BuildHasher, Hasher};

/// A fixed-seed hasher: the same identity maps to the same point on every
/// replica and across restarts (std's `RandomState` would differ).
fn stable_hash(identity: &str) -> u64 {
    let mut hasher =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().build_hasher();
    hasher.write(identity.as_bytes());
    hasher.finish()
}

/// The index of the target a point in `[0, total)` falls on.
fn locate(weights: &[u64], point: u64) -> Option<usize> {
    let mut acc = 0u64;
    for (i, w) in weights.iter().enumerate() {
        acc = acc.saturating_add(*w);
        if point < acc {
            return Some(i);
        }
    }
    None
}

/// Picks an index by weight. `sticky`: a caller identity to hash; else
/// `unit`, a number drawn uniformly from `[0, 1)`, decides. `None` when
/// every weight is zero.
pub fn pick(weights: &[u64], sticky: Option<&str>, unit: f64) -> Option<usize> {
    let total: u64 = weights.iter().fold(0u64, |a, w| a.saturating_add(*w));
    if total == 0 {
        return None;
    }
    let point = match sticky {
        Some(identity) => stable_hash(identity) % total,
        None => ((unit.clamp(0.0, 1.0) * total as f64) as u64).min(total - 1),
    };
    locate(weights, point)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_decide_the_share() {
        let weights = [90, 10];
        let mut hits = [0u32; 2];
        for i in 0..10_000 {
            let unit = (i as f64 + 0.5) / 10_000.0;
            hits[pick(&weights, None, unit).unwrap()] += 1;
        }
        assert_eq!(hits, [9_000, 1_000]);
        assert_eq!(pick(&[0, 0], None, 0.5), None);
        assert_eq!(pick(&[0, 5], None, 0.0), Some(1), "a zero weight is never picked");
    }

    #[test]
    fn sticky_choice_keeps_a_caller_on_one_target_and_still_splits_callers() {
        let weights = [50, 50];
        let first = pick(&weights, Some("user-42"), 0.0);
        for unit in [0.1, 0.7, 0.99] {
            assert_eq!(pick(&weights, Some("user-42"), unit), first, "the draw does not matter");
        }
        let on_first = (0..1000).filter(|i| pick(&weights, Some(&format!("user-{i}")), 0.0) == Some(0)).count();
        assert!((400..600).contains(&on_first), "callers still split: {on_first}");
    }
}
