//! Accounting on a relayed SSE stream.
//!
//! Every event passes through [`StreamTap::on_event`], which looks for the
//! bytes `"usage"` (a SIMD substring search) and parses only the events that
//! have them. When the gateway asked the upstream for usage on the client's
//! behalf, the usage-only chunk is dropped and the `"usage":null` members are
//! removed, so the client sees the stream it asked for. Until usage arrives,
//! events are kept (up to a bound) for a token estimate should it never come.
//!
//! Gemini and Anthropic streams are read in their own vocabulary: Gemini's
//! `usageMetadata` (final on the chunk with `finishReason`), Anthropic's
//! usage spread over `message_start` (input) and `message_delta` (output).
//! When such a stream stops before its final usage, the input side it did
//! report is kept and the output is estimated (the record is flagged).
//!
//! The tap records its exchange exactly once: at the end of the stream, on
//! an upstream failure, or, if the client goes away, when it is dropped.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tollgate_openai::usage::{has_empty_choices, null_usage_member, remove_member};
use tollgate_openai::{Api, SseEvent, SseScanner, Usage, UsageField, anthropic, find_model, find_usage, gemini};

use super::{Exchange, Outcome, estimate};
use crate::proxy::relay::Shape;

/// Event bytes kept for estimating output when usage never comes. Usage
/// normally arrives only at a stream's end, so every open stream holds up to
/// this much: small, and past it the estimate is scaled by the bytes seen.
const MAX_KEPT_BYTES: usize = 64 * 1024;

#[derive(Debug)]
pub struct StreamTap {
    exchange: Option<Exchange>,
    api: Api,
    /// The gateway injected `include_usage`: hide its effects.
    strip_usage: bool,
    /// The final usage of the stream.
    usage: Option<Usage>,
    /// Usage reported before the final count (Gemini's early chunks,
    /// Anthropic's `message_start`): the input side of a stream cut short.
    partial: Option<Usage>,
    anthropic: anthropic::StreamUsage,
    upstream_model: Option<String>,
    first_event: Option<Duration>,
    /// Events kept for an estimate, copied end to end into one buffer: an
    /// event is a slice of the upstream read buffer it arrived in (often
    /// hundreds of KB), and holding the slice would pin that whole buffer
    /// for the stream's lifetime.
    kept: BytesMut,
    /// Bytes of every event that could have been kept (kept or not).
    seen: u64,
    status: u16,
}

impl StreamTap {
    pub fn new(exchange: Exchange, shape: Shape, status: u16) -> Self {
        Self {
            exchange: Some(exchange),
            api: shape.api,
            strip_usage: shape.strip_usage,
            usage: None,
            partial: None,
            anthropic: anthropic::StreamUsage::default(),
            upstream_model: None,
            first_event: None,
            kept: BytesMut::new(),
            seen: 0,
            status,
        }
    }

    /// Returns the bytes to forward for this event, or `None` to drop it.
    pub fn on_event(&mut self, event: SseEvent) -> Option<Bytes> {
        if self.first_event.is_none()
            && let Some(exchange) = &self.exchange
        {
            self.first_event = Some(exchange.started().elapsed());
        }
        match self.api {
            Api::OpenAi => self.on_openai_event(event),
            Api::Gemini => {
                let bytes = event.as_bytes();
                if self.upstream_model.is_none() {
                    self.upstream_model = gemini::find_model(bytes);
                }
                if let Some(usage) = gemini::find_usage(bytes) {
                    if gemini::is_end(&event) {
                        self.usage = Some(usage);
                        self.kept.clear();
                    } else {
                        self.partial = Some(usage);
                    }
                }
                self.keep(&event);
                Some(event.into_bytes())
            }
            Api::Anthropic => {
                let bytes = event.as_bytes();
                if self.upstream_model.is_none() {
                    self.upstream_model = find_model(bytes);
                }
                if self.anthropic.observe(bytes) {
                    if anthropic::is_message_delta(&event) {
                        self.usage = self.anthropic.usage();
                        self.kept.clear();
                    } else {
                        self.partial = self.anthropic.usage();
                    }
                }
                self.keep(&event);
                Some(event.into_bytes())
            }
        }
    }

