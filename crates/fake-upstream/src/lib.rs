//! A fake OpenAI-compatible upstream, served over real HTTP on a port of its
//! own. Tests and benchmarks point the gateway at [`FakeUpstream::base_url`].
//!
//! It answers chat completions (plain, streamed, tool calls, `n > 1`,
//! structured output), legacy completions, embeddings (float and base64),
//! responses and the model list; reports usage (honouring
//! `stream_options.include_usage`) with reasoning and cached token details or
//! omits it; and injects faults (see [`Fault`]). It records every request it
//! received so tests can assert what the gateway sent.
//!
//! It also speaks the Gemini API (`/v1beta/models/{model}:{method}`) and the
//! Anthropic Messages API (`/v1/messages`) in their own shapes: see
//! [`native`].

pub mod native;
pub mod responses;
pub mod scenario;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

pub use scenario::{ErrorStyle, Fault, Scenario, UsageStyle};

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: http::Method,
    pub version: http::Version,
    /// Path and query, e.g. `/v1/chat/completions`.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl RecordedRequest {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// What the fake reported as usage for one answered request (`None` when it
/// reported none the client could see).
#[derive(Debug, Clone)]
pub struct Reported {
    pub path: String,
    /// The `x-request-id` the request carried.
    pub request_id: Option<String>,
    pub usage: Option<Value>,
}

#[derive(Default)]
struct Shared {
    /// Off for long runs (benchmarks): the history would grow without end.
    recording: bool,
    defaults: Mutex<Scenario>,
    queued: Mutex<VecDeque<Fault>>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Keys it accepts (`Authorization: Bearer <key>`); empty: any.
    accepted_keys: Mutex<Vec<String>>,
    reported: Mutex<Vec<Reported>>,
    streams_started: AtomicUsize,
    streams_cancelled: AtomicUsize,
    streams_completed: AtomicUsize,
    connections: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave bad state
    // behind (each is a plain push or read), so poisoning is ignored.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A running fake upstream. Dropping it stops the server.
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

impl FakeUpstream {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), Scenario::default()).await
    }

    pub async fn start_on(addr: SocketAddr, defaults: Scenario) -> anyhow::Result<Self> {
        Self::start_with(addr, defaults, true).await
    }

    /// Like `start_on`; without `recording`, requests and reported usage are
    /// not kept (only the stream counters are).
    pub async fn start_with(addr: SocketAddr, defaults: Scenario, recording: bool) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared { recording, defaults: Mutex::new(defaults), ..Shared::default() });
        let (stop, stopped) = oneshot::channel();
        tokio::spawn(serve(listener, router(shared.clone()), shared.clone(), stopped));
        Ok(Self { addr, shared, _stop: stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure as the gateway's upstream (ends in `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn set_defaults(&self, scenario: Scenario) {
        *lock(&self.shared.defaults) = scenario;
    }

    /// The next request (of any kind) gets this fault.
    /// Accepts only these keys from now on (empty: any), answering 401 to
    /// others as a real upstream does.
    pub fn accept_keys(&self, keys: &[&str]) {
        *lock(&self.shared.accepted_keys) = keys.iter().map(|k| (*k).to_owned()).collect();
    }

    pub fn enqueue_fault(&self, fault: Fault) {
        lock(&self.shared.queued).push_back(fault);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    pub fn reported(&self) -> Vec<Reported> {
        lock(&self.shared.reported).clone()
    }

    pub fn streams_started(&self) -> usize {
        self.shared.streams_started.load(Ordering::SeqCst)
    }

    /// Streams whose client (the gateway) went away before the end.
    pub fn streams_cancelled(&self) -> usize {
        self.shared.streams_cancelled.load(Ordering::SeqCst)
    }

    pub fn streams_completed(&self) -> usize {
        self.shared.streams_completed.load(Ordering::SeqCst)
    }

    /// Connections accepted since start.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }
}

/// Lets a handler drop its own connection without answering.
#[derive(Clone)]
struct ConnectionKill(Arc<Notify>);

/// Serves connections by hand (rather than `axum::serve`) so that a handler
/// can close its connection without a response: the `reset` fault.
async fn serve(listener: TcpListener, app: Router, shared: Arc<Shared>, mut stopped: oneshot::Receiver<()>) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((tcp, _)) = accepted else { continue };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let _ = tcp.set_nodelay(true);
        let kill = Arc::new(Notify::new());
        let app = app.clone();
        let conn_kill = ConnectionKill(kill.clone());
        let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(conn_kill.clone());
            let app = app.clone();
            async move { Ok::<_, Infallible>(tower::ServiceExt::oneshot(app, request.map(Body::new)).await.into_response()) }
        });
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::select! {
                _ = conn => {}
                () = kill.notified() => {}
            }
        });
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(answer))
        .route("/v1/completions", post(answer))
        .route("/v1/embeddings", post(answer))
        .route("/v1/responses", post(answer))
        .route("/v1/models", get(answer))
        .route("/v1/models/{*id}", get(answer))
        .route("/v1/messages", post(answer))
        .route("/v1/messages/count_tokens", post(answer))
        .route("/v1beta/models/{*call}", post(answer))
        .fallback(answer)
        .with_state(shared)
}

