//! A hostile or careless tenant, through the real gateway: it cannot stop
//! accounting, reach the operator's upstream account, dodge billing or
//! caps, or flood the metrics.

use serde_json::{Value, json};

use crate::helpers::{Db, PATIENCE, TestGateway, client_with_key, envelope, wait_until};

async fn metrics(gw: &TestGateway) -> String {
    gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap()
}

#[tokio::test]
async fn oversized_or_strange_model_names_are_refused_before_anything_is_forwarded() {
    let gw = TestGateway::start().await;
    for model in ["a".repeat(3000), "gpt\n4".to_owned(), "gpt 4 <script>".to_owned(), "модель".to_owned()] {
        let response =
            gw.http.post(gw.url("/v1/chat/completions")).json(&json!({"model": model, "messages": []})).send().await;
        let response = response.unwrap();
        assert_eq!(response.status(), 400, "{model:?}");
        let body = envelope(response).await;
        assert_eq!(body["error"]["code"], "invalid_model");
        assert_eq!(body["error"]["param"], "model");
        assert!(body["error"]["message"].as_str().unwrap().len() < 200, "the name is not echoed");
    }
    assert!(gw.fake.requests().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn a_record_the_database_refuses_is_set_aside_and_accounting_goes_on_for_everyone() {
    let db = tollgate_store::testing::TestDatabase::postgres().await;
    let gw = TestGateway::start_full(
        tollgate_fake_upstream::FakeUpstream::start().await.unwrap(),
        Db::Url(db.url.clone()),
        |_| {},
    )
    .await;
    // Any record the database will never take: here, a tenant a trigger refuses.
    let store = tollgate_store::Store::connect(&db.url, 1).await.unwrap();
    for sql in [
        "CREATE FUNCTION refuse_poison() RETURNS trigger AS $$ BEGIN \
         IF NEW.tenant_id = 'poison' THEN RAISE EXCEPTION 'this record cannot be stored'; END IF; \
         RETURN NEW; END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON usage_events FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ] {
        sqlx::query(sql).execute(store.pool()).await.unwrap();
    }
    gw.ensure_tenant("poison").await;
    let poison = client_with_key(&gw.create_key("poison", json!({"name": "k"})).await);
    let chat = json!({"model": "gpt-4.1", "messages": []});
    let poisoned = poison.post(gw.url("/v1/chat/completions")).json(&chat).send().await.unwrap();
    assert_eq!(poisoned.status(), 200);
    let poisoned_id = poisoned.headers()["x-request-id"].to_str().unwrap().to_owned();
    for _ in 0..5 {
        assert_eq!(gw.http.post(gw.url("/v1/chat/completions")).json(&chat).send().await.unwrap().status(), 200);
    }

    wait_until("the other tenant's records are written", PATIENCE, async || {
        store.count_usage_events().await.unwrap() == 5
    })
    .await;
    let dead_letters = gw.data_dir().join("spool").join("dead-letter.jsonl");
    wait_until("the refused record is set aside", PATIENCE, async || {
        std::fs::read_to_string(&dead_letters).is_ok_and(|t| t.contains(&poisoned_id))
    })
    .await;
    // Later records are not queued behind it.
    assert_eq!(gw.http.post(gw.url("/v1/chat/completions")).json(&chat).send().await.unwrap().status(), 200);
    wait_until("accounting goes on", PATIENCE, async || store.count_usage_events().await.unwrap() == 6).await;
    let ready: Value = gw.anonymous.get(gw.admin_url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    assert_eq!(ready["accounting"]["state"], "ok", "{ready}");
    assert_eq!(ready["accounting"]["dead_letters"], 1, "{ready}");
    assert!(metrics(&gw).await.contains("tollgate_ledger_dead_letters_total 1"));
}

/// Sends `GET path` exactly as written (HTTP clients normalise dot
/// segments away) and returns the status and body.
async fn raw_get(gw: &TestGateway, path: &str, key: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let status = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, answer)
}

#[tokio::test]
async fn model_ids_that_walk_the_upstream_tree_are_refused() {
    let gw = TestGateway::start().await;
    let restricted = gw.create_key("test", json!({"name": "g", "allowed_models": ["gemini-*"]})).await;
    for path in [
        "/v1/models/..",
        "/v1/models/..%2F..%2Ffiles",
        "/v1/models/%2e%2e",
        "/v1/models/%2E%2E/files",
        "/v1/models/a/../../files",
        "/v1/models/gemini-x/../../stats",
        "/v1/models/gemini-x%2F..%2F..%2Fstats",
        "/v1/models/gemini-x%5C..%5Cstats",
        "/v1/models/gemini%ff",
    ] {
        for key in [gw.key.as_str(), restricted.as_str()] {
            let (status, answer) = raw_get(&gw, path, key).await;
            assert_eq!(status, 400, "{path}: {answer}");
            assert!(answer.contains("invalid_model"), "{path}: {answer}");
        }
    }
    assert!(gw.fake.requests().is_empty(), "nothing reached the upstream: {:?}", gw.fake.requests());
}

#[tokio::test]
async fn a_null_stream_options_cannot_escape_billing() {
    let gw = TestGateway::start().await;
    let body = r#"{"model":"gemini-2.5-flash","stream":true,"stream_options":null,"messages":[{"role":"user","content":"hi"}]}"#;
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-fake-usage-style", "gemini")
        .header("x-fake-reasoning-tokens", "38")
        .body(body)
        .send()
        .await
        .unwrap();
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let text = response.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n") && !text.contains("\"usage\""), "the client asked for no usage: {text}");
    let sent = String::from_utf8(gw.fake.requests()[0].body.to_vec()).unwrap();
    assert_eq!(sent.matches("stream_options").count(), 1, "exactly one member: {sent}");
    assert_eq!(gw.fake.requests()[0].json()["stream_options"]["include_usage"], true);
    let record = crate::accounting::ledger_record(&gw, &request_id).await;
    assert_eq!(record["estimated"], false, "billed from the upstream's own usage: {record}");
    assert!(record["billed_output_tokens"].as_i64().unwrap() >= 38, "hidden thinking billed: {record}");
}

