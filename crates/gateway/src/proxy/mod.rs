//! The `/v1` handlers, as stages read top to bottom.
//!
//! `POST` (chat completions, completions, embeddings, responses):
//!
//! 1. open the exchange (the request's ledger record, closed exactly once);
//! 2. refuse when accounting cannot take the record (spool full);
//! 3. read the body: uncompressed, under the limit, UTF-8 ([`request`]);
//! 4. parse it once and require a bounded model;
//! 5. authorize the model: the key's allow-list, the pricing gate;
//! 6. apply the tenant's policy (caps and defaults, as edits; where a
//!    model takes its thinking budget comes from the model catalogue);
//! 7. build the forwarded body: the edits and the stream usage option in
//!    one rewrite, or the client's bytes untouched;
//! 8. admission: rate limits and budgets in one guard ([`admission`]);
//! 9. forward to the upstream (the route's own path, allowed headers);
//! 10. relay and account ([`relay`]).
//!
//! Any stage's error ends the call: [`finish`] closes the exchange with it,
//! counts refusals, and renders the one envelope the client gets.

pub mod admission;
pub mod body;
pub mod forward;
pub mod headers;
pub mod identifiers;
pub mod relay;
pub mod request;
pub mod stream;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{Method, header};
use tollgate_openai::{Api, EndMarker, RequestPeek};

use crate::accounting::{Accounting, Exchange, Outcome};
use crate::auth::Principal;
use crate::auth::models::ModelRules;
use crate::budget::BudgetBook;
use crate::clock::Clock;
use crate::config::LimitsConfig;
use crate::error::GatewayError;
use crate::limits::RateLimiter;
use crate::policy;
use crate::request_id::RequestId;
use crate::routing::reload::Routes;
use crate::shared::Shared;
use crate::telemetry::traces::{RequestTrace, Stage};
use crate::upstream::Upstream;
use opentelemetry::trace::SpanKind;

pub use admission::BUDGET_HEADER;
pub use relay::COST_HEADER;

/// What the `/v1` handlers share.
#[derive(Debug)]
pub struct Proxy {
    /// The default upstream: requests for models no route names go here.
    pub upstream: Arc<Upstream>,
    pub routes: Arc<Routes>,
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

/// `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`.
pub async fn forward_post(State(proxy): ProxyState, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let Ok((request_id, principal, mut slot)) = begin(&proxy, &parts) else {
        return GatewayError::Internal.into_response();
    };
    let result = post_stages(&proxy, &parts, body, &request_id, &principal, &mut slot).await;
    finish(result, slot)
}

async fn post_stages(
    proxy: &Proxy,
    parts: &http::request::Parts,
    body: Body,
    request_id: &RequestId,
    principal: &Principal,
    slot: &mut Option<Exchange>,
) -> Result<Response, GatewayError> {
    if proxy.accounting.ledger.is_full() {
        return Err(GatewayError::AccountingUnavailable);
    }
    let endpoint = parts.uri.path();
    let body = request::read_body(&parts.headers, body, proxy.max_body_bytes).await?;
    let peek = request::parse(&body)?;
    let model = request::model(&peek)?;
    if let Some(exchange) = slot.as_mut() {
        exchange.set_request(body.clone(), Some(model), peek.is_stream());
    }
    let route = proxy.routes.current().resolve(Api::OpenAi, model);
    let candidates: Vec<&str> = match &route {
        Some(route) => route.models(model).collect(),
        None => vec![model],
    };
    request::authorize(proxy, principal, model, &candidates)?;
    let thinking = proxy.accounting.thinking_place(model);
    let applied = policy::apply(&principal.tenant.policy, endpoint, &body, &peek, thinking)?;
    let forwarded = request::forwarded_body(&body, &peek, &applied.edits, endpoint)?;
    // Saturating: a client-chosen max_tokens must not wrap to a tiny worst case.
    let max_output =
        applied.max_output.unwrap_or(proxy.limits.default_output_tokens).saturating_mul(peek.n.unwrap_or(1).max(1));
    let shape =
        relay::Shape { api: Api::OpenAi, strip_usage: forwarded.strip_usage, end: EndMarker::for_endpoint(endpoint) };
    let prepared = Prepared {
        model,
        route: route.as_deref(),
        candidates: &candidates,
        upstream_path: request::upstream_path(endpoint),
        forwarded: forwarded.body,
        reserved_bytes: None,
        max_output,
        has_output_limit: applied.max_output.is_some(),
        modified: !applied.edits.is_empty(),
        peek: &peek,
        shape,
    };
    admit_forward_relay(proxy, parts, request_id, principal, slot, prepared).await
}

/// A request read and checked in its API's terms, ready for the stages
/// every API shares.
pub(crate) struct Prepared<'a> {
    /// The model the client asked for.
    pub model: &'a str,
    pub route: Option<&'a crate::routing::table::Route>,
    /// Every model the request may be sent as (the route's, or the model).
    pub candidates: &'a [&'a str],
    /// What follows the upstream's API root.
    pub upstream_path: &'a str,
    pub forwarded: Bytes,
    /// The prompt bound the budgets reserve, in bytes, when it is not the
    /// forwarded body's size (`Some(0)`: a free call reserves nothing).
    pub reserved_bytes: Option<usize>,
    /// The most output the call can bill, for its reservation.
    pub max_output: u64,
    pub has_output_limit: bool,
    /// The policy changed the request.
    pub modified: bool,
    pub peek: &'a RequestPeek<'a>,
    pub shape: relay::Shape,
}

