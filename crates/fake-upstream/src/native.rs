//! The Gemini API (`/v1beta/models/{model}:{method}`) and the Anthropic
//! Messages API (`/v1/messages`), in their own shapes, with the same
//! deterministic token counts as the OpenAI-shaped answers: the prompt costs
//! one token per 4 request-body bytes (at least 1), each streamed text
//! fragment one token.
//!
//! Gemini reports `usageMetadata` (thoughts apart from candidates, cached
//! content within the prompt, tool-use prompt tokens apart from it) on every
//! streamed chunk, final on the one with `finishReason`; its SSE stream has
//! no end marker. Anthropic reports `usage` with input tokens apart from
//! cache reads and writes, thinking within output; its stream is named
//! events from `message_start` to `message_stop`, usage in `message_start`
//! (input) and `message_delta` (output).

use serde_json::{Value, json};

use crate::responses::Ask;
use crate::scenario::Scenario;

/// A Gemini method, from the path's `{model}:{method}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeminiMethod {
    Generate,
    StreamGenerate,
    CountTokens,
    Embed,
    BatchEmbed,
}

/// Reads `/v1beta/models/{model}:{method}`.
pub fn gemini_call(path: &str) -> Option<(String, GeminiMethod)> {
    let rest = path.strip_prefix("/v1beta/models/")?;
    let (model, method) = rest.rsplit_once(':')?;
    let method = match method {
        "generateContent" => GeminiMethod::Generate,
        "streamGenerateContent" => GeminiMethod::StreamGenerate,
        "countTokens" => GeminiMethod::CountTokens,
        "embedContent" => GeminiMethod::Embed,
        "batchEmbedContents" => GeminiMethod::BatchEmbed,
        _ => return None,
    };
    Some((model.to_owned(), method))
}

fn fragment(i: usize) -> String {
    format!("tok{i} ")
}

/// The function a request declares first, if any.
fn gemini_tool(request: &Value) -> Option<String> {
    request["tools"][0]["functionDeclarations"][0]["name"].as_str().map(str::to_owned)
}

fn gemini_usage(ask: &Ask, scenario: &Scenario, candidates: u64) -> Value {
    let prompt = ask.prompt_tokens;
    let thoughts = scenario.reasoning_tokens;
    let tool_prompt = scenario.tool_prompt_tokens;
    let mut usage = json!({
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates + thoughts + tool_prompt,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    });
    if thoughts > 0 {
        usage["thoughtsTokenCount"] = json!(thoughts);
    }
    if scenario.cached_tokens > 0 {
        usage["cachedContentTokenCount"] = json!(scenario.cached_tokens.min(prompt));
    }
    if tool_prompt > 0 {
        usage["toolUsePromptTokenCount"] = json!(tool_prompt);
    }
    usage
}

fn gemini_part(tool: Option<&str>, text: &str) -> Value {
    match tool {
        Some(name) => json!({"functionCall": {"name": name, "args": {"location": "Paris"}}}),
        None => json!({"text": text}),
    }
}

/// `:generateContent`: the answer and the usage it reported.
pub fn gemini_generate(model: &str, ask: &Ask, request: &Value, scenario: &Scenario) -> (Value, Option<Value>) {
    let tool = gemini_tool(request);
    let text: String = (0..scenario.chunks).map(fragment).collect();
    let candidates = if tool.is_some() { 1 } else { scenario.chunks as u64 };
    let usage = scenario.report_usage.then(|| gemini_usage(ask, scenario, candidates));
    let mut body = json!({
        "candidates": [{
            "content": {"role": "model", "parts": [gemini_part(tool.as_deref(), &text)]},
            "finishReason": "STOP",
            "index": 0,
        }],
        "modelVersion": model,
        "responseId": "fake-gemini-response",
    });
    if let Some(u) = &usage {
        body["usageMetadata"] = u.clone();
    }
    (body, usage)
}

