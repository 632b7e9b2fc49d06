//! OpenTelemetry traces: one server span per `/v1` request, with child
//! spans for admission (rate limits, budgets), each upstream attempt and
//! the relay; W3C trace context read from the caller and sent upstream.
//!
//! Opt-in (`[telemetry.otlp]`). Off, no span is made and no layer is
//! installed: a request pays nothing. On, spans are recorded by [`span`]
//! (ids, the SDK's parent-based ratio sampling, the span's data) and go to
//! [`export`]'s bounded queue, so a slow or absent collector costs dropped
//! spans, never a slower request; [`otlp`] sends them.
//!
//! The recorder is the application's own (nothing process-wide), so
//! several gateways in one process (the tests) each export where their own
//! configuration says.
//!
//! Attribute names follow the OpenTelemetry semantic conventions for HTTP
//! and GenAI where they exist (`http.request.method`, `gen_ai.request.model`,
//! `gen_ai.usage.input_tokens`, …); the gateway's own are under
//! `tollgate.*`. No prompt or completion text is ever an attribute, and a
//! key appears only as its id.

pub mod config;
pub mod export;
pub mod otlp;
pub mod span;
mod wire;

use std::borrow::Cow;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use config::{OtlpConfig, OtlpProtocol};
pub use span::Attribute;
pub use wire::AttributeValue;

/// The application's span recorder: present when `[telemetry.otlp]` is set.
#[derive(Debug)]
pub struct Tracing {
    recorder: Arc<span::Recorder>,
    propagator: TraceContextPropagator,
}

impl Tracing {
    /// Builds the exporter and starts the export task on `background`.
    pub fn start(
        config: &OtlpConfig,
        metrics: &Metrics,
        background: &crate::background::Background,
        cancel: CancellationToken,
    ) -> anyhow::Result<Arc<Self>> {
        let resource = Resource::builder()
            .with_service_name(config.service_name.clone())
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .with_attributes(config.resource_attributes.iter().map(|(k, v)| KeyValue::new(k.clone(), v.clone())))
            .build();
        let exporter = build_exporter(config)?;
        let encoder = otlp::Encoder::new(&resource);
        let (recorder, spans) =
            span::Recorder::new(config.queue_size, metrics.trace_spans_dropped.clone(), config.sampling_ratio);
        let batching = export::Batching {
            batch_size: config.batch_size,
            interval: config.export_interval,
            timeout: config.timeout,
        };
        let export_metrics = export::ExportMetrics {
            results: metrics.trace_exports.clone(),
            rejected: metrics.trace_spans_rejected.clone(),
        };
        background.spawn(export::run(exporter, encoder, spans, batching, export_metrics, cancel));
        tracing::info!(
            endpoint = %config.export_url(),
            protocol = ?config.protocol,
            sampling_ratio = config.sampling_ratio,
            "exporting traces over OTLP"
        );
        Ok(Arc::new(Self { recorder, propagator: TraceContextPropagator::new() }))
    }

