//! The soak: the gateway with every feature on, held for a long time at
//! half the throughput it reaches, with streams mixed in. It passes when no
//! request failed, every answered request has its ledger record, and the
//! resident memory at the end is within 10 % of what it was after the
//! warm-up (a leak or an unbounded cache shows as growth).
//!
//! `tollgate-bench soak --minutes 30 --out docs/benchmarks.md` writes its
//! section into the report (the full run keeps it when it rewrites the rest).

use std::time::{Duration, Instant};

use anyhow::Context;

use crate::load::{self, LoadFigures};
use crate::procs::{Cpus, rss_kib};
use crate::stack::{BenchDb, Gateway, Target, Upstream};
use crate::streams;

/// The heading that starts the soak's section of the report.
pub const HEADING: &str = "## Soak";

/// Streams open at any moment beside the request load, each of
/// `STREAM_CHUNKS` events `STREAM_INTERVAL_MS` apart (one second long).
const CONCURRENT_STREAMS: usize = 50;
const STREAM_CHUNKS: usize = 20;
const STREAM_INTERVAL_MS: u64 = 50;

#[derive(Debug)]
pub struct SoakFigures {
    pub minutes: u64,
    pub warmup: Duration,
    /// Requests per second at full throughput, measured first.
    pub max_rps: f64,
    /// The rate held: half of `max_rps`.
    pub rate: u32,
    pub load: LoadFigures,
    pub streams: u64,
    pub streams_failed: u64,
    pub rss_after_warmup_kib: u64,
    pub rss_end_kib: u64,
    pub rss_peak_kib: u64,
    /// (minute, RSS) once a minute.
    pub rss_by_minute: Vec<(u64, u64)>,
    /// Ledger records stored once the writer had caught up.
    pub ledger_rows: u64,
}

impl SoakFigures {
    /// Requests answered with a status (the load's and the streams').
    fn answered(&self) -> u64 {
        self.load.requests + self.streams
    }

    pub fn failures(&self) -> u64 {
        let not_ok = (self.load.requests as f64 * (1.0 - self.load.success_rate)).round() as u64;
        not_ok + self.load.errors + self.streams_failed
    }

    pub fn rss_growth(&self) -> f64 {
        self.rss_end_kib as f64 / self.rss_after_warmup_kib.max(1) as f64 - 1.0
    }

    /// Every answered request has its record; requests oha abandoned at the
    /// deadline may have been served (and recorded) too.
    pub fn ledger_complete(&self) -> bool {
        self.ledger_rows >= self.answered() && self.ledger_rows <= self.answered() + self.load.aborted
    }

    pub fn passed(&self) -> bool {
        self.failures() == 0 && self.rss_growth() <= 0.10 && self.ledger_complete()
    }
}

pub async fn run(cpus: &Cpus, postgres: &str, minutes: u64, warmup: Duration) -> anyhow::Result<SoakFigures> {
    let upstream = Upstream::start(cpus).await?;
    let db = BenchDb::create(postgres, "soak").await?;
    let outcome = async {
        let gateway = Gateway::start(cpus, upstream.addr, &db, None).await?;
        soak(cpus, &gateway, &db, minutes, warmup).await
    }
    .await;
    db.drop_now().await;
    outcome
}

async fn soak(
    cpus: &Cpus,
    gateway: &Gateway,
    db: &BenchDb,
    minutes: u64,
    warmup: Duration,
) -> anyhow::Result<SoakFigures> {
    let target = gateway.target();
    println!("soak: measuring the gateway's throughput");
    load::run(cpus, &target, Duration::from_secs(3), None, 64).await?;
    let max = load::run(cpus, &target, Duration::from_secs(10), None, 64).await?;
    let rate = (max.rps / 2.0) as u32;
    let store = tollgate_store::Store::connect(&db.url, 1).await?;
    let before = settled_ledger_rows(&store).await?;
    println!(
        "soak: {minutes} minutes at {rate} requests/s (half of {:.0}), {CONCURRENT_STREAMS} streams open",
        max.rps
    );

    let held = warmup + Duration::from_secs(minutes * 60);
    let load = load::run(cpus, &target, held, Some(rate), 64);
    let streams = keep_streaming(&target, held);
    let memory = sample_memory(target.pid, warmup, held);
    let (load, (streams, streams_failed), memory) = tokio::join!(load, streams, memory);
    let load = load?;
    let (rss_after_warmup_kib, rss_end_kib, rss_peak_kib, rss_by_minute) = memory;

    let answered = load.requests + streams;
    let ledger_rows = wait_for_ledger(&store, before, answered).await?;
    store.close().await;
    Ok(SoakFigures {
        minutes,
        warmup,
        max_rps: max.rps,
        rate,
        load,
        streams,
        streams_failed,
        rss_after_warmup_kib,
        rss_end_kib,
        rss_peak_kib,
        rss_by_minute,
        ledger_rows,
    })
}