async fn answer(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(_) => return StatusCode::BAD_REQUEST.into_response(),
    };
    let path = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |pq| pq.to_string());
    if shared.recording {
        lock(&shared.requests).push(RecordedRequest {
            method: parts.method.clone(),
            version: parts.version,
            path: path.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    }

    let api = Api::of(parts.uri.path());
    // Like a real upstream, refuse a key it does not know (when told which),
    // read from the header its API uses.
    {
        let accepted = lock(&shared.accepted_keys);
        let header_value = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let presented = match api {
            Api::OpenAi => header_value("authorization"),
            Api::Gemini => format!("Bearer {}", header_value("x-goog-api-key")),
            Api::Anthropic => format!("Bearer {}", header_value("x-api-key")),
        };
        if !accepted.is_empty() && !accepted.iter().any(|k| presented == format!("Bearer {k}")) {
            return error_response(api, StatusCode::UNAUTHORIZED, "Incorrect API key provided: sk-...xyz", None);
        }
    }
    let mut scenario = lock(&shared.defaults).clone();
    if let Err(e) = scenario.apply_metadata(&body).and_then(|()| scenario.apply_headers(&parts.headers)) {
        return error_response(api, StatusCode::BAD_REQUEST, &e.0, None);
    }
    if let Some(fault) = lock(&shared.queued).pop_front() {
        scenario.fault = Some(fault);
    }
    if !scenario.latency.is_zero() {
        tokio::time::sleep(scenario.latency).await;
    }

    match scenario.fault {
        Some(Fault::Status { status, style }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let message = format!("fake upstream failure with status {}", status.as_u16());
            error_response(api, status, &message, Some(style))
        }
        Some(Fault::ContextLength) => json_response(
            StatusCode::BAD_REQUEST,
            &serde_json::json!({"error": {
                "message": "This model's maximum context length is 1048576 tokens. However, your messages resulted in 2000000 tokens.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
        ),
        Some(Fault::Html301) => Response::builder()
            .status(StatusCode::MOVED_PERMANENTLY)
            .header(header::LOCATION, "https://example.invalid/")
            .header(header::CONTENT_TYPE, "text/html")
            .body(Body::from("<html><body>Moved Permanently</body></html>"))
            .unwrap_or_default(),
        Some(Fault::Html200) => {
            ([(header::CONTENT_TYPE, "text/html")], "<!doctype html><html><body>Welcome</body></html>").into_response()
        }
        Some(Fault::Reset) => {
            if let Some(kill) = parts.extensions.get::<ConnectionKill>() {
                kill.0.notify_one();
            }
            std::future::pending::<()>().await;
            unreachable_response()
        }
        Some(Fault::Stall) => {
            std::future::pending::<()>().await;
            unreachable_response()
        }
        _ => respond(&shared, &parts, &path, &body, &scenario),
    }
}

/// Which API a path belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Api {
    OpenAi,
    Gemini,
    Anthropic,
}

impl Api {
    fn of(path: &str) -> Self {
        if path.starts_with("/v1beta/") {
            Self::Gemini
        } else if path.starts_with("/v1/messages") {
            Self::Anthropic
        } else {
            Self::OpenAi
        }
    }
}

/// An error in `api`'s own envelope (`style` chooses among OpenAI-shaped ones).
fn error_response(api: Api, status: StatusCode, message: &str, style: Option<ErrorStyle>) -> Response {
    let code = status.as_u16();
    let body = match api {
        Api::Gemini => native::gemini_error(code, message),
        Api::Anthropic => native::anthropic_error(code, message),
        Api::OpenAi => match style {
            Some(style) => responses::error_body(code, style),
            None => serde_json::json!({"error": {"message": message,
                "type": "invalid_request_error", "param": null, "code": format!("fake_{code}")}}),
        },
    };
    json_response(status, &body)
}

fn unreachable_response() -> Response {
    StatusCode::INTERNAL_SERVER_ERROR.into_response()
}

fn respond(
    shared: &Arc<Shared>,
    parts: &http::request::Parts,
    path: &str,
    body: &Bytes,
    scenario: &Scenario,
) -> Response {
    let ask = responses::Ask::read(body);
    let stream = serde_json::from_slice::<Value>(body).ok().and_then(|v| v["stream"].as_bool()).unwrap_or(false);
    let route = parts.uri.path();
    let request_id = parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let record = |usage: Option<Value>| {
        if !shared.recording {
            return;
        }
        lock(&shared.reported).push(Reported { path: path.to_owned(), request_id: request_id.clone(), usage })
    };

    if let Some(response) = respond_native(shared, route, body, &ask, scenario, &record) {
        return response;
    }
    if parts.method == http::Method::GET {
        if route == "/v1/models" {
            return json_response(StatusCode::OK, &responses::model_list());
        }
        if let Some(id) = route.strip_prefix("/v1/models/") {
            let id = percent_decode(id);
            if responses::MODELS.contains(&id.as_str()) {
                return json_response(StatusCode::OK, &responses::model(&id));
            }
            return json_response(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": {
                "message": format!("The model `{id}` does not exist"), "type": "invalid_request_error",
                "param": null, "code": "model_not_found"}}),
            );
        }
    }

    let (events, usage) = match (route, stream) {
        ("/v1/chat/completions", false) => {
            return json_with_usage(responses::chat_completion(&ask, scenario), record);
        }
        ("/v1/completions", false) => {
            return json_with_usage(responses::completion(&ask, scenario), record);
        }
        ("/v1/embeddings", _) => {
            return json_with_usage(responses::embeddings(body, &ask, scenario), record);
        }
        ("/v1/responses", false) => {
            return json_with_usage(responses::response(&ask, scenario), record);
        }
        ("/v1/chat/completions", true) => responses::chat_stream(&ask, scenario),
        ("/v1/completions", true) => responses::completion_stream(&ask, scenario),
        ("/v1/responses", true) => responses::response_stream(&ask, scenario),
        _ => {
            return json_response(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": {
                "message": format!("unknown path {route}"), "type": "invalid_request_error",
                "param": null, "code": "unknown_url"}}),
            );
        }
    };
    record(usage);
    let with_done = route != "/v1/responses";
    sse_response(shared.clone(), events, with_done, scenario)
}

