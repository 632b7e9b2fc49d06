use serde_json::Value;

use crate::helpers::{TestGateway, UPSTREAM_KEY};

#[tokio::test]
async fn chat_request_bytes_reach_the_upstream_untouched_and_the_answer_comes_back_untouched() {
    let gw = TestGateway::start().await;
    // Odd spacing, key order and fields the gateway does not know about must
    // all survive: the gateway forwards the client's bytes.
    let body = r#"{ "messages":[{"role":"user","content":[{"type":"text","text":"hé"},{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}],
        "model" : "gemini-2.5-flash", "reasoning_effort":"low",
        "extra_body":{"google":{"thinking_config":{"thinking_budget":1024}}},
        "tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}],
        "response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{}}}}"#;
    let response = gw.post_json("/v1/chat/completions", body).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(response.headers()["x-upstream-request-id"], "fake-upstream-request");
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["provider_specific"]["untouched"], true, "unknown response fields pass through");
    assert_eq!(answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "get_weather");

    let sent = gw.fake.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/v1/chat/completions");
    assert_eq!(&sent[0].body[..], body.as_bytes(), "body forwarded byte for byte");
}

#[tokio::test]
async fn the_gateway_sends_its_upstream_key_and_never_the_clients() {
    let gw = TestGateway::start().await;
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&gw.key)
        .header("api-key", &gw.key)
        .header("x-api-key", &gw.key)
        .header("openai-beta", "assistants=v2")
        .header("x-stainless-lang", "python")
        .header("cookie", "session=1")
        .body(r#"{"model":"gpt-4.1","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let sent = &gw.fake.requests()[0];
    assert_eq!(sent.headers["authorization"], format!("Bearer {UPSTREAM_KEY}"));
    for dropped in ["api-key", "x-api-key", "cookie"] {
        assert!(!sent.headers.contains_key(dropped), "{dropped} must not reach the upstream");
    }
    let all_headers = format!("{:?}", sent.headers);
    assert!(!all_headers.contains(&gw.key), "client key leaked upstream: {all_headers}");
    assert_eq!(sent.headers["openai-beta"], "assistants=v2");
    assert_eq!(sent.headers["x-stainless-lang"], "python");
    // The upstream's own authority, once, never the gateway's.
    let upstream_host = gw.fake.addr().to_string();
    assert_eq!(sent.headers.get_all("host").iter().collect::<Vec<_>>(), [upstream_host.as_str()]);
}

#[tokio::test]
async fn every_proxied_endpoint_reaches_the_matching_upstream_path() {
    let gw = TestGateway::start().await;
    let cases = [
        ("/v1/completions", r#"{"model":"gpt-4.1","prompt":"hi"}"#, "text_completion"),
        ("/v1/embeddings", r#"{"model":"text-embedding-3-small","input":["a","b"]}"#, "list"),
        ("/v1/responses", r#"{"model":"gpt-4.1","input":"hi"}"#, "response"),
    ];
    for (path, body, object) in cases {
        let response = gw.post_json(path, body).await;
        assert_eq!(response.status(), 200, "{path}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["object"], object, "{path}: {answer}");
    }
    let models: Value = gw.http.get(gw.url("/v1/models")).send().await.unwrap().json().await.unwrap();
    assert_eq!(models["object"], "list");
    assert!(models["data"].as_array().unwrap().iter().any(|m| m["id"] == "gemini-2.5-flash"));

    let model = gw.http.get(gw.url("/v1/models/gemini-2.5-pro")).send().await.unwrap();
    assert_eq!(model.status(), 200);
    assert_eq!(model.json::<Value>().await.unwrap()["id"], "gemini-2.5-pro");

    let paths: Vec<String> = gw.fake.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        ["/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/models", "/v1/models/gemini-2.5-pro"]
    );
}

#[tokio::test]
async fn model_ids_with_slashes_are_forwarded_and_client_queries_are_not() {
    let gw = TestGateway::start().await;
    let response = gw.http.get(gw.url("/v1/models/google/gemini-2.5-flash?view=full")).send().await.unwrap();
    // The fake does not know this id: its 404 JSON error passes through.
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(gw.fake.requests()[0].path, "/v1/models/google/gemini-2.5-flash", "no endpoint here defines a query");
    let chat = gw
        .http
        .post(gw.url("/v1/chat/completions?api-version=1&key=x"))
        .json(&serde_json::json!({"model": "gpt-4.1", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    assert_eq!(gw.fake.requests()[1].path, "/v1/chat/completions");
}

#[tokio::test]
async fn embeddings_in_base64_pass_through_unchanged() {
    let gw = TestGateway::start().await;
    let response = gw
        .post_json("/v1/embeddings", r#"{"model":"text-embedding-3-small","input":"x","encoding_format":"base64"}"#)
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let encoded = body["data"][0]["embedding"].as_str().expect("base64 string");
    assert_eq!(encoded.len() % 4, 0);
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_sane_client_request_id_is_kept_and_forwarded_and_an_insane_one_replaced() {
    let gw = TestGateway::start().await;
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "trace-42.a:b_c")
        .body(r#"{"model":"gpt-4.1","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "trace-42.a:b_c");
    assert_eq!(gw.fake.requests()[0].headers["x-request-id"], "trace-42.a:b_c");

    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "x".repeat(300))
        .body(r#"{"model":"gpt-4.1","messages":[]}"#)
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(id.starts_with("req_"), "{id}");
    assert_eq!(gw.fake.requests()[1].headers["x-request-id"], id.as_str());
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let gw = TestGateway::start().await;
    let health = gw.http.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = gw.http.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "ready");
    assert!(gw.fake.requests().is_empty(), "health checks do not touch the upstream");
}
