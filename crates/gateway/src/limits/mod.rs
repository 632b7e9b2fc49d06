//! Rate limits: requests per minute, tokens per minute and requests in
//! flight, per tenant and (where a key sets its own) per key.
//!
//! Limits count in fixed one-minute UTC windows. Tokens are reserved before
//! the call from an estimate (prompt bytes ÷ 4 plus the output limit) and
//! corrected once the real usage is known. Throttled requests get 429
//! `rate_limit_exceeded` with `retry-after`/`retry-after-ms`; every limited
//! response carries `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.

pub mod local;

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use tollgate_store::Limits;

use local::LocalLimits;

use crate::shared::{Shared, Verdict};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
    Concurrency,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "rpm",
            Self::Tokens => "tpm",
            Self::Concurrency => "inflight",
        }
    }
}

/// The current one-minute window.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub index: u64,
    pub now_ms: u64,
}

impl Window {
    pub fn at(now_ms: u64) -> Self {
        Self { index: now_ms / 60_000, now_ms }
    }

    pub fn remaining(&self) -> Duration {
        Duration::from_millis((self.index + 1) * 60_000 - self.now_ms)
    }
}

/// The limits that apply to one scope (a tenant, or a key).
#[derive(Debug, Clone)]
pub struct Check {
    /// `t:<tenant>` or `k:<key id>`.
    pub scope: String,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_concurrent: Option<u64>,
}

impl Check {
    pub fn new(scope: String, limits: &Limits) -> Option<Self> {
        let check = Self { scope, rpm: limits.rpm, tpm: limits.tpm, max_concurrent: limits.max_concurrent };
        (check.rpm.is_some() || check.tpm.is_some() || check.max_concurrent.is_some()).then_some(check)
    }

    fn window_key(&self, kind: Kind, window: &Window) -> String {
        format!("{}:{}@{}", self.scope, kind.as_str(), window.index)
    }

    fn concurrency_key(&self) -> String {
        format!("{}:{}", self.scope, Kind::Concurrency.as_str())
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Throttled {
    pub kind: Kind,
    pub limit: u64,
    /// The request alone exceeds the limit: retrying cannot help.
    pub too_large: bool,
    pub retry_after: Duration,
}

/// Remaining allowance, for the `x-ratelimit-*` headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Allowance {
    pub requests: Option<(u64, u64)>,
    pub tokens: Option<(u64, u64)>,
    pub reset: Duration,
}

impl Allowance {
    /// Written on every limited response: static names and integer values,
    /// so nothing is formatted or parsed but the reset time.
    pub fn write(&self, headers: &mut HeaderMap) {
        if self.requests.is_none() && self.tokens.is_none() {
            return;
        }
        let Ok(reset) = HeaderValue::try_from(format_reset(self.reset)) else { return };
        let names = [
            (
                self.requests,
                ["x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"],
            ),
            (self.tokens, ["x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"]),
        ];
        for (value, [limit_name, remaining_name, reset_name]) in names {
            let Some((limit, remaining)) = value else { continue };
            headers.insert(http::HeaderName::from_static(limit_name), HeaderValue::from(limit));
            headers.insert(http::HeaderName::from_static(remaining_name), HeaderValue::from(remaining));
            headers.insert(http::HeaderName::from_static(reset_name), reset.clone());
        }
    }
}

/// A duration as OpenAI writes it: `1s`, `6m0s`, `12ms`.
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        let s = format!("{secs:.3}");
        return format!("{}s", s.trim_end_matches('0').trim_end_matches('.'));
    }
    let whole = d.as_secs();
    format!("{}m{}s", whole / 60, whole % 60)
}

/// Where a request's counters live.
#[derive(Debug, Clone)]
enum Counters {
    Local,
    Shared(Arc<Shared>),
}

#[derive(Debug, Default)]
pub struct RateLimiter {
    local: LocalLimits,
    shared: Option<Arc<Shared>>,
    /// Replicas sharing the limits: local fallback limits are divided by it.
    replicas: u64,
}

/// An admitted request's hold on the limits: its in-flight slot (released on
/// drop) and its token reservation (corrected by `settle`).
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<RateLimiter>,
    counters: Counters,
    taken: Vec<(String, i64)>,
    reserved_tokens: i64,
    pub allowance: Allowance,
}

impl Permit {
    fn adjust(&self, key: &str, delta: i64) {
        match &self.counters {
            Counters::Local => self.limiter.local.adjust(key, delta),
            Counters::Shared(shared) => shared.adjust(shared_key(key), delta),
        }
    }

