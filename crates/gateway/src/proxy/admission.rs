//! Admission: rate limits and budgets in one step, held by one guard.
//!
//! [`admit`] takes the request's in-flight slot and token estimate from the
//! rate limits and reserves its worst-case cost on its budgets, both at
//! once (one round trip to Redis when it holds them); if either refuses,
//! what the other took is given back at once. The
//! [`Admission`] it returns is settled exactly once with the real usage and
//! cost ([`Admission::settle`]); dropped unsettled (a failure before
//! anything was billed), it gives back everything it holds.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::Proxy;
use crate::accounting::format_usd;
use crate::auth::Principal;
use crate::budget::{self, Reservation};
use crate::error::GatewayError;
use crate::limits::{self, Allowance, Permit};
use crate::telemetry::traces::{Attribute, Stage};
use smallvec::SmallVec;

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

/// An admission decided at once, or the part that waits on Redis or on
/// other requests' reservations.
pub enum Admitting<'a> {
    Now(Result<Admission, GatewayError>),
    Later(Pin<Box<dyn Future<Output = Result<Admission, GatewayError>> + Send + 'a>>),
}

/// Admits a request against its tenant's and key's limits and budgets.
///
/// Most requests are decided here without waiting: on local counters, or
/// from the blocks this replica leases of the shared ones. Only a request
/// that needs Redis, or waits for other requests' reservations, gets a
/// future, boxed: the common path then neither builds nor moves the
/// kilobytes of state the waiting takes. The two checks' waits run
/// together: with Redis, both queue at once and go out in the same script
/// call (see `shared`), so admission costs one round trip, not two.
/// Whatever one of them took is given back (by dropping the `Admission`)
/// when the other refuses; a refusal by the rate limits is the one reported
/// when both refuse.
pub fn admit<'a>(proxy: &'a Proxy, principal: &Principal, demand: Demand<'_>, stage: &'a Stage) -> Admitting<'a> {
    let checks = limits::checks_for(
        &principal.key.limit_scopes,
        &principal.tenant.policy.limits,
        &proxy.limits.defaults(),
        &principal.key.limits,
    );
    let budgets = proxy.budgets.applicable(principal.tenant_id(), &principal.key.id);
    let estimate = (demand.forwarded_bytes as u64 / 4).saturating_add(demand.max_output);
    let worst = if budgets.is_empty() { Ok(0) } else { worst_case(proxy, &budgets, demand) };
    let asked = Asked { checks: checks.len(), estimate, budgets: budgets.len(), worst: *worst.as_ref().unwrap_or(&0) };
    let limits = if checks.is_empty() {
        Ok(Ok(None))
    } else {
        let now = u64::try_from(proxy.clock.now_ms()).unwrap_or(0);
        proxy
            .limiter
            .admit_now(&checks, estimate, now)
            .map(|decided| decided.map(Some).map_err(GatewayError::RateLimited))
    };
    let reserved = match worst {
        _ if budgets.is_empty() => Ok(Ok(Vec::new())),
        Err(unpriced) => Ok(Err(unpriced)),
        Ok(worst) => {
            let waiting = budget::Waiting { max_wait: proxy.limits.budget_wait, ..budget::Waiting::default() };
            budget::admit_now(proxy.shared.as_ref(), &budgets, worst, proxy.clock.today(), waiting)
                .map(|decided| decided.map_err(budget_refusal))
        }
    };
    let (limits, reserved) = match (limits, reserved) {
        (Ok(limits), Ok(reserved)) => return Admitting::Now(conclude(limits, reserved, asked, stage)),
        pending => pending,
    };
    Admitting::Later(Box::pin(async move {
        let limits = async {
            match limits {
                Ok(decided) => decided,
                Err(pending) => {
                    proxy.limiter.admit_pending(&checks, pending).await.map(Some).map_err(GatewayError::RateLimited)
                }
            }
        };
        let reserved = async {
            match reserved {
                Ok(decided) => decided,
                Err(pending) => budget::admit_pending(&budgets, pending).await.map_err(budget_refusal),
            }
        };
        let (limits, reserved) = tokio::join!(limits, reserved);
        conclude(limits, reserved, asked, stage)
    }))
}

/// What the checks were asked for, for the admission's span.
#[derive(Debug, Clone, Copy)]
struct Asked {
    checks: usize,
    estimate: u64,
    budgets: usize,
    worst: i64,
}

/// The admission both checks' outcomes make, or the refusal to report.
fn conclude(
    limits: Result<Option<Permit>, GatewayError>,
    reserved: Result<Vec<Reservation>, GatewayError>,
    asked: Asked,
    stage: &Stage,
) -> Result<Admission, GatewayError> {
    let mut admission = Admission::default();
    let limits_refusal = match limits {
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
    let refusal = limits_refusal.or(budget_refusal);
    if stage.is_on() {
        describe(stage, asked, refusal.as_ref());
    }
    match refusal {
        Some(refusal) => Err(refusal),
        None => Ok(admission),
    }
}

fn budget_refusal(refusal: budget::Refusal) -> GatewayError {
    match refusal {
        budget::Refusal::Exhausted { budget_id, period } => GatewayError::BudgetExhausted { budget_id, period },
        budget::Refusal::Busy { budget_id, retry_after } => GatewayError::BudgetBusy { budget_id, retry_after },
    }
}

/// What the admission's span says: the checks made, what they were asked
/// for, and the outcome. The rate limits and budgets are attributes of this
/// one span, not spans of their own: decided in memory (local counters, a
/// lease) they take about a microsecond, and a span each cost more than the
/// checks themselves (with Redis, the admission's own span times the round
/// trip both share).
fn describe(stage: &Stage, asked: Asked, refusal: Option<&GatewayError>) {
    let Asked { checks, estimate, budgets, worst } = asked;
    let result = refusal.map_or("admitted", GatewayError::code);
    let mut attributes = SmallVec::<[Attribute<'_>; 6]>::new();
    attributes.push(("tollgate.admission.result", result.into()));
    if checks > 0 {
        attributes.push(("tollgate.limits.checks", checks.into()));
        attributes.push(("tollgate.limits.estimated_tokens", estimate.into()));
    }
    if budgets > 0 {
        attributes.push(("tollgate.budgets", budgets.into()));
        attributes.push(("tollgate.budgets.worst_case_micros", worst.into()));
    }
    if let Some(refusal) = refusal {
        attributes.push(("error.type", refusal.code().into()));
        stage.fail(refusal.code());
    }
    stage.set_all(&attributes);
}

/// The request's worst-case cost on its budgets: the prompt at the input
/// price and the whole output limit at the output price, for the dearest of
/// the models that may serve it. The prompt bound is the forwarded body's
/// length in bytes: every tokenizer in use (byte-level BPE, SentencePiece
/// with byte fallback) spends at least one byte of text per token, whatever
/// the script, so no prompt can have more tokens than its request has bytes.
fn worst_case(proxy: &Proxy, budgets: &[Arc<budget::BudgetState>], demand: Demand<'_>) -> Result<i64, GatewayError> {
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
    Ok(worst)
}
