//! An OTLP trace receiver that keeps every span it receives, so tests can
//! check what the gateway exported and benchmarks can give it somewhere to
//! export to. It speaks both OTLP transports: gRPC (`TraceService/Export`)
//! and HTTP/protobuf (`POST /v1/traces`). It can be made slow or failing to
//! show that the gateway's clients never notice.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The OTLP transport a sink listens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Grpc,
    HttpProtobuf,
}

/// An attribute value as received.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    /// Arrays, maps and bytes: not used by the gateway.
    Other,
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// One span as received, ids in lowercase hex.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP's `SpanKind`: 1 internal, 2 server, 3 client.
    pub kind: i32,
    pub attributes: BTreeMap<String, Value>,
    /// OTLP's status code: 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// The resource the span was exported with (`service.name`, …).
    pub resource: BTreeMap<String, Value>,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes.get(key)
    }

    pub fn str_attr(&self, key: &str) -> Option<&str> {
        self.attr(key).and_then(Value::as_str)
    }

    pub fn int_attr(&self, key: &str) -> Option<i64> {
        self.attr(key).and_then(Value::as_i64)
    }
}

#[derive(Debug, Default)]
struct Shared {
    spans: Mutex<Vec<Span>>,
    arrived: Notify,
    /// Export calls answered, whatever their outcome.
    exports: AtomicU64,
    /// Each export waits this long (milliseconds) before it is answered.
    delay_ms: AtomicU64,
    /// Exports are refused (gRPC `UNAVAILABLE`, HTTP 503).
    failing: AtomicBool,
    /// Spans are only counted, not kept (a benchmark's receiver must not
    /// grow or spend its CPU on copies).
    counting_only: AtomicBool,
    /// Spans received, including those of refused exports.
    seen: AtomicUsize,
    /// The headers (gRPC metadata) of the last export.
    last_headers: Mutex<BTreeMap<String, String>>,
    /// Accepted exports are answered as a partial success: this many spans
    /// rejected (at most the export's own), with this message.
    rejecting: Mutex<Option<(u64, String)>>,
}

impl Shared {
    /// The answer to an accepted export of `spans` spans.
    fn answer(&self, spans: usize) -> ExportTraceServiceResponse {
        let rejecting = self.rejecting.lock().unwrap_or_else(PoisonError::into_inner).clone();
        ExportTraceServiceResponse {
            partial_success: rejecting.map(|(rejected, message)| ExportTracePartialSuccess {
                rejected_spans: i64::try_from(rejected.min(spans as u64)).unwrap_or(i64::MAX),
                error_message: message,
            }),
        }
    }

