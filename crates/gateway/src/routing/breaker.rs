//! A circuit breaker per route target.
//!
//! Not "one failure ejects": the breaker opens only when, over a sliding
//! window, at least `min_requests` outcomes were seen and the share of
//! failures reached `failure_rate`. Open, the target takes no traffic for
//! `cooldown`; then it is half-open and lets `probes` requests through one
//! at a time; if they all succeed it closes, and its share of traffic comes
//! back gradually over `ramp` (the caller scales the target's weight by
//! [`Breaker::weight_factor`]), so a recovering upstream is not flooded at
//! once. A failed probe opens it again. Whether the last healthy target of
//! a route may be skipped is the route's decision, not the breaker's.
//!
//! Time is passed in (milliseconds of a monotonic clock), so tests drive it.

use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Length of the sliding window, in milliseconds.
    pub window_ms: u64,
    /// Outcomes needed in the window before the rate means anything.
    pub min_requests: u32,
    /// Failure share (per thousand) that opens the breaker.
    pub failure_per_mille: u32,
    pub cooldown_ms: u64,
    /// Requests let through while half-open; all must succeed to close.
    pub probes: u32,
    /// How long, after closing, the target's share of traffic takes to
    /// return to full.
    pub ramp_ms: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            window_ms: 30_000,
            min_requests: 20,
            failure_per_mille: 500,
            cooldown_ms: 30_000,
            probes: 3,
            ramp_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// Buckets the window is cut into.
const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which slice of time this bucket counts (`now / bucket_ms`).
    slot: u64,
    ok: u32,
    failed: u32,
}

#[derive(Debug)]
struct Inner {
    state: BreakerState,
    buckets: [Bucket; BUCKETS],
    /// When it last closed after being open (for the ramp).
    closed_at_ms: Option<u64>,
    opened_until_ms: u64,
    probes_in_flight: u32,
    probes_passed: u32,
}

#[derive(Debug)]
pub struct Breaker {
    settings: BreakerSettings,
    inner: Mutex<Inner>,
    /// Closed with no ramp under way: the common case answers without the
    /// lock (the request path asks twice per attempt).
    steady: std::sync::atomic::AtomicBool,
}

/// What the breaker says about sending one request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Send it.
    Allowed,
    /// Send it as a half-open probe; report its outcome.
    Probe,
    /// Do not send it to this target.
    Refused,
}

