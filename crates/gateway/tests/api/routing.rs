//! Routes across several upstreams, through the real gateway and two fake
//! upstreams: fallbacks, what is never retried, weighted and sticky
//! variants, and money that stays exact when a request falls back.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tollgate_fake_upstream::{ErrorStyle, FakeUpstream, Fault, Scenario};
use tollgate_gateway::Config;
use tollgate_gateway::routing::config::{
    BreakerConfig, GroupConfig, Overrides, RetryOn, RouteConfig, Sticky, TargetConfig,
};

use crate::helpers::{PATIENCE, TestGateway, client_with_key, wait_for, wait_until};

fn target(upstream: &str, model: &str, weight: u32) -> TargetConfig {
    TargetConfig {
        upstream: upstream.to_owned(),
        model: Some(model.to_owned()),
        weight,
        overrides: Overrides::default(),
    }
}

fn route(model: &str, groups: Vec<Vec<TargetConfig>>) -> RouteConfig {
    RouteConfig {
        model: model.to_owned(),
        api: Default::default(),
        groups: groups.into_iter().map(|targets| GroupConfig { targets }).collect(),
        sticky: None,
        retry_on: vec![RetryOn::Connect, RetryOn::Timeout, RetryOn::RateLimited, RetryOn::ServerError],
        attempts_per_target: 1,
        deadline: Duration::from_secs(30),
        breaker: BreakerConfig::default(),
    }
}

/// A gateway whose default upstream is `primary` and which also knows
/// `backup`, with `routes`.
async fn routed_gateway(backup: &FakeUpstream, routes: Vec<RouteConfig>) -> TestGateway {
    let backup_url = backup.base_url();
    TestGateway::start_with(move |c: &mut Config| {
        let mut extra = c.upstream.clone();
        extra.name = "backup".to_owned();
        extra.base_url = backup_url;
        c.upstreams = vec![extra];
        c.routes = routes;
    })
    .await
}

fn always_failing(status: u16) -> Scenario {
    Scenario { fault: Some(Fault::Status { status, style: ErrorStyle::OpenAi }), ..Scenario::default() }
}

/// A chat completion through the gateway with its test key.
async fn chat(gw: &TestGateway, body: &Value) -> reqwest::Response {
    gw.http.post(gw.url("/v1/chat/completions")).json(body).send().await.unwrap()
}

async fn record(gw: &TestGateway, request_id: &str) -> Value {
    crate::accounting::ledger_record(gw, request_id).await
}

#[tokio::test]
async fn a_failing_primary_falls_back_and_the_served_model_is_billed_once() {
    let backup = FakeUpstream::start().await.unwrap();
    let routes = vec![route(
        "chat-default",
        vec![vec![target("default", "gemini-2.5-flash-lite", 1)], vec![target("backup", "gemini-2.5-pro", 1)]],
    )];
    let gw = routed_gateway(&backup, routes).await;
    gw.fake.set_defaults(always_failing(503));
    let response = chat(&gw, &json!({"model": "chat-default", "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-upstream"], "backup");
    assert_eq!(response.headers()["x-tollgate-model"], "gemini-2.5-pro");
    assert_eq!(response.headers()["x-tollgate-attempts"], "2");
    let request_id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
    let cost: f64 = response.headers()["x-tollgate-cost-usd"].to_str().unwrap().parse().unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], "gemini-2.5-pro");
    assert_eq!(gw.fake.requests()[0].json()["model"], "gemini-2.5-flash-lite", "the primary was tried first");
    assert_eq!(backup.requests()[0].json()["model"], "gemini-2.5-pro", "the fallback got its own model name");

    let record = record(&gw, &request_id).await;
    assert_eq!(record["requested_model"], "chat-default");
    assert_eq!(record["upstream_model"], "gemini-2.5-pro");
    assert_eq!(record["route"], "chat-default");
    assert_eq!(record["target"], "chat-default/1/0");
    assert_eq!(record["upstream"], "backup");
    assert_eq!(record["attempts"], 2);
    // Priced as Pro ($1.25/$10 per M), not Flash-Lite.
    let usage = &backup.reported()[0].usage.clone().unwrap();
    let (prompt, completion) = (usage["prompt_tokens"].as_i64().unwrap(), usage["completion_tokens"].as_i64().unwrap());
    let expected = (prompt * 1_250_000 + completion * 10_000_000 + 500_000) / 1_000_000;
    assert_eq!(record["cost_micros"], expected, "{record}");
    assert!((cost * 1e6 - expected as f64).abs() < 0.5);
    let (_, page) = gw.admin(Method::GET, "/admin/v1/usage/records?limit=200", None).await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1, "one ledger record per client request");
    // Cost per request per variant is one call.
    let (status, summary) =
        gw.admin(Method::GET, "/admin/v1/usage/summary?group_by=route,target,upstream,served_model", None).await;
    assert_eq!(status, 200, "{summary}");
    let row = &summary["data"][0];
    assert_eq!(
        (&row["route"], &row["target"], &row["upstream"], &row["served_model"]),
        (&json!("chat-default"), &json!("chat-default/1/0"), &json!("backup"), &json!("gemini-2.5-pro")),
        "{summary}"
    );
    assert_eq!((row["requests"].as_i64(), row["cost_micros"].as_i64()), (Some(1), Some(expected)));
    let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    for series in [
        r#"tollgate_upstream_attempts_total{outcome="server_error",target="chat-default/0/0",upstream="default"} 1"#,
        r#"tollgate_upstream_attempts_total{outcome="ok",target="chat-default/1/0",upstream="backup"} 1"#,
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }
}

