//! The HTTP surface and the middleware stack, built in one place.
//!
//! Layers, outermost first (a request passes them top to bottom, a response
//! bottom to top):
//!
//! 1. `RequestIdLayer` — inserts the `RequestId` extension and echoes
//!    `x-request-id` on every response, including errors from any layer below.
//! 2. `TraceLayer` — one span per request carrying the request id, so every
//!    log line below it has the id; logs each response once with its status
//!    and latency. Sits under (1) because it reads the `RequestId` extension.
//! 3. `CatchPanicLayer` — a panic in a handler becomes a 500 envelope instead
//!    of a dropped connection. Innermost, so (1) and (2) still see a response.
//! 4. Routes. The body limit is applied where the body is read
//!    (`proxy::body`), so that it answers with our envelope.
//!
//! `POST` to the four body-carrying OpenAI routes ([`FAST_PATHS`]) is
//! dispatched before the router, to a stack built here with the same
//! layers (1–3, then 5 and 6 below) and the same handler (see [`Routes`]).
//!
//! On the `/v1` routes only (as a route layer, so unknown paths are 404
//! before any key check):
//!
//! On the Gemini (`/v1beta/models/…`) and Anthropic (`/v1/messages`)
//! routes, `native::errors::in_api_shape` sits above both and rewrites the
//! gateway's own errors into that API's envelope.
//!
//! 5. `trace_request` — only when trace export is on: the request's
//!    server span (continuing the caller's `traceparent`), its ids on the
//!    log span, its status when the answer leaves. Above the key check, so
//!    refused keys are traced too.
//! 6. `AuthLayer` — resolves the tenant key from the in-memory cache and
//!    inserts the `Principal` extension that the `/v1` handlers read. Policy,
//!    rate limits and budgets go after it, in that order.

