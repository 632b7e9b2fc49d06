//! The forward stage: pick a target, try it, retry it, fall back.
//!
//! Without a route, the request goes once to the default upstream, as it
//! always did. With one, each fallback group is tried in order: a target is
//! picked by weight (sticky when the route says so, and scaled by its
//! circuit breaker), tried up to `attempts_per_target` times with
//! full-jitter backoff (honouring the upstream's `retry-after`), then
//! another target of the group, then the next group, all within the route's
//! deadline. Only failures the route lists are tried again; any other
//! answer, a 400 above all, is final. When every target's breaker is open,
//! the first group's heaviest target is tried anyway: a route never ejects
//! its last target.
//!
//! Everything here happens before the first byte reaches the client, so a
//! retry or a fallback is invisible to it.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;
use tollgate_openai::RequestPeek;
use tollgate_openai::rewrite::set_members;
use tollgate_store::TenantPolicy;

use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::request_id::RequestId;
use crate::routing::backoff::retry_after;
use crate::routing::breaker::Admission as BreakerAdmission;
use crate::routing::choice;
use crate::routing::config::{RetryOn, Sticky};
use crate::routing::table::{Route, Target};
use crate::upstream::{FailureKind, Phase, Upstream, UpstreamFailure, UpstreamResponse};

/// What served a request.
#[derive(Debug)]
pub struct Served<'a> {
    pub response: UpstreamResponse,
    pub upstream: &'a Upstream,
    pub upstream_name: &'a str,
    pub model: String,
    pub attempts: u32,
    /// The target's label, when a route chose it.
    pub target: Option<&'a str>,
}

/// What one request carries into the forward stage.
pub struct Call<'a> {
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub request_id: &'a RequestId,
    /// The body as the policy left it (and with the usage option).
    pub body: &'a Bytes,
    pub peek: &'a RequestPeek<'a>,
    pub requested_model: &'a str,
    pub policy: &'a TenantPolicy,
    /// Whether the request (or the policy) set an output limit.
    pub has_output_limit: bool,
    pub key_id: &'a str,
    pub tenant_id: &'a str,
    pub metrics: &'a Metrics,
}

/// The `outcome` label of one attempt.
fn outcome(result: &Result<UpstreamResponse, UpstreamFailure>) -> &'static str {
    match result {
        Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        Ok(r) if r.status().is_server_error() => "server_error",
        Ok(r) if r.status().is_client_error() => "client_error",
        Ok(_) => "ok",
        Err(UpstreamFailure { phase: Phase::BeforeSend, .. }) => "connect",
        Err(UpstreamFailure { kind: FailureKind::Timeout, .. }) => "timeout",
        Err(UpstreamFailure { kind: FailureKind::Unreachable, .. }) => "server_error",
    }
}