#[tokio::test]
async fn an_error_no_retry_can_fix_is_never_retried_or_fallen_back_from() {
    let backup = FakeUpstream::start().await.unwrap();
    let mut routed =
        route("chat-default", vec![vec![target("default", "gpt-4.1", 1)], vec![target("backup", "gpt-4.1", 1)]]);
    routed.attempts_per_target = 3;
    let gw = routed_gateway(&backup, vec![routed]).await;
    gw.fake.set_defaults(always_failing(400));
    let response = chat(&gw, &json!({"model": "chat-default", "messages": []})).await;
    assert_eq!(response.status(), 400, "the upstream's own answer");
    assert_eq!(response.headers()["x-tollgate-attempts"], "1");
    assert_eq!(gw.fake.requests().len(), 1);
    assert!(backup.requests().is_empty(), "no fallback for a bad request");
}

#[tokio::test]
async fn retries_stay_on_a_target_before_falling_back_and_an_exhausted_route_relays_the_last_answer() {
    let backup = FakeUpstream::start().await.unwrap();
    let mut routed =
        route("chat-default", vec![vec![target("default", "gpt-4.1", 1)], vec![target("backup", "gpt-4.1", 1)]]);
    routed.attempts_per_target = 2;
    let gw = routed_gateway(&backup, vec![routed]).await;
    gw.fake.set_defaults(always_failing(503));
    backup.set_defaults(always_failing(429));
    let response = chat(&gw, &json!({"model": "chat-default", "messages": []})).await;
    assert_eq!(response.status(), 429, "the last target's answer");
    assert_eq!(response.headers()["x-tollgate-attempts"], "4");
    assert_eq!((gw.fake.requests().len(), backup.requests().len()), (2, 2));
}

