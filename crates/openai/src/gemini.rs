//! Google's Gemini API (`generateContent`), as far as the gateway reads it:
//! the request's model (in the path), output limit and thinking budget; the
//! answer's `usageMetadata`; the end of a stream; the error envelope.

use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::json;

use crate::usage::{JsonKey, find_key};
use crate::{SseEvent, Usage};

static USAGE_METADATA_KEY: LazyLock<JsonKey> = LazyLock::new(|| JsonKey::new(b"\"usageMetadata\""));
static MODEL_VERSION_KEY: LazyLock<JsonKey> = LazyLock::new(|| JsonKey::new(b"\"modelVersion\""));

/// What a Gemini API call does, from the path's `:method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Generate,
    StreamGenerate,
    CountTokens,
    Embed,
    BatchEmbed,
}

impl Method {
    pub fn parse(text: &str) -> Option<Method> {
        Some(match text {
            "generateContent" => Method::Generate,
            "streamGenerateContent" => Method::StreamGenerate,
            "countTokens" => Method::CountTokens,
            "embedContent" => Method::Embed,
            "batchEmbedContents" => Method::BatchEmbed,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Generate => "generateContent",
            Method::StreamGenerate => "streamGenerateContent",
            Method::CountTokens => "countTokens",
            Method::Embed => "embedContent",
            Method::BatchEmbed => "batchEmbedContents",
        }
    }

    /// Whether the call produces output tokens (and so takes a policy).
    pub fn generates(self) -> bool {
        matches!(self, Method::Generate | Method::StreamGenerate)
    }
}

/// `{model}:{method}`, the last path segment of a Gemini call.
pub fn split_model_method(segment: &str) -> Option<(&str, Method)> {
    let (model, method) = segment.rsplit_once(':')?;
    Some((model, Method::parse(method)?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ThinkingConfig {
    #[serde(default)]
    thinking_budget: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(default)]
    max_output_tokens: Option<u64>,
    #[serde(default)]
    thinking_config: Option<ThinkingConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRequest {
    #[serde(default)]
    generation_config: Option<GenerationConfig>,
}

/// The settings of a `generateContent` body the gateway's policy reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestPeek {
    pub max_output_tokens: Option<u64>,
    pub thinking_budget: Option<i64>,
}

impl RequestPeek {
    /// Reads a request body, which must be a JSON object.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        // serde would read a struct from an array too: only an object is a request.
        if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err("the request body must be a JSON object".to_owned());
        }
        let raw: RawRequest =
            serde_json::from_slice(body).map_err(|e| format!("the request body is not valid: {e}"))?;
        let config = raw.generation_config.unwrap_or_default();
        Ok(Self {
            max_output_tokens: config.max_output_tokens,
            thinking_budget: config.thinking_config.and_then(|t| t.thinking_budget),
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: Option<u64>,
    #[serde(default)]
    candidates_token_count: Option<u64>,
    #[serde(default)]
    thoughts_token_count: Option<u64>,
    #[serde(default)]
    cached_content_token_count: Option<u64>,
    #[serde(default)]
    tool_use_prompt_token_count: Option<u64>,
    #[serde(default)]
    total_token_count: Option<u64>,
}

/// The (last) `usageMetadata` of a response or stream chunk.
///
/// `promptTokenCount` includes the cached tokens; the tool-use prompt is
/// input too and is added to it. Thinking tokens are output, billed with
/// the candidates.
pub fn find_usage(bytes: &[u8]) -> Option<Usage> {
    let (_, value_start) = find_key(bytes, &USAGE_METADATA_KEY, true)?;
    let mut stream = serde_json::Deserializer::from_slice(&bytes[value_start..]).into_iter::<UsageMetadata>();
    let raw = stream.next()?.ok()?;
    let tool_prompt = raw.tool_use_prompt_token_count.unwrap_or(0);
    let prompt = raw.prompt_token_count.unwrap_or(0).saturating_add(tool_prompt);
    let candidates = raw.candidates_token_count.unwrap_or(0);
    let thoughts = raw.thoughts_token_count.unwrap_or(0);
    let completion = candidates.saturating_add(thoughts);
    Some(Usage {
        prompt,
        completion,
        total: raw
            .total_token_count
            .unwrap_or(prompt.saturating_add(completion))
            .max(prompt.saturating_add(completion)),
        reasoning: thoughts,
        cached: raw.cached_content_token_count.unwrap_or(0),
        cache_write: 0,
    })
}

/// The model that answered (`modelVersion`).
pub fn find_model(bytes: &[u8]) -> Option<String> {
    let (_, value_start) = find_key(bytes, &MODEL_VERSION_KEY, false)?;
    let mut stream = serde_json::Deserializer::from_slice(&bytes[value_start..]).into_iter::<String>();
    stream.next()?.ok()
}

/// A stream is complete once a chunk says why its candidate finished.
pub fn is_end(event: &SseEvent) -> bool {
    static FINISH_REASON: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(b"\"finishReason\""));
    FINISH_REASON.find(event.as_bytes()).is_some()
}

/// The canonical status Google's APIs pair with an HTTP status.
pub fn status_name(status: u16) -> &'static str {
    match status {
        400 | 413 | 415 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        402 | 403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        405 => "UNIMPLEMENTED",
        408 | 504 => "DEADLINE_EXCEEDED",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "UNIMPLEMENTED",
        502 | 503 => "UNAVAILABLE",
        _ if status >= 500 => "INTERNAL",
        _ => "FAILED_PRECONDITION",
    }
}

/// `{"error":{"code","message","status"}}`, as Google's APIs answer.
pub fn error_body(status: u16, message: &str, reason: &str) -> Vec<u8> {
    let body = json!({"error": {
        "code": status,
        "message": message,
        "status": status_name(status),
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "tollgate"}],
    }});
    body.to_string().into_bytes()
}

