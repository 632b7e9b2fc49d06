//! Structured logs (JSON for machines, pretty for people) and, opt-in,
//! OpenTelemetry traces ([`traces`]).
//!
//! Span fields (the request id above all) are part of every event logged
//! inside a request, in both formats.

mod json;
mod log_writer;
pub mod traces;

use std::io::BufWriter;
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

pub use self::log_writer::LogGuard;
use crate::config::{LogConfig, LogFormat};

/// The writer thread's buffer in front of stdout: a batch of lines goes out
/// in as few system calls as its size allows.
const STDOUT_BUFFER_BYTES: usize = 64 * 1024;

static WRITER: OnceLock<log_writer::LineWriter> = OnceLock::new();

/// Installs the global subscriber. Returns an error if one is already set.
///
/// Lines are written by a dedicated thread (`tollgate-log`, see
/// [`log_writer`]), never by the request workers: a write to stdout is a
/// system call, and a blocked pipe (a stalled log collector) must not stall
/// requests. Lines past what the queue holds are dropped and counted
/// ([`dropped_log_lines`], exported as `tollgate_log_lines_dropped_total`).
/// Keep the returned guard alive until the process ends: dropping it writes
/// the lines still queued.
pub fn init(config: &LogConfig) -> anyhow::Result<LogGuard> {
    let filter = EnvFilter::try_new(&config.level)?;
    let stdout = BufWriter::with_capacity(STDOUT_BUFFER_BYTES, std::io::stdout());
    let (writer, guard) = log_writer::start(stdout)?;
    // A second `init` fails below without replacing the first writer.
    let _ = WRITER.set(writer.clone());
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
    WRITER.get().map_or(0, log_writer::LineWriter::dropped_lines)
}
