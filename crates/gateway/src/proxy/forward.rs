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
use crate::telemetry::traces::{RequestTrace, Stage};
use crate::upstream::{FailureKind, Outbound, Phase, Upstream, UpstreamBody, UpstreamFailure, UpstreamResponse};
use opentelemetry::trace::SpanKind;
use tollgate_openai::Api;

/// What served a request.
#[derive(Debug)]
pub struct Served<'a> {
    pub response: http::Response<UpstreamBody>,
    /// The target that served, when a route chose it.
    pub by: Option<&'a Target>,
    pub upstream: &'a Upstream,
    pub model: String,
    pub attempts: u32,
}

impl Served<'_> {
    /// The upstream's name (`default` without a route).
    pub fn upstream_name(&self) -> &str {
        self.by.map_or("default", |t| t.upstream_name.as_str())
    }
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
    /// The request's server span, when traces are exported.
    pub trace: Option<&'a RequestTrace>,
    /// The API the request is in.
    pub api: Api,
}

impl Call<'_> {
    /// The upstream path for `model`: a Gemini call names its model in the
    /// path (`path` is then `:method` and any query); the others carry it
    /// in the body.
    fn path_for(&self, model: &str) -> std::borrow::Cow<'_, str> {
        match self.api {
            Api::Gemini => std::borrow::Cow::Owned(format!("/models/{model}{}", self.path)),
            _ => std::borrow::Cow::Borrowed(self.path),
        }
    }

    fn outbound<'b>(&'b self, path: &'b str, stage: &Stage) -> Outbound<'b> {
        Outbound {
            method: Method::POST,
            api: self.api,
            path,
            client_headers: self.headers,
            request_id: self.request_id,
            traceparent: stage.traceparent(),
        }
    }
}

/// Why an attempt is made, on its span: `first`, `retry:<failure>` (the
/// same target again) or `fallback:<failure>` (another target or group).
#[derive(Debug, Clone, Copy)]
enum Reason {
    First,
    Retry(RetryOn),
    Fallback(RetryOn),
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::First => "first",
            Reason::Retry(class) => match class {
                RetryOn::Connect => "retry:connect",
                RetryOn::Timeout => "retry:timeout",
                RetryOn::RateLimited => "retry:rate_limited",
                RetryOn::ServerError => "retry:server_error",
                RetryOn::ContextLength => "retry:context_length",
            },
            Reason::Fallback(class) => match class {
                RetryOn::Connect => "fallback:connect",
                RetryOn::Timeout => "fallback:timeout",
                RetryOn::RateLimited => "fallback:rate_limited",
                RetryOn::ServerError => "fallback:server_error",
                RetryOn::ContextLength => "fallback:context_length",
            },
        }
    }
}

/// The GenAI operation an endpoint performs (`gen_ai.operation.name`).
/// `path` is what follows the API root (for Gemini, the model's method).
fn operation(path: &str) -> &'static str {
    match path {
        "/chat/completions" | "/messages" => "chat",
        "/completions" => "text_completion",
        "/embeddings" | ":embedContent" | ":batchEmbedContents" => "embeddings",
        ":countTokens" | "/messages/count_tokens" => "count_tokens",
        _ => "generate_content",
    }
}

/// The span of one attempt: a client span named as the GenAI conventions
/// name a model call (`chat gpt-4.1`).
fn attempt_stage(
    call: &Call<'_>,
    upstream: &Upstream,
    labels: (&str, &str),
    model: &str,
    n: u32,
    reason: Reason,
) -> Stage {
    let Some(trace) = call.trace else { return Stage::default() };
    let op = operation(call.path);
    let stage = trace.child_named(crate::telemetry::traces::span_name(op, model), SpanKind::Client);
    let (upstream_name, target) = labels;
    let reason = reason.as_str();
    let (host, port) = upstream.authority();
    let attributes = [
        ("gen_ai.operation.name", op.into()),
        ("gen_ai.request.model", model.into()),
        ("tollgate.upstream", upstream_name.into()),
        ("tollgate.attempt", n.into()),
        ("tollgate.attempt.reason", reason.into()),
        ("server.address", host.into()),
        ("server.port", port.into()),
        ("tollgate.target", target.into()),
    ];
    // The target is left out where there is none (`-`).
    let count = if target == "-" { attributes.len() - 1 } else { attributes.len() };
    stage.set_all(&attributes[..count]);
    stage
}

