//! Accounting exactness: a mixed run where the ledger equals what the fake
//! upstream reported, to the token, and the expected cost, to the
//! micro-dollar.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Db, PATIENCE, TestGateway, client_with_key, scraped_value, wait_for, wait_until};

/// gemini-2.5-flash in config/pricing.toml, in micro-dollars per million tokens.
const INPUT: i64 = 300_000;
const CACHED: i64 = 75_000;
const OUTPUT: i64 = 2_500_000;
/// text-embedding-3-small.
const EMBED_INPUT: i64 = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tokens {
    prompt: i64,
    completion: i64,
    total: i64,
    reasoning: i64,
    cached: i64,
}

fn tokens_of_fake(usage: &Value) -> Tokens {
    let n = |v: &Value| v.as_i64().unwrap_or(0);
    let prompt = n(&usage["prompt_tokens"]).max(n(&usage["input_tokens"]));
    let completion = n(&usage["completion_tokens"]).max(n(&usage["output_tokens"]));
    Tokens {
        prompt,
        completion,
        total: n(&usage["total_tokens"]),
        reasoning: n(&usage["completion_tokens_details"]["reasoning_tokens"])
            .max(n(&usage["output_tokens_details"]["reasoning_tokens"])),
        cached: n(&usage["prompt_tokens_details"]["cached_tokens"])
            .max(n(&usage["input_tokens_details"]["cached_tokens"])),
    }
}

fn tokens_of_record(r: &Value) -> Tokens {
    Tokens {
        prompt: r["prompt_tokens"].as_i64().unwrap(),
        completion: r["completion_tokens"].as_i64().unwrap(),
        total: r["total_tokens"].as_i64().unwrap(),
        reasoning: r["reasoning_tokens"].as_i64().unwrap(),
        cached: r["cached_tokens"].as_i64().unwrap(),
    }
}

fn expected_cost(t: Tokens, input: i64, cached: i64, output: i64) -> i64 {
    let billed_output = t.completion.max(t.total - t.prompt);
    let scaled = i128::from(t.prompt - t.cached) * i128::from(input)
        + i128::from(t.cached) * i128::from(cached)
        + i128::from(billed_output) * i128::from(output);
    ((scaled + 500_000) / 1_000_000) as i64
}

async fn ledger_records(gw: &TestGateway, expected: usize) -> Vec<Value> {
    wait_for(&format!("{expected} records in the ledger"), PATIENCE, async || {
        let (status, page) = gw.admin(Method::GET, "/admin/v1/usage/records?limit=200", None).await;
        assert_eq!(status, 200, "{page}");
        let data = page["data"].as_array().unwrap().clone();
        (data.len() >= expected).then_some(data)
    })
    .await
}

/// The ledger record of one request, once written.
pub async fn ledger_record(gw: &TestGateway, request_id: &str) -> Value {
    wait_for(&format!("the ledger record of {request_id}"), PATIENCE, async || {
        let (_, page) = gw.admin(Method::GET, "/admin/v1/usage/records?limit=200", None).await;
        page["data"].as_array().unwrap().iter().find(|r| r["request_id"] == request_id).cloned()
    })
    .await
}

/// How many changes of the pricing file the gateway saw, with `result`.
async fn pricing_reloads(gw: &TestGateway, result: &str) -> f64 {
    let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    scraped_value(&metrics, &format!("tollgate_pricing_reloads_total{{result=\"{result}\"}}")).unwrap()
}

struct Call {
    id: &'static str,
    path: &'static str,
    body: Value,
    headers: Vec<(&'static str, &'static str)>,
}

