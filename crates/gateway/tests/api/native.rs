//! The Gemini and Anthropic APIs in their own shapes: keys in each SDK's
//! header, the key query parameter never forwarded, exact accounting from
//! each API's usage, policy in each API's fields, errors in each API's
//! envelope, streams relayed untouched, routes per API, budgets under a
//! burst.

use std::collections::HashMap;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Db, PATIENCE, TestGateway, UPSTREAM_KEY, wait_for};

const GEMINI: &str = "gemini-2.5-flash";
const CLAUDE: &str = "claude-sonnet-4";

/// gemini-2.5-flash and claude-sonnet-4 in config/pricing.toml, in
/// micro-dollars per million tokens: (input, cached, cache write, output).
const GEMINI_PRICES: (i64, i64, i64, i64) = (300_000, 75_000, 300_000, 2_500_000);
const CLAUDE_PRICES: (i64, i64, i64, i64) = (3_000_000, 300_000, 3_750_000, 15_000_000);

fn gemini_url(gw: &TestGateway, model: &str, method: &str) -> String {
    gw.url(&format!("/v1beta/models/{model}:{method}"))
}

fn gemini_body(text: &str) -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": text}]}]})
}

fn claude_body(text: &str) -> Value {
    json!({"model": CLAUDE, "max_tokens": 256, "messages": [{"role": "user", "content": text}]})
}

/// The tokens a record holds: (prompt, completion, reasoning, cached, cache write).
fn record_tokens(r: &Value) -> (i64, i64, i64, i64, i64) {
    let n = |k: &str| r[k].as_i64().unwrap_or_else(|| panic!("{k} in {r}"));
    (n("prompt_tokens"), n("completion_tokens"), n("reasoning_tokens"), n("cached_tokens"), n("cache_write_tokens"))
}

/// The same from what the fake reported, in each API's vocabulary.
fn reported_tokens(api: &str, u: &Value) -> (i64, i64, i64, i64, i64) {
    let n = |k: &str| u[k].as_i64().unwrap_or(0);
    match api {
        "gemini" => (
            n("promptTokenCount") + n("toolUsePromptTokenCount"),
            n("candidatesTokenCount") + n("thoughtsTokenCount"),
            n("thoughtsTokenCount"),
            n("cachedContentTokenCount"),
            0,
        ),
        _ => (
            n("input_tokens") + n("cache_read_input_tokens") + n("cache_creation_input_tokens"),
            n("output_tokens"),
            0,
            n("cache_read_input_tokens"),
            n("cache_creation_input_tokens"),
        ),
    }
}

fn expected_cost(
    (prompt, completion, _, cached, written): (i64, i64, i64, i64, i64),
    prices: (i64, i64, i64, i64),
) -> i64 {
    let (input, cached_price, write_price, output) = prices;
    let scaled = i128::from(prompt - cached - written) * i128::from(input)
        + i128::from(cached) * i128::from(cached_price)
        + i128::from(written) * i128::from(write_price)
        + i128::from(completion) * i128::from(output);
    ((scaled + 500_000) / 1_000_000) as i64
}

async fn record_of(gw: &TestGateway, request_id: &str) -> Value {
    wait_for(&format!("the ledger record of {request_id}"), PATIENCE, async || {
        let (_, page) = gw.admin(Method::GET, "/admin/v1/usage/records?limit=200", None).await;
        page["data"].as_array().unwrap().iter().find(|r| r["request_id"] == request_id).cloned()
    })
    .await
}

