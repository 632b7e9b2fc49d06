//! The deployment kit in `deploy/`, against the real binary: a real
//! Prometheus scrapes it under traffic, loads the alert rules and evaluates
//! every query of the rules and dashboards; promtool checks the rules; the
//! dashboards name only exported metrics; the Kubernetes manifests, compose
//! file and systemd unit are validated.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tollgate_fake_upstream::FakeUpstream;

use super::{BIN, Served, http_client};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn full_suite() -> bool {
    std::env::var_os("CI").is_some() || std::env::var_os("TOLLGATE_FULL_SUITE").is_some()
}

/// A program from PATH. Missing, the test fails in the full suite
/// (`scripts/test`, CI: `scripts/ensure-services` installs it) and is
/// skipped otherwise.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|dir| dir.join(name)).find(|p| p.is_file()));
    if found.is_none() {
        assert!(!full_suite(), "{name} is missing: scripts/ensure-services installs it");
        eprintln!("SKIPPED: {name} is not installed (scripts/ensure-services installs it)");
    }
    found
}

fn run(program: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(program).args(args).current_dir(root()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = root().join("deploy/grafana/dashboards");
    let mut boards: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let board = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            (path.file_name().unwrap().to_string_lossy().into_owned(), board)
        })
        .collect();
    boards.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(boards.len(), 3, "overview, tenants and cost, upstream and internals");
    boards
}

/// Every panel query of a dashboard, with its panel title.
fn panel_queries(board: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut panels: Vec<&Value> = board["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        if let Some(nested) = panel["panels"].as_array() {
            panels.extend(nested);
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("every target has a PromQL expression");
            out.push((panel["title"].as_str().unwrap_or_default().to_owned(), expr.to_owned()));
        }
    }
    out
}

/// Grafana's variables replaced the way Grafana would for "All tenants".
fn as_promql(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m").replace("$__range", "5m").replace("$tenant", ".*")
}

/// `tollgate_…` names in a text, histogram series folded into their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tollgate_") {
        let start = i + at;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if boundary {
            let name = &text[start..end];
            let family = ["_bucket", "_count", "_sum"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            names.insert(family.to_owned());
        }
        i = end;
    }
    names
}

/// Keys of the tenants the traffic comes from.
struct Tenants {
    /// Priced and unpriced models; a soft budget it runs past 100 %.
    acme: String,
    /// One request a minute.
    throttled: String,
    /// A hard budget below one request's worst case.
    broke: String,
}

