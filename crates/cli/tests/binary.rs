//! The real `tollgate` binary: configuration errors, environment overrides,
//! JSON logs, secrets kept out of logs, and SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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
        &[("TOLLGATE_SERVER__MAX_BODY_BYTES", "12345"), ("TOLLGATE_LOG__FORMAT", "json")],
    );
    assert!(ok, "{text}");
    assert!(text.contains("12345"), "{text}");
    assert!(text.contains("\"json\""), "{text}");
}

#[test]
fn a_missing_config_file_is_an_error() {
    let out = tollgate().args(["check-config", "--config", "/nonexistent/tollgate.toml"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tollgate.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_json_with_request_ids_keeps_secrets_out_and_stops_on_sigterm() {
    tollgate_gateway::upstream::install_crypto_provider();
    let fake = FakeUpstream::start().await.unwrap();
    let mut child = tollgate()
        .arg("serve")
        .env("TOLLGATE_SERVER__LISTEN", "127.0.0.1:0")
        .env("TOLLGATE_UPSTREAM__BASE_URL", fake.base_url())
        .env("TOLLGATE_LOG__FORMAT", "json")
        .env("TOLLGATE_LOG__LEVEL", "debug")
        .env("COMETAPI_KEY", "sk-upstream-very-secret")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // The log line that announces the bound address.
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let addr = loop {
        let line = lines_rx.recv_timeout(Duration::from_secs(20)).expect("the gateway starts and logs");
        let event: Value = serde_json::from_str(&line).expect("every log line is JSON");
        lines.push(line);
        if event["fields"]["message"] == "listening" {
            break event["fields"]["addr"].as_str().unwrap().to_owned();
        }
    };

    let http = reqwest::Client::new();
    let response = http
        .post(format!("http://{addr}/v1/chat/completions"))
        .header("authorization", "Bearer tg-client-very-secret")
        .header("x-request-id", "cli-test-request-1")
        .body(r#"{"model":"gpt-4.1","messages":[]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(fake.requests()[0].headers["authorization"], "Bearer sk-upstream-very-secret");

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    assert!(exit.status.success(), "clean exit on SIGTERM: {:?}", exit.status);
    while let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(200)) {
        lines.push(line);
    }
    let all = lines.join("\n") + &String::from_utf8_lossy(&exit.stderr);

    let request_lines: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["span"]["request_id"] == "cli-test-request-1")
        .collect();
    assert!(!request_lines.is_empty(), "request lines carry the request id: {all}");
    assert!(request_lines.iter().any(|e| e["fields"]["status"] == 200), "{all}");
    assert!(all.contains("SIGTERM received"), "{all}");
    assert!(!all.contains("very-secret"), "a secret reached the logs: {all}");
}
