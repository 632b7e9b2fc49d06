//! Budget alerts delivered to a real HTTP receiver: retried after failures,
//! signed, and fired once per threshold per period.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{PATIENCE, TestGateway, wait_for, wait_until};

#[derive(Default)]
struct Received {
    /// (accepted, signature header, body)
    calls: Vec<(bool, Option<String>, Value)>,
    fail_first: usize,
}

async fn receive(State(state): State<Arc<Mutex<Received>>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut s = state.lock().unwrap();
    let accept = s.calls.len() >= s.fail_first;
    let signature = headers.get("x-tollgate-signature").map(|v| v.to_str().unwrap().to_owned());
    s.calls.push((accept, signature, serde_json::from_slice(&body).unwrap_or(Value::Null)));
    if accept { StatusCode::OK } else { StatusCode::INTERNAL_SERVER_ERROR }
}

async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Received>>) {
    let state = Arc::new(Mutex::new(Received { fail_first, ..Received::default() }));
    let app = Router::new().route("/hook", post(receive)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, state)
}

#[tokio::test]
async fn threshold_alerts_are_delivered_signed_retried_and_fired_once_per_period() {
    let (generic_url, generic) = receiver(2).await;
    let (slack_url, slack) = receiver(0).await;
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("hook.secret");
    std::fs::write(&secret_file, "hook-secret").unwrap();
    let gw = TestGateway::start_with(move |c| {
        c.alerts.check_interval = Duration::from_millis(100);
        c.alerts.delivery_interval = Duration::from_millis(50);
        c.alerts.retry_base = Duration::from_millis(50);
        c.alerts.webhooks = vec![
            tollgate_gateway::config::WebhookConfig {
                url: generic_url,
                format: tollgate_gateway::alerts::WebhookFormat::Generic,
                secret_env: None,
                secret_file: Some(secret_file),
            },
            tollgate_gateway::config::WebhookConfig {
                url: slack_url,
                format: tollgate_gateway::alerts::WebhookFormat::Slack,
                secret_env: None,
                secret_file: None,
            },
        ];
    })
    .await;
    // A soft budget of 20 micro-dollars: spend passes 50, 80 and 100 %.
    let (status, budget) = gw
        .admin(
            Method::POST,
            "/admin/v1/tenants/test/budgets",
            Some(json!({"period": "daily", "amount_usd": "0.00002", "hard": false})),
        )
        .await;
    assert_eq!(status, 201, "{budget}");
    let budget_id = budget["id"].as_str().unwrap().to_owned();
    let body = json!({"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "spend a little"}]});
    for _ in 0..4 {
        assert_eq!(gw.http.post(gw.url("/v1/chat/completions")).json(&body).send().await.unwrap().status(), 200);
    }

    let accepted = |r: &Arc<Mutex<Received>>| r.lock().unwrap().calls.iter().filter(|c| c.0).count();
    wait_until("three deliveries accepted by the generic webhook", PATIENCE, async || accepted(&generic) >= 3).await;

    // More checks must not fire the same thresholds again. Spend a little
    // more and wait for a check that saw it: that check ran with every
    // threshold already crossed and already in the outbox.
    assert_eq!(gw.http.post(gw.url("/v1/chat/completions")).json(&body).send().await.unwrap().status(), 200);
    let spent = wait_for("the ledger to hold the fifth request", PATIENCE, async || {
        let (_, summary) = gw.admin(Method::GET, "/admin/v1/usage/summary?tenant_id=test", None).await;
        let row = &summary["data"][0];
        (row["requests"].as_i64() == Some(5)).then(|| row["cost_micros"].as_i64().unwrap())
    })
    .await;
    let reading =
        format!("tollgate_budget_utilisation_percent{{budget=\"{budget_id}\",tenant=\"test\"}} {}", spent * 100 / 20);
    wait_until("a budget check that saw the fifth request", PATIENCE, async || {
        let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
        metrics.lines().any(|l| l == reading)
    })
    .await;

    let calls = generic.lock().unwrap().calls.clone();
    let delivered: Vec<&Value> = calls.iter().filter(|c| c.0).map(|c| &c.2).collect();
    assert!(calls.iter().filter(|c| !c.0).count() >= 2, "the first deliveries failed and were retried");
    let mut thresholds: Vec<i64> = delivered.iter().map(|b| b["threshold_percent"].as_i64().unwrap()).collect();
    thresholds.sort();
    assert_eq!(thresholds, [50, 80, 100], "each threshold delivered exactly once: {delivered:?}");
    // A retry delivers the alert that failed, not a new one.
    let delivered_ids: Vec<&str> = delivered.iter().map(|b| b["alert_id"].as_str().unwrap()).collect();
    for (_, _, failed) in calls.iter().filter(|c| !c.0) {
        let id = failed["alert_id"].as_str().unwrap();
        assert!(delivered_ids.contains(&id), "the failed delivery of {id} was retried until it succeeded");
    }
    for (_, signature, body) in calls.iter().filter(|c| c.0) {
        assert_eq!(body["type"], "budget.threshold");
        assert_eq!(body["budget_id"], budget_id.as_str());
        let signature = signature.as_deref().expect("generic webhooks are signed");
        let (t, v1) = signature.split_once(",v1=").unwrap();
        let timestamp: i64 = t.trim_start_matches("t=").parse().unwrap();
        let expected = tollgate_gateway::alerts::sign(
            &secrecy::SecretString::from("hook-secret"),
            timestamp,
            serde_json::to_vec(body).unwrap().as_slice(),
        );
        assert_eq!(expected, signature, "the signature verifies");
        assert!(!v1.is_empty());
    }
    let slack_calls = slack.lock().unwrap().calls.clone();
    assert!(slack_calls.iter().all(|c| c.1.is_none() && c.2["text"].as_str().unwrap().contains("test")));
    let mut slack_texts: Vec<String> = slack_calls.iter().map(|c| c.2["text"].as_str().unwrap().to_owned()).collect();
    slack_texts.sort();
    slack_texts.dedup();
    assert_eq!(slack_texts.len(), 3, "{slack_texts:?}");

    let (_, listed) = gw.admin(Method::GET, "/admin/v1/alerts?tenant_id=test", None).await;
    let rows = listed["data"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|a| a["delivered_at"].is_string()));
    assert!(rows.iter().any(|a| a["attempts"].as_i64().unwrap() > 1), "retries are counted");
}