/// `:streamGenerateContent?alt=sse`: one chunk per fragment, the last with
/// `finishReason` and the final usage; no end marker.
pub fn gemini_stream(model: &str, ask: &Ask, request: &Value, scenario: &Scenario) -> (Vec<String>, Option<Value>) {
    let tool = gemini_tool(request);
    let pieces: Vec<String> =
        if tool.is_some() { vec![String::new()] } else { (0..scenario.chunks.max(1)).map(fragment).collect() };
    let count = pieces.len();
    let mut events = Vec::with_capacity(count);
    let mut final_usage = None;
    for (i, piece) in pieces.iter().enumerate() {
        let last = i + 1 == count;
        let mut candidate =
            json!({"content": {"role": "model", "parts": [gemini_part(tool.as_deref(), piece)]}, "index": 0});
        if last {
            candidate["finishReason"] = json!("STOP");
        }
        let mut chunk = json!({"candidates": [candidate], "modelVersion": model, "responseId": "fake-gemini-response"});
        if scenario.report_usage {
            let usage = if last {
                gemini_usage(ask, scenario, if tool.is_some() { 1 } else { count as u64 })
            } else {
                // Early chunks count the prompt; the output so far only.
                json!({"promptTokenCount": ask.prompt_tokens, "candidatesTokenCount": i + 1,
                       "totalTokenCount": ask.prompt_tokens + i as u64 + 1})
            };
            if last {
                final_usage = Some(usage.clone());
            }
            chunk["usageMetadata"] = usage;
        }
        events.push(format!("data: {chunk}\r\n\r\n"));
    }
    (events, final_usage)
}