/// The Gemini and Anthropic routes; `None` for the others.
fn respond_native(
    shared: &Arc<Shared>,
    route: &str,
    body: &Bytes,
    ask: &responses::Ask,
    scenario: &Scenario,
    record: &dyn Fn(Option<Value>),
) -> Option<Response> {
    let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    if route.starts_with("/v1beta/") {
        let Some((model, method)) = native::gemini_call(route) else {
            return Some(error_response(Api::Gemini, StatusCode::NOT_FOUND, &format!("unknown path {route}"), None));
        };
        let ask = responses::Ask { model: model.clone(), ..ask.clone() };
        return Some(match method {
            native::GeminiMethod::Generate => {
                let (answer, usage) = native::gemini_generate(&model, &ask, &request, scenario);
                record(usage);
                json_response(StatusCode::OK, &answer)
            }
            native::GeminiMethod::StreamGenerate => {
                let (events, usage) = native::gemini_stream(&model, &ask, &request, scenario);
                record(usage);
                sse_response(shared.clone(), events, false, scenario)
            }
            native::GeminiMethod::CountTokens => {
                record(None);
                json_response(StatusCode::OK, &native::gemini_count(&ask))
            }
            native::GeminiMethod::Embed => {
                record(None);
                json_response(StatusCode::OK, &native::gemini_embed())
            }
            native::GeminiMethod::BatchEmbed => {
                record(None);
                json_response(StatusCode::OK, &native::gemini_batch_embed(&request))
            }
        });
    }
    match route {
        "/v1/messages/count_tokens" => {
            record(None);
            Some(json_response(StatusCode::OK, &native::anthropic_count(ask)))
        }
        "/v1/messages" if request["stream"].as_bool() == Some(true) => {
            let (events, usage) = native::anthropic_stream(ask, &request, scenario);
            record(usage);
            Some(sse_response(shared.clone(), events, false, scenario))
        }
        "/v1/messages" => {
            let (answer, usage) = native::anthropic_message(ask, &request, scenario);
            record(usage);
            Some(json_response(StatusCode::OK, &answer))
        }
        _ => None,
    }
}

