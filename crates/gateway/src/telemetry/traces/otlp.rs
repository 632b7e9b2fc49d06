//! OTLP trace export: an `ExportTraceServiceRequest` framed around spans
//! already encoded when they ended (see [`super::span`]), sent over gRPC or
//! HTTP.
//!
//! Written here rather than using `opentelemetry-otlp`'s exporter because
//! that one converts every span into the generated protobuf structs first
//! (a `String` or `Vec` for each id, name, attribute key and value), groups
//! them through hash maps, measures every nested message again at each
//! level of nesting, encodes, then frees it all. Under callgrind, with every
//! request traced, that was about 14,000 instructions per span, four spans
//! per request: more than the request itself cost. Here the resource and
//! the scope are written once, and a batch is sized exactly and each span
//! copied into it once. The bytes are the message the SDK's conversion
//! makes (tests decode them with the generated structs).

use bytes::{Buf as _, BufMut as _, Bytes};
use opentelemetry_sdk::Resource;

use super::span::EncodedSpan;
use super::wire::{
    PartialSuccess, delimited_len, nonempty_len, partial_success, put_bytes, put_delimited_header, put_nonempty,
    put_otel_attribute,
};

/// The instrumentation scope the gateway's spans are recorded under.
pub const SCOPE_NAME: &str = "tollgate";

/// Frames batches of encoded spans as `ExportTraceServiceRequest`s: one
/// `ResourceSpans` holding one `ScopeSpans`.
#[derive(Debug)]
pub struct Encoder {
    /// The `Resource` message.
    resource: Vec<u8>,
    resource_schema_url: String,
    /// The `InstrumentationScope` message.
    scope: Vec<u8>,
}

impl Encoder {
    pub fn new(resource: &Resource) -> Self {
        let mut encoded = Vec::new();
        for (key, value) in resource.iter() {
            put_otel_attribute(&mut encoded, 1, key.as_str(), value);
        }
        let mut scope = Vec::new();
        put_nonempty(&mut scope, 1, SCOPE_NAME.as_bytes());
        Self { resource: encoded, resource_schema_url: resource.schema_url().unwrap_or_default().to_owned(), scope }
    }

    /// The request carrying `batch`, in one buffer of exactly its size.
    pub fn encode(&self, batch: &[EncodedSpan]) -> Vec<u8> {
        let scope_spans_len =
            delimited_len(1, self.scope.len()) + batch.iter().map(|span| span.as_bytes().len()).sum::<usize>();
        let resource_spans_len = delimited_len(1, self.resource.len())
            + delimited_len(2, scope_spans_len)
            + nonempty_len(3, self.resource_schema_url.len());
        let mut request = Vec::with_capacity(delimited_len(1, resource_spans_len));
        put_delimited_header(&mut request, 1, resource_spans_len);
        put_bytes(&mut request, 1, &self.resource);
        put_delimited_header(&mut request, 2, scope_spans_len);
        put_bytes(&mut request, 1, &self.scope);
        for span in batch {
            request.extend_from_slice(span.as_bytes());
        }
        put_nonempty(&mut request, 3, self.resource_schema_url.as_bytes());
        debug_assert_eq!(request.len(), request.capacity());
        request
    }
}

/// How the encoded requests travel.
#[derive(Debug)]
pub enum Transport {
    /// OTLP/gRPC: `TraceService/Export` on a tonic channel, with the
    /// configured headers as metadata.
    Grpc { channel: tonic::transport::Channel, metadata: tonic::metadata::MetadataMap },
    /// OTLP/HTTP: the protobuf bytes posted to the export URL.
    Http { client: reqwest::Client, url: String, headers: http::HeaderMap },
}

/// Sends requests the [`Encoder`] made to the collector.
#[derive(Debug)]
pub struct OtlpExporter {
    transport: Transport,
}

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

impl OtlpExporter {
    pub fn new(transport: Transport) -> Self {
        Self { transport }
    }

    /// Sends one encoded request. Accepted, the collector's answer may
    /// still say it rejected some of the spans; the error says what went
    /// wrong.
    pub async fn export(&self, request: Vec<u8>) -> Result<Option<PartialSuccess>, String> {
        let body = Bytes::from(request);
        match &self.transport {
            Transport::Grpc { channel, metadata } => {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready().await.map_err(|e| format!("the collector is not reachable: {e}"))?;
                let mut request = tonic::Request::new(body);
                *request.metadata_mut() = metadata.clone();
                let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
                grpc.unary(request, path, BytesCodec)
                    .await
                    .map(|answer| partial_success(answer.get_ref()))
                    .map_err(|status| format!("the collector answered {status}"))
            }
            Transport::Http { client, url, headers } => {
                let response = client
                    .post(url)
                    .headers(headers.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| format!("cannot reach the collector: {e}"))?;
                let status = response.status();
                if !status.is_success() {
                    return Err(format!("the collector answered {status}"));
                }
                Ok(read_answer(response).await.and_then(|answer| partial_success(&answer)))
            }
        }
    }
}