/// Admission, forward, relay: the stages after a request was read, the
/// same for every API.
pub(crate) async fn admit_forward_relay(
    proxy: &Proxy,
    parts: &http::request::Parts,
    request_id: &RequestId,
    principal: &Principal,
    slot: &mut Option<Exchange>,
    prepared: Prepared<'_>,
) -> Result<Response, GatewayError> {
    let Prepared { model, route, candidates, upstream_path, forwarded, reserved_bytes, max_output, .. } = prepared;
    let forwarded_bytes = reserved_bytes.unwrap_or(forwarded.len());
    let demand = admission::Demand { models: candidates, forwarded_bytes, max_output };
    let trace = parts.extensions.get::<RequestTrace>();
    let admission = {
        let stage = Stage::under(trace, "admission", SpanKind::Internal);
        // Matched here rather than awaited through a helper: a decided
        // admission then builds no future at all.
        match admission::admit(proxy, principal, demand, &stage) {
            admission::Admitting::Now(decided) => decided?,
            admission::Admitting::Later(waiting) => waiting.await?,
        }
    };
    let grants = admission.grants();
    if let Some(exchange) = slot.as_mut() {
        exchange.modified = prepared.modified;
        exchange.hold(admission);
        exchange.mark_sent();
    }
    let call = forward::Call {
        path: upstream_path,
        headers: &parts.headers,
        request_id,
        body: &forwarded,
        peek: prepared.peek,
        requested_model: model,
        policy: &principal.tenant.policy,
        has_output_limit: prepared.has_output_limit,
        key_id: &principal.key.id,
        tenant_id: principal.tenant_id(),
        metrics: &proxy.accounting.metrics,
        trace,
        api: prepared.shape.api,
    };
    let served = match &route {
        Some(route) => forward::routed(route, &call).await?,
        None => forward::direct(&proxy.upstream, &call, forwarded.clone()).await?,
    };
    if let Some(exchange) = slot.as_mut() {
        let by = crate::accounting::ServedBy {
            route: route.as_ref().map(|r| r.name.clone()),
            target: served.by.map(|t| t.label.clone()),
            upstream: served.upstream_name().to_owned(),
            attempts: served.attempts,
        };
        exchange.served_by(&served.model, by);
    }
    let served_headers = relay::ServedHeaders::new(&served);
    let mut response = relay::respond(proxy, served.upstream, served.response, slot, prepared.shape).await?;
    grants.write(response.headers_mut());
    served_headers.write(response.headers_mut());
    Ok(response)
}

