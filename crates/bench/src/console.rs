//! (i) The admin console's pages on a ledger of a million records: each
//! page's requests (the same calls its script makes, sent together as the
//! browser does) timed from the first byte sent to the last byte received,
//! against a gateway whose ledger is empty, measured in turn in the same run.
//! What a page draws is the same work either way; only these calls grow
//! with the ledger.

use std::time::Instant;

use anyhow::Context;
use chrono::{Datelike, Utc};
use serde_json::json;
use tollgate_store::{Store, UsageEvent};

use crate::procs::Cpus;
use crate::scenarios::Plan;
use crate::stack::{ADMIN_TOKEN, BenchDb, Gateway, Upstream};
use crate::stats::Samples;

/// One page's load times on both ledgers, in microseconds.
#[derive(Debug)]
pub struct PageFigures {
    pub page: &'static str,
    pub requests: usize,
    pub empty: Samples,
    pub full: Samples,
}

#[derive(Debug)]
pub struct ConsoleFigures {
    pub records: usize,
    pub seed_records_per_s: f64,
    pub pages: Vec<PageFigures>,
}

const TENANTS: usize = 50;
const KEYS_PER_TENANT: usize = 10;
const MODELS: [(&str, i64); 8] = [
    ("gpt-4.1-mini", 240),
    ("gpt-4.1", 1_200),
    ("gpt-5", 1_900),
    ("gemini-2.5-flash", 610),
    ("gemini-2.5-pro", 2_300),
    ("claude-sonnet-4", 2_450),
    ("claude-haiku-4", 700),
    ("text-embedding-3-small", 2),
];

/// The console's pages as the requests each makes (`tenant` is the tenant
/// page's subject); keep in step with `crates/gateway/console/*.js`.
fn pages(today: &str, month_ago: &str, week_ago: &str, tenant: &str) -> Vec<(&'static str, Vec<String>)> {
    let summary = |from: &str, group: &str, extra: &str| {
        format!("/admin/v1/usage/summary?from={from}&to={today}&group_by={group}{extra}")
    };
    let one = format!("&tenant_id={tenant}");
    vec![
        (
            "shell (HTML, scripts, style)",
            ["/console/", "/console/assets/style.css", "/console/assets/app.js", "/console/assets/api.js"]
                .into_iter()
                .chain(["/console/assets/dom.js", "/console/assets/charts.js", "/console/assets/tenants.js"])
                .chain(["/console/assets/tenant.js", "/console/assets/usage.js", "/console/assets/activity.js"])
                .chain(["/console/assets/tokens.js"])
                .chain(["/console/api/session"])
                .map(str::to_owned)
                .collect(),
        ),
        ("tenants", vec!["/admin/v1/tenants?limit=50".to_owned()]),
        (
            "tenant (policy, keys, budgets, alerts)",
            vec![
                format!("/admin/v1/tenants/{tenant}"),
                format!("/admin/v1/tenants/{tenant}/keys?limit=200"),
                format!("/admin/v1/tenants/{tenant}/budgets"),
                format!("/admin/v1/alerts?tenant_id={tenant}&limit=50"),
            ],
        ),
        (
            "usage: 30 days by day and tenant",
            vec![summary(month_ago, "day,tenant", ""), summary(month_ago, "model", "")],
        ),
        ("usage: 30 days of one tenant by model", vec![summary(month_ago, "day,model", &one)]),
        ("usage: 7 days by hour and model", vec![summary(week_ago, "hour,model", "")]),
        ("audit log", vec!["/admin/v1/audit?limit=100".to_owned()]),
    ]
}

pub async fn page_loads(
    plan: &Plan,
    cpus: &Cpus,
    postgres: &str,
    upstream: &Upstream,
) -> anyhow::Result<ConsoleFigures> {
    let empty_db = BenchDb::create(postgres, "console_empty").await?;
    let full_db = BenchDb::create(postgres, "console_full").await?;
    let outcome = run(plan, cpus, upstream, &empty_db, &full_db).await;
    empty_db.drop_now().await;
    full_db.drop_now().await;
    outcome
}