#[tokio::test]
async fn a_streamed_request_falls_back_before_its_first_event() {
    let backup = FakeUpstream::start().await.unwrap();
    let routes =
        vec![route("chat-default", vec![vec![target("default", "gpt-4.1", 1)], vec![target("backup", "gpt-4.1", 1)]])];
    let gw = routed_gateway(&backup, routes).await;
    gw.fake.set_defaults(always_failing(502));
    let response = chat(&gw, &json!({"model": "chat-default", "stream": true, "messages": []})).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(backup.streams_completed(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_lands_within_two_percent_and_sticky_users_stay_on_one_variant() {
    let backup = FakeUpstream::start().await.unwrap();
    let routes =
        vec![route("split", vec![vec![target("default", "variant-a", 90), target("backup", "variant-b", 10)]])];
    let gw = routed_gateway(&backup, routes).await;
    let total = 10_000;
    let mut tasks = tokio::task::JoinSet::new();
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
    for _ in 0..total {
        let (client, url, permits) = (gw.http.clone(), gw.url("/v1/embeddings"), semaphore.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.unwrap();
            let r = client.post(url).json(&json!({"model": "split", "input": "x"})).send().await.unwrap();
            assert_eq!(r.status(), 200);
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let to_b = backup.requests().len();
    let share = to_b as f64 / total as f64;
    println!("split: {to_b} of {total} to the 10% variant ({:.2}%)", share * 100.0);
    assert!((0.08..=0.12).contains(&share), "10% ± 2%: {share}");
    assert_eq!(gw.fake.requests().len() + to_b, total);

    let mut sticky = route("sticky", vec![vec![target("default", "variant-a", 50), target("backup", "variant-b", 50)]]);
    sticky.sticky = Some(Sticky::User);
    let backup = FakeUpstream::start().await.unwrap();
    let gw = routed_gateway(&backup, vec![sticky]).await;
    for user in ["alice", "bob", "carol", "dave"] {
        let mut served_by = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let r = gw
                .http
                .post(gw.url("/v1/embeddings"))
                .json(&json!({"model": "sticky", "input": "x", "user": user}))
                .send()
                .await
                .unwrap();
            served_by.insert(r.headers()["x-tollgate-model"].to_str().unwrap().to_owned());
        }
        assert_eq!(served_by.len(), 1, "{user} stayed on one variant: {served_by:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_budget_holds_when_every_request_falls_back_to_a_pricier_model() {
    let backup = FakeUpstream::start().await.unwrap();
    let routes = vec![route(
        "cheap-first",
        vec![vec![target("default", "gemini-2.5-flash-lite", 1)], vec![target("backup", "gemini-2.5-pro", 1)]],
    )];
    let gw = routed_gateway(&backup, routes).await;
    gw.fake.set_defaults(always_failing(503));
    let (status, _) = gw
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "monthly", "amount_usd": "0.01"})))
        .await;
    assert_eq!(status, 201);
    let client = client_with_key(&gw.key);
    let body = json!({"model": "cheap-first", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]});
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..300 {
        let (client, url, body) = (client.clone(), gw.url("/v1/chat/completions"), body.clone());
        tasks.spawn(async move { client.post(url).json(&body).send().await.unwrap().status().as_u16() });
    }
    let mut statuses = std::collections::BTreeMap::new();
    while let Some(status) = tasks.join_next().await {
        *statuses.entry(status.unwrap()).or_insert(0) += 1;
    }
    let served = statuses.get(&200).copied().unwrap_or(0);
    assert!(served > 0 && statuses.keys().all(|s| [200, 429].contains(s)), "{statuses:?}");
    let spent = wait_for("every record is written", PATIENCE, async || {
        let (_, s) = gw.admin(Method::GET, "/admin/v1/usage/summary?tenant_id=test", None).await;
        (s["data"][0]["requests"].as_i64() == Some(300)).then(|| s["data"][0]["cost_micros"].as_i64().unwrap())
    })
    .await;
    println!("{statuses:?}: {spent} µ$ of 10000, every answer from Pro");
    assert!(spent <= 10_000, "the reservation covered the pricier fallback: {spent} µ$");
    assert_eq!(backup.requests().len(), served, "every answer came from the fallback");
}

#[tokio::test]
async fn a_route_sends_only_models_the_key_may_use() {
    let backup = FakeUpstream::start().await.unwrap();
    let routes = vec![route(
        "gemini-default",
        vec![vec![target("default", "gemini-2.5-flash", 1)], vec![target("backup", "gpt-4.1", 1)]],
    )];
    let gw = routed_gateway(&backup, routes).await;
    let restricted =
        client_with_key(&gw.create_key("test", json!({"name": "g", "allowed_models": ["gemini-*"]})).await);
    let response = restricted
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "gemini-default", "messages": []}))
        .send();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 403, "the fallback's gpt-4.1 is not allowed for this key");
    assert!(gw.fake.requests().is_empty() && backup.requests().is_empty());
}