/// What an attempt's answer was, on its span.
fn record_attempt(stage: &Stage, result: &Result<UpstreamResponse, UpstreamFailure>) {
    if !stage.is_on() {
        return;
    }
    let label = outcome(result);
    stage.set("tollgate.attempt.outcome", label);
    match result {
        Ok(response) => {
            stage.set("http.response.status_code", response.status().as_u16());
            if !response.status().is_success() {
                stage.set("error.type", response.status().as_str());
            }
            if response.status().is_server_error() || response.status() == StatusCode::TOO_MANY_REQUESTS {
                stage.fail(label);
            }
        }
        Err(_) => {
            stage.set("error.type", label);
            stage.fail(label);
        }
    }
}

/// The `outcome` label of one attempt.
fn outcome(result: &Result<UpstreamResponse, UpstreamFailure>) -> &'static str {
    match result {
        Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => "rate_limited",
        Ok(r) if r.status().is_server_error() => "server_error",
        Ok(r) if r.status().is_client_error() => "client_error",
        Ok(_) => "ok",
        Err(UpstreamFailure { kind: FailureKind::AtCapacity, .. }) => "at_capacity",
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
    let stage = attempt_stage(call, upstream, ("default", "-"), call.requested_model, 1, Reason::First);
    let path = call.path_for(call.requested_model);
    let result = upstream.send(call.outbound(&path, &stage), Some(body)).await;
    record_attempt(&stage, &result);
    drop(stage);
    call.metrics.upstream_attempts.with_label_values(&["default", "-", outcome(&result)]).inc();
    let response = result?.map(UpstreamBody::Live);
    Ok(Served { response, upstream, model: call.requested_model.to_owned(), attempts: 1, by: None })
}

/// An answer as the relay takes it.
type Answer = http::Response<UpstreamBody>;

/// How one attempt ended, for the route.
enum Verdict {
    /// An answer to relay (a success, or an error no retry can help).
    Final,
    /// A failure the route may try again; `next_group`: not on this group
    /// (the prompt is too long for its models).
    Retry { class: RetryOn, after: Option<Duration>, next_group: bool },
}

fn retry(class: RetryOn, after: Option<Duration>) -> Verdict {
    Verdict::Retry { class, after, next_group: false }
}

/// The largest error body read to look for a context-length refusal.
const MAX_ERROR_BODY: usize = 1024 * 1024;

/// Whether an upstream's 400 says the prompt is too long for the model.
fn is_context_length(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    ["context_length_exceeded", "context length", "context window", "maximum context", "prompt is too long"]
        .iter()
        .any(|needle| text.contains(needle))
}

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Looks at an attempt's answer before committing to it: the status, the
/// body of a 400 when the route falls back on context length, and the
/// first piece of a stream (a stream that fails before it can still fall
/// back; one that has sent it is relayed, whatever happens next). Returns
/// the answer, the verdict, and whether the target looked healthy.
async fn look(
    route: &Route,
    upstream: &Upstream,
    result: Result<UpstreamResponse, UpstreamFailure>,
) -> (Result<Answer, UpstreamFailure>, Verdict, bool) {
    let response = match result {
        Ok(response) => response,
        Err(failure) => {
            let class = match failure {
                UpstreamFailure { phase: Phase::BeforeSend, .. }
                | UpstreamFailure { kind: FailureKind::AtCapacity, .. } => RetryOn::Connect,
                UpstreamFailure { kind: FailureKind::Timeout, .. } => RetryOn::Timeout,
                UpstreamFailure { kind: FailureKind::Unreachable, .. } => RetryOn::ServerError,
            };
            return (Err(failure), retry(class, None), false);
        }
    };
    let status = response.status();
    let (head, body) = response.into_parts();
    let live = |head, body| Ok(http::Response::from_parts(head, UpstreamBody::Live(body)));
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let class = if status.is_server_error() { RetryOn::ServerError } else { RetryOn::RateLimited };
        let after = retry_after(&head.headers);
        return (live(head, body), retry(class, after), false);
    }
    if status == StatusCode::BAD_REQUEST && route.retries(RetryOn::ContextLength) {
        let mut body = UpstreamBody::Live(body);
        let mut read = Vec::new();
        while read.len() <= MAX_ERROR_BODY {
            match tokio::time::timeout(upstream.idle_timeout(), body.next_chunk()).await {
                Ok(Ok(Some(chunk))) => read.extend_from_slice(&chunk),
                Ok(Ok(None)) => break,
                _ => {
                    return (
                        Err(UpstreamFailure { phase: Phase::AfterHeaders, kind: FailureKind::Unreachable }),
                        retry(RetryOn::ServerError, None),
                        false,
                    );
                }
            }
        }
        let too_long = is_context_length(&read);
        let answer = Ok(http::Response::from_parts(head, UpstreamBody::Read(Some(Bytes::from(read)))));
        if too_long {
            return (answer, Verdict::Retry { class: RetryOn::ContextLength, after: None, next_group: true }, true);
        }
        return (answer, Verdict::Final, true);
    }
    if status.is_success() && is_event_stream(&head.headers) {
        let mut rest = body;
        return match tokio::time::timeout(upstream.idle_timeout(), crate::upstream::next_chunk(&mut rest)).await {
            Ok(Ok(first)) => {
                (Ok(http::Response::from_parts(head, UpstreamBody::Started { first, rest })), Verdict::Final, true)
            }
            Ok(Err(_)) => (
                Err(UpstreamFailure { phase: Phase::AfterHeaders, kind: FailureKind::Unreachable }),
                retry(RetryOn::ServerError, None),
                false,
            ),
            Err(_) => (
                Err(UpstreamFailure { phase: Phase::AfterHeaders, kind: FailureKind::Timeout }),
                retry(RetryOn::Timeout, None),
                false,
            ),
        };
    }
    (live(head, body), Verdict::Final, true)
}