fn json_with_usage((body, usage): (Value, Option<Value>), record: impl FnOnce(Option<Value>)) -> Response {
    record(usage);
    json_response(StatusCode::OK, &body)
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert("x-request-id", HeaderValue::from_static("fake-upstream-request"));
    for (name, value) in ACCOUNT_HEADERS {
        response.headers_mut().insert(*name, HeaderValue::from_static(value));
    }
    response
}

/// Headers a real upstream sends about the account behind its key, which a
/// gateway must not pass on to its tenants.
pub const ACCOUNT_HEADERS: &[(&str, &str)] = &[
    ("openai-organization", "org-operator-account"),
    ("openai-project", "proj_operator"),
    ("x-ratelimit-limit-requests", "10000"),
    ("x-ratelimit-remaining-requests", "9999"),
    ("server", "fake-upstream"),
    ("via", "1.1 fake-edge"),
];

/// Counts a stream as cancelled unless it ran to its end.
struct StreamGuard {
    shared: Arc<Shared>,
    completed: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let counter = if self.completed { &self.shared.streams_completed } else { &self.shared.streams_cancelled };
        counter.fetch_add(1, Ordering::SeqCst);
    }
}

fn sse_response(shared: Arc<Shared>, events: Vec<String>, with_done: bool, scenario: &Scenario) -> Response {
    shared.streams_started.fetch_add(1, Ordering::SeqCst);
    let mut frames: VecDeque<Bytes> = events.into_iter().map(Bytes::from).collect();
    if with_done {
        frames.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
    }
    let interval = scenario.chunk_interval;
    let fault = scenario.fault;
    struct St {
        frames: VecDeque<Bytes>,
        sent: usize,
        guard: StreamGuard,
    }
    let state = St { frames, sent: 0, guard: StreamGuard { shared, completed: false } };
    let stream = futures_util::stream::unfold(state, move |mut st| async move {
        match fault {
            Some(Fault::DropMidStream { after_chunks }) if st.sent >= after_chunks => {
                // Give hyper time to flush what was sent: an error aborts the
                // connection without writing buffered frames.
                tokio::time::sleep(Duration::from_millis(50)).await;
                st.guard.completed = true;
                return Some((Err(std::io::Error::other("fake: connection dropped mid-stream")), st));
            }
            Some(Fault::StallMidStream { after_chunks }) if st.sent >= after_chunks => {
                std::future::pending::<()>().await;
            }
            Some(Fault::EndMidStream { after_chunks }) if st.sent >= after_chunks => {
                // A clean end of the body, before the protocol's end marker.
                st.guard.completed = true;
                drop(st);
                return None;
            }
            _ => {}
        }
        if st.sent > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        match st.frames.pop_front() {
            Some(frame) => {
                st.sent += 1;
                Some((Ok(frame), st))
            }
            None => {
                st.guard.completed = true;
                drop(st);
                None
            }
        }
    });
    // After a deliberate drop the stream must end, not yield more errors.
    let stream = futures_util::StreamExt::take_while(stream, {
        let mut failed = false;
        move |item: &Result<Bytes, std::io::Error>| {
            let go = !failed;
            failed |= item.is_err();
            std::future::ready(go)
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-request-id", "fake-upstream-request")
        .header("openai-organization", "org-operator-account")
        .header("x-ratelimit-remaining-requests", "9999")
        .body(Body::from_stream(stream))
        .unwrap_or_default()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Convenience for the binary: waits forever.
/// Serves until the process ends, keeping no history (see `start_with`).
pub async fn run_forever(addr: SocketAddr, defaults: Scenario) -> anyhow::Result<()> {
    let fake = FakeUpstream::start_with(addr, defaults, false).await?;
    eprintln!("fake upstream listening on {}", fake.base_url());
    std::future::pending::<()>().await;
    drop(fake);
    Ok(())
}

/// Reexported for the binary's flag parsing.
pub fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}
