//! Accounting on a relayed SSE stream.
//!
//! Every event passes through [`StreamTap::on_event`], which looks for the
//! bytes `"usage"` (a SIMD substring search) and parses only the events that
//! have them. When the gateway asked the upstream for usage on the client's
//! behalf, the usage-only chunk is dropped and the `"usage":null` members are
//! removed, so the client sees the stream it asked for. Until usage arrives,
//! an even sample of the events is kept (see [`StreamSample`]) for a token
//! estimate should it never come.
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

use bytes::Bytes;
use tollgate_openai::usage::{has_empty_choices, null_usage_member, remove_member};
use tollgate_openai::{Api, SseEvent, Usage, UsageField, anthropic, find_model, find_usage, gemini};

use super::sample::StreamSample;
use super::{Exchange, Outcome};
use crate::proxy::relay::Shape;

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
    /// Events kept for an estimate, should usage never come.
    sample: StreamSample,
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
            sample: StreamSample::default(),
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
                        self.sample.discard();
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
                        self.sample.discard();
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
                self.sample.discard();
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
            self.sample.offer(event);
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
            sample: std::mem::take(&mut self.sample),
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
    sample: StreamSample,
    upstream_model: Option<String>,
    first_event: Option<Duration>,
    status: u16,
}

impl StreamEnd {
    fn close(mut self) {
        let estimated_output =
            if self.usage.is_none() { std::mem::take(&mut self.sample).estimate_tokens() } else { 0 };
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