#[tokio::test]
async fn a_mixed_run_is_accounted_to_the_token_and_the_micro_dollar() {
    let gw =
        TestGateway::start_full(tollgate_fake_upstream::FakeUpstream::start().await.unwrap(), Db::Postgres, |_| {})
            .await;
    let model = "gemini-2.5-flash";
    let msgs = json!([{"role": "user", "content": "How much does this cost?"}]);
    let calls = vec![
        Call {
            id: "plain",
            path: "/v1/chat/completions",
            body: json!({"model": model, "messages": msgs}),
            headers: vec![("x-fake-reasoning-tokens", "5"), ("x-fake-cached-tokens", "3")],
        },
        Call {
            id: "stream-injected",
            path: "/v1/chat/completions",
            body: json!({"model": model, "messages": msgs, "stream": true}),
            headers: vec![("x-fake-usage-style", "gemini"), ("x-fake-reasoning-tokens", "40"), ("x-fake-chunks", "6")],
        },
        Call {
            id: "stream-asked",
            path: "/v1/chat/completions",
            body: json!({"model": model, "messages": msgs, "stream": true, "stream_options": {"include_usage": true}}),
            headers: vec![("x-fake-cached-tokens", "2")],
        },
        Call {
            id: "stream-n2",
            path: "/v1/chat/completions",
            body: json!({"model": model, "messages": msgs, "stream": true, "n": 2}),
            headers: vec![],
        },
        Call {
            id: "tools",
            path: "/v1/chat/completions",
            body: json!({"model": model, "messages": msgs, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
            headers: vec![],
        },
        Call {
            id: "completion-stream",
            path: "/v1/completions",
            body: json!({"model": model, "prompt": "Once", "stream": true}),
            headers: vec![],
        },
        Call {
            id: "responses",
            path: "/v1/responses",
            body: json!({"model": model, "input": "hi"}),
            headers: vec![("x-fake-reasoning-tokens", "7")],
        },
        Call {
            id: "responses-stream",
            path: "/v1/responses",
            body: json!({"model": model, "input": "hi", "stream": true}),
            headers: vec![],
        },
        Call {
            id: "embeddings",
            path: "/v1/embeddings",
            body: json!({"model": "text-embedding-3-small", "input": ["a", "b"]}),
            headers: vec![],
        },
        Call {
            id: "upstream-error",
            path: "/v1/chat/completions",
            body: json!({"model": model, "messages": msgs}),
            headers: vec![("x-fake-fault", "status:500")],
        },
    ];
    let client = client_with_key(&gw.key);
    let mut cost_headers = HashMap::new();
    let mut bodies = HashMap::new();
    for call in &calls {
        let mut request = client.post(gw.url(call.path)).header("x-request-id", call.id).json(&call.body);
        for (k, v) in &call.headers {
            request = request.header(*k, *v);
        }
        let response = request.send().await.unwrap();
        if let Some(cost) = response.headers().get("x-tollgate-cost-usd") {
            cost_headers.insert(call.id, cost.to_str().unwrap().to_owned());
        }
        bodies.insert(call.id, response.text().await.unwrap());
    }

    // The client that did not ask for usage never sees it.
    let injected = &bodies["stream-injected"];
    assert!(!injected.contains("\"usage\""), "usage leaked into the client's stream: {injected}");
    assert!(!injected.contains("\"choices\":[]"));
    assert!(injected.ends_with("data: [DONE]\n\n"));
    assert!(bodies["stream-asked"].contains("\"choices\":[]"), "a client that asked keeps its usage chunk");

    let records = ledger_records(&gw, calls.len()).await;
    let by_request: HashMap<&str, &Value> = records.iter().map(|r| (r["request_id"].as_str().unwrap(), r)).collect();
    let reported: HashMap<String, Value> =
        gw.fake.reported().into_iter().filter_map(|r| Some((r.request_id?, r.usage?))).collect();

    let mut expected_total = 0;
    for call in calls.iter().filter(|c| c.id != "upstream-error") {
        let record = by_request[call.id];
        let upstream = tokens_of_fake(&reported[call.id]);
        assert_eq!(tokens_of_record(record), upstream, "{}: ledger tokens equal the upstream's", call.id);
        assert_eq!(record["estimated"], false, "{}", call.id);
        let cost = if call.id == "embeddings" {
            expected_cost(upstream, EMBED_INPUT, EMBED_INPUT, 0)
        } else {
            expected_cost(upstream, INPUT, CACHED, OUTPUT)
        };
        assert_eq!(record["cost_micros"], cost, "{}: cost to the micro-dollar", call.id);
        assert_eq!(record["stream"], call.body["stream"].as_bool().unwrap_or(false), "{}", call.id);
        if let Some(header) = cost_headers.get(call.id) {
            assert_eq!(header, &tollgate_gateway::accounting::format_usd(cost), "{}: cost header", call.id);
        }
        expected_total += cost;
    }
    let gemini = tokens_of_fake(&reported["stream-injected"]);
    assert!(gemini.total > gemini.prompt + gemini.completion, "hidden thinking tokens are in the fake's total");
    assert_eq!(by_request["stream-injected"]["billed_output_tokens"], gemini.total - gemini.prompt);
    assert!(by_request["stream-injected"]["ttft_ms"].is_number());

    let failed = by_request["upstream-error"];
    assert_eq!((failed["status"].as_i64(), failed["cost_micros"].as_i64()), (Some(500), Some(0)));
    assert_eq!(failed["error_class"], "upstream:status_500");

    // The summary (from the daily rollups) is the sum of the records.
    let (_, summary) = gw.admin(Method::GET, "/admin/v1/usage/summary?group_by=tenant", None).await;
    let row = &summary["data"][0];
    assert_eq!(row["tenant_id"], "test");
    assert_eq!(row["requests"], calls.len() as i64);
    assert_eq!(row["errors"], 1);
    assert_eq!(row["cost_micros"], expected_total);
    assert_eq!(row["cost_usd"], tollgate_gateway::accounting::format_usd(expected_total));
}

#[tokio::test]
async fn missing_usage_is_estimated_and_a_client_gone_before_any_output_pays_no_output() {
    let gw = TestGateway::start().await;
    let client = client_with_key(&gw.key);
    let body = json!({"model": "gemini-2.5-flash", "stream": true, "messages": [{"role": "user", "content": "Tell me a long story"}]});

    // The upstream omits usage entirely.
    let text = client
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "no-usage")
        .header("x-fake-usage", "omit")
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));

    // The client leaves after the first frame of a slow stream.
    let response = client
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "gone-early")
        .header("x-fake-chunks", "50")
        .header("x-fake-chunk-interval-ms", "100")
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);

    // The client leaves before the upstream sent anything.
    let slow = client
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "gone-before-output")
        .header("x-fake-latency-ms", "2000")
        .json(&body)
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(slow.is_err());

    let records = ledger_records(&gw, 3).await;
    let by_request: HashMap<&str, &Value> = records.iter().map(|r| (r["request_id"].as_str().unwrap(), r)).collect();
    let no_usage = by_request["no-usage"];
    assert_eq!(no_usage["estimated"], true);
    assert!(no_usage["prompt_tokens"].as_i64().unwrap() > 0);
    assert!(no_usage["completion_tokens"].as_i64().unwrap() > 0, "output estimated from the streamed text");
    assert!(no_usage["cost_micros"].as_i64().unwrap() > 0);

    let gone = by_request["gone-early"];
    assert_eq!(gone["error_class"], "client:disconnected");
    assert_eq!(gone["estimated"], true);

    let before = by_request["gone-before-output"];
    assert_eq!(before["completion_tokens"], 0, "nothing produced, nothing billed for output: {before}");
    assert!(before["prompt_tokens"].as_i64().unwrap() > 0, "the prompt reached the upstream: {before}");
    assert!(before["cost_micros"].as_i64().unwrap() > 0, "the prompt is billed: {before}");
    assert_eq!(before["status"], 499);
    assert_eq!(before["error_class"], "client:disconnected");
}