    /// The server span of one request: a child of the caller's trace when
    /// it sent a valid `traceparent`, else the root of a new trace.
    pub fn request(&self, headers: &HeaderMap, name: String, attributes: &[Attribute<'_>]) -> RequestTrace {
        let caller = self.propagator.extract(&Headers(headers));
        let caller = caller.span();
        let span = self.recorder.start(Some(caller.span_context()), name.into(), SpanKind::Server, attributes);
        RequestTrace { span: Arc::new(span) }
    }
}

fn build_exporter(config: &OtlpConfig) -> anyhow::Result<otlp::OtlpExporter> {
    let url = config.export_url();
    let transport = match config.protocol {
        OtlpProtocol::Grpc => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            for header in &config.headers {
                let name = header.name.to_ascii_lowercase();
                let key = tonic::metadata::MetadataKey::from_bytes(name.as_bytes())
                    .map_err(|_| anyhow::anyhow!("telemetry.otlp.headers: {name:?} is not a gRPC metadata key"))?;
                let value = header
                    .resolve()?
                    .parse()
                    .map_err(|_| anyhow::anyhow!("telemetry.otlp.headers: the value of {name:?} is not valid"))?;
                metadata.insert(key, value);
            }
            let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
                .map_err(|e| anyhow::anyhow!("telemetry.otlp.endpoint: {e}"))?
                .timeout(config.timeout)
                .connect_timeout(config.timeout);
            if url.starts_with("https://") {
                endpoint = endpoint
                    .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
                    .map_err(|e| anyhow::anyhow!("telemetry.otlp.endpoint: {e}"))?;
            }
            otlp::Transport::Grpc { channel: endpoint.connect_lazy(), metadata }
        }
        OtlpProtocol::HttpProtobuf => {
            let mut headers = http::HeaderMap::new();
            for header in &config.headers {
                let name = http::HeaderName::from_bytes(header.name.as_bytes())
                    .map_err(|_| anyhow::anyhow!("telemetry.otlp.headers: {:?} is not a header name", header.name))?;
                let value = HeaderValue::from_str(&header.resolve()?)
                    .map_err(|_| anyhow::anyhow!("telemetry.otlp.headers: the value of {name:?} is not valid"))?;
                headers.insert(name, value);
            }
            let client = reqwest::Client::builder()
                .timeout(config.timeout)
                .build()
                .map_err(|e| anyhow::anyhow!("cannot build the OTLP HTTP client: {e}"))?;
            otlp::Transport::Http { client, url, headers }
        }
    };
    Ok(otlp::OtlpExporter::new(transport))
}

/// Reads trace context from request headers.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// A request's server span, shared by the stages that add to it. The span
/// ends when the last holder lets go: the handler for a plain answer, the
/// accounting record at the end of a stream.
#[derive(Clone, Debug)]
pub struct RequestTrace {
    span: Arc<span::LiveSpan>,
}

