//! Prometheus metrics, served on the admin listener at `/metrics`.
//!
//! Label values are bounded: tenants are created by admins, models outside
//! the price table are folded into `other`, endpoints are the fixed `/v1`
//! routes, and no key material or raw path ever becomes a label.

use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::response::IntoResponse;
use dashmap::DashMap;
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
    names: Vec<String>,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub tokens: IntCounterVec,
    pub cost_micros: IntCounterVec,
    pub rejections: IntCounterVec,
    pub failures: IntCounterVec,
    pub unpriced: IntCounterVec,
    pub pricing_reloads: IntCounterVec,
    pub routes_reloads: IntCounterVec,
    pub in_flight: IntGauge,
    pub auth_failures: IntCounterVec,
    pub key_cache_size: IntGauge,
    pub ledger_queue_depth: IntGauge,
    pub estimates_pending: IntGauge,
    pub spool_bytes: IntGauge,
    pub redis_fallbacks: IntCounter,
    pub shared_corrections_dropped: IntCounter,
    pub shared_corrections_waiting: IntGauge,
    pub shared_lease_admissions: IntCounter,
    pub shared_script_calls: IntCounterVec,
    pub upstream_attempts: IntCounterVec,
    pub upstream_connections_opened: IntCounterVec,
    pub breakers_open: IntGauge,
    pub upstream_keys_set_aside: IntCounter,
    pub ledger_write_failures: IntCounter,
    pub ledger_dead_letters: IntCounter,
    pub trace_spans_dropped: IntCounter,
    pub trace_spans_rejected: IntCounter,
    pub log_lines_dropped: IntCounter,
    pub trace_exports: IntCounterVec,
    pub budget_utilisation: IntGaugeVec,
    pub budget_forecast: IntGaugeVec,
    pub upstream_duration: HistogramVec,
    pub overhead: Histogram,
    /// The per-request series of each label set seen, keyed by `SeriesLabels::write_key`.
    series: Arc<DashMap<String, Arc<RequestSeries>, crate::fast_hash::FastHash>>,
}

/// The token kinds of `tokens_total`, in `RequestSeries::tokens` order.
const TOKEN_KINDS: [&str; 6] = ["prompt", "completion", "reasoning", "cached", "cache_write", "billed_output"];

/// The handles of the series one kind of request counts into (tenant,
/// model, endpoint, status class, stream flag, API), looked up once.
/// `observe` runs for every request; with a lookup per series it hashed the
/// label values and took a family's lock seven times (about 1,900
/// instructions per request under callgrind). A series is created when
/// first counted, as before, so none shows up at zero.
#[derive(Debug)]
struct RequestSeries {
    requests: IntCounter,
    duration: Histogram,
    upstream: OnceLock<Histogram>,
    first_token: OnceLock<Histogram>,
    tokens: [OnceLock<IntCounter>; TOKEN_KINDS.len()],
    cost: OnceLock<IntCounter>,
}

/// The label values of a `RequestSeries`.
struct SeriesLabels<'a> {
    tenant: &'a str,
    model: &'a str,
    endpoint: &'a str,
    status: &'static str,
    stream: &'static str,
    api: &'a str,
}

impl SeriesLabels<'_> {
    /// Writes the cache key: the values joined by a byte no label holds
    /// (tenant ids, model names and endpoints are checked identifiers).
    fn write_key(&self, key: &mut String) {
        key.clear();
        for value in [self.tenant, self.model, self.endpoint, self.status, self.stream, self.api] {
            key.push_str(value);
            key.push('\u{1f}');
        }
    }
}

/// Registers metrics and remembers their names (a family without any
/// series yet is left out of a scrape, but it is still ours).
struct Registrar {
    registry: Registry,
    names: Vec<String>,
}

