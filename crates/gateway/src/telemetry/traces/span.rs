//! Spans as the gateway records them: ids, sampling, and the span's
//! data written as protobuf as it is recorded, handed to [`super::export`]'s
//! queue as a finished OTLP `Span` message when the span ends.
//!
//! Written here rather than going through the SDK's tracer because every
//! span there is a `Context` with a boxed span behind a trait object, built
//! by a span builder through a sampler, an id generator and the span
//! processors, each behind its own dynamic call, and every attribute set
//! takes that path again. With four spans a request, under callgrind that
//! was about 40,000 instructions per traced request before any export
//! (about a third of what the request itself costs). What the gateway needs
//! is small: random ids, the SDK's parent-based ratio sampling, attributes,
//! a status, and the span handed over when it ends.
//!
//! Attributes are encoded when they are set, not kept as the SDK's
//! `KeyValue`s (an owned string per value, a vector per span, a `SpanData`
//! moved into the queue and dropped after export): export then only frames
//! the spans it is given. The exported spans are the same (the trace tests
//! read them back from a real OTLP receiver).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use prometheus::IntCounter;
use tokio::sync::mpsc;

use super::wire::{self, AttributeValue};

/// The most attributes a span keeps (the SDK's default limit); the rest
/// are counted as dropped.
const MAX_ATTRIBUTES: usize = 128;

/// `Span.flags`: the parent's remoteness is known, and whether it is remote.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

/// The room a span's attribute buffer starts with: what the gateway's
/// spans mostly need.
const FIRST_ATTRIBUTE_BYTES: usize = 512;

/// What one of the gateway's attributes takes encoded, about: a dotted
/// key and a short value.
const TYPICAL_ATTRIBUTE_BYTES: usize = 48;

/// `Span.attributes`.
const ATTRIBUTES_FIELD: u32 = 9;

/// A span attribute: its key and value.
pub type Attribute<'a> = (&'a str, AttributeValue<'a>);

/// An ended span: a `ScopeSpans.spans` field (key, length and the `Span`
/// message), ready to be copied into an export request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedSpan(Vec<u8>);

impl EncodedSpan {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Starts spans and takes the ended ones to the export queue.
#[derive(Debug)]
pub struct Recorder {
    queue: mpsc::Sender<EncodedSpan>,
    dropped: IntCounter,
    /// A new trace is sampled when the low 63 bits of its id fall below
    /// this: the SDK's `TraceIdRatioBased` rule, so a ratio keeps the same
    /// traces as it did there. `None`: every trace.
    sample_below: Option<u64>,
}

impl Recorder {
    /// A recorder sampling `ratio` of new traces, and the queue its ended
    /// spans go to (`capacity` of them at most; the rest are dropped and
    /// counted in `dropped`).
    pub fn new(capacity: usize, dropped: IntCounter, ratio: f64) -> (Arc<Self>, mpsc::Receiver<EncodedSpan>) {
        let (queue, spans) = mpsc::channel(capacity);
        let sample_below = (ratio < 1.0).then(|| (ratio.max(0.0) * (1_u64 << 63) as f64) as u64);
        (Arc::new(Self { queue, dropped, sample_below }), spans)
    }

    fn samples_new_trace(&self, trace_id: TraceId) -> bool {
        let Some(below) = self.sample_below else { return true };
        let bytes = trace_id.to_bytes();
        let mut low = [0; 8];
        low.copy_from_slice(&bytes[8..]);
        (u64::from_be_bytes(low) >> 1) < below
    }

