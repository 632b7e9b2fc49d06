//! The `/v1` handlers: read and check the request, forward it, relay the answer.
//!
//! Request bodies are forwarded as the original bytes; the gateway only peeks
//! at the fields it routes on. Responses keep their status, body and
//! headers, except where the upstream answered with something no OpenAI SDK
//! can use (a redirect, an HTML page), which becomes a JSON 502.

pub mod body;
pub mod headers;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, StatusCode, header};
use tollgate_openai::{RequestPeek, UsageField, find_model, find_usage, stream_options};

use crate::accounting::tap::StreamTap;
use crate::accounting::{Accounting, Exchange, Outcome, estimate, format_usd};
use crate::auth::Principal;
use crate::auth::models::ModelRules;
use crate::budget::{self, BudgetBook, Reservation};
use crate::clock::Clock;
use crate::config::LimitsConfig;
use crate::error::GatewayError;
use crate::limits::{self, Allowance, RateLimiter};
use crate::policy;
use crate::request_id::RequestId;
use crate::shared::Shared;
use crate::upstream::{self, Upstream, UpstreamResponse, classify};

/// What the `/v1` handlers share.
#[derive(Debug)]
pub struct Proxy {
    pub upstream: Upstream,
    pub accounting: Arc<Accounting>,
    pub limiter: Arc<RateLimiter>,
    pub limits: LimitsConfig,
    pub budgets: Arc<BudgetBook>,
    /// Redis, when limits and budgets are shared by several replicas.
    pub shared: Option<Arc<Shared>>,
    pub max_body_bytes: usize,
    pub max_response_bytes: usize,
    /// Decides the rate-limit window and the budget period.
    pub clock: Clock,
}

pub type ProxyState = State<Arc<Proxy>>;

/// What the limits and budgets granted a request, for its response headers.
#[derive(Debug, Default)]
struct Grants {
    allowance: Option<Allowance>,
    remaining_budget: Option<i64>,
}

/// Endpoints whose streams can carry usage when asked with
/// `stream_options.include_usage`.
fn supports_stream_usage(endpoint: &str) -> bool {
    matches!(endpoint, "/v1/chat/completions" | "/v1/completions")
}

/// `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`.
pub async fn forward_post(State(proxy): ProxyState, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok((request_id, principal, mut slot)) = begin(&proxy, &parts) else {
        return GatewayError::Internal.into_response();
    };
    let mut grants = Grants::default();
    let result = forward_post_inner(&proxy, &parts, body, &request_id, &principal, &mut slot, &mut grants).await;
    let mut response = settle(result, slot);
    if let Some(allowance) = grants.allowance {
        allowance.write(response.headers_mut());
    }
    if let Some(remaining) = grants.remaining_budget
        && let Ok(value) = HeaderValue::from_str(&format_usd(remaining.max(0)))
    {
        response.headers_mut().insert(BUDGET_HEADER, value);
    }
    response
}

/// The caller and the accounting exchange every `/v1` request starts with.
fn begin(
    proxy: &Proxy,
    parts: &http::request::Parts,
) -> Result<(RequestId, Principal, Option<Exchange>), GatewayError> {
    let request_id = request_id(&parts.extensions);
    let principal = principal(&parts.extensions)?;
    let exchange = Exchange::open(
        proxy.accounting.clone(),
        request_id.as_str(),
        principal.tenant_id(),
        &principal.key.id,
        parts.uri.path(),
    );
    Ok((request_id, principal, Some(exchange)))
}

