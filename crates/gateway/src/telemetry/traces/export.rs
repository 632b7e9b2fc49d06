//! The span queue's far end: finished spans arrive on a bounded channel,
//! already encoded (see [`super::span::Recorder`]), and a background task
//! sends them to the collector in batches.
//!
//! Written here rather than using the SDK's `BatchSpanProcessor` because a
//! full queue must be visible as a metric (`tollgate_trace_spans_dropped_total`)
//! and export must run on the gateway's own background tasks, stopped and
//! drained with them at shutdown. Ending a span costs one `try_send`; it
//! never waits for the collector, whatever the collector does.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::otlp::{Encoder, OtlpExporter};
use super::span::EncodedSpan;

/// How the export task batches.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    pub batch_size: usize,
    /// The longest a span waits for its batch to fill.
    pub interval: Duration,
    /// The longest one export may take (the exporter has its own timeout
    /// too; this one also bounds the drain at shutdown).
    pub timeout: Duration,
}

/// How often, at most, a collector's partial success is logged as a
/// warning (each is counted).
const PARTIAL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// Exports sent without waiting for the ones before them to be answered.
/// One at a time, the rate of spans a gateway can export is a batch per
/// round trip to the collector: at full throughput in the benchmark, with
/// the collector's CPU busy, a third of the spans were dropped that way.
const EXPORTS_IN_FLIGHT: usize = 4;

/// What the export task counts.
#[derive(Debug, Clone)]
pub struct ExportMetrics {
    /// Batches by result: ok, partial (the collector rejected some of its
    /// spans or warned), error.
    pub results: IntCounterVec,
    /// Spans the collector said it rejected.
    pub rejected: IntCounter,
}

/// What every export shares: how it is sent and counted.
struct Sender {
    exporter: OtlpExporter,
    metrics: ExportMetrics,
    timeout: Duration,
    last_warning: Mutex<Option<tokio::time::Instant>>,
}

impl Sender {
    async fn send(self: Arc<Self>, request: Vec<u8>) {
        let result = match tokio::time::timeout(self.timeout, self.exporter.export(request)).await {
            Ok(Ok(None)) => "ok",
            Ok(Ok(Some(partial))) => {
                self.metrics.rejected.inc_by(partial.rejected_spans);
                if self.time_to_warn() {
                    tracing::warn!(
                        rejected_spans = partial.rejected_spans,
                        message = partial.message,
                        "the trace collector did not take all of a batch (counted in \
                         tollgate_trace_spans_rejected_total; warned at most once a minute)"
                    );
                }
                "partial"
            }
            Ok(Err(error)) => {
                tracing::debug!(error, "trace export failed; the batch is dropped");
                "error"
            }
            Err(_) => {
                tracing::debug!(timeout = ?self.timeout, "trace export timed out; the batch is dropped");
                "error"
            }
        };
        self.metrics.results.with_label_values(&[result]).inc();
    }

    fn time_to_warn(&self) -> bool {
        let mut last = self.last_warning.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = tokio::time::Instant::now();
        let due = last.is_none_or(|at| now.duration_since(at) >= PARTIAL_WARNING_EVERY);
        if due {
            *last = Some(now);
        }
        due
    }
}

/// Sends spans to `exporter` until cancelled, then sends what is queued.
pub async fn run(
    exporter: OtlpExporter,
    encoder: Encoder,
    mut spans: mpsc::Receiver<EncodedSpan>,
    batching: Batching,
    metrics: ExportMetrics,
    cancel: CancellationToken,
) {
    let sender = Arc::new(Sender { exporter, metrics, timeout: batching.timeout, last_warning: Mutex::new(None) });
    // Exports in flight: tasks of the background runtime this runs on,
    // each bounded by the export timeout, and awaited before this returns.
    let mut in_flight = JoinSet::new();
    let mut batch = Vec::with_capacity(batching.batch_size);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            // Answers are taken as they come, so finished exports free
            // their place even while no span arrives.
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
            received = spans.recv_many(&mut batch, batching.batch_size) => {
                if received == 0 {
                    break;
                }
            }
        }
        // Let the batch fill for up to the interval, unless stopping.
        let deadline = tokio::time::Instant::now() + batching.interval;
        crate::background::gather(&mut spans, &mut batch, batching.batch_size, deadline, &cancel).await;
        while in_flight.len() >= EXPORTS_IN_FLIGHT {
            in_flight.join_next().await;
        }
        in_flight.spawn(sender.clone().send(encoder.encode(&batch)));
        batch.clear();
    }
    // Stopping: what is queued goes out, and what is in flight is
    // answered, within one export timeout.
    spans.close();
    while let Ok(span) = spans.try_recv() {
        batch.push(span);
    }
    let drain = async {
        for chunk in batch.chunks(batching.batch_size.max(1)) {
            while in_flight.len() >= EXPORTS_IN_FLIGHT {
                in_flight.join_next().await;
            }
            in_flight.spawn(sender.clone().send(encoder.encode(chunk)));
        }
        while in_flight.join_next().await.is_some() {}
    };
    if tokio::time::timeout(batching.timeout, drain).await.is_err() {
        tracing::warn!("trace export did not finish at shutdown; the remaining spans are dropped");
    }
}
