//! Admission: rate limits and budgets in one step, held by one guard.
//!
//! [`admit`] takes the request's in-flight slot and token estimate from the
//! rate limits and reserves its worst-case cost on its budgets, both at
//! once (one round trip to Redis when it holds them); if either refuses,
//! what the other took is given back at once. The
//! [`Admission`] it returns is settled exactly once with the real usage and
//! cost ([`Admission::settle`]); dropped unsettled (a failure before
//! anything was billed), it gives back everything it holds.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::Proxy;
use crate::accounting::format_usd;
use crate::auth::Principal;
use crate::budget::{self, Reservation};
use crate::error::GatewayError;
use crate::limits::{self, Allowance, Permit};
use crate::telemetry::traces::Stage;
use opentelemetry::trace::SpanKind;

/// What a request asks of the limits and budgets.
#[derive(Debug, Clone, Copy)]
pub struct Demand<'a> {
    /// Every model the request may be served by: the dearest bounds the
    /// cost, so a fallback can never pass a hard budget.
    pub models: &'a [&'a str],
    /// Bytes of the body that will be forwarded (the prompt's upper bound in
    /// tokens; a quarter of it is the rate limits' estimate).
    pub forwarded_bytes: usize,
    /// The most output tokens the request may produce, all choices together.
    pub max_output: u64,
}

/// What the response tells the client about its limits and budget.
#[derive(Debug, Default, Clone, Copy)]
pub struct Grants {
    allowance: Option<Allowance>,
    remaining_budget: Option<i64>,
}

/// What the client is told about the tightest hard budget's remainder.
// A `HeaderName` constant rather than a `&str`: a string name is
// validated again on every insert.
pub const BUDGET_HEADER: HeaderName = HeaderName::from_static("x-tollgate-budget-remaining-usd");

/// The most headers [`Grants::write`] adds: three per rate limit kind
/// (requests, tokens) and the budget's.
const GRANT_HEADERS: usize = 7;

impl Grants {
    pub fn write(&self, headers: &mut HeaderMap) {
        // Room for every header at once: the upstream's map is sized for its
        // own, and growing it one insert at a time rehashes it each time.
        if self.allowance.is_some() || self.remaining_budget.is_some() {
            headers.reserve(GRANT_HEADERS);
        }
        if let Some(allowance) = &self.allowance {
            allowance.write(headers);
        }
        if let Some(remaining) = self.remaining_budget
            && let Ok(value) = HeaderValue::from_str(&format_usd(remaining.max(0)))
        {
            headers.insert(BUDGET_HEADER, value);
        }
    }
}

/// A request's hold on the rate limits and budgets.
#[derive(Debug, Default)]
pub struct Admission {
    permit: Option<Permit>,
    reservations: Vec<Reservation>,
    grants: Grants,
}

impl Admission {
    pub fn grants(&self) -> Grants {
        self.grants
    }

