//! The admin console's sessions through the real admin listener: signing
//! in and out, the cookie's flags, CSRF and origin checks on changes,
//! expiry on the gateway's clock, revocation of the token signed in with;
//! and the admin API additions the console reads (tenant search, hourly
//! usage, budget forecasts). The pages themselves are driven in a real
//! browser by `console_browser`.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, TestGateway};

/// A browser-like client: no credentials but the cookie it is given.
struct Console<'a> {
    gw: &'a TestGateway,
    http: reqwest::Client,
    cookie: String,
    csrf: String,
}

async fn sign_in(gw: &TestGateway, token: &str) -> reqwest::Response {
    gw.anonymous.post(gw.admin_url("/console/api/session")).json(&json!({"token": token})).send().await.unwrap()
}

impl<'a> Console<'a> {
    async fn open(gw: &'a TestGateway, token: &str) -> Self {
        let response = sign_in(gw, token).await;
        assert_eq!(response.status(), 201);
        let set_cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
        let cookie = set_cookie.split(';').next().unwrap().to_owned();
        let body: Value = response.json().await.unwrap();
        Self { gw, http: gw.anonymous.clone(), cookie, csrf: body["csrf_token"].as_str().unwrap().to_owned() }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, self.gw.admin_url(path)).header("cookie", &self.cookie)
    }

    /// A change as the console makes it: cookie and CSRF token.
    async fn change(&self, method: Method, path: &str, body: Value) -> (u16, Value) {
        let response = self.request(method, path).header("x-csrf-token", &self.csrf).json(&body).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.request(Method::GET, path).send().await.unwrap();
        (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_policy_and_nothing_of_the_api_is_open_without_a_session() {
    let gw = TestGateway::start().await;
    let root = gw.anonymous.get(gw.admin_url("/")).send().await.unwrap();
    assert_eq!(root.url().path(), "/console/", "the admin listener's root leads to the console");
    assert_eq!(root.status(), 200);
    let csp = root.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert_eq!(root.headers()["x-frame-options"], "DENY");
    let page = root.text().await.unwrap();
    assert!(page.contains("/console/assets/app.js"), "{page}");
    for asset in [
        "app.js",
        "api.js",
        "dom.js",
        "charts.js",
        "tenants.js",
        "tenant.js",
        "usage.js",
        "activity.js",
        "tokens.js",
        "style.css",
    ] {
        let response = gw.anonymous.get(gw.admin_url(&format!("/console/assets/{asset}"))).send().await.unwrap();
        assert_eq!(response.status(), 200, "{asset}");
        assert!(!response.text().await.unwrap().is_empty(), "{asset}");
    }
    let missing = gw.anonymous.get(gw.admin_url("/console/assets/..%2Fmod.rs")).send().await.unwrap();
    assert_eq!(missing.status(), 404);

    // Every admin call, read or change, needs a token or a session.
    for (method, path) in [
        (Method::GET, "/admin/v1/tenants"),
        (Method::GET, "/admin/v1/usage/summary"),
        (Method::GET, "/admin/v1/audit"),
        (Method::POST, "/admin/v1/tenants"),
        (Method::GET, "/console/api/session"),
    ] {
        let response = gw.anonymous.request(method.clone(), gw.admin_url(path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "{method} {path}");
    }
    // A made-up session cookie opens nothing.
    let forged = gw
        .anonymous
        .get(gw.admin_url("/admin/v1/tenants"))
        .header("cookie", format!("tollgate_console={}", "ab".repeat(32)))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
}

#[tokio::test]
async fn sign_in_sets_a_strict_http_only_cookie_and_a_wrong_token_is_refused() {
    let gw = TestGateway::start().await;
    let wrong = sign_in(&gw, "not-the-token").await;
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());

    let response = sign_in(&gw, ADMIN_TOKEN).await;
    assert_eq!(response.status(), 201);
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain http on the admin listener: {cookie}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["actor"], "bootstrap");
    assert!(!body.to_string().contains(cookie.split(';').next().unwrap().split('=').nth(1).unwrap()));

    // Behind a proxy that terminates https, the cookie is Secure.
    let proxied = gw
        .anonymous
        .post(gw.admin_url("/console/api/session"))
        .header("x-forwarded-proto", "https")
        .json(&json!({"token": ADMIN_TOKEN}))
        .send()
        .await
        .unwrap();
    assert!(proxied.headers()["set-cookie"].to_str().unwrap().contains("; Secure"));

    // Another site cannot sign a browser in.
    let cross_site = gw
        .anonymous
        .post(gw.admin_url("/console/api/session"))
        .header("origin", "https://evil.example")
        .json(&json!({"token": ADMIN_TOKEN}))
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 403);

    // Sign-ins are audited, without the secret.
    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit", None).await;
    let entry = audit["data"].as_array().unwrap().iter().find(|e| e["action"] == "console.sign_in").unwrap();
    assert_eq!(entry["actor"], "bootstrap");
}

