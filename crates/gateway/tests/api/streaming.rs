//! SSE relay: frame by frame, untouched, cancelled with the client.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::helpers::{PATIENCE, TestGateway, wait_until};

const STREAM_BODY: &str = r#"{"model":"gemini-2.5-flash","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test]
async fn stream_bytes_arrive_exactly_as_the_upstream_sent_them() {
    let gw = TestGateway::start().await;
    let direct = reqwest::Client::new()
        .post(format!("{}/chat/completions", gw.fake.base_url()))
        .body(STREAM_BODY)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();

    let response = gw.post_json("/v1/chat/completions", STREAM_BODY).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert!(!response.headers().contains_key("content-encoding"), "event streams are never compressed");
    assert!(!response.headers().contains_key("content-length"));
    let via_gateway = response.bytes().await.unwrap();
    assert_eq!(via_gateway, direct);
    assert!(via_gateway.ends_with(b"data: [DONE]\n\n"));
}

#[tokio::test]
async fn frames_are_forwarded_as_they_arrive_not_buffered() {
    let gw = TestGateway::start().await;
    let started = Instant::now();
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("x-fake-chunks", "4")
        .header("x-fake-chunk-interval-ms", "150")
        .body(STREAM_BODY)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let mut arrivals = Vec::new();
    let mut total = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        arrivals.push(started.elapsed());
        total.extend_from_slice(&chunk);
    }
    // 1 role chunk + 4 content + 1 finish + [DONE], 150 ms apart.
    assert!(arrivals.len() >= 7, "frames coalesced: {arrivals:?}");
    assert!(arrivals[0] < Duration::from_millis(120), "first frame held back: {arrivals:?}");
    let last = *arrivals.last().unwrap();
    assert!(last >= Duration::from_millis(850), "{arrivals:?}");
    assert!(total.ends_with(b"data: [DONE]\n\n"));
}

#[tokio::test]
async fn tool_call_deltas_and_multiple_choices_stream_through() {
    let gw = TestGateway::start().await;
    let body = r#"{"model":"gpt-4.1","stream":true,"n":2,"messages":[],
        "tools":[{"type":"function","function":{"name":"get_weather","parameters":{}}}]}"#;
    let text = gw.post_json("/v1/chat/completions", body).await.text().await.unwrap();
    assert!(text.contains(r#""name":"get_weather""#));
    assert!(text.contains(r#""index":1"#), "second choice present");
    assert!(text.contains(r#""finish_reason":"tool_calls""#));
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_stream() {
    let gw = TestGateway::start().await;
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("x-fake-chunks", "50")
        .header("x-fake-chunk-interval-ms", "100")
        .body(STREAM_BODY)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(stream);

    wait_until("the upstream sees the stream cancelled", PATIENCE, async || gw.fake.streams_cancelled() == 1).await;
    assert_eq!(gw.fake.streams_completed(), 0);
}

#[tokio::test]
async fn a_client_that_asked_for_usage_gets_the_usage_chunk() {
    let gw = TestGateway::start().await;
    let body = r#"{"model":"gpt-4.1","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let text = gw.post_json("/v1/chat/completions", body).await.text().await.unwrap();
    assert!(text.contains(r#""choices":[],"#), "usage chunk present: {text}");
    assert!(text.contains(r#""prompt_tokens""#));
}

#[tokio::test]
async fn responses_api_streams_named_events() {
    let gw = TestGateway::start().await;
    let body = r#"{"model":"gpt-4.1","stream":true,"input":"hi"}"#;
    let text = gw.post_json("/v1/responses", body).await.text().await.unwrap();
    assert!(text.starts_with("event: response.created\ndata: "), "{text}");
    assert!(text.trim_end().ends_with('}'), "no [DONE] is invented for the responses API");
    assert!(text.contains("event: response.completed"));
}
