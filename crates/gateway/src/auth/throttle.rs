//! Refusing repeated failed authentications from one address.
//!
//! Once an address has failed `limit` times in the current minute, every
//! further attempt from it is refused with 429 before any key is checked,
//! until the minute ends: a guesser learns nothing more, and costs the
//! gateway nothing but a table lookup. (Delaying answers instead only held
//! a task per guess: 300 parallel guesses still got through in seconds.)
//! Clients that authenticate correctly from other addresses are untouched.
//!
//! A fixed window per address, rather than a keyed GCRA limiter, because
//! the check before authentication must look without consuming.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

/// Addresses tracked at once; past this the table is cleared (an attacker
/// spraying addresses then only resets its own counters).
const MAX_TRACKED: usize = 100_000;

#[derive(Debug)]
pub struct FailedAttempts {
    limit: u32,
    /// Per address: the minute counted and its failures.
    counts: Mutex<HashMap<IpAddr, (u64, u32)>>,
}

impl FailedAttempts {
    pub fn new(limit_per_minute: u32) -> Self {
        Self { limit: limit_per_minute, counts: Mutex::new(HashMap::new()) }
    }

    /// `Some(wait)` when `ip` has used up its failures this minute: refuse
    /// it for `wait`, without checking its credentials.
    pub fn refused(&self, ip: IpAddr, now_ms: i64) -> Option<Duration> {
        let minute = minute_of(now_ms);
        let counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match counts.get(&ip) {
            Some((m, n)) if *m == minute && *n >= self.limit => Some(until_next_minute(now_ms)),
            _ => None,
        }
    }

    /// Records a failure from `ip`.
    pub fn record(&self, ip: IpAddr, now_ms: i64) {
        let minute = minute_of(now_ms);
        let mut counts = self.counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if counts.len() >= MAX_TRACKED {
            counts.clear();
        }
        let entry = counts.entry(ip).or_insert((minute, 0));
        if entry.0 != minute {
            *entry = (minute, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

fn minute_of(now_ms: i64) -> u64 {
    u64::try_from(now_ms.max(0)).unwrap_or(0) / 60_000
}

fn until_next_minute(now_ms: i64) -> Duration {
    let into = u64::try_from(now_ms.max(0)).unwrap_or(0) % 60_000;
    Duration::from_millis(60_000 - into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_past_its_failures_is_refused_until_the_minute_ends() {
        let t = FailedAttempts::new(2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let at = 60_000 * 7 + 15_000;
        assert_eq!(t.refused(ip, at), None);
        t.record(ip, at);
        assert_eq!(t.refused(ip, at), None);
        t.record(ip, at);
        assert_eq!(t.refused(ip, at + 1), Some(Duration::from_millis(44_999)));
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(t.refused(other, at), None, "per address");
        assert_eq!(t.refused(ip, 60_000 * 8), None, "a new minute starts over");
    }
}