/// `:countTokens` (free: no usage).
pub fn gemini_count(ask: &Ask) -> Value {
    json!({"totalTokens": ask.prompt_tokens, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": ask.prompt_tokens}]})
}

fn vector(i: usize) -> Vec<f32> {
    (0..8).map(|d| ((i * 8 + d) as f32 + 1.0) / 100.0).collect()
}

/// `:embedContent` (Google reports no usage for embeddings).
pub fn gemini_embed() -> Value {
    json!({"embedding": {"values": vector(0)}})
}

/// `:batchEmbedContents`: one embedding per request in the batch.
pub fn gemini_batch_embed(request: &Value) -> Value {
    let n = request["requests"].as_array().map_or(1, Vec::len);
    json!({"embeddings": (0..n).map(|i| json!({"values": vector(i)})).collect::<Vec<_>>()})
}

/// Google's error envelope.
pub fn gemini_error(status: u16, message: &str) -> Value {
    let name = match status {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        429 => "RESOURCE_EXHAUSTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ if status >= 500 => "INTERNAL",
        _ => "FAILED_PRECONDITION",
    };
    json!({"error": {"code": status, "message": message, "status": name}})
}

fn anthropic_tool(request: &Value) -> Option<String> {
    request["tools"][0]["name"].as_str().map(str::to_owned)
}

/// Anthropic's usage: `input_tokens` leaves out what was read from or
/// written to the cache; thinking is part of `output_tokens`.
fn anthropic_usage(ask: &Ask, scenario: &Scenario, output: u64) -> Value {
    let read = scenario.cached_tokens.min(ask.prompt_tokens);
    let write = scenario.cache_write_tokens.min(ask.prompt_tokens - read);
    json!({
        "input_tokens": ask.prompt_tokens - read - write,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "output_tokens": output + scenario.reasoning_tokens,
    })
}

fn anthropic_blocks(tool: Option<&str>, scenario: &Scenario) -> Vec<Value> {
    let mut blocks = Vec::new();
    if scenario.reasoning_tokens > 0 {
        blocks.push(json!({"type": "thinking", "thinking": "fake thoughts", "signature": "fake-signature"}));
    }
    blocks.push(match tool {
        Some(name) => json!({"type": "tool_use", "id": "toolu_fake", "name": name, "input": {"location": "Paris"}}),
        None => json!({"type": "text", "text": (0..scenario.chunks).map(fragment).collect::<String>()}),
    });
    blocks
}

/// `/v1/messages`: the message and the usage it reported.
pub fn anthropic_message(ask: &Ask, request: &Value, scenario: &Scenario) -> (Value, Option<Value>) {
    let tool = anthropic_tool(request);
    let output = if tool.is_some() { 1 } else { scenario.chunks as u64 };
    let usage = anthropic_usage(ask, scenario, output);
    let body = json!({
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": ask.model,
        "content": anthropic_blocks(tool.as_deref(), scenario),
        "stop_reason": if tool.is_some() { "tool_use" } else { "end_turn" },
        "stop_sequence": null,
        "usage": usage,
    });
    // The Messages API always reports usage.
    (body, Some(usage))
}

/// A streamed message: `message_start` … `message_stop`.
pub fn anthropic_stream(ask: &Ask, request: &Value, scenario: &Scenario) -> (Vec<String>, Option<Value>) {
    let tool = anthropic_tool(request);
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let output = if tool.is_some() { 1 } else { scenario.chunks as u64 };
    let usage = anthropic_usage(ask, scenario, output);
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let mut events = vec![event(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_fake", "type": "message", "role": "assistant",
            "model": ask.model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage}}),
    )];
    let mut index = 0;
    if scenario.reasoning_tokens > 0 {
        events.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        ));
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "thinking_delta", "thinking": "fake thoughts"}}),
        ));
        events.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index,
                "delta": {"type": "signature_delta", "signature": "fake-signature"}}),
        ));
        events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": index})));
        index += 1;
    }
    match &tool {
        Some(name) => {
            events.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": index,
                    "content_block": {"type": "tool_use", "id": "toolu_fake", "name": name, "input": {}}}),
            ));
            events.push(event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": "{\"location\":\"Paris\"}"}}),
            ));
        }
        None => {
            events.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
            ));
            events.push(event("ping", json!({"type": "ping"})));
            for j in 0..scenario.chunks {
                events.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                        "delta": {"type": "text_delta", "text": fragment(j)}}),
                ));
            }
        }
    }
    events.push(event("content_block_stop", json!({"type": "content_block_stop", "index": index})));
    events.push(event(
        "message_delta",
        json!({"type": "message_delta",
            "delta": {"stop_reason": if tool.is_some() { "tool_use" } else { "end_turn" }, "stop_sequence": null},
            "usage": {"output_tokens": usage["output_tokens"]}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    (events, Some(usage))
}

/// `/v1/messages/count_tokens` (free: no usage).
pub fn anthropic_count(ask: &Ask) -> Value {
    json!({"input_tokens": ask.prompt_tokens})
}

/// Anthropic's error envelope.
pub fn anthropic_error(status: u16, message: &str) -> Value {
    let kind = match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ if status >= 500 => "api_error",
        _ => "invalid_request_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemini_paths_are_read() {
        assert_eq!(
            gemini_call("/v1beta/models/gemini-2.5-flash:streamGenerateContent"),
            Some(("gemini-2.5-flash".to_owned(), GeminiMethod::StreamGenerate))
        );
        assert_eq!(gemini_call("/v1beta/models/m:nothing"), None);
        assert_eq!(gemini_call("/v1/models/m:generateContent"), None);
    }

    #[test]
    fn anthropic_input_leaves_out_the_cache() {
        let ask = Ask::read(&[b' '; 400]);
        let scenario =
            Scenario { cached_tokens: 30, cache_write_tokens: 20, reasoning_tokens: 5, ..Scenario::default() };
        let usage = anthropic_usage(&ask, &scenario, 3);
        assert_eq!(usage["input_tokens"], 50);
        assert_eq!(usage["cache_read_input_tokens"], 30);
        assert_eq!(usage["cache_creation_input_tokens"], 20);
        assert_eq!(usage["output_tokens"], 8);
    }

    #[test]
    fn the_last_gemini_chunk_finishes_with_the_final_usage() {
        let ask = Ask::read(b"{\"contents\":[]}");
        let scenario = Scenario { reasoning_tokens: 7, ..Scenario::default() };
        let (events, usage) = gemini_stream("gemini-2.5-flash", &ask, &Value::Null, &scenario);
        assert_eq!(events.len(), scenario.chunks);
        assert!(events.last().unwrap().contains("\"finishReason\":\"STOP\""));
        assert_eq!(usage.unwrap()["thoughtsTokenCount"], 7);
    }
}