#[tokio::test]
async fn a_breaker_opens_after_its_threshold_probes_after_its_cooldown_and_closes() {
    let backup = FakeUpstream::start().await.unwrap();
    let mut routed =
        route("guarded", vec![vec![target("default", "gpt-4.1", 1)], vec![target("backup", "gpt-4.1", 1)]]);
    routed.breaker = BreakerConfig {
        window: Duration::from_secs(60),
        min_requests: 4,
        failure_rate: 0.5,
        cooldown: Duration::from_millis(400),
        probes: 2,
        ramp: Duration::ZERO,
    };
    let gw = routed_gateway(&backup, vec![routed]).await;
    let send = async || {
        let r = gw
            .http
            .post(gw.url("/v1/embeddings"))
            .json(&json!({"model": "guarded", "input": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "the fallback answers throughout");
        r.headers()["x-tollgate-upstream"].to_str().unwrap().to_owned()
    };
    gw.fake.set_defaults(always_failing(503));
    for _ in 0..3 {
        assert_eq!(send().await, "backup");
    }
    assert_eq!(gw.fake.requests().len(), 3, "below the minimum, the primary is still tried");
    assert_eq!(send().await, "backup");
    assert_eq!(gw.fake.requests().len(), 4, "the fourth failure opens the breaker");
    for _ in 0..5 {
        assert_eq!(send().await, "backup");
    }
    assert_eq!(gw.fake.requests().len(), 4, "open: the primary is skipped");
    let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tollgate_breakers_open 1"), "the open breaker is visible");
    let (status, routes) = gw.admin(Method::GET, "/admin/v1/routes", None).await;
    assert_eq!(status, 200, "{routes}");
    let primary = &routes["data"][0]["groups"][0][0];
    assert_eq!((&primary["label"], &primary["breaker"]), (&json!("guarded/0/0"), &json!("open")), "{routes}");
    assert_eq!(routes["data"][0]["groups"][1][0]["breaker"], "closed");
    let (_, upstreams) = gw.admin(Method::GET, "/admin/v1/upstreams", None).await;
    let names: Vec<&str> = upstreams["data"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["backup", "default"]);
    assert_eq!(upstreams["data"][1]["targets_not_closed"], 1, "{upstreams}");
    assert!(!upstreams.to_string().contains(crate::helpers::UPSTREAM_KEY), "no key in the listing");

    gw.fake.set_defaults(Scenario::default());
    // After the cooldown, probes go to the primary one at a time; two good
    // ones close the breaker.
    wait_until("the primary is probed and serves again", PATIENCE, async || send().await == "default").await;
    assert_eq!(send().await, "default");
    let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tollgate_breakers_open 0"), "closed again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_changed_in_the_routes_file_take_effect_under_load_with_no_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    let routes = |a: u32, b: u32| {
        format!(
            "[[routes]]\nmodel = \"live\"\n[[routes.groups]]\ntargets = [\n  \
             {{ upstream = \"default\", model = \"variant-a\", weight = {a} }},\n  \
             {{ upstream = \"backup\", model = \"variant-b\", weight = {b} }},\n]\n"
        )
    };
    std::fs::write(&file, routes(100, 0)).unwrap();
    let backup = FakeUpstream::start().await.unwrap();
    let (backup_url, routes_file) = (backup.base_url(), file.clone());
    let gw = TestGateway::start_with(move |c: &mut Config| {
        let mut extra = c.upstream.clone();
        extra.name = "backup".to_owned();
        extra.base_url = backup_url;
        c.upstreams = vec![extra];
        c.routing.routes_file = Some(routes_file);
        c.routing.reload_interval = Duration::from_millis(50);
    })
    .await;

    // Load keeps flowing while the file changes under it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, url, stop) = (gw.http.clone(), gw.url("/v1/embeddings"), stop.clone());
        load.spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client.post(&url).json(&json!({"model": "live", "input": "x"})).send().await.unwrap();
                statuses.push(r.status().as_u16());
            }
            statuses
        });
    }
    wait_until("traffic on variant A", PATIENCE, async || gw.fake.requests().len() > 20).await;
    assert!(backup.requests().is_empty());

    // A file with a mistake is refused: the routes in force stay.
    std::fs::write(&file, "[[routes]]\nmodel = \"live\"\ngroups = []\n").unwrap();
    wait_until("the broken file is refused", PATIENCE, async || reloads(&gw, "rejected").await == 1).await;
    let before = gw.fake.requests().len();
    wait_until("more traffic on variant A", PATIENCE, async || gw.fake.requests().len() > before + 50).await;
    assert!(backup.requests().is_empty(), "the broken file changed nothing");

    std::fs::write(&file, routes(0, 100)).unwrap();
    wait_until("the new weights are applied", PATIENCE, async || reloads(&gw, "applied").await == 1).await;
    wait_until("traffic moves to variant B", PATIENCE, async || backup.requests().len() > 20).await;
    let on_a = gw.fake.requests().len();
    wait_until("more traffic on variant B", PATIENCE, async || backup.requests().len() > 60).await;
    assert_eq!(gw.fake.requests().len(), on_a, "none left on A once the new weights are in force");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    while let Some(statuses) = load.join_next().await {
        let statuses = statuses.unwrap();
        sent += statuses.len();
        assert!(statuses.iter().all(|s| *s == 200), "no failed request: {statuses:?}");
    }
    println!("{sent} requests across two reloads, none failed");
}

