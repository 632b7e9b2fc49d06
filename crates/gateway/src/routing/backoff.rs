//! How long to wait before retrying a target: exponential backoff with full
//! jitter (a random wait between zero and the exponential bound, so many
//! clients retrying at once spread out), or what the upstream asked for in
//! `retry-after`, either one capped.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_millis(100), cap: Duration::from_secs(2) }
    }
}

impl Backoff {
    /// The wait before retry number `retry` (1 for the first retry), given
    /// `unit` drawn uniformly from `[0, 1)` and the upstream's own
    /// `retry-after`, if it sent one.
    pub fn delay(&self, retry: u32, unit: f64, retry_after: Option<Duration>) -> Duration {
        if let Some(asked) = retry_after {
            return asked.min(self.cap);
        }
        let exponent = retry.saturating_sub(1).min(20);
        let bound = self.base.saturating_mul(1u32 << exponent).min(self.cap);
        bound.mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// `retry-after-ms` (milliseconds) or `retry-after` (seconds) from an
/// upstream response; HTTP dates are not honoured (no upstream of this
/// kind sends one).
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok().filter(|n| *n >= 0.0);
    if let Some(ms) = number("retry-after-ms") {
        return Some(Duration::from_secs_f64(ms.min(86_400_000.0) / 1000.0));
    }
    number("retry-after").map(|s| Duration::from_secs_f64(s.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_exponentially_up_to_the_cap_with_full_jitter() {
        let b = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(1) };
        assert_eq!(b.delay(1, 0.999_999, None), Duration::from_millis(100).mul_f64(0.999_999));
        assert_eq!(b.delay(3, 0.5, None), Duration::from_millis(200));
        assert_eq!(b.delay(10, 1.0, None), Duration::from_secs(1), "capped");
        assert_eq!(b.delay(2, 0.0, None), Duration::ZERO, "full jitter reaches zero");
    }

    #[test]
    fn the_upstreams_retry_after_is_honoured_up_to_the_cap() {
        let b = Backoff { base: Duration::from_millis(100), cap: Duration::from_secs(2) };
        assert_eq!(b.delay(1, 0.5, Some(Duration::from_millis(700))), Duration::from_millis(700));
        assert_eq!(b.delay(1, 0.5, Some(Duration::from_secs(30))), Duration::from_secs(2));
    }

    #[test]
    fn retry_after_headers_are_read_in_either_unit() {
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", http::HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", http::HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)), "the finer one wins");
        h.clear();
        h.insert("retry-after", http::HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(retry_after(&h), None);
    }
}