#[tokio::test]
async fn tenants_read_only_their_own_usage_and_exports_are_csv() {
    let gw = TestGateway::start().await;
    gw.ensure_tenant("other").await;
    let other_key = gw.create_key("other", json!({"name": "o"})).await;
    let chat = json!({"model": "gpt-4.1", "messages": []});
    for key in [&gw.key, &gw.key, &other_key] {
        let r = client_with_key(key).post(gw.url("/v1/chat/completions")).json(&chat).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    ledger_records(&gw, 3).await;

    let mine: Value =
        gw.http.get(gw.url("/v1/usage?group_by=tenant,model")).send().await.unwrap().json().await.unwrap();
    let rows = mine["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{mine}");
    assert_eq!((rows[0]["tenant_id"].as_str(), rows[0]["requests"].as_i64()), (Some("test"), Some(2)));
    // Asking for another tenant does not widen the view.
    let forced: Value = gw.http.get(gw.url("/v1/usage?tenant_id=other")).send().await.unwrap().json().await.unwrap();
    assert_eq!(forced["data"][0]["requests"], 2);
    let records: Value = gw.http.get(gw.url("/v1/usage/records")).send().await.unwrap().json().await.unwrap();
    assert!(records["data"].as_array().unwrap().iter().all(|r| r["tenant_id"] == "test"));
    assert_eq!(gw.anonymous.get(gw.url("/v1/usage")).send().await.unwrap().status(), 401);

    let csv = gw
        .anonymous
        .get(gw.admin_url("/admin/v1/usage/records.csv"))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(csv.headers()["content-type"].to_str().unwrap().starts_with("text/csv"));
    let text = csv.text().await.unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(lines[0].starts_with("id,at,request_id,tenant_id"));

    let (status, bad) = gw.admin(Method::GET, "/admin/v1/usage/summary?from=2026-13-01", None).await;
    assert_eq!((status, bad["error"]["param"].as_str()), (400, Some("from")));
}

#[tokio::test]
async fn prices_reload_without_a_restart_and_unpriced_models_are_flagged_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pricing = dir.path().join("pricing.toml");
    std::fs::write(&pricing, "[models.\"gpt-4.1\"]\ninput = 1.0\noutput = 1.0\n").unwrap();
    let path = pricing.clone();
    let gw = TestGateway::start_with(move |c| {
        c.accounting.pricing_file = Some(path);
        c.accounting.pricing_reload_interval = Duration::from_millis(50);
    })
    .await;
    let body = json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": "price me"}]});
    let cost = |r: &reqwest::Response| r.headers()["x-tollgate-cost-usd"].to_str().unwrap().to_owned();
    let first = gw.http.post(gw.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    let before = cost(&first);

    // Ten times the price; the gateway picks it up by itself.
    assert_eq!(pricing_reloads(&gw, "applied").await, 0.0);
    std::fs::write(&pricing, "[models.\"gpt-4.1\"]\ninput = 10.0\noutput = 10.0\n").unwrap();
    wait_until("the new prices applied", PATIENCE, async || pricing_reloads(&gw, "applied").await == 1.0).await;
    let r = gw.http.post(gw.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    let after = cost(&r);
    let micros = |usd: &str| (usd.parse::<f64>().unwrap() * 1e6).round() as i64;
    assert_eq!(micros(&after), micros(&before) * 10, "{before} then {after}");

    // A broken file leaves the last good prices in force.
    std::fs::write(&pricing, "this is not toml [").unwrap();
    wait_until("the broken file rejected", PATIENCE, async || pricing_reloads(&gw, "rejected").await == 1.0).await;
    let r = gw.http.post(gw.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(cost(&r), after);
    assert_eq!(pricing_reloads(&gw, "applied").await, 1.0, "the broken file was not applied");

    // No price: served, recorded with cost 0 and flagged.
    let unpriced = json!({"model": "mystery-model", "messages": []});
    let r = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "unpriced")
        .json(&unpriced)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let record = ledger_record(&gw, "unpriced").await;
    assert_eq!((record["unpriced"].as_bool(), record["cost_micros"].as_i64()), (Some(true), Some(0)));

    let strict = TestGateway::start_with(|c| c.accounting.reject_unpriced = true).await;
    let refused = strict.http.post(strict.url("/v1/chat/completions")).json(&unpriced).send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(
        (body["error"]["code"].as_str(), body["error"]["param"].as_str()),
        (Some("model_not_priced"), Some("model"))
    );
    assert!(strict.fake.requests().is_empty(), "refused before anything reached the upstream");
}

/// Estimates tokenize on the worker without holding up its other tasks
/// (`block_in_place` on the multi-threaded runtime, which production runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estimates_run_on_the_multi_threaded_runtime_for_bodies_and_streams() {
    let gw = TestGateway::start().await;
    let mut ids = Vec::new();
    for body in [
        r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"estimate me, please"}]}"#,
        r#"{"model":"gpt-4.1","stream":true,"messages":[{"role":"user","content":"estimate me, please"}]}"#,
    ] {
        let r = gw
            .http
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("x-fake-usage", "omit")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        ids.push(r.headers()["x-request-id"].to_str().unwrap().to_owned());
        r.bytes().await.unwrap();
    }
    for id in ids {
        let record = ledger_record(&gw, &id).await;
        assert_eq!(record["estimated"], true, "{record}");
        assert!(record["prompt_tokens"].as_i64().unwrap() > 0 && record["completion_tokens"].as_i64().unwrap() > 0);
    }
}