async fn reloads(gw: &TestGateway, result: &str) -> u64 {
    let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let series = format!("tollgate_routes_reloads_total{{result=\"{result}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_key_file_rewritten_under_load_is_picked_up_with_no_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("upstream.keys");
    std::fs::write(&keys, "sk-first\n").unwrap();
    let key_file = keys.clone();
    let gw = TestGateway::start_with(move |c: &mut Config| {
        c.upstream.api_key_file = Some(key_file);
        c.routing.reload_interval = Duration::from_millis(50);
    })
    .await;
    gw.fake.accept_keys(&["sk-first"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, url, stop) = (gw.http.clone(), gw.url("/v1/embeddings"), stop.clone());
        load.spawn(async move {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client.post(&url).json(&json!({"model": "text-embedding-3-small", "input": "x"})).send();
                statuses.push(r.await.unwrap().status().as_u16());
            }
            statuses
        });
    }
    let sent_with = |key: &'static str| {
        let fake = &gw.fake;
        move || fake.requests().iter().filter(|r| r.headers["authorization"] == format!("Bearer {key}")).count()
    };
    wait_until("traffic with the first key", PATIENCE, async || sent_with("sk-first")() > 20).await;
    // Rotation as an operator does it: the upstream takes both keys, the
    // file gets the new one, then the old one is revoked upstream.
    gw.fake.accept_keys(&["sk-first", "sk-second"]);
    std::fs::write(&keys, "sk-second\n").unwrap();
    wait_until("traffic with the new key", PATIENCE, async || sent_with("sk-second")() > 20).await;
    gw.fake.accept_keys(&["sk-second"]);
    let old = sent_with("sk-first")();
    wait_until("more traffic with the new key", PATIENCE, async || sent_with("sk-second")() > 60).await;
    assert_eq!(sent_with("sk-first")(), old, "the old key is no longer used");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(statuses) = load.join_next().await {
        let statuses = statuses.unwrap();
        assert!(statuses.iter().all(|s| *s == 200), "no failed request: {statuses:?}");
    }
}

#[tokio::test]
async fn a_key_the_upstream_refuses_is_set_aside_and_the_request_retried_with_another() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("upstream.keys");
    std::fs::write(&keys, "sk-revoked\nsk-good\n").unwrap();
    let key_file = keys.clone();
    let gw = TestGateway::start_with(move |c: &mut Config| c.upstream.api_key_file = Some(key_file)).await;
    gw.fake.accept_keys(&["sk-good"]);
    for _ in 0..10 {
        let r = gw.http.post(gw.url("/v1/embeddings")).json(&json!({"model": "m", "input": "x"})).send().await.unwrap();
        assert_eq!(r.status(), 200, "the tenant never sees the refused key");
    }
    let with_revoked = gw.fake.requests().iter().filter(|r| r.headers["authorization"] == "Bearer sk-revoked").count();
    assert_eq!(with_revoked, 1, "tried once, then set aside");
    let metrics = gw.anonymous.get(gw.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tollgate_upstream_keys_set_aside_total 1"), "reported");
}

/// A gateway whose route `h2` goes to `backup`, spoken to in HTTP/2 by
/// prior knowledge.
async fn gateway_with_http2_backup(backup: &FakeUpstream) -> TestGateway {
    let backup_url = backup.base_url();
    TestGateway::start_with(move |c: &mut Config| {
        let mut extra = c.upstream.clone();
        extra.name = "backup".to_owned();
        extra.base_url = backup_url;
        extra.protocol = tollgate_gateway::config::UpstreamProtocol::Http2;
        c.upstreams = vec![extra];
        c.routes = vec![route("h2", vec![vec![target("backup", "gpt-4.1", 1)]])];
    })
    .await
}