fn plain_client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn gemini_calls_with_the_sdks_headers_are_relayed_and_accounted_to_the_micro_dollar() {
    let gw =
        TestGateway::start_full(tollgate_fake_upstream::FakeUpstream::start().await.unwrap(), Db::Postgres, |_| {})
            .await;
    let client = plain_client();
    let send = async |id: &str, method: &str, body: Value, headers: &[(&str, &str)]| {
        let mut request = client
            .post(gemini_url(&gw, GEMINI, method))
            .header("x-goog-api-key", &gw.key)
            .header("x-request-id", id)
            .json(&body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let cost = response.headers().get("x-tollgate-cost-usd").map(|v| v.to_str().unwrap().to_owned());
        (status, cost, response.text().await.unwrap())
    };

    let thinking =
        [("x-fake-reasoning-tokens", "40"), ("x-fake-cached-tokens", "3"), ("x-fake-tool-prompt-tokens", "7")];
    let (status, cost, body) = send("g-plain", "generateContent", gemini_body("How much?"), &thinking).await;
    assert_eq!(status, 200, "{body}");
    assert!(cost.is_some(), "the cost header is set");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["usageMetadata"]["thoughtsTokenCount"], 40, "the answer is relayed untouched");

    let (status, _, streamed) =
        send("g-stream", "streamGenerateContent?alt=sse", gemini_body("Stream"), &[("x-fake-chunks", "5")]).await;
    assert_eq!(status, 200);
    let chunks: Vec<&str> = streamed.split("\r\n\r\n").filter(|c| !c.is_empty()).collect();
    assert_eq!(chunks.len(), 5, "every chunk relayed: {streamed}");
    assert!(chunks[4].contains("\"finishReason\":\"STOP\""));
    assert!(!streamed.contains("[DONE]"), "no OpenAI end marker is added");

    let tools = json!({"contents": [{"role": "user", "parts": [{"text": "weather?"}]}],
        "tools": [{"functionDeclarations": [{"name": "get_weather", "parameters": {"type": "object"}}]}]});
    let (status, _, called) = send("g-tools", "generateContent", tools, &[]).await;
    assert_eq!(status, 200);
    assert!(called.contains("\"functionCall\""), "{called}");

    let (status, _, counted) = send("g-count", "countTokens", gemini_body("count me"), &[]).await;
    assert_eq!(status, 200);
    assert!(counted.contains("totalTokens"));
    let (status, _, embedded) =
        send("g-embed", "embedContent", json!({"content": {"parts": [{"text": "x"}]}}), &[]).await;
    assert_eq!(status, 200);
    assert!(embedded.contains("\"values\""));

    // What the upstream received: its own key, in Google's header; never
    // the tenant's key; the SSE form of the streaming call.
    let sent = gw.fake.requests();
    for request in &sent {
        assert_eq!(request.headers["x-goog-api-key"], UPSTREAM_KEY);
        assert!(!request.headers.contains_key("authorization"));
        let all: String = request.headers.values().map(|v| v.to_str().unwrap_or("")).collect();
        assert!(!all.contains(&gw.key), "the tenant key never reaches the upstream");
    }
    assert_eq!(sent[1].path, "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse");

    // The ledger holds what the fake reported, to the token and the
    // micro-dollar, with the API named.
    let reported: HashMap<String, Option<Value>> =
        gw.fake.reported().into_iter().filter_map(|r| Some((r.request_id?, r.usage))).collect();
    for id in ["g-plain", "g-stream", "g-tools"] {
        let record = record_of(&gw, id).await;
        let usage = reported[id].clone().expect("the fake reported usage");
        let tokens = reported_tokens("gemini", &usage);
        assert_eq!(record_tokens(&record), tokens, "{id}");
        assert_eq!(record["cost_micros"], expected_cost(tokens, GEMINI_PRICES), "{id}");
        assert_eq!(record["api"], "gemini");
        assert_eq!(record["estimated"], false, "{id}");
        assert_eq!(record["requested_model"], GEMINI);
    }
    assert_eq!(record_of(&gw, "g-plain").await["reasoning_tokens"], 40);
    assert_eq!(record_of(&gw, "g-stream").await["endpoint"], "/v1beta/models:streamGenerateContent");
    // Google reports no usage for embeddings: the input is estimated, and said to be.
    let embed = record_of(&gw, "g-embed").await;
    assert_eq!(embed["estimated"], true, "{embed}");
    assert!(embed["prompt_tokens"].as_i64().unwrap() > 0, "{embed}");
    let count = record_of(&gw, "g-count").await;
    assert_eq!((count["cost_micros"].as_i64(), count["api"].as_str()), (Some(0), Some("gemini")), "{count}");

    // Reports group by API.
    let (status, summary) = gw.admin(Method::GET, "/admin/v1/usage/summary?group_by=api", None).await;
    assert_eq!(status, 200, "{summary}");
    let rows = summary["data"].as_array().unwrap();
    assert!(rows.iter().any(|r| r["api"] == "gemini" && r["requests"].as_i64() == Some(5)), "{summary}");
}

