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
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};
use tollgate_store::Limits;

use local::LocalLimits;

use crate::auth::cache::LimitScopes;
use crate::clock::Clock;
use crate::shared::{Asking, Expiry, LimitCounter, Shared, Verdict};

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
    pub scope: Arc<str>,
    pub rpm: Option<u64>,
    pub tpm: Option<u64>,
    pub max_concurrent: Option<u64>,
}

impl Check {
    pub fn new(scope: Arc<str>, limits: &Limits) -> Option<Self> {
        let check = Self { scope, rpm: limits.rpm, tpm: limits.tpm, max_concurrent: limits.max_concurrent };
        (check.rpm.is_some() || check.tpm.is_some() || check.max_concurrent.is_some()).then_some(check)
    }

    /// The counter's name: `<scope>:inflight`, or `<scope>:rpm@<window>` and
    /// `<scope>:tpm@<window>` for the per-minute counts.
    fn write_key(&self, out: &mut String, kind: Kind, window: &Window) {
        out.push_str(&self.scope);
        out.push(':');
        out.push_str(kind.as_str());
        if kind != Kind::Concurrency {
            out.push('@');
            out.push_str(itoa::Buffer::new().format(window.index));
        }
    }
}

/// One counter a request incremented.
#[derive(Debug)]
pub struct Taken {
    kind: Kind,
    /// The counter's key in Redis, `rl:<name>` (for shared counters; local
    /// ones are held in `local`).
    key: String,
    amount: i64,
    /// The limit as configured (before any division between replicas).
    limit: u64,
    /// The counter's value after the increment.
    used: i64,
    local: Option<Arc<AtomicI64>>,
}