/// Turns a handler result into the response, closing the exchange if the
/// handler did not (every failure before an answer was relayed).
fn settle(result: Result<Response, GatewayError>, slot: Option<Exchange>) -> Response {
    match result {
        Ok(response) => {
            if let Some(exchange) = slot {
                let status = response.status().as_u16();
                exchange.close(Outcome { status, ..Outcome::default() });
            }
            response
        }
        Err(error) => {
            if let Some(exchange) = &slot {
                let metrics = &exchange.accounting().metrics;
                match &error {
                    GatewayError::RateLimited(t) => {
                        let reason = match t.kind {
                            crate::limits::Kind::Requests => "requests_per_minute",
                            crate::limits::Kind::Tokens => "tokens_per_minute",
                            crate::limits::Kind::Concurrency => "in_flight",
                        };
                        metrics.rejections.with_label_values(&[exchange.tenant_id(), reason]).inc();
                    }
                    GatewayError::BudgetExhausted { .. } => {
                        metrics.rejections.with_label_values(&[exchange.tenant_id(), "budget"]).inc();
                    }
                    _ => {}
                }
            }
            if let Some(exchange) = slot {
                let class = format!("{}:{}", error.fault().as_str(), error.code());
                exchange.close(Outcome {
                    status: error.status().as_u16(),
                    error_class: Some(class),
                    ..Outcome::default()
                });
            }
            error.into_response()
        }
    }
}

async fn forward_post_inner(
    proxy: &Proxy,
    parts: &http::request::Parts,
    body: Body,
    request_id: &RequestId,
    principal: &Principal,
    slot: &mut Option<Exchange>,
    grants: &mut Grants,
) -> Result<Response, GatewayError> {
    if proxy.accounting.ledger.is_full() {
        return Err(GatewayError::AccountingUnavailable);
    }
    let body = body::read_limited(body, &parts.headers, proxy.max_body_bytes).await?;
    let endpoint = parts.uri.path();
    let (wants_stream, upstream_body, strip_usage) = {
        let peek = RequestPeek::parse(&body).map_err(|e| GatewayError::InvalidJson(e.to_string()))?;
        let model = peek.model.as_deref();
        if let Some(exchange) = slot.as_mut() {
            exchange.set_request(body.clone(), model, peek.is_stream());
        }
        if let Some(model) = model {
            if !principal.key.models.allows(model) {
                return Err(GatewayError::ModelNotAllowed(model.to_owned()));
            }
            if proxy.accounting.reject_unpriced && !proxy.accounting.is_priced(model) {
                return Err(GatewayError::ModelNotPriced(model.to_owned()));
            }
        }
        let applied = policy::apply(&principal.tenant.policy, endpoint, &body, &peek)?;
        if let Some(exchange) = slot.as_mut() {
            exchange.modified = applied.body.is_some();
        }
        let body = applied.body.unwrap_or_else(|| body.clone());
        // Ask for stream usage on the client's behalf so every stream can be
        // billed from the upstream's own counts.
        let injected = if peek.is_stream() && supports_stream_usage(endpoint) {
            stream_options::with_include_usage(&body, peek.has_stream_options(), peek.client_asked_for_usage())
        } else {
            None
        };
        // Rate limits: tokens reserved from an estimate (prompt bytes ÷ 4
        // plus the output limit per choice), corrected when usage is known.
        let checks = limits::checks_for(
            principal.tenant_id(),
            &principal.tenant.policy.limits,
            &proxy.limits.defaults(),
            &principal.key.id,
            &principal.key.limits,
        );
        // Saturating: a client-chosen max_tokens must not wrap to a tiny worst case.
        let output =
            applied.max_output.unwrap_or(proxy.limits.default_output_tokens).saturating_mul(peek.n.unwrap_or(1).max(1));
        let prompt_estimate = body.len() as u64 / 4;
        if !checks.is_empty() {
            let estimate = prompt_estimate.saturating_add(output);
            let now = proxy.clock.now_ms().max(0) as u64;
            let permit = proxy.limiter.admit(&checks, estimate, now).await.map_err(GatewayError::RateLimited)?;
            grants.allowance = Some(permit.allowance);
            if let Some(exchange) = slot.as_mut() {
                exchange.permit = Some(permit);
            }
        }
        // Budgets: reserve the worst case (prompt estimate at the input
        // price, the whole output limit at the output price).
        let budgets = proxy.budgets.applicable(principal.tenant_id(), &principal.key.id);
        if !budgets.is_empty() {
            let worst = proxy.accounting.worst_case_micros(model.unwrap_or_default(), prompt_estimate, output);
            let reservations = budget::reserve_shared(proxy.shared.as_ref(), &budgets, worst, proxy.clock.today())
                .await
                .map_err(|e| GatewayError::BudgetExhausted { budget_id: e.budget_id, period: e.period })?;
            grants.remaining_budget = Reservation::remaining(&reservations);
            if let Some(exchange) = slot.as_mut() {
                exchange.reservations = reservations;
            }
        }
        match injected {
            Some(rewritten) => (true, Bytes::from(rewritten), true),
            None => (peek.is_stream(), body, false),
        }
    };
    if let Some(exchange) = slot.as_mut() {
        exchange.mark_sent();
    }
    let upstream_response = proxy
        .upstream
        .send(Method::POST, upstream_path(&parts.uri), &parts.headers, request_id, Some(upstream_body))
        .await?;
    tracing::debug!(wants_stream, status = upstream_response.status().as_u16(), "upstream answered");
    relay_response(proxy, upstream_response, slot, strip_usage).await
}

