//! The scenarios, run in one invocation against the same upstream: added
//! latency at fixed rates, throughput, streaming, memory, ledger
//! throughput, and overhead with many keys. Targets are measured in turn,
//! repeatedly, and the medians reported.

use std::time::Duration;

use crate::load::{self, LoadFigures};
use crate::procs::{Cpus, rss_kib};
use crate::stack::{BenchDb, Crabllm, Gateway, Nginx, Target, Upstream};
use crate::stats::median;
use crate::streams::{self, StreamFigures};
use crate::{keys, ledger};

/// Sizes and durations of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub smoke: bool,
    pub duration: Duration,
    pub warmup: Duration,
    pub repeats: usize,
    pub rates: Vec<u32>,
    /// Connections oha may open at a fixed rate (enough not to queue).
    pub rate_connections: u32,
    pub throughput_connections: u32,
    pub streams: usize,
    pub stream_concurrency: usize,
    pub stream_chunks: usize,
    pub stream_interval_ms: u64,
    pub held_streams: usize,
    pub ledger_records: usize,
    pub many_keys: usize,
    pub keys_rate: u32,
    /// (i): usage records in the ledger the console's pages read.
    pub console_records: usize,
    /// (i): loads of each page on each ledger.
    pub console_repeats: usize,
    /// Scenario letters to run (`a`–`i`); empty runs them all.
    pub only: String,
}

impl Plan {
    pub fn wants(&self, scenario: char) -> bool {
        self.only.is_empty() || self.only.contains(scenario)
    }
}

impl Plan {
    pub fn full() -> Self {
        Self {
            smoke: false,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(3),
            repeats: 3,
            rates: vec![500, 1000, 2000],
            rate_connections: 64,
            throughput_connections: 64,
            streams: 300,
            stream_concurrency: 20,
            stream_chunks: 20,
            stream_interval_ms: 5,
            held_streams: 5000,
            ledger_records: 200_000,
            many_keys: 100_000,
            keys_rate: 1000,
            console_records: 1_000_000,
            console_repeats: 20,
            only: String::new(),
        }
    }

    pub fn smoke() -> Self {
        Self {
            smoke: true,
            duration: Duration::from_secs(1),
            warmup: Duration::from_millis(200),
            repeats: 1,
            rates: vec![100],
            rate_connections: 8,
            throughput_connections: 4,
            streams: 10,
            stream_concurrency: 5,
            stream_chunks: 5,
            stream_interval_ms: 5,
            held_streams: 50,
            ledger_records: 2_000,
            many_keys: 1_000,
            keys_rate: 100,
            console_records: 5_000,
            console_repeats: 2,
            only: String::new(),
        }
    }
}

/// Records per second: through the gateway's ledger, and by `COPY`.
#[derive(Debug, Clone, Copy)]
pub struct LedgerRates {
    pub ledger: f64,
    pub copy: f64,
}

/// Medians over the repeats, per target.
#[derive(Debug, Clone)]
pub struct Median {
    pub target: &'static str,
    pub figures: LoadFigures,
}

fn median_of(target: &'static str, runs: &[LoadFigures]) -> Median {
    let pick = |f: fn(&LoadFigures) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Median {
        target,
        figures: LoadFigures {
            rps: pick(|f| f.rps),
            p50_us: pick(|f| f.p50_us),
            p99_us: pick(|f| f.p99_us),
            p999_us: pick(|f| f.p999_us),
            success_rate: pick(|f| f.success_rate),
            requests: runs.iter().map(|f| f.requests).sum(),
            cpu_us_per_request: pick(|f| f.cpu_us_per_request),
            errors: runs.iter().map(|f| f.errors).sum(),
            aborted: runs.iter().map(|f| f.aborted).sum(),
            other_status: runs.iter().filter_map(|f| f.other_status).max_by_key(|&(_, n)| n),
        },
    }
}

#[derive(Debug)]
pub struct StreamResult {
    pub target: &'static str,
    pub figures: StreamFigures,
}