/// A failed answer kept only in case it is the last: its in-flight slot is
/// given back at once, so the retry it leads to can take one.
fn without_slot(answer: Result<Answer, UpstreamFailure>) -> Result<Answer, UpstreamFailure> {
    answer.map(|mut a| {
        a.extensions_mut().remove::<crate::upstream::InFlightSlot>();
        a
    })
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
    let mut last: Option<(Result<Answer, UpstreamFailure>, &'a Target)> = None;
    // Why the next attempt is made, for its span.
    let mut reason = Reason::First;
    'groups: for group in &route.groups {
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
                    return finish_failed(last, call, attempts);
                }
                let admission = target.breaker.admit(monotonic_ms());
                if admission == BreakerAdmission::Refused {
                    break;
                }
                attempts += 1;
                let stage = attempt_stage(
                    call,
                    &target.upstream,
                    (&target.upstream_name, &target.label),
                    target.model_for(call.requested_model),
                    attempts,
                    reason,
                );
                let result = try_target(target, call, &stage).await?;
                let (answer, verdict, healthy) = look(route, &target.upstream, result).await;
                target.breaker.record(admission, healthy, monotonic_ms());
                if let Verdict::Retry { class, .. } = &verdict {
                    stage.set("tollgate.attempt.retryable", route.retries(*class));
                    reason = if attempt < route.attempts_per_target {
                        Reason::Retry(*class)
                    } else {
                        Reason::Fallback(*class)
                    };
                    if matches!(verdict, Verdict::Retry { next_group: true, .. }) {
                        reason = Reason::Fallback(*class);
                    }
                }
                drop(stage);
                match verdict {
                    Verdict::Final => return served(answer, target, call, attempts),
                    Verdict::Retry { class, .. } if !route.retries(class) => {
                        return served(answer, target, call, attempts);
                    }
                    Verdict::Retry { next_group: true, .. } => {
                        last = Some((without_slot(answer), target));
                        continue 'groups;
                    }
                    Verdict::Retry { after, .. } => {
                        last = Some((without_slot(answer), target));
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
            let stage = attempt_stage(
                call,
                &target.upstream,
                (&target.upstream_name, &target.label),
                target.model_for(call.requested_model),
                1,
                reason,
            );
            stage.set("tollgate.attempt.breakers_open", true);
            let result = try_target(target, call, &stage).await?;
            let (answer, _, healthy) = look(route, &target.upstream, result).await;
            target.breaker.record(BreakerAdmission::Allowed, healthy, monotonic_ms());
            return served(answer, target, call, 1);
        }
    }
    finish_failed(last, call, attempts)
}

async fn try_target(
    target: &Target,
    call: &Call<'_>,
    stage: &Stage,
) -> Result<Result<UpstreamResponse, UpstreamFailure>, GatewayError> {
    let body = body_for(target, call)?;
    let path = call.path_for(target.model_for(call.requested_model));
    let result = target.upstream.send(call.outbound(&path, stage), Some(body)).await;
    record_attempt(stage, &result);
    match outcome(&result) {
        "ok" => target.ok_attempts.inc(),
        other => call.metrics.upstream_attempts.with_label_values(&[&target.upstream_name, &target.label, other]).inc(),
    }
    Ok(result)
}

fn served<'a>(
    answer: Result<Answer, UpstreamFailure>,
    target: &'a Target,
    call: &Call<'_>,
    attempts: u32,
) -> Result<Served<'a>, GatewayError> {
    Ok(Served {
        response: answer?,
        upstream: &target.upstream,
        model: target.model_for(call.requested_model).to_owned(),
        attempts,
        by: Some(target),
    })
}