/// `GET /v1/models` and `GET /v1/models/{id}`: only the models the key may use.
pub async fn forward_get(State(proxy): ProxyState, request: Request) -> Response {
    let (parts, _body) = request.into_parts();
    let Ok((request_id, principal, mut slot)) = begin(&proxy, &parts) else {
        return GatewayError::Internal.into_response();
    };
    let result = forward_get_inner(&proxy, &parts, &request_id, &principal, &mut slot).await;
    settle(result, slot)
}

async fn forward_get_inner(
    proxy: &Proxy,
    parts: &http::request::Parts,
    request_id: &RequestId,
    principal: &Principal,
    slot: &mut Option<Exchange>,
) -> Result<Response, GatewayError> {
    let rules = &principal.key.models;
    if let Some(id) = parts.uri.path().strip_prefix("/v1/models/") {
        let id = percent_encoding::percent_decode_str(id).decode_utf8_lossy();
        if !rules.allows(&id) {
            return Err(GatewayError::ModelNotAllowed(id.into_owned()));
        }
    }
    if let Some(exchange) = slot.as_mut() {
        exchange.mark_sent();
    }
    let upstream_response =
        proxy.upstream.send(Method::GET, upstream_path(&parts.uri), &parts.headers, request_id, None).await?;
    let response = relay_response(proxy, upstream_response, slot, false).await?;
    if rules.is_unrestricted() || parts.uri.path() != "/v1/models" || !response.status().is_success() {
        return Ok(response);
    }
    let (mut head, body) = response.into_parts();
    let body = axum::body::to_bytes(body, proxy.max_response_bytes).await.map_err(|_| GatewayError::Internal)?;
    let filtered = filter_model_list(&body, rules);
    head.headers.remove(header::CONTENT_LENGTH);
    Ok(Response::from_parts(head, Body::from(filtered)))
}

/// Keeps the entries of an OpenAI model list whose `id` the rules allow.
/// Anything that is not a model list is passed on unchanged.
fn filter_model_list(body: &[u8], rules: &ModelRules) -> Bytes {
    let Ok(mut list) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Bytes::copy_from_slice(body);
    };
    if let Some(data) = list.get_mut("data").and_then(|d| d.as_array_mut()) {
        data.retain(|m| m.get("id").and_then(|id| id.as_str()).is_some_and(|id| rules.allows(id)));
    }
    serde_json::to_vec(&list).map(Bytes::from).unwrap_or_else(|_| Bytes::copy_from_slice(body))
}