#[derive(Debug)]
pub struct Memory {
    pub target: &'static str,
    pub idle_kib: u64,
    pub idle_after_warmup_kib: u64,
    /// Just before the streams open: after the scenarios before (d), which
    /// ran on the same process.
    pub before_streams_kib: u64,
    pub with_streams_kib: u64,
    pub streams_open: usize,
}

#[derive(Debug)]
pub struct ManyKeys {
    pub direct: Median,
    pub ten: Median,
    pub many: Median,
    pub count: usize,
    pub cached: f64,
}

#[derive(Debug)]
pub struct Results {
    pub latency: Vec<(u32, Vec<Median>)>,
    pub throughput: Vec<Median>,
    pub streaming: Vec<StreamResult>,
    pub memory: Vec<Memory>,
    /// (e): the ledger's records per second, and Postgres's own `COPY` of
    /// the same rows in the same run.
    pub ledger: Option<LedgerRates>,
    pub keys: Option<ManyKeys>,
    /// (g): the direct path, nginx, the gateway, the gateway through a
    /// route, and through a route with limits and budgets in Redis.
    pub routed: Option<Routed>,
    pub traced: Option<Traced>,
    /// (i): the console's pages on an empty ledger and on a large one.
    pub console: Option<crate::console::ConsoleFigures>,
    pub machine: String,
    /// The peer gateway measured beside the others (name and version).
    pub peer: Option<String>,
}

#[derive(Debug)]
pub struct Routed {
    pub rate: u32,
    pub latency: Vec<Median>,
    pub throughput: Vec<Median>,
    /// The Redis-shared gateway's checks (one for limits, one for the
    /// budget, per request) and how many of them its leases admitted
    /// without a round trip.
    pub checks: f64,
    pub leased: f64,
    /// Its script calls to Redis, all told.
    pub script_calls: f64,
    /// The baseline build's script calls per request, when it runs beside
    /// and counts them (builds before the metric do not).
    pub baseline_calls_per_request: Option<f64>,
}

/// (h): trace export at 100 % sampling against none.
#[derive(Debug, Clone)]
pub struct Traced {
    pub rate: u32,
    pub latency: Vec<Median>,
    pub throughput: Vec<Median>,
    /// Spans the collector received, and the gateway's count of dropped ones.
    pub spans_received: usize,
    pub spans_dropped: f64,
}

/// The route of scenario (g): the benchmark's model split 90/10 over two
/// priced targets of the same upstream (each with its own breaker; the 10 %
/// have their model rewritten), with a fallback group, so every request
/// takes the routed path and the budget reserves the dearest target.
const BENCH_ROUTE: &str = r#"
[[routes]]
model = "gpt-4.1-mini"
[[routes.groups]]
targets = [
  { upstream = "default", model = "gpt-4.1-mini", weight = 90 },
  { upstream = "default", model = "gpt-4.1-nano", weight = 10 },
]
[[routes.groups]]
targets = [{ upstream = "default", model = "gpt-4.1" }]
"#;

/// Every target in turn, `repeats` times, so drift hits all alike.
async fn interleaved(
    plan: &Plan,
    cpus: &Cpus,
    targets: &[Target],
    rate: Option<u32>,
    connections: u32,
) -> anyhow::Result<Vec<Median>> {
    let mut runs: Vec<Vec<LoadFigures>> = vec![Vec::new(); targets.len()];
    for _ in 0..plan.repeats {
        for (i, target) in targets.iter().enumerate() {
            let figures = load::run(cpus, target, plan.duration, rate, connections).await?;
            anyhow::ensure!(
                figures.success_rate > 0.99,
                "{} answered only {:.1} % of requests with 200 (most often otherwise: {}; no answer: {})",
                target.name,
                figures.success_rate * 100.0,
                figures.other_status.map_or_else(|| "none".to_owned(), |(code, n)| format!("{code}, {n} times")),
                figures.errors,
            );
            runs[i].push(figures);
        }
    }
    Ok(targets.iter().zip(runs).map(|(t, r)| median_of(t.name, &r)).collect())
}

/// The servers the benchmark's gateways use.
pub struct Services {
    /// A Postgres server the databases are created on.
    pub postgres: String,
    /// A Redis server the Redis-shared gateway of (g) uses.
    pub redis: String,
}