/// Every attempt failed: the last upstream answer is relayed as it was (a
/// 503 stays a 503), or the last transport failure becomes the error.
fn finish_failed<'a>(
    last: Option<(Result<Answer, UpstreamFailure>, &'a Target)>,
    call: &Call<'_>,
    attempts: u32,
) -> Result<Served<'a>, GatewayError> {
    match last {
        Some((answer, target)) => served(answer, target, call, attempts),
        None => Err(GatewayError::UpstreamTimeout),
    }
}

/// The body a target gets: its model, and its overrides within the
/// tenant's caps. The client's bytes when nothing changes.
fn body_for(target: &Target, call: &Call<'_>) -> Result<Bytes, GatewayError> {
    let edits = match call.api {
        Api::OpenAi => openai_edits(target, call),
        Api::Gemini => gemini_edits(target, call),
        Api::Anthropic => anthropic_edits(target, call),
    };
    if edits.is_empty() {
        return Ok(call.body.clone());
    }
    set_members(call.body, &edits).map(Bytes::from).ok_or(GatewayError::PolicyUncheckable)
}

/// A top-level object member of the request body, or an empty object.
fn object_member(body: &[u8], name: &str) -> Value {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get(name).cloned())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}))
}

fn model_edit(target: &Target, call: &Call<'_>) -> Option<(&'static str, Option<Value>)> {
    let model = target.model.as_ref()?;
    (model != call.requested_model).then(|| ("model", Some(json!(model))))
}

fn openai_edits(target: &Target, call: &Call<'_>) -> Vec<(&'static str, Option<Value>)> {
    let mut edits = Vec::new();
    edits.extend(model_edit(target, call));
    let overrides = &target.overrides;
    if let Some(budget) = overrides.thinking_budget {
        let budget = call.policy.max_thinking_budget.map_or(budget, |cap| budget.min(cap));
        let mut google = object_member(call.body, "google");
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
    edits
}

/// Gemini: the model is in the path; the thinking budget and output limit
/// live in `generationConfig`. (`reasoning_effort` has no Gemini meaning.)
fn gemini_edits(target: &Target, call: &Call<'_>) -> Vec<(&'static str, Option<Value>)> {
    let overrides = &target.overrides;
    let default_limit = overrides.default_max_tokens.filter(|_| !call.has_output_limit);
    if overrides.thinking_budget.is_none() && default_limit.is_none() {
        return Vec::new();
    }
    let mut config = object_member(call.body, "generationConfig");
    if let Some(budget) = overrides.thinking_budget {
        let budget = call.policy.max_thinking_budget.map_or(budget, |cap| budget.min(cap));
        if !config["thinkingConfig"].is_object() {
            config["thinkingConfig"] = json!({});
        }
        config["thinkingConfig"]["thinkingBudget"] = json!(budget);
    }
    if let Some(limit) = default_limit {
        config["maxOutputTokens"] = json!(call.policy.max_output_tokens.map_or(limit, |cap| limit.min(cap)));
    }
    vec![("generationConfig", Some(config))]
}

/// Anthropic: the model in the body; a thinking budget turns extended
/// thinking on with it (0 turns it off). `max_tokens` is required, so
/// there is no output limit to default.
fn anthropic_edits(target: &Target, call: &Call<'_>) -> Vec<(&'static str, Option<Value>)> {
    let mut edits = Vec::new();
    edits.extend(model_edit(target, call));
    if let Some(budget) = target.overrides.thinking_budget {
        let budget = call.policy.max_thinking_budget.map_or(budget, |cap| budget.min(cap));
        let thinking =
            if budget == 0 { json!({"type": "disabled"}) } else { json!({"type": "enabled", "budget_tokens": budget}) };
        edits.push(("thinking", Some(thinking)));
    }
    edits
}

#[cfg(test)]
mod tests {
    use super::operation;

    #[test]
    fn each_apis_endpoints_name_their_genai_operation() {
        assert_eq!(operation("/chat/completions"), "chat");
        assert_eq!(operation("/messages"), "chat");
        assert_eq!(operation(":generateContent"), "generate_content");
        assert_eq!(operation(":streamGenerateContent?alt=sse"), "generate_content");
        assert_eq!(operation(":batchEmbedContents"), "embeddings");
        assert_eq!(operation("/messages/count_tokens"), "count_tokens");
        assert_eq!(operation("/responses"), "generate_content");
    }
}