fn principal(extensions: &http::Extensions) -> Result<Principal, GatewayError> {
    // AuthLayer sits on every /v1 route; without it there is no caller.
    extensions.get::<Principal>().cloned().ok_or(GatewayError::Internal)
}

fn request_id(extensions: &http::Extensions) -> RequestId {
    // The request-id layer sits above every route; generating here keeps the
    // handler total should a route ever be mounted outside it.
    extensions.get::<RequestId>().cloned().unwrap_or_else(RequestId::generate)
}

/// The path and query after the `/v1` prefix, still percent-encoded as the
/// client sent it.
fn upstream_path(uri: &http::Uri) -> &str {
    let pq = uri.path_and_query().map_or(uri.path(), |pq| pq.as_str());
    pq.strip_prefix("/v1").unwrap_or(pq)
}

async fn relay_response(
    proxy: &Proxy,
    upstream: UpstreamResponse,
    slot: &mut Option<Exchange>,
    strip_usage: bool,
) -> Result<Response, GatewayError> {
    let status = upstream.status();
    if status.is_redirection() || status.is_informational() {
        return Err(GatewayError::UpstreamBadResponse(format!(
            "the upstream answered with status {status} instead of an API response; check upstream.base_url"
        )));
    }
    let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
    let is_event_stream =
        content_type.as_ref().and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("text/event-stream"));

    let mut response = Response::builder().status(status);
    if let Some(headers) = response.headers_mut() {
        // Room for the gateway's own headers too (rate limits, budget, cost,
        // request id), so the map is sized once rather than regrown.
        headers.reserve(upstream.headers().len() + 12);
        headers::copy_response_headers(upstream.headers(), headers);
    }

    if is_event_stream && status.is_success() {
        let tap = slot.take().map(|exchange| StreamTap::new(exchange, strip_usage, status.as_u16()));
        let body =
            stream::relay(upstream.into_body(), proxy.upstream.idle_timeout(), proxy.upstream.max_event_bytes(), tap);
        if let Some(headers) = response.headers_mut() {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Tells nginx-style proxies in front of the gateway not to buffer.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        }
        return response.body(Body::from_stream(body)).map_err(|_| GatewayError::Internal);
    }

    let body =
        read_upstream_body(upstream.into_body(), proxy.upstream.idle_timeout(), proxy.max_response_bytes).await?;
    if !is_json(content_type.as_ref(), &body) {
        return Err(GatewayError::UpstreamBadResponse(format!(
            "the upstream answered with status {} and a body that is not JSON",
            status.as_u16()
        )));
    }
    if let Some(mut exchange) = slot.take() {
        exchange.upstream_elapsed = exchange.sent_at.map(|t| t.elapsed());
        let succeeded = status.is_success();
        let usage = match find_usage(&body) {
            UsageField::Present(usage, ..) => Some(usage),
            _ => None,
        };
        let estimated_output = if succeeded && usage.is_none() { estimate::response_tokens(&body) } else { 0 };
        let cost = exchange.close(Outcome {
            status: status.as_u16(),
            error_class: (!succeeded).then(|| upstream_error_class(status)),
            usage,
            upstream_model: find_model(&body),
            reached_upstream: succeeded,
            estimated_output,
            first_event: None,
        });
        if succeeded
            && let Some(headers) = response.headers_mut()
            && let Ok(value) = HeaderValue::from_str(&format_usd(cost))
        {
            headers.insert(COST_HEADER, value);
        }
    }
    if content_type.is_none()
        && let Some(headers) = response.headers_mut()
    {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    response.body(Body::from(body)).map_err(|_| GatewayError::Internal)
}

/// `fault:status_N` for an error the upstream answered with. Whose fault it
/// is decides who gets paged: a request the upstream found invalid is the
/// client's; an upstream refusing our own credentials is the gateway's
/// configuration; overload and server errors are the upstream's.
fn upstream_error_class(status: StatusCode) -> String {
    let fault = match status.as_u16() {
        401 | 403 => "gateway",
        429 => "upstream",
        400..=499 => "client",
        _ => "upstream",
    };
    format!("{fault}:status_{}", status.as_u16())
}

