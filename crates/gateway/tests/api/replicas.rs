//! Two gateway replicas sharing Postgres and Redis: limits and budgets hold
//! for the fleet, and a Redis outage falls back to local limits.
//!
//! The replicas share one test clock (as real replicas share NTP time), and
//! tests that count within a minute start at the beginning of one.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{
    CuttableLink, Db, PATIENCE, TestClock, TestGateway, client_with_key, envelope, scraped_value, service_addr,
    through, wait_for, wait_until,
};

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Two replicas on one fresh Postgres database and one Redis namespace.
async fn pair(redis: &str, replicas: u64) -> (TestGateway, TestGateway, tollgate_store::testing::TestDatabase) {
    pair_under(redis, replicas, &format!("test-{}", uuid_like())).await
}

/// [`pair`], with the replicas' keys in Redis under `prefix`.
async fn pair_under(
    redis: &str,
    replicas: u64,
    prefix: &str,
) -> (TestGateway, TestGateway, tollgate_store::testing::TestDatabase) {
    let db = tollgate_store::testing::TestDatabase::postgres().await;
    let prefix = prefix.to_owned();
    let clock = TestClock::new();
    let start = |url: String, prefix: String, redis: String| {
        let clock = clock.clone();
        async move {
            let dir = tempfile::tempdir().unwrap();
            let redis_file = dir.path().join("redis.url");
            std::fs::write(&redis_file, redis).unwrap();
            let fake = tollgate_fake_upstream::FakeUpstream::start().await.unwrap();
            let gw = TestGateway::start_on_clock(fake, Db::Url(url), clock, move |c| {
                c.redis.url_file = Some(redis_file);
                c.redis.key_prefix = prefix;
                c.redis.replicas = replicas;
            })
            .await;
            (gw, dir)
        }
    };
    let (a, _da) = start(db.url.clone(), prefix.clone(), redis.to_owned()).await;
    let (b, _db) = start(db.url.clone(), prefix, redis.to_owned()).await;
    (a, b, db)
}

fn uuid_like() -> String {
    format!("{:x}", chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default() ^ std::process::id() as i64)
}

/// Sends `body` through replica `gw` until `accepted` holds for the
/// response: the way to know that a change made on the other replica has
/// reached this one (by Postgres notification). Returns the requests sent.
async fn until_applied(
    gw: &TestGateway,
    key: &str,
    body: &str,
    accepted: impl Fn(&reqwest::Response) -> bool,
    what: &str,
) -> usize {
    let client = client_with_key(key);
    let mut sent = 0;
    wait_until(what, PATIENCE, async || {
        sent += 1;
        let response = client.post(gw.url("/v1/chat/completions")).body(body.to_owned()).send().await.unwrap();
        accepted(&response)
    })
    .await;
    sent
}

fn header_is(response: &reqwest::Response, name: &str, value: &str) -> bool {
    response.headers().get(name).is_some_and(|v| v == value)
}

async fn fallbacks(gw: &TestGateway) -> f64 {
    let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    scraped_value(&metrics, "tollgate_redis_fallbacks_total").unwrap()
}

/// Runs `attempt` on a fresh minute until one is decided by Redis alone.
/// A Redis call that times out (on a busy machine) is decided by the
/// replica's local counters: right for production, but such an attempt
/// proves nothing about limits shared by the fleet.
async fn decided_in_redis<T>(a: &TestGateway, b: &TestGateway, mut attempt: impl AsyncFnMut() -> T) -> T {
    wait_for("an attempt decided in Redis, with no local fallback", PATIENCE, async || {
        a.clock.to_next_minute();
        let before = fallbacks(a).await + fallbacks(b).await;
        let outcome = attempt().await;
        (fallbacks(a).await + fallbacks(b).await == before).then_some(outcome)
    })
    .await
}

/// Two replicas reaching Redis through `link`, with the test tenant limited
/// to ten requests a minute, at the start of a fresh minute.
async fn ten_a_minute_through(
    link: &CuttableLink,
) -> (TestGateway, TestGateway, tollgate_store::testing::TestDatabase) {
    let (a, b, db) = pair(&through(&redis_url(), link.addr), 2).await;
    let (status, _) =
        a.admin(Method::PATCH, "/admin/v1/tenants/test", Some(json!({"policy": {"limits": {"rpm": 10}}}))).await;
    assert_eq!(status, 200);
    a.clock.to_next_minute();
    (a, b, db)
}