use std::any::Any;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::extract::{MatchedPath, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::Method;
use tollgate_openai::Api;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::classify::{ServerErrorsAsFailures, SharedClassifier};
use tower_http::trace::TraceLayer;
use tracing::Span;

use crate::auth::{AuthLayer, Authenticator};
use crate::error::{ErrorLog, Fault, GatewayError};
use crate::health::{self, Readiness};
use crate::native;
use crate::proxy::{self, Proxy};
use crate::request_id::{RequestId, RequestIdLayer};
use crate::telemetry::traces::{self, Tracing};
use crate::tenant_usage::{self, TenantUsageState};

/// What a listener serves: its router, and on the public listener, in front
/// of it, the path nearly every request takes.
#[derive(Clone)]
pub struct Routes {
    /// `POST` to one of [`FAST_PATHS`], with the same layers and handler as
    /// the router's route, reached without the router: its path lookup,
    /// matched-path and path-parameter extensions, method dispatch and the
    /// boxed services of each level cost about as much per request as the
    /// key check. The router keeps these routes too (other methods get its
    /// 405, and nothing else depends on which of the two served a request).
    posts: Option<BoxCloneSyncService<Request, Response, Infallible>>,
    router: Router,
}

/// The OpenAI API's body-carrying endpoints, served by `proxy::forward_post`.
const FAST_PATHS: [&str; 4] = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"];

impl Routes {
    /// Serves `request` by the fast path when it is one, else the router.
    pub async fn serve(self, request: Request) -> Response {
        let fast = request.method() == Method::POST && FAST_PATHS.contains(&request.uri().path());
        let result = match self.posts {
            Some(posts) if fast => posts.oneshot(request).await,
            _ => self.router.oneshot(request).await,
        };
        match result {
            Ok(response) => response,
            Err(never) => match never {},
        }
    }
}

impl From<Router> for Routes {
    fn from(router: Router) -> Self {
        Self { posts: None, router }
    }
}

/// The public listener's routes. `admin` is merged in when the admin API
/// has no listener of its own.
pub fn build(
    proxy: Arc<Proxy>,
    readiness: Readiness,
    auth: Arc<Authenticator>,
    usage: Arc<TenantUsageState>,
    admin: Option<Router>,
    traces: Option<Arc<Tracing>>,
) -> Routes {
    let posts = fast_posts(proxy.clone(), auth.clone(), traces.clone());
    let mut v1 = Router::new()
        .route("/v1/chat/completions", post(proxy::forward_post))
        .route("/v1/completions", post(proxy::forward_post))
        .route("/v1/embeddings", post(proxy::forward_post))
        .route("/v1/responses", post(proxy::forward_post))
        .route("/v1/models", get(proxy::forward_get))
        // Model ids may contain '/', e.g. `google/gemini-2.5-flash`.
        .route("/v1/models/{*id}", get(proxy::forward_get))
        .route_layer(AuthLayer::new(auth.clone()))
        .with_state(proxy.clone());
    // The Gemini and Anthropic APIs in their own shapes: the same stages,
    // with the gateway's errors rewritten into each API's envelope (the
    // outermost of their layers, so refused keys get it too).
    let mut gemini = Router::new()
        .route("/v1beta/models/{*call}", post(native::gemini))
        // google-genai's default API version; `GET /v1/models/{id}` stays
        // OpenAI's model retrieval.
        .route("/v1/models/{*id}", post(native::gemini))
        .route_layer(AuthLayer::with_query_key(auth.clone()))
        .with_state(proxy.clone());
    let mut anthropic = Router::new()
        .route("/v1/messages", post(native::anthropic))
        .route("/v1/messages/count_tokens", post(native::anthropic))
        .route_layer(AuthLayer::new(auth.clone()))
        .with_state(proxy);
    let mut v1_usage = Router::new()
        .route("/v1/usage", get(tenant_usage::summary))
        .route("/v1/usage/records", get(tenant_usage::records))
        .route_layer(AuthLayer::new(auth))
        .with_state(usage);
    if let Some(traces) = traces {
        v1 = v1.route_layer(axum::middleware::from_fn_with_state(traces.clone(), trace_request));
        v1_usage = v1_usage.route_layer(axum::middleware::from_fn_with_state(traces.clone(), trace_request));
        gemini = gemini.route_layer(axum::middleware::from_fn_with_state(traces.clone(), trace_request));
        anthropic = anthropic.route_layer(axum::middleware::from_fn_with_state(traces, trace_request));
    }
    let gemini = gemini.route_layer(axum::middleware::from_fn_with_state(Api::Gemini, native::errors::in_api_shape));
    let anthropic =
        anthropic.route_layer(axum::middleware::from_fn_with_state(Api::Anthropic, native::errors::in_api_shape));

    let mut router =
        Router::new().merge(v1).merge(gemini).merge(anthropic).merge(v1_usage).merge(ops_routes(readiness));
    if let Some(admin) = admin {
        router = router.merge(admin);
    }
    Routes { posts: Some(posts), router: with_common_layers(router) }
}

/// The admin listener's routes: the admin API and the health endpoints.
pub fn build_admin(admin: Router, readiness: Readiness) -> Routes {
    Routes::from(with_common_layers(admin.merge(ops_routes(readiness))))
}

/// The fast path's service: the common layers, the server span when traces
/// are exported, the key check, `proxy::forward_post`, in the order the
/// router stacks them for the same routes.
fn fast_posts(
    proxy: Arc<Proxy>,
    auth: Arc<Authenticator>,
    traces: Option<Arc<Tracing>>,
) -> BoxCloneSyncService<Request, Response, Infallible> {
    // The handler's future holds every stage's state (kilobytes): boxed
    // where it is made, so the layers above move a pointer, not all of it.
    let handler = tower::service_fn(move |request: Request| {
        let proxy = proxy.clone();
        Box::pin(async move { Ok::<_, Infallible>(proxy::forward_post(State(proxy), request).await) })
    });
    let service = ServiceBuilder::new()
        .map_response(IntoResponse::into_response)
        .layer(RequestIdLayer)
        .layer(access_log())
        .layer(CatchPanicLayer::custom(panic_response))
        .option_layer(traces.map(|traces| axum::middleware::from_fn_with_state(traces, trace_request)))
        .layer(AuthLayer::new(auth))
        .service(handler);
    BoxCloneSyncService::new(service)
}

fn ops_routes(readiness: Readiness) -> Router {
    Router::new().route("/healthz", get(health::healthz)).route("/readyz", get(health::readyz)).with_state(readiness)
}

fn with_common_layers(router: Router) -> Router {
    router.fallback(unknown_route).method_not_allowed_fallback(method_not_allowed).layer(
        ServiceBuilder::new().layer(RequestIdLayer).layer(access_log()).layer(CatchPanicLayer::custom(panic_response)),
    )
}

/// The request's log span and its one access line.
fn access_log<B>() -> TraceLayer<SharedClassifier<ServerErrorsAsFailures>, MakeSpan, (), OnResponse<B>, (), (), ()> {
    TraceLayer::new_for_http()
        .make_span_with(make_span as MakeSpan)
        .on_request(())
        .on_response(on_response as OnResponse<B>)
        .on_body_chunk(())
        .on_eos(())
        .on_failure(())
}

type MakeSpan = fn(&Request) -> Span;
type OnResponse<B> = fn(&http::Response<B>, Duration, &Span);

fn make_span(request: &Request) -> Span {
    let request_id = request.extensions().get::<RequestId>().map_or("", RequestId::as_str);
    // Plain `&str` values, not `%` (Display): they are written as they are,
    // without the formatting machinery, for every request.
    tracing::info_span!(
        "request",
        request_id,
        method = request.method().as_str(),
        path = request.uri().path(),
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    )
}

/// Opens the request's server span; see `telemetry::traces`. Only the path
/// is recorded, never the query string.
async fn trace_request(
    State(traces): State<Arc<Tracing>>,
    route: Option<MatchedPath>,
    mut request: Request,
    next: Next,
) -> Response {
    let method = request.method().as_str();
    let route = route.as_ref().map_or_else(|| request.uri().path(), MatchedPath::as_str);
    let request_id = request.extensions().get::<RequestId>().map_or("", RequestId::as_str);
    let attributes = [
        ("http.request.method", method.into()),
        ("url.path", request.uri().path().into()),
        ("http.route", route.into()),
        ("tollgate.request_id", request_id.into()),
    ];
    let trace = traces.request(request.headers(), traces::span_name(method, route), &attributes);
    let ids = trace.ids();
    let log_span = Span::current();
    log_span.record("trace_id", ids.trace_id());
    log_span.record("span_id", ids.span_id());
    request.extensions_mut().insert(trace.clone());
    let response = next.run(request).await;
    let status = response.status();
    match response.extensions().get::<ErrorLog>() {
        Some(error) => {
            trace.set_all(&[("http.response.status_code", status.as_u16().into()), traces::error_attribute(error.code)])
        }
        None => trace.set("http.response.status_code", status.as_u16()),
    }
    if status.is_server_error() {
        trace.fail(status.canonical_reason().unwrap_or("server error"));
    }
    response
}

/// One line per response. Failures the gateway's operators must act on
/// (its own configuration, the upstream) are warnings and errors, with the
/// detail the client was not told.
fn on_response<B>(response: &http::Response<B>, latency: Duration, _span: &Span) {
    let status = response.status().as_u16();
    let latency_ms = latency.as_secs_f64() * 1000.0;
    let Some(error) = response.extensions().get::<ErrorLog>() else {
        tracing::info!(status, latency_ms, "response");
        return;
    };
    let detail = error.detail.as_deref().unwrap_or("");
    match response.extensions().get::<Fault>() {
        Some(Fault::Gateway) => tracing::error!(status, latency_ms, code = error.code, detail, "response"),
        Some(Fault::Upstream) => tracing::warn!(status, latency_ms, code = error.code, detail, "response"),
        _ => tracing::info!(status, latency_ms, code = error.code, "response"),
    }
}

async fn unknown_route(request: Request) -> GatewayError {
    GatewayError::UnknownRoute(request.uri().path().to_owned())
}

async fn method_not_allowed(request: Request) -> GatewayError {
    GatewayError::MethodNotAllowed { method: request.method().to_string(), path: request.uri().path().to_owned() }
}

fn panic_response(_panic: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    GatewayError::Internal.into_response()
}