impl Taken {
    fn allowance(taken: &[Self], reset: Duration) -> Allowance {
        let mut allowance = Allowance { reset, ..Allowance::default() };
        for t in taken {
            let used = t.used.max(0) as u64;
            match t.kind {
                Kind::Requests => tighten(&mut allowance.requests, t.limit, used),
                Kind::Tokens => tighten(&mut allowance.tokens, t.limit, used),
                Kind::Concurrency => {}
            }
        }
        allowance
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

const LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
const REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
const RESET_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-reset-requests");
const LIMIT_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-limit-tokens");
const REMAINING_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-tokens");
const RESET_TOKENS: HeaderName = HeaderName::from_static("x-ratelimit-reset-tokens");

impl Allowance {
    /// Written on every limited response. The values are formatted into one
    /// buffer and each header value is a slice of it: one allocation for up
    /// to six headers instead of one each.
    pub fn write(&self, headers: &mut HeaderMap) {
        if self.requests.is_none() && self.tokens.is_none() {
            return;
        }
        let names = [
            (self.requests, [LIMIT_REQUESTS, REMAINING_REQUESTS, RESET_REQUESTS]),
            (self.tokens, [LIMIT_TOKENS, REMAINING_TOKENS, RESET_TOKENS]),
        ];
        let mut text = String::with_capacity(64);
        write_reset(&mut text, self.reset);
        let reset_range = 0..text.len();
        let mut values = Vec::with_capacity(6);
        for (value, [limit_name, remaining_name, reset_name]) in names {
            let Some((limit, remaining)) = value else { continue };
            for (name, number) in [(limit_name, limit), (remaining_name, remaining)] {
                let start = text.len();
                text.push_str(itoa::Buffer::new().format(number));
                values.push((name, start..text.len()));
            }
            values.push((reset_name, reset_range.clone()));
        }
        let text = bytes::Bytes::from(text);
        for (name, range) in values {
            // Digits and `ms`/`s`/`.`: always a valid header value.
            if let Ok(value) = HeaderValue::from_maybe_shared(text.slice(range)) {
                headers.insert(name, value);
            }
        }
    }
}

/// A duration as OpenAI writes it (`1s`, `6m0s`, `12ms`, `1.5s`), appended
/// to `out`. Integer arithmetic and `itoa`, not `fmt`: it is written on
/// every limited response.
fn write_reset(out: &mut String, d: Duration) {
    let mut digits = itoa::Buffer::new();
    let ms = d.as_millis();
    if ms < 1000 {
        out.push_str(digits.format(ms));
        out.push_str("ms");
    } else if ms < 60_000 {
        let (whole, frac) = (ms / 1000, ms % 1000);
        out.push_str(digits.format(whole));
        if frac != 0 {
            // Milliseconds as a decimal fraction without trailing zeros.
            let (mut frac, mut width) = (frac, 3);
            while frac % 10 == 0 {
                frac /= 10;
                width -= 1;
            }
            out.push('.');
            let frac = digits.format(frac);
            out.extend(std::iter::repeat_n('0', width - frac.len()));
            out.push_str(frac);
        }
        out.push('s');
    } else {
        let whole = d.as_secs();
        out.push_str(digits.format(whole / 60));
        out.push('m');
        out.push_str(digits.format(whole % 60));
        out.push('s');
    }
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
    /// The clock requests are admitted by, so the sweep forgets the windows
    /// that are old by that same clock.
    clock: Clock,
}

/// An admitted request's hold on the limits: its in-flight slot (released on
/// drop) and its token reservation (corrected by `settle`).
#[derive(Debug)]
pub struct Permit {
    counters: Counters,
    taken: Vec<Taken>,
    reserved_tokens: i64,
    pub allowance: Allowance,
}

impl Permit {
    fn adjust(&self, taken: &Taken, delta: i64) {
        if delta == 0 {
            return;
        }
        match (&self.counters, &taken.local) {
            (Counters::Local, Some(counter)) => {
                counter.fetch_add(delta, Ordering::AcqRel);
            }
            (Counters::Local, None) => {}
            (Counters::Shared(shared), _) => shared.adjust(&taken.key, delta),
        }
    }

    /// Corrects the token reservation to the real count.
    pub fn settle(&mut self, actual_tokens: u64) {
        let actual = i64::try_from(actual_tokens).unwrap_or(i64::MAX);
        let delta = actual - self.reserved_tokens;
        for t in self.taken.iter().filter(|t| t.kind == Kind::Tokens) {
            self.adjust(t, delta);
        }
        self.reserved_tokens = actual;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        for t in self.taken.iter().filter(|t| t.kind == Kind::Concurrency) {
            self.adjust(t, -t.amount);
        }
    }
}

/// A rate-limit check waiting on Redis: the counters asked about, each
/// one's kind, and the blocks asked for the leases.
#[derive(Debug)]
pub struct Pending {
    shared: Arc<Shared>,
    kinds: Vec<Kind>,
    counters: Vec<LimitCounter>,
    asking: Asking,
    tokens: u64,
    window: Window,
}

/// The shared counters `checks` touch, and each one's kind. Refused at once
/// when the estimate alone exceeds a token limit.
fn plan_shared(checks: &[Check], tokens: u64, window: &Window) -> Result<(Vec<Kind>, Vec<LimitCounter>), Throttled> {
    let amount = i64::try_from(tokens).unwrap_or(i64::MAX);
    // Each counter's kind, beside the counters Redis is asked about
    // (whose keys move into the permit once admitted: no copies).
    let mut kinds: Vec<Kind> = Vec::with_capacity(checks.len() * 3);
    let mut counters: Vec<LimitCounter> = Vec::with_capacity(checks.len() * 3);
    for check in checks {
        let mut plan = |kind: Kind, limit: u64, amount: i64, expiry: Expiry| {
            kinds.push(kind);
            counters.push(LimitCounter { key: shared_key(check, kind, window), limit, amount, expiry });
        };
        if let Some(limit) = check.max_concurrent {
            plan(Kind::Concurrency, limit, 1, Expiry::Renewed(INFLIGHT_TTL_MS));
        }
        if let Some(limit) = check.rpm {
            plan(Kind::Requests, limit, 1, Expiry::Created(WINDOW_TTL_MS));
        }
        if let Some(limit) = check.tpm {
            if tokens > limit {
                return Err(Throttled { kind: Kind::Tokens, limit, too_large: true, retry_after: window.remaining() });
            }
            plan(Kind::Tokens, limit, amount, Expiry::Created(WINDOW_TTL_MS));
        }
    }
    Ok((kinds, counters))
}

/// The permit or refusal a shared verdict makes. `None` for a verdict that
/// names no counter asked about (decide locally).
fn judge(
    shared: &Arc<Shared>,
    verdict: Verdict,
    kinds: Vec<Kind>,
    counters: Vec<LimitCounter>,
    tokens: u64,
    window: &Window,
) -> Option<Result<Permit, Throttled>> {
    match verdict {
        Verdict::Refused { index, .. } => {
            let (kind, limit) = (*kinds.get(index)?, counters.get(index)?.limit);
            let retry_after = if kind == Kind::Concurrency { Duration::from_secs(1) } else { window.remaining() };
            Some(Err(Throttled { kind, limit, too_large: false, retry_after }))
        }
        Verdict::Admitted(values) => {
            let taken: Vec<Taken> = counters
                .into_iter()
                .zip(kinds)
                .zip(values)
                .map(|((counter, kind), used)| Taken {
                    kind,
                    key: counter.key,
                    amount: counter.amount,
                    limit: counter.limit,
                    used,
                    local: None,
                })
                .collect();
            let allowance = Taken::allowance(&taken, window.remaining());
            Some(Ok(Permit {
                counters: Counters::Shared(shared.clone()),
                taken,
                reserved_tokens: i64::try_from(tokens).unwrap_or(i64::MAX),
                allowance,
            }))
        }
    }
}

/// A counter's name in Redis (before the deployment's prefix).
fn shared_key(check: &Check, kind: Kind, window: &Window) -> String {
    let mut out = String::with_capacity(check.scope.len() + 27);
    out.push_str("rl:");
    check.write_key(&mut out, kind, window);
    out
}

/// Shared counters outlive their window a little, so late corrections land.
const WINDOW_TTL_MS: u64 = 120_000;
/// In-flight counts left by a replica that died expire after this.
const INFLIGHT_TTL_MS: u64 = 600_000;

impl RateLimiter {
    pub fn new(shared: Option<Arc<Shared>>, replicas: u64, clock: Clock) -> Self {
        Self { local: LocalLimits::default(), shared, replicas: replicas.max(1), clock }
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms().max(0) as u64
    }

    /// Both steps in one: decided at once, else asked of Redis. (The
    /// request path takes them itself, so as to await nothing when it can.)
    #[cfg(test)]
    pub async fn admit(self: &Arc<Self>, checks: &[Check], tokens: u64, now_ms: u64) -> Result<Permit, Throttled> {
        match self.admit_now(checks, tokens, now_ms) {
            Ok(decided) => decided,
            Err(pending) => self.admit_pending(checks, pending).await,
        }
    }

    /// Decides without waiting when it can: on local counters, or from
    /// this replica's leases of the shared ones (most requests). Else the
    /// question for Redis, to hand to [`RateLimiter::admit_pending`] with
    /// the same `checks`; it must follow.
    pub fn admit_now(&self, checks: &[Check], tokens: u64, now_ms: u64) -> Result<Result<Permit, Throttled>, Pending> {
        let window = Window::at(now_ms);
        if let Some(shared) = self.shared.as_ref().filter(|s| s.available()) {
            let (kinds, counters) = match plan_shared(checks, tokens, &window) {
                Ok(planned) => planned,
                Err(throttled) => return Ok(Err(throttled)),
            };
            match shared.admit_leased(&counters) {
                Ok(verdict) => {
                    if let Some(decided) = judge(shared, verdict, kinds, counters, tokens, &window) {
                        return Ok(decided);
                    }
                }
                Err(asking) => {
                    return Err(Pending { shared: shared.clone(), kinds, counters, asking, tokens, window });
                }
            }
        }
        Ok(self.admit_local(checks, tokens, &window))
    }

    /// Asks Redis what [`RateLimiter::admit_now`] could not decide; on
    /// local counters when Redis does not answer.
    pub async fn admit_pending(&self, checks: &[Check], pending: Pending) -> Result<Permit, Throttled> {
        let Pending { shared, kinds, counters, asking, tokens, window } = pending;
        let verdict = shared.admit_asking(&counters, asking).await;
        match verdict.and_then(|verdict| judge(&shared, verdict, kinds, counters, tokens, &window)) {
            Some(decided) => decided,
            None => self.admit_local(checks, tokens, &window),
        }
    }

    /// Admits on this replica's own counters: there is no Redis, or it is
    /// unavailable (each replica then takes its share of the limit).
    fn admit_local(&self, checks: &[Check], tokens: u64, window: &Window) -> Result<Permit, Throttled> {
        let divisor = if self.shared.is_some() { self.replicas } else { 1 };
        let taken = self.local.admit(checks, tokens, window, divisor)?;
        let allowance = Taken::allowance(&taken, window.remaining());
        Ok(Permit {
            counters: Counters::Local,
            taken,
            reserved_tokens: i64::try_from(tokens).unwrap_or(i64::MAX),
            allowance,
        })
    }

    /// Forgets windows older than the previous one.
    pub async fn sweep_loop(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            self.local.sweep(Window::at(self.now_ms()).index.saturating_sub(1));
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
pub fn checks_for(scopes: &LimitScopes, tenant: &Limits, defaults: &Limits, key: &Limits) -> Vec<Check> {
    let tenant_limits = Limits {
        rpm: tenant.rpm.or(defaults.rpm),
        tpm: tenant.tpm.or(defaults.tpm),
        max_concurrent: tenant.max_concurrent.or(defaults.max_concurrent),
    };
    [Check::new(scopes.tenant.clone(), &tenant_limits), Check::new(scopes.key.clone(), key)]
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

    fn format_reset(d: Duration) -> String {
        let mut out = String::new();
        write_reset(&mut out, d);
        out
    }

    #[test]
    fn reset_durations_look_like_openais() {
        assert_eq!(format_reset(Duration::from_millis(12)), "12ms");
        assert_eq!(format_reset(Duration::from_secs(1)), "1s");
        assert_eq!(format_reset(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_reset(Duration::from_secs(360)), "6m0s");
        assert_eq!(format_reset(Duration::from_millis(1050)), "1.05s");
        assert_eq!(format_reset(Duration::from_millis(2005)), "2.005s");
        assert_eq!(format_reset(Duration::from_millis(0)), "0ms");
        assert_eq!(format_reset(Duration::from_millis(59_999)), "59.999s");
        assert_eq!(format_reset(Duration::from_millis(61_500)), "1m1s");
    }

    #[test]
    fn allowance_headers_carry_each_value_under_its_own_name() {
        let mut headers = HeaderMap::new();
        let both =
            Allowance { requests: Some((100, 97)), tokens: Some((50_000, 1_234)), reset: Duration::from_millis(1500) };
        both.write(&mut headers);
        let get = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(get("x-ratelimit-limit-requests").as_deref(), Some("100"));
        assert_eq!(get("x-ratelimit-remaining-requests").as_deref(), Some("97"));
        assert_eq!(get("x-ratelimit-reset-requests").as_deref(), Some("1.5s"));
        assert_eq!(get("x-ratelimit-limit-tokens").as_deref(), Some("50000"));
        assert_eq!(get("x-ratelimit-remaining-tokens").as_deref(), Some("1234"));
        assert_eq!(get("x-ratelimit-reset-tokens").as_deref(), Some("1.5s"));

        let mut headers = HeaderMap::new();
        let tokens_only = Allowance { requests: None, tokens: Some((10, 0)), reset: Duration::from_secs(360) };
        tokens_only.write(&mut headers);
        assert_eq!(headers.len(), 3, "no request headers without a request limit");
        assert_eq!(headers.get("x-ratelimit-remaining-tokens").unwrap(), "0");
        assert_eq!(headers.get("x-ratelimit-reset-tokens").unwrap(), "6m0s");

        let mut headers = HeaderMap::new();
        Allowance { requests: None, tokens: None, reset: Duration::ZERO }.write(&mut headers);
        assert!(headers.is_empty());
    }
}