/// The statuses of `n` requests sent one after another.
async fn statuses(n: usize, send: impl AsyncFn() -> u16) -> Vec<u16> {
    let mut seen = Vec::with_capacity(n);
    for _ in 0..n {
        seen.push(send().await);
    }
    seen
}

const CHAT: &str = r#"{"model":"gemini-2.5-flash-lite","messages":[]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_hold_across_two_replicas() {
    let (a, b, _db) = pair(&redis_url(), 2).await;
    let (status, _) =
        a.admin(Method::PATCH, "/admin/v1/tenants/test", Some(json!({"policy": {"limits": {"rpm": 10}}}))).await;
    assert_eq!(status, 200);
    let limited = |r: &reqwest::Response| header_is(r, "x-ratelimit-limit-requests", "10");
    until_applied(&b, &a.key, CHAT, limited, "B applies the limit set on A").await;
    // Each attempt starts on a fresh minute, which the probes did not count in.
    let ok = decided_in_redis(&a, &b, async || {
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
        ok
    })
    .await;
    assert_eq!(ok, 10, "the fleet admits exactly the limit, not limit x replicas");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_budget_is_spent_to_within_one_worst_case_and_never_past_it_across_two_replicas() {
    let (a, b, _db) = pair(&redis_url(), 2).await;
    let (status, _) = a
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "daily", "amount_usd": "0.01"})))
        .await;
    assert_eq!(status, 201);
    let budgeted = |r: &reqwest::Response| r.headers().contains_key("x-tollgate-budget-remaining-usd");
    // The probes are billed against the budget like any request.
    let probes = until_applied(&b, &a.key, CHAT, budgeted, "B applies the budget created on A").await;
    // One client for all: building a client per request would pace them.
    let client = client_with_key(&a.key);
    let urls = [a.url("/v1/chat/completions"), b.url("/v1/chat/completions")];
    let seen = crate::budgets::burst(&client, &urls, 300).await;
    // The burst can end while reservations in flight still hold what is
    // left (its last requests refused as busy); the requests that follow
    // use the budget up to its end, and are then refused as exhausted.
    let mut after = 0;
    wait_for("a request refused as exhausted", PATIENCE, async || {
        after += 1;
        let r = client.post(&urls[after % 2]).json(&crate::budgets::burst_body()).send().await.unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        (status == 429 && body["error"]["code"] == "insufficient_quota").then_some(())
    })
    .await;
    let total = seen.ok + seen.exhausted + seen.busy + probes as i64 + after as i64;
    let spent = wait_for("the ledger holds every request", PATIENCE, async || {
        let (_, s) = a.admin(Method::GET, "/admin/v1/usage/summary?tenant_id=test", None).await;
        (s["data"][0]["requests"].as_i64() == Some(total)).then(|| s["data"][0]["cost_micros"].as_i64().unwrap())
    })
    .await;
    let worst = crate::budgets::burst_worst_case_micros();
    println!("two replicas: {seen:?}, {spent} µ$ of 10000, worst case {worst} µ$");
    assert!((0..=10_000).contains(&spent), "fleet-wide spend {spent} µ$ within the $0.01 budget");
    assert!(spent >= 10_000 - worst, "the budget was used up to one worst case, not refused early: {spent} µ$");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_falls_back_to_local_limits_and_recovers() {
    let link = CuttableLink::start(service_addr(&redis_url(), 6379).await).await;
    let (a, _b, _db) = ten_a_minute_through(&link).await;
    let client = client_with_key(&a.key);
    let send = async || client.post(a.url("/v1/chat/completions")).body(CHAT).send().await.unwrap().status().as_u16();

    assert_eq!(send().await, 200, "shared limits");
    link.cut();
    // Redis is gone: this replica serves on its own, with 10 ÷ 2 per minute.
    let during = statuses(8, send).await;
    assert_eq!(during.iter().filter(|s| **s == 200).count(), 5, "{during:?}");
    assert!(during.iter().all(|s| *s == 200 || *s == 429), "traffic keeps being answered: {during:?}");
    let metrics = a.anonymous.get(a.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let fallbacks = scraped_value(&metrics, "tollgate_redis_fallbacks_total").unwrap();
    assert!(fallbacks >= 1.0, "fallbacks are counted: {fallbacks}");
    assert!(
        metrics.contains(r#"tollgate_rejections_total{reason="requests_per_minute",tenant="test"} 3"#),
        "{metrics}"
    );

    link.restore().await;
    // Back on Redis once it answers again: its count (1 so far this minute)
    // applies, not the local one (5, exhausted), so the first 200 says the
    // limits are shared again (refused requests count nowhere).
    wait_until("limits are shared again after Redis returns", PATIENCE, async || send().await == 200).await;
    let after = statuses(12, send).await;
    let admitted = after.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, 8, "ten a minute for the fleet, two already used: {after:?}");
}

/// A fleet started while Redis is down serves on local limits (the limit
/// divided by the replica count) and joins Redis once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_while_redis_is_down_serve_on_local_limits_and_join_it_later() {
    let link = CuttableLink::start(service_addr(&redis_url(), 6379).await).await;
    link.cut();
    let (a, _b, _db) = ten_a_minute_through(&link).await;
    let client = client_with_key(&a.key);
    let send = async || client.post(a.url("/v1/chat/completions")).body(CHAT).send().await.unwrap().status().as_u16();

    let during = statuses(8, send).await;
    assert_eq!(during.iter().filter(|s| **s == 200).count(), 5, "10 ÷ 2 on its own: {during:?}");
    assert!(during.iter().all(|s| *s == 200 || *s == 429), "{during:?}");
    assert!(fallbacks(&a).await >= 1.0, "the local decisions are counted");

    link.restore().await;
    // Redis's count for this minute starts at 0; the local one (5) is used
    // up, so a 200 says the replica decides in Redis now.
    wait_until("the replica joins Redis once it answers", PATIENCE, async || send().await == 200).await;
    let after = statuses(12, send).await;
    let admitted = after.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, 9, "ten a minute for the fleet, one already used: {after:?}");
}