#[tokio::test]
async fn changes_need_the_csrf_token_and_the_consoles_origin() {
    let gw = TestGateway::start().await;
    let console = Console::open(&gw, ADMIN_TOKEN).await;
    let (status, tenants) = console.get("/admin/v1/tenants").await;
    assert_eq!(status, 200, "{tenants}");

    let tenant = json!({"id": "console-made", "display_name": "Made in the console"});
    let without = console.request(Method::POST, "/admin/v1/tenants").json(&tenant).send().await.unwrap();
    assert_eq!(without.status(), 403);
    assert_eq!(without.json::<Value>().await.unwrap()["error"]["code"], "csrf_failed");
    let wrong = console
        .request(Method::POST, "/admin/v1/tenants")
        .header("x-csrf-token", "0".repeat(64))
        .json(&tenant)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 403);
    let other_origin = console
        .request(Method::POST, "/admin/v1/tenants")
        .header("x-csrf-token", &console.csrf)
        .header("origin", "http://attacker.example")
        .json(&tenant)
        .send()
        .await
        .unwrap();
    assert_eq!(other_origin.status(), 403);
    let (status, _) = gw.admin(Method::GET, "/admin/v1/tenants/console-made", None).await;
    assert_eq!(status, 404, "no refused change took effect");

    let same_origin = console
        .request(Method::POST, "/admin/v1/tenants")
        .header("x-csrf-token", &console.csrf)
        .header("origin", format!("http://{}", gw.admin_addr))
        .json(&tenant)
        .send()
        .await
        .unwrap();
    assert_eq!(same_origin.status(), 201);

    // The API's own validation applies, with its error shape.
    let (status, invalid) =
        console.change(Method::POST, "/admin/v1/tenants", json!({"id": "Bad Id", "display_name": "x"})).await;
    assert_eq!(status, 400, "{invalid}");
    assert_eq!(invalid["error"]["param"], "id");

    // And its audit, naming who signed in.
    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit", None).await;
    let created = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "tenant.create" && e["target_id"] == "console-made")
        .unwrap();
    assert_eq!(created["actor"], "bootstrap");
}

#[tokio::test]
async fn sign_out_ends_the_session_and_sessions_expire_on_the_gateways_clock() {
    let gw = TestGateway::start().await;
    let first = Console::open(&gw, ADMIN_TOKEN).await;
    let second = Console::open(&gw, ADMIN_TOKEN).await;

    // Sign-out is a change: it needs the CSRF token too.
    let unprotected = first.request(Method::DELETE, "/console/api/session").send().await.unwrap();
    assert_eq!(unprotected.status(), 403);
    let out =
        first.request(Method::DELETE, "/console/api/session").header("x-csrf-token", &first.csrf).send().await.unwrap();
    assert_eq!(out.status(), 204);
    assert!(out.headers()["set-cookie"].to_str().unwrap().contains("Max-Age=0"));
    let (status, body) = first.get("/admin/v1/tenants").await;
    assert_eq!(status, 401, "an ended session opens nothing: {body}");
    assert_eq!(body["error"]["code"], "session_expired");
    let (status, _) = second.get("/admin/v1/tenants").await;
    assert_eq!(status, 200, "other sessions go on");

    gw.clock.advance(Duration::from_secs(12 * 3600 - 60));
    assert_eq!(second.get("/console/api/session").await.0, 200);
    gw.clock.advance(Duration::from_secs(61));
    let (status, body) = second.get("/admin/v1/tenants").await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("expired"), "{body}");
}

