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

use prometheus::IntCounterVec;
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

/// Sends spans to `exporter` until cancelled, then sends what is queued.
pub async fn run(
    exporter: OtlpExporter,
    encoder: Encoder,
    mut spans: mpsc::Receiver<EncodedSpan>,
    batching: Batching,
    results: IntCounterVec,
    cancel: CancellationToken,
) {
    let ok = results.with_label_values(&["ok"]);
    let failed = results.with_label_values(&["error"]);
    let send = |batch: &[EncodedSpan]| {
        let export = exporter.export(encoder.encode(batch));
        let ok = ok.clone();
        let failed = failed.clone();
        async move {
            match tokio::time::timeout(batching.timeout, export).await {
                Ok(Ok(())) => ok.inc(),
                Ok(Err(error)) => {
                    failed.inc();
                    tracing::debug!(error, "trace export failed; the batch is dropped");
                }
                Err(_) => {
                    failed.inc();
                    tracing::debug!(timeout = ?batching.timeout, "trace export timed out; the batch is dropped");
                }
            }
        }
    };
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
        send(&batch).await;
        batch.clear();
    }
    // Stopping: what is queued goes out, within one export timeout.
    spans.close();
    while let Ok(span) = spans.try_recv() {
        batch.push(span);
    }
    let drain = async {
        for chunk in batch.chunks(batching.batch_size.max(1)) {
            send(chunk).await;
        }
    };
    if tokio::time::timeout(batching.timeout, drain).await.is_err() {
        tracing::warn!("trace export did not finish at shutdown; the remaining spans are dropped");
    }
}