pub async fn run_all(plan: &Plan, cpus: &Cpus, services: &Services) -> anyhow::Result<Results> {
    let postgres = services.postgres.as_str();
    let machine = crate::report::machine();
    println!("machine: {machine}; {}", cpus.describe());
    let upstream = Upstream::start(cpus).await?;
    let nginx = Nginx::start(cpus, upstream.addr).await?;
    let db = BenchDb::create(postgres, "main").await?;
    let outcome = run_with(plan, cpus, services, &upstream, &nginx, &db, machine).await;
    db.drop_now().await;
    outcome
}

async fn run_with(
    plan: &Plan,
    cpus: &Cpus,
    services: &Services,
    upstream: &Upstream,
    nginx: &Nginx,
    db: &BenchDb,
    machine: String,
) -> anyhow::Result<Results> {
    let postgres = services.postgres.as_str();
    let gateway = Gateway::start(cpus, upstream.addr, db, None).await?;
    let mut targets = vec![upstream.target(), nginx.target(), gateway.target()];
    // TOLLGATE_BENCH_BASELINE=/path/to/another/tollgate: that build too, on
    // its own database, measured in turn with the others (scenarios a–d; in
    // (g), its Redis-shared gateway; in (h), its traced gateway).
    let baseline_binary = std::env::var_os("TOLLGATE_BENCH_BASELINE");
    let baseline_db = match &baseline_binary {
        Some(_) => Some(BenchDb::create(postgres, "baseline").await?),
        None => None,
    };
    let baseline = match (&baseline_binary, &baseline_db) {
        (Some(binary), Some(db)) => {
            Some(Gateway::start_baseline(std::path::Path::new(binary), cpus, upstream.addr, db).await?)
        }
        _ => None,
    };
    if let Some(baseline) = &baseline {
        targets.push(baseline.target());
    }
    // A peer gateway, when installed (`bench/run` installs it; the smoke
    // run in the test suite goes without).
    let crabllm = match Crabllm::binary() {
        Some(binary) => Some(Crabllm::start(&binary, cpus, upstream.addr).await?),
        None => {
            println!("crabllm is not installed (cargo install crabllm --locked): measured without a peer gateway");
            None
        }
    };
    if let Some(crabllm) = &crabllm {
        targets.push(crabllm.target());
    }
    let crabllm_version = crabllm.as_ref().map(|_| Crabllm::version());
    let idle: Vec<u64> = targets.iter().map(|t| rss_kib(t.pid)).collect();

    println!("warming up");
    for target in &targets {
        load::run(cpus, target, plan.warmup, Some(500), plan.rate_connections).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_after_warmup: Vec<u64> = targets.iter().map(|t| rss_kib(t.pid)).collect();

    let mut latency = Vec::new();
    for &rate in plan.rates.iter().filter(|_| plan.wants('a')) {
        println!("(a) latency at {rate} requests/s");
        latency.push((rate, interleaved(plan, cpus, &targets, Some(rate), plan.rate_connections).await?));
    }

    let mut throughput = Vec::new();
    if plan.wants('b') {
        println!("(b) throughput");
        throughput = interleaved(plan, cpus, &targets, None, plan.throughput_connections).await?;
    }

    let http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(1024).build()?;
    let mut streaming = Vec::new();
    for target in targets.iter().filter(|_| plan.wants('c')) {
        println!("(c) streaming: {}", target.name);
        let mut merged = StreamFigures::default();
        for _ in 0..plan.repeats {
            let f = streams::measure(
                &http,
                target,
                plan.streams,
                plan.stream_concurrency,
                plan.stream_chunks,
                plan.stream_interval_ms,
            )
            .await;
            merged.ttft_us.extend_from(&f.ttft_us);
            merged.gap_us.extend_from(&f.gap_us);
            merged.coalesced_reads += f.coalesced_reads;
            merged.events += f.events;
            merged.failed += f.failed;
        }
        anyhow::ensure!(merged.failed == 0, "{}: {} streams failed", target.name, merged.failed);
        streaming.push(StreamResult { target: target.name, figures: merged });
    }

    let mut memory = Vec::new();
    for (i, target) in targets.iter().enumerate().skip(1).filter(|_| plan.wants('d')) {
        memory.push(memory_with_streams(plan, target, idle[i], idle_after_warmup[i]).await?);
    }

    // The same build speaking HTTP/2 to the upstream (prior knowledge):
    // thousands of streams share a few upstream connections.
    if plan.wants('d') {
        let h2_db = BenchDb::create(postgres, "h2").await?;
        let settings = [("TOLLGATE_UPSTREAM__PROTOCOL", "http2".to_owned())];
        let h2 = Gateway::start_with_settings(cpus, upstream.addr, &h2_db, None, None, &settings)
            .await?
            .named("gateway, HTTP/2 upstream");
        let target = h2.target();
        let idle_kib = rss_kib(target.pid);
        load::run(cpus, &target, plan.warmup, Some(500), plan.rate_connections).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle_after_warmup_kib = rss_kib(target.pid);
        memory.push(memory_with_streams(plan, &target, idle_kib, idle_after_warmup_kib).await?);
        drop(h2);
        h2_db.drop_now().await;
    }

    let keys = if plan.wants('f') { Some(many_keys(plan, cpus, postgres, upstream, &gateway).await?) } else { None };
    let routed =
        if plan.wants('g') { Some(routed(plan, cpus, services, upstream, nginx, &gateway).await?) } else { None };
    let traced = if plan.wants('h') { Some(traced(plan, cpus, postgres, upstream, &gateway).await?) } else { None };
    drop(gateway);
    let console =
        if plan.wants('i') { Some(crate::console::page_loads(plan, cpus, postgres, upstream).await?) } else { None };
    drop(baseline);
    drop(crabllm);
    if let Some(db) = &baseline_db {
        db.drop_now().await;
    }
    let mut ledger_rates = None;
    if plan.wants('e') {
        println!("(e) ledger throughput, {} records, and COPY of the same rows", plan.ledger_records);
        let ledger = ledger::throughput(postgres, plan.ledger_records).await?;
        let copy = ledger::copy_reference(postgres, plan.ledger_records).await?;
        ledger_rates = Some(LedgerRates { ledger, copy });
    }

    let peer = crabllm_version;
    Ok(Results {
        latency,
        throughput,
        streaming,
        memory,
        ledger: ledger_rates,
        keys,
        routed,
        traced,
        console,
        machine,
        peer,
    })
}

/// (d) for one target: its resident memory with `plan.held_streams` slow
/// streams open, beside the idle figures taken before.
async fn memory_with_streams(
    plan: &Plan,
    target: &Target,
    idle_kib: u64,
    idle_after_warmup_kib: u64,
) -> anyhow::Result<Memory> {
    println!("(d) memory with {} streams open: {}", plan.held_streams, target.name);
    let held_http = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build()?;
    let before_streams_kib = rss_kib(target.pid);
    let (held, open) = streams::hold_open(&held_http, target, plan.held_streams).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_streams_kib = rss_kib(target.pid);
    drop(held);
    // Let the cancelled streams wind down before the next target.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(Memory {
        target: target.name,
        idle_kib,
        idle_after_warmup_kib,
        before_streams_kib,
        with_streams_kib,
        streams_open: open,
    })
}