    /// Corrects the token reservation to the real count.
    pub fn settle(&mut self, actual_tokens: u64) {
        let actual = i64::try_from(actual_tokens).unwrap_or(i64::MAX);
        let delta = actual - self.reserved_tokens;
        for (key, _) in self.taken.iter().filter(|(k, _)| k.contains(":tpm@")) {
            self.adjust(key, delta);
        }
        self.reserved_tokens = actual;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        for (key, amount) in self.taken.iter().filter(|(k, _)| k.ends_with(":inflight")) {
            self.adjust(key, -amount);
        }
    }
}

fn shared_key(key: &str) -> String {
    format!("rl:{key}")
}

/// Shared counters outlive their window a little, so late corrections land.
const WINDOW_TTL_MS: u64 = 120_000;
/// In-flight counts left by a replica that died expire after this.
const INFLIGHT_TTL_MS: u64 = 600_000;

impl RateLimiter {
    pub fn new(shared: Option<Arc<Shared>>, replicas: u64) -> Self {
        Self { local: LocalLimits::default(), shared, replicas: replicas.max(1) }
    }

    pub async fn admit(self: &Arc<Self>, checks: &[Check], tokens: u64, now_ms: u64) -> Result<Permit, Throttled> {
        let window = Window::at(now_ms);
        if let Some(shared) = self.shared.as_ref().filter(|s| s.available())
            && let Some(result) = self.admit_shared(shared, checks, tokens, &window).await
        {
            return result;
        }
        let divisor = if self.shared.is_some() { self.replicas } else { 1 };
        let taken = self.local.admit(checks, tokens, &window, divisor)?;
        let mut allowance = Allowance { reset: window.remaining(), ..Allowance::default() };
        for check in checks {
            if let Some(limit) = check.rpm {
                let used = self.local.value(&check.window_key(Kind::Requests, &window)).max(0) as u64;
                tighten(&mut allowance.requests, limit, used);
            }
            if let Some(limit) = check.tpm {
                let used = self.local.value(&check.window_key(Kind::Tokens, &window)).max(0) as u64;
                tighten(&mut allowance.tokens, limit, used);
            }
        }
        Ok(Permit {
            limiter: self.clone(),
            counters: Counters::Local,
            taken,
            reserved_tokens: i64::try_from(tokens).unwrap_or(i64::MAX),
            allowance,
        })
    }

    /// `None` when Redis is unavailable.
    async fn admit_shared(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
        checks: &[Check],
        tokens: u64,
        window: &Window,
    ) -> Option<Result<Permit, Throttled>> {
        let amount = i64::try_from(tokens).unwrap_or(i64::MAX);
        let mut plan: Vec<(Kind, u64, String, i64)> = Vec::new();
        for check in checks {
            if let Some(limit) = check.max_concurrent {
                plan.push((Kind::Concurrency, limit, check.concurrency_key(), 1));
            }
            if let Some(limit) = check.rpm {
                plan.push((Kind::Requests, limit, check.window_key(Kind::Requests, window), 1));
            }
            if let Some(limit) = check.tpm {
                if tokens > limit {
                    let retry_after = window.remaining();
                    return Some(Err(Throttled { kind: Kind::Tokens, limit, too_large: true, retry_after }));
                }
                plan.push((Kind::Tokens, limit, check.window_key(Kind::Tokens, window), amount));
            }
        }
        let counters: Vec<(String, u64, i64, u64)> = plan
            .iter()
            .map(|(kind, limit, key, amount)| {
                let ttl = if *kind == Kind::Concurrency { INFLIGHT_TTL_MS } else { WINDOW_TTL_MS };
                (shared_key(key), *limit, *amount, ttl)
            })
            .collect();
        match shared.admit(&counters).await? {
            Verdict::Refused { index, .. } => {
                let (kind, limit, _, _) = plan.get(index)?;
                let retry_after = if *kind == Kind::Concurrency { Duration::from_secs(1) } else { window.remaining() };
                Some(Err(Throttled { kind: *kind, limit: *limit, too_large: false, retry_after }))
            }
            Verdict::Admitted(values) => {
                let mut allowance = Allowance { reset: window.remaining(), ..Allowance::default() };
                for ((kind, limit, _, _), used) in plan.iter().zip(&values) {
                    let used = (*used).max(0) as u64;
                    match kind {
                        Kind::Requests => tighten(&mut allowance.requests, *limit, used),
                        Kind::Tokens => tighten(&mut allowance.tokens, *limit, used),
                        Kind::Concurrency => {}
                    }
                }
                let taken = plan.into_iter().map(|(_, _, key, amount)| (key, amount)).collect();
                Some(Ok(Permit {
                    limiter: self.clone(),
                    counters: Counters::Shared(shared.clone()),
                    taken,
                    reserved_tokens: amount,
                    allowance,
                }))
            }
        }
    }

