//! Graceful shutdown: stop accepting, let in-flight work finish, then exit.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::helpers::{PATIENCE, TestGateway, wait_until};

const SLOW_STREAM: &str = r#"{"model":"gpt-4.1","stream":true,"messages":[]}"#;

#[tokio::test]
async fn an_in_flight_stream_finishes_after_shutdown_begins_and_new_connections_are_refused() {
    let mut gw = TestGateway::start().await;
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("x-fake-chunks", "5")
        .header("x-fake-chunk-interval-ms", "100")
        .body(SLOW_STREAM)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();

    let server = gw.begin_shutdown();
    // A fresh client each time: a new connection, never a pooled one.
    wait_until("new connections refused once shutdown began", PATIENCE, async || {
        reqwest::Client::new().get(gw.url("/healthz")).send().await.is_err()
    })
    .await;

    let mut text = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = stream.next().await {
        text.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "the stream ran to its end: {text}");
    server.await.unwrap().unwrap();
    assert_eq!(gw.fake.streams_completed(), 1);
}

#[tokio::test]
async fn shutdown_gives_up_on_stuck_streams_after_the_grace_period() {
    let mut gw = TestGateway::start_with(|c| c.server.shutdown_grace = Duration::from_millis(300)).await;
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("x-fake-fault", "stall-after:1")
        .body(SLOW_STREAM)
        .send()
        .await
        .unwrap();
    let mut stream = response.bytes_stream();
    stream.next().await.unwrap().unwrap();

    let started = Instant::now();
    let server = gw.begin_shutdown();
    tokio::time::timeout(Duration::from_secs(5), server).await.expect("server stops").unwrap().unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "{took:?}");
}
