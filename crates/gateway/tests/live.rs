//! The real CometAPI through the gateway, end to end: a tenant and its key
//! created through the admin API, a chat completion answered by
//! gemini-2.5-flash-lite (whole, then streamed), and each answer billed in
//! the ledger with its tokens and cost. Costs a fraction of a cent.
//!
//! Runs when `COMETAPI_KEY` is set where the tests are built and run:
//! `COMETAPI_KEY=sk-... cargo test -p tollgate-gateway --test live`. A
//! second test calls the Gemini and Anthropic APIs in their own shapes. Without
//! it the test is reported as ignored, with the reason (the build script
//! sets `cometapi_key`), rather than passing without having called anything.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tollgate_gateway::{Application, Config};

const BASE_URL: &str = "https://api.cometapi.com/v1";
const MODEL: &str = "gemini-2.5-flash-lite";
const ADMIN_TOKEN: &str = "live-test-admin-token";
const TENANT: &str = "live";
const CLAUDE: &str = "claude-sonnet-4-20250514";

#[tokio::test]
#[cfg_attr(not(cometapi_key), ignore = "COMETAPI_KEY is not set, so the real CometAPI cannot be called")]
async fn a_tenant_key_gets_real_answers_from_cometapi_and_each_is_billed_in_the_ledger() {
    let live = Live::start().await;
    let (http, public, key) = (&live.http, live.public, live.key.clone());
    let chat = format!("http://{public}/v1/chat/completions");
    let question = json!([{"role": "user", "content": "Reply with one word: the opposite of cold."}]);

    // A whole answer.
    let response = http
        .post(&chat)
        .bearer_auth(&key)
        .header("x-request-id", "live-whole")
        .json(&json!({"model": MODEL, "max_tokens": 32, "messages": question}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let cost_header = response.headers()["x-tollgate-cost-usd"].to_str().unwrap().to_owned();
    let answer: Value = response.json().await.unwrap();
    let content = answer["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(!content.trim().is_empty(), "a real answer: {answer}");
    assert!(answer["usage"]["total_tokens"].as_i64().unwrap_or(0) > 0, "{answer}");

    // A streamed answer; the client did not ask for usage, so it sees none
    // (the gateway asked for it on its behalf, to bill it).
    let response = http
        .post(&chat)
        .bearer_auth(&key)
        .header("x-request-id", "live-stream")
        .json(&json!({"model": MODEL, "max_tokens": 32, "stream": true, "messages": question}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "the stream ran to its end: {text}");
    let streamed: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<Value>(data).ok())
        .filter_map(|event| event["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect();
    assert!(!streamed.trim().is_empty(), "a real streamed answer: {text}");
    assert!(!text.contains("\"choices\":[]"), "usage the client did not ask for reached it: {text}");

    // Both are in the ledger, billed from the upstream's own counts.
    let records = live.records(&["live-whole", "live-stream"]).await;
    for id in ["live-whole", "live-stream"] {
        let record = records.iter().find(|r| r["request_id"] == id).unwrap_or_else(|| panic!("{id}: {records:?}"));
        assert_eq!(record["status"], 200, "{record}");
        assert_eq!(record["estimated"], false, "usage came from CometAPI, not an estimate: {record}");
        assert_eq!(record["unpriced"], false, "{record}");
        assert!(record["prompt_tokens"].as_i64().unwrap() > 0, "{record}");
        assert!(record["completion_tokens"].as_i64().unwrap() > 0, "{record}");
        assert!(record["cost_micros"].as_i64().unwrap() > 0, "{record}");
    }
    let whole = records.iter().find(|r| r["request_id"] == "live-whole").unwrap();
    let billed = tollgate_gateway::accounting::format_usd(whole["cost_micros"].as_i64().unwrap());
    assert_eq!(cost_header, billed, "the cost header is what the ledger billed");
    let costs: Vec<i64> = records.iter().map(|r| r["cost_micros"].as_i64().unwrap()).collect();
    println!("CometAPI answered {content:?} and streamed {streamed:?}; billed {costs:?} µ$");

    live.stop().await;
}

/// The Gemini and Anthropic APIs in their own shapes, against CometAPI:
/// generateContent and a streamed generateContent with the key in
/// `x-goog-api-key`, a message with the key in `x-api-key`, each billed
/// from the upstream's own usage.
#[tokio::test]
#[cfg_attr(not(cometapi_key), ignore = "COMETAPI_KEY is not set, so the real CometAPI cannot be called")]
async fn the_gemini_and_anthropic_apis_get_real_answers_from_cometapi_and_are_billed() {
    let live = Live::start().await;
    let gemini = |method: &str| format!("http://{}/v1beta/models/{MODEL}:{method}", live.public);
    let contents = json!({"contents": [{"role": "user", "parts": [{"text": "Reply with one word: the opposite of cold."}]}],
        "generationConfig": {"maxOutputTokens": 32}});
    let response = live
        .http
        .post(gemini("generateContent"))
        .header("x-goog-api-key", &live.key)
        .header("x-request-id", "live-gemini")
        .json(&contents)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["usageMetadata"]["promptTokenCount"].as_i64().unwrap_or(0) > 0, "{answer}");
    let response = live
        .http
        .post(format!("{}?alt=sse", gemini("streamGenerateContent")))
        .header("x-goog-api-key", &live.key)
        .header("x-request-id", "live-gemini-stream")
        .json(&contents)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let streamed = response.text().await.unwrap();
    assert!(streamed.contains("finishReason"), "the stream ran to its end: {streamed}");

    let response = live
        .http
        .post(format!("http://{}/v1/messages", live.public))
        .header("x-api-key", &live.key)
        .header("anthropic-version", "2023-06-01")
        .header("x-request-id", "live-claude")
        .json(&json!({"model": CLAUDE, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Reply with one word: the opposite of cold."}]}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let message: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{message}");
    assert_eq!(message["type"], "message", "{message}");

    let ids = ["live-gemini", "live-gemini-stream", "live-claude"];
    let records = live.records(&ids).await;
    for id in ids {
        let record = records.iter().find(|r| r["request_id"] == id).unwrap();
        assert_eq!(record["status"], 200, "{record}");
        assert_eq!(record["estimated"], false, "usage came from CometAPI: {record}");
        assert!(record["prompt_tokens"].as_i64().unwrap() > 0, "{record}");
        assert!(record["completion_tokens"].as_i64().unwrap() > 0, "{record}");
        assert!(record["cost_micros"].as_i64().unwrap() > 0, "{record}");
    }
    println!("CometAPI answered the Gemini and Anthropic APIs: {answer} / {message}");
    live.stop().await;
}

/// A gateway against the real CometAPI, everything it keeps in its own
/// temporary directory, both listeners on ports the system picks, with a
/// tenant and a key of its own.
struct Live {
    http: reqwest::Client,
    public: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    key: String,
    stop: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Live {
    async fn start() -> Self {
        assert!(
            std::env::var("COMETAPI_KEY").is_ok_and(|k| !k.trim().is_empty()),
            "COMETAPI_KEY must be set to run the live test"
        );
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, value: &str| -> PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{value}\n")).unwrap();
            path
        };

        // Everything the gateway keeps is in this test's directory, and both
        // listeners are on ports the system picks.
        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        config.admin.listen = Some("127.0.0.1:0".parse().unwrap());
        config.upstream.base_url = BASE_URL.to_owned();
        config.upstream.api_key_env = "COMETAPI_KEY".to_owned();
        let sqlite = format!("sqlite://{}?mode=rwc", dir.path().join("tollgate.db").display());
        config.database.url_file = Some(write("database.url", &sqlite));
        // Never set: limits stay in memory whatever the shell exports.
        config.redis.url_env = "TOLLGATE_LIVE_TEST_REDIS_URL".to_owned();
        config.accounting.spool_dir = dir.path().join("spool");
        config.accounting.flush_interval = Duration::from_millis(50);
        config.admin.bootstrap_token_file = Some(write("admin.token", ADMIN_TOKEN));
        config.auth.hash_secret_file = Some(write("hash.secret", "live-test-hash-secret"));
        config.validate().unwrap();

        let app = Application::build(config).await.unwrap();
        let public = app.local_addr();
        let admin = app.admin_addr().expect("the admin API has its own listener");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
        let admin_call = async |method: Method, path: &str, body: Option<Value>| -> (u16, Value) {
            let mut request = http.request(method, format!("http://{admin}{path}")).bearer_auth(ADMIN_TOKEN);
            if let Some(body) = body {
                request = request.json(&body);
            }
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
        };

        let (status, tenant) = admin_call(
            Method::POST,
            "/admin/v1/tenants",
            Some(json!({"id": TENANT, "display_name": "Live CometAPI test"})),
        )
        .await;
        assert_eq!(status, 201, "{tenant}");
        let (status, created) =
            admin_call(Method::POST, &format!("/admin/v1/tenants/{TENANT}/keys"), Some(json!({"name": "live"}))).await;
        assert_eq!(status, 201, "{created}");
        let key = created["secret"].as_str().unwrap().to_owned();
        Self { http, public, admin, key, stop, server, _dir: dir }
    }

    async fn admin(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("http://{}{path}", self.admin)).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    /// The ledger records of these requests, once all are written (asked
    /// again every 50 ms, for at most 30 s).
    async fn records(&self, ids: &[&str]) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (_, page) =
                self.admin(Method::GET, &format!("/admin/v1/usage/records?tenant_id={TENANT}&limit=200"), None).await;
            let records = page["data"].as_array().cloned().unwrap_or_default();
            if ids.iter().all(|id| records.iter().any(|r| r["request_id"] == *id)) {
                return records;
            }
            assert!(tokio::time::Instant::now() < deadline, "the ledger never held {ids:?}: {records:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }
}
