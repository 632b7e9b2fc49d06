//! The OpenAI error envelope: `{"error":{"message","type","param","code"}}`.
//!
//! The official SDKs choose the exception class from the HTTP status and show
//! `message`; `type` and `code` are what programs match on, so they are stable
//! strings and never carry internal detail.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Always serialised (as `null` when absent): some clients index it directly.
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
}

impl ErrorEnvelope {
    pub fn new(message: impl Into<String>, kind: impl Into<String>, code: impl Into<String>) -> Self {
        Self { error: ErrorBody { message: message.into(), kind: kind.into(), param: None, code: Some(code.into()) } }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.error.param = Some(param.into());
        self
    }

    /// The envelope as JSON bytes. Serialising a struct of strings cannot fail,
    /// but the fallback keeps this total rather than panicking.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| {
            br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":"internal_error"}}"#
                .to_vec()
        })
    }

    /// The envelope as one SSE event (`data: {...}\n\n`), which makes the
    /// SDKs raise an `APIError` in the middle of a stream.
    pub fn to_sse_event(&self) -> Vec<u8> {
        let json = self.to_json_bytes();
        let mut out = Vec::with_capacity(json.len() + 8);
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(&json);
        out.extend_from_slice(b"\n\n");
        out
    }

    /// Whether `bytes` is a JSON object with an `error` object in it: the shape
    /// OpenAI-compatible upstreams use for their errors.
    pub fn looks_like_error(bytes: &[u8]) -> bool {
        #[derive(Deserialize)]
        struct Probe {
            error: serde::de::IgnoredAny,
        }
        serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| {
            let _ = p.error;
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_null_param_and_type_field() {
        let json =
            String::from_utf8(ErrorEnvelope::new("bad", "invalid_request_error", "invalid_json").to_json_bytes())
                .unwrap();
        assert_eq!(
            json,
            r#"{"error":{"message":"bad","type":"invalid_request_error","param":null,"code":"invalid_json"}}"#
        );
    }

    #[test]
    fn sse_event_is_one_data_line_and_a_blank_line() {
        let ev = ErrorEnvelope::new("gone", "upstream_error", "upstream_disconnected").to_sse_event();
        assert!(ev.starts_with(b"data: {\"error\""));
        assert!(ev.ends_with(b"}\n\n"));
    }

    #[test]
    fn recognises_upstream_error_bodies() {
        assert!(ErrorEnvelope::looks_like_error(
            br#"{"error":{"message":"x (request id: 1)","type":"comet_api_error","param":"","code":"y"}}"#
        ));
        assert!(ErrorEnvelope::looks_like_error(br#"{"error":"plain string"}"#));
        assert!(!ErrorEnvelope::looks_like_error(b"<html>moved</html>"));
        assert!(!ErrorEnvelope::looks_like_error(br#"{"id":"x"}"#));
    }
}
