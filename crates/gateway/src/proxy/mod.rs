//! The `/v1` handlers: read and check the request, forward it, relay the answer.
//!
//! Request bodies are forwarded as the original bytes; the gateway only peeks
//! at the fields it routes on. Responses keep their status, body and
//! headers, except where the upstream answered with something no OpenAI SDK
//! can use (a redirect, an HTML page), which becomes a JSON 502.

pub mod body;
pub mod headers;
pub mod identifiers;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, StatusCode, header};
use tollgate_openai::{EndMarker, RequestPeek, UsageField, find_model, find_usage, stream_options};

use crate::accounting::tap::StreamTap;
use crate::accounting::{Accounting, Exchange, Outcome, estimate, format_usd};
use crate::auth::Principal;
use crate::auth::models::ModelRules;
use crate::budget::{self, BudgetBook, Reservation};
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
        endpoint_name(parts.uri.path()),
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
                    GatewayError::BudgetBusy { .. } => {
                        metrics.rejections.with_label_values(&[exchange.tenant_id(), "budget_busy"]).inc();
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
    // The gateway reads the body to check it, so it must be the bytes it
    // reads: a compressed body would pass unchecked.
    if let Some(encoding) = parts.headers.get(header::CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(GatewayError::UnsupportedContentEncoding);
    }
    let body = body::read_limited(body, &parts.headers, proxy.max_body_bytes).await?;
    // JSON is UTF-8 (RFC 8259); the peek skips strings it does not read
    // without checking them, so the whole body is checked here, at once.
    if let Err(e) = std::str::from_utf8(&body) {
        return Err(GatewayError::InvalidJson(format!(
            "the request body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        )));
    }
    let endpoint = parts.uri.path();
    let (wants_stream, upstream_body, strip_usage) = {
        let peek = RequestPeek::parse(&body).map_err(|e| GatewayError::InvalidJson(e.to_string()))?;
        // Every endpoint here needs a model; a missing one must not slip
        // past an allow-list, and none may be stored or logged unbounded.
        let model = peek.model.as_deref().ok_or(GatewayError::MissingModel)?;
        identifiers::check_model(model)?;
        if let Some(exchange) = slot.as_mut() {
            exchange.set_request(body.clone(), Some(model), peek.is_stream());
        }
        if !principal.key.models.allows(model) {
            return Err(GatewayError::ModelNotAllowed(model.to_owned()));
        }
        if proxy.accounting.reject_unpriced && !proxy.accounting.is_billable(model) {
            return Err(GatewayError::ModelNotPriced(model.to_owned()));
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
        let forwarded_len = injected.as_ref().map_or(body.len(), Vec::len);
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
        if !checks.is_empty() {
            let estimate = (forwarded_len as u64 / 4).saturating_add(output);
            let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
            let permit = proxy.limiter.admit(&checks, estimate, now).await.map_err(GatewayError::RateLimited)?;
            grants.allowance = Some(permit.allowance);
            if let Some(exchange) = slot.as_mut() {
                exchange.permit = Some(permit);
            }
        }
        let budgets = proxy.budgets.applicable(principal.tenant_id(), &principal.key.id);
        if !budgets.is_empty() {
            let reservations = reserve_budgets(proxy, &budgets, model, forwarded_len, output).await?;
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
        .send(Method::POST, upstream_path(endpoint), &parts.headers, request_id, Some(upstream_body))
        .await?;
    tracing::debug!(wants_stream, status = upstream_response.status().as_u16(), "upstream answered");
    relay_response(proxy, upstream_response, slot, strip_usage, EndMarker::for_endpoint(endpoint)).await
}

/// Reserves the request's worst case on its budgets: the prompt at the
/// input price and the whole output limit at the output price. The prompt
/// bound is the forwarded body's length in bytes: every tokenizer in use
/// (byte-level BPE, SentencePiece with byte fallback) spends at least one
/// byte of text per token, whatever the script, so no prompt can have more
/// tokens than its request has bytes.
async fn reserve_budgets(
    proxy: &Proxy,
    budgets: &[Arc<budget::BudgetState>],
    model: &str,
    forwarded_len: usize,
    output: u64,
) -> Result<Vec<Reservation>, GatewayError> {
    let worst = match proxy.accounting.worst_case_micros(model, forwarded_len as u64, output) {
        Some(worst) => worst,
        // Nothing to bound the cost with: only soft budgets can take it.
        None if budgets.iter().any(|b| b.budget.hard) => {
            return Err(GatewayError::UnpricedUnderBudget(model.to_owned()));
        }
        None => 0,
    };
    let waiting = budget::Waiting { max_wait: proxy.limits.budget_wait, ..budget::Waiting::default() };
    budget::admit(proxy.shared.as_ref(), budgets, worst, chrono::Utc::now().date_naive(), waiting).await.map_err(
        |refusal| match refusal {
            budget::Refusal::Exhausted { budget_id, period } => GatewayError::BudgetExhausted { budget_id, period },
            budget::Refusal::Busy { budget_id, retry_after } => GatewayError::BudgetBusy { budget_id, retry_after },
        },
    )
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
    let path = match parts.uri.path().strip_prefix("/v1/models/") {
        None => "/models".to_owned(),
        Some(raw) => {
            let id = model_id_from_path(raw)?;
            if !rules.allows(&id) {
                return Err(GatewayError::ModelNotAllowed(id));
            }
            // Built from the checked id only: the client's query string and
            // encoding never reach the upstream.
            format!("/models/{id}")
        }
    };
    if let Some(exchange) = slot.as_mut() {
        exchange.mark_sent();
    }
    let upstream_response = proxy.upstream.send(Method::GET, &path, &parts.headers, request_id, None).await?;
    let response = relay_response(proxy, upstream_response, slot, false, None).await?;
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

/// The endpoint as recorded and labelled: the route, never the raw path
/// (a model id in the path would make metric series without bound).
fn endpoint_name(path: &str) -> &str {
    if path.starts_with("/v1/models/") { "/v1/models/{id}" } else { path }
}

/// The upstream path of a `/v1` POST endpoint: the route's own path after
/// `/v1`, never the client's query string (no endpoint here defines one).
fn upstream_path(endpoint: &str) -> &str {
    endpoint.strip_prefix("/v1").unwrap_or(endpoint)
}

/// The model id of `GET /v1/models/{id}`, decoded and checked: no encoded
/// separators (`%2F`, `%5C`), valid UTF-8, and a model name that is a safe
/// path (no dot or empty segments), so it cannot walk the upstream's tree.
fn model_id_from_path(raw: &str) -> Result<String, GatewayError> {
    let lower = raw.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err(GatewayError::InvalidModel("the model id in the path must not contain encoded separators"));
    }
    let id = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| GatewayError::InvalidModel("the model id in the path is not valid UTF-8"))?;
    identifiers::check_model_path(&id)?;
    Ok(id.into_owned())
}

async fn relay_response(
    proxy: &Proxy,
    upstream: UpstreamResponse,
    slot: &mut Option<Exchange>,
    strip_usage: bool,
    end: Option<EndMarker>,
) -> Result<Response, GatewayError> {
    let status = upstream.status();
    if status.is_redirection() || status.is_informational() {
        return Err(GatewayError::UpstreamBadResponse(format!(
            "the upstream answered with status {status} instead of an API response; check upstream.base_url"
        )));
    }
    // The upstream refusing the gateway's own key says nothing about the
    // tenant's: its message (which may quote the key) stays here.
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        return Err(GatewayError::UpstreamRejectedCredentials { status: status.as_u16() });
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
        let body = stream::relay(
            upstream.into_body(),
            proxy.upstream.idle_timeout(),
            proxy.upstream.max_event_bytes(),
            end,
            tap,
        );
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
    fn post_endpoints_map_to_their_own_upstream_path() {
        assert_eq!(upstream_path("/v1/chat/completions"), "/chat/completions");
    }

    #[test]
    fn model_ids_in_paths_cannot_traverse() {
        assert_eq!(model_id_from_path("google/gemini-2.5-pro").unwrap(), "google/gemini-2.5-pro");
        assert_eq!(model_id_from_path("gemini%2D2.5").unwrap(), "gemini-2.5");
        for bad in
            ["..", "..%2F..%2Ffiles", "%2e%2e", "%2E%2E/files", "gemini-x%2F..%2F..%2Fstats", "a/../b", "a%5Cb", "%ff"]
        {
            assert!(model_id_from_path(bad).is_err(), "{bad}");
        }
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
