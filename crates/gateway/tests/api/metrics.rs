//! `/metrics` on the admin listener, after real traffic.

use crate::helpers::{PATIENCE, TestGateway, client_with_key, poll_for};

#[tokio::test]
async fn metrics_describe_traffic_with_bounded_labels_and_no_secrets() {
    let gw = TestGateway::start().await;
    let chat = r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}]}"#;
    let stream = r#"{"model":"gemini-2.5-flash","stream":true,"messages":[]}"#;
    gw.http.post(gw.url("/v1/chat/completions")).body(chat).send().await.unwrap().bytes().await.unwrap();
    gw.http.post(gw.url("/v1/chat/completions")).body(stream).send().await.unwrap().bytes().await.unwrap();
    gw.http
        .post(gw.url("/v1/chat/completions"))
        .body(r#"{"model":"some-unpriced-model","messages":[]}"#)
        .send()
        .await
        .unwrap();
    gw.http.post(gw.url("/v1/chat/completions")).header("x-fake-fault", "status:503").body(chat).send().await.unwrap();
    client_with_key("tg-aaaaaaaaaaaa-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb")
        .post(gw.url("/v1/chat/completions"))
        .body(chat)
        .send()
        .await
        .unwrap();
    gw.http.get(gw.url("/v1/models")).send().await.unwrap();

    let public = gw.anonymous.get(gw.url("/metrics")).send().await.unwrap();
    assert_eq!(public.status(), 404, "metrics are not on the public listener");
    let expected = [
        r#"tollgate_requests_total{api="openai",endpoint="/v1/chat/completions",model="gpt-4.1",status="2xx",stream="false",tenant="test"} 1"#,
        r#"tollgate_requests_total{api="openai",endpoint="/v1/chat/completions",model="gemini-2.5-flash",status="2xx",stream="true",tenant="test"} 1"#,
        r#"tollgate_requests_total{api="openai",endpoint="/v1/chat/completions",model="other",status="2xx",stream="false",tenant="test"} 1"#,
        r#"tollgate_requests_total{api="openai",endpoint="/v1/chat/completions",model="gpt-4.1",status="5xx",stream="false",tenant="test"} 1"#,
        r#"tollgate_failures_total{code="status_503",fault="upstream"} 1"#,
        r#"tollgate_auth_failures_total{reason="invalid_api_key"} 1"#,
        r#"tollgate_unpriced_requests_total{model="other"} 1"#,
        r#"tollgate_requests_total{api="openai",endpoint="/v1/models",model="other",status="2xx",stream="false",tenant="test"} 1"#,
        r#"tollgate_tokens_total{kind="prompt",model="gpt-4.1",tenant="test"}"#,
        r#"tollgate_cost_micros_total{api="openai",model="gpt-4.1",tenant="test"}"#,
        "tollgate_in_flight_requests 0",
        "tollgate_key_cache_keys 1",
        "tollgate_ledger_spool_bytes 0",
        r#"tollgate_gateway_overhead_seconds_bucket{le="0.0001"}"#,
        // Every request that went upstream: four chat completions and the model list.
        "tollgate_gateway_overhead_seconds_count 5",
        r#"tollgate_upstream_duration_seconds_count{endpoint="/v1/chat/completions",stream="true"} 1"#,
        r#"tollgate_upstream_duration_seconds_count{endpoint="/v1/chat/completions",stream="false"} 3"#,
        "tollgate_ledger_write_failures_total 0",
        r#"tollgate_build_info{version=""#,
        r#"tollgate_time_to_first_token_seconds_count{model="gemini-2.5-flash"} 1"#,
    ];
    // A request is counted when its record closes, which can follow the
    // client's last byte by a moment: scrape until every series is there.
    let scrape = async || gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let complete = async || {
        let text = scrape().await;
        expected.iter().all(|e| text.contains(e)).then_some(())
    };
    poll_for(PATIENCE, complete).await;
    let text = scrape().await;
    for expected in expected {
        assert!(text.contains(expected), "missing {expected}\n{text}");
    }
    assert!(!text.contains("some-unpriced-model"), "unpriced models are folded into `other`");
    assert!(!text.contains(&gw.key) && !text.contains("tg-aaaa"), "no key material in metrics");
}