#[tokio::test]
async fn revoking_the_admin_token_ends_the_sessions_opened_with_it() {
    let gw = TestGateway::start().await;
    let (status, issued) = gw.admin(Method::POST, "/admin/v1/admin-tokens", Some(json!({"name": "ops laptop"}))).await;
    assert_eq!(status, 201);
    let token = issued["secret"].as_str().unwrap();
    let console = Console::open(&gw, token).await;
    let (status, session) = console.get("/console/api/session").await;
    assert_eq!(status, 200);
    let actor = format!("admin_token:{}", issued["token"]["id"].as_str().unwrap());
    assert_eq!(session["actor"], actor.as_str());
    let (status, _) =
        console.change(Method::POST, "/admin/v1/tenants", json!({"id": "by-token", "display_name": "t"})).await;
    assert_eq!(status, 201);
    let (_, audit) = gw.admin(Method::GET, "/admin/v1/audit", None).await;
    assert!(
        audit["data"].as_array().unwrap().iter().any(|e| e["target_id"] == "by-token" && e["actor"] == actor.as_str())
    );

    let revoke = format!("/admin/v1/admin-tokens/{}/revoke", issued["token"]["id"].as_str().unwrap());
    assert_eq!(gw.admin(Method::POST, &revoke, None).await.0, 200);
    let (status, body) = console.get("/admin/v1/tenants").await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("revoked"), "{body}");
}

#[tokio::test]
async fn failed_sign_ins_count_towards_the_address_throttle() {
    let gw = TestGateway::start_with(|c| c.auth.failed_attempts_per_minute = 3).await;
    for _ in 0..3 {
        assert_eq!(sign_in(&gw, "guess").await.status(), 401);
    }
    let throttled = sign_in(&gw, ADMIN_TOKEN).await;
    assert_eq!(throttled.status(), 429, "even the right token waits for the minute to end");
    gw.clock.to_next_minute();
    assert_eq!(sign_in(&gw, ADMIN_TOKEN).await.status(), 201);
}

#[tokio::test]
async fn a_disabled_console_serves_nothing() {
    let gw = TestGateway::start_with(|c| c.admin.console.enabled = false).await;
    for path in ["/console/", "/console/assets/app.js"] {
        assert_eq!(gw.anonymous.get(gw.admin_url(path)).send().await.unwrap().status(), 404, "{path}");
    }
    assert_eq!(sign_in(&gw, ADMIN_TOKEN).await.status(), 404);
}

#[tokio::test]
async fn tenants_can_be_searched_by_id_or_name_and_filtered_by_status() {
    let gw = TestGateway::start().await;
    for (id, name) in [("search-team", "Search"), ("ads", "Ads 100%_off"), ("billing", "Billing team")] {
        let (status, _) =
            gw.admin(Method::POST, "/admin/v1/tenants", Some(json!({"id": id, "display_name": name}))).await;
        assert_eq!(status, 201);
    }
    assert_eq!(gw.admin(Method::POST, "/admin/v1/tenants/billing/suspend", None).await.0, 200);
    let ids = |body: &Value| -> Vec<String> {
        body["data"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_owned()).collect()
    };
    let (_, found) = gw.admin(Method::GET, "/admin/v1/tenants?q=TEAM", None).await;
    assert_eq!(ids(&found), ["billing", "search-team"], "id or name, any case");
    let (_, found) = gw.admin(Method::GET, "/admin/v1/tenants?q=100%25_", None).await;
    assert_eq!(ids(&found), ["ads"], "% and _ are matched literally");
    let (_, found) = gw.admin(Method::GET, "/admin/v1/tenants?q=%25", None).await;
    assert_eq!(ids(&found), ["ads"]);
    let (_, found) = gw.admin(Method::GET, "/admin/v1/tenants?status=suspended", None).await;
    assert_eq!(ids(&found), ["billing"]);
    let (_, found) = gw.admin(Method::GET, "/admin/v1/tenants?q=team&status=active&limit=1", None).await;
    assert_eq!(ids(&found), ["search-team"]);
    let (status, body) = gw.admin(Method::GET, "/admin/v1/tenants?status=deleted", None).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = gw.admin(Method::GET, &format!("/admin/v1/tenants?q={}", "x".repeat(201)), None).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("q")));
}