/// Sends a request until it is not refused for being in flight: a slot is
/// released when its request's record closes, and reaches Redis a moment
/// later, in the background.
async fn past_in_flight(send: impl AsyncFn() -> reqwest::Response) -> reqwest::Response {
    wait_for("a request not refused for the in-flight limit", PATIENCE, async || {
        let response = send().await;
        let in_flight = response.status() == 429 && header_is(&response, "retry-after", "1");
        (!in_flight).then_some(response)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_and_token_limits_hold_across_two_replicas() {
    let (a, b, _db) = pair(&redis_url(), 2).await;
    let (status, _) = a
        .admin(
            Method::PATCH,
            "/admin/v1/tenants/test",
            Some(json!({"policy": {"limits": {"max_concurrent": 2, "tpm": 3000}}})),
        )
        .await;
    assert_eq!(status, 200);
    let small = r#"{"model":"gpt-4.1","max_tokens":10,"messages":[]}"#;
    let limited = |r: &reqwest::Response| header_is(r, "x-ratelimit-limit-tokens", "3000");
    until_applied(&b, &a.key, small, limited, "B applies the limits set on A").await;
    let client = client_with_key(&a.key);
    // A stream stays open (and holds its slot and tokens) until the test
    // lets go of it.
    let stream = |url: String, max_tokens: u64| {
        client
            .post(url)
            .header("x-fake-chunks", "100")
            .header("x-fake-chunk-interval-ms", "100")
            .json(&json!({"model": "gpt-4.1", "max_tokens": max_tokens, "stream": true, "messages": []}))
            .send()
    };
    let chat = |url: String, body: Value| client.post(url).json(&body).send();

    // Two streams in flight, one on each replica: the tenant's two slots.
    let (first, second, third) = decided_in_redis(&a, &b, async || {
        let first = past_in_flight(async || stream(a.url("/v1/chat/completions"), 100).await.unwrap()).await;
        let second = past_in_flight(async || stream(b.url("/v1/chat/completions"), 100).await.unwrap()).await;
        // Small enough for the token limit: only the in-flight limit can refuse it.
        let third = chat(a.url("/v1/chat/completions"), serde_json::from_str(small).unwrap()).await.unwrap();
        (first, second, third)
    })
    .await;
    assert_eq!((first.status(), second.status()), (reqwest::StatusCode::OK, reqwest::StatusCode::OK));
    assert_eq!(third.status(), 429, "the fleet holds two in flight, not two per replica");
    assert_eq!(third.headers()["retry-after"], "1", "refused for being in flight, not for tokens");
    drop((first, second));

    // Tokens: 3,000 a minute for the fleet. A stream open on A holds its
    // worst case (1,400 output tokens and its prompt), so 1,700 more on B do
    // not fit; once it ends, its reservation shrinks to the few tokens it
    // used, and they do.
    let ask = |max_tokens: u64| json!({"model": "gpt-4.1", "max_tokens": max_tokens, "messages": []});
    let (held, refused) = decided_in_redis(&a, &b, async || {
        let held = past_in_flight(async || stream(a.url("/v1/chat/completions"), 1400).await.unwrap()).await;
        let refused = past_in_flight(async || chat(b.url("/v1/chat/completions"), ask(1700)).await.unwrap()).await;
        (held, refused)
    })
    .await;
    assert_eq!(held.status(), 200);
    assert_eq!(refused.status(), 429, "1,400 held on A and 1,700 asked on B do not fit in 3,000");
    assert_eq!(refused.headers()["x-should-retry"], "true", "it would fit on its own");
    assert_eq!(envelope(refused).await["error"]["type"], "tokens");
    drop(held);
    wait_until("the held stream's reservation corrected to what it used", PATIENCE, async || {
        chat(b.url("/v1/chat/completions"), ask(1700)).await.unwrap().status() == 200
    })
    .await;
}

/// Two replicas on Redis `redis` under `prefix`, with the test tenant's
/// limits and a daily budget far from their ends (so both lease), applied
/// on both, at the start of a fresh minute. Returns the budget's id.
async fn leasing_pair(
    redis: &str,
    prefix: &str,
) -> (TestGateway, TestGateway, tollgate_store::testing::TestDatabase, String) {
    let (a, b, db) = pair_under(redis, 2, prefix).await;
    let limits = json!({"policy": {"limits": {"rpm": 1_000_000, "tpm": 1_000_000_000, "max_concurrent": 100_000}}});
    let (status, _) = a.admin(Method::PATCH, "/admin/v1/tenants/test", Some(limits)).await;
    assert_eq!(status, 200);
    let (status, budget) = a
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "daily", "amount_usd": "1000"})))
        .await;
    assert_eq!(status, 201);
    let applied = |r: &reqwest::Response| {
        header_is(r, "x-ratelimit-limit-requests", "1000000")
            && r.headers().contains_key("x-tollgate-budget-remaining-usd")
    };
    until_applied(&b, &a.key, CHAT, applied, "B applies the limits and budget set on A").await;
    until_applied(&a, &a.key, CHAT, applied, "A applies them too").await;
    a.clock.to_next_minute();
    (a, b, db, budget["id"].as_str().unwrap().to_owned())
}

