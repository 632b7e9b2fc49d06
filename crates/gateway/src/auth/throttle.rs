//! Slowing down repeated failed authentications from one address.
//!
//! Past `limit` failures in the current minute, each further failure from
//! that address waits a little longer before its 401 (100 ms more per
//! failure, at most 3 s), which makes guessing keys slow without affecting
//! clients that authenticate correctly.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// Addresses tracked at once; past this the table is cleared (an attacker
/// spraying addresses then only resets its own counters).
const MAX_TRACKED: usize = 100_000;
const STEP: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub struct FailedAttempts {
    limit: u32,
    counts: Mutex<HashMap<IpAddr, (u64, u32)>>,
}

impl FailedAttempts {
    pub fn new(limit_per_minute: u32) -> Self {
        Self { limit: limit_per_minute, counts: Mutex::new(HashMap::new()) }
    }

    /// Records a failure at `now_minute` and returns how long to wait before
    /// answering it.
    pub fn record(&self, ip: IpAddr, now_minute: u64) -> Duration {
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if counts.len() >= MAX_TRACKED {
            counts.clear();
        }
        let entry = counts.entry(ip).or_insert((now_minute, 0));
        if entry.0 != now_minute {
            *entry = (now_minute, 0);
        }
        entry.1 = entry.1.saturating_add(1);
        let over = entry.1.saturating_sub(self.limit);
        STEP.saturating_mul(over).min(MAX_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_limit_are_delayed_more_and_more_then_reset() {
        let t = FailedAttempts::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(t.record(ip, 1), Duration::ZERO);
        assert_eq!(t.record(ip, 1), Duration::ZERO);
        assert_eq!(t.record(ip, 1), Duration::from_millis(100));
        assert_eq!(t.record(ip, 1), Duration::from_millis(200));
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(t.record(other, 1), Duration::ZERO, "per address");
        assert_eq!(t.record(ip, 2), Duration::ZERO, "a new minute starts over");
        for _ in 0..100 {
            t.record(ip, 3);
        }
        assert_eq!(t.record(ip, 3), MAX_DELAY);
    }
}