#[tokio::test]
async fn budgets_show_the_periods_forecast_at_the_rate_so_far() {
    let gw = TestGateway::start().await;
    // Noon UTC: half the day gone, so a daily budget's forecast is about
    // twice its spend.
    let noon = gw.clock.now().date_naive().and_hms_opt(12, 0, 0).unwrap().and_utc();
    gw.clock.set(noon);
    let (status, created) = gw
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "daily", "amount_usd": "5"})))
        .await;
    assert_eq!(status, 201, "{created}");
    let (status, lifetime) = gw
        .admin(Method::POST, "/admin/v1/tenants/test/budgets", Some(json!({"period": "lifetime", "amount_usd": "5"})))
        .await;
    assert_eq!(status, 201, "{lifetime}");
    assert!(lifetime["forecast_micros"].is_null(), "a lifetime budget has no period end: {lifetime}");
    let response = gw
        .post_json("/v1/chat/completions", r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hi"}]}"#)
        .await;
    assert_eq!(response.status(), 200);
    let budgets = crate::helpers::wait_for("the spend in the budget", crate::helpers::PATIENCE, async || {
        let (_, list) = gw.admin(Method::GET, "/admin/v1/tenants/test/budgets", None).await;
        let daily = list["data"].as_array()?.iter().find(|b| b["period"] == "daily")?.clone();
        (daily["spent_micros"].as_i64()? > 0).then_some(daily)
    })
    .await;
    let spent = budgets["spent_micros"].as_i64().unwrap();
    let forecast = budgets["forecast_micros"].as_i64().unwrap();
    assert!(forecast > spent * 19 / 10 && forecast <= spent * 2, "spent {spent}, forecast {forecast}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_told_apart_from_a_signed_out_session() {
    use crate::helpers::{CuttableLink, Db, service_addr, through};
    let db = tollgate_store::testing::TestDatabase::postgres().await;
    let link = CuttableLink::start(service_addr(&db.url, 5432).await).await;
    let fake = tollgate_fake_upstream::FakeUpstream::start().await.unwrap();
    let gw = TestGateway::start_full(fake, Db::Url(through(&db.url, link.addr)), |_| {}).await;
    let console = Console::open(&gw, ADMIN_TOKEN).await;
    assert_eq!(console.get("/admin/v1/tenants").await.0, 200);

    link.cut();
    // The console must not send an admin back to sign in because the
    // database is away: the session cannot be checked, so 503, not 401.
    let (status, body) = console.get("/admin/v1/tenants").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "database_unavailable");
    let signing_in = sign_in(&gw, ADMIN_TOKEN).await;
    assert_eq!(signing_in.status(), 503, "a right token is not turned away as a wrong one");

    link.restore().await;
    let (status, body) = console.get("/admin/v1/tenants").await;
    assert_eq!(status, 200, "the same session goes on after the outage: {body}");
}

#[tokio::test]
async fn a_session_opened_on_one_replica_works_on_another_and_ends_on_both() {
    use crate::helpers::Db;
    let db = tollgate_store::testing::TestDatabase::postgres().await;
    let fake = tollgate_fake_upstream::FakeUpstream::start().await.unwrap();
    let first = TestGateway::start_full(fake, Db::Url(db.url.clone()), |_| {}).await;
    let fake = tollgate_fake_upstream::FakeUpstream::start().await.unwrap();
    let second = TestGateway::start_full(fake, Db::Url(db.url.clone()), |_| {}).await;
    let opened = Console::open(&first, ADMIN_TOKEN).await;
    // Behind a load balancer the next call may reach the other replica.
    let elsewhere =
        Console { gw: &second, http: opened.http.clone(), cookie: opened.cookie.clone(), csrf: opened.csrf.clone() };
    let (status, body) =
        elsewhere.change(Method::POST, "/admin/v1/tenants", json!({"id": "via-second", "display_name": "x"})).await;
    assert_eq!(status, 201, "{body}");
    let out = elsewhere
        .request(Method::DELETE, "/console/api/session")
        .header("x-csrf-token", &elsewhere.csrf)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 204);
    assert_eq!(opened.get("/admin/v1/tenants").await.0, 401, "signed out on one replica, out on both");
}

#[tokio::test]
async fn malformed_and_oversized_sign_ins_get_clear_errors() {
    let gw = TestGateway::start().await;
    let post = |body: Vec<u8>| {
        gw.anonymous
            .post(gw.admin_url("/console/api/session"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for body in [&b"{not json"[..], br#"{"token": 7}"#, br#"{"token": "x", "extra": 1}"#, b"[]"] {
        let response = post(body.to_vec()).await.unwrap();
        assert_eq!(response.status(), 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(response.json::<Value>().await.unwrap()["error"]["code"], "invalid_body");
    }
    let huge = format!(r#"{{"token": "{}"}}"#, "a".repeat(10_000));
    assert_eq!(post(huge.into_bytes()).await.unwrap().status(), 413);
    let (status, _) = gw.admin(Method::GET, "/admin/v1/audit", None).await;
    assert_eq!(status, 200, "no refused sign-in locked the address out of the API");
}