/// Streams, `CONCURRENT_STREAMS` at a time, until `held` has passed:
/// (completed, failed).
async fn keep_streaming(target: &Target, held: Duration) -> (u64, u64) {
    let http = match reqwest::Client::builder().no_proxy().build() {
        Ok(http) => http,
        Err(_) => return (0, 1),
    };
    let until = Instant::now() + held;
    let (mut done, mut failed) = (0, 0);
    while Instant::now() + Duration::from_secs(2) < until {
        let figures = streams::measure(
            &http,
            target,
            CONCURRENT_STREAMS * 4,
            CONCURRENT_STREAMS,
            STREAM_CHUNKS,
            STREAM_INTERVAL_MS,
        )
        .await;
        done += (CONCURRENT_STREAMS * 4) as u64 - figures.failed;
        failed += figures.failed;
    }
    (done, failed)
}

/// RSS after the warm-up, at the end, its peak, and once a minute.
async fn sample_memory(pid: u32, warmup: Duration, held: Duration) -> (u64, u64, u64, Vec<(u64, u64)>) {
    let started = Instant::now();
    let mut after_warmup = None;
    let (mut last, mut peak) = (0, 0);
    let mut by_minute = Vec::new();
    // The last sample is taken just before the load stops.
    while started.elapsed() + Duration::from_secs(2) < held {
        tokio::time::sleep(Duration::from_secs(1)).await;
        last = rss_kib(pid);
        peak = peak.max(last);
        let elapsed = started.elapsed();
        if after_warmup.is_none() && elapsed >= warmup {
            after_warmup = Some(last);
        }
        let minute = elapsed.as_secs() / 60;
        if by_minute.last().is_none_or(|(m, _)| *m < minute) {
            by_minute.push((minute, last));
        }
    }
    (after_warmup.unwrap_or(last), last, peak, by_minute)
}

async fn ledger_rows(store: &tollgate_store::Store) -> anyhow::Result<u64> {
    Ok(u64::try_from(store.count_usage_events().await?)?)
}

/// The ledger's rows once the writer has stored what it was handed (no
/// change for a second: five flush intervals).
async fn settled_ledger_rows(store: &tollgate_store::Store) -> anyhow::Result<u64> {
    let mut last = ledger_rows(store).await?;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = ledger_rows(store).await?;
        if now == last {
            return Ok(now);
        }
        last = now;
    }
}

