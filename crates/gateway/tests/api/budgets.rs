//! Hard budgets under concurrency, through HTTP.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Db, TestGateway, client_with_key};

async fn settled_spend(gw: &TestGateway, tenant: &str, requests: i64) -> i64 {
    for _ in 0..200 {
        let (_, summary) = gw.admin(Method::GET, &format!("/admin/v1/usage/summary?tenant_id={tenant}"), None).await;
        if summary["data"][0]["requests"].as_i64() == Some(requests) {
            return summary["data"][0]["cost_micros"].as_i64().unwrap();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the ledger never held {requests} records for {tenant}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_parallel_requests_never_overspend_a_hard_budget() {
    let gw =
        TestGateway::start_full(tollgate_fake_upstream::FakeUpstream::start().await.unwrap(), Db::Postgres, |_| {})
            .await;
    gw.ensure_tenant("frugal").await;
    // Worst case per request: 1,000 output tokens at $0.40/M = $0.0004 (plus
    // a little prompt), so $0.01 holds about two dozen requests in flight.
    let (status, budget) = gw
        .admin(
            Method::POST,
            "/admin/v1/tenants/frugal/budgets",
            Some(json!({"period": "monthly", "amount_usd": "0.01"})),
        )
        .await;
    assert_eq!(status, 201, "{budget}");
    assert_eq!(budget["amount_micros"], 10_000);
    let client = client_with_key(&gw.create_key("frugal", json!({"name": "k"})).await);

    let body =
        json!({"model": "gemini-2.5-flash-lite", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let (client, url, body) = (client.clone(), gw.url("/v1/chat/completions"), body.clone());
        tasks.spawn(async move {
            let r = client.post(url).header("x-fake-latency-ms", "300").json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r.headers().get("x-should-retry").map(|v| v.to_str().unwrap().to_owned());
            let remaining = r.headers().get("x-tollgate-budget-remaining-usd").is_some();
            let body: Value = r.json().await.unwrap();
            (status, retry, remaining, body)
        });
    }
    let (mut ok, mut refused) = (0, 0);
    while let Some(result) = tasks.join_next().await {
        let (status, retry, remaining, body) = result.unwrap();
        match status {
            200 => {
                ok += 1;
                assert!(remaining, "answers carry the remaining budget");
            }
            429 => {
                refused += 1;
                assert_eq!(body["error"]["code"], "insufficient_quota");
                assert_eq!(body["error"]["type"], "insufficient_quota");
                assert_eq!(retry.as_deref(), Some("false"), "an exhausted budget is not worth retrying");
            }
            other => panic!("unexpected status {other}: {body}"),
        }
    }
    assert!(refused > 0 && ok > 0, "{ok} served, {refused} refused");
    assert!(ok < 100, "the budget, not the upstream, decided: {ok} served");
    // Refused requests are recorded too (with cost 0).
    let spent = settled_spend(&gw, "frugal", ok + refused).await;
    assert!(spent <= 10_000, "recorded spend {spent} µ$ is within the $0.01 budget");
    println!("{ok} served, {refused} refused, {spent} µ$ spent of 10000");

    // The budget view shows the settled spend.
    let (_, list) = gw.admin(Method::GET, "/admin/v1/tenants/frugal/budgets", None).await;
    assert_eq!(list["data"][0]["spent_micros"], spent);
}

#[tokio::test]
async fn spend_is_rebuilt_from_the_ledger_on_start_up() {
    let db = tollgate_store::testing::TestDatabase::postgres().await;
    let first = TestGateway::start_full(
        tollgate_fake_upstream::FakeUpstream::start().await.unwrap(),
        Db::Url(db.url.clone()),
        |_| {},
    )
    .await;
    let (status, _) = first
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "daily", "amount_usd": "1"})))
        .await;
    assert_eq!(status, 201);
    let body = json!({"model": "gemini-2.5-flash", "messages": [{"role": "user", "content": "spend"}]});
    for _ in 0..3 {
        assert_eq!(first.http.post(first.url("/v1/chat/completions")).json(&body).send().await.unwrap().status(), 200);
    }
    let spent = settled_spend(&first, "test", 3).await;
    assert!(spent > 0);
    drop(first);

    let second = TestGateway::start_full(
        tollgate_fake_upstream::FakeUpstream::start().await.unwrap(),
        Db::Url(db.url.clone()),
        |_| {},
    )
    .await;
    let (_, list) = second.admin(Method::GET, "/admin/v1/tenants/test/budgets", None).await;
    assert_eq!(list["data"][0]["spent_micros"], spent, "a restart remembers this period's spend");
    assert_eq!(list["data"][0]["remaining_micros"], 1_000_000 - spent);
}

#[tokio::test]
async fn an_absurd_max_tokens_cannot_wrap_around_a_hard_budget() {
    let gw = TestGateway::start().await;
    let (status, _) = gw
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "monthly", "amount_usd": "100"})))
        .await;
    assert_eq!(status, 201);
    for n in [1_u64, 2, 16] {
        let body = json!({"model": "gemini-2.5-pro", "max_tokens": u64::MAX, "n": n, "messages": []});
        let r = gw.http.post(gw.url("/v1/chat/completions")).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 429, "n = {n}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "insufficient_quota");
    }
    assert!(gw.fake.requests().is_empty());
}
