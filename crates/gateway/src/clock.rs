//! The wall clock the gateway decides by: key expiry and rotation grace,
//! rate-limit windows, budget periods, last-use times.
//!
//! Production runs on the system clock. Tests build the application with an
//! adjustable clock and move it forward, so an expiry, the next rate-limit
//! minute or the next budget period is reached at once instead of by
//! sleeping (which is slow, and flaky near a boundary).
//!
//! Only wall-clock *decisions* go through here. Durations (timeouts,
//! latencies, intervals between background runs) stay on `Instant` and
//! tokio's timers: moving the wall clock must not fire them.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDate, Utc};

/// The system clock in milliseconds since the Unix epoch, for timestamps
/// that record when something happened rather than decide anything.
pub fn system_now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        // A system clock set before 1970.
        Err(before) => i64::try_from(before.duration().as_millis()).map_or(i64::MIN, |ms| -ms),
    }
}

/// Cheap to clone; every clone reads the same time.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    /// Milliseconds added to the system time; `None` on the system clock, so
    /// production never pays for (or can be moved by) an adjustment.
    offset_ms: Option<Arc<AtomicI64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock that runs at the system clock's pace from wherever its
    /// [`ClockControl`] puts it. Time keeps flowing, so everything that
    /// expects it to pass (timestamps ordering, once-a-minute throttles)
    /// behaves as in production.
    pub fn adjustable() -> (Self, ClockControl) {
        let offset = Arc::new(AtomicI64::new(0));
        (Self { offset_ms: Some(offset.clone()) }, ClockControl { offset })
    }

    pub fn now(&self) -> DateTime<Utc> {
        let now = Utc::now();
        match &self.offset_ms {
            None => now,
            Some(offset) => now + chrono::Duration::milliseconds(offset.load(Ordering::Acquire)),
        }
    }

    /// Milliseconds since the Unix epoch. Read from `SystemTime` directly
    /// rather than through [`Self::now`]: it is asked several times per
    /// request, and a `DateTime` splits the time into a calendar date that
    /// `timestamp_millis` then adds back up.
    pub fn now_ms(&self) -> i64 {
        let now = system_now_ms();
        match &self.offset_ms {
            None => now,
            Some(offset) => now.saturating_add(offset.load(Ordering::Acquire)),
        }
    }

    /// The current UTC day (budget periods are calendar periods in UTC).
    pub fn today(&self) -> NaiveDate {
        self.now().date_naive()
    }
}

/// Moves an adjustable [`Clock`]. Held by tests, never by the gateway.
#[derive(Debug, Clone)]
pub struct ClockControl {
    offset: Arc<AtomicI64>,
}

impl ClockControl {
    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.offset.fetch_add(ms, Ordering::AcqRel);
    }

    /// Moves the clock so that it reads `at` now (and runs on from there).
    pub fn set(&self, at: DateTime<Utc>) {
        let gap = at - Utc::now();
        // Rounded up: a clock set to the start of a minute must never read
        // the end of the previous one.
        let mut ms = gap.num_milliseconds();
        if gap > chrono::Duration::milliseconds(ms) {
            ms += 1;
        }
        self.offset.store(ms, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_adjustable_clock_moves_only_when_told_and_its_clones_follow() {
        let (clock, control) = Clock::adjustable();
        let copy = clock.clone();
        let drift = (clock.now() - Utc::now()).num_milliseconds().abs();
        assert!(drift < 1_000, "starts at the system time");
        control.advance(Duration::from_secs(3600));
        let ahead = (copy.now() - Utc::now()).num_milliseconds();
        assert!((3_599_000..3_601_000).contains(&ahead), "{ahead}");
        let target = DateTime::from_timestamp(2_000_000_000, 0).unwrap();
        control.set(target);
        assert!((clock.now() - target).num_milliseconds().abs() < 1_000);
        assert_eq!(clock.today(), target.date_naive());
    }

    #[test]
    fn a_clock_set_to_a_moment_never_reads_before_it() {
        let (clock, control) = Clock::adjustable();
        for _ in 0..1_000 {
            let minute = (clock.now_ms().div_euclid(60_000) + 1) * 60_000;
            control.set(DateTime::from_timestamp_millis(minute).unwrap());
            assert!(clock.now_ms() >= minute);
        }
    }

    #[test]
    fn the_system_clock_reads_the_system_time() {
        let drift = (Clock::system().now() - Utc::now()).num_milliseconds().abs();
        assert!(drift < 1_000);
        let drift_ms = (Clock::system().now_ms() - Utc::now().timestamp_millis()).abs();
        assert!(drift_ms < 1_000, "{drift_ms}");
        let (clock, control) = Clock::adjustable();
        control.advance(Duration::from_secs(86_400));
        let ahead_ms = clock.now_ms() - Utc::now().timestamp_millis();
        assert!((86_399_000..86_401_000).contains(&ahead_ms), "{ahead_ms}");
    }
}