async fn many_keys(
    plan: &Plan,
    cpus: &Cpus,
    postgres: &str,
    upstream: &Upstream,
    gateway: &Gateway,
) -> anyhow::Result<ManyKeys> {
    println!("(f) {} keys against 10", plan.many_keys);
    let big_db = BenchDb::create(postgres, "keys").await?;
    let keys_result = async {
        let seeded = Gateway::start(cpus, upstream.addr, &big_db, None).await?;
        let key = seeded.key.clone();
        drop(seeded);
        keys::add_filler(&big_db, plan.many_keys).await?;
        let big = Gateway::start(cpus, upstream.addr, &big_db, Some(key)).await?;
        let cached = big.metric("tollgate_key_cache_keys").await?;
        let mut big_target = big.target();
        big_target.name = "gateway, many keys";
        let pair = [upstream.target(), gateway.target(), big_target];
        for target in &pair[1..] {
            load::run(cpus, target, plan.warmup, Some(plan.keys_rate), plan.rate_connections).await?;
        }
        let medians = interleaved(plan, cpus, &pair, Some(plan.keys_rate), plan.rate_connections).await?;
        anyhow::Ok((medians, cached))
    }
    .await;
    big_db.drop_now().await;
    let (mut key_medians, cached) = keys_result?;
    let missing = || anyhow::anyhow!("no figures");
    let many = key_medians.pop().ok_or_else(missing)?;
    let ten = key_medians.pop().ok_or_else(missing)?;
    let direct = key_medians.pop().ok_or_else(missing)?;
    Ok(ManyKeys { direct, ten, many, count: plan.many_keys, cached })
}