impl Breaker {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                buckets: [Bucket::default(); BUCKETS],
                closed_at_ms: None,
                opened_until_ms: 0,
                probes_in_flight: 0,
                probes_passed: 0,
            }),
            steady: std::sync::atomic::AtomicBool::new(true),
        }
    }

    fn is_steady(&self) -> bool {
        self.steady.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Keeps `steady` in step with the state, under the lock.
    fn update_steady(&self, inner: &Inner, now_ms: u64) {
        let ramping = inner.closed_at_ms.is_some_and(|at| now_ms.saturating_sub(at) < self.settings.ramp_ms);
        let steady = inner.state == BreakerState::Closed && !ramping;
        self.steady.store(steady, std::sync::atomic::Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bucket_ms(&self) -> u64 {
        (self.settings.window_ms / BUCKETS as u64).max(1)
    }

    pub fn state(&self, now_ms: u64) -> BreakerState {
        let mut inner = self.lock();
        self.advance(&mut inner, now_ms);
        inner.state
    }

    /// Moves an open breaker whose cooldown is over to half-open.
    fn advance(&self, inner: &mut Inner, now_ms: u64) {
        if inner.state == BreakerState::Open && now_ms >= inner.opened_until_ms {
            inner.state = BreakerState::HalfOpen;
            inner.probes_in_flight = 0;
            inner.probes_passed = 0;
        }
    }

    /// Whether a request may go to this target now.
    pub fn admit(&self, now_ms: u64) -> Admission {
        if self.is_steady() {
            return Admission::Allowed;
        }
        let mut inner = self.lock();
        self.advance(&mut inner, now_ms);
        match inner.state {
            BreakerState::Closed => Admission::Allowed,
            BreakerState::Open => Admission::Refused,
            BreakerState::HalfOpen => {
                // One probe at a time, until enough have passed.
                if inner.probes_in_flight == 0 && inner.probes_passed < self.settings.probes {
                    inner.probes_in_flight = 1;
                    Admission::Probe
                } else {
                    Admission::Refused
                }
            }
        }
    }

    /// Reports how a request the breaker admitted ended.
    pub fn record(&self, admission: Admission, succeeded: bool, now_ms: u64) {
        let mut inner = self.lock();
        self.advance(&mut inner, now_ms);
        if admission == Admission::Probe {
            inner.probes_in_flight = 0;
            if inner.state != BreakerState::HalfOpen {
                return;
            }
            if succeeded {
                inner.probes_passed += 1;
                if inner.probes_passed >= self.settings.probes {
                    inner.state = BreakerState::Closed;
                    inner.closed_at_ms = Some(now_ms);
                    inner.buckets = [Bucket::default(); BUCKETS];
                    self.update_steady(&inner, now_ms);
                }
            } else {
                self.open(&mut inner, now_ms);
            }
            return;
        }
        if inner.state != BreakerState::Closed {
            return;
        }
        let slot = now_ms / self.bucket_ms();
        let bucket = &mut inner.buckets[(slot % BUCKETS as u64) as usize];
        if bucket.slot != slot {
            *bucket = Bucket { slot, ok: 0, failed: 0 };
        }
        if succeeded {
            bucket.ok += 1;
        } else {
            bucket.failed += 1;
        }
        let oldest = slot.saturating_sub(BUCKETS as u64 - 1);
        let (ok, failed) = inner
            .buckets
            .iter()
            .filter(|b| b.slot >= oldest && b.slot <= slot)
            .fold((0u64, 0u64), |(o, f), b| (o + u64::from(b.ok), f + u64::from(b.failed)));
        let total = ok + failed;
        if total >= u64::from(self.settings.min_requests)
            && failed * 1000 >= total * u64::from(self.settings.failure_per_mille)
        {
            self.open(&mut inner, now_ms);
        }
    }

    fn open(&self, inner: &mut Inner, now_ms: u64) {
        inner.state = BreakerState::Open;
        inner.opened_until_ms = now_ms + self.settings.cooldown_ms;
        inner.probes_in_flight = 0;
        inner.probes_passed = 0;
        self.steady.store(false, std::sync::atomic::Ordering::Release);
    }

    /// The share of its weight a target gets now, per thousand: 0 while
    /// open, full while half-open with a probe to send (so the next request
    /// probes) and 0 while a probe is out, rising from 100 to 1000 over the
    /// ramp after it closed.
    pub fn weight_factor(&self, now_ms: u64) -> u64 {
        if self.is_steady() {
            return 1000;
        }
        let mut inner = self.lock();
        self.advance(&mut inner, now_ms);
        self.update_steady(&inner, now_ms);
        match inner.state {
            BreakerState::Open => 0,
            BreakerState::HalfOpen => {
                if inner.probes_in_flight == 0 && inner.probes_passed < self.settings.probes {
                    1000
                } else {
                    0
                }
            }
            BreakerState::Closed => match inner.closed_at_ms {
                Some(at) if now_ms.saturating_sub(at) < self.settings.ramp_ms => {
                    100 + 900 * (now_ms - at) / self.settings.ramp_ms
                }
                _ => 1000,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> Breaker {
        Breaker::new(BreakerSettings {
            window_ms: 10_000,
            min_requests: 10,
            failure_per_mille: 500,
            cooldown_ms: 5_000,
            probes: 2,
            ramp_ms: 10_000,
        })
    }

    fn feed(b: &Breaker, at: u64, ok: u32, failed: u32) {
        for _ in 0..ok {
            b.record(Admission::Allowed, true, at);
        }
        for _ in 0..failed {
            b.record(Admission::Allowed, false, at);
        }
    }

    #[test]
    fn one_failure_does_not_open_it_nor_do_a_few_below_the_minimum() {
        let b = breaker();
        feed(&b, 1_000, 0, 9);
        assert_eq!(b.state(1_000), BreakerState::Closed, "9 failures are below the 10-request minimum");
        let b = breaker();
        feed(&b, 1_000, 6, 4);
        assert_eq!(b.state(1_000), BreakerState::Closed, "40% is below the 50% threshold");
    }

    #[test]
    fn the_failure_rate_over_the_window_opens_it_then_probes_close_it_and_traffic_ramps_back() {
        let b = breaker();
        feed(&b, 1_000, 5, 5);
        assert_eq!(b.state(1_000), BreakerState::Open);
        assert_eq!(b.admit(3_000), Admission::Refused, "cooling down");
        assert_eq!(b.weight_factor(3_000), 0);
        assert_eq!(b.weight_factor(6_000), 1000, "half-open: the next request probes");
        assert_eq!(b.admit(6_000), Admission::Probe, "half-open after the cooldown");
        assert_eq!(b.weight_factor(6_000), 0, "not while the probe is out");
        assert_eq!(b.admit(6_000), Admission::Refused, "one probe at a time");
        b.record(Admission::Probe, true, 6_100);
        assert_eq!(b.admit(6_200), Admission::Probe);
        b.record(Admission::Probe, true, 6_300);
        assert_eq!(b.state(6_300), BreakerState::Closed);
        assert_eq!(b.weight_factor(6_300), 100, "a small share at first");
        assert_eq!(b.weight_factor(11_300), 550);
        assert_eq!(b.weight_factor(16_300), 1000, "all of it after the ramp");
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let b = breaker();
        feed(&b, 0, 0, 10);
        assert_eq!(b.admit(5_000), Admission::Probe);
        b.record(Admission::Probe, false, 5_001);
        assert_eq!(b.state(5_001), BreakerState::Open);
        assert_eq!(b.admit(9_000), Admission::Refused);
        assert_eq!(b.admit(10_001), Admission::Probe);
    }

    #[test]
    fn old_outcomes_slide_out_of_the_window() {
        let b = breaker();
        feed(&b, 0, 0, 6);
        feed(&b, 20_000, 6, 0);
        feed(&b, 20_000, 0, 4);
        assert_eq!(b.state(20_000), BreakerState::Closed, "the early failures are outside the window");
    }
}