#[tokio::test]
async fn a_missing_model_is_refused_on_every_endpoint_and_never_slips_past_an_allow_list() {
    let gw = TestGateway::start().await;
    let restricted =
        client_with_key(&gw.create_key("test", json!({"name": "g", "allowed_models": ["gemini-*"]})).await);
    for (path, body) in [
        ("/v1/chat/completions", json!({"messages": []})),
        ("/v1/chat/completions", json!({"model": null, "messages": []})),
        ("/v1/completions", json!({"prompt": "x"})),
        ("/v1/embeddings", json!({"input": "x"})),
        ("/v1/embeddings", json!({"model": null, "input": "x"})),
        ("/v1/responses", json!({"input": "x"})),
    ] {
        let response = restricted.post(gw.url(path)).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 400, "{path} {body}");
        let envelope = envelope(response).await;
        assert_eq!(envelope["error"]["code"], "missing_required_parameter");
        assert_eq!(envelope["error"]["param"], "model");
    }
    assert!(gw.fake.requests().is_empty());
}

#[tokio::test]
async fn policy_caps_hold_however_and_wherever_the_setting_is_spelled() {
    let gw = TestGateway::start().await;
    let client = gw
        .tenant_with_policy(
            "capped",
            json!({"max_thinking_budget": 1024, "max_reasoning_effort": "low", "over_cap": "clamp"}),
        )
        .await;
    let sneaky = json!({"model": "gemini-2.5-pro", "messages": [],
        "google": {"thinking_config": {"thinking_budget": 512}},
        "extra_body": {"google": {"thinking_config": {"thinking_budget": 24576}}}});
    let camel =
        json!({"model": "gemini-2.5-pro", "messages": [], "google": {"thinkingConfig": {"thinkingBudget": 24576}}});
    let effort = json!({"model": "o3", "input": "x", "reasoning": {"effort": "high"}});
    for (path, body) in
        [("/v1/chat/completions", &sneaky), ("/v1/chat/completions", &camel), ("/v1/responses", &effort)]
    {
        assert_eq!(client.post(gw.url(path)).json(body).send().await.unwrap().status(), 200);
    }
    let sent = gw.fake.requests();
    assert_eq!(sent[0].json()["google"]["thinking_config"]["thinking_budget"], 512);
    assert_eq!(sent[0].json()["extra_body"]["google"]["thinking_config"]["thinking_budget"], 1024);
    assert_eq!(sent[1].json()["google"]["thinkingConfig"]["thinkingBudget"], 1024);
    assert_eq!(sent[2].json()["reasoning"]["effort"], "low");

    let strict = gw.tenant_with_policy("strict", json!({"max_thinking_budget": 1024, "over_cap": "reject"})).await;
    let response = strict.post(gw.url("/v1/chat/completions")).json(&sneaky).send().await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(envelope(response).await["error"]["code"], "over_policy_cap");
    assert_eq!(gw.fake.requests().len(), 3, "the over-cap request was not forwarded");
}