/// Sends `n` requests, alternately through `a` and `b`; all are admitted.
async fn alternately(a: &TestGateway, b: &TestGateway, n: usize) {
    let client = client_with_key(&a.key);
    for i in 0..n {
        let gw = if i % 2 == 0 { a } else { b };
        let r = client.post(gw.url("/v1/chat/completions")).body(CHAT).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// Shuts both replicas down, then checks Redis holds, under `prefix`,
/// exactly `requests` this minute, none in flight, and the budget
/// committed to exactly its settled spend: nothing leased or reserved is
/// left counted.
async fn shut_down_leaving_redis_exact(
    mut a: TestGateway,
    mut b: TestGateway,
    prefix: &str,
    budget_id: &str,
    requests: i64,
) {
    let window = a.clock.now().timestamp_millis() / 60_000;
    let day = a.clock.now().format("%Y%m%d").to_string();
    for gw in [&mut a, &mut b] {
        gw.begin_shutdown().await.unwrap().unwrap();
    }
    let mut redis = redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let mut get = async |key: String| -> Option<i64> {
        redis::cmd("GET").arg(format!("{prefix}:{key}")).query_async(&mut redis).await.unwrap()
    };
    assert_eq!(get(format!("rl:t:test:rpm@{window}")).await, Some(requests), "exactly the requests of this minute");
    assert_eq!(get("rl:t:test:inflight".to_owned()).await, Some(0), "none in flight");
    let budget_key = format!("budget:{budget_id}:{day}");
    let committed = get(budget_key.clone()).await;
    let spent = get(format!("{budget_key}:spent")).await;
    assert!(spent.is_some_and(|s| s > 0), "requests were billed: {spent:?}");
    assert_eq!(committed, spent, "nothing reserved or leased is left committed");
}

/// With limits and a budget far from their ends, each replica admits from
/// blocks it leases from Redis instead of asking Redis for every request;
/// at shutdown both give back what they held, so Redis counts exactly the
/// requests admitted, none in flight, and a budget committed to exactly
/// its settled spend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_limits_are_given_back_at_shutdown_leaving_redis_exact() {
    let prefix = format!("test-{}", uuid_like());
    let (a, b, _db, budget) = leasing_pair(&redis_url(), &prefix).await;
    alternately(&a, &b, 40).await;
    for gw in [&a, &b] {
        let leased = gw.metric("tollgate_shared_lease_admissions_total").await;
        assert!(leased >= 30.0, "most checks were admitted from leases: {leased}");
        // Each replica served 20 requests: the first asked Redis (bringing
        // blocks back), the rest were admitted from those blocks.
        let calls = gw.metric(r#"tollgate_shared_script_calls_total{carrying="checks"}"#).await;
        assert!((1.0..10.0).contains(&calls), "{calls} script calls with checks for 20 requests");
        // Settled spend (not leased) goes to Redis as corrections.
        let corrections = async || gw.metric(r#"tollgate_shared_script_calls_total{carrying="corrections"}"#).await;
        wait_until("corrections are sent", PATIENCE, async || corrections().await >= 1.0).await;
    }
    shut_down_leaving_redis_exact(a, b, &prefix, &budget, 40).await;
}

/// Redis going away while the replicas hold leases loses nothing: what
/// they give back when the leases go idle, and the corrections, wait for
/// Redis and are applied once when it answers, so Redis ends as exact as
/// if it had never gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_given_back_during_a_redis_outage_reach_it_once_it_answers() {
    let link = CuttableLink::start(service_addr(&redis_url(), 6379).await).await;
    let prefix = format!("test-{}", uuid_like());
    let (a, b, _db, budget) = leasing_pair(&through(&redis_url(), link.addr), &prefix).await;
    alternately(&a, &b, 40).await;
    link.cut();
    // A second idle, each replica gives its leases back; that cannot reach
    // Redis, so it waits.
    for gw in [&a, &b] {
        let waiting = async || gw.metric("tollgate_shared_corrections_waiting").await > 0.0;
        wait_until("the give-backs wait for Redis", PATIENCE, waiting).await;
    }
    link.restore().await;
    for gw in [&a, &b] {
        let applied = async || gw.metric("tollgate_shared_corrections_waiting").await == 0.0;
        wait_until("the give-backs are applied once Redis answers", PATIENCE, applied).await;
    }
    shut_down_leaving_redis_exact(a, b, &prefix, &budget, 40).await;
}

/// Clients that go away mid-stream on leasing replicas give back their
/// in-flight slots and settle their reservations like any other request:
/// into the replica's leases, which go back to Redis at shutdown, so Redis
/// ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leaving_mid_stream_leave_leased_counters_exact() {
    use futures_util::StreamExt;
    let prefix = format!("test-{}", uuid_like());
    let (a, b, _db, budget) = leasing_pair(&redis_url(), &prefix).await;
    alternately(&a, &b, 10).await;
    let client = client_with_key(&a.key);
    for gw in [&a, &b, &a, &b] {
        let response = client
            .post(gw.url("/v1/chat/completions"))
            .header("x-fake-chunks", "50")
            .header("x-fake-chunk-interval-ms", "100")
            .body(r#"{"model":"gemini-2.5-flash-lite","stream":true,"messages":[{"role":"user","content":"hi"}]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        assert!(stream.next().await.unwrap().unwrap().starts_with(b"data: "));
    }
    for gw in [&a, &b] {
        let settled = async || gw.metric("tollgate_in_flight_requests").await == 0.0;
        wait_until("the abandoned streams are settled", PATIENCE, settled).await;
        assert!(gw.metric("tollgate_shared_lease_admissions_total").await >= 5.0, "the replica leased");
    }
    assert_eq!(a.fake.streams_cancelled() + b.fake.streams_cancelled(), 4);
    shut_down_leaving_redis_exact(a, b, &prefix, &budget, 14).await;
}
