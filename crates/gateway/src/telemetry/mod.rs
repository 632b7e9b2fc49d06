//! Structured logs (JSON for machines, pretty for people) and, opt-in,
//! OpenTelemetry traces ([`traces`]).
//!
//! Span fields (the request id above all) are part of every event logged
//! inside a request, in both formats.

mod json;
pub mod traces;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Returns an error if one is already set.
pub fn init(config: &LogConfig) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&config.level)?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_span_events(FmtSpan::NONE);
    let result = match config.format {
        LogFormat::Json => builder.fmt_fields(json::JsonFragment).event_format(json::JsonLine).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot install the log subscriber: {e}"))
}