#[tokio::test]
async fn the_key_query_parameter_authenticates_and_is_never_forwarded() {
    let gw = TestGateway::start().await;
    let url = format!("{}?alt=sse&key={}", gemini_url(&gw, GEMINI, "streamGenerateContent"), gw.key);
    let r = plain_client().post(&url).json(&gemini_body("hi")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap();
    let sent = gw.fake.requests();
    assert_eq!(sent.len(), 1);
    assert!(!sent[0].path.contains("key="), "{}", sent[0].path);
    assert!(!sent[0].path.contains(&gw.key));

    // A wrong key in the query is refused in Google's shape.
    let url = format!("{}?key=tg_nope.nope", gemini_url(&gw, GEMINI, "generateContent"));
    let r = plain_client().post(&url).json(&gemini_body("hi")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], 401);
    assert_eq!(body["error"]["status"], "UNAUTHENTICATED");
    assert!(body["error"]["message"].is_string());

    // The OpenAI routes take no key from the query.
    let r = plain_client()
        .post(format!("{}?key={}", gw.url("/v1/chat/completions"), gw.key))
        .json(&json!({"model": GEMINI, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn anthropic_messages_are_relayed_and_cache_reads_and_writes_priced_apart() {
    let gw =
        TestGateway::start_full(tollgate_fake_upstream::FakeUpstream::start().await.unwrap(), Db::Postgres, |_| {})
            .await;
    let client = plain_client();
    let send = async |id: &str, path: &str, body: Value, headers: &[(&str, &str)]| {
        let mut request = client
            .post(gw.url(path))
            .header("x-api-key", &gw.key)
            .header("anthropic-version", "2023-06-01")
            .header("x-request-id", id)
            .json(&body);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    };
    let cache = [("x-fake-cached-tokens", "4"), ("x-fake-cache-write-tokens", "6"), ("x-fake-reasoning-tokens", "9")];
    let (status, body) = send("a-plain", "/v1/messages", claude_body("How much does this cost?"), &cache).await;
    assert_eq!(status, 200, "{body}");
    let message: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["usage"]["cache_creation_input_tokens"], 6);

    let mut streamed = claude_body("Stream it, please");
    streamed["stream"] = json!(true);
    let (status, events) = send("a-stream", "/v1/messages", streamed, &cache).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = events.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"), "named events relayed as sent: {events}");
    assert!(names.contains(&"ping"));

    let mut tools = claude_body("weather?");
    tools["tools"] = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
    let (status, called) = send("a-tools", "/v1/messages", tools, &[]).await;
    assert_eq!(status, 200);
    assert!(called.contains("\"tool_use\""));

    let (status, counted) = send(
        "a-count",
        "/v1/messages/count_tokens",
        json!({"model": CLAUDE, "messages": [{"role": "user", "content": "x"}]}),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(counted.contains("input_tokens"));

    for request in gw.fake.requests() {
        assert_eq!(request.headers["x-api-key"], UPSTREAM_KEY, "the upstream key, in Anthropic's header");
        assert_eq!(request.headers["anthropic-version"], "2023-06-01");
    }

    let reported: HashMap<String, Option<Value>> =
        gw.fake.reported().into_iter().filter_map(|r| Some((r.request_id?, r.usage))).collect();
    for id in ["a-plain", "a-stream", "a-tools"] {
        let record = record_of(&gw, id).await;
        let tokens = reported_tokens("anthropic", &reported[id].clone().unwrap());
        assert_eq!(record_tokens(&record), tokens, "{id}");
        assert_eq!(record["cost_micros"], expected_cost(tokens, CLAUDE_PRICES), "{id}");
        assert_eq!(record["api"], "anthropic");
        assert_eq!(record["estimated"], false);
    }
    let plain = record_of(&gw, "a-plain").await;
    assert_eq!((plain["cached_tokens"].as_i64(), plain["cache_write_tokens"].as_i64()), (Some(4), Some(6)));
    assert_eq!(record_of(&gw, "a-count").await["cost_micros"], 0);
}

#[tokio::test]
async fn errors_come_in_each_apis_envelope_with_each_apis_status() {
    let gw = TestGateway::start().await;
    let client = plain_client();

    // No key.
    let r = client.post(gemini_url(&gw, GEMINI, "generateContent")).json(&gemini_body("x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("x-request-id"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["error"]["code"].as_i64(), body["error"]["status"].as_str()),
        (Some(401), Some("UNAUTHENTICATED"))
    );
    let r = client.post(gw.url("/v1/messages")).json(&claude_body("x")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "authentication_error");

    // Malformed JSON, an unknown method, a missing model.
    let r = client
        .post(gemini_url(&gw, GEMINI, "generateContent"))
        .header("x-goog-api-key", &gw.key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["status"], "INVALID_ARGUMENT");
    let r = client
        .post(gemini_url(&gw, GEMINI, "launchRockets"))
        .header("x-goog-api-key", &gw.key)
        .json(&gemini_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["status"], "NOT_FOUND");
    let r = client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &gw.key)
        .json(&json!({"max_tokens": 10, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "invalid_request_error");

    // A model the key may not use.
    let narrow = gw.create_key("test", json!({"name": "narrow", "allowed_models": ["gpt-4.1"]})).await;
    let r =
        client.post(gw.url("/v1/messages")).header("x-api-key", &narrow).json(&claude_body("x")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "permission_error");

    // Rate limited: each API's throttling error, with retry-after.
    let (status, _) = gw
        .admin(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"id": "slow", "display_name": "S", "policy": {"limits": {"rpm": 1}}})),
        )
        .await;
    assert_eq!(status, 201);
    gw.clock.to_next_minute();
    let slow = gw.create_key("slow", json!({"name": "k"})).await;
    let first =
        client.post(gw.url("/v1/messages")).header("x-api-key", &slow).json(&claude_body("x")).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let r =
        client.post(gw.url("/v1/messages")).header("x-api-key", &slow).json(&claude_body("x")).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "rate_limit_error");
    let r = client
        .post(gemini_url(&gw, GEMINI, "generateContent"))
        .header("x-goog-api-key", &slow)
        .json(&gemini_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["status"], "RESOURCE_EXHAUSTED");

    // An upstream's own error passes through in its shape and status.
    let r = client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &gw.key)
        .header("x-fake-fault", "status:529")
        .json(&claude_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 529);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "overloaded_error");
}

