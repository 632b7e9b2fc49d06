//! What the client sees when the upstream misbehaves.

use std::time::Duration;

use futures_util::StreamExt;
use tollgate_fake_upstream::{ErrorStyle, Fault};

use crate::helpers::{TestGateway, envelope};

const CHAT: &str = r#"{"model":"gpt-4.1","messages":[]}"#;
const STREAM: &str = r#"{"model":"gpt-4.1","stream":true,"messages":[]}"#;

#[tokio::test]
async fn an_unreachable_upstream_is_a_502_envelope() {
    // Bind then drop: nothing listens on that port any more.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let gw = TestGateway::start_with(|c| c.upstream.base_url = format!("http://{closed}/v1")).await;
    let response = gw.post_json("/v1/chat/completions", CHAT).await;
    assert_eq!(response.status(), 502);
    let body = envelope(response).await;
    assert_eq!(body["error"]["code"], "upstream_unavailable");
    assert!(!body["error"]["message"].as_str().unwrap().contains(&closed.to_string()), "no internal addresses");
}

#[tokio::test]
async fn a_redirect_or_an_html_page_is_a_502_envelope() {
    let gw = TestGateway::start().await;
    for fault in [Fault::Html301, Fault::Html200] {
        gw.fake.enqueue_fault(fault);
        let response = gw.post_json("/v1/chat/completions", CHAT).await;
        assert_eq!(response.status(), 502, "{fault:?}");
        assert_eq!(envelope(response).await["error"]["code"], "upstream_bad_response");
    }
    // A redirect is never followed.
    assert_eq!(gw.fake.requests().len(), 2);
}

#[tokio::test]
async fn a_connection_reset_before_the_answer_is_a_502_envelope() {
    let gw = TestGateway::start().await;
    gw.fake.enqueue_fault(Fault::Reset);
    let response = gw.post_json("/v1/chat/completions", CHAT).await;
    assert_eq!(response.status(), 502);
    assert_eq!(envelope(response).await["error"]["code"], "upstream_unavailable");
}