impl RequestTrace {
    pub fn set<'a>(&self, key: &'a str, value: impl Into<AttributeValue<'a>>) {
        self.span.set_attributes(&[(key, value.into())]);
    }

    /// Sets every attribute under one lock of the span.
    pub fn set_all(&self, attributes: &[Attribute<'_>]) {
        self.span.set_attributes(attributes);
    }

    /// Sets the same attributes on the request's span and on `stage`,
    /// encoding them once.
    pub fn set_all_with(&self, stage: &Stage, attributes: &[Attribute<'_>]) {
        match &stage.span {
            Some(span) => span::LiveSpan::set_on_each(&[span, &self.span], attributes),
            None => self.span.set_attributes(attributes),
        }
    }

    /// Marks the request failed (a server error, in HTTP's terms).
    pub fn fail(&self, description: impl Into<Cow<'static, str>>) {
        self.span.set_status(Status::error(description));
    }

    /// A child span of the request.
    pub fn child(&self, name: &'static str, kind: SpanKind) -> Stage {
        Stage { span: Some(self.span.child(name.into(), kind)) }
    }

    /// A child span whose name is made per request (`chat gpt-4.1`).
    pub fn child_named(&self, name: String, kind: SpanKind) -> Stage {
        Stage { span: Some(self.span.child(name.into(), kind)) }
    }

    /// The trace and span ids, as log lines carry them.
    pub fn ids(&self) -> LogIds {
        let context = self.span.context();
        let mut ids = LogIds { trace_id: [b'0'; 32], span_id: [b'0'; 16] };
        // Both buffers are exactly twice the ids' sizes, so neither fails.
        let _ = hex::encode_to_slice(context.trace_id().to_bytes(), &mut ids.trace_id);
        let _ = hex::encode_to_slice(context.span_id().to_bytes(), &mut ids.span_id);
        ids
    }
}

/// A request's trace and span ids in lowercase hex, written in place
/// (`hex::encode` builds its string a character at a time).
#[derive(Debug, Clone, Copy)]
pub struct LogIds {
    trace_id: [u8; 32],
    span_id: [u8; 16],
}

impl LogIds {
    pub fn trace_id(&self) -> &str {
        std::str::from_utf8(&self.trace_id).unwrap_or_default()
    }

    pub fn span_id(&self) -> &str {
        std::str::from_utf8(&self.span_id).unwrap_or_default()
    }
}

/// A child span: an admission check, an upstream attempt, the relay. Ends
/// when dropped (or at [`Stage::end`]). The empty stage (no tracing) does
/// nothing, so stages can be written without asking whether tracing is on.
#[derive(Debug, Default)]
pub struct Stage {
    span: Option<span::LiveSpan>,
}

impl Stage {
    /// A stage under `trace`, or the empty stage when there is none.
    pub fn under(trace: Option<&RequestTrace>, name: &'static str, kind: SpanKind) -> Self {
        trace.map(|t| t.child(name, kind)).unwrap_or_default()
    }

    /// A child of this stage, named when it starts.
    pub fn child(&self, name: impl Into<Cow<'static, str>>, kind: SpanKind) -> Stage {
        Stage { span: self.span.as_ref().map(|span| span.child(name.into(), kind)) }
    }

    pub fn is_on(&self) -> bool {
        self.span.is_some()
    }

    pub fn set<'a>(&self, key: &'a str, value: impl Into<AttributeValue<'a>>) {
        if let Some(span) = &self.span {
            span.set_attributes(&[(key, value.into())]);
        }
    }

    /// Sets every attribute under one lock of the span.
    pub fn set_all(&self, attributes: &[Attribute<'_>]) {
        if let Some(span) = &self.span {
            span.set_attributes(attributes);
        }
    }

    pub fn fail(&self, description: impl Into<Cow<'static, str>>) {
        if let Some(span) = &self.span {
            span.set_status(Status::error(description));
        }
    }

    pub fn end(self) {
        if let Some(span) = &self.span {
            span.end();
        }
    }

    /// `traceparent` naming this stage as the parent: sent upstream with an
    /// attempt, so the upstream's spans join the caller's trace.
    pub fn traceparent(&self) -> Option<HeaderValue> {
        let context = self.span.as_ref()?.context();
        // `00-<trace id>-<span id>-<flags>`, in lowercase hex, written in
        // place: this runs for every traced attempt.
        let mut value = *b"00-00000000000000000000000000000000-0000000000000000-00";
        let ids = hex::encode_to_slice(context.trace_id().to_bytes(), &mut value[3..35])
            .and_then(|()| hex::encode_to_slice(context.span_id().to_bytes(), &mut value[36..52]))
            .and_then(|()| hex::encode_to_slice([context.trace_flags().to_u8()], &mut value[53..55]));
        ids.ok()?;
        HeaderValue::from_bytes(&value).ok()
    }
}

/// A span name of two words (`POST /v1/chat/completions`, `chat gpt-4.1`),
/// in a string of exactly its size: `format!` cost about ten times as much,
/// twice per traced request.
pub fn span_name(first: &str, second: &str) -> String {
    let mut name = String::with_capacity(first.len() + 1 + second.len());
    name.push_str(first);
    name.push(' ');
    name.push_str(second);
    name
}

/// `error.type` of a span that ended in a gateway error.
pub fn error_attribute(code: &'static str) -> Attribute<'static> {
    ("error.type", AttributeValue::Str(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_written_as_w3c_trace_context_writes_them() {
        let dropped = prometheus::IntCounter::new("dropped", "dropped").unwrap();
        let (recorder, _spans) = span::Recorder::new(4, dropped, 1.0);
        let trace = RequestTrace { span: Arc::new(recorder.start(None, "request".into(), SpanKind::Server, &[])) };
        let context = trace.span.context().clone();
        let ids = trace.ids();
        assert_eq!(
            (ids.trace_id(), ids.span_id()),
            (&*context.trace_id().to_string(), &*context.span_id().to_string())
        );
        let stage = trace.child("attempt", SpanKind::Client);
        let stage_context = stage.span.as_ref().unwrap().context().clone();
        assert_eq!(
            stage.traceparent().unwrap(),
            format!("00-{}-{}-01", stage_context.trace_id(), stage_context.span_id()).as_str()
        );
    }

    #[test]
    fn the_empty_stage_does_nothing() {
        let stage = Stage::under(None, "admission", SpanKind::Internal);
        assert!(!stage.is_on());
        stage.set("a", 1_i64);
        assert!(stage.traceparent().is_none());
        assert!(!stage.child("x", SpanKind::Client).is_on());
    }
}