async fn run(
    plan: &Plan,
    cpus: &Cpus,
    upstream: &Upstream,
    empty_db: &BenchDb,
    full_db: &BenchDb,
) -> anyhow::Result<ConsoleFigures> {
    let empty = Gateway::start(cpus, upstream.addr, empty_db, None).await?;
    let full = Gateway::start(cpus, upstream.addr, full_db, None).await?;
    println!("(i) seeding {} usage records", plan.console_records);
    let started = Instant::now();
    seed(&full_db.url, plan.console_records).await?;
    let seed_records_per_s = plan.console_records as f64 / started.elapsed().as_secs_f64();

    let http = reqwest::Client::builder().no_proxy().build()?;
    let cookies = [sign_in(&http, &empty).await?, sign_in(&http, &full).await?];
    let now = Utc::now().date_naive();
    let day = |d: chrono::NaiveDate| format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day());
    let (today, month_ago, week_ago) =
        (day(now), day(now - chrono::Duration::days(29)), day(now - chrono::Duration::days(6)));
    let mut figures: Vec<PageFigures> = pages(&today, &month_ago, &week_ago, "bench")
        .iter()
        .map(|(page, requests)| PageFigures {
            page,
            requests: requests.len(),
            empty: Samples::default(),
            full: Samples::default(),
        })
        .collect();
    let pages = pages(&today, &month_ago, &week_ago, "bench");
    println!("(i) console page loads, {} each", plan.console_repeats);
    // One warm-up load of every page on each gateway (the database's caches
    // hold what a console in use would have read already).
    for (gateway, cookie) in [(&empty, &cookies[0]), (&full, &cookies[1])] {
        for (_, requests) in &pages {
            load_page(&http, gateway, cookie, requests).await?;
        }
    }
    for _ in 0..plan.console_repeats {
        for (i, (_, requests)) in pages.iter().enumerate() {
            figures[i].empty.push(load_page(&http, &empty, &cookies[0], requests).await?);
            figures[i].full.push(load_page(&http, &full, &cookies[1], requests).await?);
        }
    }
    Ok(ConsoleFigures { records: plan.console_records, seed_records_per_s, pages: figures })
}

async fn sign_in(http: &reqwest::Client, gateway: &Gateway) -> anyhow::Result<String> {
    let response = http
        .post(format!("http://{}/console/api/session", gateway.admin))
        .json(&json!({"token": ADMIN_TOKEN}))
        .send()
        .await?;
    anyhow::ensure!(response.status().as_u16() == 201, "console sign-in: {}", response.status());
    let cookie = response.headers().get("set-cookie").context("no session cookie")?.to_str()?;
    Ok(cookie.split(';').next().unwrap_or_default().to_owned())
}

/// Microseconds until every request of the page has been answered in full.
async fn load_page(
    http: &reqwest::Client,
    gateway: &Gateway,
    cookie: &str,
    requests: &[String],
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let answers = futures_util::future::join_all(requests.iter().map(|path| async move {
        let response = http.get(format!("http://{}{path}", gateway.admin)).header("cookie", cookie).send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        anyhow::ensure!(status.is_success(), "{path}: {status} {}", String::from_utf8_lossy(&body));
        Ok(body.len())
    }))
    .await;
    let elapsed = started.elapsed();
    for answer in answers {
        answer?;
    }
    Ok(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX))
}

/// `records` requests over the last 30 days from 50 tenants, 500 keys and
/// eight models, written as the ledger writes them (records and rollups in
/// one statement per batch), into the daily partitions.
async fn seed(url: &str, records: usize) -> anyhow::Result<()> {
    let store = Store::connect(url, 4).await?;
    let now = Utc::now().timestamp_millis();
    let span = 30 * 86_400_000_i64;
    store.ensure_usage_partitions(now - span, 32).await?;
    let per_batch = 10_000;
    let mut written = 0;
    while written < records {
        let batch: Vec<UsageEvent> =
            (written..(written + per_batch).min(records)).map(|i| event(i, records, now, span)).collect();
        written += batch.len();
        store.insert_usage(&batch).await?;
    }
    // A ledger in use has its statistics gathered by autovacuum; right after
    // a bulk load they are missing and the planner guesses row counts.
    crate::stack::execute(&store, "ANALYZE usage_daily").await?;
    crate::stack::execute(&store, "ANALYZE usage_events").await?;
    store.close().await;
    Ok(())
}

fn event(i: usize, records: usize, now: i64, span: i64) -> UsageEvent {
    // Spread evenly over the span, oldest first; tenant `bench` (the one the
    // gateway was given) is tenant 0.
    let at = now - span + (span / records as i64) * i as i64;
    let tenant = i % TENANTS;
    let key = (i / TENANTS) % KEYS_PER_TENANT;
    let (model, price) = MODELS[(i / 7) % MODELS.len()];
    let completion = 50 + (i % 600) as i64;
    let failed = i.is_multiple_of(53);
    UsageEvent {
        id: format!("seed{i:09}"),
        at,
        request_id: format!("req-seed-{i}"),
        tenant_id: if tenant == 0 { "bench".to_owned() } else { format!("tenant-{tenant:02}") },
        key_id: format!("key-{tenant:02}-{key}"),
        endpoint: "/v1/chat/completions".to_owned(),
        requested_model: model.to_owned(),
        upstream_model: Some(model.to_owned()),
        stream: i.is_multiple_of(2),
        prompt_tokens: 400,
        completion_tokens: completion,
        reasoning_tokens: 0,
        cached_tokens: 0,
        cache_write_tokens: 0,
        total_tokens: 400 + completion,
        billed_output_tokens: completion,
        cost_micros: price * (400 + completion) / 100,
        estimated: false,
        unpriced: false,
        modified: false,
        status: if failed { 502 } else { 200 },
        error_class: failed.then(|| "upstream:server_error".to_owned()),
        latency_ms: 700,
        ttft_ms: Some(180),
        route: None,
        target: None,
        upstream: Some("default".to_owned()),
        attempts: 1,
        api: "openai".to_owned(),
    }
}
