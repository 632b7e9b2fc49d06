//! The bodies the fake answers with, shaped like OpenAI's.
//!
//! Token counts are deterministic so tests can predict them: the prompt costs
//! one token per 4 request-body bytes (at least 1), each streamed content
//! fragment costs one token.

use base64::Engine as _;
use serde_json::{Value, json};

use crate::scenario::{ErrorStyle, Scenario, UsageStyle};

pub const MODELS: &[&str] = &[
    "gemini-2.5-flash-lite",
    "gemini-2.5-flash",
    "gemini-2.5-pro",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "claude-sonnet-4-20250514",
    "text-embedding-3-small",
    "text-embedding-3-large",
];

const CREATED: u64 = 1_750_000_000;

/// What the request asked for, read loosely: the fake must not reject what
/// a real upstream would accept.
#[derive(Debug, Clone)]
pub struct Ask {
    pub model: String,
    pub n: usize,
    pub tool_name: Option<String>,
    pub json_output: bool,
    pub include_usage: bool,
    pub prompt_tokens: u64,
}

impl Ask {
    pub fn read(body: &[u8]) -> Self {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let tool_name = v["tools"][0]["function"]["name"]
            .as_str()
            .or_else(|| v["tools"][0]["name"].as_str())
            .or_else(|| v["functions"][0]["name"].as_str())
            .map(str::to_owned);
        Self {
            model: v["model"].as_str().unwrap_or("fake-model").to_owned(),
            n: v["n"].as_u64().unwrap_or(1).clamp(1, 16) as usize,
            tool_name,
            json_output: v["response_format"]["type"].as_str().is_some_and(|t| t.starts_with("json")),
            include_usage: v["stream_options"]["include_usage"].as_bool().unwrap_or(false),
            prompt_tokens: (body.len() as u64 / 4).max(1),
        }
    }
}

/// Usage as OpenAI's chat/completions report it.
pub fn usage(ask: &Ask, scenario: &Scenario, content_tokens: u64) -> Value {
    let reasoning = scenario.reasoning_tokens;
    let (completion, total) = match scenario.usage_style {
        UsageStyle::OpenAi => (content_tokens + reasoning, ask.prompt_tokens + content_tokens + reasoning),
        UsageStyle::GeminiHiddenThinking => (content_tokens, ask.prompt_tokens + content_tokens + reasoning),
    };
    json!({
        "prompt_tokens": ask.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": total,
        "prompt_tokens_details": {"cached_tokens": scenario.cached_tokens.min(ask.prompt_tokens)},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    })
}

pub fn error_body(status: u16, style: ErrorStyle) -> Value {
    match style {
        ErrorStyle::OpenAi => json!({"error": {
            "message": format!("fake upstream failure with status {status}"),
            "type": if status >= 500 { "server_error" } else { "invalid_request_error" },
            "param": null,
            "code": format!("fake_{status}"),
        }}),
        ErrorStyle::Comet => json!({"error": {
            "message": format!("fake upstream failure with status {status} (request id: 20250101000000fake)"),
            "type": "comet_api_error",
            "param": "",
            "code": format!("fake_{status}"),
        }}),
    }
}

fn fragment(i: usize) -> String {
    format!("tok{i} ")
}

fn content_text(ask: &Ask, scenario: &Scenario) -> String {
    if ask.json_output {
        return r#"{"answer":"fake"}"#.to_owned();
    }
    (0..scenario.chunks).map(fragment).collect()
}

fn tool_call(name: &str, index: usize) -> Value {
    json!({"id": format!("call_fake_{index}"), "type": "function",
           "function": {"name": name, "arguments": "{\"location\":\"Paris\"}"}})
}

/// Tokens the answer costs, matching what the stream sends.
fn content_tokens(ask: &Ask, scenario: &Scenario) -> u64 {
    let per_choice = if ask.tool_name.is_some() || ask.json_output { 1 } else { scenario.chunks as u64 };
    per_choice * ask.n as u64
}