/// The gateway here shares the test's single thread: were the estimate (and
/// the tokenizer's first build) run on the request worker, nothing else
/// could be answered until it finished.
#[tokio::test]
async fn a_long_estimate_holds_up_no_other_request_and_the_answer_still_carries_its_cost() {
    let gw = TestGateway::start().await;
    let client = client_with_key(&gw.key);
    // About 3 MB of prompt text: seconds of tokenizing in a debug build.
    let prompt = "tokens to count in the background ".repeat(90_000);
    let body = json!({"model": "gpt-4.1", "messages": [{"role": "user", "content": prompt}]});
    let big = tokio::spawn({
        let request = client
            .post(gw.url("/v1/chat/completions"))
            .header("x-request-id", "long-estimate")
            .header("x-fake-usage", "omit")
            .json(&body);
        async move { request.send().await.unwrap() }
    });
    wait_until("the upstream answered the long request", PATIENCE, async || {
        gw.fake.reported().iter().any(|r| r.request_id.as_deref() == Some("long-estimate"))
    })
    .await;

    let health = gw.http.get(gw.url("/healthz")).send().await.unwrap();
    assert!(health.status().is_success());
    let quick = client.post(gw.url("/v1/chat/completions")).json(&json!({"model": "gpt-4.1", "messages": []})).send();
    assert_eq!(quick.await.unwrap().status(), 200);
    assert!(!big.is_finished(), "other requests were answered while the long estimate ran");

    let answer = big.await.unwrap();
    assert_eq!(answer.status(), 200);
    let cost: f64 = answer.headers()["x-tollgate-cost-usd"].to_str().unwrap().parse().unwrap();
    assert!(cost > 0.0, "the estimated usage is priced before the answer goes out");
    let records = ledger_records(&gw, 2).await;
    let record = records.iter().find(|r| r["request_id"] == "long-estimate").unwrap();
    assert_eq!(record["estimated"], true);
    assert!(record["prompt_tokens"].as_i64().unwrap() > 100_000, "{record}");
}

