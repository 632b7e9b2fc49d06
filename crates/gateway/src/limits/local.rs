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

use super::{Check, Kind, Taken, Throttled, Window};

/// Takes back increments (a refused request).
fn release(taken: &[Taken]) {
    for t in taken {
        if let Some(counter) = &t.local {
            counter.fetch_sub(t.amount, Ordering::AcqRel);
        }
    }
}

#[derive(Debug, Default)]
pub struct LocalLimits {
    counters: DashMap<String, Arc<AtomicI64>, crate::fast_hash::FastHash>,
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
    /// Returns the counters it incremented, held directly so that releasing
    /// and correcting them needs no lookup.
    pub fn admit(&self, checks: &[Check], tokens: u64, window: &Window, divisor: u64) -> Result<Vec<Taken>, Throttled> {
        let mut taken: Vec<Taken> = Vec::with_capacity(checks.len() * 3);
        let scaled = |limit: u64| (limit / divisor.max(1)).max(1);
        let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
        // One buffer for every key of the request: a counter that exists
        // (all but the first request of a window) is found without allocating.
        let mut key = String::with_capacity(64);
        for check in checks {
            let steps = [
                (Kind::Concurrency, check.max_concurrent, 1),
                (Kind::Requests, check.rpm, 1),
                (Kind::Tokens, check.tpm, tokens),
            ];
            for (kind, limit, amount) in steps {
                let Some(unscaled) = limit else { continue };
                let limit_i = i64::try_from(scaled(unscaled)).unwrap_or(i64::MAX);
                if kind == Kind::Tokens && amount > limit_i {
                    release(&taken);
                    return Err(Throttled {
                        kind,
                        limit: scaled(unscaled),
                        too_large: true,
                        retry_after: window.remaining(),
                    });
                }
                key.clear();
                check.write_key(&mut key, kind, window);
                let counter = self.counter(&key);
                let now = counter.fetch_add(amount, Ordering::AcqRel) + amount;
                if now > limit_i {
                    counter.fetch_sub(amount, Ordering::AcqRel);
                    release(&taken);
                    let retry_after =
                        if kind == Kind::Concurrency { std::time::Duration::from_secs(1) } else { window.remaining() };
                    return Err(Throttled { kind, limit: scaled(unscaled), too_large: false, retry_after });
                }
                taken.push(Taken {
                    kind,
                    key: String::new(),
                    amount,
                    limit: unscaled,
                    used: now,
                    local: Some(counter),
                });
            }
        }
        Ok(taken)
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
