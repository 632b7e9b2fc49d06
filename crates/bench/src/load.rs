//! Runs `oha`, an open-loop load generator: at a fixed rate with latency
//! correction (a slow response does not delay the requests scheduled after
//! it, so queueing shows in the figures), or flat out for throughput.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

use crate::procs::{Cpus, cpu_us, pinned, which};
use crate::stack::Target;

pub const CHAT_BODY: &str = r#"{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"Say hello"}]}"#;

/// What one oha run measured. Latencies in microseconds.
#[derive(Debug, Clone, Copy)]
pub struct LoadFigures {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub success_rate: f64,
    pub requests: u64,
    /// CPU time the target used per request (user and system, all threads).
    pub cpu_us_per_request: f64,
    /// Requests that got no answer (connection errors, timeouts), apart from
    /// those still in flight when the run's time was up.
    pub errors: u64,
    /// Requests still in flight when the run's time was up (oha drops them;
    /// the target may have served them).
    pub aborted: u64,
    /// The most frequent answer other than 200, and how many got it.
    pub other_status: Option<(u16, u64)>,
}

pub fn oha() -> anyhow::Result<PathBuf> {
    which("oha")
        .or_else(|| {
            let home = std::env::var_os("HOME")?;
            Some(PathBuf::from(home).join(".cargo/bin/oha")).filter(|p| p.is_file())
        })
        .context("oha is not installed (scripts/ensure-services installs it: cargo install oha --locked)")
}

/// `rate`: requests per second, or `None` for as fast as `connections` allow.
pub async fn run(
    cpus: &Cpus,
    target: &Target,
    duration: Duration,
    rate: Option<u32>,
    connections: u32,
) -> anyhow::Result<LoadFigures> {
    let mut cmd = pinned(cpus.load.as_deref(), &oha()?);
    cmd.args(["--no-tui", "--output-format", "json", "-m", "POST", "-H", "content-type: application/json"])
        .args(["-d", CHAT_BODY])
        .arg("-z")
        .arg(format!("{}ms", duration.as_millis()))
        .arg("-c")
        .arg(connections.to_string());
    if let Some(rate) = rate {
        cmd.arg("-q").arg(rate.to_string()).arg("--latency-correction");
    }
    if let Some(key) = &target.key {
        cmd.arg("-H").arg(format!("authorization: Bearer {key}"));
    }
    cmd.arg(target.chat_url()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let cpu_before = cpu_us(target.pid);
    let out = tokio::task::spawn_blocking(move || cmd.output()).await??;
    let cpu_used = cpu_us(target.pid).saturating_sub(cpu_before);
    if !out.status.success() {
        bail!("oha failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let report: Value = serde_json::from_slice(&out.stdout).context("oha's JSON output")?;
    let seconds = |v: &Value| v.as_f64().unwrap_or(f64::NAN) * 1e6;
    let percentiles = &report["latencyPercentiles"];
    let statuses = report["statusCodeDistribution"].as_object().context("no status codes in oha's output")?;
    let requests: u64 = statuses.values().filter_map(Value::as_u64).sum();
    let ok = statuses.get("200").and_then(Value::as_u64).unwrap_or(0);
    let other_status = statuses
        .iter()
        .filter(|(code, _)| code.as_str() != "200")
        .filter_map(|(code, n)| Some((code.parse::<u16>().ok()?, n.as_u64()?)))
        .max_by_key(|&(_, n)| n);
    let mut errors = 0;
    let mut aborted = 0;
    for (error, n) in report["errorDistribution"].as_object().into_iter().flatten() {
        let n = n.as_u64().unwrap_or(0);
        if error.contains("deadline") { aborted += n } else { errors += n }
    }
    Ok(LoadFigures {
        rps: report["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        p50_us: seconds(&percentiles["p50"]),
        p99_us: seconds(&percentiles["p99"]),
        p999_us: seconds(&percentiles["p99.9"]),
        success_rate: if requests == 0 { 0.0 } else { ok as f64 / requests as f64 },
        requests,
        cpu_us_per_request: if requests == 0 { 0.0 } else { cpu_used as f64 / requests as f64 },
        errors,
        aborted,
        other_status,
    })
}