/// A stream keeps only a sample of its events for an estimate (memory per
/// open stream stays small); the sample's tokens are scaled by the bytes
/// seen. Its content here changes along the stream (`tok7 `, then `tok1234 `:
/// more tokens per chunk past the first thousand), so a sample of the
/// beginning alone would miss the second stream's longer end.
#[tokio::test]
async fn estimates_of_streams_longer_than_what_is_kept_follow_the_whole_stream() {
    let gw = TestGateway::start().await;
    let client = client_with_key(&gw.key);
    let body = json!({"model": "gpt-4.1", "stream": true, "messages": [{"role": "user", "content": "go"}]});
    let mut exact = HashMap::new();
    for (id, chunks) in [("long", "1500"), ("twice-as-long", "3000")] {
        let text = client
            .post(gw.url("/v1/chat/completions"))
            .header("x-request-id", id)
            .header("x-fake-usage", "omit")
            .header("x-fake-chunks", chunks)
            .json(&body)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(text.len() > 128 * 1024, "the stream is longer than what is kept: {} bytes", text.len());
        let content: String = text
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str::<Value>(data).ok())
            .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
            .collect();
        exact.insert(id, tiktoken_rs::o200k_base_singleton().encode_with_special_tokens(&content).len() as f64);
    }
    let records = ledger_records(&gw, 2).await;
    for id in ["long", "twice-as-long"] {
        let record = records.iter().find(|r| r["request_id"] == id).unwrap();
        assert_eq!(record["estimated"], true);
        let estimated = record["completion_tokens"].as_f64().unwrap();
        let error = (estimated - exact[id]).abs() / exact[id];
        assert!(error < 0.1, "{id}: estimated {estimated} tokens for {}: off by {:.1} %", exact[id], error * 100.0);
    }
    assert!(exact["twice-as-long"] > 2.1 * exact["long"], "the second stream's end says more per chunk: {exact:?}");
}