fn create_tenants(served: &Served) -> Tenants {
    let acme = served.acme_key();
    let (ok, _, err) =
        served.cli(&["budgets", "create", "acme", "--period", "daily", "--amount-usd", "0.000001", "--soft"]);
    assert!(ok, "{err}");
    for (tenant, policy) in [("throttled", r#"{"limits":{"rpm":1}}"#), ("broke", "{}")] {
        let (ok, _, err) = served.cli(&["tenants", "create", tenant, "--name", tenant, "--policy", policy]);
        assert!(ok, "{err}");
    }
    let (ok, _, err) = served.cli(&["budgets", "create", "broke", "--period", "monthly", "--amount-usd", "0.000001"]);
    assert!(ok, "{err}");
    let key = |tenant: &str| {
        let (ok, key, err) = served.cli(&["keys", "create", tenant, "--name", "k"]);
        assert!(ok, "{err}");
        key
    };
    Tenants { acme, throttled: key("throttled"), broke: key("broke") }
}

/// Sends the kinds of traffic every dashboard panel describes: priced and
/// unpriced models, streams, upstream and client failures, refused keys,
/// rate-limit and budget rejections, spend past a budget.
async fn drive_traffic(served: &Served, tenants: &Tenants) {
    let Tenants { acme: key, throttled, broke } = tenants;
    let http = http_client();
    let post = |key: &str, body: &'static str, headers: &[(&'static str, &'static str)]| {
        let mut request = http
            .post(format!("{}/v1/chat/completions", served.public))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            response.bytes().await.unwrap();
            status
        }
    };
    let chat = r#"{"model":"gpt-4.1","messages":[{"role":"user","content":"hello"}]}"#;
    let stream = r#"{"model":"gemini-2.5-flash","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(post(key, chat, &[]).await, 200);
    assert_eq!(post(key, stream, &[("x-fake-chunks", "4")]).await, 200);
    assert_eq!(post(key, r#"{"model":"not-in-the-price-list","messages":[]}"#, &[]).await, 200);
    assert_eq!(post(key, chat, &[("x-fake-fault", "status:503")]).await, 503);
    assert_eq!(post(key, chat, &[("x-fake-fault", "status:400")]).await, 400);
    assert_eq!(post("tg-aaaaaaaaaaaa-bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb", chat, &[]).await, 401);
    let throttled_statuses = [post(throttled, chat, &[]).await, post(throttled, chat, &[]).await];
    assert!(throttled_statuses.contains(&429), "one request a minute: {throttled_statuses:?}");
    assert_eq!(post(broke, chat, &[]).await, 429, "a hard budget below one request's worst case");
    let models = http.get(format!("{}/v1/models", served.public)).bearer_auth(key).send().await.unwrap();
    assert_eq!(models.status(), 200);
}

async fn scrape(served: &Served) -> String {
    http_client().get(format!("{}/metrics", served.admin)).send().await.unwrap().text().await.unwrap()
}

fn serve_with_fast_budget_checks(upstream: &str) -> Served {
    Served::start(upstream, &[("TOLLGATE_ALERTS__CHECK_INTERVAL", "200ms")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_rules_name_only_metrics_the_gateway_exports_and_show_every_one() {
    let fake = FakeUpstream::start().await.unwrap();
    let served = serve_with_fast_budget_checks(&fake.base_url());
    let tenants = create_tenants(&served);
    drive_traffic(&served, &tenants).await;
    let exported: BTreeSet<String> =
        tollgate_gateway::metrics::Metrics::new().unwrap().family_names().iter().cloned().collect();
    assert!(exported.len() >= 20, "{exported:?}");
    // After that traffic every family has series on the real /metrics, except
    // the forecast, which waits for an hour of the budget's day. Budget
    // gauges come from the next budget check after the ledger write.
    let shown = |text: &str| {
        exported
            .iter()
            .filter(|n| !n.ends_with("budget_forecast_percent"))
            .all(|name| text.contains(&format!("# TYPE {name} ")))
    };
    // Polled for a while; what is still missing then is named below.
    let started = Instant::now();
    let mut text = scrape(&served).await;
    while !shown(&text) && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = scrape(&served).await;
    }
    for name in exported.iter().filter(|n| !n.ends_with("budget_forecast_percent")) {
        assert!(text.contains(&format!("# TYPE {name} ")), "{name} is not on /metrics:\n{text}");
    }

    let mut named = BTreeSet::new();
    for (file, board) in dashboards() {
        let used = metric_names(&board.to_string());
        for name in &used {
            assert!(exported.contains(name), "{file} names {name}, which the gateway does not export");
        }
        named.extend(used);
    }
    for file in ["deploy/prometheus/rules/tollgate-alerts.yml", "deploy/kubernetes/prometheusrule.yaml"] {
        let used = metric_names(&std::fs::read_to_string(root().join(file)).unwrap());
        assert!(!used.is_empty(), "{file}");
        for name in &used {
            assert!(exported.contains(name), "{file} names {name}, which the gateway does not export");
        }
    }
    let unshown: Vec<&String> = exported.difference(&named).collect();
    assert!(unshown.is_empty(), "exported but on no dashboard: {unshown:?}");
    served.stop();
}

/// Prometheus on a free port, killed when dropped.
struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    async fn start(binary: &Path, target: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rules = root().join("deploy/prometheus/rules").canonicalize().unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}/*.yml\n\
             scrape_configs:\n  - job_name: tollgate\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules.display()
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(binary)
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let prometheus = Self { child, url: format!("http://127.0.0.1:{port}"), http: http_client(), _dir: dir };
        let started = Instant::now();
        loop {
            let ready = prometheus.http.get(format!("{}/-/ready", prometheus.url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return prometheus;
            }
            let log = std::fs::read_to_string(prometheus._dir.path().join("prometheus.log")).unwrap_or_default();
            assert!(started.elapsed() < Duration::from_secs(30), "Prometheus did not start:\n{log}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let url = reqwest::Url::parse_with_params(&format!("{}/api/v1/{path}", self.url), query).unwrap();
        let response = self.http.get(url).send().await.unwrap();
        response.json().await.unwrap()
    }

    /// The result of an instant query; panics with Prometheus's error.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let answer = self.api("query", &[("query", expr)]).await;
        if answer["status"] != "success" {
            return Err(format!("{}: {}", answer["errorType"], answer["error"]));
        }
        Ok(answer["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until Prometheus has scraped the gateway since `after`, so that
    /// traffic sent before it is in its data.
    async fn wait_for_scrape_after(&self, after: std::time::SystemTime) {
        let after = after.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let started = Instant::now();
        loop {
            // The timestamp of `up` is the start of the latest scrape.
            let latest = self.query(r#"timestamp(up{job="tollgate"})"#).await.unwrap_or_default();
            let at = latest.first().and_then(|r| r["value"][1].as_str()?.parse::<f64>().ok());
            if at.is_some_and(|at| at > after) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "Prometheus did not scrape the gateway again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_for(&self, what: &str, expr: &str) {
        let started = Instant::now();
        while self.query(expr).await.unwrap_or_default().is_empty() {
            assert!(started.elapsed() < Duration::from_secs(60), "Prometheus never saw {what} ({expr})");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_gateway_and_every_rule_and_dashboard_query_evaluates() {
    let (Some(prometheus_bin), Some(promtool)) = (tool("prometheus"), tool("promtool")) else { return };
    let (ok, out) = run(&promtool, &["check", "rules", "deploy/prometheus/rules/tollgate-alerts.yml"]);
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = run(&promtool, &["check", "config", "--syntax-only", "deploy/prometheus/prometheus.yml"]);
    assert!(ok, "promtool check config:\n{out}");
    let alert_count = std::fs::read_to_string(root().join("deploy/prometheus/rules/tollgate-alerts.yml"))
        .unwrap()
        .matches("- alert:")
        .count();

    let fake = FakeUpstream::start().await.unwrap();
    let served = serve_with_fast_budget_checks(&fake.base_url());
    let target = served.admin.trim_start_matches("http://").to_owned();
    let prometheus = Prometheus::start(&prometheus_bin, &target).await;

    // Traffic across several scrapes (once scraping has begun), so that
    // rates and quantiles have data.
    let tenants = create_tenants(&served);
    prometheus.wait_for("the gateway being up", r#"up{job="tollgate"} == 1"#).await;
    for _ in 0..3 {
        drive_traffic(&served, &tenants).await;
        prometheus.wait_for_scrape_after(std::time::SystemTime::now()).await;
    }
    prometheus.wait_for("request rates", "sum(rate(tollgate_requests_total[1m])) > 0").await;
    prometheus.wait_for("overhead quantiles", "rate(tollgate_gateway_overhead_seconds_count[1m]) > 0").await;

    let mut failures = Vec::new();
    let mut evaluated = 0;
    for (file, board) in dashboards() {
        for (title, expr) in panel_queries(&board) {
            let promql = as_promql(&expr);
            evaluated += 1;
            match prometheus.query(&promql).await {
                Err(e) => failures.push(format!("{file} / {title}: {promql}: {e}")),
                // A forecast needs an hour of the day (a day of a month) behind
                // it; everything else describes the traffic just sent.
                Ok(result) if result.is_empty() && !promql.contains("budget_forecast_percent") => {
                    failures.push(format!("{file} / {title}: {promql}: no data"));
                }
                Ok(_) => {}
            }
        }
    }
    let tenants = prometheus.api("label/tenant/values", &[("match[]", "tollgate_requests_total")]).await;
    assert!(tenants["data"].as_array().unwrap().contains(&Value::from("acme")), "tenant variable: {tenants}");

    // The rules as Prometheus loaded them: all evaluated, all healthy.
    let started = Instant::now();
    let rules = loop {
        let answer = prometheus.api("rules", &[]).await;
        let rules: Vec<Value> = answer["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .collect();
        let evaluated = rules.iter().all(|r| !r["lastEvaluation"].as_str().unwrap_or("0001").starts_with("0001"));
        if rules.len() == alert_count && evaluated {
            break rules;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "rules not loaded and evaluated: {answer}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    for rule in &rules {
        let name = rule["name"].as_str().unwrap();
        assert!(!rule["annotations"]["summary"].as_str().unwrap_or_default().is_empty(), "{name} has a summary");
        if rule["health"] != "ok" {
            failures.push(format!("rule {name}: health {} {}", rule["health"], rule["lastError"]));
        }
        evaluated += 1;
        if let Err(e) = prometheus.query(rule["query"].as_str().unwrap()).await {
            failures.push(format!("rule {name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{} of {evaluated} queries failed:\n{}", failures.len(), failures.join("\n"));

    // The soft budget driven past 100 % pages; a quiet gateway pages for nothing else.
    let started = Instant::now();
    let firing = loop {
        let alerts = prometheus.api("alerts", &[]).await;
        let firing: BTreeSet<String> = alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| format!("{}:{}", a["labels"]["alertname"].as_str().unwrap(), a["labels"]["tenant"]))
            .collect();
        if firing.len() >= 2 || started.elapsed() > Duration::from_secs(30) {
            break firing;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let expected: BTreeSet<String> =
        ["TollgateBudgetAt80Percent:\"acme\"", "TollgateBudgetExhausted:\"acme\""].map(str::to_owned).into();
    assert_eq!(firing, expected, "alerts firing");
    println!("{evaluated} PromQL expressions evaluated against Prometheus; firing: {firing:?}");
    served.stop();
}

#[test]
fn the_kubernetes_manifests_compose_file_and_systemd_unit_are_valid() {
    let python =
        std::env::var_os("TOLLGATE_SDK_PYTHON").map(PathBuf::from).unwrap_or_else(|| root().join(".venv/bin/python"));
    if !python.exists() {
        assert!(!full_suite(), "{} is missing: scripts/test installs the Python test environment", python.display());
        eprintln!("SKIPPED: the manifest checks ({} is missing; scripts/test installs it)", python.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let extracted = dir.path().join("tollgate.toml");
    let (ok, out) = run(&python, &["tests/deploy/check_kit.py", extracted.to_str().unwrap()]);
    assert!(ok, "{out}");

    // The ConfigMap's configuration and the example file pass the binary's own check.
    for config in [extracted, root().join("config/tollgate.example.toml")] {
        let out = super::tollgate()
            .args(["check-config", "--config"])
            .arg(&config)
            .env("TOLLGATE_DATABASE_URL", "postgres://tollgate@db.internal/tollgate")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {}", config.display(), String::from_utf8_lossy(&out.stderr));
    }

    // systemd's own verifier, with the unit pointing at this build.
    let Some(analyze) = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("systemd-analyze")).find(|p| p.is_file()))
    else {
        eprintln!("SKIPPED: systemd-analyze is not installed; the unit was not verified");
        return;
    };
    let unit = std::fs::read_to_string(root().join("deploy/systemd/tollgate.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/tollgate serve"));
    let local = dir.path().join("tollgate.service");
    std::fs::write(&local, unit.replace("/usr/local/bin/tollgate", BIN)).unwrap();
    let (ok, out) = run(&analyze, &["verify", local.to_str().unwrap()]);
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify:\n{out}");
}
