//! The Markdown report (`docs/benchmarks.md`) and the targets it checks.

use std::fmt::Write as _;

use crate::procs::Cpus;
use crate::scenarios::{Median, Plan, Results};

/// One line on the machine: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0.0, |kib| kib as f64 / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} CPUs, {mem_gib:.0} GiB, Linux {}", kernel.trim())
}

/// A target the figures are held to.
pub struct Check {
    pub what: String,
    pub measured: String,
    pub pass: bool,
}

fn find<'a>(medians: &'a [Median], target: &str) -> Option<&'a Median> {
    medians.iter().find(|m| m.target == target)
}

fn ms(us: f64) -> String {
    format!("{:.3} ms", us / 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Added latency of `target` over direct: (p50, p99, p99.9) in µs.
fn added(medians: &[Median], target: &str) -> Option<(f64, f64, f64)> {
    let direct = find(medians, "direct")?.figures;
    let t = find(medians, target)?.figures;
    Some((t.p50_us - direct.p50_us, t.p99_us - direct.p99_us, t.p999_us - direct.p999_us))
}

pub fn checks(results: &Results) -> Vec<Check> {
    let mut checks = Vec::new();
    let mut check = |what: &str, measured: String, pass: bool| {
        checks.push(Check { what: what.to_owned(), measured, pass });
    };
    if let Some((_, medians)) = results.latency.iter().find(|(rate, _)| *rate == 1000)
        && let Some(gw) = added(medians, "gateway")
    {
        check("added latency p50 at 1,000 req/s ≤ 0.2 ms", ms(gw.0), gw.0 <= 200.0);
        check("added latency p99 at 1,000 req/s ≤ 1 ms", ms(gw.1), gw.1 <= 1000.0);
    }
    if let Some((_, medians)) = results.latency.iter().find(|(rate, _)| *rate == 1000) {
        against_nginx_latency(&mut check, medians, "gateway");
    }
    against_nginx_throughput(&mut check, &results.throughput, "gateway");
    let stream = |name: &str| results.streaming.iter().find(|s| s.target == name);
    if let (Some(gw), Some(direct)) = (stream("gateway"), stream("direct")) {
        let ttft = gw.figures.ttft_us.percentile(99.0) as f64 - direct.figures.ttft_us.percentile(99.0) as f64;
        check("added time to first token p99 ≤ 1 ms", ms(ttft), ttft <= 1000.0);
        let gap = gw.figures.gap_us.percentile(99.0) as f64 - direct.figures.gap_us.percentile(99.0) as f64;
        check(
            "no chunk held back (coalesced reads ≤ direct's; gap p99 within 1 ms)",
            format!(
                "{} coalesced (direct {}), gap p99 {:+.3} ms",
                gw.figures.coalesced_reads,
                direct.figures.coalesced_reads,
                gap / 1000.0
            ),
            gw.figures.coalesced_reads <= direct.figures.coalesced_reads && gap <= 1000.0,
        );
    }
    let nginx_memory = results.memory.iter().find(|m| m.target == "nginx");
    for m in results.memory.iter().filter(|m| m.target.starts_with("gateway")) {
        if let Some(nx) = nginx_memory {
            check(
                &format!("{}: RSS with {} streams ≤ 1.5 × nginx's", m.target, m.streams_open),
                format!("{} vs nginx {}", mib(m.with_streams_kib), mib(nx.with_streams_kib)),
                m.with_streams_kib as f64 <= 1.5 * nx.with_streams_kib as f64,
            );
        }
    }
    if let Some(m) = results.memory.iter().find(|m| m.target == "gateway") {
        check("memory idle ≤ 30 MB", mib(m.idle_after_warmup_kib), m.idle_after_warmup_kib * 1024 <= 30_000_000);
        check(
            "memory with 5,000 streams ≤ 100 MB",
            format!("{} with {} streams", mib(m.with_streams_kib), m.streams_open),
            m.with_streams_kib * 1024 <= 100_000_000,
        );
    }
    if let Some(rates) = results.ledger {
        check("ledger ≥ 50,000 records/s", format!("{:.0} records/s", rates.ledger), rates.ledger >= 50_000.0);
        check(
            "ledger ≥ 50 % of Postgres's own COPY of the same rows",
            format!("{:.0} vs {:.0} records/s ({:.0} %)", rates.ledger, rates.copy, 100.0 * rates.ledger / rates.copy),
            rates.ledger >= 0.5 * rates.copy,
        );
    }
    if let Some(r) = &results.routed {
        for name in ["gateway, routed", "gateway, routed, Redis"] {
            against_nginx_latency(&mut check, &r.latency, name);
            against_nginx_throughput(&mut check, &r.throughput, name);
        }
        let find = |list: &[Median], name: &str| list.iter().find(|m| m.target == name).map(|m| m.figures);
        let direct = find(&r.latency, "direct").map_or(0.0, |f| f.p50_us);
        if let (Some(plain), Some(routed)) = (find(&r.latency, "gateway"), find(&r.latency, "gateway, routed")) {
            let (a, b) = (plain.p50_us - direct, routed.p50_us - direct);
            check(
                "routed overhead within 5 % of the single-upstream path's (added p50)",
                format!("{} vs {}", ms(b), ms(a)),
                b <= a * 1.05 || b - a <= 5.0,
            );
        }
        if let (Some(plain), Some(routed)) = (find(&r.throughput, "gateway"), find(&r.throughput, "gateway, routed")) {
            check(
                "routed CPU per request within 5 % of the single-upstream path's",
                format!("{:.1} µs vs {:.1} µs", routed.cpu_us_per_request, plain.cpu_us_per_request),
                routed.cpu_us_per_request <= plain.cpu_us_per_request * 1.05,
            );
        }
    }
    if let Some(t) = &results.traced {
        let find = |list: &[Median], name: &str| list.iter().find(|m| m.target == name).map(|m| m.figures);
        if let (Some(plain), Some(traced)) = (find(&t.throughput, "gateway"), find(&t.throughput, "gateway, traced")) {
            check(
                "trace export at 100 % costs ≤ 15 % more CPU per request",
                format!(
                    "{:.1} µs vs {:.1} µs; {} spans received, {:.0} dropped",
                    traced.cpu_us_per_request, plain.cpu_us_per_request, t.spans_received, t.spans_dropped
                ),
                traced.cpu_us_per_request <= plain.cpu_us_per_request * 1.15,
            );
        }
    }
    if let Some(c) = &results.console {
        let slowest = c.pages.iter().map(|p| p.full.percentile(95.0)).max().unwrap_or(0);
        check(
            &format!("every console page on {} records loads within 500 ms (p95)", c.records),
            ms(slowest as f64),
            slowest <= 500_000,
        );
    }
    if let Some(k) = &results.keys {
        let direct = k.direct.figures.p50_us;
        let (a, b) = (k.ten.figures.p50_us - direct, k.many.figures.p50_us - direct);
        let p99 = |m: &Median| ms(m.figures.p99_us - k.direct.figures.p99_us);
        check(
            &format!("overhead with {} keys within 10 % of 10 keys (p50)", k.count),
            format!("{} vs {} (p99 {} vs {})", ms(b), ms(a), p99(&k.many), p99(&k.ten)),
            b <= a * 1.1 || b - a <= 10.0,
        );
    }
    checks
}

/// Added latency of `target` against nginx's in the same runs (p50, p99).
fn against_nginx_latency(check: &mut impl FnMut(&str, String, bool), medians: &[Median], target: &str) {
    let (Some(gw), Some(nx)) = (added(medians, target), added(medians, "nginx")) else { return };
    check(
        &format!("{target}: added latency p50 ≤ 1.5 × nginx's"),
        format!("{} vs nginx {}", ms(gw.0), ms(nx.0)),
        gw.0 <= 1.5 * nx.0.max(0.0),
    );
    check(
        &format!("{target}: added latency p99 ≤ 1.5 × nginx's"),
        format!("{} vs nginx {}", ms(gw.1), ms(nx.1)),
        gw.1 <= 1.5 * nx.1.max(0.0),
    );
}

/// Throughput and CPU per request of `target` against nginx's.
fn against_nginx_throughput(check: &mut impl FnMut(&str, String, bool), medians: &[Median], target: &str) {
    let (Some(gw), Some(nx)) = (find(medians, target), find(medians, "nginx")) else { return };
    let share = gw.figures.rps / nx.figures.rps;
    check(
        &format!("{target}: throughput ≥ 80 % of nginx's"),
        format!("{:.0} vs {:.0} req/s ({:.0} %)", gw.figures.rps, nx.figures.rps, share * 100.0),
        share >= 0.8,
    );
    check(
        &format!("{target}: CPU per request ≤ 1.5 × nginx's"),
        format!("{:.1} µs vs {:.1} µs", gw.figures.cpu_us_per_request, nx.figures.cpu_us_per_request),
        gw.figures.cpu_us_per_request <= 1.5 * nx.figures.cpu_us_per_request,
    );
}

pub fn summary(results: &Results) -> String {
    let mut out = String::new();
    for c in checks(results) {
        let _ = writeln!(out, "{} {}: {}", if c.pass { "PASS" } else { "MISS" }, c.what, c.measured);
    }
    out
}

fn latency_table(out: &mut String, medians: &[Median]) {
    out.push_str("| path | p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 | req/s | CPU per request |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for m in medians {
        let f = m.figures;
        let (a50, a99, a999) = added(medians, m.target).unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1} µs |",
            m.target,
            ms(f.p50_us),
            ms(f.p99_us),
            ms(f.p999_us),
            ms(a50),
            ms(a99),
            ms(a999),
            f.rps,
            f.cpu_us_per_request
        );
    }
}

