//! Relaying the upstream's answer to the client, and accounting for it.
//!
//! Responses keep their status, body and allowed headers. JSON bodies are
//! read whole (usage and the model that served come from them, and the cost
//! header is set); event streams are relayed event by event through the
//! accounting tap.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue, StatusCode, header};
use tollgate_openai::{Api, EndMarker, UsageField, anthropic, find_model, find_usage, gemini};

use super::{Proxy, headers, stream};
use crate::accounting::tap::StreamTap;
use crate::accounting::{Exchange, Outcome, format_usd};
use crate::error::GatewayError;
use crate::telemetry::traces::Stage;
use crate::upstream::{self, Phase, classify};
use opentelemetry::trace::SpanKind;

/// `x-tollgate-upstream`, `x-tollgate-model`, `x-tollgate-attempts`: what
/// served the request, on every answer relayed from an upstream.
pub struct ServedHeaders {
    upstream: HeaderValue,
    model: Option<HeaderValue>,
    attempts: HeaderValue,
}

// Header names are `HeaderName` constants rather than `&str`s here and below:
// a string name is parsed and validated again on every insert, which cost
// hundreds of instructions per header on every response.
const SERVED_BY_UPSTREAM: HeaderName = HeaderName::from_static("x-tollgate-upstream");
const SERVED_BY_MODEL: HeaderName = HeaderName::from_static("x-tollgate-model");
const SERVED_ATTEMPTS: HeaderName = HeaderName::from_static("x-tollgate-attempts");
const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

impl ServedHeaders {
    pub fn new(served: &super::forward::Served<'_>) -> Self {
        // A target's headers are built once, with the routes.
        let (upstream, model) = match served.by {
            Some(target) => (
                target.upstream_header.clone(),
                target.model_header.clone().or_else(|| HeaderValue::from_str(&served.model).ok()),
            ),
            None => (HeaderValue::from_static("default"), HeaderValue::from_str(&served.model).ok()),
        };
        Self { upstream, model, attempts: attempts_value(served.attempts) }
    }

    pub fn write(self, headers: &mut http::HeaderMap) {
        headers.insert(SERVED_BY_UPSTREAM, self.upstream);
        if let Some(model) = self.model {
            headers.insert(SERVED_BY_MODEL, model);
        }
        headers.insert(SERVED_ATTEMPTS, self.attempts);
    }
}

/// `x-tollgate-attempts`: nearly always one digit, taken from a table;
/// `HeaderValue::from(u32)` allocates for each.
fn attempts_value(attempts: u32) -> HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match usize::try_from(attempts).ok().and_then(|n| DIGITS.get(n)) {
        Some(digit) => HeaderValue::from_static(digit),
        None => HeaderValue::from(attempts),
    }
}

/// Relays the upstream's answer and closes the exchange with its outcome:
/// streams through the accounting tap (which closes it at the end), whole
/// bodies after reading their usage. An upstream answer no SDK can use (a
/// redirect, an HTML page) or a refusal of the gateway's own key becomes the
/// gateway's error instead.
/// How an answer is read: its API, whether the gateway asked for stream
/// usage on the client's behalf (then hidden), and the end marker a
/// complete stream carries.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub api: Api,
    pub strip_usage: bool,
    pub end: Option<EndMarker>,
}