/// (g): the same load through the gateway with a two-target weighted route
/// (and a fallback group) against the gateway without routes, in turn.
async fn routed(
    plan: &Plan,
    cpus: &Cpus,
    services: &Services,
    upstream: &Upstream,
    nginx: &Nginx,
    gateway: &Gateway,
) -> anyhow::Result<Routed> {
    let (postgres, redis) = (services.postgres.as_str(), services.redis.as_str());
    let rate = if plan.smoke { plan.rates.first().copied().unwrap_or(100) } else { 1000 };
    println!("(g) a two-target weighted route at {rate} requests/s and at full throughput");
    let db = BenchDb::create(postgres, "routed").await?;
    let redis_db = BenchDb::create(postgres, "redis").await?;
    let baseline_db = match std::env::var_os("TOLLGATE_BENCH_BASELINE") {
        Some(binary) => Some((std::path::PathBuf::from(binary), BenchDb::create(postgres, "baseline_redis").await?)),
        None => None,
    };
    let result = async {
        let with_route = Gateway::start_with_routes(cpus, upstream.addr, &db, None, Some(BENCH_ROUTE)).await?;
        let mut routed_target = with_route.target();
        routed_target.name = "gateway, routed";
        // The route again, with limits and budgets shared through Redis (one
        // replica): a script per request instead of local counters.
        let settings = [
            ("TOLLGATE_REDIS_URL", redis.to_owned()),
            ("TOLLGATE_REDIS__KEY_PREFIX", format!("tollgate_bench_{}", std::process::id())),
        ];
        let with_redis =
            Gateway::start_with_settings(cpus, upstream.addr, &redis_db, None, Some(BENCH_ROUTE), &settings).await?;
        let mut redis_target = with_redis.target();
        redis_target.name = "gateway, routed, Redis";
        let mut targets = vec![upstream.target(), nginx.target(), gateway.target(), routed_target, redis_target];
        // With TOLLGATE_BENCH_BASELINE, that build's Redis-shared gateway
        // too (its own database and keys), measured in turn with this one.
        let baseline = match &baseline_db {
            Some((binary, db)) => {
                let settings = [
                    ("TOLLGATE_REDIS_URL", redis.to_owned()),
                    ("TOLLGATE_REDIS__KEY_PREFIX", format!("tollgate_bench_baseline_{}", std::process::id())),
                ];
                let baseline =
                    Gateway::start_binary(binary, cpus, upstream.addr, db, None, Some(BENCH_ROUTE), &settings).await?;
                let mut target = baseline.target();
                target.name = "baseline, routed, Redis";
                targets.push(target);
                Some(baseline)
            }
            None => None,
        };
        for target in &targets[3..] {
            load::run(cpus, target, plan.warmup, Some(500), plan.rate_connections).await?;
        }
        let prefix = format!("tollgate_bench_{}", std::process::id());
        let shared_keys = redis_keys(redis, &prefix).await?;
        anyhow::ensure!(shared_keys > 0, "the Redis-shared gateway wrote nothing to Redis at {redis}");
        let latency = interleaved(plan, cpus, &targets, Some(rate), plan.rate_connections).await?;
        let throughput = interleaved(plan, cpus, &targets, None, plan.throughput_connections).await?;
        for gateway in std::iter::once(&with_redis).chain(baseline.as_ref()) {
            let fallbacks = gateway.metric("tollgate_redis_fallbacks_total").await?;
            anyhow::ensure!(fallbacks == 0.0, "{fallbacks} limit checks fell back to local counters");
        }
        let checks = 2.0 * with_redis.metric("tollgate_requests_total").await?;
        let leased = with_redis.metric("tollgate_shared_lease_admissions_total").await?;
        let script_calls = with_redis.metric("tollgate_shared_script_calls_total").await?;
        let baseline_calls_per_request = match &baseline {
            Some(baseline) => {
                let calls = baseline.metric("tollgate_shared_script_calls_total").await?;
                let requests = baseline.metric("tollgate_requests_total").await?;
                (calls > 0.0 && requests > 0.0).then(|| calls / requests)
            }
            None => None,
        };
        anyhow::Ok(Routed { rate, latency, throughput, checks, leased, script_calls, baseline_calls_per_request })
    }
    .await;
    db.drop_now().await;
    redis_db.drop_now().await;
    if let Some((_, db)) = baseline_db {
        db.drop_now().await;
    }
    result
}