/// Milliseconds of a monotonic clock, for the breakers.
pub fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    u64::try_from(START.get_or_init(std::time::Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Sends the request once to `upstream`, with no route.
pub async fn direct<'a>(upstream: &'a Upstream, call: &Call<'_>, body: Bytes) -> Result<Served<'a>, GatewayError> {
    let result = upstream.send(Method::POST, call.path, call.headers, call.request_id, Some(body)).await;
    call.metrics.upstream_attempts.with_label_values(&["default", "-", outcome(&result)]).inc();
    let response = result?;
    Ok(Served {
        response,
        upstream,
        upstream_name: "default",
        model: call.requested_model.to_owned(),
        attempts: 1,
        target: None,
    })
}

/// How one attempt ended, for the route.
enum Verdict {
    /// An answer to relay (a success, or an error no retry can help).
    Final,
    /// A failure the route may try again.
    Retry { class: RetryOn, after: Option<Duration> },
}

fn judge(result: &Result<UpstreamResponse, UpstreamFailure>) -> (Verdict, bool) {
    match result {
        Ok(response) => {
            let status = response.status();
            if status == StatusCode::TOO_MANY_REQUESTS {
                (Verdict::Retry { class: RetryOn::RateLimited, after: retry_after(response.headers()) }, false)
            } else if status.is_server_error() {
                (Verdict::Retry { class: RetryOn::ServerError, after: retry_after(response.headers()) }, false)
            } else {
                (Verdict::Final, true)
            }
        }
        Err(UpstreamFailure { phase: Phase::BeforeSend, .. }) => {
            (Verdict::Retry { class: RetryOn::Connect, after: None }, false)
        }
        Err(UpstreamFailure { kind: FailureKind::Timeout, .. }) => {
            (Verdict::Retry { class: RetryOn::Timeout, after: None }, false)
        }
        Err(UpstreamFailure { kind: FailureKind::Unreachable, .. }) => {
            (Verdict::Retry { class: RetryOn::ServerError, after: None }, false)
        }
    }
}

/// The caller identity a sticky route hashes.
fn sticky_identity<'a>(route: &Route, call: &'a Call<'a>) -> Option<&'a str> {
    match route.sticky? {
        Sticky::Key => Some(call.key_id),
        Sticky::Tenant => Some(call.tenant_id),
        Sticky::User => Some(call.peek.user.as_deref().unwrap_or(call.key_id)),
    }
}

/// Sends the request along `route`.
pub async fn routed<'a>(route: &'a Route, call: &Call<'_>) -> Result<Served<'a>, GatewayError> {
    let deadline = Instant::now() + route.deadline;
    let sticky = sticky_identity(route, call);
    let mut attempts = 0u32;
    let mut last: Option<(Result<UpstreamResponse, UpstreamFailure>, &'a Target)> = None;
    for group in &route.groups {
        let mut tried = vec![false; group.targets.len()];
        loop {
            let now = monotonic_ms();
            let weights: Vec<u64> = group
                .targets
                .iter()
                .zip(&tried)
                .map(|(t, done)| if *done { 0 } else { t.weight.saturating_mul(t.breaker.weight_factor(now)) / 1000 })
                .collect();
            let Some(index) = choice::pick(&weights, sticky, rand::random::<f64>()) else { break };
            tried[index] = true;
            let target = &group.targets[index];
            for attempt in 1..=route.attempts_per_target {
                if Instant::now() >= deadline {
                    return finish_failed(last, attempts);
                }
                let admission = target.breaker.admit(monotonic_ms());
                if admission == BreakerAdmission::Refused {
                    break;
                }
                attempts += 1;
                let result = try_target(target, call).await?;
                let (verdict, healthy) = judge(&result);
                target.breaker.record(admission, healthy, monotonic_ms());
                match verdict {
                    Verdict::Final => return served(result, target, call, attempts),
                    Verdict::Retry { class, .. } if !route.retries(class) => {
                        return served(result, target, call, attempts);
                    }
                    Verdict::Retry { after, .. } => {
                        last = Some((result, target));
                        if attempt < route.attempts_per_target {
                            let wait = route.backoff.delay(attempt, rand::random::<f64>(), after);
                            tokio::time::sleep_until((Instant::now() + wait).min(deadline)).await;
                        }
                    }
                }
            }
        }
    }
    if attempts == 0 {
        // Every breaker is open: the route still answers, through its
        // first group's heaviest target.
        if let Some(target) = route.groups.first().and_then(|g| g.targets.iter().max_by_key(|t| t.weight)) {
            let result = try_target(target, call).await?;
            let (_, healthy) = judge(&result);
            target.breaker.record(BreakerAdmission::Allowed, healthy, monotonic_ms());
            return served(result, target, call, 1);
        }
    }
    finish_failed(last, attempts)
}

async fn try_target(
    target: &Target,
    call: &Call<'_>,
) -> Result<Result<UpstreamResponse, UpstreamFailure>, GatewayError> {
    let body = body_for(target, call)?;
    let result = target.upstream.send(Method::POST, call.path, call.headers, call.request_id, Some(body)).await;
    call.metrics.upstream_attempts.with_label_values(&[&target.upstream_name, &target.label, outcome(&result)]).inc();
    Ok(result)
}

fn served<'a>(
    result: Result<UpstreamResponse, UpstreamFailure>,
    target: &'a Target,
    call: &Call<'_>,
    attempts: u32,
) -> Result<Served<'a>, GatewayError> {
    Ok(Served {
        response: result?,
        upstream: &target.upstream,
        upstream_name: &target.upstream_name,
        model: target.model_for(call.requested_model).to_owned(),
        attempts,
        target: Some(&target.label),
    })
}

/// Every attempt failed: the last upstream answer is relayed as it was (a
/// 503 stays a 503), or the last transport failure becomes the error.
fn finish_failed<'a>(
    last: Option<(Result<UpstreamResponse, UpstreamFailure>, &'a Target)>,
    attempts: u32,
) -> Result<Served<'a>, GatewayError> {
    match last {
        Some((Ok(response), target)) => Ok(Served {
            response,
            upstream: &target.upstream,
            upstream_name: &target.upstream_name,
            model: target.model.clone().unwrap_or_default(),
            attempts,
            target: Some(&target.label),
        }),
        Some((Err(failure), _)) => Err(failure.into()),
        None => Err(GatewayError::UpstreamTimeout),
    }
}

/// The body a target gets: its model, and its overrides within the
/// tenant's caps. The client's bytes when nothing changes.
fn body_for(target: &Target, call: &Call<'_>) -> Result<Bytes, GatewayError> {
    let mut edits: Vec<(&str, Option<Value>)> = Vec::new();
    if let Some(model) = &target.model
        && model != call.requested_model
    {
        edits.push(("model", Some(json!(model))));
    }
    let overrides = &target.overrides;
    if let Some(budget) = overrides.thinking_budget {
        let budget = call.policy.max_thinking_budget.map_or(budget, |cap| budget.min(cap));
        let mut google: Value = serde_json::from_slice::<Value>(call.body)
            .ok()
            .and_then(|v| v.get("google").cloned())
            .filter(Value::is_object)
            .unwrap_or_else(|| json!({}));
        if !google["thinking_config"].is_object() {
            google["thinking_config"] = json!({});
        }
        google["thinking_config"]["thinking_budget"] = json!(budget);
        edits.push(("google", Some(google)));
    }
    if let Some(effort) = &overrides.reasoning_effort {
        let capped = match (call.policy.max_reasoning_effort, tollgate_store::ReasoningEffort::parse(effort)) {
            (Some(max), Some(asked)) if asked > max => max.as_str().to_owned(),
            _ => effort.clone(),
        };
        edits.push(("reasoning_effort", Some(json!(capped))));
    }
    if let Some(limit) = overrides.default_max_tokens
        && !call.has_output_limit
    {
        let limit = call.policy.max_output_tokens.map_or(limit, |cap| limit.min(cap));
        let member = if call.path == "/responses" { "max_output_tokens" } else { "max_tokens" };
        edits.push((member, Some(json!(limit))));
    }
    if edits.is_empty() {
        return Ok(call.body.clone());
    }
    set_members(call.body, &edits).map(Bytes::from).ok_or(GatewayError::PolicyUncheckable)
}