pub fn chat_completion(ask: &Ask, scenario: &Scenario) -> (Value, Option<Value>) {
    let choices: Vec<Value> = (0..ask.n)
        .map(|i| match &ask.tool_name {
            Some(name) => json!({"index": i, "finish_reason": "tool_calls", "logprobs": null,
                "message": {"role": "assistant", "content": null, "tool_calls": [tool_call(name, i)]}}),
            None => json!({"index": i, "finish_reason": "stop", "logprobs": null,
                "message": {"role": "assistant", "content": content_text(ask, scenario)}}),
        })
        .collect();
    let usage = scenario.report_usage.then(|| usage(ask, scenario, content_tokens(ask, scenario)));
    let mut body = json!({"id": "chatcmpl-fake", "object": "chat.completion", "created": CREATED,
        "model": ask.model, "choices": choices, "system_fingerprint": "fp_fake",
        "provider_specific": {"untouched": true}});
    if let Some(u) = &usage {
        body["usage"] = u.clone();
    }
    (body, usage)
}

/// The SSE events of a streamed chat completion, without the `[DONE]`.
pub fn chat_stream(ask: &Ask, scenario: &Scenario) -> (Vec<String>, Option<Value>) {
    let chunk = |choices: Value| {
        let mut c = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED,
            "model": ask.model, "choices": choices, "system_fingerprint": "fp_fake"});
        if ask.include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let mut events = Vec::new();
    for i in 0..ask.n {
        events.push(chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}])));
    }
    let pieces: Vec<String> =
        if ask.json_output { vec![content_text(ask, scenario)] } else { (0..scenario.chunks).map(fragment).collect() };
    match &ask.tool_name {
        Some(name) => {
            for i in 0..ask.n {
                events.push(chunk(json!([{"index": i, "delta": {"tool_calls": [{"index": 0,
                    "id": format!("call_fake_{i}"), "type": "function",
                    "function": {"name": name, "arguments": ""}}]}, "finish_reason": null}])));
                events.push(chunk(json!([{"index": i, "delta": {"tool_calls": [{"index": 0,
                    "function": {"arguments": "{\"location\":\"Paris\"}"}}]}, "finish_reason": null}])));
            }
        }
        None => {
            for piece in &pieces {
                for i in 0..ask.n {
                    events.push(chunk(json!([{"index": i, "delta": {"content": piece}, "finish_reason": null}])));
                }
            }
        }
    }
    let finish = if ask.tool_name.is_some() { "tool_calls" } else { "stop" };
    for i in 0..ask.n {
        events.push(chunk(json!([{"index": i, "delta": {}, "finish_reason": finish}])));
    }
    let usage = scenario.report_usage.then(|| usage(ask, scenario, content_tokens(ask, scenario)));
    if let (true, Some(u)) = (ask.include_usage, &usage) {
        events.push(json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": CREATED,
            "model": ask.model, "choices": [], "usage": u}));
    }
    let events = events.into_iter().map(|e| format!("data: {e}\n\n")).collect();
    // Usage the client can see: only what the stream carried.
    (events, usage.filter(|_| ask.include_usage))
}

pub fn completion(ask: &Ask, scenario: &Scenario) -> (Value, Option<Value>) {
    let choices: Vec<Value> = (0..ask.n)
        .map(|i| json!({"index": i, "text": content_text(ask, scenario), "finish_reason": "stop", "logprobs": null}))
        .collect();
    let usage = scenario.report_usage.then(|| usage(ask, scenario, content_tokens(ask, scenario)));
    let mut body = json!({"id": "cmpl-fake", "object": "text_completion", "created": CREATED,
        "model": ask.model, "choices": choices});
    if let Some(u) = &usage {
        body["usage"] = u.clone();
    }
    (body, usage)
}

pub fn completion_stream(ask: &Ask, scenario: &Scenario) -> (Vec<String>, Option<Value>) {
    let mut events = Vec::new();
    for j in 0..scenario.chunks {
        for i in 0..ask.n {
            let finish = if j + 1 == scenario.chunks { json!("stop") } else { Value::Null };
            let mut c = json!({"id": "cmpl-fake", "object": "text_completion", "created": CREATED,
                "model": ask.model, "choices": [{"index": i, "text": fragment(j), "finish_reason": finish, "logprobs": null}]});
            if ask.include_usage {
                c["usage"] = Value::Null;
            }
            events.push(format!("data: {c}\n\n"));
        }
    }
    let usage = scenario.report_usage.then(|| usage(ask, scenario, content_tokens(ask, scenario)));
    if let (true, Some(u)) = (ask.include_usage, &usage) {
        let c = json!({"id": "cmpl-fake", "object": "text_completion", "created": CREATED,
            "model": ask.model, "choices": [], "usage": u});
        events.push(format!("data: {c}\n\n"));
    }
    (events, usage.filter(|_| ask.include_usage))
}

