//! Runs the browser suite in `tests/console` (Playwright driving Debian's
//! chromium) against a real gateway on Postgres with a month of usage
//! history, then checks through the admin API that what the browser did
//! was done, and audited, as the API's own changes are.

use std::path::PathBuf;
use std::process::Command;

use reqwest::Method;
use tollgate_store::{Store, UsageEvent};

use crate::helpers::{ADMIN_TOKEN, Db, TestGateway};

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A month of requests from three tenants over three models, a few per
/// hour today, so the charts have something to draw.
fn history(now_ms: i64) -> Vec<UsageEvent> {
    let tenants = [("search", 9), ("support-bot", 5), ("analytics", 2)];
    let models = [("gpt-4.1-mini", 240), ("gemini-2.5-flash", 610), ("claude-sonnet-4", 2_450)];
    let mut events = Vec::new();
    for hours_ago in 0..(30 * 24) {
        let at = now_ms - hours_ago * 3_600_000 - 60_000;
        // A daily rhythm and a slow rise, so the bars differ.
        let busy = 1 + (hours_ago % 24 / 6) + (30 * 24 - hours_ago) / 240;
        for (t, (tenant, weight)) in tenants.iter().enumerate() {
            for (m, (model, price)) in models.iter().enumerate() {
                let n = (busy * weight / 4 + ((hours_ago + m as i64) % 3)) as usize;
                for i in 0..n {
                    let completion = 80 + ((hours_ago as usize + i * 7) % 400) as i64;
                    events.push(UsageEvent {
                        id: format!("seed-{hours_ago}-{t}-{m}-{i}"),
                        at: at - i as i64 * 1_000,
                        request_id: format!("req-seed-{hours_ago}-{t}-{m}-{i}"),
                        tenant_id: (*tenant).to_owned(),
                        key_id: format!("key-{tenant}"),
                        endpoint: "/v1/chat/completions".to_owned(),
                        requested_model: (*model).to_owned(),
                        upstream_model: Some((*model).to_owned()),
                        stream: i % 2 == 0,
                        prompt_tokens: 300,
                        completion_tokens: completion,
                        reasoning_tokens: 0,
                        cached_tokens: 0,
                        cache_write_tokens: 0,
                        total_tokens: 300 + completion,
                        billed_output_tokens: completion,
                        cost_micros: price * (300 + completion) / 100,
                        estimated: false,
                        unpriced: false,
                        modified: false,
                        status: if i % 37 == 5 { 502 } else { 200 },
                        error_class: (i % 37 == 5).then(|| "upstream:server_error".to_owned()),
                        latency_ms: 600,
                        ttft_ms: Some(150),
                        route: None,
                        target: None,
                        upstream: Some("default".to_owned()),
                        attempts: 1,
                        api: "openai".to_owned(),
                    });
                }
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_real_browser() {
    let root = workspace_root();
    let python =
        std::env::var_os("TOLLGATE_SDK_PYTHON").map(PathBuf::from).unwrap_or_else(|| root.join(".venv/bin/python"));
    let chromium =
        std::env::var_os("CHROMIUM").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !python.exists() || !chromium.exists() {
        let required = std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_FULL_SUITE").is_some();
        assert!(!required, "{} or {} is missing: scripts/test installs them", python.display(), chromium.display());
        eprintln!(
            "SKIPPED: the console browser suite (Python environment or chromium missing; scripts/test installs them)"
        );
        return;
    }
    let db = tollgate_store::testing::TestDatabase::postgres().await;
    let fake = tollgate_fake_upstream::FakeUpstream::start().await.unwrap();
    let gw = TestGateway::start_full(fake, Db::Url(db.url.clone()), |_| {}).await;
    for tenant in ["search", "support-bot", "analytics"] {
        gw.ensure_tenant(tenant).await;
    }
    let store = Store::connect(&db.url, 2).await.unwrap();
    let seeded = history(gw.clock.now().timestamp_millis());
    store.insert_usage(&seeded).await.unwrap();
    store.close().await;

    let screenshots = std::env::var_os("TOLLGATE_CONSOLE_SCREENSHOTS").map(|dir| root.join(dir));
    let (console_url, base_url) = (gw.admin_url("/"), format!("{}/v1", gw.url("")));
    let output = tokio::task::spawn_blocking(move || {
        let mut command = Command::new(python);
        command
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/console"])
            .current_dir(root)
            .env("CONSOLE_URL", console_url)
            .env("TOLLGATE_BASE_URL", base_url)
            .env("CONSOLE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("CHROMIUM", chromium);
        if let Some(dir) = screenshots {
            command.env("CONSOLE_SCREENSHOTS", dir);
        }
        command.output().expect("pytest runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "the console suite failed:\n{stdout}");
    assert!(stdout.contains(" passed"), "the console suite ran no test:\n{stdout}");

    // What the browser did, as the admin API sees it: the changes happened
    // and each is in the audit log under the signed-in admin's name.
    let (status, _) = gw.admin(Method::GET, "/admin/v1/tenants/checkout", None).await;
    assert_eq!(status, 404, "the browser deleted the tenant");
    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit?limit=200", None).await;
    let actions: Vec<(&str, &str)> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    for action in [
        "console.sign_in",
        "tenant.create",
        "key.create",
        "key.revoke",
        "budget.create",
        "tenant.suspend",
        "tenant.delete",
        "console.sign_out",
    ] {
        assert!(actions.contains(&(action, "bootstrap")), "{action} by bootstrap in {actions:?}");
    }
    // The ledger has the answered request (billed) and the one the budget
    // refused (free); the revoked key's attempt never reached a tenant.
    let (_, records) = gw.admin(Method::GET, "/admin/v1/usage/records?tenant_id=checkout", None).await;
    let mut seen: Vec<(i64, i64)> = records["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["status"].as_i64().unwrap(), r["cost_micros"].as_i64().unwrap()))
        .collect();
    seen.sort();
    assert_eq!(seen.len(), 2, "{records}");
    assert!(seen[0].0 == 200 && seen[0].1 > 0, "{records}");
    assert_eq!(seen[1], (429, 0), "{records}");
}
