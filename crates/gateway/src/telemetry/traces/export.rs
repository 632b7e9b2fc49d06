//! The span queue's far end: finished spans arrive on a bounded channel,
//! already encoded (see [`super::span::Recorder`]), and a background task
//! sends them to the collector in batches.
//!
//! Written here rather than using the SDK's `BatchSpanProcessor` because a
//! full queue must be visible as a metric (`tollgate_trace_spans_dropped_total`)
//! and export must run on the gateway's own background tasks, stopped and
//! drained with them at shutdown. Ending a span costs one `try_send`; it
//! never waits for the collector, whatever the collector does.

use std::time::Duration;

use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::mpsc;
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

/// What the export task counts.
#[derive(Debug, Clone)]
pub struct ExportMetrics {
    /// Batches by result: ok, partial (the collector rejected some of its
    /// spans or warned), error.
    pub results: IntCounterVec,
    /// Spans the collector said it rejected.
    pub rejected: IntCounter,
}

/// Sends one batch at a time and counts what came of it.
struct Sender {
    exporter: OtlpExporter,
    encoder: Encoder,
    metrics: ExportMetrics,
    timeout: Duration,
    last_warning: Option<tokio::time::Instant>,
}

impl Sender {
    async fn send(&mut self, batch: &[EncodedSpan]) {
        let export = self.exporter.export(self.encoder.encode(batch));
        let result = match tokio::time::timeout(self.timeout, export).await {
            Ok(Ok(None)) => "ok",
            Ok(Ok(Some(partial))) => {
                self.metrics.rejected.inc_by(partial.rejected_spans);
                let now = tokio::time::Instant::now();
                if self.last_warning.is_none_or(|last| now.duration_since(last) >= PARTIAL_WARNING_EVERY) {
                    self.last_warning = Some(now);
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
    let mut sender = Sender { exporter, encoder, metrics, timeout: batching.timeout, last_warning: None };
    let mut batch = Vec::with_capacity(batching.batch_size);
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            received = spans.recv_many(&mut batch, batching.batch_size) => {
                if received == 0 {
                    break;
                }
            }
        }
        // Let the batch fill for up to the interval, unless stopping.
        let deadline = tokio::time::Instant::now() + batching.interval;
        crate::background::gather(&mut spans, &mut batch, batching.batch_size, deadline, &cancel).await;
        sender.send(&batch).await;
        batch.clear();
    }
    // Stopping: what is queued goes out, within one export timeout.
    spans.close();
    while let Ok(span) = spans.try_recv() {
        batch.push(span);
    }
    let drain = async {
        for chunk in batch.chunks(batching.batch_size.max(1)) {
            sender.send(chunk).await;
        }
    };
    if tokio::time::timeout(batching.timeout, drain).await.is_err() {
        tracing::warn!("trace export did not finish at shutdown; the remaining spans are dropped");
    }
}
