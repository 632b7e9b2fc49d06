//! In-process rate limits: fixed one-minute windows for requests and tokens,
//! and in-flight counts, held in a sharded concurrent map of atomics, so
//! checks from many requests never wait on one lock.
//!
//! A request passes every check or none: counters are incremented in turn
//! and, when one goes over its limit, the increments already made are taken
//! back. Racing requests can therefore be refused spuriously at the edge,
//! but never admitted over a limit.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use dashmap::DashMap;

use super::{Check, Kind, Throttled, Window};

#[derive(Debug, Default)]
pub struct LocalLimits {
    counters: DashMap<String, Arc<AtomicI64>>,
}

impl LocalLimits {
    fn counter(&self, key: &str) -> Arc<AtomicI64> {
        if let Some(c) = self.counters.get(key) {
            return c.clone();
        }
        self.counters.entry(key.to_owned()).or_default().clone()
    }

    /// Current value of a counter (0 if absent).
    pub fn value(&self, key: &str) -> i64 {
        self.counters.get(key).map_or(0, |c| c.load(Ordering::Acquire))
    }

    /// Admits one request costing `tokens`, against `checks`, scaled down by
    /// `divisor` (the replica count, when standing in for shared limits).
    /// Returns the counters it incremented.
    pub fn admit(
        &self,
        checks: &[Check],
        tokens: u64,
        window: &Window,
        divisor: u64,
    ) -> Result<Vec<(String, i64)>, Throttled> {
        let mut taken: Vec<(String, i64)> = Vec::with_capacity(checks.len() * 3);
        let scaled = |limit: u64| (limit / divisor.max(1)).max(1);
        let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
        for check in checks {
            let steps = [
                (Kind::Concurrency, check.max_concurrent, 1, check.concurrency_key()),
                (Kind::Requests, check.rpm, 1, check.window_key(Kind::Requests, window)),
                (Kind::Tokens, check.tpm, tokens, check.window_key(Kind::Tokens, window)),
            ];
            for (kind, limit, amount, key) in steps {
                let Some(limit) = limit.map(scaled) else { continue };
                let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
                if kind == Kind::Tokens && amount > limit_i {
                    self.release(&taken);
                    return Err(Throttled { kind, limit, too_large: true, retry_after: window.remaining() });
                }
                let counter = self.counter(&key);
                let now = counter.fetch_add(amount, Ordering::AcqRel) + amount;
                if now > limit_i {
                    counter.fetch_sub(amount, Ordering::AcqRel);
                    self.release(&taken);
                    let retry_after =
                        if kind == Kind::Concurrency { std::time::Duration::from_secs(1) } else { window.remaining() };
                    return Err(Throttled { kind, limit, too_large: false, retry_after });
                }
                taken.push((key, amount));
            }
        }
        Ok(taken)
    }

    /// Takes back increments (a refused request, or a finished one's
    /// in-flight count).
    pub fn release(&self, taken: &[(String, i64)]) {
        for (key, amount) in taken {
            if let Some(c) = self.counters.get(key) {
                c.fetch_sub(*amount, Ordering::AcqRel);
            }
        }
    }

    /// Adds `delta` (positive or negative) to a counter: the correction of a
    /// token estimate once the real usage is known.
    pub fn adjust(&self, key: &str, delta: i64) {
        if delta != 0 {
            self.counter(key).fetch_add(delta, Ordering::AcqRel);
        }
    }

    /// Drops window counters older than `oldest_window`.
    pub fn sweep(&self, oldest_window: u64) {
        self.counters.retain(|key, value| match key.rsplit_once('@') {
            Some((_, w)) => w.parse::<u64>().is_ok_and(|w| w >= oldest_window),
            // In-flight counters live as long as they are non-zero.
            None => value.load(Ordering::Acquire) != 0,
        });
    }
}