    fn on_openai_event(&mut self, event: SseEvent) -> Option<Bytes> {
        let bytes = event.as_bytes();
        if self.upstream_model.is_none() && !event.is_done() {
            self.upstream_model = find_model(bytes);
        }
        match find_usage(bytes) {
            UsageField::Absent => {}
            UsageField::Null => {
                if self.strip_usage
                    && let Some((start, end)) = null_usage_member(bytes)
                {
                    let stripped = Bytes::from(remove_member(bytes, start, end));
                    self.keep(&event);
                    return Some(stripped);
                }
            }
            UsageField::Present(usage, start, end) => {
                self.usage = Some(usage);
                self.kept.clear();
                if self.strip_usage {
                    if has_empty_choices(bytes) {
                        return None;
                    }
                    // Usage riding on a chunk with content: keep the content.
                    return Some(Bytes::from(remove_member(bytes, start, end)));
                }
                return Some(event.into_bytes());
            }
        }
        self.keep(&event);
        Some(event.into_bytes())
    }

    fn keep(&mut self, event: &SseEvent) {
        if self.usage.is_none() {
            self.seen = self.seen.saturating_add(event.as_bytes().len() as u64);
            if self.kept.len() < MAX_KEPT_BYTES {
                self.kept.extend_from_slice(event.as_bytes());
            }
        }
    }

    /// The stream ended normally.
    pub fn finish(&mut self) {
        self.close(None);
    }

    /// The stream ended on an upstream failure (`code` as in the error event).
    pub fn fail(&mut self, code: &str) {
        self.close(Some(format!("upstream:{code}")));
    }

    fn close(&mut self, error_class: Option<String>) {
        let Some(exchange) = self.exchange.take() else { return };
        let ending = StreamEnd {
            exchange,
            error_class,
            usage: self.usage,
            partial: self.partial,
            kept: std::mem::take(&mut self.kept),
            seen: self.seen,
            upstream_model: self.upstream_model.take(),
            first_event: self.first_event,
            status: self.status,
        };
        if ending.usage.is_some() {
            ending.close();
        } else {
            // The output is counted from the kept events: tokenizing is off
            // the request workers (this may be a `Drop`, which cannot await).
            let estimates = ending.exchange.accounting().estimates.clone();
            estimates.spawn(move || ending.close());
        }
    }
}

/// What a stream's record is closed with.
struct StreamEnd {
    exchange: Exchange,
    error_class: Option<String>,
    usage: Option<Usage>,
    partial: Option<Usage>,
    kept: BytesMut,
    seen: u64,
    upstream_model: Option<String>,
    first_event: Option<Duration>,
    status: u16,
}

impl StreamEnd {
    /// Output tokens estimated from the kept events.
    fn estimate_output(&mut self) -> u64 {
        let mut events = Vec::new();
        let mut scanner = SseScanner::new(usize::MAX);
        // Whole events only were kept, so the scanner cannot fail here.
        let kept = std::mem::take(&mut self.kept).freeze();
        let kept_bytes = kept.len() as u64;
        if scanner.push(kept, &mut events).is_err() {
            return 0;
        }
        let counted = estimate::stream_tokens(&events);
        // Past the kept bytes, the rest of the stream is assumed to be like
        // its beginning.
        if kept_bytes == 0 || self.seen <= kept_bytes {
            return counted;
        }
        u64::try_from(u128::from(counted) * u128::from(self.seen) / u128::from(kept_bytes)).unwrap_or(u64::MAX)
    }

    fn close(mut self) {
        let estimated_output = if self.usage.is_none() { self.estimate_output() } else { 0 };
        // Cut short after the input was counted: that count, and the output
        // estimated from what was relayed.
        let (usage, usage_estimated) = match (self.usage, self.partial) {
            (Some(usage), _) => (Some(usage), false),
            (None, Some(partial)) => {
                let completion = estimated_output;
                let total = partial.prompt.saturating_add(completion);
                (Some(Usage { completion, total, reasoning: 0, ..partial }), true)
            }
            (None, None) => (None, false),
        };
        self.exchange.close(Outcome {
            status: self.status,
            error_class: self.error_class,
            usage,
            usage_estimated,
            upstream_model: self.upstream_model,
            reached_upstream: true,
            estimated_output,
            first_event: self.first_event,
        });
    }
}

impl Drop for StreamTap {
    /// The client went away before the end: bill what was produced (an
    /// estimate unless usage already arrived; nothing for output if no event
    /// came at all).
    fn drop(&mut self) {
        if self.exchange.is_some() {
            self.close(Some("client:disconnected".to_owned()));
        }
    }
}
