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

/// What a burst of parallel requests against a small hard budget got.
#[derive(Debug, Default)]
pub struct Burst {
    pub ok: i64,
    /// 429 `insufficient_quota`: the budget could not take the request even
    /// with nothing else in flight.
    pub exhausted: i64,
    /// 429 `rate_limit_exceeded`: other requests' reservations were in the
    /// way; retryable.
    pub busy: i64,
}

/// The request every burst sends: `gemini-2.5-pro` ($1.25/$10 per M) with
/// `max_tokens` 100, so its worst case is about $0.001 while the fake
/// upstream's real usage costs about $0.00008.
pub fn burst_body() -> Value {
    json!({"model": "gemini-2.5-pro", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]})
}

/// The worst case the gateway reserves for [`burst_body`]: one token per
/// byte of the body at the input price, the whole output limit at the
/// output price.
pub fn burst_worst_case_micros() -> i64 {
    let bytes = serde_json::to_vec(&burst_body()).unwrap().len() as i64;
    (bytes * 1_250_000 + 100 * 10_000_000 + 500_000) / 1_000_000
}

/// Sends `n` requests at once, spread over `urls`, and checks every answer's
/// shape: a refusal that is not a real exhaustion must be retryable.
pub async fn burst(client: &reqwest::Client, urls: &[String], n: usize) -> Burst {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let (client, url) = (client.clone(), urls[i % urls.len()].clone());
        tasks.spawn(async move {
            let r = client.post(url).header("x-fake-latency-ms", "20").json(&burst_body()).send().await.unwrap();
            let status = r.status().as_u16();
            let header = |name: &str| r.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
            let (retry, retry_after_ms) = (header("x-should-retry"), header("retry-after-ms"));
            let remaining = r.headers().contains_key("x-tollgate-budget-remaining-usd");
            let body: Value = r.json().await.unwrap();
            (status, retry, retry_after_ms, remaining, body)
        });
    }
    let mut seen = Burst::default();
    while let Some(result) = tasks.join_next().await {
        let (status, retry, retry_after_ms, remaining, body) = result.unwrap();
        match (status, body["error"]["code"].as_str()) {
            (200, _) => {
                seen.ok += 1;
                assert!(remaining, "answers carry the remaining budget");
            }
            (429, Some("insufficient_quota")) => {
                seen.exhausted += 1;
                assert_eq!(body["error"]["type"], "insufficient_quota");
                assert_eq!(retry.as_deref(), Some("false"), "an exhausted budget is not worth retrying");
            }
            (429, Some("rate_limit_exceeded")) => {
                seen.busy += 1;
                assert_eq!(retry.as_deref(), Some("true"), "busy is worth retrying: {body}");
                assert!(retry_after_ms.is_some_and(|ms| ms.parse::<u64>().unwrap() > 0), "with a delay");
            }
            (other, _) => panic!("unexpected status {other}: {body}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_parallel_requests_spend_a_hard_budget_to_within_one_worst_case_and_never_past_it() {
    let gw =
        TestGateway::start_full(tollgate_fake_upstream::FakeUpstream::start().await.unwrap(), Db::Postgres, |_| {})
            .await;
    gw.ensure_tenant("frugal").await;
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

    // About ten worst cases fit in the budget at once, while 300 requests
    // really cost more than twice the budget: most must wait their turn, and
    // the budget must end spent, not refused while most of it is unspent.
    let seen = burst(&client, &[gw.url("/v1/chat/completions")], 300).await;
    let worst = burst_worst_case_micros();
    let spent = settled_spend(&gw, "frugal", seen.ok + seen.exhausted + seen.busy).await;
    println!("{seen:?}, {spent} µ$ spent of 10000, worst case {worst} µ$");
    assert!(spent <= 10_000, "recorded spend {spent} µ$ is within the $0.01 budget");
    assert!(spent >= 10_000 - worst, "the budget was used up to one worst case, not refused early: {spent} µ$");
    assert!(seen.exhausted > 0, "and then refused as exhausted: {seen:?}");

    // The budget view shows the settled spend.
    let (_, list) = gw.admin(Method::GET, "/admin/v1/tenants/frugal/budgets", None).await;
    assert_eq!(list["data"][0]["spent_micros"], spent);
}

#[tokio::test]
async fn a_model_without_a_price_is_refused_under_a_hard_budget_unless_a_default_price_is_set() {
    let gw = TestGateway::start().await;
    let (status, _) = gw
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "monthly", "amount_usd": "1"})))
        .await;
    assert_eq!(status, 201);
    let unpriced = json!({"model": "not-in-the-price-list", "messages": []});
    let r = gw.http.post(gw.url("/v1/chat/completions")).json(&unpriced).send().await.unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_priced", "{body}");
    assert_eq!(body["error"]["param"], "model");
    assert!(gw.fake.requests().is_empty(), "nothing unbounded was forwarded");

    let dir = tempfile::tempdir().unwrap();
    let pricing = dir.path().join("pricing.toml");
    std::fs::write(
        &pricing,
        "[models.\"gemini-2.5-pro\"]\ninput = 1.25\noutput = 10.0\n[default]\ninput = 5.0\noutput = 20.0\n",
    )
    .unwrap();
    let gw = TestGateway::start_with(|c| c.accounting.pricing_file = Some(pricing)).await;
    let (status, _) = gw
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "monthly", "amount_usd": "1"})))
        .await;
    assert_eq!(status, 201);
    let r = gw.http.post(gw.url("/v1/chat/completions")).json(&unpriced).send().await.unwrap();
    assert_eq!(r.status(), 200, "reserved and billed at the default price");
    let request_id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
    let cost: f64 = r.headers()["x-tollgate-cost-usd"].to_str().unwrap().parse().unwrap();
    assert!(cost > 0.0, "billed at the default price, not 0");
    let record = crate::accounting::ledger_record(&gw, &request_id).await;
    assert_eq!(record["unpriced"], false, "{record}");
    assert!(record["cost_micros"].as_i64().unwrap() > 0, "{record}");
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

#[tokio::test]
async fn a_request_the_rate_limits_refuse_leaves_nothing_reserved_on_its_budget() {
    let gw = TestGateway::start().await;
    let (status, _) =
        gw.admin(Method::PATCH, "/admin/v1/tenants/test", Some(json!({"policy": {"limits": {"rpm": 1}}}))).await;
    assert_eq!(status, 200);
    let (status, _) = gw
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "monthly", "amount_usd": "1"})))
        .await;
    assert_eq!(status, 201);
    let body = json!({"model": "gemini-2.5-pro", "max_tokens": 1000, "messages": []});
    let first = gw.http.post(gw.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let throttled = gw.http.post(gw.url("/v1/chat/completions")).json(&body).send().await.unwrap();
    assert_eq!(throttled.status(), 429);
    let throttled: Value = throttled.json().await.unwrap();
    assert_eq!(throttled["error"]["code"], "rate_limit_exceeded");
    let spent = settled_spend(&gw, "test", 2).await;
    let (_, list) = gw.admin(Method::GET, "/admin/v1/tenants/test/budgets", None).await;
    assert_eq!(
        list["data"][0]["remaining_micros"],
        1_000_000 - spent,
        "the refused request's worst case was given back"
    );
}
