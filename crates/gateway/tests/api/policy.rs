//! Tenant token and thinking policy, through HTTP.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{PATIENCE, TestGateway, client_with_key, envelope, wait_for};

#[tokio::test]
async fn caps_are_clamped_or_rejected_defaults_injected_and_changes_recorded() {
    let gw = TestGateway::start().await;
    let policy = json!({"max_output_tokens": 4096, "max_thinking_budget": 2048, "default_thinking_budget": 512,
        "max_reasoning_effort": "low"});
    let (status, tenant) = gw
        .admin(Method::POST, "/admin/v1/tenants", Some(json!({"id": "capped", "display_name": "C", "policy": policy})))
        .await;
    assert_eq!(status, 201, "{tenant}");
    assert_eq!(tenant["policy"]["max_output_tokens"], 4096);
    let key = gw.create_key("capped", json!({"name": "k"})).await;
    let client = client_with_key(&key);

    let body = json!({"model": "gemini-2.5-pro", "max_tokens": 9000, "reasoning_effort": "high", "messages": [],
        "google": {"thinking_config": {"thinking_budget": 8000}}});
    let r =
        client.post(gw.url("/v1/chat/completions")).header("x-request-id", "clamped").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let default = json!({"model": "gemini-2.5-flash", "messages": []});
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .header("x-request-id", "defaulted")
        .json(&default)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sent = gw.fake.requests();
    let clamped = sent[0].json();
    assert_eq!(clamped["max_tokens"], 4096);
    assert_eq!(clamped["reasoning_effort"], "low");
    assert_eq!(clamped["google"]["thinking_config"]["thinking_budget"], 2048);
    let defaulted = sent[1].json();
    assert_eq!(defaulted["max_tokens"], 4096, "the cap is the default when none is set");
    assert_eq!(defaulted["google"]["thinking_config"]["thinking_budget"], 512);

    // The default tenant has no policy: its requests go through untouched.
    let untouched = r#"{"model":"gemini-2.5-pro","max_tokens":9000,"messages":[]}"#;
    gw.http.post(gw.url("/v1/chat/completions")).body(untouched).send().await.unwrap();
    assert_eq!(&gw.fake.requests()[2].body[..], untouched.as_bytes());

    // Changed requests are recorded as such.
    let modified = wait_for("the record of the clamped request", PATIENCE, async || {
        let (_, page) = gw.admin(Method::GET, "/admin/v1/usage/records?tenant_id=capped", None).await;
        page["data"].as_array().unwrap().iter().find(|r| r["request_id"] == "clamped").map(|r| r["modified"].clone())
    })
    .await;
    assert_eq!(modified, json!(true));

    // Reject mode names the field and sends nothing upstream.
    let (status, _) = gw
        .admin(
            Method::PATCH,
            "/admin/v1/tenants/capped",
            Some(json!({"policy": {"max_output_tokens": 100, "over_cap": "reject"}})),
        )
        .await;
    assert_eq!(status, 200);
    let before = gw.fake.requests().len();
    let r = client
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "gpt-4.1", "max_completion_tokens": 101, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = envelope(r).await;
    assert_eq!(
        (body["error"]["code"].as_str(), body["error"]["param"].as_str()),
        (Some("over_policy_cap"), Some("max_completion_tokens"))
    );
    assert_eq!(gw.fake.requests().len(), before);

    let (status, bad) = gw
        .admin(
            Method::PATCH,
            "/admin/v1/tenants/capped",
            Some(json!({"policy": {"max_output_tokens": 10, "default_max_output_tokens": 20}})),
        )
        .await;
    assert_eq!((status, bad["error"]["param"].as_str()), (400, Some("policy.default_max_output_tokens")));
}
