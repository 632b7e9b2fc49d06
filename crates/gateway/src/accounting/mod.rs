//! Token and cost accounting: every `/v1` request that got past
//! authentication becomes exactly one [`UsageEvent`] in the ledger.
//!
//! The proxy opens an [`Exchange`] when the request is authenticated and
//! closes it with an [`Outcome`] when the answer is complete (or the client
//! went away). Closing prices the usage and hands the record to the
//! [`Ledger`], which never blocks the request.

pub mod estimate;
pub mod ledger;
pub mod pricing;
pub mod sample;
pub mod spool;
pub mod tap;
pub mod tokens;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tollgate_openai::Usage;
use tollgate_store::{Store, UsageEvent};

use crate::metrics::Metrics;
use crate::telemetry::traces::{Attribute, RequestTrace, Stage};

pub use ledger::Ledger;
use pricing::PriceTable;

#[derive(Debug)]
pub struct Accounting {
    prices: ArcSwap<PriceTable>,
    pricing_file: Option<PathBuf>,
    pub reject_unpriced: bool,
    pub ledger: Ledger,
    pub metrics: Arc<Metrics>,
    /// Where token estimates run: off the request workers.
    pub estimates: estimate::Estimates,
    unpriced_warnings: UnpricedWarnings,
}

/// Logs an unpriced model at most once per model per interval, so a busy
/// tenant using one cannot flood the log (the metric counts every request).
#[derive(Debug, Default)]
struct UnpricedWarnings {
    last: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
}

impl UnpricedWarnings {
    const INTERVAL: Duration = Duration::from_secs(300);
    /// Models remembered at once; past it the memory starts over.
    const MAX_MODELS: usize = 1_000;

    fn warn(&self, model: &str) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.get(model).is_some_and(|at| now.duration_since(*at) < Self::INTERVAL) {
            return;
        }
        if last.len() >= Self::MAX_MODELS {
            last.clear();
        }
        last.insert(model.to_owned(), now);
        drop(last);
        tracing::warn!(
            model = %model,
            every = ?Self::INTERVAL,
            "no price for this model; its requests are recorded with cost 0 (logged once per model per interval)"
        );
    }
}

impl Accounting {
    pub fn new(
        prices: PriceTable,
        pricing_file: Option<PathBuf>,
        reject_unpriced: bool,
        ledger: Ledger,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            prices: ArcSwap::from_pointee(prices),
            pricing_file,
            reject_unpriced,
            ledger,
            metrics,
            estimates: estimate::Estimates::default(),
            unpriced_warnings: UnpricedWarnings::default(),
        }
    }

    /// Whether the price table names `model` (metric labels use this).
    pub fn is_priced(&self, model: &str) -> bool {
        self.prices.load().contains(model)
    }

    /// Where `model` takes its thinking budget (the model catalogue).
    pub fn thinking_place(&self, model: &str) -> Option<pricing::ThinkingPlace> {
        self.prices.load().thinking_place(model)
    }

    /// Whether requests for `model` can be billed: it has a price, or the
    /// table has a default price.
    pub fn is_billable(&self, model: &str) -> bool {
        self.prices.load().price_or_default(model).is_some()
    }

    /// The most a request can cost, or `None` when `model` has neither a
    /// price nor a default price (its cost cannot be bounded).
    pub fn worst_case_micros(&self, model: &str, prompt_tokens: u64, max_output: u64) -> Option<i64> {
        self.prices.load().price_or_default(model).map(|p| p.worst_case_micros(prompt_tokens, max_output))
    }

    /// Rereads the pricing file; a bad file leaves the current prices in force.
    pub fn reload_prices(&self) -> Result<usize, pricing::PricingError> {
        let table = PriceTable::load(self.pricing_file.as_deref())?;
        let n = table.len();
        self.prices.store(Arc::new(table));
        Ok(n)
    }

    /// Reloads the pricing file whenever it changes, until cancelled.
    pub async fn watch_prices(self: Arc<Self>, every: Duration, cancel: CancellationToken) {
        let Some(path) = self.pricing_file.clone() else { return };
        let results = self.metrics.pricing_reloads.clone();
        crate::file_watch::watch(&path, "pricing", every, &results, cancel, || self.reload_prices()).await;
    }
}

