//! Two gateway replicas sharing Postgres and Redis: limits and budgets hold
//! for the fleet, and a Redis outage falls back to local limits.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::helpers::{CuttableLink, Db, TestGateway, client_with_key};

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Two replicas on one fresh Postgres database and one Redis namespace.
async fn pair(redis: &str, replicas: u64) -> (TestGateway, TestGateway, tollgate_store::testing::TestDatabase) {
    let db = tollgate_store::testing::TestDatabase::postgres().await;
    let prefix = format!("test-{}", uuid_like());
    let start = |url: String, prefix: String, redis: String| async move {
        let dir = tempfile::tempdir().unwrap();
        let redis_file = dir.path().join("redis.url");
        std::fs::write(&redis_file, redis).unwrap();
        let fake = tollgate_fake_upstream::FakeUpstream::start().await.unwrap();
        let gw = TestGateway::start_full(fake, Db::Url(url), move |c| {
            c.redis.url_file = Some(redis_file);
            c.redis.key_prefix = prefix;
            c.redis.replicas = replicas;
        })
        .await;
        (gw, dir)
    };
    let (a, _da) = start(db.url.clone(), prefix.clone(), redis.to_owned()).await;
    let (b, _db) = start(db.url.clone(), prefix, redis.to_owned()).await;
    (a, b, db)
}

fn uuid_like() -> String {
    format!("{:x}", chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() ^ std::process::id() as i64)
}

async fn early_in_a_minute() {
    let ms = chrono::Utc::now().timestamp_millis() % 60_000;
    if ms > 45_000 {
        tokio::time::sleep(Duration::from_millis((60_000 - ms + 100) as u64)).await;
    }
}