/// The caller and the accounting exchange every `/v1` request starts with.
pub(crate) fn begin(
    proxy: &Proxy,
    parts: &http::request::Parts,
) -> Result<(RequestId, Principal, Option<Exchange>), GatewayError> {
    let request_id = request_id(&parts.extensions);
    let principal = principal(&parts.extensions)?;
    let mut exchange = Exchange::open(
        proxy.accounting.clone(),
        request_id.as_str(),
        principal.tenant_id(),
        &principal.key.id,
        request::endpoint_name(parts.uri.path()),
    );
    if let Some(trace) = parts.extensions.get::<RequestTrace>() {
        trace.set_all(&[
            ("tollgate.tenant.id", principal.tenant_id().into()),
            ("tollgate.key.id", principal.key.id.as_str().into()),
        ]);
        exchange.traced(trace.clone());
    }
    Ok((request_id, principal, Some(exchange)))
}

/// Turns the stages' result into the response, closing the exchange if no
/// stage did (every failure before an answer was relayed) and counting
/// refusals by limits and budgets.
pub(crate) fn finish(result: Result<Response, GatewayError>, slot: Option<Exchange>) -> Response {
    match result {
        Ok(response) => {
            if let Some(exchange) = slot {
                let status = response.status().as_u16();
                exchange.close(Outcome { status, ..Outcome::default() });
            }
            response
        }
        Err(error) => {
            if let Some(exchange) = slot {
                if let Some(reason) = rejection_reason(&error) {
                    exchange.accounting().metrics.rejections.with_label_values(&[exchange.tenant_id(), reason]).inc();
                }
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

/// The `reason` label of a refusal by a limit or a budget.
fn rejection_reason(error: &GatewayError) -> Option<&'static str> {
    match error {
        GatewayError::RateLimited(t) => Some(match t.kind {
            crate::limits::Kind::Requests => "requests_per_minute",
            crate::limits::Kind::Tokens => "tokens_per_minute",
            crate::limits::Kind::Concurrency => "in_flight",
        }),
        GatewayError::BudgetExhausted { .. } => Some("budget"),
        GatewayError::BudgetBusy { .. } => Some("budget_busy"),
        _ => None,
    }
}

/// `GET /v1/models` and `GET /v1/models/{id}`: only the models the key may use.
pub async fn forward_get(State(proxy): ProxyState, request: Request) -> Response {
    let (parts, _body) = request.into_parts();
    let Ok((request_id, principal, mut slot)) = begin(&proxy, &parts) else {
        return GatewayError::Internal.into_response();
    };
    let result = forward_get_inner(&proxy, &parts, &request_id, &principal, &mut slot).await;
    finish(result, slot)
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
            let id = request::model_id_from_path(raw)?;
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
    let stage = Stage::under(parts.extensions.get::<RequestTrace>(), "list models", SpanKind::Client);
    stage.set("tollgate.upstream", "default");
    let outbound = crate::upstream::Outbound {
        method: Method::GET,
        api: tollgate_openai::Api::OpenAi,
        path: &path,
        client_headers: &parts.headers,
        request_id,
        traceparent: stage.traceparent(),
    };
    let upstream_response = proxy.upstream.send(outbound, None).await;
    if let Ok(response) = &upstream_response {
        stage.set("http.response.status_code", response.status().as_u16());
    }
    drop(stage);
    let upstream_response = upstream_response?;
    let upstream_response = upstream_response.map(crate::upstream::UpstreamBody::Live);
    let shape = relay::Shape { api: Api::OpenAi, strip_usage: false, end: None };
    let response = relay::respond(proxy, &proxy.upstream, upstream_response, slot, shape).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_lists_are_filtered_by_the_rules() {
        let body = br#"{"object":"list","data":[{"id":"gpt-4.1"},{"id":"gemini-2.5-pro"},{"id":"gemini-2.5-flash"}]}"#;
        let rules = ModelRules::new(&["gemini-*".to_owned()]);
        let filtered: serde_json::Value = serde_json::from_slice(&filter_model_list(body, &rules)).unwrap();
        let ids: Vec<&str> = filtered["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["gemini-2.5-pro", "gemini-2.5-flash"]);
        assert_eq!(filtered["object"], "list");
    }
}
