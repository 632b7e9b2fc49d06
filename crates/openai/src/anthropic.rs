//! Anthropic's Messages API, as far as the gateway reads it: the request's
//! model, stream flag, output limit and thinking budget; the answer's
//! `usage` (in a stream, spread over `message_start` and `message_delta`);
//! the end of a stream; the error envelope.

use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::json;

use crate::usage::{USAGE_KEY, find_key};
use crate::{SseEvent, Usage};

#[derive(Debug, Default, Deserialize)]
struct Thinking<'a> {
    #[serde(borrow, default, rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    budget_tokens: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(borrow, default)]
    thinking: Option<Thinking<'a>>,
}

/// The members of a Messages request the gateway reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestPeek {
    pub model: Option<String>,
    pub stream: bool,
    pub max_tokens: Option<u64>,
    /// `thinking.budget_tokens` when `thinking.type` is `enabled`.
    pub thinking_budget: Option<i64>,
}

impl RequestPeek {
    /// Reads a request body, which must be a JSON object.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        // serde would read a struct from an array too: only an object is a request.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err("the request body must be a JSON object".to_owned());
        }
        let raw: RawRequest<'_> =
            serde_json::from_slice(body).map_err(|e| format!("the request body is not valid: {e}"))?;
        let thinking = raw.thinking.unwrap_or_default();
        Ok(Self {
            model: raw.model.map(|m| m.into_owned()),
            stream: raw.stream.unwrap_or(false),
            max_tokens: raw.max_tokens,
            thinking_budget: (thinking.kind.as_deref() == Some("enabled")).then_some(thinking.budget_tokens).flatten(),
        })
    }
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
struct RawUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl RawUsage {
    /// Fields `later` has replace this one's (a stream's `message_delta`
    /// carries the final output count, and may repeat the input side).
    fn merge(&mut self, later: RawUsage) {
        self.input_tokens = later.input_tokens.or(self.input_tokens);
        self.output_tokens = later.output_tokens.or(self.output_tokens);
        self.cache_creation_input_tokens = later.cache_creation_input_tokens.or(self.cache_creation_input_tokens);
        self.cache_read_input_tokens = later.cache_read_input_tokens.or(self.cache_read_input_tokens);
    }

    /// Anthropic's `input_tokens` leaves out cache reads and writes; the
    /// gateway's prompt is all input, with reads and writes counted apart
    /// so each gets its own price.
    fn usage(self) -> Usage {
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let write = self.cache_creation_input_tokens.unwrap_or(0);
        let prompt = self.input_tokens.unwrap_or(0).saturating_add(read).saturating_add(write);
        let completion = self.output_tokens.unwrap_or(0);
        Usage {
            prompt,
            completion,
            total: prompt.saturating_add(completion),
            reasoning: 0,
            cached: read,
            cache_write: write,
        }
    }
}

fn raw_usage(bytes: &[u8]) -> Option<RawUsage> {
    let (_, value_start) = find_key(bytes, &USAGE_KEY, true)?;
    let mut stream = serde_json::Deserializer::from_slice(&bytes[value_start..]).into_iter::<RawUsage>();
    stream.next()?.ok()
}

/// The `usage` of a whole Message.
pub fn find_usage(bytes: &[u8]) -> Option<Usage> {
    raw_usage(bytes).map(RawUsage::usage)
}

/// Usage gathered over a stream's events.
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamUsage {
    seen: Option<RawUsage>,
}

impl StreamUsage {
    /// Takes the usage an event carries, if any; returns whether it had one.
    pub fn observe(&mut self, event: &[u8]) -> bool {
        let Some(raw) = raw_usage(event) else { return false };
        match &mut self.seen {
            Some(seen) => seen.merge(raw),
            None => self.seen = Some(raw),
        }
        true
    }

    /// The usage so far; `complete` only once `message_delta` gave the
    /// final output count.
    pub fn usage(&self) -> Option<Usage> {
        self.seen.map(RawUsage::usage)
    }
}

// Searchers built once: building one costs more than a search of an event.
static MESSAGE_DELTA: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"message_delta\""));
static MESSAGE_STOP: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\"message_stop\""));

/// Whether a stream event is the `message_delta` with the final usage.
pub fn is_message_delta(event: &SseEvent) -> bool {
    event.event_name() == Some("message_delta") || MESSAGE_DELTA.find(event.as_bytes()).is_some()
}

/// A stream is complete at `message_stop`.
pub fn is_end(event: &SseEvent) -> bool {
    if let Some(name) = event.event_name() {
        return name == "message_stop";
    }
    MESSAGE_STOP.find(event.as_bytes()).is_some()
}

/// The error `type` Anthropic pairs with an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ if status >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// `{"type":"error","error":{"type","message"}}`, as Anthropic answers.
pub fn error_body(status: u16, message: &str) -> Vec<u8> {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}}).to_string().into_bytes()
}

/// The same envelope as a named stream event, for a failure mid-stream.
pub fn error_event(status: u16, message: &str) -> Vec<u8> {
    let mut event = b"event: error\ndata: ".to_vec();
    event.extend_from_slice(&error_body(status, message));
    event.extend_from_slice(b"\n\n");
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_read() {
        let peek = RequestPeek::parse(
            br#"{"model":"claude-sonnet-4","max_tokens":1024,"stream":true,"thinking":{"type":"enabled","budget_tokens":2048},"messages":[]}"#,
        )
        .unwrap();
        assert_eq!(peek.model.as_deref(), Some("claude-sonnet-4"));
        assert!(peek.stream);
        assert_eq!(peek.max_tokens, Some(1024));
        assert_eq!(peek.thinking_budget, Some(2048));
        let off = RequestPeek::parse(br#"{"model":"m","thinking":{"type":"disabled","budget_tokens":5}}"#).unwrap();
        assert_eq!(off.thinking_budget, None);
        assert!(RequestPeek::parse(b"[]").is_err());
    }

    #[test]
    fn cache_reads_and_writes_are_input_counted_apart() {
        let body = br#"{"id":"msg","content":[{"type":"text","text":"\"usage\": trap"}],
            "usage":{"input_tokens":10,"output_tokens":7,"cache_creation_input_tokens":100,"cache_read_input_tokens":50}}"#;
        let usage = find_usage(body).unwrap();
        assert_eq!(usage, Usage { prompt: 160, completion: 7, total: 167, reasoning: 0, cached: 50, cache_write: 100 });
    }

    #[test]
    fn stream_usage_merges_start_and_delta() {
        let mut usage = StreamUsage::default();
        assert!(usage.observe(
            br#"{"type":"message_start","message":{"model":"m","usage":{"input_tokens":12,"cache_read_input_tokens":3,"output_tokens":1}}}"#
        ));
        assert!(!usage.observe(br#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"hi"}}"#));
        assert!(
            usage.observe(
                br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":42}}"#
            )
        );
        assert_eq!(
            usage.usage().unwrap(),
            Usage { prompt: 15, completion: 42, total: 57, reasoning: 0, cached: 3, cache_write: 0 }
        );
    }

    #[test]
    fn errors_have_anthropics_shape() {
        let body: serde_json::Value = serde_json::from_slice(&error_body(429, "slow down")).unwrap();
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert!(String::from_utf8(error_event(529, "busy")).unwrap().starts_with("event: error\ndata: {"));
    }
}