#[tokio::test]
async fn the_tenant_policy_lands_in_each_apis_own_fields() {
    let gw = TestGateway::start().await;
    let policy = json!({"max_output_tokens": 100, "max_thinking_budget": 64, "default_thinking_budget": 32});
    let (status, tenant) = gw
        .admin(Method::POST, "/admin/v1/tenants", Some(json!({"id": "capped", "display_name": "C", "policy": policy})))
        .await;
    assert_eq!(status, 201, "{tenant}");
    let key = gw.create_key("capped", json!({"name": "k"})).await;
    let client = plain_client();

    let big = json!({"contents": [{"role": "user", "parts": [{"text": "x"}]}],
        "generationConfig": {"maxOutputTokens": 5000, "thinkingConfig": {"thinkingBudget": 4000}}});
    let r = client
        .post(gemini_url(&gw, GEMINI, "generateContent"))
        .header("x-goog-api-key", &key)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(gemini_url(&gw, GEMINI, "generateContent"))
        .header("x-goog-api-key", &key)
        .json(&gemini_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut thinking = claude_body("x");
    thinking["max_tokens"] = json!(9000);
    thinking["thinking"] = json!({"type": "enabled", "budget_tokens": 5000});
    let r = client.post(gw.url("/v1/messages")).header("x-api-key", &key).json(&thinking).send().await.unwrap();
    assert_eq!(r.status(), 200);

    let sent = gw.fake.requests();
    let clamped = sent[0].json();
    assert_eq!(clamped["generationConfig"]["maxOutputTokens"], 100);
    assert_eq!(clamped["generationConfig"]["thinkingConfig"]["thinkingBudget"], 64);
    let defaulted = sent[1].json();
    assert_eq!(defaulted["generationConfig"]["thinkingConfig"]["thinkingBudget"], 32, "{defaulted}");
    let anthropic = sent[2].json();
    assert_eq!(anthropic["max_tokens"], 100);
    assert_eq!(anthropic["thinking"]["budget_tokens"], 64);
}

#[tokio::test]
async fn a_stream_cut_short_keeps_the_input_reported_and_estimates_the_output() {
    let gw = TestGateway::start().await;
    let client = plain_client();
    let r = client
        .post(format!("{}?alt=sse", gemini_url(&gw, GEMINI, "streamGenerateContent")))
        .header("x-goog-api-key", &gw.key)
        .header("x-request-id", "g-cut")
        .header("x-fake-chunks", "6")
        .header("x-fake-fault", "drop-after:3")
        .json(&gemini_body("a long story"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap_or_default();
    assert!(body.contains("\"error\""), "the client is told in Google's shape: {body}");
    let mut streamed = claude_body("a long story");
    streamed["stream"] = json!(true);
    let r = client
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &gw.key)
        .header("x-request-id", "a-cut")
        .header("x-fake-chunks", "6")
        .header("x-fake-fault", "drop-after:4")
        .json(&streamed)
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap_or_default();
    assert!(body.contains("event: error"), "the client is told in Anthropic's shape: {body}");

    let prompt =
        gw.fake.reported().iter().find(|r| r.request_id.as_deref() == Some("a-cut")).unwrap().usage.clone().unwrap();
    for id in ["g-cut", "a-cut"] {
        let record = record_of(&gw, id).await;
        assert_eq!(record["estimated"], true, "{id}: {record}");
        assert!(record["completion_tokens"].as_i64().unwrap() > 0, "{id}: output estimated from what was relayed");
        assert!(record["error_class"].as_str().is_some_and(|c| c.starts_with("upstream:")), "{record}");
    }
    assert_eq!(
        record_of(&gw, "a-cut").await["prompt_tokens"],
        prompt["input_tokens"],
        "message_start's input count kept"
    );
}

#[tokio::test]
async fn a_route_serves_one_api_and_upstreams_say_which_apis_they_speak() {
    let route: tollgate_gateway::routing::config::RouteConfig = toml::from_str(&format!(
        "model = \"house-model\"\napi = \"anthropic\"\n[[groups]]\ntargets = [{{ upstream = \"default\", model = \"{CLAUDE}\" }}]\n"
    ))
    .unwrap();
    let gw = TestGateway::start_with(|c| c.routes = vec![route]).await;
    let client = plain_client();
    let mut body = claude_body("x");
    body["model"] = json!("house-model");
    let r = client.post(gw.url("/v1/messages")).header("x-api-key", &gw.key).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(gw.fake.requests()[0].json()["model"], CLAUDE, "the route's target model is sent");
    // The same name on the OpenAI API is no route there.
    let r = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "house-model", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(gw.fake.requests().last().unwrap().json()["model"], "house-model", "{}", r.status());

    // An upstream that speaks only OpenAI's API refuses the others clearly.
    let openai_only = TestGateway::start_with(|c| c.upstream.apis = vec![tollgate_openai::Api::OpenAi]).await;
    let r = client
        .post(openai_only.url("/v1/messages"))
        .header("x-api-key", &openai_only.key)
        .json(&claude_body("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "not_found_error", "{body}");
    assert!(openai_only.fake.requests().is_empty());
}

/// A hard budget under hundreds of parallel requests, in each API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_parallel_native_requests_never_spend_past_a_hard_budget() {
    let gw =
        TestGateway::start_full(tollgate_fake_upstream::FakeUpstream::start().await.unwrap(), Db::Postgres, |_| {})
            .await;
    for (tenant, api) in [("frugal-g", "gemini"), ("frugal-a", "anthropic")] {
        gw.ensure_tenant(tenant).await;
        let (status, budget) = gw
            .admin(
                Method::POST,
                &format!("/admin/v1/tenants/{tenant}/budgets"),
                Some(json!({"period": "monthly", "amount_usd": "0.01"})),
            )
            .await;
        assert_eq!(status, 201, "{budget}");
        let key = gw.create_key(tenant, json!({"name": "k"})).await;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..300 {
            let client = plain_client();
            let (url, header, body) = match api {
                "gemini" => (
                    gemini_url(&gw, "gemini-2.5-pro", "generateContent"),
                    "x-goog-api-key",
                    json!({"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 100, "thinkingConfig": {"thinkingBudget": 0}}}),
                ),
                _ => (
                    gw.url("/v1/messages"),
                    "x-api-key",
                    json!({"model": CLAUDE, "max_tokens": 60, "messages": [{"role": "user", "content": "hi"}]}),
                ),
            };
            let key = key.clone();
            tasks.spawn(async move {
                let r = client
                    .post(url)
                    .header(header, key)
                    .header("x-fake-latency-ms", "20")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let retry_after = r.headers().contains_key("retry-after");
                (status, retry_after, r.json::<Value>().await.unwrap())
            });
        }
        let mut answered = 0;
        let mut refused = 0;
        while let Some(done) = tasks.join_next().await {
            let (status, retry_after, body) = done.unwrap();
            match status {
                200 => answered += 1,
                429 => {
                    refused += 1;
                    let exhausted = body.to_string().contains("budget");
                    assert!(retry_after || exhausted, "a busy refusal says when to retry: {body}");
                    match api {
                        "gemini" => assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED", "{body}"),
                        _ => assert_eq!(body["error"]["type"], "rate_limit_error", "{body}"),
                    }
                }
                other => panic!("{api}: unexpected {other}: {body}"),
            }
        }
        assert!(answered > 0 && refused > 0, "{api}: {answered} answered, {refused} refused");
        let spent = wait_for("every answer settled", PATIENCE, async || {
            let (_, summary) =
                gw.admin(Method::GET, &format!("/admin/v1/usage/summary?tenant_id={tenant}"), None).await;
            let row = &summary["data"][0];
            (row["requests"].as_i64() == Some(300)).then(|| row["cost_micros"].as_i64().unwrap())
        })
        .await;
        println!("{api}: {answered} answered, {refused} refused, {spent} µ$ of 10000");
        assert!(spent <= 10_000, "{api}: {spent} µ$ spent of a 10000 µ$ budget");
        assert!(spent >= 8_000, "{api}: the budget was used up to about one worst case, not refused early: {spent} µ$");
    }
}

#[tokio::test]
async fn a_client_leaving_a_native_stream_cancels_it_and_the_input_reported_is_kept() {
    use futures_util::StreamExt;
    let gw = TestGateway::start().await;
    let mut body = claude_body("a long story");
    body["stream"] = json!(true);
    let response = plain_client()
        .post(gw.url("/v1/messages"))
        .header("x-api-key", &gw.key)
        .header("x-request-id", "a-left")
        .header("x-fake-chunks", "50")
        .header("x-fake-chunk-interval-ms", "100")
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"event: message_start"), "{first:?}");
    drop(stream);

    crate::helpers::wait_until("the upstream sees the stream cancelled", PATIENCE, async || {
        gw.fake.streams_cancelled() == 1
    })
    .await;
    let reported = gw.fake.reported();
    let usage = reported.iter().find(|r| r.request_id.as_deref() == Some("a-left")).unwrap().usage.clone().unwrap();
    let record = record_of(&gw, "a-left").await;
    assert_eq!(record["prompt_tokens"], usage["input_tokens"], "message_start's input count: {record}");
    assert_eq!(record["estimated"], true, "{record}");
    assert_eq!(record["api"], "anthropic");
}
