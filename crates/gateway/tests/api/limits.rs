//! Rate limits through HTTP: requests, tokens and in-flight requests per
//! tenant and per key, with the headers and errors the SDKs understand.
//! Tests that count within a minute put the gateway's clock at the start of
//! one, so no window boundary falls in the middle of them.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::json;

use crate::helpers::{PATIENCE, TestGateway, client_with_key, envelope, wait_until};

async fn tenant_with(
    gw: &TestGateway,
    id: &str,
    policy: serde_json::Value,
    key_limits: serde_json::Value,
) -> reqwest::Client {
    let (status, body) = gw
        .admin(Method::POST, "/admin/v1/tenants", Some(json!({"id": id, "display_name": id, "policy": policy})))
        .await;
    assert_eq!(status, 201, "{body}");
    client_with_key(&gw.create_key(id, json!({"name": "k", "limits": key_limits})).await)
}

const CHAT: &str = r#"{"model":"gpt-4.1","messages":[]}"#;

#[tokio::test]
async fn requests_per_minute_are_enforced_exactly_with_headers() {
    let gw = TestGateway::start().await;
    let client = tenant_with(&gw, "rpm", json!({"limits": {"rpm": 5}}), json!({})).await;
    gw.clock.to_next_minute();
    for i in 0..5 {
        let r = client.post(gw.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i}");
        let h = r.headers();
        assert_eq!(h["x-ratelimit-limit-requests"], "5");
        assert_eq!(h["x-ratelimit-remaining-requests"], (4 - i).to_string().as_str());
        assert!(h["x-ratelimit-reset-requests"].to_str().unwrap().ends_with('s'));
    }
    let refused = client.post(gw.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_ms: u64 = refused.headers()["retry-after-ms"].to_str().unwrap().parse().unwrap();
    assert!(retry_ms > 0 && retry_ms <= 60_000);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["x-should-retry"], "true");
    assert_eq!(refused.headers()["x-ratelimit-remaining-requests"], "0");
    let body = envelope(refused).await;
    assert_eq!(
        (body["error"]["code"].as_str(), body["error"]["type"].as_str()),
        (Some("rate_limit_exceeded"), Some("requests"))
    );
    assert_eq!(
        gw.fake.requests().iter().filter(|r| r.path == "/v1/chat/completions").count(),
        5,
        "refused requests stay here"
    );
    // Other tenants are not affected.
    assert_eq!(gw.http.post(gw.url("/v1/chat/completions")).body(CHAT).send().await.unwrap().status(), 200);

    // The next minute brings a new allowance.
    gw.clock.advance(Duration::from_secs(60));
    let next = client.post(gw.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
    assert_eq!(next.status(), 200, "a new minute, a new allowance");
    assert_eq!(next.headers()["x-ratelimit-remaining-requests"], "4");
}

#[tokio::test]
async fn a_key_limit_applies_on_top_of_its_tenants() {
    let gw = TestGateway::start().await;
    let client = tenant_with(&gw, "keyed", json!({"limits": {"rpm": 100}}), json!({"rpm": 2})).await;
    gw.clock.to_next_minute();
    for _ in 0..2 {
        assert_eq!(client.post(gw.url("/v1/chat/completions")).body(CHAT).send().await.unwrap().status(), 200);
    }
    assert_eq!(client.post(gw.url("/v1/chat/completions")).body(CHAT).send().await.unwrap().status(), 429);
}

#[tokio::test]
async fn tokens_are_reserved_while_in_flight_and_corrected_after() {
    let gw = TestGateway::start().await;
    let client = tenant_with(&gw, "tpm", json!({"limits": {"tpm": 1000}}), json!({})).await;
    gw.clock.to_next_minute();
    let big = json!({"model": "gpt-4.1", "max_tokens": 900, "stream": true, "messages": []});
    let held = client
        .post(gw.url("/v1/chat/completions"))
        .header("x-fake-chunks", "3")
        .header("x-fake-chunk-interval-ms", "300")
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    let refused = client.post(gw.url("/v1/chat/completions")).json(&big).send().await.unwrap();
    assert_eq!(refused.status(), 429, "900 reserved by the stream in flight");
    assert_eq!(envelope(refused).await["error"]["type"], "tokens");
    held.bytes().await.unwrap();
    // The stream used a handful of tokens: its reservation shrank to that.
    let after = client.post(gw.url("/v1/chat/completions")).json(&big).send().await.unwrap();
    assert_eq!(after.status(), 200);
    assert!(after.headers()["x-ratelimit-remaining-tokens"].to_str().unwrap().parse::<u64>().unwrap() < 100);

    let too_large = json!({"model": "gpt-4.1", "max_tokens": 5000, "messages": []});
    let r = client.post(gw.url("/v1/chat/completions")).json(&too_large).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["x-should-retry"], "false", "a request bigger than the limit can never pass");
}

#[tokio::test]
async fn in_flight_requests_are_capped_and_released_when_streams_end_or_clients_leave() {
    let gw = TestGateway::start().await;
    let client = tenant_with(&gw, "conc", json!({"limits": {"max_concurrent": 2}}), json!({})).await;
    let slow = |c: &reqwest::Client| {
        c.post(gw.url("/v1/chat/completions"))
            .header("x-fake-chunks", "20")
            .header("x-fake-chunk-interval-ms", "100")
            .body(r#"{"model":"gpt-4.1","stream":true,"messages":[]}"#)
            .send()
    };
    let first = slow(&client).await.unwrap();
    let second = slow(&client).await.unwrap();
    let third = client.post(gw.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "1");

    // A client that leaves frees its slot.
    let mut stream = first.bytes_stream();
    stream.next().await.unwrap().unwrap();
    drop(stream);
    wait_until("the slot of the departed client is released", PATIENCE, async || {
        client.post(gw.url("/v1/chat/completions")).body(CHAT).send().await.unwrap().status() == 200
    })
    .await;
    drop(second);
}