    /// Starts a span: a child of `parent` when it is valid (a caller's
    /// span, remote, or one of ours), sampled as it is; else the root of a
    /// new trace, sampled by the ratio.
    pub fn start(
        self: &Arc<Self>,
        parent: Option<&SpanContext>,
        name: Cow<'static, str>,
        kind: SpanKind,
        attributes: &[Attribute<'_>],
    ) -> LiveSpan {
        let parent = parent.filter(|p| p.is_valid());
        let (trace_id, sampled, trace_state) = match parent {
            Some(p) => (p.trace_id(), p.is_sampled(), p.trace_state().clone()),
            None => {
                let trace_id = random_trace_id();
                (trace_id, self.samples_new_trace(trace_id), TraceState::default())
            }
        };
        let flags = if sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let context = SpanContext::new(trace_id, random_span_id(), flags, false, trace_state);
        let record = sampled.then(|| {
            let mut record = Record {
                name,
                kind,
                parent_span_id: parent.map_or(SpanId::INVALID, SpanContext::span_id),
                parent_is_remote: parent.is_some_and(SpanContext::is_remote),
                start: SystemTime::now(),
                attributes: Vec::new(),
                attribute_count: 0,
                dropped_attributes: 0,
                status: Status::Unset,
            };
            if !attributes.is_empty() {
                record.add(attributes);
            }
            record
        });
        LiveSpan { recorder: self.clone(), context, record: Mutex::new(record) }
    }

    fn finish(&self, context: &SpanContext, record: Record) {
        let span = record.encode(context, SystemTime::now());
        if self.queue.try_send(span).is_err() {
            self.dropped.inc();
        }
    }
}

fn random_trace_id() -> TraceId {
    loop {
        let id = rand::random::<u128>();
        if id != 0 {
            return TraceId::from(id);
        }
    }
}

fn random_span_id() -> SpanId {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return SpanId::from(id);
        }
    }
}

/// What a sampled span records until it ends.
#[derive(Debug)]
struct Record {
    name: Cow<'static, str>,
    kind: SpanKind,
    parent_span_id: SpanId,
    parent_is_remote: bool,
    start: SystemTime,
    /// `Span.attributes` fields, encoded as they were set.
    attributes: Vec<u8>,
    attribute_count: usize,
    dropped_attributes: u32,
    status: Status,
}

