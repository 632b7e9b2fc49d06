//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Label values are bounded: tenants are created by admins, models outside
//! the price table are folded into `other`, endpoints are the fixed `/v1`
//! routes, and no key material or raw path ever becomes a label.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Seconds; fine at the low end so sub-millisecond gateway overhead shows.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub tokens: IntCounterVec,
    pub cost_micros: IntCounterVec,
    pub rejections: IntCounterVec,
    pub failures: IntCounterVec,
    pub unpriced: IntCounterVec,
    pub in_flight: IntGauge,
    pub auth_failures: IntCounterVec,
    pub key_cache_size: IntGauge,
    pub ledger_queue_depth: IntGauge,
    pub spool_bytes: IntGauge,
    pub redis_fallbacks: IntCounter,
    pub ledger_write_failures: IntCounter,
    pub budget_utilisation: IntGaugeVec,
    pub upstream_duration: HistogramVec,
    pub overhead: Histogram,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<HistogramVec> {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), labels)?;
    registry.register(Box::new(h.clone()))?;
    Ok(h)
}

fn plain_counter(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    let c = IntCounter::new(name, help)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    let g = IntGauge::new(name, help)?;
    registry.register(Box::new(g.clone()))?;
    Ok(g)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let r = Registry::new_custom(Some("tollgate".to_owned()), None)?;
        let overhead = Histogram::with_opts(
            HistogramOpts::new("gateway_overhead_seconds", "Time spent in the gateway: total minus upstream time.")
                .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        r.register(Box::new(overhead.clone()))?;
        let budget_utilisation = IntGaugeVec::new(
            Opts::new("budget_utilisation_percent", "Spend this period as a percentage of the budget."),
            &["tenant", "budget"],
        )?;
        r.register(Box::new(budget_utilisation.clone()))?;
        let build_info = IntGaugeVec::new(Opts::new("build_info", "Always 1; the running version."), &["version"])?;
        r.register(Box::new(build_info.clone()))?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        Ok(Self {
            requests: counter(
                &r,
                "requests_total",
                "Requests by tenant, model, endpoint, status class and stream flag.",
                &["tenant", "model", "endpoint", "status", "stream"],
            )?,
            request_duration: histogram(
                &r,
                "request_duration_seconds",
                "Time from request to the end of the answer.",
                &["endpoint", "stream"],
            )?,
            time_to_first_token: histogram(
                &r,
                "time_to_first_token_seconds",
                "Time to the first streamed event.",
                &["model"],
            )?,
            tokens: counter(
                &r,
                "tokens_total",
                "Tokens by tenant, model and kind (prompt, completion, reasoning, cached, billed_output).",
                &["tenant", "model", "kind"],
            )?,
            cost_micros: counter(
                &r,
                "cost_micros_total",
                "Cost in micro-dollars by tenant and model.",
                &["tenant", "model"],
            )?,
            rejections: counter(
                &r,
                "rejections_total",
                "Requests refused by a limit or a budget, by reason.",
                &["reason"],
            )?,
            failures: counter(
                &r,
                "failures_total",
                "Failed requests by fault (client, upstream, gateway) and code.",
                &["fault", "code"],
            )?,
            unpriced: counter(&r, "unpriced_requests_total", "Requests for models without a price.", &["model"])?,
            in_flight: gauge(&r, "in_flight_requests", "Requests being answered now.")?,
            auth_failures: counter(&r, "auth_failures_total", "Refused tenant keys by reason.", &["reason"])?,
            key_cache_size: gauge(&r, "key_cache_keys", "Keys in the in-memory authentication cache.")?,
            ledger_queue_depth: gauge(&r, "ledger_queue_depth", "Usage records waiting in memory for the database.")?,
            spool_bytes: gauge(&r, "ledger_spool_bytes", "Bytes of usage records waiting in the local spool.")?,
            redis_fallbacks: plain_counter(
                &r,
                "redis_fallbacks_total",
                "Limit checks decided locally because Redis was unavailable.",
            )?,
            ledger_write_failures: plain_counter(
                &r,
                "ledger_write_failures_total",
                "Usage record batches the database refused or timed out on (they go to the spool).",
            )?,
            upstream_duration: histogram(
                &r,
                "upstream_duration_seconds",
                "Time from sending a request upstream to the upstream's last byte (or its failure).",
                &["endpoint", "stream"],
            )?,
            budget_utilisation,
            overhead,
            registry: r,
        })
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if TextEncoder::new().encode(&self.registry.gather(), &mut out).is_err() {
            return String::new();
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// `2xx`, `4xx`, … for the `status` label.
pub fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Refreshes the gauges that mirror other components' state.
pub trait GaugeSource: Send + Sync {
    fn refresh(&self, metrics: &Metrics);
}

#[derive(Clone)]
pub struct MetricsState {
    metrics: Arc<Metrics>,
    sources: Arc<Vec<Box<dyn GaugeSource>>>,
    /// Mirrored counters are brought up to date by reading then adding;
    /// two scrapes at once must not both add the same difference.
    refreshing: Arc<std::sync::Mutex<()>>,
}

impl MetricsState {
    pub fn new(metrics: Arc<Metrics>, sources: Vec<Box<dyn GaugeSource>>) -> Self {
        Self { metrics, sources: Arc::new(sources), refreshing: Arc::default() }
    }
}

pub async fn serve(State(state): State<MetricsState>) -> impl IntoResponse {
    {
        let _one_at_a_time = state.refreshing.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for source in state.sources.iter() {
            source.refresh(&state.metrics);
        }
    }
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