pub async fn respond(
    proxy: &Proxy,
    client: &upstream::Upstream,
    upstream: http::Response<upstream::UpstreamBody>,
    slot: &mut Option<Exchange>,
    shape: Shape,
) -> Result<Response, GatewayError> {
    let mut upstream = upstream;
    if let Some(exchange) = slot.as_mut() {
        let stage = Stage::under(exchange.trace(), "relay", SpanKind::Internal);
        exchange.relaying(stage);
    }
    // The upstream's in-flight slot is held until the answer is relayed.
    let in_flight = upstream.extensions_mut().remove::<upstream::InFlightSlot>();
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
        let tap = slot.take().map(|exchange| StreamTap::new(exchange, shape, status.as_u16()));
        let limits = stream::Limits { idle_timeout: client.idle_timeout(), max_event_bytes: client.max_event_bytes() };
        let body = stream::relay(upstream.into_body(), limits, shape, tap, in_flight);
        if let Some(headers) = response.headers_mut() {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Tells nginx-style proxies in front of the gateway not to buffer.
            headers.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
        }
        return response.body(Body::from_stream(body)).map_err(|_| GatewayError::Internal);
    }

    let body = read_upstream_body(upstream.into_body(), client.idle_timeout(), proxy.max_response_bytes).await?;
    if !is_json(content_type.as_ref(), &body) {
        return Err(GatewayError::UpstreamBadResponse(format!(
            "the upstream answered with status {} and a body that is not JSON",
            status.as_u16()
        )));
    }
    if let Some(mut exchange) = slot.take() {
        exchange.upstream_elapsed = exchange.sent_at.map(|t| t.elapsed());
        let succeeded = status.is_success();
        let (usage, upstream_model) = match shape.api {
            Api::OpenAi => {
                let usage = match find_usage(&body) {
                    UsageField::Present(usage, ..) => Some(usage),
                    _ => None,
                };
                (usage, find_model(&body))
            }
            Api::Gemini => (gemini::find_usage(&body), gemini::find_model(&body)),
            Api::Anthropic => (anthropic::find_usage(&body), find_model(&body)),
        };
        // No usage in a good answer: estimate it (off the request workers,
        // awaited so the cost header is right).
        let (usage, usage_estimated) = match usage {
            None if succeeded => (exchange.estimate_answer(body.clone()).await, true),
            usage => (usage, false),
        };
        let cost = exchange.close(Outcome {
            status: status.as_u16(),
            error_class: (!succeeded).then(|| upstream_error_class(status)),
            usage,
            upstream_model,
            reached_upstream: succeeded,
            estimated_output: 0,
            first_event: None,
            usage_estimated,
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
pub const COST_HEADER: HeaderName = HeaderName::from_static("x-tollgate-cost-usd");
/// Reads a whole upstream body, allowing at most `idle` between chunks.
async fn read_upstream_body(
    mut body: upstream::UpstreamBody,
    idle: Duration,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    let mut first: Option<Bytes> = None;
    let mut rest = BytesMut::new();
    loop {
        let chunk = match tokio::time::timeout(idle, body.next_chunk()).await {
            Err(_elapsed) => return Err(GatewayError::UpstreamTimeout),
            Ok(Err(e)) => return Err(classify(&e, Phase::AfterHeaders).into()),
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
    // Compared in place, ignoring case, without a lowercased copy: this runs
    // on every answer.
    let declared = content_type.map(HeaderValue::as_bytes);
    match declared {
        Some(ct) if ct.windows(4).any(|w| w.eq_ignore_ascii_case(b"json")) => true,
        Some(ct) if ct.get(..9).is_some_and(|p| p.eq_ignore_ascii_case(b"text/html")) => false,
        _ => matches!(body.iter().find(|b| !b.is_ascii_whitespace()), Some(b'{' | b'[')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_are_written_as_their_decimal_digits() {
        for attempts in [0, 1, 2, 9, 10, 11, 100, u32::MAX] {
            assert_eq!(attempts_value(attempts), attempts.to_string().as_str());
        }
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
        // Media types are case-insensitive.
        assert!(is_json(Some(&HeaderValue::from_static("Application/JSON; charset=utf-8")), b""));
        assert!(is_json(Some(&HeaderValue::from_static("application/problem+json")), b""));
        assert!(!is_json(Some(&HeaderValue::from_static("TEXT/HTML")), b"[]"));
        assert!(is_json(Some(&HeaderValue::from_static("text/plain")), b"[1]"), "an undeclared shape is read");
        assert!(!is_json(Some(&HeaderValue::from_static("text/plain")), b"plain"));
    }
}
