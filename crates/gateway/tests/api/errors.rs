//! Errors the gateway itself produces: always an OpenAI envelope, never
//! anything sent upstream.

use serde_json::json;

use crate::helpers::{TestGateway, envelope};

#[tokio::test]
async fn malformed_json_is_a_400_envelope_and_nothing_goes_upstream() {
    let gw = TestGateway::start().await;
    for body in [r#"{"model":"gpt-4.1","messages":["#, "not json", r#"["gpt-4.1"]"#, "", r#"{"model":42}"#] {
        let response = gw.post_json("/v1/chat/completions", body).await;
        assert_eq!(response.status(), 400, "{body:?}");
        let body = envelope(response).await;
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "invalid_json");
    }
    assert!(gw.fake.requests().is_empty());
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_before_anything_is_sent_upstream() {
    let gw = TestGateway::start_with(|c| c.server.max_body_bytes = 1024).await;
    let big = format!(r#"{{"model":"gpt-4.1","messages":[{{"role":"user","content":"{}"}}]}}"#, "a".repeat(2000));
    let response = gw.post_json("/v1/chat/completions", &big).await;
    assert_eq!(response.status(), 413);
    assert_eq!(envelope(response).await["error"]["code"], "request_too_large");

    // The same with no content-length (chunked): caught while streaming in.
    let chunks: Vec<Result<String, std::io::Error>> = vec![Ok(big[..600].to_owned()), Ok(big[600..].to_owned())];
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    envelope(response).await;

    // At the limit is fine.
    let fits = format!(r#"{{"model":"gpt-4.1","pad":"{}"}}"#, "a".repeat(1024 - 28));
    assert_eq!(fits.len(), 1024);
    assert_eq!(gw.post_json("/v1/chat/completions", &fits).await.status(), 200);
    assert_eq!(gw.fake.requests().len(), 1, "only the request within the limit was forwarded");
}

#[tokio::test]
async fn the_default_limit_accepts_a_seven_megabyte_inline_image() {
    let gw = TestGateway::start().await;
    let image = "A".repeat(7 * 1024 * 1024);
    let body = format!(
        r#"{{"model":"gemini-2.5-flash","messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}]}}"#
    );
    let response = gw.post_json("/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    assert_eq!(gw.fake.requests()[0].body.len(), body.len());
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405_envelopes() {
    let gw = TestGateway::start().await;
    for path in ["/v1/nope", "/", "/v2/chat/completions"] {
        let response = gw.http.get(gw.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(envelope(response).await["error"]["code"], "unknown_url");
    }
    // Near misses of the paths dispatched before the router reach the router.
    for path in ["/v1/chat/completions/", "/V1/chat/completions", "/v1/chat/completions/x", "/v1/embedding"] {
        let response = gw.http.post(gw.url(path)).bearer_auth(&gw.key).json(&json!({})).send().await.unwrap();
        assert_eq!(response.status(), 404, "{path}");
        assert!(response.headers().contains_key("x-request-id"), "{path}");
        assert_eq!(envelope(response).await["error"]["code"], "unknown_url");
    }
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"] {
        let response = gw.http.get(gw.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 405, "{path}");
        assert_eq!(envelope(response).await["error"]["code"], "method_not_allowed");
    }
    let response = gw.http.delete(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    envelope(response).await;
    assert!(gw.fake.requests().is_empty());
}
