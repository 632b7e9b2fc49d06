//! The real `tollgate` binary: configuration errors, environment overrides,
//! JSON logs, secrets kept out of logs, and SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod budget_burst;
mod deploy_kit;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tollgate_fake_upstream::FakeUpstream;

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn tollgate() -> Command {
    let mut cmd = Command::new(BIN);
    // The tests' own environment must not leak config into the child.
    cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd
}

/// The key with its last character changed: well formed, but wrong.
fn wrong_secret(key: &str) -> String {
    let last = if key.ends_with('x') { 'y' } else { 'x' };
    format!("{}{last}", &key[..key.len() - 1])
}

fn http_client() -> reqwest::Client {
    tollgate_gateway::upstream::install_crypto_provider();
    reqwest::Client::new()
}

fn check_config(file_body: Option<&str>, env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = tollgate();
    cmd.arg("check-config");
    if let Some(body) = file_body {
        let path = dir.path().join("tollgate.toml");
        std::fs::write(&path, body).unwrap();
        cmd.arg("--config").arg(path);
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_example_config_is_valid() {
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/tollgate.example.toml")).unwrap();
    let (ok, text) = check_config(Some(&example), &[]);
    assert!(ok, "{text}");
}

#[test]
fn an_unknown_key_in_the_file_is_an_error_that_names_it() {
    let (ok, text) = check_config(Some("[server]\nlisten_addr = \"127.0.0.1:1\"\n"), &[]);
    assert!(!ok);
    assert!(text.contains("listen_addr"), "{text}");
}

#[test]
fn a_bad_value_is_an_error_that_names_the_key() {
    let (ok, text) = check_config(Some("[server]\nlisten = \"nowhere\"\n"), &[]);
    assert!(!ok);
    assert!(text.contains("listen"), "{text}");
    let (ok, text) = check_config(Some("[upstream]\nbase_url = \"ftp://x\"\n"), &[]);
    assert!(!ok);
    assert!(text.contains("upstream.base_url"), "{text}");
    let (ok, text) = check_config(None, &[("TOLLGATE_UPSTREAM__IDLE_TIMEOUT", "soon")]);
    assert!(!ok);
    assert!(text.to_lowercase().contains("upstream.idle_timeout"), "{text}");
}

#[test]
fn an_unknown_environment_key_is_an_error_that_names_it() {
    let (ok, text) = check_config(None, &[("TOLLGATE_SERVER__LISTN", "127.0.0.1:1")]);
    assert!(!ok);
    assert!(text.contains("listn"), "{text}");
}

#[test]
fn the_environment_overrides_the_file() {
    let (ok, text) = check_config(
        Some("[server]\nmax_body_bytes = 10\n"),
        &[
            ("TOLLGATE_SERVER__MAX_BODY_BYTES", "12345"),
            ("TOLLGATE_LOG__FORMAT", "json"),
            ("TOLLGATE_SERVER__HEADER_READ_TIMEOUT", "25s"),
            ("TOLLGATE_SERVER__MAX_CONNECTIONS", "777"),
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("12345"), "{text}");
    assert!(text.contains("\"header_read_timeout\": \"25s\""), "{text}");
    assert!(text.contains("\"max_connections\": 777"), "{text}");
    assert!(text.contains("\"json\""), "{text}");
}

#[test]
fn a_missing_config_file_is_an_error() {
    let out = tollgate().args(["check-config", "--config", "/nonexistent/tollgate.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tollgate.toml"));
}

/// The real binary, serving, with its output collected.
struct Served {
    /// Taken by `stop`; still here on drop (a failed test), it is killed.
    child: Option<std::process::Child>,
    lines: std::sync::mpsc::Receiver<String>,
    log: Vec<String>,
    public: String,
    admin: String,
    _dir: tempfile::TempDir,
}

const ADMIN_TOKEN: &str = "bootstrap-admin-very-secret";

impl Served {
    fn start(upstream: &str, extra_env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tollgate.db");
        let mut child = tollgate()
            .arg("serve")
            .env("TOLLGATE_SERVER__LISTEN", "127.0.0.1:0")
            .env("TOLLGATE_ADMIN__LISTEN", "127.0.0.1:0")
            .env("TOLLGATE_DATABASE__SQLITE_PATH", &db)
            .env("TOLLGATE_ACCOUNTING__SPOOL_DIR", dir.path().join("spool"))
            .env("TOLLGATE_UPSTREAM__BASE_URL", upstream)
            // Tests steer the fake upstream with x-fake-* request headers.
            .env("TOLLGATE_UPSTREAM__FORWARD_REQUEST_HEADERS", r#"["x-fake-*"]"#)
            .env("TOLLGATE_LOG__FORMAT", "json")
            .env("TOLLGATE_LOG__LEVEL", "debug")
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("TOLLGATE_HASH_SECRET", "hash-secret-very-secret")
            .env("COMETAPI_KEY", "sk-upstream-very-secret")
            .envs(extra_env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut served =
            Self { child: Some(child), lines, log: Vec::new(), public: String::new(), admin: String::new(), _dir: dir };
        while served.public.is_empty() || served.admin.is_empty() {
            let line = served.lines.recv_timeout(Duration::from_secs(30)).expect("the gateway starts and logs");
            let event: Value = serde_json::from_str(&line).expect("every log line is JSON");
            if event["fields"]["message"] == "listening" {
                let addr = format!("http://{}", event["fields"]["addr"].as_str().unwrap());
                match event["fields"]["listener"].as_str() {
                    Some("public") => served.public = addr,
                    Some("admin") => served.admin = addr,
                    other => panic!("unexpected listener {other:?}"),
                }
            }
            served.log.push(line);
        }
        served
    }

    /// The SQLite database of this gateway (when no Postgres URL is given).
    fn sqlite_url(&self) -> String {
        format!("sqlite://{}", self._dir.path().join("tollgate.db").display())
    }

    /// Runs an admin subcommand of the binary against this gateway.
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = tollgate()
            .args(args)
            .env("TOLLGATE_ADMIN_URL", &self.admin)
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Creates tenant `acme` and a key for it through the CLI; returns the key.
    fn acme_key(&self) -> String {
        let (ok, _, err) = self.cli(&["tenants", "create", "acme", "--name", "ACME"]);
        assert!(ok, "{err}");
        let (ok, key, err) = self.cli(&["keys", "create", "acme", "--name", "svc"]);
        assert!(ok, "{err}");
        assert!(key.starts_with("tg-"), "{key}");
        key
    }

    /// Sends SIGTERM, waits for a clean exit, and returns everything logged.
    fn stop(self) -> String {
        self.stop_keeping_data().0
    }

    /// Like `stop`, and hands over the data directory so the test can read it.
    fn stop_keeping_data(mut self) -> (String, tempfile::TempDir) {
        let child = self.child.take().unwrap();
        let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
        assert!(status.success());
        let exit = child.wait_with_output().unwrap();
        assert!(exit.status.success(), "clean exit on SIGTERM: {:?}", exit.status);
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.log.push(line);
        }
        (
            self.log.join("\n") + &String::from_utf8_lossy(&exit.stderr),
            std::mem::replace(&mut self._dir, tempfile::tempdir().unwrap()),
        )
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_json_with_request_ids_keeps_secrets_out_and_stops_on_sigterm() {
    let fake = FakeUpstream::start().await.unwrap();
    let served = Served::start(&fake.base_url(), &[]);

    let key = served.acme_key();

    let http = http_client();
    let response = http
        .post(format!("{}/v1/chat/completions", served.public))
        .bearer_auth(&key)
        .header("x-request-id", "cli-test-request-1")
        .body(r#"{"model":"gpt-4.1","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(fake.requests()[0].headers["authorization"], "Bearer sk-upstream-very-secret");
    let wrong = http
        .post(format!("{}/v1/chat/completions", served.public))
        .bearer_auth(wrong_secret(&key))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    // The usage reports see the request once the ledger has written it.
    let mut summary = Value::Null;
    time_until("the usage summary shows the request", Duration::from_secs(10), async || {
        let (ok, out, err) = served.cli(&["usage", "summary", "--group-by", "tenant,model", "--output", "json"]);
        assert!(ok, "{err}");
        summary = serde_json::from_str(&out).unwrap();
        summary["data"].as_array().is_some_and(|d| !d.is_empty())
    })
    .await;
    assert_eq!(summary["data"][0]["tenant_id"], "acme", "{summary}");
    assert_eq!(summary["data"][0]["model"], "gpt-4.1");
    assert_eq!(summary["data"][0]["requests"], 1);
    let (ok, table, _) = served.cli(&["usage", "summary", "--group-by", "model"]);
    assert!(ok && table.starts_with("MODEL") && table.contains("gpt-4.1"), "{table}");
    let (ok, csv, _) = served.cli(&["usage", "export", "--tenant", "acme"]);
    assert!(ok);
    assert_eq!(csv.lines().count(), 2, "{csv}");
    assert!(csv.lines().nth(1).unwrap().contains("cli-test-request-1"));

    let all = tokio::task::spawn_blocking(move || served.stop()).await.unwrap();
    let lines: Vec<Value> = all.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
    let request_lines: Vec<&Value> = lines.iter().filter(|e| e["span"]["request_id"] == "cli-test-request-1").collect();
    assert!(!request_lines.is_empty(), "request lines carry the request id: {all}");
    assert!(request_lines.iter().any(|e| e["fields"]["status"] == 200), "{all}");
    assert!(all.contains("SIGTERM received"), "{all}");
    assert!(!all.contains("very-secret"), "a secret reached the logs: {all}");
    let secret_part = key.rsplit('-').next().unwrap();
    assert!(!all.contains(secret_part), "a tenant key reached the logs: {all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_tenants_and_keys_with_table_and_json_output() {
    let fake = FakeUpstream::start().await.unwrap();
    let served = Served::start(&fake.base_url(), &[]);

    let (ok, out, err) = served.cli(&["tenants", "create", "acme", "--name", "ACME", "--metadata", r#"{"team":"ml"}"#]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ID") && out.contains("acme") && out.contains("active"), "{out}");
    let (ok, out, _) = served.cli(&["tenants", "get", "acme", "--output", "json"]);
    assert!(ok);
    let tenant: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(tenant["metadata"]["team"], "ml");

    let (ok, _, err) = served.cli(&["tenants", "create", "Bad Id", "--name", "x"]);
    assert!(!ok);
    assert!(err.contains("field id"), "validation errors name the field: {err}");

    let (ok, secret, err) =
        served.cli(&["keys", "create", "acme", "--name", "svc", "--models", "gemini-*,gpt-4.1", "--rpm", "60"]);
    assert!(ok, "{err}");
    let key_id = secret.split('-').nth(1).unwrap().to_owned();
    let (ok, out, _) = served.cli(&["keys", "list", "acme", "--output", "json"]);
    assert!(ok);
    let page: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(page["data"][0]["id"], key_id.as_str());
    assert_eq!(page["data"][0]["limits"]["rpm"], 60);
    assert!(!out.contains(secret.rsplit('-').next().unwrap()), "listing never shows the secret");

    let (ok, out, _) = served.cli(&["keys", "update", &key_id, "--name", "renamed", "--output", "json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["name"], "renamed");

    let (ok, new_secret, err) = served.cli(&["keys", "rotate", &key_id, "--grace-period", "1h"]);
    assert!(ok, "{err}");
    assert!(new_secret.starts_with("tg-") && new_secret != secret);
    let (ok, out, _) = served.cli(&["keys", "revoke", &key_id, "--output", "json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["status"], "revoked");

    let (ok, out, _) = served.cli(&["audit", "--output", "json"]);
    assert!(ok);
    let actions: Vec<String> = serde_json::from_str::<Value>(&out).unwrap()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions[..4], ["key.revoke", "key.rotate", "key.update", "key.create"]);

    // Policy, budgets and alerts.
    let (ok, _, err) =
        served.cli(&["tenants", "update", "acme", "--policy", r#"{"limits":{"rpm":600},"max_output_tokens":4096}"#]);
    assert!(ok, "{err}");
    let (ok, out, _) = served.cli(&["tenants", "get", "acme", "--output", "json"]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap()["policy"]["limits"]["rpm"], 600);
    let (ok, out, err) = served.cli(&[
        "budgets",
        "create",
        "acme",
        "--period",
        "monthly",
        "--amount-usd",
        "500",
        "--thresholds",
        "80,100",
        "--output",
        "json",
    ]);
    assert!(ok, "{err}");
    let budget: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((budget["amount_micros"].as_i64(), budget["hard"].as_bool()), (Some(500_000_000), Some(true)));
    let budget_id = budget["id"].as_str().unwrap().to_owned();
    let (ok, table, _) = served.cli(&["budgets", "list", "acme"]);
    assert!(ok && table.contains(&budget_id) && table.contains("500.000000"), "{table}");
    let (ok, _, err) = served.cli(&["budgets", "update", &budget_id, "--amount-usd", "750.5"]);
    assert!(ok, "{err}");
    let (ok, _, err) = served.cli(&["budgets", "create", "acme", "--period", "hourly", "--amount-usd", "1"]);
    assert!(!ok && err.contains("period"), "{err}");
    let (ok, out, _) = served.cli(&["budgets", "alerts", "--output", "json"]);
    assert!(ok && out.contains("\"data\""), "{out}");
    let (ok, _, _) = served.cli(&["budgets", "delete", &budget_id]);
    assert!(ok);

    let (ok, _, err) = served.cli(&["tenants", "get", "nope"]);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
    let out =
        tollgate().args(["tenants", "list", "--admin-url", &served.admin, "--admin-token", "wrong"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    served.stop();
}

#[test]
fn migrate_creates_the_schema_and_openapi_prints_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("fresh.db");
    let out = tollgate().arg("migrate").env("TOLLGATE_DATABASE__SQLITE_PATH", &db).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(db.exists());
    let out = tollgate().arg("openapi").output().unwrap();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
}

/// Polls `check` every 20 ms for up to `within` and returns how long it took
/// to pass: waiting on the condition, never for a fixed time.
async fn time_until(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let started = std::time::Instant::now();
    while started.elapsed() < within {
        if check().await {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_on_one_replica_reaches_another_replica_within_a_second() {
    let db = tollgate_store::testing::TestDatabase::postgres().await;
    let fake = FakeUpstream::start().await.unwrap();
    let env = [("TOLLGATE_DATABASE_URL", db.url.as_str())];
    let a = Served::start(&fake.base_url(), &env);
    let b = Served::start(&fake.base_url(), &env);

    let (ok, _, err) = a.cli(&["tenants", "create", "acme", "--name", "ACME"]);
    assert!(ok, "{err}");
    let (ok, key, err) = a.cli(&["keys", "create", "acme", "--name", "svc"]);
    assert!(ok, "{err}");
    let key_id = key.split('-').nth(1).unwrap().to_owned();

    let http = http_client();
    let status_on = |base: String| {
        let http = http.clone();
        let key = key.clone();
        async move {
            http.post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&key)
                .body(r#"{"model":"gpt-4.1","messages":[]}"#)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let created = time_until("B accepts a key created on A", Duration::from_secs(5), async || {
        status_on(b.public.clone()).await == 200
    })
    .await;
    assert!(created < Duration::from_secs(1), "{created:?}");

    let (ok, _, err) = a.cli(&["keys", "revoke", &key_id]);
    assert!(ok, "{err}");
    let revoked = time_until("B refuses a key revoked on A", Duration::from_secs(5), async || {
        status_on(b.public.clone()).await == 401
    })
    .await;
    assert!(revoked < Duration::from_secs(1), "revocation took {revoked:?} to reach the other replica");
    println!("key created on A usable on B after {created:?}; revoke on A effective on B after {revoked:?}");

    let (ok, key2, _) = b.cli(&["keys", "create", "acme", "--name", "svc2"]);
    assert!(ok);
    let (ok, _, _) = b.cli(&["tenants", "suspend", "acme"]);
    assert!(ok);
    let suspended = time_until("A refuses a tenant suspended on B", Duration::from_secs(5), async || {
        http.post(format!("{}/v1/chat/completions", a.public))
            .bearer_auth(&key2)
            .body("{}")
            .send()
            .await
            .unwrap()
            .status()
            == 403
    })
    .await;
    assert!(suspended < Duration::from_secs(1), "{suspended:?}");
    a.stop();
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_usage_record() {
    let fake = FakeUpstream::start().await.unwrap();
    let served = Served::start(&fake.base_url(), &[]);
    let key = served.acme_key();

    let http = http_client();
    let mut requests = tokio::task::JoinSet::new();
    // The load is spread over 600 ms (a request every 5 ms) so that SIGTERM
    // can land in the middle of it: this paces the load, it waits for nothing.
    let start = tokio::time::Instant::now();
    for i in 0..120 {
        let (http, key, base) = (http.clone(), key.clone(), served.public.clone());
        requests.spawn(async move {
            tokio::time::sleep_until(start + Duration::from_millis(i * 5)).await;
            let stream = i % 2 == 0;
            let body = format!(r#"{{"model":"gemini-2.5-flash","stream":{stream},"messages":[]}}"#);
            let response = http
                .post(format!("{base}/v1/chat/completions"))
                .bearer_auth(&key)
                .header("x-fake-chunks", "8")
                .header("x-fake-chunk-interval-ms", "40")
                .body(body)
                .send()
                .await;
            match response {
                // Answered: the gateway accepted it, so it must be recorded.
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    Some((status, stream, text))
                }
                // Refused after shutdown began.
                Err(_) => None,
            }
        });
    }
    // SIGTERM lands mid-run: once the upstream has seen part of the load,
    // with the rest still to come.
    time_until("a sixth of the load reaching the upstream", Duration::from_secs(10), async || {
        fake.requests().len() >= 20
    })
    .await;
    let sqlite = served.sqlite_url();
    let (log, _data) = tokio::task::spawn_blocking(move || served.stop_keeping_data()).await.unwrap();
    assert!(log.contains("SIGTERM received"));

    let mut answered = 0;
    let mut refused = 0;
    while let Some(result) = requests.join_next().await {
        match result.unwrap() {
            Some((status, stream, text)) => {
                assert_eq!(status, 200, "{text}");
                if stream {
                    assert!(text.ends_with("data: [DONE]\n\n"), "in-flight streams run to their end");
                }
                answered += 1;
            }
            None => refused += 1,
        }
    }
    let store = tollgate_store::Store::connect(&sqlite, 1).await.unwrap();
    let recorded = store.count_usage_events().await.unwrap();
    println!("{answered} answered, {refused} refused after SIGTERM, {recorded} recorded");
    assert!(answered > 0 && refused > 0, "the signal arrived mid-run ({answered} answered, {refused} refused)");
    assert_eq!(recorded, answered, "every answered request has its record after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_from_a_file_serve_an_alias_and_the_cli_lists_them() {
    let fake = FakeUpstream::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[routes]]\nmodel = \"chat-default\"\n[[routes.groups]]\ntargets = [{ model = \"gemini-2.5-flash-lite\" }]\n",
    )
    .unwrap();
    let served = Served::start(&fake.base_url(), &[("TOLLGATE_ROUTING__ROUTES_FILE", routes.to_str().unwrap())]);
    let key = served.acme_key();
    let response = http_client()
        .post(format!("{}/v1/chat/completions", served.public))
        .bearer_auth(&key)
        .body(r#"{"model":"chat-default","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-tollgate-model"], "gemini-2.5-flash-lite");
    assert_eq!(fake.requests()[0].json()["model"], "gemini-2.5-flash-lite");
    let (ok, out, err) = served.cli(&["routes"]);
    assert!(ok, "{err}");
    assert!(out.contains("chat-default/0/0") && out.contains("closed"), "{out}");
    let (ok, out, err) = served.cli(&["upstreams"]);
    assert!(ok, "{err}");
    assert!(out.contains("default") && !out.contains("sk-upstream-very-secret"), "{out}");
    served.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_configured_from_the_environment_join_the_log_lines_and_are_flushed_at_shutdown() {
    use tollgate_otlp_sink::{Sink, Transport};
    let fake = FakeUpstream::start().await.unwrap();
    let sink = Sink::start(Transport::HttpProtobuf).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("collector.token");
    std::fs::write(&token_file, "collector-token-very-secret\n").unwrap();
    let headers = format!("[{{name = \"x-collector-token\", value_file = \"{}\"}}]", token_file.display());
    let served = Served::start(
        &fake.base_url(),
        &[
            ("TOLLGATE_TELEMETRY__OTLP__ENDPOINT", &sink.endpoint()),
            ("TOLLGATE_TELEMETRY__OTLP__PROTOCOL", "http/protobuf"),
            ("TOLLGATE_TELEMETRY__OTLP__HEADERS", &headers),
            ("TOLLGATE_TELEMETRY__OTLP__SERVICE_NAME", "gateway-under-test"),
            // Long enough that only the shutdown drain sends the spans.
            ("TOLLGATE_TELEMETRY__OTLP__EXPORT_INTERVAL", "10m"),
        ],
    );
    let key = served.acme_key();
    let trace_id = "5b8aa5a2d2c872e8321cf37308d69df2";
    let response = http_client()
        .post(format!("{}/v1/chat/completions", served.public))
        .bearer_auth(&key)
        .header("traceparent", format!("00-{trace_id}-051581bf3cb55c13-01"))
        .body(r#"{"model":"gpt-4.1","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(sink.spans().is_empty(), "nothing is exported before the batch interval");

    let all = tokio::task::spawn_blocking(move || served.stop()).await.unwrap();
    let spans = sink.spans();
    let server = spans
        .iter()
        .find(|s| s.trace_id == trace_id && s.kind == 2)
        .unwrap_or_else(|| panic!("the server span was flushed at shutdown: {spans:#?}"));
    assert_eq!(server.resource.get("service.name").and_then(|v| v.as_str()), Some("gateway-under-test"));
    assert_eq!(sink.last_headers().get("x-collector-token").map(String::as_str), Some("collector-token-very-secret"));

    let lines: Vec<Value> = all.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect();
    let joined: Vec<&Value> = lines
        .iter()
        .filter(|e| e["span"]["trace_id"] == trace_id && e["span"]["span_id"] == server.span_id.as_str())
        .collect();
    assert!(
        joined.iter().any(|e| e["fields"]["message"] == "response" && e["fields"]["status"] == 200),
        "the access line carries the trace and span ids: {all}"
    );
    assert!(!all.contains("collector-token-very-secret"), "the collector's token reached the logs: {all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_the_gemini_query_string_reaches_neither_the_logs_nor_the_upstream() {
    let fake = FakeUpstream::start().await.unwrap();
    let served = Served::start(&fake.base_url(), &[]);
    let key = served.acme_key();
    let http = http_client();
    for (path, status) in [
        (format!("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key={key}"), 200),
        (format!("/v1/models/gemini-2.5-flash:generateContent?key={key}"), 200),
        // A wrong key in the query is refused, and not logged either.
        (format!("/v1beta/models/gemini-2.5-flash:generateContent?key={}", wrong_secret(&key)), 401),
    ] {
        let response = http
            .post(format!("{}{path}", served.public))
            .body(r#"{"contents":[{"parts":[{"text":"hi"}]}]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{path}");
        response.text().await.unwrap();
    }
    let sent = fake.requests();
    assert_eq!(sent.len(), 2);
    for request in &sent {
        assert!(!request.path.contains("key="), "{}", request.path);
        assert_eq!(request.headers["x-goog-api-key"], "sk-upstream-very-secret");
    }

    // The usage report groups by API.
    let mut summary = Value::Null;
    time_until("the usage summary shows the Gemini requests", Duration::from_secs(10), async || {
        let (ok, out, err) = served.cli(&["usage", "summary", "--group-by", "api", "--output", "json"]);
        assert!(ok, "{err}");
        summary = serde_json::from_str(&out).unwrap();
        summary["data"].as_array().is_some_and(|d| d.iter().any(|r| r["api"] == "gemini" && r["requests"] == 2))
    })
    .await;
    // As a table, the grouping column is shown.
    let (ok, table, err) = served.cli(&["usage", "summary", "--group-by", "api,hour"]);
    assert!(ok, "{err}");
    let header = table.lines().next().unwrap_or_default();
    assert!(header.contains("API") && header.contains("HOUR") && !header.contains("TENANT_ID"), "{table}");
    assert!(table.contains("gemini"), "{table}");

    let all = tokio::task::spawn_blocking(move || served.stop()).await.unwrap();
    let secret_part = key.rsplit('-').next().unwrap();
    assert!(!all.contains(secret_part), "a tenant key from the query string reached the logs: {all}");
    assert!(!all.contains("key="), "a query string with a key reached the logs: {all}");
    assert!(all.contains("/v1beta/models/gemini-2.5-flash:streamGenerateContent"), "the path is logged: {all}");
}
