//! Runs the Python suite in `tests/sdk` (the official `openai` SDK) against
//! a real gateway and fake upstream started here.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::helpers::TestGateway;

fn always(status: u16) -> tollgate_fake_upstream::Scenario {
    let fault = tollgate_fake_upstream::Fault::Status { status, style: tollgate_fake_upstream::ErrorStyle::OpenAi };
    tollgate_fake_upstream::Scenario { fault: Some(fault), ..Default::default() }
}

/// A route whose fallback groups are one target each, in order.
fn route(model: &str, targets: &[(&str, &str)]) -> tollgate_gateway::routing::config::RouteConfig {
    use tollgate_gateway::routing::config::{GroupConfig, Overrides, RetryOn, RouteConfig, TargetConfig};
    RouteConfig {
        model: model.to_owned(),
        api: Default::default(),
        groups: targets
            .iter()
            .map(|(upstream, model)| GroupConfig {
                targets: vec![TargetConfig {
                    upstream: (*upstream).to_owned(),
                    model: Some((*model).to_owned()),
                    weight: 1,
                    overrides: Overrides::default(),
                }],
            })
            .collect(),
        sticky: None,
        retry_on: vec![RetryOn::Connect, RetryOn::Timeout, RetryOn::RateLimited, RetryOn::ServerError],
        attempts_per_target: 1,
        deadline: Duration::from_secs(30),
        breaker: Default::default(),
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_works_through_the_gateway() {
    let root = workspace_root();
    let python =
        std::env::var_os("TOLLGATE_SDK_PYTHON").map(PathBuf::from).unwrap_or_else(|| root.join(".venv/bin/python"));
    if !python.exists() {
        let required = std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_FULL_SUITE").is_some();
        assert!(!required, "{} is missing: scripts/test installs the SDK test environment", python.display());
        eprintln!("SKIPPED: the Python SDK suite ({} is missing; scripts/test installs it)", python.display());
        return;
    }

    // Two more upstreams for the routes the suite uses: one that always
    // answers 503 (a fallback serves), one that always answers 400 (final).
    let failing = tollgate_fake_upstream::FakeUpstream::start().await.unwrap();
    failing.set_defaults(always(503));
    let refusing = tollgate_fake_upstream::FakeUpstream::start().await.unwrap();
    refusing.set_defaults(always(400));
    let (failing_url, refusing_url) = (failing.base_url(), refusing.base_url());
    let gw = TestGateway::start_with(move |c| {
        c.server.max_body_bytes = 64 * 1024;
        c.upstream.first_byte_timeout = Duration::from_millis(500);
        let named = |name: &str, base_url: String| {
            let mut upstream = c.upstream.clone();
            upstream.name = name.to_owned();
            upstream.base_url = base_url;
            upstream
        };
        c.upstreams = vec![named("failing", failing_url), named("refusing", refusing_url)];
        c.routes = vec![
            route("chat-fallback", &[("failing", "gemini-2.5-flash-lite"), ("default", "gemini-2.5-pro")]),
            route("chat-strict", &[("refusing", "gemini-2.5-flash-lite"), ("default", "gemini-2.5-pro")]),
        ];
    })
    .await;
    let base_url = format!("{}/v1", gw.url(""));
    let revoked = gw.create_key("test", serde_json::json!({"name": "to-revoke"})).await;
    let revoked_id = revoked.split('-').nth(1).unwrap().to_owned();
    let (status, _) = gw.admin(reqwest::Method::POST, &format!("/admin/v1/keys/{revoked_id}/revoke"), None).await;
    assert_eq!(status, 200);
    let restricted =
        gw.create_key("test", serde_json::json!({"name": "gemini-only", "allowed_models": ["gemini-*"]})).await;
    let api_key = gw.key.clone();
    gw.ensure_tenant("broke").await;
    let (status, _) = gw
        .admin(
            reqwest::Method::POST,
            "/admin/v1/tenants/broke/budgets",
            Some(serde_json::json!({"period": "monthly", "amount_usd": "0.000001"})),
        )
        .await;
    assert_eq!(status, 201);
    let broke = gw.create_key("broke", serde_json::json!({"name": "k"})).await;
    let (status, _) = gw
        .admin(
            reqwest::Method::POST,
            "/admin/v1/tenants",
            Some(serde_json::json!({"id": "throttled", "display_name": "T", "policy": {"limits": {"max_concurrent": 1}}})),
        )
        .await;
    assert_eq!(status, 201);
    let throttled = gw.create_key("throttled", serde_json::json!({"name": "k"})).await;
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            // The oversized-body test needs the default limit and a gateway of
            // its own: `connections::sdk` runs it.
            .args([
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "--ignore=tests/sdk/test_oversized_body.py",
                "tests/sdk",
            ])
            .current_dir(root)
            .env("TOLLGATE_BASE_URL", base_url)
            .env("SDK_TEST_API_KEY", api_key)
            .env("SDK_TEST_REVOKED_KEY", revoked)
            .env("SDK_TEST_RESTRICTED_KEY", restricted)
            .env("SDK_TEST_BROKE_KEY", broke)
            .env("SDK_TEST_THROTTLED_KEY", throttled)
            .output()
            .expect("pytest runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the SDK suite failed:\n{stdout}");
    assert!(stdout.contains(" passed"), "the SDK suite ran no test:\n{stdout}");
    assert!(!gw.fake.requests().is_empty(), "the SDK traffic went through the fake upstream");
    native_ledger_equals_the_fakes_usage(&gw).await;
}

/// Every Gemini and Anthropic call the SDKs made that the fake answered
/// with usage is in the ledger with exactly that usage.
async fn native_ledger_equals_the_fakes_usage(gw: &TestGateway) {
    use std::collections::HashMap;
    let reported: HashMap<String, serde_json::Value> = gw
        .fake
        .reported()
        .into_iter()
        .filter(|r| r.path.starts_with("/v1beta/") || r.path.starts_with("/v1/messages"))
        .filter_map(|r| Some((r.request_id?, r.usage?)))
        .collect();
    assert!(reported.len() >= 10, "the SDK suites made native calls with usage: {}", reported.len());
    let records = crate::helpers::wait_for("the native records in the ledger", crate::helpers::PATIENCE, async || {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/admin/v1/usage/records?limit=200&cursor={c}"),
                None => "/admin/v1/usage/records?limit=200".to_owned(),
            };
            let (_, page) = gw.admin(reqwest::Method::GET, &path, None).await;
            all.extend(page["data"].as_array().cloned().unwrap_or_default());
            match page["next_cursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        let found = reported.keys().filter(|id| all.iter().any(|r| r["request_id"] == id.as_str())).count();
        (found == reported.len()).then_some(all)
    })
    .await;
    for (request_id, usage) in &reported {
        let record = records.iter().find(|r| r["request_id"] == request_id.as_str()).unwrap();
        if !record["error_class"].is_null() {
            // Cut short before the fake's usage was sent: estimated instead.
            assert_eq!(record["estimated"], true, "{record}");
            continue;
        }
        let n = |v: &serde_json::Value, k: &str| v[k].as_i64().unwrap_or(0);
        let (prompt, completion, cached, written) = if record["api"] == "gemini" {
            (
                n(usage, "promptTokenCount") + n(usage, "toolUsePromptTokenCount"),
                n(usage, "candidatesTokenCount") + n(usage, "thoughtsTokenCount"),
                n(usage, "cachedContentTokenCount"),
                0,
            )
        } else {
            assert_eq!(record["api"], "anthropic", "{record}");
            (
                n(usage, "input_tokens")
                    + n(usage, "cache_read_input_tokens")
                    + n(usage, "cache_creation_input_tokens"),
                n(usage, "output_tokens"),
                n(usage, "cache_read_input_tokens"),
                n(usage, "cache_creation_input_tokens"),
            )
        };
        let got = (
            n(record, "prompt_tokens"),
            n(record, "completion_tokens"),
            n(record, "cached_tokens"),
            n(record, "cache_write_tokens"),
        );
        assert_eq!(got, (prompt, completion, cached, written), "{request_id}: {record} against {usage}");
        assert_eq!(record["estimated"], false, "{record}");
    }
}