    /// Takes an export; `Some(spans in it)` when accepted.
    async fn take(&self, request: ExportTraceServiceRequest, headers: BTreeMap<String, String>) -> Option<usize> {
        *self.last_headers.lock().unwrap_or_else(PoisonError::into_inner) = headers;
        self.exports.fetch_add(1, Ordering::Relaxed);
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.counting_only.load(Ordering::Relaxed) {
            let count = request.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
            self.seen.fetch_add(count, Ordering::Relaxed);
            return (!self.failing.load(Ordering::Relaxed)).then_some(count);
        }
        let spans = flatten(request);
        let count = spans.len();
        self.seen.fetch_add(count, Ordering::Relaxed);
        if self.failing.load(Ordering::Relaxed) {
            return None;
        }
        self.spans.lock().unwrap_or_else(PoisonError::into_inner).extend(spans);
        self.arrived.notify_waiters();
        Some(count)
    }
}

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub struct Sink {
    addr: SocketAddr,
    transport: Transport,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Sink {
    /// Listens on `127.0.0.1`, on a free port.
    pub async fn start(transport: Transport) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, transport).await
    }

    pub async fn start_on(addr: SocketAddr, transport: Transport) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        match transport {
            Transport::HttpProtobuf => {
                let app =
                    Router::new().route("/v1/traces", axum::routing::post(http_export)).with_state(shared.clone());
                let stop = stop.clone();
                tokio::spawn(async move {
                    let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
                });
            }
            Transport::Grpc => {
                let service = TraceServiceServer::new(GrpcExport { shared: shared.clone() });
                let incoming = tonic::transport::server::TcpIncoming::from(listener);
                let stop = stop.clone();
                tokio::spawn(async move {
                    let _ = tonic::transport::Server::builder()
                        .add_service(service)
                        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
                        .await;
                });
            }
        }
        Ok(Self { addr, transport, shared, stop })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL an exporter is pointed at.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Every span kept so far.
    pub fn spans(&self) -> Vec<Span> {
        self.shared.spans.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Spans received, kept or refused.
    pub fn spans_seen(&self) -> usize {
        self.shared.seen.load(Ordering::Relaxed)
    }

    /// Export calls answered so far.
    pub fn exports(&self) -> u64 {
        self.shared.exports.load(Ordering::Relaxed)
    }

    /// The headers (gRPC metadata) the last export came with.
    pub fn last_headers(&self) -> BTreeMap<String, String> {
        self.shared.last_headers.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Makes every export wait `delay` before it is answered.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_ms.store(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Refuses every export from now on (or accepts them again).
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::Relaxed);
    }

    /// Answers every accepted export from now on as a partial success:
    /// `rejected` of its spans (at most all of them) rejected, with
    /// `message`; `None` answers with a full success again.
    pub fn set_rejecting(&self, rejecting: Option<(u64, &str)>) {
        *self.shared.rejecting.lock().unwrap_or_else(PoisonError::into_inner) =
            rejecting.map(|(rejected, message)| (rejected, message.to_owned()));
    }

    /// Counts the spans of every export from now on without keeping them
    /// (`spans_seen` still counts; `spans` and `wait_for` see no new ones).
    pub fn set_counting_only(&self, counting_only: bool) {
        self.shared.counting_only.store(counting_only, Ordering::Relaxed);
    }

    /// Waits until the spans kept satisfy `done`, for at most `patience`;
    /// returns the spans either way.
    pub async fn wait_for(&self, patience: Duration, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let arrived = self.shared.arrived.notified();
            let spans = self.spans();
            if done(&spans) || tokio::time::Instant::now() >= deadline {
                return spans;
            }
            // Woken by an arrival, or checks again shortly.
            let _ =
                tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + Duration::from_millis(50)), arrived)
                    .await;
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn http_export(State(shared): State<Arc<Shared>>, headers: axum::http::HeaderMap, body: Bytes) -> Response {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, "not an ExportTraceServiceRequest").into_response();
    };
    let headers = headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
        .collect();
    let Some(spans) = shared.take(request, headers).await else {
        return (StatusCode::SERVICE_UNAVAILABLE, "refusing exports").into_response();
    };
    let answer = shared.answer(spans).encode_to_vec();
    ([(header::CONTENT_TYPE, "application/x-protobuf")], answer).into_response()
}

struct GrpcExport {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl TraceService for GrpcExport {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .iter()
            .filter_map(|entry| match entry {
                tonic::metadata::KeyAndValueRef::Ascii(key, value) => {
                    Some((key.as_str().to_owned(), value.to_str().ok()?.to_owned()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        match self.shared.take(request.into_inner(), headers).await {
            Some(spans) => Ok(tonic::Response::new(self.shared.answer(spans))),
            None => Err(tonic::Status::unavailable("refusing exports")),
        }
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<Span> {
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = resource_spans.resource.map(|r| attributes(r.attributes)).unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(Span {
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    attributes: attributes(span.attributes),
                    status_code: span.status.map_or(0, |s| s.code),
                    start_unix_nano: span.start_time_unix_nano,
                    end_unix_nano: span.end_time_unix_nano,
                    resource: resource.clone(),
                });
            }
        }
    }
    spans
}

fn attributes(list: Vec<KeyValue>) -> BTreeMap<String, Value> {
    list.into_iter().map(|kv| (kv.key, value(kv.value))).collect()
}

fn value(value: Option<AnyValue>) -> Value {
    match value.and_then(|v| v.value) {
        Some(any_value::Value::StringValue(s)) => Value::Str(s),
        Some(any_value::Value::IntValue(n)) => Value::Int(n),
        Some(any_value::Value::DoubleValue(d)) => Value::Double(d),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(b),
        _ => Value::Other,
    }
}