/// The most of a collector's HTTP answer read for a partial success: the
/// message is a count and a line of text.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A collector's HTTP answer, unless it is longer than an answer can
/// sensibly be or fails midway (the spans were accepted either way).
async fn read_answer(mut response: reqwest::Response) -> Option<Vec<u8>> {
    let mut answer = Vec::new();
    while let Some(chunk) = response.chunk().await.ok()? {
        if answer.len() + chunk.len() > MAX_ANSWER_BYTES {
            return None;
        }
        answer.extend_from_slice(&chunk);
    }
    Some(answer)
}

/// Sends encoded bytes as they are and reads the answer as bytes (a
/// collector's `ExportTraceServiceResponse`, read by
/// [`partial_success`]).
#[derive(Debug, Clone, Copy)]
struct BytesCodec;

impl tonic::codec::Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl tonic::codec::Encoder for BytesCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Self::Error> {
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Decoder for BytesCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut tonic::codec::DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use opentelemetry::KeyValue;
    use opentelemetry::trace::{SpanKind, Status};
    use opentelemetry::{Array, StringValue, Value};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
    use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
    use opentelemetry_proto::tonic::trace::v1::ScopeSpans;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use prost::Message as _;

    use super::*;
    use crate::telemetry::traces::span::Recorder;

    fn spans(count: usize) -> Vec<EncodedSpan> {
        let dropped = prometheus::IntCounter::new("dropped", "dropped").unwrap();
        let (recorder, mut queue) = Recorder::new(count.max(1), dropped, 1.0);
        let recorder: Arc<Recorder> = recorder;
        for n in 0..count {
            let span = recorder.start(None, format!("span {n}").into(), SpanKind::Internal, &[("n", n.into())]);
            if n % 2 == 1 {
                span.set_status(Status::error("failed"));
            }
        }
        (0..count).map(|_| queue.try_recv().unwrap()).collect()
    }

    /// The spans as the generated structs decode them, one by one.
    fn decoded(batch: &[EncodedSpan]) -> Vec<opentelemetry_proto::tonic::trace::v1::Span> {
        batch.iter().flat_map(|span| ScopeSpans::decode(span.as_bytes()).unwrap().spans).collect()
    }

    #[test]
    fn a_batch_is_framed_as_the_message_the_sdk_conversion_makes() {
        let resource = Resource::builder()
            .with_service_name("tollgate")
            .with_attribute(KeyValue::new("deployment.environment", "test"))
            .with_attribute(KeyValue::new("replicas", 3_i64))
            .with_attribute(KeyValue::new("weights", Value::Array(Array::F64(vec![0.5, 1.0]))))
            .with_attribute(KeyValue::new(
                "zones",
                Value::Array(Array::String(vec![StringValue::from("a"), "".into()])),
            ))
            .with_schema_url(Vec::<KeyValue>::new(), "https://opentelemetry.io/schemas/1.30.0")
            .build();
        let encoder = Encoder::new(&resource);
        let expected_resource = ResourceAttributesWithSchema::from(&resource);
        let expected = |batch: &[EncodedSpan]| ExportTraceServiceRequest {
            resource_spans: vec![opentelemetry_proto::tonic::trace::v1::ResourceSpans {
                resource: Some(ProtoResource {
                    attributes: expected_resource.attributes.0.clone(),
                    dropped_attributes_count: 0,
                    entity_refs: Vec::new(),
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope { name: SCOPE_NAME.to_owned(), ..Default::default() }),
                    spans: decoded(batch),
                    schema_url: String::new(),
                }],
                schema_url: expected_resource.schema_url.clone().unwrap_or_default(),
            }],
        };
        for count in [0, 1, 5] {
            let batch = spans(count);
            let bytes = encoder.encode(&batch);
            let request = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
            assert_eq!(request, expected(&batch), "{count} spans");
            assert_eq!(bytes.len(), request.encoded_len(), "no field written that proto3 leaves out");
        }
        assert!(!expected_resource.attributes.0.is_empty());
    }
}
