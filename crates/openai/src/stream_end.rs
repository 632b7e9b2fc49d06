//! How each streaming API says a stream is complete.
//!
//! A stream that ends without its protocol's end marker was cut short by the
//! upstream, even when the connection closed cleanly: relaying it as a
//! success would leave the client with half an answer and no error.

use std::sync::LazyLock;

use serde::Deserialize;

use crate::SseEvent;

/// The end marker a stream must carry to be complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndMarker {
    /// Chat completions and completions: `data: [DONE]`.
    Done,
    /// Responses: a terminal event, `response.completed`, `response.failed`
    /// or `response.incomplete` (the last two are complete answers that say
    /// why they stopped).
    ResponseTerminal,
    /// Gemini: a chunk with a candidate's `finishReason`.
    GeminiFinish,
    /// Anthropic: `message_stop`.
    MessageStop,
}

const RESPONSE_TERMINAL: [&str; 3] = ["response.completed", "response.failed", "response.incomplete"];

#[derive(Deserialize)]
struct Typed<'a> {
    #[serde(borrow, rename = "type")]
    kind: Option<std::borrow::Cow<'a, str>>,
}

impl EndMarker {
    /// The marker streams of `endpoint` end with; `None` for endpoints that
    /// do not stream.
    pub fn for_endpoint(endpoint: &str) -> Option<Self> {
        match endpoint {
            "/v1/chat/completions" | "/v1/completions" => Some(Self::Done),
            "/v1/responses" => Some(Self::ResponseTerminal),
            _ => None,
        }
    }

    /// Whether `event` is this marker.
    pub fn is_end(self, event: &SseEvent) -> bool {
        match self {
            Self::Done => event.is_done(),
            Self::GeminiFinish => crate::gemini::is_end(event),
            Self::MessageStop => crate::anthropic::is_end(event),
            Self::ResponseTerminal => {
                if let Some(name) = event.event_name() {
                    return RESPONSE_TERMINAL.contains(&name);
                }
                // Without an `event:` line, the data's own `type` says it.
                let Some(data) = event.data() else { return false };
                static RESPONSE_PREFIX: LazyLock<memchr::memmem::Finder<'static>> =
                    LazyLock::new(|| memchr::memmem::Finder::new(b"response."));
                if RESPONSE_PREFIX.find(&data).is_none() {
                    return false;
                }
                serde_json::from_slice::<Typed<'_>>(&data)
                    .ok()
                    .and_then(|t| t.kind)
                    .is_some_and(|kind| RESPONSE_TERMINAL.contains(&kind.as_ref()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SseScanner;
    use bytes::Bytes;

    fn event(text: &'static str) -> SseEvent {
        let mut out = Vec::new();
        SseScanner::new(1 << 20).push(Bytes::from_static(text.as_bytes()), &mut out).unwrap();
        out.pop().unwrap()
    }

    #[test]
    fn chat_streams_end_with_done() {
        assert!(EndMarker::Done.is_end(&event("data: [DONE]\n\n")));
        assert!(!EndMarker::Done.is_end(&event("data: {\"choices\":[]}\n\n")));
    }

    #[test]
    fn response_streams_end_with_a_terminal_event_named_either_way() {
        let m = EndMarker::ResponseTerminal;
        assert!(m.is_end(&event("event: response.completed\ndata: {\"type\":\"response.completed\"}\n\n")));
        assert!(m.is_end(&event("data: {\"type\": \"response.failed\", \"response\": {}}\n\n")));
        assert!(m.is_end(&event("event: response.incomplete\ndata: {}\n\n")));
        assert!(
            !m.is_end(&event("event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\"}\n\n"))
        );
        assert!(!m.is_end(&event("data: {\"type\":\"response.created\"}\n\n")));
        assert!(!m.is_end(&event("data: [DONE]\n\n")));
    }

    #[test]
    fn endpoints_map_to_their_markers() {
        assert_eq!(EndMarker::for_endpoint("/v1/chat/completions"), Some(EndMarker::Done));
        assert_eq!(EndMarker::for_endpoint("/v1/responses"), Some(EndMarker::ResponseTerminal));
        assert_eq!(EndMarker::for_endpoint("/v1/embeddings"), None);
    }
}