/// Keys under `prefix` in Redis (what a Redis-shared gateway wrote).
async fn redis_keys(url: &str, prefix: &str) -> anyhow::Result<usize> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await?;
    Ok(keys.len())
}

/// (h): the same load through a gateway exporting every request's spans
/// (100 % sampling, OTLP/gRPC to a receiver in this process) against the
/// gateway without trace export, in turn.
async fn traced(
    plan: &Plan,
    cpus: &Cpus,
    postgres: &str,
    upstream: &Upstream,
    gateway: &Gateway,
) -> anyhow::Result<Traced> {
    let rate = if plan.smoke { plan.rates.first().copied().unwrap_or(100) } else { 1000 };
    println!("(h) trace export at 100 % sampling, at {rate} requests/s and at full throughput");
    let sink = tollgate_otlp_sink::Sink::start(tollgate_otlp_sink::Transport::Grpc).await?;
    // The receiver shares the load generator's CPU: it counts, nothing more.
    sink.set_counting_only(true);
    let db = BenchDb::create(postgres, "traced").await?;
    let baseline_db = match std::env::var_os("TOLLGATE_BENCH_BASELINE") {
        Some(binary) => Some((std::path::PathBuf::from(binary), BenchDb::create(postgres, "baseline_traced").await?)),
        None => None,
    };
    let result = async {
        let settings = [
            ("TOLLGATE_TELEMETRY__OTLP__ENDPOINT", sink.endpoint()),
            ("TOLLGATE_TELEMETRY__OTLP__SAMPLING_RATIO", "1.0".to_owned()),
        ];
        let with_traces = Gateway::start_with_settings(cpus, upstream.addr, &db, None, None, &settings).await?;
        let mut traced_target = with_traces.target();
        traced_target.name = "gateway, traced";
        let mut targets = vec![upstream.target(), gateway.target(), traced_target];
        // With TOLLGATE_BENCH_BASELINE, that build traced too (its own
        // database; its spans go to the same receiver), measured in turn.
        let baseline = match &baseline_db {
            Some((binary, db)) => {
                let baseline = Gateway::start_binary(binary, cpus, upstream.addr, db, None, None, &settings).await?;
                let mut target = baseline.target();
                target.name = "baseline, traced";
                targets.push(target);
                Some(baseline)
            }
            None => None,
        };
        for target in &targets[2..] {
            load::run(cpus, target, plan.warmup, Some(500), plan.rate_connections).await?;
        }
        let latency = interleaved(plan, cpus, &targets, Some(rate), plan.rate_connections).await?;
        let throughput = interleaved(plan, cpus, &targets, None, plan.throughput_connections).await?;
        let spans_dropped = with_traces.metric("tollgate_trace_spans_dropped_total").await?;
        drop(baseline);
        anyhow::Ok(Traced { rate, latency, throughput, spans_received: sink.spans_seen(), spans_dropped })
    }
    .await;
    db.drop_now().await;
    if let Some((_, db)) = baseline_db {
        db.drop_now().await;
    }
    result
}
