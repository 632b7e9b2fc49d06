//! Spans as the gateway records them: ids, sampling and the span's data,
//! handed to [`super::export`]'s queue in the SDK's `SpanData` shape when
//! they end.
//!
//! Written here rather than going through the SDK's tracer because every
//! span there is a `Context` with a boxed span behind a trait object, built
//! by a span builder through a sampler, an id generator and the span
//! processors, each behind its own dynamic call, and every attribute set
//! takes that path again. With four spans a request, under callgrind that
//! was about 40,000 instructions per traced request before any export
//! (about a third of what the request itself costs). What the gateway needs
//! is small: random ids, the SDK's parent-based ratio sampling, attributes,
//! a status, and the span handed over when it ends. The exported spans are
//! the same (the trace tests read them back from a real OTLP receiver).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use prometheus::IntCounter;
use tokio::sync::mpsc;

/// The most attributes a span keeps (the SDK's default limit); the rest
/// are counted as dropped.
const MAX_ATTRIBUTES: usize = 128;

/// Starts spans and takes the ended ones to the export queue.
#[derive(Debug)]
pub struct Recorder {
    queue: mpsc::Sender<SpanData>,
    dropped: IntCounter,
    scope: InstrumentationScope,
    /// A new trace is sampled when the low 63 bits of its id fall below
    /// this: the SDK's `TraceIdRatioBased` rule, so a ratio keeps the same
    /// traces as it did there. `None`: every trace.
    sample_below: Option<u64>,
}

impl Recorder {
    /// A recorder sampling `ratio` of new traces, and the queue its ended
    /// spans go to (`capacity` of them at most; the rest are dropped and
    /// counted in `dropped`).
    pub fn new(capacity: usize, dropped: IntCounter, ratio: f64) -> (Arc<Self>, mpsc::Receiver<SpanData>) {
        let (queue, spans) = mpsc::channel(capacity);
        let sample_below = (ratio < 1.0).then(|| (ratio.max(0.0) * (1_u64 << 63) as f64) as u64);
        let scope = InstrumentationScope::builder("tollgate").build();
        (Arc::new(Self { queue, dropped, scope, sample_below }), spans)
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
        attributes: Vec<KeyValue>,
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
            // The attributes given at the start are kept as they came.
            let mut attributes = attributes;
            let dropped = attributes.len().saturating_sub(MAX_ATTRIBUTES);
            attributes.truncate(MAX_ATTRIBUTES);
            Record {
                name,
                kind,
                parent_span_id: parent.map_or(SpanId::INVALID, SpanContext::span_id),
                parent_is_remote: parent.is_some_and(SpanContext::is_remote),
                start: SystemTime::now(),
                attributes,
                dropped_attributes: u32::try_from(dropped).unwrap_or(u32::MAX),
                status: Status::Unset,
            }
        });
        LiveSpan { recorder: self.clone(), context, record: Mutex::new(record) }
    }

    fn finish(&self, context: &SpanContext, record: Record) {
        let span = SpanData {
            span_context: context.clone(),
            parent_span_id: record.parent_span_id,
            parent_span_is_remote: record.parent_is_remote,
            span_kind: record.kind,
            name: record.name,
            start_time: record.start,
            end_time: SystemTime::now(),
            attributes: record.attributes,
            dropped_attributes_count: record.dropped_attributes,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: record.status,
            instrumentation_scope: self.scope.clone(),
        };
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
    attributes: Vec<KeyValue>,
    dropped_attributes: u32,
    status: Status,
}

impl Record {
    fn add(&mut self, attributes: impl IntoIterator<Item = KeyValue>) {
        for attribute in attributes {
            if self.attributes.len() < MAX_ATTRIBUTES {
                self.attributes.push(attribute);
            } else {
                self.dropped_attributes = self.dropped_attributes.saturating_add(1);
            }
        }
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
        self.recorder.start(Some(&self.context), name, kind, Vec::new())
    }

    pub fn set_attributes(&self, attributes: impl IntoIterator<Item = KeyValue>) {
        if let Some(record) = lock(&self.record).as_mut() {
            record.add(attributes);
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
    use super::*;

    fn recorder(ratio: f64) -> (Arc<Recorder>, mpsc::Receiver<SpanData>) {
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        Recorder::new(16, dropped, ratio)
    }

    #[test]
    fn a_root_span_starts_a_sampled_trace_and_its_children_join_it() {
        let (recorder, mut spans) = recorder(1.0);
        let root = recorder.start(None, "request".into(), SpanKind::Server, vec![KeyValue::new("a", 1)]);
        let child = root.child("admission".into(), SpanKind::Internal);
        child.set_attributes([KeyValue::new("b", true)]);
        child.set_status(Status::error("refused"));
        child.set_status(Status::Unset);
        child.end();
        drop(child);
        drop(root);
        let child = spans.try_recv().unwrap();
        let root = spans.try_recv().unwrap();
        assert!(spans.try_recv().is_err(), "each span is handed over once");
        assert_eq!(child.span_context.trace_id(), root.span_context.trace_id());
        assert_eq!(child.parent_span_id, root.span_context.span_id());
        assert!(!child.parent_span_is_remote);
        assert_eq!(root.parent_span_id, SpanId::INVALID);
        assert_eq!(child.status, Status::error("refused"), "a status never goes back to unset");
        assert_eq!(child.attributes, [KeyValue::new("b", true)]);
        assert_eq!((root.name.as_ref(), root.span_kind.clone()), ("request", SpanKind::Server));
        assert!(root.start_time <= child.start_time && child.end_time <= root.end_time);
        assert!(root.span_context.is_sampled());
    }

    #[test]
    fn a_remote_parent_decides_the_sampling_and_gives_its_trace_state() {
        let (recorder, mut spans) = recorder(0.0);
        let state = TraceState::from_key_value([("vendor", "v")]).unwrap();
        let sampled = SpanContext::new(TraceId::from(9), SpanId::from(7), TraceFlags::SAMPLED, true, state.clone());
        let span = recorder.start(Some(&sampled), "request".into(), SpanKind::Server, Vec::new());
        assert_eq!(span.context().trace_state(), &state);
        drop(span);
        let span = spans.try_recv().unwrap();
        assert_eq!((span.span_context.trace_id(), span.parent_span_id), (TraceId::from(9), SpanId::from(7)));
        assert!(span.parent_span_is_remote);

        let unsampled = SpanContext::new(TraceId::from(9), SpanId::from(7), TraceFlags::default(), true, state);
        let span = recorder.start(Some(&unsampled), "request".into(), SpanKind::Server, Vec::new());
        assert!(!span.context().is_sampled() && span.context().is_valid(), "ids for the upstream, nothing recorded");
        let child = span.child("relay".into(), SpanKind::Internal);
        assert!(!child.context().is_sampled());
        drop((child, span));
        assert!(spans.try_recv().is_err());
        // Ratio 0 samples no new trace.
        drop(recorder.start(None, "request".into(), SpanKind::Server, Vec::new()));
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
        let span = recorder.start(None, "request".into(), SpanKind::Server, Vec::new());
        span.set_attributes((0..130).map(|i| KeyValue::new("n", i)));
        drop(span);
        drop(recorder.start(None, "second".into(), SpanKind::Server, Vec::new()));
        assert_eq!(dropped.get(), 1, "the queue held one");
        let span = spans.try_recv().unwrap();
        assert_eq!((span.attributes.len(), span.dropped_attributes_count), (128, 2));
    }
}
