//! Structured logs (JSON for machines, pretty for people) and, opt-in,
//! OpenTelemetry traces ([`traces`]).
//!
//! Span fields (the request id above all) are part of every event logged
//! inside a request, in both formats.

mod json;
pub mod traces;

use std::io::{BufWriter, Stdout};
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::{LogConfig, LogFormat};

/// Lines the writer thread may hold before new ones are dropped (and
/// counted). At about 300 bytes a line that is some 40 MiB at worst, and
/// several seconds of the access log at full load.
const QUEUED_LINES: usize = 128 * 1024;

/// The writer thread drains its queue into this buffer and flushes it each
/// time the queue runs empty, so a busy gateway writes many lines per
/// system call and an idle one still shows each line at once.
const STDOUT_BUFFER_BYTES: usize = 64 * 1024;

static DROPPED_LINES: OnceLock<ErrorCounter> = OnceLock::new();

/// Installs the global subscriber. Returns an error if one is already set.
///
/// Lines are written by a dedicated thread (`tollgate-log`), never by the
/// request workers: a write to stdout is a system call, and a blocked pipe
/// (a stalled log collector) must not stall requests. When the thread falls
/// `QUEUED_LINES` behind, further lines are dropped and counted
/// ([`dropped_log_lines`], exported as `tollgate_log_lines_dropped_total`).
/// Keep the returned guard alive until the process ends: dropping it
/// flushes the lines still queued.
pub fn init(config: &LogConfig) -> anyhow::Result<WorkerGuard> {
    let filter = EnvFilter::try_new(&config.level)?;
    let stdout: BufWriter<Stdout> = BufWriter::with_capacity(STDOUT_BUFFER_BYTES, std::io::stdout());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("tollgate-log")
        .finish(stdout);
    // A second `init` fails below without replacing the first writer.
    let _ = DROPPED_LINES.set(writer.error_counter());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_span_events(FmtSpan::NONE).with_writer(writer);
    let result = match config.format {
        LogFormat::Json => builder.fmt_fields(json::JsonFragment).event_format(json::JsonLine).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))?;
    Ok(guard)
}

/// Log lines dropped so far because the writer thread fell behind (zero
/// before [`init`], and in processes that log elsewhere, such as tests).
pub fn dropped_log_lines() -> u64 {
    DROPPED_LINES.get().map_or(0, |counter| u64::try_from(counter.dropped_lines()).unwrap_or(u64::MAX))
}