const CHAT: &str = r#"{"model":"gemini-2.5-flash-lite","messages":[]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_hold_across_two_replicas() {
    early_in_a_minute().await;
    let (a, b, _db) = pair(&redis_url(), 2).await;
    let (status, _) =
        a.admin(Method::PATCH, "/admin/v1/tenants/test", Some(json!({"policy": {"limits": {"rpm": 10}}}))).await;
    assert_eq!(status, 200);
    // B learns of the change through Postgres notifications.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ok = 0;
    for i in 0..16 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let r = client_with_key(&a.key).post(gw.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
        match r.status().as_u16() {
            200 => ok += 1,
            429 => {}
            other => panic!("status {other}"),
        }
    }
    assert_eq!(ok, 10, "the fleet admits exactly the limit, not limit x replicas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_budget_is_spent_to_within_one_worst_case_and_never_past_it_across_two_replicas() {
    let (a, b, _db) = pair(&redis_url(), 2).await;
    let (status, _) = a
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "daily", "amount_usd": "0.01"})))
        .await;
    assert_eq!(status, 201);
    // B learns of the budget through Postgres notifications.
    let probe = client_with_key(&a.key);
    crate::helpers::eventually_async("replica B knows the budget", || async {
        let r = probe.post(b.url("/v1/chat/completions")).json(&json!({"model": "no-price", "messages": []})).send();
        r.await.unwrap().status() == 400
    })
    .await;
    // One client for all: building a client per request would pace them.
    let client = client_with_key(&a.key);
    let urls = [a.url("/v1/chat/completions"), b.url("/v1/chat/completions")];
    let seen = crate::budgets::burst(&client, &urls, 300).await;
    let requests = seen.ok + seen.exhausted + seen.busy + 1;
    let mut spent = -1;
    for _ in 0..400 {
        let (_, s) = a.admin(Method::GET, "/admin/v1/usage/summary?tenant_id=test", None).await;
        if s["data"][0]["requests"].as_i64() >= Some(requests) {
            spent = s["data"][0]["cost_micros"].as_i64().unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let worst = crate::budgets::burst_worst_case_micros();
    println!("two replicas: {seen:?}, {spent} µ$ of 10000, worst case {worst} µ$");
    assert!((0..=10_000).contains(&spent), "fleet-wide spend {spent} µ$ within the $0.01 budget");
    assert!(spent >= 10_000 - worst, "the budget was used up to one worst case, not refused early: {spent} µ$");
    assert!(seen.exhausted > 0, "and then refused as exhausted: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_falls_back_to_local_limits_and_recovers() {
    early_in_a_minute().await;
    let link = CuttableLink::start("127.0.0.1:6379".parse().unwrap()).await;
    let (a, _b, _db) = pair(&format!("redis://{}", link.addr), 2).await;
    let (status, _) =
        a.admin(Method::PATCH, "/admin/v1/tenants/test", Some(json!({"policy": {"limits": {"rpm": 10}}}))).await;
    assert_eq!(status, 200);
    let client = client_with_key(&a.key);
    let send = async || client.post(a.url("/v1/chat/completions")).body(CHAT).send().await.unwrap().status().as_u16();

    assert_eq!(send().await, 200, "shared limits");
    link.cut();
    // Redis is gone: this replica serves on its own, with 10 ÷ 2 per minute.
    let mut during = Vec::new();
    for _ in 0..8 {
        during.push(send().await);
    }
    assert_eq!(during.iter().filter(|s| **s == 200).count(), 5, "{during:?}");
    assert!(during.iter().all(|s| *s == 200 || *s == 429), "traffic keeps being answered: {during:?}");
    let metrics = a.anonymous.get(a.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let fallbacks = metrics.lines().find_map(|l| l.strip_prefix("tollgate_redis_fallbacks_total ")).unwrap();
    assert!(fallbacks.parse::<u64>().unwrap() >= 1, "fallbacks are counted: {fallbacks}");
    assert!(
        metrics.contains(r#"tollgate_rejections_total{reason="requests_per_minute",tenant="test"} 3"#),
        "{metrics}"
    );

    link.restore().await;
    // Back on Redis once it answers again: its count (1 so far this minute)
    // applies, not the local one (5, exhausted).
    let mut recovered = false;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if send().await == 200 {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "limits are shared again after Redis returns");
    let mut after = Vec::new();
    for _ in 0..12 {
        after.push(send().await);
    }
    let admitted = after.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, 8, "ten a minute for the fleet, two already used: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_and_token_limits_hold_across_two_replicas() {
    early_in_a_minute().await;
    let (a, b, _db) = pair(&redis_url(), 2).await;
    let (status, _) = a
        .admin(
            Method::PATCH,
            "/admin/v1/tenants/test",
            Some(json!({"policy": {"limits": {"max_concurrent": 2, "tpm": 3000}}})),
        )
        .await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = client_with_key(&a.key);
    let slow = |url: String| {
        client
            .post(url)
            .header("x-fake-chunks", "10")
            .header("x-fake-chunk-interval-ms", "100")
            .body(r#"{"model":"gpt-4.1","max_tokens":1000,"stream":true,"messages":[]}"#)
            .send()
    };
    // Two streams in flight, one on each replica: the tenant's two slots.
    let first = slow(a.url("/v1/chat/completions")).await.unwrap();
    let second = slow(b.url("/v1/chat/completions")).await.unwrap();
    assert_eq!((first.status(), second.status()), (reqwest::StatusCode::OK, reqwest::StatusCode::OK));
    let third = client.post(a.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
    assert_eq!(third.status(), 429, "the fleet holds two in flight, not two per replica");
    first.bytes().await.unwrap();
    second.bytes().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Tokens: 3,000 a minute for the fleet; 1,000 reserved per request
    // while in flight, corrected to the few tokens really used after.
    let big = json!({"model": "gpt-4.1", "max_tokens": 1400, "messages": []});
    let held_a = client.post(a.url("/v1/chat/completions")).header("x-fake-latency-ms", "500").json(&big).send();
    let held_b = client.post(b.url("/v1/chat/completions")).header("x-fake-latency-ms", "500").json(&big).send();
    let probe = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        client.post(b.url("/v1/chat/completions")).json(&big).send().await.unwrap().status()
    };
    let (ra, rb, probe) = tokio::join!(held_a, held_b, probe);
    assert_eq!((ra.unwrap().status(), rb.unwrap().status()), (reqwest::StatusCode::OK, reqwest::StatusCode::OK));
    assert_eq!(probe, 429, "a third 1,400-token reservation does not fit in 3,000 across replicas");
}