    /// Forgets windows older than the previous one.
    pub async fn sweep_loop(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
            self.local.sweep(Window::at(now).index.saturating_sub(1));
        }
    }
}

fn tighten(slot: &mut Option<(u64, u64)>, limit: u64, used: u64) {
    let remaining = limit.saturating_sub(used);
    match slot {
        Some((_, r)) if *r <= remaining => {}
        _ => *slot = Some((limit, remaining)),
    }
}

/// The checks for a request: the tenant's limits (its policy, else the
/// configured defaults) and the key's own, if it has any.
pub fn checks_for(tenant_id: &str, tenant: &Limits, defaults: &Limits, key_id: &str, key: &Limits) -> Vec<Check> {
    let tenant_limits = Limits {
        rpm: tenant.rpm.or(defaults.rpm),
        tpm: tenant.tpm.or(defaults.tpm),
        max_concurrent: tenant.max_concurrent.or(defaults.max_concurrent),
    };
    [Check::new(format!("t:{tenant_id}"), &tenant_limits), Check::new(format!("k:{key_id}"), key)]
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter() -> Arc<RateLimiter> {
        Arc::new(RateLimiter::default())
    }

    fn admit(l: &Arc<RateLimiter>, checks: &[Check], tokens: u64, now: u64) -> Result<Permit, Throttled> {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(l.admit(checks, tokens, now))
    }

    fn check(rpm: Option<u64>, tpm: Option<u64>, conc: Option<u64>) -> Vec<Check> {
        vec![Check { scope: "t:a".into(), rpm, tpm, max_concurrent: conc }]
    }

    #[test]
    fn requests_per_minute_are_exact_and_reset_with_the_window() {
        let l = limiter();
        let checks = check(Some(3), None, None);
        let permits: Vec<_> = (0..3).map(|_| admit(&l, &checks, 0, 1_000).unwrap()).collect();
        assert_eq!(permits[2].allowance.requests, Some((3, 0)));
        let refused = admit(&l, &checks, 0, 1_000).unwrap_err();
        assert_eq!((refused.kind, refused.limit), (Kind::Requests, 3));
        assert_eq!(refused.retry_after, Duration::from_millis(59_000));
        assert!(admit(&l, &checks, 0, 60_000).is_ok(), "a new minute, a new allowance");
    }

    #[test]
    fn tokens_are_reserved_then_corrected() {
        let l = limiter();
        let checks = check(None, Some(1000), None);
        let mut p = admit(&l, &checks, 800, 0).unwrap();
        assert!(admit(&l, &checks, 300, 0).is_err(), "800 + 300 > 1000");
        p.settle(100);
        assert!(admit(&l, &checks, 300, 0).is_ok(), "the estimate was corrected to 100");
        let too_big = admit(&l, &checks, 5000, 0).unwrap_err();
        assert!(too_big.too_large);
    }

    #[test]
    fn in_flight_slots_are_released_on_drop_and_refusals_roll_back() {
        let l = limiter();
        let checks = vec![
            Check { scope: "t:a".into(), rpm: Some(100), tpm: None, max_concurrent: Some(2) },
            Check { scope: "k:x".into(), rpm: Some(1), tpm: None, max_concurrent: None },
        ];
        let first = admit(&l, &checks, 0, 0).unwrap();
        // The key's rpm refuses the second; the tenant's counters roll back.
        assert_eq!(admit(&l, &checks, 0, 0).unwrap_err().kind, Kind::Requests);
        assert_eq!(l.local.value("t:a:inflight"), 1);
        assert_eq!(l.local.value("t:a:rpm@0"), 1);
        drop(first);
        assert_eq!(l.local.value("t:a:inflight"), 0);
        let tenant_only = check(None, None, Some(1));
        let held = admit(&l, &tenant_only, 0, 0).unwrap();
        assert_eq!(admit(&l, &tenant_only, 0, 0).unwrap_err().kind, Kind::Concurrency);
        drop(held);
        assert!(admit(&l, &tenant_only, 0, 0).is_ok());
    }

    #[test]
    fn reset_durations_look_like_openais() {
        assert_eq!(format_reset(Duration::from_millis(12)), "12ms");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
    }
}
