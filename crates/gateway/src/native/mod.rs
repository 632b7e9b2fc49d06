//! The Gemini and Anthropic APIs in their own shapes, for the google-genai
//! and anthropic SDKs (and the coding agents built on them):
//!
//! - `POST /v1beta/models/{model}:generateContent`, `:streamGenerateContent`
//!   (`?alt=sse`), `:countTokens`, `:embedContent`, `:batchEmbedContents`,
//!   and the same under `/v1/models/` (google-genai's default version;
//!   the upstream is sent the `v1beta` form either way);
//! - `POST /v1/messages`, `/v1/messages/count_tokens`.
//!
//! Everything the OpenAI-shaped `/v1` routes do holds: the tenant key
//! (from `x-goog-api-key`, `?key=`, `x-api-key` or Bearer), the model
//! allow-list, routes (a route serves one API), the tenant's policy where
//! each API reads it ([`policy`]), rate limits and budgets, accounting from
//! each API's own usage, and errors in each API's own envelope
//! ([`errors`]). The stages are those of `proxy::post_stages`; only reading
//! the request, the policy and the upstream path differ.
//!
//! Token counting is free upstream, so it is recorded with no usage and no
//! cost, and reserves nothing.

pub mod errors;
pub mod policy;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tollgate_openai::{Api, anthropic, gemini};

use crate::accounting::Exchange;
use crate::auth::Principal;
use crate::error::GatewayError;
use crate::proxy::{self, Proxy, identifiers, relay, request};
use crate::request_id::RequestId;

/// What the gateway reads of a native request.
#[derive(Debug)]
struct NativeRequest {
    api: Api,
    model: String,
    stream: bool,
    /// The upstream path after the API root; for Gemini, after the model:
    /// `:generateContent`, `:streamGenerateContent?alt=sse`.
    upstream_path: &'static str,
    /// Free upstream (token counting): nothing to bill or reserve.
    free: bool,
    /// The call makes output (a policy applies, an output limit bounds it).
    generates: bool,
    gemini: Option<gemini::RequestPeek>,
    anthropic: Option<anthropic::RequestPeek>,
}

/// The Gemini path's last segment, `{model}:{method}`, read and checked.
fn gemini_request(path: &str, body: &[u8]) -> Result<NativeRequest, GatewayError> {
    let segment = path
        .strip_prefix("/v1beta/models/")
        .or_else(|| path.strip_prefix("/v1/models/"))
        .ok_or_else(|| GatewayError::UnknownRoute(path.to_owned()))?;
    let (model, method) =
        gemini::split_model_method(segment).ok_or_else(|| GatewayError::UnknownRoute(path.to_owned()))?;
    identifiers::check_model_path(model)?;
    let peek = gemini::RequestPeek::parse(body).map_err(GatewayError::InvalidJson)?;
    let upstream_path = match method {
        gemini::Method::Generate => ":generateContent",
        // The SSE form, whatever the client asked: the relay reads events.
        gemini::Method::StreamGenerate => ":streamGenerateContent?alt=sse",
        gemini::Method::CountTokens => ":countTokens",
        gemini::Method::Embed => ":embedContent",
        gemini::Method::BatchEmbed => ":batchEmbedContents",
    };
    Ok(NativeRequest {
        api: Api::Gemini,
        model: model.to_owned(),
        stream: method == gemini::Method::StreamGenerate,
        upstream_path,
        free: method == gemini::Method::CountTokens,
        generates: method.generates(),
        gemini: Some(peek),
        anthropic: None,
    })
}

fn anthropic_request(path: &str, body: &[u8]) -> Result<NativeRequest, GatewayError> {
    let peek = anthropic::RequestPeek::parse(body).map_err(GatewayError::InvalidJson)?;
    let model = peek.model.clone().ok_or(GatewayError::MissingModel)?;
    identifiers::check_model(&model)?;
    let counting = path == "/v1/messages/count_tokens";
    Ok(NativeRequest {
        api: Api::Anthropic,
        model,
        stream: peek.stream && !counting,
        upstream_path: if counting { "/messages/count_tokens" } else { "/messages" },
        free: counting,
        generates: !counting,
        gemini: None,
        anthropic: Some(peek),
    })
}

/// The endpoint as recorded and labelled: a fixed set, never the model.
fn endpoint_name(api: Api, path: &str) -> &'static str {
    match api {
        Api::Gemini => match path.rsplit_once(':').map(|(_, m)| m) {
            Some("generateContent") => "/v1beta/models:generateContent",
            Some("streamGenerateContent") => "/v1beta/models:streamGenerateContent",
            Some("countTokens") => "/v1beta/models:countTokens",
            Some("embedContent") => "/v1beta/models:embedContent",
            Some("batchEmbedContents") => "/v1beta/models:batchEmbedContents",
            _ => "/v1beta/models",
        },
        _ if path == "/v1/messages/count_tokens" => "/v1/messages/count_tokens",
        _ => "/v1/messages",
    }
}

/// `POST /v1beta/models/{model}:{method}`.
pub async fn gemini(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    handle(proxy, Api::Gemini, request).await
}

/// `POST /v1/messages`, `/v1/messages/count_tokens`.
pub async fn anthropic(State(proxy): State<Arc<Proxy>>, request: Request) -> Response {
    handle(proxy, Api::Anthropic, request).await
}