/// The request's cost in USD, on answers whose cost is known before the body.
pub const COST_HEADER: &str = "x-tollgate-cost-usd";
/// What is left of the tightest hard budget, in USD, after this request's
/// worst-case reservation.
pub const BUDGET_HEADER: &str = "x-tollgate-budget-remaining-usd";

/// Reads a whole upstream body, allowing at most `idle` between chunks.
async fn read_upstream_body(
    mut body: hyper::body::Incoming,
    idle: Duration,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    loop {
        let chunk = match tokio::time::timeout(idle, upstream::next_chunk(&mut body)).await {
            Err(_elapsed) => return Err(GatewayError::UpstreamTimeout),
            Ok(Err(e)) => return Err(classify(&e)),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        // Most bodies arrive in one chunk: keep it without copying.
        match first.take() {
            None if rest.is_empty() => first = Some(chunk),
            prev => {
                if let Some(prev) = prev {
                    rest.extend_from_slice(&prev);
                }
                rest.extend_from_slice(&chunk);
            }
        }
        let len = first.as_ref().map_or(0, Bytes::len) + rest.len();
        if len > limit {
            return Err(GatewayError::UpstreamBadResponse(format!(
                "the upstream response is larger than {limit} bytes"
            )));
        }
    }
    Ok(first.unwrap_or_else(|| rest.freeze()))
}

/// JSON by content type, or, when the upstream sent none or a generic one,
/// by its first byte. HTML error pages and redirects' bodies fail this.
fn is_json(content_type: Option<&HeaderValue>, body: &[u8]) -> bool {
    let declared = content_type.and_then(|v| v.to_str().ok()).map(str::to_ascii_lowercase);
    match declared.as_deref() {
        Some(ct) if ct.contains("json") => true,
        Some(ct) if ct.starts_with("text/html") => false,
        _ => matches!(body.iter().find(|b| !b.is_ascii_whitespace()), Some(b'{' | b'[')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_only_the_v1_prefix_and_keeps_the_query() {
        let uri: http::Uri = "/v1/models/google%2Fgemini?x=1".parse().unwrap();
        assert_eq!(upstream_path(&uri), "/models/google%2Fgemini?x=1");
    }

    #[test]
    fn model_lists_are_filtered_by_the_rules() {
        let body = br#"{"object":"list","data":[{"id":"gpt-4.1"},{"id":"gemini-2.5-pro"},{"id":"gemini-2.5-flash"}]}"#;
        let rules = ModelRules::new(&["gemini-*".to_owned()]);
        let filtered: serde_json::Value = serde_json::from_slice(&filter_model_list(body, &rules)).unwrap();
        let ids: Vec<&str> = filtered["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["gemini-2.5-pro", "gemini-2.5-flash"]);
        assert_eq!(filtered["object"], "list");
    }

    #[test]
    fn upstream_errors_are_classed_by_whose_fault_they_are() {
        let class = |code| upstream_error_class(StatusCode::from_u16(code).unwrap());
        assert_eq!(class(400), "client:status_400");
        assert_eq!(class(422), "client:status_422");
        assert_eq!(class(401), "gateway:status_401");
        assert_eq!(class(429), "upstream:status_429");
        assert_eq!(class(503), "upstream:status_503");
    }

    #[test]
    fn html_is_not_json_even_if_it_looks_like_it() {
        let html = HeaderValue::from_static("text/html; charset=utf-8");
        assert!(!is_json(Some(&html), b"{}"));
        assert!(is_json(None, b"  {\"a\":1}"));
        assert!(!is_json(None, b"<html>"));
        assert!(is_json(Some(&HeaderValue::from_static("application/json")), b""));
    }
}
