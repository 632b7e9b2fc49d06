//! How the fake answers one request: defaults from the instance, overridden
//! per request by `x-fake-*` headers (so out-of-process clients such as the
//! Python SDK tests can choose), overridden by a fault queued through the
//! library API.

use std::time::Duration;

use http::HeaderMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorStyle {
    /// `{"error":{"message","type","param":null,"code"}}`
    OpenAi,
    /// CometAPI's shape: `type: comet_api_error`, `param: ""`, a request id in the message.
    Comet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a JSON error body.
    Status { status: u16, style: ErrorStyle },
    /// Answer `301 Moved Permanently` with an HTML body, as a wrong path does.
    Html301,
    /// Answer `200` with an HTML page.
    Html200,
    /// Close the connection without answering.
    Reset,
    /// Never answer (until the client gives up).
    Stall,
    /// Stream this many chunks, then cut the connection.
    DropMidStream { after_chunks: usize },
    /// Stream this many chunks, then stop sending without closing.
    StallMidStream { after_chunks: usize },
    /// Answer 400 as OpenAI does for a prompt longer than the model's
    /// context window (`context_length_exceeded`).
    ContextLength,
    /// Stream this many chunks, then end the response cleanly, without
    /// `finish_reason` or the end marker (`[DONE]`, `response.completed`).
    EndMidStream { after_chunks: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageStyle {
    /// `completion_tokens` includes reasoning tokens, listed in the details.
    OpenAi,
    /// Thinking tokens appear only in `total_tokens`, as some Gemini
    /// OpenAI-compatible layers report them.
    GeminiHiddenThinking,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    /// Delay before the response headers.
    pub latency: Duration,
    /// Content chunks in a stream (per choice).
    pub chunks: usize,
    pub chunk_interval: Duration,
    /// Whether usage is reported (in the body, or in the stream when asked).
    pub report_usage: bool,
    pub usage_style: UsageStyle,
    pub reasoning_tokens: u64,
    pub cached_tokens: u64,
    /// Prompt tokens written to the cache (Anthropic's `cache_creation_input_tokens`).
    pub cache_write_tokens: u64,
    /// Gemini's `toolUsePromptTokenCount`.
    pub tool_prompt_tokens: u64,
    pub fault: Option<Fault>,
}

impl Default for Scenario {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            chunks: 3,
            chunk_interval: Duration::ZERO,
            report_usage: true,
            usage_style: UsageStyle::OpenAi,
            reasoning_tokens: 0,
            cached_tokens: 0,
            cache_write_tokens: 0,
            tool_prompt_tokens: 0,
            fault: None,
        }
    }
}

#[derive(Debug)]
pub struct BadDirective(pub String);

impl std::fmt::Display for BadDirective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Scenario {
    /// Applies `x-fake-*` request headers. Unknown values are an error so a
    /// typo in a test does not pass silently.
    pub fn apply_headers(&mut self, headers: &HeaderMap) -> Result<(), BadDirective> {
        for (name, value) in headers {
            let Some(key) = name.as_str().strip_prefix("x-fake-") else {
                continue;
            };
            let value = value.to_str().map_err(|_| BadDirective(format!("{name} is not ASCII")))?;
            self.apply(name.as_str(), key, value)?;
        }
        Ok(())
    }