/// The same envelope as a stream event, for a failure mid-stream.
pub fn error_event(status: u16, message: &str, reason: &str) -> Vec<u8> {
    let mut event = b"data: ".to_vec();
    event.extend_from_slice(&error_body(status, message, reason));
    event.extend_from_slice(b"\n\n");
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_counts_thoughts_as_output_and_tool_prompts_as_input() {
        let body = br#"{"candidates":[{"content":{"parts":[{"text":"\"usageMetadata\": trap"}]}}],
            "usageMetadata":{"promptTokenCount":100,"candidatesTokenCount":20,"thoughtsTokenCount":30,
            "cachedContentTokenCount":40,"toolUsePromptTokenCount":5,"totalTokenCount":155},"modelVersion":"gemini-2.5-pro"}"#;
        let usage = find_usage(body).unwrap();
        assert_eq!(usage, Usage { prompt: 105, completion: 50, total: 155, reasoning: 30, cached: 40, cache_write: 0 });
        assert_eq!(usage.billed_output(), 50);
        assert_eq!(find_model(body).as_deref(), Some("gemini-2.5-pro"));
        assert!(find_usage(br#"{"candidates":[]}"#).is_none());
    }

    #[test]
    fn paths_and_bodies_are_read() {
        assert_eq!(
            split_model_method("gemini-2.5-flash:streamGenerateContent"),
            Some(("gemini-2.5-flash", Method::StreamGenerate))
        );
        assert_eq!(split_model_method("gemini-2.5-flash:launchRockets"), None);
        assert_eq!(split_model_method("gemini-2.5-flash"), None);
        let peek = RequestPeek::parse(
            br#"{"contents":[],"generationConfig":{"maxOutputTokens":64,"thinkingConfig":{"thinkingBudget":1024}}}"#,
        )
        .unwrap();
        assert_eq!(peek, RequestPeek { max_output_tokens: Some(64), thinking_budget: Some(1024) });
        assert!(RequestPeek::parse(b"[1]").is_err());
        assert!(RequestPeek::parse(b" []").is_err());
    }

    #[test]
    fn errors_have_googles_shape() {
        let body: serde_json::Value =
            serde_json::from_slice(&error_body(429, "slow down", "rate_limit_exceeded")).unwrap();
        assert_eq!(body["error"]["code"], 429);
        assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
        assert_eq!(body["error"]["message"], "slow down");
    }
}