async fn handle(proxy: Arc<Proxy>, api: Api, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok((request_id, principal, mut slot)) = proxy::begin(&proxy, &parts) else {
        return GatewayError::Internal.into_response();
    };
    if let Some(exchange) = slot.as_mut() {
        exchange.api = api;
        exchange.endpoint_label(endpoint_name(api, parts.uri.path()));
    }
    let result = stages(&proxy, api, &parts, body, &request_id, &principal, &mut slot).await;
    proxy::finish(result, slot)
}

async fn stages(
    proxy: &Proxy,
    api: Api,
    parts: &http::request::Parts,
    body: Body,
    request_id: &RequestId,
    principal: &Principal,
    slot: &mut Option<Exchange>,
) -> Result<Response, GatewayError> {
    if proxy.accounting.ledger.is_full() {
        return Err(GatewayError::AccountingUnavailable);
    }
    let path = parts.uri.path();
    let body = request::read_body(&parts.headers, body, proxy.max_body_bytes).await?;
    let native = match api {
        Api::Gemini => gemini_request(path, &body)?,
        _ => anthropic_request(path, &body)?,
    };
    let model = native.model.as_str();
    if let Some(exchange) = slot.as_mut() {
        exchange.set_request(body.clone(), Some(model), native.stream);
        exchange.free = native.free;
    }
    let route = proxy.routes.current().resolve(api, model);
    if route.is_none() && !proxy.upstream.speaks(api) {
        return Err(GatewayError::ApiNotServed(api));
    }
    let candidates: Vec<&str> = match &route {
        Some(route) => route.models(model).collect(),
        None => vec![model],
    };
    request::authorize(proxy, principal, model, &candidates)?;
    let policy = &principal.tenant.policy;
    let applied = match (&native.gemini, &native.anthropic) {
        (Some(peek), _) if native.generates => {
            let takes_thinking = proxy.accounting.thinking_place(model).is_some();
            policy::apply_gemini(policy, &body, peek, takes_thinking)?
        }
        (_, Some(peek)) if native.generates => policy::apply_anthropic(policy, &body, peek)?,
        _ => crate::policy::Applied::default(),
    };
    let forwarded = if applied.edits.is_empty() {
        body.clone()
    } else {
        tollgate_openai::rewrite::set_members(&body, &applied.edits)
            .map(Bytes::from)
            .ok_or(GatewayError::PolicyUncheckable)?
    };
    let max_output = if native.generates { output_bound(proxy, &native, applied.max_output) } else { 0 };
    // The fields the OpenAI stages read; none applies to these APIs.
    let peek = tollgate_openai::RequestPeek::default();
    let prepared = proxy::Prepared {
        model,
        route: route.as_deref(),
        candidates: &candidates,
        upstream_path: native.upstream_path,
        forwarded,
        // Counting tokens is free: it holds a rate-limit slot, never a reservation.
        reserved_bytes: native.free.then_some(0),
        max_output,
        has_output_limit: applied.max_output.is_some(),
        modified: !applied.edits.is_empty(),
        peek: &peek,
        shape: relay::Shape { api, strip_usage: false, end: end_marker(&native) },
    };
    proxy::admit_forward_relay(proxy, parts, request_id, principal, slot, prepared).await
}

fn end_marker(native: &NativeRequest) -> Option<tollgate_openai::EndMarker> {
    if !native.stream {
        return None;
    }
    Some(match native.api {
        Api::Gemini => tollgate_openai::EndMarker::GeminiFinish,
        _ => tollgate_openai::EndMarker::MessageStop,
    })
}

/// The most output a call can bill, for its reservation: the API's own
/// output limit (after the policy), else the gateway's default; for
/// Gemini, plus the thinking budget (thoughts are billed as output on top
/// of `maxOutputTokens`), or the default allowance again when the budget is
/// left dynamic.
fn output_bound(proxy: &Proxy, native: &NativeRequest, max_output: Option<u64>) -> u64 {
    let default = proxy.limits.default_output_tokens;
    let output = max_output.unwrap_or(default);
    match &native.gemini {
        Some(peek) => {
            let thinking = match peek.thinking_budget {
                Some(budget) if budget >= 0 => budget as u64,
                _ if proxy.accounting.thinking_place(&native.model).is_some() => default,
                _ => 0,
            };
            output.saturating_add(thinking)
        }
        None => output,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemini_paths_are_read_and_checked() {
        let call = gemini_request("/v1beta/models/gemini-2.5-flash:streamGenerateContent", b"{}").unwrap();
        assert_eq!(call.model, "gemini-2.5-flash");
        assert!(call.stream && call.generates && !call.free);
        assert_eq!(call.upstream_path, ":streamGenerateContent?alt=sse");
        let count = gemini_request("/v1/models/gemini-2.5-flash:countTokens", b"{}").unwrap();
        assert!(count.free && !count.generates);
        assert!(gemini_request("/v1beta/models/gemini-2.5-flash:explode", b"{}").is_err());
        assert!(gemini_request("/v1beta/models/../x:generateContent", b"{}").is_err());
        assert!(gemini_request("/v1beta/models/gemini:generateContent", b"not json").is_err());
    }

    #[test]
    fn endpoints_are_a_fixed_set() {
        assert_eq!(endpoint_name(Api::Gemini, "/v1beta/models/x:countTokens"), "/v1beta/models:countTokens");
        assert_eq!(endpoint_name(Api::Anthropic, "/v1/messages"), "/v1/messages");
        assert_eq!(endpoint_name(Api::Anthropic, "/v1/messages/count_tokens"), "/v1/messages/count_tokens");
    }
}
