//! Hard budgets under concurrency, through HTTP.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Db, PATIENCE, TestGateway, client_with_key, envelope, wait_for};

async fn settled_spend(gw: &TestGateway, tenant: &str, requests: i64) -> i64 {
    wait_for(&format!("the ledger to hold {requests} records for {tenant}"), PATIENCE, async || {
        let (_, summary) = gw.admin(Method::GET, &format!("/admin/v1/usage/summary?tenant_id={tenant}"), None).await;
        let row = &summary["data"][0];
        (row["requests"].as_i64() == Some(requests)).then(|| row["cost_micros"].as_i64().unwrap())
    })
    .await
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

#[tokio::test]
async fn a_daily_budget_spent_today_is_available_again_tomorrow() {
    let gw = TestGateway::start().await;
    let (status, _) = gw
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "daily", "amount_usd": "0.001"})))
        .await;
    assert_eq!(status, 201);
    // A worst case of about 250 µ$ (100 output tokens at $2.50/M) fits in
    // the 1,000 µ$ budget until a few requests have settled.
    let body =
        json!({"model": "gemini-2.5-flash", "max_tokens": 100, "messages": [{"role": "user", "content": "spend"}]});
    let send = async || gw.http.post(gw.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    let mut served = 0;
    let refused = loop {
        let response = send().await;
        if response.status() == 429 {
            break response;
        }
        assert_eq!(response.status(), 200);
        served += 1;
        assert!(served < 100, "the budget never ran out");
    };
    assert_eq!(envelope(refused).await["error"]["code"], "insufficient_quota");

    gw.clock.advance(std::time::Duration::from_secs(24 * 3600));
    assert_eq!(send().await.status(), 200, "a new day, a new budget");
}