impl Registrar {
    fn add<C: prometheus::core::Collector + Clone + 'static>(&mut self, name: &str, c: C) -> prometheus::Result<C> {
        self.registry.register(Box::new(c.clone()))?;
        self.names.push(format!("tollgate_{name}"));
        Ok(c)
    }

    fn counter(&mut self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntCounterVec> {
        self.add(name, IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    /// A counter with one label whose every value's series exists from the
    /// start (at 0), so the first event shows as an increase rather than as
    /// a series appearing.
    fn counter_of_each(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        values: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        let counter = self.counter(name, help, &[label])?;
        for value in values {
            counter.with_label_values(&[value]);
        }
        Ok(counter)
    }

    fn plain_counter(&mut self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.add(name, IntCounter::new(name, help)?)
    }

    fn histogram(&mut self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<HistogramVec> {
        let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
        self.add(name, HistogramVec::new(opts, labels)?)
    }

    fn plain_histogram(&mut self, name: &str, help: &str) -> prometheus::Result<Histogram> {
        self.add(name, Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))?)
    }

    fn gauge(&mut self, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        self.add(name, IntGauge::new(name, help)?)
    }

    fn gauges(&mut self, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
        self.add(name, IntGaugeVec::new(Opts::new(name, help), labels)?)
    }
}

impl Metrics {
    pub fn new() -> prometheus::Result<Self> {
        let mut r = Registrar { registry: Registry::new_custom(Some("tollgate".to_owned()), None)?, names: Vec::new() };
        let build_info = r.gauges("build_info", "Always 1; the running version.", &["version"])?;
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let pricing_reloads = r.counter_of_each(
            "pricing_reloads_total",
            "Changes of the pricing file seen, by result: applied, or rejected (the previous prices stay in force).",
            "result",
            &["applied", "rejected"],
        )?;
        let routes_reloads = r.counter_of_each(
            "routes_reloads_total",
            "Changes of the routes file seen, by result: applied, or rejected (the routes in force stay).",
            "result",
            &["applied", "rejected"],
        )?;
        // At 0 without Redis, as the other shared counters are.
        let shared_script_calls = r.counter_of_each(
            "shared_script_calls_total",
            "Script calls this replica sent to Redis: with checks (admissions and lease top-ups), or corrections only.",
            "carrying",
            &["checks", "corrections"],
        )?;
        let trace_exports = r.counter_of_each(
            "trace_exports_total",
            "Batches of spans sent to the OTLP collector, by result: ok, partial (the collector rejected some \
             spans or warned), or error (the batch is dropped).",
            "result",
            &["ok", "partial", "error"],
        )?;
        let trace_spans_rejected = r.plain_counter(
            "trace_spans_rejected_total",
            "Spans the OTLP collector answered it rejected (a partial success), after taking their batch.",
        )?;
        let trace_spans_dropped = r.plain_counter(
            "trace_spans_dropped_total",
            "Spans dropped before export because the export queue was full (the collector is slow or down).",
        )?;
        let log_lines_dropped = r.plain_counter(
            "log_lines_dropped_total",
            "Log lines dropped because the log writer fell behind (stdout is slow or blocked).",
        )?;
        Ok(Self {
            trace_exports,
            trace_spans_dropped,
            trace_spans_rejected,
            log_lines_dropped,
            requests: r.counter(
                "requests_total",
                "Requests by tenant, model, endpoint, status class, stream flag and API (openai, gemini, anthropic).",
                &["tenant", "model", "endpoint", "status", "stream", "api"],
            )?,
            request_duration: r.histogram(
                "request_duration_seconds",
                "Time from request to the end of the answer.",
                &["endpoint", "stream"],
            )?,
            upstream_duration: r.histogram(
                "upstream_duration_seconds",
                "Time from sending a request upstream to the upstream's last byte (or its failure).",
                &["endpoint", "stream"],
            )?,
            time_to_first_token: r.histogram(
                "time_to_first_token_seconds",
                "Time to the first streamed event.",
                &["model"],
            )?,
            overhead: r
                .plain_histogram("gateway_overhead_seconds", "Time spent in the gateway: total minus upstream time.")?,
            tokens: r.counter(
                "tokens_total",
                "Tokens by tenant, model and kind (prompt, completion, reasoning, cached, cache_write, billed_output).",
                &["tenant", "model", "kind"],
            )?,
            cost_micros: r.counter(
                "cost_micros_total",
                "Cost in micro-dollars by tenant, model and API.",
                &["tenant", "model", "api"],
            )?,
            rejections: r.counter(
                "rejections_total",
                "Requests refused by a limit or a budget, by tenant and reason.",
                &["tenant", "reason"],
            )?,
            failures: r.counter(
                "failures_total",
                "Failed requests by fault (client, upstream, gateway) and code.",
                &["fault", "code"],
            )?,
            unpriced: r.counter("unpriced_requests_total", "Requests for models without a price.", &["model"])?,
            pricing_reloads,
            routes_reloads,
            in_flight: r.gauge("in_flight_requests", "Requests being answered now.")?,
            auth_failures: r.counter("auth_failures_total", "Refused tenant keys by reason.", &["reason"])?,
            key_cache_size: r.gauge("key_cache_keys", "Keys in the in-memory authentication cache.")?,
            ledger_queue_depth: r.gauge("ledger_queue_depth", "Usage records waiting in memory for the database.")?,
            estimates_pending: r.gauge(
                "estimates_pending",
                "Token estimates queued or running, each holding back a usage record (answers without usage, \
                 streams cut short).",
            )?,
            spool_bytes: r.gauge("ledger_spool_bytes", "Bytes of usage records waiting in the local spool.")?,
            ledger_write_failures: r.plain_counter(
                "ledger_write_failures_total",
                "Usage record batches the database refused or timed out on (they go to the spool).",
            )?,
            ledger_dead_letters: r.plain_counter(
                "ledger_dead_letters_total",
                "Usage records the database refused on their own, set aside in the spool's dead-letter file.",
            )?,
            redis_fallbacks: r.plain_counter(
                "redis_fallbacks_total",
                "Limit checks decided locally because Redis was unavailable.",
            )?,
            upstream_attempts: r.counter(
                "upstream_attempts_total",
                "Attempts sent upstream by upstream, route target (`-` without a route) and outcome \
                 (ok, client_error, rate_limited, server_error, timeout, connect).",
                &["upstream", "target", "outcome"],
            )?,
            upstream_connections_opened: r.counter(
                "upstream_connections_opened_total",
                "Connections opened to each upstream (TCP, and TLS on https). With keep-alive working it \
                 grows far slower than upstream_attempts_total; growing with it, connections are not reused.",
                &["upstream"],
            )?,
            breakers_open: r.gauge("breakers_open", "Route targets whose circuit breaker is open or half-open.")?,
            upstream_keys_set_aside: r.plain_counter(
                "upstream_keys_set_aside_total",
                "Upstream keys set aside because the upstream refused them (401/403).",
            )?,
            shared_corrections_dropped: r.plain_counter(
                "shared_corrections_dropped_total",
                "Corrections to Redis counters dropped because too many were waiting (the counter stays high until it expires).",
            )?,
            shared_corrections_waiting: r.gauge(
                "shared_corrections_waiting",
                "Redis counters with corrections not yet applied: waiting for the next call, or held while Redis is unreachable.",
            )?,
            shared_lease_admissions: r.plain_counter(
                "shared_lease_admissions_total",
                "Requests admitted from allowance this replica leased from Redis, without a round trip.",
            )?,
            shared_script_calls,
            budget_utilisation: r.gauges(
                "budget_utilisation_percent",
                "Spend this period (from the ledger, every alerts.check_interval) as a percentage of the budget.",
                &["tenant", "budget"],
            )?,
            budget_forecast: r.gauges(
                "budget_forecast_percent",
                "Spend projected to the end of the period at the rate so far, as a percentage of the budget.",
                &["tenant", "budget"],
            )?,
            names: r.names,
            registry: r.registry,
            series: Arc::new(DashMap::default()),
        })
    }

    /// The handles for `labels`, made on first use.
    fn series(&self, labels: &SeriesLabels<'_>) -> Arc<RequestSeries> {
        thread_local! {
            /// Reused for every lookup, so a hit allocates nothing.
            static KEY: RefCell<String> = const { RefCell::new(String::new()) };
        }
        KEY.with_borrow_mut(|key| {
            labels.write_key(key);
            if let Some(found) = self.series.get(key.as_str()) {
                return found.clone();
            }
            let made = Arc::new(RequestSeries {
                requests: self.requests.with_label_values(&[
                    labels.tenant,
                    labels.model,
                    labels.endpoint,
                    labels.status,
                    labels.stream,
                    labels.api,
                ]),
                duration: self.request_duration.with_label_values(&[labels.endpoint, labels.stream]),
                upstream: OnceLock::new(),
                first_token: OnceLock::new(),
                tokens: Default::default(),
                cost: OnceLock::new(),
            });
            self.series.entry(key.clone()).or_insert(made).clone()
        })
    }

    /// Observes one closed usage record: `priced` says whether its model may
    /// be a label (else `other`), `total` and `upstream` how long the request
    /// and its upstream part took.
    pub fn observe(
        &self,
        e: &tollgate_store::UsageEvent,
        priced: bool,
        total: std::time::Duration,
        upstream: Option<std::time::Duration>,
    ) {
        let model = if priced { e.requested_model.as_str() } else { "other" };
        let stream = if e.stream { "true" } else { "false" };
        let status = status_class(u16::try_from(e.status).unwrap_or(500));
        let labels = SeriesLabels { tenant: &e.tenant_id, model, endpoint: &e.endpoint, status, stream, api: &e.api };
        let series = self.series(&labels);
        series.requests.inc();
        series.duration.observe(total.as_secs_f64());
        if let Some(ttft) = e.ttft_ms {
            let first_token = series.first_token.get_or_init(|| self.time_to_first_token.with_label_values(&[model]));
            first_token.observe(ttft as f64 / 1000.0);
        }
        if let Some(upstream) = upstream {
            let upstream_duration =
                series.upstream.get_or_init(|| self.upstream_duration.with_label_values(&[&e.endpoint, stream]));
            upstream_duration.observe(upstream.as_secs_f64());
            self.overhead.observe(total.saturating_sub(upstream).as_secs_f64());
        }
        let counts = [
            e.prompt_tokens,
            e.completion_tokens,
            e.reasoning_tokens,
            e.cached_tokens,
            e.cache_write_tokens,
            e.billed_output_tokens,
        ];
        for ((kind, n), handle) in TOKEN_KINDS.iter().zip(counts).zip(&series.tokens) {
            if n > 0 {
                let counter = handle.get_or_init(|| self.tokens.with_label_values(&[&e.tenant_id, model, kind]));
                counter.inc_by(n.unsigned_abs());
            }
        }
        if e.cost_micros > 0 {
            let cost = series.cost.get_or_init(|| self.cost_micros.with_label_values(&[&e.tenant_id, model, &e.api]));
            cost.inc_by(e.cost_micros.unsigned_abs());
        }
        if e.unpriced {
            self.unpriced.with_label_values(&["other"]).inc();
        }
        if let Some((fault, code)) = e.error_class.as_deref().and_then(|c| c.split_once(':')) {
            self.failures.with_label_values(&[fault, code]).inc();
        }
    }

    /// Every metric family this gateway exports, with its `tollgate_` prefix.
    pub fn family_names(&self) -> &[String] {
        &self.names
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn event(tenant: &str, model: &str) -> tollgate_store::UsageEvent {
        tollgate_store::UsageEvent {
            id: "u".into(),
            at: 1,
            request_id: "r".into(),
            tenant_id: tenant.into(),
            key_id: "k".into(),
            endpoint: "/v1/chat/completions".into(),
            requested_model: model.into(),
            upstream_model: None,
            stream: false,
            prompt_tokens: 10,
            completion_tokens: 5,
            reasoning_tokens: 0,
            cached_tokens: 0,
            total_tokens: 15,
            billed_output_tokens: 5,
            cost_micros: 7,
            estimated: false,
            unpriced: false,
            modified: false,
            status: 200,
            error_class: None,
            latency_ms: 1,
            ttft_ms: None,
            route: None,
            target: None,
            upstream: None,
            attempts: 1,
            cache_write_tokens: 0,
            api: "openai".into(),
        }
    }

    /// The value of the one series of `family` carrying every label given.
    fn value(text: &str, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = text.lines().filter(|line| {
            line.strip_prefix(family).is_some_and(|rest| rest.starts_with('{'))
                && labels.iter().all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        });
        let line = found.next()?;
        assert!(found.next().is_none(), "more than one series matches {labels:?}");
        line.rsplit(' ').next()?.parse().ok()
    }

    #[test]
    fn each_label_set_counts_into_its_own_series_and_none_appears_before_it_counts() {
        let m = Metrics::new().unwrap();
        let a = event("tenant-a", "gpt-x");
        m.observe(&a, true, Duration::from_millis(5), Some(Duration::from_millis(4)));
        m.observe(&a, true, Duration::from_millis(5), None);
        let mut b = event("tenant-b", "gpt-x");
        b.stream = true;
        b.ttft_ms = Some(20);
        b.status = 429;
        b.prompt_tokens = 0;
        b.cost_micros = 0;
        m.observe(&b, false, Duration::from_millis(5), None);
        let text = m.render();

        let requests = |tenant, model, status, stream| {
            value(
                &text,
                "tollgate_requests_total",
                &[("tenant", tenant), ("model", model), ("status", status), ("stream", stream)],
            )
        };
        assert_eq!(requests("tenant-a", "gpt-x", "2xx", "false"), Some(2.0));
        assert_eq!(requests("tenant-b", "other", "4xx", "true"), Some(1.0), "an unpriced model is `other`");
        let tokens = |tenant, kind| value(&text, "tollgate_tokens_total", &[("tenant", tenant), ("kind", kind)]);
        assert_eq!(tokens("tenant-a", "prompt"), Some(20.0));
        assert_eq!(tokens("tenant-a", "completion"), Some(10.0));
        assert_eq!(tokens("tenant-a", "reasoning"), None, "no reasoning tokens, no series");
        assert_eq!(tokens("tenant-b", "prompt"), None);
        assert_eq!(tokens("tenant-b", "billed_output"), Some(5.0));
        let cost = |tenant| value(&text, "tollgate_cost_micros_total", &[("tenant", tenant)]);
        assert_eq!(cost("tenant-a"), Some(14.0));
        assert_eq!(cost("tenant-b"), None);
        let upstream = |stream| value(&text, "tollgate_upstream_duration_seconds_count", &[("stream", stream)]);
        assert_eq!(upstream("false"), Some(1.0), "only the request that went upstream");
        assert_eq!(upstream("true"), None);
        assert_eq!(value(&text, "tollgate_time_to_first_token_seconds_count", &[("model", "other")]), Some(1.0));
        assert_eq!(value(&text, "tollgate_time_to_first_token_seconds_count", &[("model", "gpt-x")]), None);
        let duration = |stream| value(&text, "tollgate_request_duration_seconds_count", &[("stream", stream)]);
        assert_eq!(duration("false"), Some(2.0));
        assert_eq!(duration("true"), Some(1.0));
    }
}
