//! Test harness: the real `Application` on port 0 against a `FakeUpstream`
//! on port 0, both over real HTTP.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate_fake_upstream::FakeUpstream;
use tollgate_gateway::{Application, Config};

pub const UPSTREAM_KEY: &str = "sk-upstream-test-key";

pub struct TestGateway {
    pub addr: SocketAddr,
    pub fake: FakeUpstream,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    _key_dir: tempfile::TempDir,
}

impl TestGateway {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        let fake = FakeUpstream::start().await.expect("fake upstream starts");
        Self::start_against(fake, adjust).await
    }

    pub async fn start_against(fake: FakeUpstream, adjust: impl FnOnce(&mut Config)) -> Self {
        init_test_logging();
        let key_dir = tempfile::tempdir().expect("tempdir");
        let key_file = key_dir.path().join("upstream.key");
        std::fs::write(&key_file, format!("{UPSTREAM_KEY}\n")).expect("write key file");

        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().expect("addr");
        config.upstream.base_url = fake.base_url();
        config.upstream.api_key_file = Some(key_file);
        adjust(&mut config);
        config.validate().expect("test config is valid");

        let app = Application::build(config).await.expect("application builds");
        let addr = app.local_addr();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::builder().no_proxy().build().expect("client");
        Self { addr, fake, http, stop: Some(stop), server: Some(server), _key_dir: key_dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post_json(&self, path: &str, body: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .header("content-type", "application/json")
            .header("authorization", "Bearer tg-client-key")
            .body(body.to_owned())
            .send()
            .await
            .expect("request sent")
    }

    /// Starts a graceful shutdown and returns the server task.
    pub fn begin_shutdown(&mut self) -> JoinHandle<anyhow::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.take().expect("server still running")
    }
}

/// Reads an error envelope and checks its shape.
pub async fn envelope(response: reqwest::Response) -> serde_json::Value {
    assert_eq!(
        response.headers().get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json"),
        "error responses are JSON"
    );
    assert!(response.headers().contains_key("x-request-id"), "every response has x-request-id");
    let body: serde_json::Value = response.json().await.expect("JSON body");
    let error = &body["error"];
    assert!(error["message"].is_string(), "message: {body}");
    assert!(error["type"].is_string(), "type: {body}");
    assert!(error.get("param").is_some(), "param present: {body}");
    assert!(error.get("code").is_some(), "code present: {body}");
    body
}

pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

fn init_test_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter("debug").with_test_writer().try_init();
    }
}