impl Record {
    fn add(&mut self, attributes: &[Attribute<'_>]) {
        // Room for the batch at once, by a typical size (sizing it exactly
        // cost a quarter of writing it), and for a few more on a span's
        // first batch: growing the buffer attribute by attribute
        // reallocated it several times over per span.
        let typical = attributes.len() * TYPICAL_ATTRIBUTE_BYTES;
        let first = if self.attributes.capacity() == 0 { FIRST_ATTRIBUTE_BYTES } else { 0 };
        self.attributes.reserve(typical.max(first));
        for &(key, value) in attributes {
            if self.attribute_count < MAX_ATTRIBUTES {
                wire::put_attribute(&mut self.attributes, ATTRIBUTES_FIELD, key, value);
                self.attribute_count += 1;
            } else {
                self.dropped_attributes = self.dropped_attributes.saturating_add(1);
            }
        }
    }

    /// Adds `attributes` from their encoding in `shared`, made here when
    /// it is still empty: the same attributes on several spans are encoded
    /// once. Past the attribute limit, they are added one by one instead.
    fn add_shared(&mut self, attributes: &[Attribute<'_>], shared: &mut Vec<u8>) {
        if self.attribute_count + attributes.len() > MAX_ATTRIBUTES {
            return self.add(attributes);
        }
        if shared.is_empty() {
            shared.reserve(attributes.len() * TYPICAL_ATTRIBUTE_BYTES);
            for &(key, value) in attributes {
                wire::put_attribute(shared, ATTRIBUTES_FIELD, key, value);
            }
        }
        self.attributes.extend_from_slice(shared);
        self.attribute_count += attributes.len();
    }

    /// The span as a `ScopeSpans.spans` field, written into a buffer of
    /// exactly its size.
    fn encode(&self, context: &SpanContext, end: SystemTime) -> EncodedSpan {
        use wire::{delimited_len, fixed64_len, key_len, nonempty_len, uint_len};
        let trace_state = context.trace_state().header();
        let has_parent = self.parent_span_id != SpanId::INVALID;
        let (start, end) = (nanos(self.start), nanos(end));
        let kind = span_kind(&self.kind);
        let dropped = u64::from(self.dropped_attributes);
        let (code, message) = match &self.status {
            Status::Unset => (0, ""),
            Status::Ok => (1, ""),
            Status::Error { description } => (2, description.as_ref()),
        };
        let status_len = nonempty_len(2, message.len()) + uint_len(3, code);
        let span_len = delimited_len(1, 16)
            + delimited_len(2, 8)
            + nonempty_len(3, trace_state.len())
            + if has_parent { delimited_len(4, 8) } else { 0 }
            + nonempty_len(5, self.name.len())
            + uint_len(6, kind)
            + fixed64_len(7, start)
            + fixed64_len(8, end)
            + self.attributes.len()
            + uint_len(10, dropped)
            + delimited_len(15, status_len)
            // The flags: always written, as they always hold a bit.
            + key_len(16)
            + 4;
        let mut out = Vec::with_capacity(delimited_len(2, span_len));
        wire::put_delimited_header(&mut out, 2, span_len);
        wire::put_bytes(&mut out, 1, &context.trace_id().to_bytes());
        wire::put_bytes(&mut out, 2, &context.span_id().to_bytes());
        wire::put_nonempty(&mut out, 3, trace_state.as_bytes());
        if has_parent {
            wire::put_bytes(&mut out, 4, &self.parent_span_id.to_bytes());
        }
        wire::put_nonempty(&mut out, 5, self.name.as_bytes());
        wire::put_uint(&mut out, 6, kind);
        wire::put_fixed64(&mut out, 7, start);
        wire::put_fixed64(&mut out, 8, end);
        out.extend_from_slice(&self.attributes);
        wire::put_uint(&mut out, 10, dropped);
        wire::put_delimited_header(&mut out, 15, status_len);
        wire::put_nonempty(&mut out, 2, message.as_bytes());
        wire::put_uint(&mut out, 3, code);
        wire::put_key(&mut out, 16, wire::FIXED32);
        let flags = u32::from(context.trace_flags().to_u8())
            | FLAG_HAS_IS_REMOTE
            | if self.parent_is_remote { FLAG_IS_REMOTE } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        debug_assert_eq!(out.len(), out.capacity());
        EncodedSpan(out)
    }
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_nanos() as u64
}

fn span_kind(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

/// A span from its start until it ends: at [`LiveSpan::end`] or when
/// dropped. One not sampled has ids (its children and the upstream are
/// told them) and records nothing.
#[derive(Debug)]
pub struct LiveSpan {
    recorder: Arc<Recorder>,
    context: SpanContext,
    /// While sampled and not ended.
    record: Mutex<Option<Record>>,
}

impl LiveSpan {
    pub fn context(&self) -> &SpanContext {
        &self.context
    }

    /// A child span of this one.
    pub fn child(&self, name: Cow<'static, str>, kind: SpanKind) -> LiveSpan {
        self.recorder.start(Some(&self.context), name, kind, &[])
    }

    /// Sets every attribute under one lock of the span.
    pub fn set_attributes(&self, attributes: &[Attribute<'_>]) {
        if let Some(record) = lock(&self.record).as_mut() {
            record.add(attributes);
        }
    }

    /// Sets the same attributes on each of `spans`, encoding them once.
    pub fn set_on_each(spans: &[&LiveSpan], attributes: &[Attribute<'_>]) {
        let mut shared = Vec::new();
        for span in spans {
            if let Some(record) = lock(&span.record).as_mut() {
                record.add_shared(attributes, &mut shared);
            }
        }
    }

    /// Sets the status, never to a lower one: Ok over Error over Unset, as
    /// the SDK orders them.
    pub fn set_status(&self, status: Status) {
        if let Some(record) = lock(&self.record).as_mut()
            && status > record.status
        {
            record.status = status;
        }
    }

    pub fn end(&self) {
        let record = lock(&self.record).take();
        if let Some(record) = record {
            self.recorder.finish(&self.context, record);
        }
    }
}

impl Drop for LiveSpan {
    fn drop(&mut self) {
        self.end();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::trace::v1::{ScopeSpans, Span, status};
    use prost::Message as _;

    use super::*;

    fn recorder(ratio: f64) -> (Arc<Recorder>, mpsc::Receiver<EncodedSpan>) {
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        Recorder::new(16, dropped, ratio)
    }

    /// The `Span` message an ended span was encoded as.
    fn decoded(span: &EncodedSpan) -> Span {
        let mut scope = ScopeSpans::decode(span.as_bytes()).unwrap();
        assert_eq!(scope.spans.len(), 1);
        assert_eq!(span.as_bytes().len(), scope.encoded_len(), "no field written that proto3 leaves out");
        scope.spans.remove(0)
    }

    fn attribute(key: &str, value: any_value::Value) -> KeyValue {
        KeyValue { key: key.to_owned(), value: Some(AnyValue { value: Some(value) }), ..Default::default() }
    }

    #[test]
    fn a_root_span_starts_a_sampled_trace_and_its_children_join_it() {
        let (recorder, mut spans) = recorder(1.0);
        let root = recorder.start(None, "request".into(), SpanKind::Server, &[("a", 1_i64.into())]);
        let child = root.child("admission".into(), SpanKind::Internal);
        child.set_attributes(&[("b", true.into()), ("c", "x".into()), ("empty", "".into()), ("zero", 0_i64.into())]);
        child.set_status(Status::error("refused"));
        child.set_status(Status::Unset);
        child.end();
        drop(child);
        drop(root);
        let child = decoded(&spans.try_recv().unwrap());
        let root = decoded(&spans.try_recv().unwrap());
        assert!(spans.try_recv().is_err(), "each span is handed over once");
        assert_eq!(child.trace_id, root.trace_id);
        assert_eq!(child.parent_span_id, root.span_id);
        assert_eq!(child.flags, 0x101, "sampled, with a parent known not to be remote");
        assert!(root.parent_span_id.is_empty());
        let status = child.status.as_ref().unwrap();
        assert_eq!(
            (status.code, status.message.as_str()),
            (status::StatusCode::Error as i32, "refused"),
            "a status never goes back to unset"
        );
        assert_eq!(
            child.attributes,
            [
                attribute("b", any_value::Value::BoolValue(true)),
                attribute("c", any_value::Value::StringValue("x".into())),
                attribute("empty", any_value::Value::StringValue(String::new())),
                attribute("zero", any_value::Value::IntValue(0)),
            ]
        );
        assert_eq!(root.attributes, [attribute("a", any_value::Value::IntValue(1))]);
        assert_eq!((root.name.as_str(), root.kind), ("request", 2));
        assert_eq!((child.name.as_str(), child.kind), ("admission", 1));
        assert!(root.start_time_unix_nano <= child.start_time_unix_nano);
        assert!(child.end_time_unix_nano <= root.end_time_unix_nano);
        assert_eq!(root.status.unwrap().code, status::StatusCode::Unset as i32);
    }

    #[test]
    fn a_remote_parent_decides_the_sampling_and_gives_its_trace_state() {
        let (recorder, mut spans) = recorder(0.0);
        let state = TraceState::from_key_value([("vendor", "v")]).unwrap();
        let sampled = SpanContext::new(TraceId::from(9), SpanId::from(7), TraceFlags::SAMPLED, true, state.clone());
        let span = recorder.start(Some(&sampled), "request".into(), SpanKind::Server, &[]);
        assert_eq!(span.context().trace_state(), &state);
        drop(span);
        let span = decoded(&spans.try_recv().unwrap());
        assert_eq!(span.trace_id, TraceId::from(9).to_bytes());
        assert_eq!(span.parent_span_id, SpanId::from(7).to_bytes());
        assert_eq!(span.trace_state, "vendor=v");
        assert_eq!(span.flags, 0x301, "sampled, with a remote parent");

        let unsampled = SpanContext::new(TraceId::from(9), SpanId::from(7), TraceFlags::default(), true, state);
        let span = recorder.start(Some(&unsampled), "request".into(), SpanKind::Server, &[]);
        assert!(!span.context().is_sampled() && span.context().is_valid(), "ids for the upstream, nothing recorded");
        let child = span.child("relay".into(), SpanKind::Internal);
        assert!(!child.context().is_sampled());
        drop((child, span));
        assert!(spans.try_recv().is_err());
        // Ratio 0 samples no new trace.
        drop(recorder.start(None, "request".into(), SpanKind::Server, &[]));
        assert!(spans.try_recv().is_err());
    }

    #[test]
    fn the_ratio_keeps_the_traces_the_sdk_rule_keeps() {
        let (recorder, _spans) = recorder(0.25);
        // Low 64 bits shifted right once, against 0.25 × 2^63.
        assert!(recorder.samples_new_trace(TraceId::from((1_u128 << 64) | (((1_u128 << 61) - 1) << 1))));
        assert!(!recorder.samples_new_trace(TraceId::from(1_u128 << 62)));
        let kept = (0..10_000).filter(|_| recorder.samples_new_trace(random_trace_id())).count();
        assert!((2_000..3_000).contains(&kept), "{kept} of 10,000");
    }

    #[test]
    fn attributes_past_the_limit_are_counted_as_dropped_and_a_full_queue_counts_the_span() {
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        let (recorder, mut spans) = Recorder::new(1, dropped.clone(), 1.0);
        let span = recorder.start(None, "request".into(), SpanKind::Server, &[]);
        let many: Vec<Attribute<'_>> = (0..130_i64).map(|i| ("n", i.into())).collect();
        span.set_attributes(&many);
        drop(span);
        drop(recorder.start(None, "second".into(), SpanKind::Server, &[]));
        assert_eq!(dropped.get(), 1, "the queue held one");
        let span = decoded(&spans.try_recv().unwrap());
        assert_eq!((span.attributes.len(), span.dropped_attributes_count), (128, 2));
        assert_eq!(span.attributes[127], attribute("n", any_value::Value::IntValue(127)));
    }

    #[test]
    fn attributes_set_on_several_spans_are_encoded_once_and_reach_each() {
        let (recorder, mut spans) = recorder(1.0);
        let root = recorder.start(None, "request".into(), SpanKind::Server, &[("a", 1_i64.into())]);
        let relay = root.child("relay".into(), SpanKind::Internal);
        let full = root.child("full".into(), SpanKind::Internal);
        let many: Vec<Attribute<'_>> = (0..127_i64).map(|i| ("n", i.into())).collect();
        full.set_attributes(&many);
        LiveSpan::set_on_each(&[&relay, &root, &full], &[("x", "y".into()), ("z", false.into())]);
        drop((relay, full, root));
        let relay = decoded(&spans.try_recv().unwrap());
        let full = decoded(&spans.try_recv().unwrap());
        let root = decoded(&spans.try_recv().unwrap());
        let x = attribute("x", any_value::Value::StringValue("y".into()));
        let z = attribute("z", any_value::Value::BoolValue(false));
        assert_eq!(relay.attributes, [x.clone(), z.clone()]);
        assert_eq!(root.attributes, [attribute("a", any_value::Value::IntValue(1)), x.clone(), z]);
        assert_eq!(full.attributes.len(), 128, "up to the limit, one by one");
        assert_eq!((&full.attributes[127], full.dropped_attributes_count), (&x, 1));
    }

    #[test]
    fn values_take_the_wire_forms_of_their_types() {
        let (recorder, mut spans) = recorder(1.0);
        let long = "é".repeat(200);
        let span = recorder.start(None, String::from("chat gpt-4.1").into(), SpanKind::Client, &[]);
        span.set_attributes(&[
            ("negative", (-12_i64).into()),
            ("max", u64::MAX.into()),
            ("cached", false.into()),
            ("a longer attribute value", long.as_str().into()),
        ]);
        span.set_status(Status::Ok);
        drop(span);
        let span = decoded(&spans.try_recv().unwrap());
        assert_eq!(
            span.attributes,
            [
                attribute("negative", any_value::Value::IntValue(-12)),
                attribute("max", any_value::Value::IntValue(i64::MAX)),
                attribute("cached", any_value::Value::BoolValue(false)),
                attribute("a longer attribute value", any_value::Value::StringValue(long)),
            ]
        );
        assert_eq!((span.name.as_str(), span.kind), ("chat gpt-4.1", 3));
        assert_eq!(span.status.unwrap().code, status::StatusCode::Ok as i32);
    }
}