pub fn embeddings(body: &[u8], ask: &Ask, scenario: &Scenario) -> (Value, Option<Value>) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let inputs = match &v["input"] {
        Value::Array(items) if items.iter().all(Value::is_number) => 1,
        Value::Array(items) => items.len(),
        _ => 1,
    };
    let dims = v["dimensions"].as_u64().unwrap_or(8).clamp(1, 4096) as usize;
    let base64 = v["encoding_format"].as_str() == Some("base64");
    let data: Vec<Value> = (0..inputs)
        .map(|i| {
            let vector: Vec<f32> = (0..dims).map(|d| ((i * dims + d) as f32 + 1.0) / 100.0).collect();
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let usage =
        scenario.report_usage.then(|| json!({"prompt_tokens": ask.prompt_tokens, "total_tokens": ask.prompt_tokens}));
    let mut out = json!({"object": "list", "data": data, "model": ask.model});
    if let Some(u) = &usage {
        out["usage"] = u.clone();
    }
    (out, usage)
}

fn responses_usage(ask: &Ask, scenario: &Scenario, output: u64) -> Value {
    json!({
        "input_tokens": ask.prompt_tokens,
        "input_tokens_details": {"cached_tokens": scenario.cached_tokens.min(ask.prompt_tokens)},
        "output_tokens": output + scenario.reasoning_tokens,
        "output_tokens_details": {"reasoning_tokens": scenario.reasoning_tokens},
        "total_tokens": ask.prompt_tokens + output + scenario.reasoning_tokens,
    })
}

fn response_object(ask: &Ask, scenario: &Scenario, status: &str, with_output: bool) -> Value {
    let output = if with_output {
        json!([{"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": content_text(ask, scenario), "annotations": []}]}])
    } else {
        json!([])
    };
    let usage = if with_output && scenario.report_usage {
        responses_usage(ask, scenario, scenario.chunks as u64)
    } else {
        Value::Null
    };
    json!({"id": "resp_fake", "object": "response", "created_at": CREATED, "status": status,
        "model": ask.model, "output": output, "usage": usage, "parallel_tool_calls": true,
        "tool_choice": "auto", "tools": [], "error": null, "incomplete_details": null,
        "instructions": null, "metadata": {}, "temperature": 1.0, "top_p": 1.0, "text": {"format": {"type": "text"}}})
}

pub fn response(ask: &Ask, scenario: &Scenario) -> (Value, Option<Value>) {
    let body = response_object(ask, scenario, "completed", true);
    let usage = Some(body["usage"].clone()).filter(|u| !u.is_null());
    (body, usage)
}

pub fn response_stream(ask: &Ask, scenario: &Scenario) -> (Vec<String>, Option<Value>) {
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![event(
        "response.created",
        json!({"type": "response.created", "sequence_number": 0,
            "response": response_object(ask, scenario, "in_progress", false)}),
    )];
    for j in 0..scenario.chunks {
        events.push(event(
            "response.output_text.delta",
            json!({"type": "response.output_text.delta", "sequence_number": j + 1, "item_id": "msg_fake",
                "output_index": 0, "content_index": 0, "delta": fragment(j), "logprobs": []}),
        ));
    }
    let done = response_object(ask, scenario, "completed", true);
    let usage = Some(done["usage"].clone()).filter(|u| !u.is_null());
    events.push(event(
        "response.completed",
        json!({"type": "response.completed", "sequence_number": scenario.chunks + 1, "response": done}),
    ));
    (events, usage)
}

pub fn model(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": CREATED, "owned_by": "fake"})
}

pub fn model_list() -> Value {
    json!({"object": "list", "data": MODELS.iter().map(|m| model(m)).collect::<Vec<_>>()})
}