#[tokio::test]
async fn an_upstream_can_be_spoken_to_in_http2_over_plain_http() {
    let backup = FakeUpstream::start().await.unwrap();
    let gw = gateway_with_http2_backup(&backup).await;
    for body in [json!({"model": "h2", "messages": []}), json!({"model": "h2", "stream": true, "messages": []})] {
        let r = chat(&gw, &body).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert!(backup.requests().iter().all(|r| r.version == http::Version::HTTP_2), "prior-knowledge HTTP/2");
    chat(&gw, &json!({"model": "gpt-4.1", "messages": []})).await;
    assert_eq!(gw.fake.requests()[0].version, http::Version::HTTP_11, "the default upstream stays on HTTP/1.1");
    // Each upstream's connections are counted under its name, whichever
    // client carries them: both requests to `backup` shared one.
    assert_eq!(gw.metric(r#"tollgate_upstream_connections_opened_total{upstream="backup"}"#).await, 1.0);
    assert_eq!(backup.connections(), 1);
    assert_eq!(gw.metric(r#"tollgate_upstream_connections_opened_total{upstream="default"}"#).await, 1.0);
}

#[tokio::test]
async fn over_http2_requests_past_one_connections_stream_limit_go_over_further_connections() {
    // The fake upstream allows 200 concurrent streams per HTTP/2 connection
    // (hyper's default); 250 held streams on one connection would leave 50
    // waiting for a stream to end.
    const STREAMS: usize = 250;
    let backup = FakeUpstream::start().await.unwrap();
    backup.set_defaults(Scenario { fault: Some(Fault::StallMidStream { after_chunks: 1 }), ..Scenario::default() });
    let gw = gateway_with_http2_backup(&backup).await;
    let body = json!({"model": "h2", "stream": true, "messages": []});
    let held = futures_util::future::join_all((0..STREAMS).map(|_| async {
        let mut r = chat(&gw, &body).await;
        assert_eq!(r.status(), 200);
        let first = r.chunk().await.unwrap().expect("a first event");
        assert!(String::from_utf8_lossy(&first).contains("data: "), "an event, not the end of the body");
        r
    }));
    let held = tokio::time::timeout(PATIENCE, held).await.expect("every stream got its first event while all are open");
    assert_eq!(held.len(), STREAMS);
    assert_eq!(backup.streams_started(), STREAMS);
    assert!(backup.requests().iter().all(|r| r.version == http::Version::HTTP_2));
}

#[tokio::test]
async fn a_prompt_too_long_for_the_model_goes_to_the_larger_context_target_and_other_400s_stay_final() {
    let backup = FakeUpstream::start().await.unwrap();
    let mut routed = route(
        "long-context",
        vec![vec![target("default", "gemini-2.5-flash-lite", 1)], vec![target("backup", "gemini-2.5-pro", 1)]],
    );
    routed.retry_on.push(RetryOn::ContextLength);
    routed.attempts_per_target = 3;
    let gw = routed_gateway(&backup, vec![routed]).await;
    gw.fake.set_defaults(Scenario { fault: Some(Fault::ContextLength), ..Scenario::default() });
    let r = chat(&gw, &json!({"model": "long-context", "messages": []})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-model"], "gemini-2.5-pro");
    assert_eq!(r.headers()["x-tollgate-attempts"], "2", "not retried on the same small-context target");
    assert_eq!(gw.fake.requests().len(), 1);

    // Any other 400 is the client's: relayed whole, with no fallback.
    gw.fake.set_defaults(always_failing(400));
    let r = chat(&gw, &json!({"model": "long-context", "messages": []})).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-tollgate-attempts"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        tollgate_fake_upstream::responses::error_body(400, ErrorStyle::OpenAi),
        "the body read to decide is relayed"
    );
    assert_eq!(backup.requests().len(), 1);
}

#[tokio::test]
async fn a_stream_falls_back_if_it_breaks_before_its_first_event_and_never_after() {
    let backup = FakeUpstream::start().await.unwrap();
    let routes =
        vec![route("chat-default", vec![vec![target("default", "gpt-4.1", 1)], vec![target("backup", "gpt-4.1", 1)]])];
    let gw = routed_gateway(&backup, routes).await;
    let stream = json!({"model": "chat-default", "stream": true, "messages": []});
    gw.fake.set_defaults(Scenario { fault: Some(Fault::DropMidStream { after_chunks: 0 }), ..Scenario::default() });
    let r = chat(&gw, &stream).await;
    assert_eq!(r.headers()["x-tollgate-upstream"], "backup", "nothing had reached the client: fallback");
    assert!(r.text().await.unwrap().ends_with("data: [DONE]\n\n"));

    gw.fake.set_defaults(Scenario { fault: Some(Fault::DropMidStream { after_chunks: 2 }), ..Scenario::default() });
    let r = chat(&gw, &stream).await;
    assert_eq!(r.headers()["x-tollgate-upstream"], "default", "the first event was relayed: no fallback");
    let text = r.text().await.unwrap();
    assert!(text.contains("upstream_disconnected") && !text.contains("[DONE]"), "it ends with the error event: {text}");
    assert_eq!(backup.streams_started(), 1, "only the first request fell back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_at_its_in_flight_cap_sends_requests_to_the_next_target_and_streams_hold_their_slot() {
    let backup = FakeUpstream::start().await.unwrap();
    let backup_url = backup.base_url();
    let gw = TestGateway::start_with(move |c: &mut Config| {
        c.upstream.max_in_flight = Some(1);
        let mut extra = c.upstream.clone();
        extra.name = "backup".to_owned();
        extra.base_url = backup_url;
        extra.max_in_flight = None;
        c.upstreams = vec![extra];
        c.routes =
            vec![route("capped", vec![vec![target("default", "gpt-4.1", 1)], vec![target("backup", "gpt-4.1", 1)]])];
    })
    .await;
    // A slow stream holds the default upstream's only slot...
    let held = gw
        .http
        .post(gw.url("/v1/chat/completions"))
        .header("x-fake-chunks", "5")
        .header("x-fake-chunk-interval-ms", "200")
        .json(&json!({"model": "gpt-4.1", "stream": true, "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), 200);
    // ...so a direct request is refused without being sent, and a routed
    // one goes to the next target.
    let direct = chat(&gw, &json!({"model": "gpt-4.1", "messages": []})).await;
    assert_eq!(direct.status(), 503);
    assert_eq!(crate::helpers::envelope(direct).await["error"]["code"], "upstream_busy");
    let routed = chat(&gw, &json!({"model": "capped", "messages": []})).await;
    assert_eq!(routed.headers()["x-tollgate-upstream"], "backup");
    // Once the stream is relayed to its end, the slot is free again.
    held.text().await.unwrap();
    let again = gw.http.post(gw.url("/v1/chat/completions")).json(&json!({"model": "gpt-4.1", "messages": []})).send();
    assert_eq!(again.await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_retry_on_a_capped_upstream_is_not_blocked_by_its_own_failed_attempt() {
    let backup = FakeUpstream::start().await.unwrap();
    let mut routed =
        route("capped-retry", vec![vec![target("default", "gpt-4.1", 1)], vec![target("backup", "gpt-4.1", 1)]]);
    routed.attempts_per_target = 2;
    let backup_url = backup.base_url();
    let gw = TestGateway::start_with(move |c: &mut Config| {
        c.upstream.max_in_flight = Some(1);
        let mut extra = c.upstream.clone();
        extra.name = "backup".to_owned();
        extra.base_url = backup_url;
        c.upstreams = vec![extra];
        c.routes = vec![routed];
    })
    .await;
    gw.fake.set_defaults(always_failing(503));
    let r = chat(&gw, &json!({"model": "capped-retry", "messages": []})).await;
    assert_eq!(r.headers()["x-tollgate-attempts"], "3");
    assert_eq!(gw.fake.requests().len(), 2, "the retry reached the capped upstream");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_route_that_fails_everywhere_relays_the_last_answer_naming_the_model_asked() {
    let backup = FakeUpstream::start().await.unwrap();
    let keep_model = |upstream: &str| TargetConfig { model: None, ..target(upstream, "unused", 1) };
    let gw =
        routed_gateway(&backup, vec![route("gpt-4.1", vec![vec![keep_model("default")], vec![keep_model("backup")]])])
            .await;
    gw.fake.set_defaults(always_failing(503));
    backup.set_defaults(always_failing(503));
    let r = chat(&gw, &json!({"model": "gpt-4.1", "messages": []})).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["x-tollgate-model"], "gpt-4.1", "the client's model, which both targets kept");
    assert_eq!(r.headers()["x-tollgate-upstream"], "backup");
    assert_eq!(backup.requests()[0].json()["model"], "gpt-4.1");
}