/// The ledger's rows added since `before`, once they reach `answered` or
/// stop growing for ten seconds.
async fn wait_for_ledger(store: &tollgate_store::Store, before: u64, answered: u64) -> anyhow::Result<u64> {
    let mut last = (0, Instant::now());
    loop {
        let rows = ledger_rows(store).await.context("counting the ledger")?.saturating_sub(before);
        if rows >= answered {
            return Ok(rows);
        }
        if rows != last.0 {
            last = (rows, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(10) {
            return Ok(rows);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The soak's section of the report.
pub fn render(f: &SoakFigures) -> String {
    use std::fmt::Write;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let mut out = String::new();
    let _ = writeln!(out, "{HEADING}\n");
    let _ = writeln!(
        out,
        "Run on {} ({}). The gateway with every feature on for {} minutes (after a {} s warm-up) at {} requests/s, half the {:.0} requests/s it reached at full throughput, with {CONCURRENT_STREAMS} streamed completions open at any moment ({STREAM_CHUNKS} events {STREAM_INTERVAL_MS} ms apart each). Run by `tollgate-bench soak --minutes {} --out docs/benchmarks.md`; the full run keeps this section.\n",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        crate::report::machine(),
        f.minutes,
        f.warmup.as_secs(),
        f.rate,
        f.max_rps,
        f.minutes
    );
    let _ = writeln!(out, "| check | measured | |\n|---|---|---|");
    let _ = writeln!(
        out,
        "| no failed request | {} failed of {} requests and {} streams | {} |",
        f.failures(),
        f.load.requests,
        f.streams + f.streams_failed,
        verdict(f.failures() == 0)
    );
    let _ = writeln!(
        out,
        "| RSS at the end within 10 % of RSS after warm-up | {:.1} MiB vs {:.1} MiB ({:+.1} %) | {} |",
        mib(f.rss_end_kib),
        mib(f.rss_after_warmup_kib),
        100.0 * f.rss_growth(),
        verdict(f.rss_growth() <= 0.10)
    );
    let _ = writeln!(
        out,
        "| every answered request in the ledger | {} records for {} answered ({} abandoned by the load generator at the end) | {} |",
        f.ledger_rows,
        f.answered(),
        f.load.aborted,
        verdict(f.ledger_complete())
    );
    let _ = writeln!(
        out,
        "\nLatency over the whole run: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms; {:.0} requests/s held; CPU per request {:.1} µs. Peak RSS {:.1} MiB.\n",
        f.load.p50_us / 1000.0,
        f.load.p99_us / 1000.0,
        f.load.p999_us / 1000.0,
        f.load.rps,
        f.load.cpu_us_per_request,
        mib(f.rss_peak_kib)
    );
    let _ = writeln!(out, "| minute | RSS |\n|---|---|");
    for (minute, kib) in &f.rss_by_minute {
        let _ = writeln!(out, "| {minute} | {:.1} MiB |", mib(*kib));
    }
    out
}

/// `report` with the soak section of `previous` (an earlier report) in
/// place of its own, or appended: each run rewrites only what it measured.
pub fn merge(report: &str, previous: &str, section: Option<&str>) -> String {
    let kept = section.map(str::to_owned).or_else(|| extract(previous));
    let mut out = match extract_range(report) {
        Some((start, end)) => format!("{}{}", &report[..start], &report[end..]),
        None => report.to_owned(),
    };
    if let Some(section) = kept {
        if !out.ends_with("\n\n") {
            out.push('\n');
        }
        out.push_str(section.trim_end());
        out.push('\n');
    }
    out
}

fn extract(report: &str) -> Option<String> {
    extract_range(report).map(|(start, end)| report[start..end].to_owned())
}

/// Where the soak section starts and ends: at its heading, up to the next
/// heading of the same level or the end.
fn extract_range(report: &str) -> Option<(usize, usize)> {
    let start = report.find(&format!("\n{HEADING}\n")).map(|i| i + 1)?;
    let rest = &report[start + HEADING.len()..];
    let end = rest.find("\n## ").map_or(report.len(), |i| start + HEADING.len() + i + 1);
    Some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_report_keeps_the_previous_soak_section_and_a_soak_replaces_it() {
        let previous = "# B\n\n## (a) x\n\nold a\n\n## Soak\n\nold soak\n";
        let fresh = "# B\n\n## (a) x\n\nnew a\n";
        assert_eq!(merge(fresh, previous, None), "# B\n\n## (a) x\n\nnew a\n\n## Soak\n\nold soak\n");
        let soaked = merge(previous, previous, Some("## Soak\n\nnew soak\n"));
        assert_eq!(soaked, "# B\n\n## (a) x\n\nold a\n\n## Soak\n\nnew soak\n");
        assert_eq!(merge(fresh, "", None), fresh, "nothing to keep");
        let middle = "# B\n\n## Soak\n\ns\n\n## (z) y\n\nz\n";
        assert_eq!(merge(middle, "", Some("## Soak\n\nt\n")), "# B\n\n## (z) y\n\nz\n\n## Soak\n\nt\n");
    }
}