    /// Applies `x-fake-*` entries of the request body's `metadata` object,
    /// for clients behind a proxy that forwards no unknown headers but the
    /// body as it is (a peer gateway in the benchmark).
    pub fn apply_metadata(&mut self, body: &[u8]) -> Result<(), BadDirective> {
        // Most bodies carry none: look before parsing.
        if !body.windows(8).any(|w| w == b"\"x-fake-") {
            return Ok(());
        }
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
            return Ok(());
        };
        let Some(metadata) = value.get("metadata").and_then(|m| m.as_object()) else {
            return Ok(());
        };
        for (name, value) in metadata {
            let Some(key) = name.strip_prefix("x-fake-") else {
                continue;
            };
            let value = value.as_str().ok_or_else(|| BadDirective(format!("metadata {name} is not a string")))?;
            self.apply(name, key, value)?;
        }
        Ok(())
    }

    /// One directive: `key` is `name` without its `x-fake-` prefix.
    fn apply(&mut self, name: &str, key: &str, value: &str) -> Result<(), BadDirective> {
        let bad = || BadDirective(format!("bad value {value:?} for {name}"));
        let millis = |v: &str| v.parse::<u64>().map(Duration::from_millis).map_err(|_| bad());
        let number = |v: &str| v.parse::<u64>().map_err(|_| bad());
        match key {
            "latency-ms" => self.latency = millis(value)?,
            "chunks" => self.chunks = number(value)? as usize,
            "chunk-interval-ms" => self.chunk_interval = millis(value)?,
            "usage" => {
                self.report_usage = match value {
                    "omit" => false,
                    "report" => true,
                    _ => return Err(bad()),
                }
            }
            "usage-style" => {
                self.usage_style = match value {
                    "openai" => UsageStyle::OpenAi,
                    "gemini" => UsageStyle::GeminiHiddenThinking,
                    _ => return Err(bad()),
                }
            }
            "reasoning-tokens" => self.reasoning_tokens = number(value)?,
            "cached-tokens" => self.cached_tokens = number(value)?,
            "cache-write-tokens" => self.cache_write_tokens = number(value)?,
            "tool-prompt-tokens" => self.tool_prompt_tokens = number(value)?,
            "fault" => self.fault = Some(parse_fault(value).ok_or_else(bad)?),
            _ => return Err(BadDirective(format!("unknown directive {name}"))),
        }
        Ok(())
    }
}

/// `status:503`, `status:429:comet`, `html301`, `html200`, `reset`, `stall`,
/// `drop-after:2`, `stall-after:2`, `end-after:2`, `context-length`.
pub fn parse_fault(text: &str) -> Option<Fault> {
    let mut parts = text.split(':');
    let fault = match parts.next()? {
        "status" => {
            let status = parts.next()?.parse().ok()?;
            let style = match parts.next() {
                None | Some("openai") => ErrorStyle::OpenAi,
                Some("comet") => ErrorStyle::Comet,
                Some(_) => return None,
            };
            Fault::Status { status, style }
        }
        "html301" => Fault::Html301,
        "html200" => Fault::Html200,
        "reset" => Fault::Reset,
        "stall" => Fault::Stall,
        "drop-after" => Fault::DropMidStream { after_chunks: parts.next()?.parse().ok()? },
        "stall-after" => Fault::StallMidStream { after_chunks: parts.next()?.parse().ok()? },
        "end-after" => Fault::EndMidStream { after_chunks: parts.next()?.parse().ok()? },
        "context-length" => Fault::ContextLength,
        _ => return None,
    };
    parts.next().is_none().then_some(fault)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_fault_form() {
        assert_eq!(parse_fault("status:503"), Some(Fault::Status { status: 503, style: ErrorStyle::OpenAi }));
        assert_eq!(parse_fault("status:429:comet"), Some(Fault::Status { status: 429, style: ErrorStyle::Comet }));
        assert_eq!(parse_fault("drop-after:2"), Some(Fault::DropMidStream { after_chunks: 2 }));
        assert_eq!(parse_fault("reset"), Some(Fault::Reset));
        assert_eq!(parse_fault("end-after:2"), Some(Fault::EndMidStream { after_chunks: 2 }));
        assert_eq!(parse_fault("reset:extra"), None);
        assert_eq!(parse_fault("nonsense"), None);
    }

    #[test]
    fn headers_override_defaults_and_typos_are_errors() {
        let mut headers = HeaderMap::new();
        headers.insert("x-fake-chunks", "7".parse().unwrap());
        headers.insert("x-fake-usage", "omit".parse().unwrap());
        let mut s = Scenario::default();
        s.apply_headers(&headers).unwrap();
        assert_eq!(s.chunks, 7);
        assert!(!s.report_usage);
        headers.insert("x-fake-chunkz", "1".parse().unwrap());
        assert!(s.apply_headers(&headers).is_err());
    }

    #[test]
    fn metadata_in_the_body_steers_like_headers() {
        let mut s = Scenario::default();
        let body = br#"{"model":"m","metadata":{"x-fake-chunks":"9","x-fake-chunk-interval-ms":"40","other":"x"}}"#;
        s.apply_metadata(body).unwrap();
        assert_eq!((s.chunks, s.chunk_interval), (9, Duration::from_millis(40)));
        assert!(s.apply_metadata(br#"{"metadata":{"x-fake-chunkz":"1"}}"#).is_err());
        let before = s.chunks;
        s.apply_metadata(br#"{"model":"m","messages":[]}"#).unwrap();
        assert_eq!(s.chunks, before, "a body without directives changes nothing");
    }
}
