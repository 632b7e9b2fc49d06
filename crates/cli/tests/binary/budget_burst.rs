//! Hundreds of official OpenAI SDK clients (Python, retrying as the SDK
//! does) against a small hard budget, through real gateway processes: two
//! replicas sharing Postgres and Redis, and one replica on its own. The
//! budget ends spent to within one request's worst case and never past it,
//! and no client is told "exhausted" while the budget could still take it.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use tollgate_fake_upstream::FakeUpstream;

use crate::{ADMIN_TOKEN, Served, http_client};

/// The request the burst sends costs at most this much: `gemini-2.5-pro`,
/// `max_tokens` 100 ($0.001 of output) plus a prompt well under 200 bytes
/// at $1.25/M.
const WORST_CASE_MICROS: i64 = 1_000 + 250;
const BUDGET_MICROS: i64 = 10_000;

fn python() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let python =
        std::env::var_os("TOLLGATE_SDK_PYTHON").map(PathBuf::from).unwrap_or_else(|| root.join(".venv/bin/python"));
    if python.exists() {
        return Some(python);
    }
    let required = std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_FULL_SUITE").is_some();
    assert!(!required, "{} is missing: scripts/test installs the SDK test environment", python.display());
    eprintln!("SKIPPED: the SDK budget burst ({} is missing; scripts/test installs it)", python.display());
    None
}

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn admin(served: &Served, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = http_client().request(method, format!("{}{path}", served.admin)).bearer_auth(ADMIN_TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

/// Creates tenant `frugal` with a $0.01 hard monthly budget; returns its key.
async fn frugal_tenant(served: &Served) -> String {
    let (status, body) = admin(
        served,
        reqwest::Method::POST,
        "/admin/v1/tenants",
        Some(json!({"id": "frugal", "display_name": "Frugal"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = admin(
        served,
        reqwest::Method::POST,
        "/admin/v1/tenants/frugal/budgets",
        Some(json!({"period": "monthly", "amount_usd": "0.01"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) =
        admin(served, reqwest::Method::POST, "/admin/v1/tenants/frugal/keys", Some(json!({"name": "burst"}))).await;
    assert_eq!(status, 201, "{body}");
    body["secret"].as_str().unwrap().to_owned()
}

/// Waits until `served` refuses an unpriced model for `key`: it then knows
/// the tenant's hard budget.
async fn wait_for_budget(served: &Served, key: &str) {
    for _ in 0..200 {
        let r = http_client()
            .post(format!("{}/v1/chat/completions", served.public))
            .bearer_auth(key)
            .json(&json!({"model": "no-price", "messages": []}))
            .send()
            .await
            .unwrap();
        if r.status() == 400 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("{} never learned of the budget", served.public);
}

/// Runs the SDK burst; returns its report.
async fn run_burst(python: PathBuf, urls: Vec<String>, key: String) -> Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg("tests/burst/budget_burst.py")
            .current_dir(root)
            .env("BURST_BASE_URLS", urls.join(","))
            .env("BURST_API_KEY", key)
            .env("BURST_CLIENTS", "300")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "the burst failed:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_str(stdout.trim()).unwrap()
}

/// The tenant's settled spend once the ledger holds `requests` records.
async fn settled_spend(served: &Served, requests: i64) -> i64 {
    for _ in 0..400 {
        let (_, summary) = admin(served, reqwest::Method::GET, "/admin/v1/usage/summary?tenant_id=frugal", None).await;
        if summary["data"][0]["requests"].as_i64() >= Some(requests) {
            return summary["data"][0]["cost_micros"].as_i64().unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the ledger never held {requests} records");
}

/// Checks one burst's report and the spend it left.
async fn check(report: &Value, served: &Served) {
    let outcomes = report["outcomes"].as_object().unwrap();
    let count = |k: &str| outcomes.get(k).and_then(Value::as_i64).unwrap_or(0);
    for outcome in outcomes.keys() {
        assert!(
            ["ok", "429:insufficient_quota", "429:rate_limit_exceeded"].contains(&outcome.as_str()),
            "an outcome no client should see: {report}"
        );
    }
    let responses = report["responses"].as_object().unwrap();
    for (seen, _) in responses {
        // Refusals the SDK must not retry are real exhaustion only; every
        // other refusal said it may be retried.
        assert!(["200:-", "429:false", "429:true"].contains(&seen.as_str()), "unexpected response {seen}: {report}");
    }
    let total: i64 = responses.values().filter_map(Value::as_i64).sum();
    let spent = settled_spend(served, total).await;
    println!("{report}: {spent} µ$ spent of {BUDGET_MICROS}");
    assert!(spent <= BUDGET_MICROS, "spend {spent} µ$ past the budget");
    assert!(spent >= BUDGET_MICROS - WORST_CASE_MICROS, "refused while the budget could take more: {spent} µ$");
    assert!(count("ok") > 100, "most of the budget went to answers: {report}");
    assert!(count("429:insufficient_quota") > 0, "then it was exhausted: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clients_spend_a_hard_budget_fully_across_two_replicas_sharing_postgres_and_redis() {
    let Some(python) = python() else { return };
    let fake = FakeUpstream::start().await.unwrap();
    let db = tollgate_store::testing::TestDatabase::postgres().await;
    let prefix = format!("burst-{}", std::process::id());
    let redis = redis_url();
    let env = [
        ("TOLLGATE_DATABASE_URL", db.url.as_str()),
        ("TOLLGATE_REDIS_URL", redis.as_str()),
        ("TOLLGATE_REDIS__REPLICAS", "2"),
        ("TOLLGATE_REDIS__KEY_PREFIX", prefix.as_str()),
        ("TOLLGATE_LOG__LEVEL", "info"),
    ];
    let a = Served::start(&fake.base_url(), &env);
    let b = Served::start(&fake.base_url(), &env);
    let key = frugal_tenant(&a).await;
    wait_for_budget(&a, &key).await;
    wait_for_budget(&b, &key).await;
    let urls = vec![format!("{}/v1", a.public), format!("{}/v1", b.public)];
    let report = run_burst(python, urls, key).await;
    check(&report, &a).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_clients_spend_a_hard_budget_fully_on_one_replica_without_redis() {
    let Some(python) = python() else { return };
    let fake = FakeUpstream::start().await.unwrap();
    let served = Served::start(&fake.base_url(), &[("TOLLGATE_LOG__LEVEL", "info")]);
    let key = frugal_tenant(&served).await;
    wait_for_budget(&served, &key).await;
    let report = run_burst(python, vec![format!("{}/v1", served.public)], key).await;
    check(&report, &served).await;
}