pub fn render(plan: &Plan, cpus: &Cpus, results: &Results) -> String {
    let mut out = String::new();
    let date = chrono::Utc::now().format("%Y-%m-%d %H:%M UTC");
    let _ = writeln!(out, "# Benchmarks\n");
    if plan.smoke {
        out.push_str("**Smoke run: every scenario for about a second at small sizes. The figures prove the harness works, not the gateway's speed.**\n\n");
    }
    let _ = writeln!(
        out,
        "Generated by `bench/run` on {date}.\n\n- Machine: {}\n- Pinning: {}\n- Load generator: `oha` (open loop; fixed rates use latency correction), {} s per run, {} runs per figure (median), targets measured in turn\n- Upstream: the fake OpenAI-compatible upstream answering at once (`crates/fake-upstream`)\n- Gateway: release build, the runtime's default of one worker thread per CPU it may use (one when pinned, as nginx has one worker; `TOLLGATE_BENCH_WORKERS` sets another count) and its background thread, every feature on: key authentication, tenant rate limits (requests, tokens, in flight), a hard monthly budget, usage accounting to Postgres, the Prometheus endpoint scraped every second, JSON logs\n- nginx: one worker, keep-alive to the upstream, proxy buffering off, access log off",
        results.machine,
        cpus.describe(),
        plan.duration.as_secs_f64(),
        plan.repeats,
    );
    match &results.peer {
        Some(peer) => {
            let _ = writeln!(
                out,
                "- Peer gateway: {peer} from crates.io, on the same CPU, one provider pointing at the fake upstream, no retries, info log off; it has no keys, limits, budgets or usage ledger, so it does less per request than the gateway here\n"
            );
        }
        None => out.push_str("- Peer gateway: crabllm was not installed for this run\n\n"),
    }

    out.push_str("## Targets\n\n| target | measured | |\n|---|---|---|\n");
    for c in checks(results) {
        let _ = writeln!(out, "| {} | {} | {} |", c.what, c.measured, if c.pass { "met" } else { "**missed**" });
    }

    out.push_str("\n## (a) Added latency at fixed request rates\n\nNon-streamed chat completions; \"added\" is the path's latency minus the direct path's at the same percentile.\n");
    for (rate, medians) in &results.latency {
        let _ = writeln!(out, "\n### {rate} requests/s\n");
        latency_table(&mut out, medians);
    }

    out.push_str("\n## (b) Throughput\n\n");
    let _ = writeln!(out, "As fast as {} connections allow.\n", plan.throughput_connections);
    out.push_str("| path | requests/s | p50 | p99 | CPU per request |\n|---|---|---|---|---|\n");
    for m in &results.throughput {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {} | {} | {:.1} µs |",
            m.target,
            m.figures.rps,
            ms(m.figures.p50_us),
            ms(m.figures.p99_us),
            m.figures.cpu_us_per_request
        );
    }

    let _ = writeln!(
        out,
        "\n## (c) Streaming\n\n{} streams per run, {} at a time, {} content chunks {} ms apart; the gateway injects and strips `stream_options.include_usage` and accounts every stream. Gaps are between consecutive content events as the client reads them; a coalesced read carried more than one event.\n",
        plan.streams, plan.stream_concurrency, plan.stream_chunks, plan.stream_interval_ms
    );
    out.push_str("| path | TTFT p50 | TTFT p99 | gap p50 | gap p99 | gap max | coalesced reads | events |\n|---|---|---|---|---|---|---|---|\n");
    for s in &results.streaming {
        let f = &s.figures;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            s.target,
            ms(f.ttft_us.percentile(50.0) as f64),
            ms(f.ttft_us.percentile(99.0) as f64),
            ms(f.gap_us.percentile(50.0) as f64),
            ms(f.gap_us.percentile(99.0) as f64),
            ms(f.gap_us.max() as f64),
            f.coalesced_reads,
            f.events
        );
    }

    out.push_str("\n## (d) Memory\n\nResident set size (nginx: master and worker). \"Before the streams\" is after the scenarios above ran on the same process (the HTTP/2 gateway is started for (d) alone).\n\n| path | after start | after warm-up | before the streams | with slow streams open |\n|---|---|---|---|---|\n");
    for m in &results.memory {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} ({} streams) |",
            m.target,
            mib(m.idle_kib),
            mib(m.idle_after_warmup_kib),
            mib(m.before_streams_kib),
            mib(m.with_streams_kib),
            m.streams_open
        );
    }

    if let Some(rates) = results.ledger {
        let _ = writeln!(
            out,
            "\n## (e) Ledger\n\n{} usage records through the gateway's ledger (channel, batches of up to {}, the gateway's default; Postgres with daily partitions and rollups): **{:.0} records/s**. The same rows by one `COPY` into the same table of a fresh database (no rollups, no duplicate check), as the reference: {:.0} records/s; the ledger reaches {:.0} % of it.",
            plan.ledger_records,
            tollgate_gateway::config::AccountingConfig::default().batch_size,
            rates.ledger,
            rates.copy,
            100.0 * rates.ledger / rates.copy
        );
    }
    if let Some(r) = &results.routed {
        let _ = writeln!(
            out,
            "\n## (g) A two-target weighted route\n\nThe same non-streamed chat completions through the gateway with no route and through one whose model is routed 90/10 to two targets (each with its own breaker and model rewrite) with a fallback group, at {} requests/s and at full throughput.\n",
            r.rate
        );
        latency_table(&mut out, &r.latency);
        out.push('\n');
        latency_table(&mut out, &r.throughput);
        if r.checks > 0.0 {
            let _ = writeln!(
                out,
                "\nThe Redis-shared gateway admitted {:.1} % of its {:.0} limit and budget checks from the blocks it leases from Redis, without a round trip, and sent Redis {:.1} script calls per 1,000 requests (checks, lease top-ups and corrections).",
                100.0 * r.leased / r.checks,
                r.checks,
                2_000.0 * r.script_calls / r.checks
            );
            if let Some(per_request) = r.baseline_calls_per_request {
                let _ = writeln!(out, "The baseline build sent {:.1} per 1,000 requests.", 1_000.0 * per_request);
            }
        }
    }
    if let Some(t) = &results.traced {
        let _ = writeln!(
            out,
            "\n## (h) Trace export\n\nThe same non-streamed chat completions through the gateway without trace export and through one exporting every request's spans (server, admission, attempt, relay; 100 % sampling, OTLP/gRPC to a receiver in the benchmark process), at {} requests/s and at full throughput. The receiver got {} spans; the gateway dropped {:.0}.\n",
            t.rate, t.spans_received, t.spans_dropped
        );
        latency_table(&mut out, &t.latency);
        out.push('\n');
        latency_table(&mut out, &t.throughput);
    }
    if let Some(c) = &results.console {
        let _ = writeln!(
            out,
            "\n## (i) Console pages\n\nEach page of the admin console as the requests its script makes (sent together, as the browser does), timed until every answer has arrived, {} loads each, on a gateway with an empty ledger and on one with {} usage records (30 days, 50 tenants, 500 keys, 8 models; seeded at {:.0} records/s). Daily figures read the rollups; hourly ones read the records of the week.\n",
            c.pages.first().map_or(0, |p| p.empty.count()),
            c.records,
            c.seed_records_per_s
        );
        out.push_str("| page | requests | empty p50 | empty p95 | full p50 | full p95 | full max |\n|---|---|---|---|---|---|---|\n");
        for p in &c.pages {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                p.page,
                p.requests,
                ms(p.empty.percentile(50.0) as f64),
                ms(p.empty.percentile(95.0) as f64),
                ms(p.full.percentile(50.0) as f64),
                ms(p.full.percentile(95.0) as f64),
                ms(p.full.max() as f64)
            );
        }
    }
    let Some(k) = &results.keys else { return out };
    let _ = writeln!(
        out,
        "\n## (f) Cost of many keys\n\nThe same load ({} requests/s) through a gateway whose key cache holds 10 keys and one holding {:.0} (tenants and keys in Postgres, all loaded at start).\n",
        plan.keys_rate, k.cached
    );
    out.push_str("| keys | p50 | p99 | added p50 | added p99 |\n|---|---|---|---|---|\n");
    let direct = k.direct.figures;
    let _ = writeln!(out, "| direct | {} | {} | | |", ms(direct.p50_us), ms(direct.p99_us));
    for (n, m) in [(10, &k.ten), (k.count, &k.many)] {
        let f = m.figures;
        let _ = writeln!(
            out,
            "| {n} | {} | {} | {} | {} |",
            ms(f.p50_us),
            ms(f.p99_us),
            ms(f.p50_us - direct.p50_us),
            ms(f.p99_us - direct.p99_us)
        );
    }
    out
}