#[tokio::test]
async fn the_larger_output_limit_counts_against_token_limits() {
    let gw = TestGateway::start().await;
    let client = gw.tenant_with_policy("tpm", json!({"limits": {"tpm": 1000}})).await;
    let body = json!({"model": "gpt-4.1", "max_completion_tokens": 1, "max_tokens": 100000, "messages": []});
    let response = client.post(gw.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["x-should-retry"], "false", "it can never fit");
    assert!(gw.fake.requests().is_empty());
}

#[tokio::test]
async fn raw_paths_never_become_metric_labels() {
    let gw = TestGateway::start().await;
    gw.http.get(gw.url("/v1/models/warm-up")).send().await.unwrap();
    let before = metrics(&gw).await.len();
    for i in 0..200 {
        gw.http.get(gw.url(&format!("/v1/models/random-id-{i}"))).send().await.unwrap();
    }
    let after = metrics(&gw).await;
    assert!(!after.contains("random-id"), "no id in any label");
    assert!(after.len() < before + 2_000, "series stay bounded: {} -> {} bytes", before, after.len());
}

#[tokio::test]
async fn the_upstream_account_headers_never_reach_tenants() {
    let gw = TestGateway::start().await;
    let chat = json!({"model": "gpt-4.1", "messages": []});
    let stream = json!({"model": "gpt-4.1", "stream": true, "messages": []});
    for body in [&chat, &stream] {
        let response = gw.http.post(gw.url("/v1/chat/completions")).json(body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        for (name, _) in tollgate_fake_upstream::ACCOUNT_HEADERS {
            assert!(!response.headers().contains_key(*name), "{name} reached the tenant");
        }
        assert_eq!(response.headers()["x-upstream-request-id"], "fake-upstream-request");
    }
}

#[tokio::test]
async fn only_allowed_client_headers_reach_the_upstream() {
    let gw = TestGateway::start().await;
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("openai-organization", "org-operator-second-account")
        .header("openai-project", "proj_other")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("x-custom-tracking", "1")
        .header("x-stainless-lang", "python")
        .header("user-agent", "a".repeat(64 * 1024))
        .body(r#"{"model":"gpt-4.1","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "oversized headers are dropped, not forwarded to fail upstream");
    let headers = &gw.fake.requests()[0].headers;
    for name in ["openai-organization", "openai-project", "x-hop", "x-custom-tracking", "user-agent", "connection"] {
        assert!(!headers.contains_key(name), "{name} was forwarded");
    }
    assert_eq!(headers["x-stainless-lang"], "python");
    assert_eq!(headers["authorization"], format!("Bearer {}", crate::helpers::UPSTREAM_KEY));
}

#[tokio::test]
async fn the_upstream_refusing_the_gateways_key_is_a_502_that_names_no_key() {
    let gw = TestGateway::start().await;
    for status in ["401", "403"] {
        let response = gw
            .http
            .post(gw.url("/v1/chat/completions"))
            .header("x-fake-fault", format!("status:{status}"))
            .json(&json!({"model": "gpt-4.1", "messages": []}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 502);
        assert_eq!(response.headers()["x-should-retry"], "false");
        let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
        let body = envelope(response).await;
        assert_eq!(body["error"]["code"], "upstream_auth_failed");
        assert_eq!(body["error"]["type"], "server_error");
        let record = crate::accounting::ledger_record(&gw, &request_id).await;
        assert_eq!(record["error_class"], "gateway:upstream_auth_failed");
    }
}

#[tokio::test]
async fn a_nul_in_a_path_or_query_is_a_client_error_on_both_listeners() {
    let gw =
        TestGateway::start_full(tollgate_fake_upstream::FakeUpstream::start().await.unwrap(), Db::Postgres, |_| {})
            .await;
    for (url, status, code) in [
        (gw.url("/v1/usage?model=%00"), 400, "validation_failed"),
        (gw.url("/v1/usage/records?model=a%00b"), 400, "validation_failed"),
        (gw.url("/v1/models/a%00"), 400, "invalid_model"),
        (gw.admin_url("/admin/v1/usage/summary?tenant_id=%00"), 400, "validation_failed"),
        (gw.admin_url("/admin/v1/tenants/%00"), 404, "not_found"),
    ] {
        let client = if url.contains("/admin/") { &gw.anonymous } else { &gw.http };
        let response = client.get(&url).bearer_auth_if(url.contains("/admin/")).send().await.unwrap();
        assert_eq!(response.status(), status, "{url}");
        assert_eq!(envelope(response).await["error"]["code"], code, "{url}");
    }
    assert!(gw.fake.requests().is_empty());
    // The tenant key still works on the public listener.
    let ok = gw.http.get(gw.url("/v1/usage?model=gpt-4.1")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

trait AdminAuth {
    fn bearer_auth_if(self, admin: bool) -> Self;
}

impl AdminAuth for reqwest::RequestBuilder {
    fn bearer_auth_if(self, admin: bool) -> Self {
        if admin { self.bearer_auth(crate::helpers::ADMIN_TOKEN) } else { self }
    }
}

#[tokio::test]
async fn repeated_failed_authentications_are_refused_on_both_listeners() {
    let gw = TestGateway::start_with(|c| c.auth.failed_attempts_per_minute = 5).await;
    let wrong = "tg-aaaaaaaaaaaa-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let r = gw.anonymous.get(gw.url("/v1/models")).bearer_auth(wrong).send().await.unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429, 429, 429]);
    let refused = gw.http.get(gw.url("/v1/models")).send().await.unwrap();
    assert_eq!(refused.status(), 429, "the address is refused before any key is checked");
    assert!(refused.headers().contains_key("retry-after"));

    let mut statuses = Vec::new();
    for _ in 0..7 {
        let r = gw.anonymous.get(gw.admin_url("/admin/v1/tenants")).bearer_auth("wrong-admin-token").send().await;
        statuses.push(r.unwrap().status().as_u16());
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429, 429]);
}

#[tokio::test]
async fn invalid_utf8_and_compressed_bodies_are_refused() {
    let gw = TestGateway::start().await;
    let mut body = br#"{"model":"gpt-4.1","messages":[{"role":"user","content":"#.to_vec();
    body.extend_from_slice(b"\"bad \xff\xfe bytes\"}]}");
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(envelope(response).await["error"]["code"], "invalid_json");
    let response = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("content-encoding", "gzip")
        .body(vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
    assert_eq!(envelope(response).await["error"]["code"], "unsupported_content_encoding");
    assert!(gw.fake.requests().is_empty());
}