    /// Replaces the estimates with what the request really used and cost.
    pub fn settle(mut self, tokens: u64, cost_micros: i64) {
        if let Some(mut permit) = self.permit.take() {
            permit.settle(tokens);
        }
        for reservation in self.reservations.drain(..) {
            reservation.settle(cost_micros);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        // Unsettled: nothing was used or billed. The permit gives its
        // in-flight slot back and each reservation its amount by itself when
        // dropped; the token estimate is corrected to nothing here.
        if let Some(permit) = self.permit.as_mut() {
            permit.settle(0);
        }
    }
}

/// Admits a request against its tenant's and key's limits and budgets.
///
/// The two checks run together: with Redis, both queue at once and go out
/// in the same script call (see `shared`), so admission costs one round
/// trip, not two. Whatever one of them took is given back (by dropping the
/// `Admission`) when the other refuses; a refusal by the rate limits is the
/// one reported when both refuse.
pub async fn admit(
    proxy: &Proxy,
    principal: &Principal,
    demand: Demand<'_>,
    stage: &Stage,
) -> Result<Admission, GatewayError> {
    let checks = limits::checks_for(
        principal.tenant_id(),
        &principal.tenant.policy.limits,
        &proxy.limits.defaults(),
        &principal.key.id,
        &principal.key.limits,
    );
    let budgets = proxy.budgets.applicable(principal.tenant_id(), &principal.key.id);
    let limits = async {
        if checks.is_empty() {
            return Ok(None);
        }
        let span = stage.child("rate_limits", SpanKind::Internal);
        let estimate = (demand.forwarded_bytes as u64 / 4).saturating_add(demand.max_output);
        let now = u64::try_from(proxy.clock.now_ms()).unwrap_or(0);
        let result = proxy.limiter.admit(&checks, estimate, now).await.map(Some).map_err(GatewayError::RateLimited);
        span.set_all(&[
            ("tollgate.limits.checks", checks.len().into()),
            ("tollgate.limits.estimated_tokens", estimate.into()),
        ]);
        refused_on(&span, result.as_ref().err());
        result
    };
    let reserved = async {
        if budgets.is_empty() {
            return Ok(Vec::new());
        }
        let span = stage.child("budgets", SpanKind::Internal);
        span.set("tollgate.budgets", budgets.len());
        let result = reserve(proxy, &budgets, demand, &span).await;
        refused_on(&span, result.as_ref().err());
        result
    };
    let (permit, reserved) = tokio::join!(limits, reserved);
    let mut admission = Admission::default();
    let limits_refusal = match permit {
        Ok(permit) => {
            if let Some(permit) = permit {
                admission.grants.allowance = Some(permit.allowance);
                admission.permit = Some(permit);
            }
            None
        }
        Err(refusal) => Some(refusal),
    };
    let budget_refusal = match reserved {
        Ok(reservations) => {
            admission.grants.remaining_budget = Reservation::remaining(&reservations);
            admission.reservations = reservations;
            None
        }
        Err(refusal) => Some(refusal),
    };
    // On refusal `admission` is dropped here, giving back what was taken.
    match limits_refusal.or(budget_refusal) {
        Some(refusal) => {
            stage.set("tollgate.admission.result", refusal.code());
            Err(refusal)
        }
        None => {
            stage.set("tollgate.admission.result", "admitted");
            Ok(admission)
        }
    }
}

/// Marks a check's span with the refusal it made, if any.
fn refused_on(span: &Stage, refusal: Option<&GatewayError>) {
    if let Some(refusal) = refusal {
        span.set("error.type", refusal.code());
        span.fail(refusal.code());
    }
}

/// Reserves the request's worst case on its budgets: the prompt at the
/// input price and the whole output limit at the output price. The prompt
/// bound is the forwarded body's length in bytes: every tokenizer in use
/// (byte-level BPE, SentencePiece with byte fallback) spends at least one
/// byte of text per token, whatever the script, so no prompt can have more
/// tokens than its request has bytes.
async fn reserve(
    proxy: &Proxy,
    budgets: &[Arc<budget::BudgetState>],
    demand: Demand<'_>,
    span: &Stage,
) -> Result<Vec<Reservation>, GatewayError> {
    let mut worst = 0i64;
    for model in demand.models {
        match proxy.accounting.worst_case_micros(model, demand.forwarded_bytes as u64, demand.max_output) {
            Some(cost) => worst = worst.max(cost),
            // Nothing to bound the cost with: only soft budgets can take it.
            None if budgets.iter().any(|b| b.budget.hard) => {
                return Err(GatewayError::UnpricedUnderBudget((*model).to_owned()));
            }
            None => {}
        }
    }
    span.set("tollgate.budgets.worst_case_micros", worst);
    let waiting = budget::Waiting { max_wait: proxy.limits.budget_wait, ..budget::Waiting::default() };
    budget::admit(proxy.shared.as_ref(), budgets, worst, proxy.clock.today(), waiting).await.map_err(|refusal| {
        match refusal {
            budget::Refusal::Exhausted { budget_id, period } => GatewayError::BudgetExhausted { budget_id, period },
            budget::Refusal::Busy { budget_id, retry_after } => GatewayError::BudgetBusy { budget_id, retry_after },
        }
    })
}
