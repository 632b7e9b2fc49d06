//! Token estimates for when the upstream reports no usage (it omitted it,
//! the stream broke, the client went away), with tiktoken's `o200k_base`.
//! Records built from these are marked `estimated`.

use serde_json::Value;
use tollgate_openai::SseEvent;

fn count(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    off_the_workers(|| tiktoken_rs::o200k_base_singleton().encode_with_special_tokens(text).len() as u64)
}

/// Runs CPU-heavy work (tokenizing up to megabytes of text, building the
/// tokenizer the first time) so it does not hold up other requests: on the
/// multi-threaded runtime the worker hands its other tasks to the rest
/// first (`block_in_place`). Estimates run where a record closes, which can
/// be a `Drop` and so cannot await a blocking task. On a current-thread
/// runtime (some tests) there is no other worker, and the work runs as is.
fn off_the_workers<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Builds the tokenizer ahead of the first estimate (it takes a moment).
pub fn warm_up() {
    let _ = count("warm up");
}

fn collect_text(value: &Value, out: &mut String) {
    match value {
        Value::String(s) => {
            out.push_str(s);
            out.push('\n');
        }
        Value::Array(items) => items.iter().for_each(|i| collect_text(i, out)),
        Value::Object(map) => {
            // Text-bearing fields of messages, prompts and inputs (OpenAI's,
            // Gemini's `contents`/`parts`/`systemInstruction`, Anthropic's
            // `system` and thinking blocks); image data and other payloads
            // are not text tokens.
            for key in [
                "content",
                "text",
                "prompt",
                "input",
                "instructions",
                "arguments",
                "name",
                "contents",
                "parts",
                "systemInstruction",
                "system",
                "thinking",
                "partial_json",
                "args",
            ] {
                if let Some(v) = map.get(key) {
                    collect_text(v, out);
                }
            }
            if let Some(messages) = map.get("messages") {
                collect_text(messages, out);
            }
            if let Some(tools) = map.get("tools") {
                out.push_str(&tools.to_string());
            }
        }
        _ => {}
    }
}

/// Prompt tokens of a request body.
pub fn prompt_tokens(request_body: &[u8]) -> u64 {
    let Ok(value) = serde_json::from_slice::<Value>(request_body) else { return 0 };
    let mut text = String::new();
    collect_text(&value, &mut text);
    count(&text)
}

/// Output tokens of a non-streamed response body.
pub fn response_tokens(body: &[u8]) -> u64 {
    let Ok(value) = serde_json::from_slice::<Value>(body) else { return 0 };
    let mut text = String::new();
    if let Some(choices) = value.get("choices").and_then(Value::as_array) {
        for choice in choices {
            collect_text(choice.get("message").unwrap_or(choice), &mut text);
        }
    }
    if let Some(output) = value.get("output") {
        collect_text(output, &mut text);
    }
    // Gemini's candidates; an Anthropic message's content blocks.
    if let Some(candidates) = value.get("candidates") {
        collect_text(candidates, &mut text);
    }
    if value.get("type").and_then(Value::as_str) == Some("message")
        && let Some(content) = value.get("content")
    {
        collect_text(content, &mut text);
    }
    count(&text)
}

/// Output tokens of the stream events received so far.
pub fn stream_tokens(events: &[SseEvent]) -> u64 {
    let mut text = String::new();
    for event in events {
        let Some(data) = event.data() else { continue };
        let Ok(value) = serde_json::from_slice::<Value>(&data) else { continue };
        if let Some(choices) = value.get("choices").and_then(Value::as_array) {
            for choice in choices {
                if let Some(delta) = choice.get("delta") {
                    collect_text(delta, &mut text);
                } else if let Some(t) = choice.get("text") {
                    collect_text(t, &mut text);
                }
            }
        }
        if let Some(candidates) = value.get("candidates") {
            collect_text(candidates, &mut text);
        }
        let kind = value.get("type").and_then(Value::as_str);
        if matches!(kind, Some("response.output_text.delta" | "content_block_delta"))
            && let Some(delta) = value.get("delta")
        {
            collect_text(delta, &mut text);
        }
    }
    count(&text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn counts_message_text_not_json_syntax() {
        let body = br#"{"model":"x","messages":[{"role":"user","content":"Hello world"}]}"#;
        let n = prompt_tokens(body);
        assert!((2..=4).contains(&n), "{n}");
        assert_eq!(prompt_tokens(b"not json"), 0);
    }

    #[test]
    fn counts_gemini_and_anthropic_text() {
        let gemini = br#"{"contents":[{"role":"user","parts":[{"text":"hello there friend"}]}],"systemInstruction":{"parts":[{"text":"be brief"}]}}"#;
        assert!(prompt_tokens(gemini) >= 5);
        let anthropic = br#"{"model":"m","system":"be brief","messages":[{"role":"user","content":[{"type":"text","text":"hello there friend"}]}]}"#;
        assert!(prompt_tokens(anthropic) >= 5);
        let answer = br#"{"candidates":[{"content":{"parts":[{"text":"one two three"}]}}]}"#;
        assert!(response_tokens(answer) >= 3);
        let message = br#"{"type":"message","content":[{"type":"text","text":"one two three"}]}"#;
        assert!(response_tokens(message) >= 3);
        let mut scanner = tollgate_openai::SseScanner::new(1 << 20);
        let mut events = Vec::new();
        scanner
            .push(
                Bytes::from_static(
                    b"data: {\"candidates\":[{\"content\":{\"parts\":[{\"text\":\"one two\"}]}}]}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"three four\"}}\n\n",
                ),
                &mut events,
            )
            .unwrap();
        assert!(stream_tokens(&events) >= 4);
    }

    #[test]
    fn counts_streamed_deltas() {
        let mut scanner = tollgate_openai::SseScanner::new(1 << 20);
        let mut events = Vec::new();
        scanner
            .push(
                Bytes::from_static(
                    b"data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\" world\"}}]}\n\ndata: [DONE]\n\n",
                ),
                &mut events,
            )
            .unwrap();
        let n = stream_tokens(&events);
        assert!((2..=4).contains(&n), "{n}");
        assert_eq!(stream_tokens(&[]), 0);
    }
}