#[tokio::test]
async fn one_upstream_connection_carries_request_after_request_and_a_broken_one_is_replaced() {
    let gw = TestGateway::start().await;
    for body in [CHAT, STREAM, CHAT, STREAM, CHAT] {
        let response = gw.post_json("/v1/chat/completions", body).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    assert_eq!(gw.fake.connections(), 1, "answers read to their end leave the connection for the next");
    let opened = async || gw.metric(r#"tollgate_upstream_connections_opened_total{upstream="default"}"#).await;
    assert_eq!(opened().await, 1.0, "the connections the upstream saw are the ones counted");

    // The upstream closes the connection instead of answering: that request
    // fails, and the next goes on a new connection.
    gw.fake.enqueue_fault(Fault::Reset);
    assert_eq!(gw.post_json("/v1/chat/completions", CHAT).await.status(), 502);
    let response = gw.post_json("/v1/chat/completions", CHAT).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    assert_eq!(gw.fake.connections(), 2);
    assert_eq!(opened().await, 2.0);

    // A stream cut mid-way leaves its connection unusable: the next request
    // opens another.
    gw.fake.enqueue_fault(Fault::DropMidStream { after_chunks: 2 });
    let cut = gw.post_json("/v1/chat/completions", STREAM).await;
    assert_eq!(cut.status(), 200);
    let relayed = String::from_utf8(cut.bytes().await.unwrap().to_vec()).unwrap();
    assert!(relayed.contains("\"error\""), "the client is told the stream broke: {relayed}");
    let response = gw.post_json("/v1/chat/completions", CHAT).await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    assert_eq!(gw.fake.connections(), 3);
    assert_eq!(opened().await, 3.0);
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_time_is_a_504_envelope() {
    let gw = TestGateway::start_with(|c| c.upstream.first_byte_timeout = Duration::from_millis(300)).await;
    gw.fake.enqueue_fault(Fault::Stall);
    let response = gw.post_json("/v1/chat/completions", CHAT).await;
    assert_eq!(response.status(), 504);
    assert_eq!(envelope(response).await["error"]["code"], "upstream_timeout");
}

#[tokio::test]
async fn upstream_json_errors_pass_through_with_status_and_body() {
    let gw = TestGateway::start().await;
    for (status, style) in [(500, ErrorStyle::OpenAi), (429, ErrorStyle::Comet), (400, ErrorStyle::OpenAi)] {
        gw.fake.enqueue_fault(Fault::Status { status, style });
        let response = gw.post_json("/v1/chat/completions", CHAT).await;
        assert_eq!(response.status().as_u16(), status);
        let body: serde_json::Value = response.json().await.unwrap();
        let expected = tollgate_fake_upstream::responses::error_body(status, style);
        assert_eq!(body, expected, "body passed through untouched");
    }
}

#[tokio::test]
async fn a_stream_cut_by_the_upstream_ends_with_an_error_event() {
    let gw = TestGateway::start().await;
    gw.fake.enqueue_fault(Fault::DropMidStream { after_chunks: 2 });
    let response = gw.post_json("/v1/chat/completions", STREAM).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("the client stream ends cleanly");
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    assert_eq!(events.len(), 3, "{text}");
    assert!(events[2].starts_with(r#"data: {"error":"#), "{text}");
    assert!(events[2].contains("upstream_disconnected"));
}

#[tokio::test]
async fn a_stream_that_goes_silent_ends_with_an_error_event_after_the_idle_timeout() {
    let gw = TestGateway::start_with(|c| c.upstream.idle_timeout = Duration::from_millis(300)).await;
    gw.fake.enqueue_fault(Fault::StallMidStream { after_chunks: 1 });
    let response = gw.post_json("/v1/chat/completions", STREAM).await;
    let mut frames = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        frames.push(String::from_utf8(chunk.unwrap().to_vec()).unwrap());
    }
    let text = frames.concat();
    assert!(text.ends_with("\n\n"));
    assert!(text.contains("upstream_timeout"), "{text}");
}

#[tokio::test]
async fn a_stream_request_answered_with_an_error_passes_the_error_through() {
    let gw = TestGateway::start().await;
    gw.fake.enqueue_fault(Fault::Status { status: 503, style: ErrorStyle::Comet });
    let response = gw.post_json("/v1/chat/completions", STREAM).await;
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "comet_api_error");
}

/// A stream the upstream closed cleanly but before its end marker.
async fn truncated_stream(path: &str, body: &str) -> (String, serde_json::Value, String) {
    let gw = TestGateway::start().await;
    let response = gw
        .http
        .post(gw.url(path))
        .header("content-type", "application/json")
        .header("x-fake-fault", "end-after:2")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let text = response.text().await.expect("the client stream ends cleanly");
    let record = crate::accounting::ledger_record(&gw, &request_id).await;
    let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    (text, record, metrics)
}

#[tokio::test]
async fn a_chat_stream_closed_before_done_ends_with_an_error_event_and_a_flagged_record() {
    let (text, record, metrics) = truncated_stream("/v1/chat/completions", STREAM).await;
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    assert_eq!(events.len(), 3, "two chunks, then the error: {text}");
    assert!(events[2].starts_with(r#"data: {"error":"#), "{text}");
    assert!(events[2].contains("stream_truncated"), "{text}");
    assert!(!text.contains("[DONE]"));
    assert_eq!(record["error_class"], "upstream:stream_truncated", "{record}");
    assert_eq!(record["estimated"], true, "usage never came, so it is estimated: {record}");
    assert!(record["completion_tokens"].as_i64().unwrap() > 0, "{record}");
    assert!(
        metrics.contains(r#"tollgate_failures_total{code="stream_truncated",fault="upstream"} 1"#),
        "counted in the metrics"
    );
}

#[tokio::test]
async fn a_responses_stream_closed_before_its_terminal_event_ends_with_an_error_event() {
    let body = r#"{"model":"gpt-4.1","stream":true,"input":"hi"}"#;
    let (text, record, _) = truncated_stream("/v1/responses", body).await;
    assert!(!text.contains("response.completed"), "{text}");
    assert!(text.trim_end().ends_with('}') && text.contains("stream_truncated"), "{text}");
    assert_eq!(record["error_class"], "upstream:stream_truncated", "{record}");
}

#[tokio::test]
async fn a_complete_responses_stream_is_not_flagged() {
    let gw = TestGateway::start().await;
    let response = gw.post_json("/v1/responses", r#"{"model":"gpt-4.1","stream":true,"input":"hi"}"#).await;
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let text = response.text().await.unwrap();
    assert!(text.contains("response.completed") && !text.contains("stream_truncated"), "{text}");
    let record = crate::accounting::ledger_record(&gw, &request_id).await;
    assert!(record["error_class"].is_null(), "{record}");
}