/// Creates partitions ahead and drops those past retention, hourly.
pub async fn maintain_ledger(store: Store, retention_days: u32, cancel: CancellationToken) {
    loop {
        let now = chrono::Utc::now().timestamp_millis();
        if let Err(e) = store.ensure_usage_partitions(now - 86_400_000, 9).await {
            tracing::warn!(error = %e, "cannot create usage partitions");
        }
        if retention_days > 0 {
            let cutoff = tollgate_store::usage::day_start_ms(now - i64::from(retention_days) * 86_400_000);
            match store.drop_usage_before(cutoff).await {
                Ok(dropped) if !dropped.is_empty() => tracing::info!(?dropped, "usage retention dropped partitions"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "usage retention failed"),
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// What served a request, for its record.
#[derive(Debug, Clone)]
pub struct ServedBy {
    pub route: Option<String>,
    pub target: Option<String>,
    pub upstream: String,
    pub attempts: u32,
}

/// How a request ended, as far as accounting cares.
#[derive(Debug, Default)]
pub struct Outcome {
    pub status: u16,
    /// `fault:code`, e.g. `upstream:upstream_timeout`, for failures.
    pub error_class: Option<String>,
    /// What the upstream reported, if anything.
    pub usage: Option<Usage>,
    /// `usage` is partly estimated (a stream cut short after the upstream
    /// counted its input): the record is flagged.
    pub usage_estimated: bool,
    pub upstream_model: Option<String>,
    /// Whether the request was sent upstream (else nothing is billed).
    pub reached_upstream: bool,
    /// Output tokens estimated from what was received, used when `usage`
    /// is `None`.
    pub estimated_output: u64,
    pub first_event: Option<Duration>,
}

/// One request being accounted. Closed exactly once: by the proxy with the
/// outcome, or, when the client goes away mid-request and the handler is
/// dropped, by `Drop` as a client disconnect.
#[derive(Debug)]
pub struct Exchange {
    closed: bool,
    /// The request was handed to the upstream client.
    pub sent_upstream: bool,
    accounting: Arc<Accounting>,
    started: Instant,
    at_ms: i64,
    request_id: String,
    tenant_id: String,
    key_id: String,
    endpoint: String,
    pub requested_model: String,
    /// The model a route sent the request to, when it was not the one asked.
    served_model: Option<String>,
    /// What served the request: route, target, upstream, attempts.
    served: Option<ServedBy>,
    pub stream: bool,
    pub modified: bool,
    /// The API the request was in.
    pub api: tollgate_openai::Api,
    /// Free upstream (token counting): recorded with no usage or cost.
    pub free: bool,
    request_body: Bytes,
    /// The request's hold on the rate limits and budgets, settled with the
    /// real usage and cost when the record closes.
    admission: Option<crate::proxy::admission::Admission>,
    /// When the request was handed to the upstream client.
    pub sent_at: Option<Instant>,
    /// Time spent waiting on the upstream (non-streamed answers).
    pub upstream_elapsed: Option<Duration>,
    /// The request's server span, when traces are exported: the record
    /// gives it the usage and cost, and holds it open to the stream's end.
    trace: Option<RequestTrace>,
    /// The relay's span, ended with the record. Boxed, as is the outcome
    /// below: both are rare (traced requests, estimates), and inline they
    /// were a third of the record, which every request moves several times
    /// and every open stream holds.
    relay: Option<Box<Stage>>,
    /// Handed to an estimate job with this outcome: the job closes it. If
    /// the job never runs (its runtime is gone), `Drop` closes it here.
    awaiting_estimate: Option<Box<Outcome>>,
}

/// Bodies up to this size are copied out of the buffer they were read into.
const COPY_BODIES_BELOW: usize = 32 * 1024;

/// A body that arrived with its request's head is a view into the
/// connection's read buffer (8 KiB at least, more after a large read). Kept
/// as it is, it would pin that buffer for as long as the record is open (a
/// stream's whole life) beside the one the connection reserves for its next
/// read. Copying a small body costs less than a microsecond and frees the
/// buffer; a larger one was usually read in several parts and joined into a
/// buffer of its own size already.
fn owned_copy_if_small(body: Bytes) -> Bytes {
    if body.len() < COPY_BODIES_BELOW { Bytes::copy_from_slice(&body) } else { body }
}

impl Exchange {
    pub fn open(accounting: Arc<Accounting>, request_id: &str, tenant_id: &str, key_id: &str, endpoint: &str) -> Self {
        accounting.metrics.in_flight.inc();
        let mut exchange = Self::closed_blank(accounting);
        exchange.closed = false;
        exchange.at_ms = crate::clock::system_now_ms();
        request_id.clone_into(&mut exchange.request_id);
        tenant_id.clone_into(&mut exchange.tenant_id);
        key_id.clone_into(&mut exchange.key_id);
        endpoint.clone_into(&mut exchange.endpoint);
        exchange
    }

    /// An exchange that is already closed and holds nothing: the base of
    /// `open`, and what stays behind when a record moves to an estimate job.
    fn closed_blank(accounting: Arc<Accounting>) -> Self {
        Self {
            closed: true,
            sent_upstream: false,
            sent_at: None,
            upstream_elapsed: None,
            accounting,
            started: Instant::now(),
            at_ms: 0,
            request_id: String::new(),
            tenant_id: String::new(),
            key_id: String::new(),
            endpoint: String::new(),
            requested_model: String::new(),
            served_model: None,
            served: None,
            stream: false,
            modified: false,
            api: tollgate_openai::Api::OpenAi,
            free: false,
            request_body: Bytes::new(),
            admission: None,
            trace: None,
            relay: None,
            awaiting_estimate: None,
        }
    }

    /// Records the endpoint under a fixed name (a native API's path holds
    /// the model, which is no label).
    pub fn endpoint_label(&mut self, endpoint: &str) {
        endpoint.clone_into(&mut self.endpoint);
    }

    /// Attaches the request's server span (see `trace`).
    pub fn traced(&mut self, trace: RequestTrace) {
        self.trace = Some(trace);
    }

    /// The request's server span, if traces are exported.
    pub fn trace(&self) -> Option<&RequestTrace> {
        self.trace.as_ref()
    }

    /// The relay has begun: its span ends when the record closes.
    pub fn relaying(&mut self, stage: Stage) {
        self.relay = stage.is_on().then(|| Box::new(stage));
    }

    /// Keeps the request body for the prompt estimate until the record
    /// closes, which for a stream is its whole life.
    pub fn set_request(&mut self, body: Bytes, model: Option<&str>, stream: bool) {
        self.request_body = owned_copy_if_small(body);
        self.requested_model = model.unwrap_or_default().to_owned();
        self.stream = stream;
    }

    /// Records what served the request; its model is priced before the
    /// one asked for.
    pub fn served_by(&mut self, model: &str, by: ServedBy) {
        if model != self.requested_model {
            self.served_model = Some(model.to_owned());
        }
        self.served = Some(by);
    }

    /// Hands the exchange the request's admission, settled when it closes.
    pub fn hold(&mut self, admission: crate::proxy::admission::Admission) {
        self.admission = Some(admission);
    }

    /// Called just before the request goes upstream: from here the prompt is
    /// billed even if the client leaves, and upstream time is measured.
    pub fn mark_sent(&mut self) {
        self.sent_upstream = true;
        self.sent_at = Some(Instant::now());
    }

    pub fn tenant_id(&self) -> &str {
        &self.tenant_id
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn accounting(&self) -> &Accounting {
        &self.accounting
    }

    /// Prices the outcome, records it, and returns the cost in micro-dollars.
    pub fn close(mut self, outcome: Outcome) -> i64 {
        self.record(outcome)
    }

    /// An answer the upstream sent without usage: its estimate, counted off
    /// the request workers and awaited, so the cost is known when the
    /// response goes out. `None` when nothing is billed for it.
    pub async fn estimate_answer(&self, response_body: Bytes) -> Option<Usage> {
        if self.free || self.requested_model.is_empty() {
            return None;
        }
        let request = self.request_body.clone();
        let count = move || (estimate::prompt_tokens(&request), estimate::response_tokens(&response_body));
        let (prompt, completion) = self.accounting.estimates.count(count).await?;
        let total = prompt.saturating_add(completion);
        Some(Usage { prompt, completion, total, reasoning: 0, cached: 0, cache_write: 0 })
    }

    fn record(&mut self, outcome: Outcome) -> i64 {
        self.closed = true;
        // Requests without a model (the model list) cost nothing to estimate.
        let billable =
            !self.free && outcome.reached_upstream && (outcome.usage.is_some() || !self.requested_model.is_empty());
        if billable && outcome.usage.is_none() && !estimate::Estimates::on_estimate_thread() {
            return self.record_after_estimate(outcome);
        }
        let (usage, estimated) = match (outcome.usage, billable) {
            (_, false) if self.free => (Usage::default(), false),
            (Some(u), _) => (u, outcome.usage_estimated),
            (None, false) => (Usage::default(), false),
            (None, true) => {
                let prompt = estimate::prompt_tokens(&self.request_body);
                let completion = outcome.estimated_output;
                let total = prompt.saturating_add(completion);
                (Usage { prompt, completion, total, reasoning: 0, cached: 0, cache_write: 0 }, true)
            }
        };
        let prices = self.accounting.prices.load();
        // The model that served (a route's target) is what was bought.
        let price = self
            .served_model
            .as_deref()
            .and_then(|m| prices.price(m))
            .or_else(|| prices.price(&self.requested_model))
            .or_else(|| outcome.upstream_model.as_deref().and_then(|m| prices.price(m)))
            .or(prices.default_price());
        let (cost, unpriced) = match price {
            Some(p) if billable => (p.cost_micros(&usage), false),
            Some(_) => (0, false),
            None => (0, billable),
        };
        if unpriced {
            self.accounting.unpriced_warnings.warn(&self.requested_model);
        }
        if let Some(admission) = self.admission.take() {
            admission.settle(usage.prompt.saturating_add(usage.billed_output()), cost);
        }
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let event = UsageEvent {
            id: uuid::Uuid::now_v7().simple().to_string(),
            at: self.at_ms,
            request_id: std::mem::take(&mut self.request_id),
            tenant_id: std::mem::take(&mut self.tenant_id),
            key_id: std::mem::take(&mut self.key_id),
            endpoint: std::mem::take(&mut self.endpoint),
            requested_model: std::mem::take(&mut self.requested_model),
            upstream_model: outcome.upstream_model,
            stream: self.stream,
            prompt_tokens: to_i64(usage.prompt),
            completion_tokens: to_i64(usage.completion),
            reasoning_tokens: to_i64(usage.reasoning),
            cached_tokens: to_i64(usage.cached),
            cache_write_tokens: to_i64(usage.cache_write),
            api: self.api.as_str().to_owned(),
            total_tokens: to_i64(usage.total),
            billed_output_tokens: to_i64(usage.billed_output()),
            cost_micros: cost,
            estimated,
            unpriced,
            modified: self.modified,
            status: i32::from(outcome.status),
            error_class: outcome.error_class,
            latency_ms: i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX),
            ttft_ms: outcome.first_event.map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            route: self.served.as_ref().and_then(|s| s.route.clone()),
            target: self.served.as_ref().and_then(|s| s.target.clone()),
            upstream: self.served.as_ref().map(|s| s.upstream.clone()),
            attempts: self
                .served
                .as_ref()
                .map_or(i32::from(self.sent_upstream), |s| i32::try_from(s.attempts).unwrap_or(i32::MAX)),
        };
        // Metrics observe the closed record; models without a price share
        // the label `other`, so label values stay bounded.
        let total = self.started.elapsed();
        // Streams and failures end here: the upstream's part lasted until now.
        let upstream = self.upstream_elapsed.or_else(|| self.sent_at.map(|t| t.elapsed()));
        if let Some(trace) = self.trace.take() {
            let relay = self.relay.take().map(|relay| *relay).unwrap_or_default();
            annotate(&trace, &relay, &event, usage.billed_output());
        }
        let priced = self.accounting.is_priced(&event.requested_model);
        self.accounting.metrics.observe(&event, priced, total, upstream);
        self.accounting.metrics.in_flight.dec();
        self.accounting.ledger.record(event);
        cost
    }
}

impl Exchange {
    /// Hands the rest of `record` (estimate, price, settle, ledger) to an
    /// estimate job: the prompt is tokenized there, not on a request
    /// worker. The cost is not known yet; it is 0 here (only answers with
    /// usage or an awaited estimate show it).
    fn record_after_estimate(&mut self, outcome: Outcome) -> i64 {
        let husk = Exchange::closed_blank(self.accounting.clone());
        let mut detached = std::mem::replace(self, husk);
        detached.closed = false;
        detached.awaiting_estimate = Some(Box::new(outcome));
        let estimates = detached.accounting.estimates.clone();
        estimates.spawn(move || {
            if let Some(outcome) = detached.awaiting_estimate.take() {
                detached.record(*outcome);
            }
        });
        0
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Some(outcome) = self.awaiting_estimate.take() {
            // The estimate job was dropped unrun: estimate here, once.
            estimate::Estimates::run_here(|| {
                self.record(*outcome);
            });
            return;
        }
        if !self.closed {
            // 499: the client closed the request before an answer (nginx's
            // convention). The prompt is billed if it reached the upstream;
            // output is not, since none was relayed.
            let reached_upstream = self.sent_upstream;
            self.record(Outcome {
                status: 499,
                error_class: Some("client:disconnected".to_owned()),
                reached_upstream,
                ..Outcome::default()
            });
        }
    }
}

/// Puts what the record knows on the request's spans: the models, the
/// usage, the cost, how the request ended. Counts and ids only, never text.
fn annotate(trace: &RequestTrace, relay: &Stage, event: &UsageEvent, billed_output: u64) {
    let mut attributes: Vec<Attribute<'_>> = Vec::with_capacity(19);
    attributes.extend_from_slice(&[
        ("gen_ai.usage.input_tokens", event.prompt_tokens.into()),
        ("gen_ai.usage.output_tokens", billed_output.into()),
        ("tollgate.usage.reasoning_tokens", event.reasoning_tokens.into()),
        ("tollgate.usage.cached_tokens", event.cached_tokens.into()),
        ("tollgate.cost_micros", event.cost_micros.into()),
        ("tollgate.usage.estimated", event.estimated.into()),
        ("tollgate.usage.unpriced", event.unpriced.into()),
        ("tollgate.request.modified", event.modified.into()),
        ("tollgate.stream", event.stream.into()),
        ("tollgate.attempts", event.attempts.into()),
        ("tollgate.status", event.status.into()),
    ]);
    if !event.requested_model.is_empty() {
        attributes.push(("gen_ai.request.model", event.requested_model.as_str().into()));
    }
    let optional = [
        ("gen_ai.response.model", &event.upstream_model),
        ("tollgate.error_class", &event.error_class),
        ("tollgate.route", &event.route),
        ("tollgate.target", &event.target),
        ("tollgate.upstream", &event.upstream),
    ];
    for (key, value) in optional {
        if let Some(value) = value {
            attributes.push((key, value.into()));
        }
    }
    trace.set_all_with(relay, &attributes);
    if event.status >= 500 {
        relay.fail("the answer failed");
    }
}

/// Micro-dollars as a decimal USD string, e.g. `0.000123`.
pub fn format_usd(micros: i64) -> String {
    // Written on every answer (cost and budget headers): itoa, no `format!`.
    let m = micros.unsigned_abs();
    let mut digits = itoa::Buffer::new();
    let mut out = String::with_capacity(24);
    if micros < 0 {
        out.push('-');
    }
    out.push_str(digits.format(m / 1_000_000));
    out.push('.');
    // The fraction zero-padded to six digits: the digits of 1_xxxxxx after the 1.
    out.push_str(&digits.format(m % 1_000_000 + 1_000_000)[1..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_formatting_is_exact() {
        assert_eq!(format_usd(0), "0.000000");
        assert_eq!(format_usd(123), "0.000123");
        assert_eq!(format_usd(1_500_000), "1.500000");
        assert_eq!(format_usd(-5), "-0.000005");
        assert_eq!(format_usd(-12_345_678), "-12.345678");
        assert_eq!(format_usd(i64::MIN), "-9223372036854.775808");
        assert_eq!(format_usd(i64::MAX), "9223372036854.775807");
    }

    #[test]
    fn a_small_body_kept_for_estimates_does_not_pin_the_buffer_it_was_read_into() {
        let read_buffer = Bytes::from(vec![b'x'; 8192]);
        let kept = owned_copy_if_small(read_buffer.slice(..200));
        assert_eq!(&kept[..], &read_buffer[..200]);
        assert!(read_buffer.is_unique(), "nothing kept holds the read buffer");

        let large = Bytes::from(vec![b'y'; COPY_BODIES_BELOW]);
        let kept = owned_copy_if_small(large.clone());
        assert_eq!(kept.as_ptr(), large.as_ptr(), "a large body is kept as it was read, not copied");
    }
}
