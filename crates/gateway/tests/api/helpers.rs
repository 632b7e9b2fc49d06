//! Test harness: the real `Application` on port 0 against a `FakeUpstream`
//! on port 0, both over real HTTP.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tollgate_fake_upstream::FakeUpstream;
use tollgate_gateway::{Application, Clock, ClockControl, Config};
use tollgate_store::testing::TestDatabase;

pub const UPSTREAM_KEY: &str = "sk-upstream-test-key";
pub const ADMIN_TOKEN: &str = "admin-bootstrap-test-token";

pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub fake: FakeUpstream,
    /// Sends the tenant key on every request.
    pub http: reqwest::Client,
    /// Sends no credentials.
    pub anonymous: reqwest::Client,
    /// A key of tenant `test`, allowed every model.
    pub key: String,
    /// The gateway's clock: tests move it instead of sleeping.
    pub clock: TestClock,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    _dir: tempfile::TempDir,
    _db: Option<TestDatabase>,
}

/// Where a test gateway keeps its state.
pub enum Db {
    Sqlite,
    Postgres,
    /// A database URL owned by the test.
    Url(String),
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
        Self::start_full(fake, Db::Sqlite, adjust).await
    }

    pub async fn start_full(fake: FakeUpstream, db: Db, adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_on_clock(fake, db, TestClock::new(), adjust).await
    }

    /// A gateway on `clock`; replicas given the same clock agree on rate-limit
    /// windows and budget periods, as real replicas with synchronised clocks do.
    pub async fn start_on_clock(
        fake: FakeUpstream,
        db: Db,
        clock: TestClock,
        adjust: impl FnOnce(&mut Config),
    ) -> Self {
        init_test_logging();
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, value: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{value}\n")).expect("write secret file");
            path
        };

        let mut config = Config::default();
        config.server.listen = "127.0.0.1:0".parse().expect("addr");
        config.admin.listen = Some("127.0.0.1:0".parse().expect("addr"));
        config.upstream.base_url = fake.base_url();
        // Tests steer the fake upstream with x-fake-* request headers.
        config.upstream.forward_request_headers = vec!["x-fake-*".to_owned()];
        config.upstream.api_key_file = Some(write("upstream.key", UPSTREAM_KEY));
        config.admin.bootstrap_token_file = Some(write("admin.token", ADMIN_TOKEN));
        config.auth.hash_secret_file = Some(write("hash.secret", "test-hash-secret"));
        config.database.sqlite_path = dir.path().join("tollgate.db");
        config.accounting.spool_dir = dir.path().join("spool");
        config.accounting.flush_interval = std::time::Duration::from_millis(20);
        let test_db = match db {
            Db::Sqlite => None,
            Db::Postgres => {
                let pg = TestDatabase::postgres().await;
                config.database.url_file = Some(write("database.url", &pg.url));
                Some(pg)
            }
            Db::Url(url) => {
                config.database.url_file = Some(write("database.url", &url));
                None
            }
        };
        adjust(&mut config);
        config.validate().expect("test config is valid");

        let app = Application::build_with_clock(config, clock.clock.clone()).await.expect("application builds");
        let addr = app.local_addr();
        let admin_addr = app.admin_addr().unwrap_or(addr);
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        let anonymous = reqwest::Client::builder().no_proxy().build().expect("client");
        let mut gw = Self {
            addr,
            admin_addr,
            fake,
            http: anonymous.clone(),
            anonymous,
            key: String::new(),
            clock,
            stop: Some(stop),
            server: Some(server),
            _dir: dir,
            _db: test_db,
        };
        gw.ensure_tenant("test").await;
        gw.key = gw.create_key("test", serde_json::json!({"name": "default"})).await;
        gw.http = client_with_key(&gw.key);
        gw
    }

    /// Where this gateway keeps its files (SQLite database, usage spool).
    pub fn data_dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// One series' value from `/metrics` (`name` or `name{labels}`, as
    /// scraped), failing the test when it is not there.
    pub async fn metric(&self, series: &str) -> f64 {
        let metrics = self.anonymous.get(self.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
        scraped_value(&metrics, series).unwrap_or_else(|| panic!("no {series} in {metrics}"))
    }

    /// An admin call with the bootstrap token; returns status and JSON body.
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = self.anonymous.request(method, self.admin_url(path)).bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("admin request");
        let status = response.status().as_u16();
        let body = response.json().await.unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    pub async fn ensure_tenant(&self, id: &str) {
        let (status, body) = self
            .admin(reqwest::Method::POST, "/admin/v1/tenants", Some(serde_json::json!({"id": id, "display_name": id})))
            .await;
        assert!(status == 201 || status == 409, "create tenant {id}: {status} {body}");
    }

    /// Creates tenant `id` with `policy` and returns a client holding a new
    /// key of it.
    pub async fn tenant_with_policy(&self, id: &str, policy: serde_json::Value) -> reqwest::Client {
        let body = serde_json::json!({"id": id, "display_name": id, "policy": policy});
        let (status, body) = self.admin(reqwest::Method::POST, "/admin/v1/tenants", Some(body)).await;
        assert_eq!(status, 201, "{body}");
        client_with_key(&self.create_key(id, serde_json::json!({"name": "k"})).await)
    }

    /// Creates a key under `tenant` and returns its secret.
    pub async fn create_key(&self, tenant: &str, body: serde_json::Value) -> String {
        let (status, created) =
            self.admin(reqwest::Method::POST, &format!("/admin/v1/tenants/{tenant}/keys"), Some(body)).await;
        assert_eq!(status, 201, "create key: {created}");
        created["secret"].as_str().expect("secret").to_owned()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn post_json(&self, path: &str, body: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .header("content-type", "application/json")
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

/// A client that presents `key` as a bearer token on every request.
pub fn client_with_key(key: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}")).expect("header");
    value.set_sensitive(true);
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder().no_proxy().default_headers(headers).build().expect("client")
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

/// How long a test waits for an effect that happens in the background
/// (a notification, a ledger write, a background check) before failing.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How often a wait looks again.
const POLL: Duration = Duration::from_millis(10);

/// Polls `probe` until it yields a value, for at most `within`; `None` if it
/// never did. Waiting on the condition itself (rather than sleeping a fixed
/// time) returns as soon as the effect happened and cannot pass without it.
pub async fn poll_for<T>(within: Duration, mut probe: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = probe().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`poll_for`], failing the test with `what` if the value never came.
pub async fn wait_for<T>(what: &str, within: Duration, probe: impl AsyncFnMut() -> Option<T>) -> T {
    match poll_for(within, probe).await {
        Some(value) => value,
        None => panic!("timed out after {within:?} waiting for: {what}"),
    }
}

/// Waits until `condition` holds, failing the test with `what` after `within`.
pub async fn wait_until(what: &str, within: Duration, mut condition: impl AsyncFnMut() -> bool) {
    wait_for(what, within, async || condition().await.then_some(())).await;
}

/// A test's handle on a gateway's clock: reads it and moves it.
#[derive(Clone)]
pub struct TestClock {
    pub clock: Clock,
    control: ClockControl,
}

impl TestClock {
    pub fn new() -> Self {
        let (clock, control) = Clock::adjustable();
        Self { clock, control }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    pub fn advance(&self, by: Duration) {
        self.control.advance(by);
    }

    /// Moves the clock so that it reads `at` now.
    pub fn set(&self, at: DateTime<Utc>) {
        self.control.set(at);
    }

    /// Moves the clock to the start of the next minute: the requests that
    /// follow fall in one fresh rate-limit window (a minute of real time
    /// before the next one begins).
    pub fn to_next_minute(&self) {
        let next = (self.clock.now_ms().div_euclid(60_000) + 1) * 60_000;
        self.control.set(DateTime::from_timestamp_millis(next).expect("a representable time"));
    }
}

/// The socket address a service URL points at (`default_port` when it names
/// none), so a test can put a [`CuttableLink`] in front of it.
pub async fn service_addr(url: &str, default_port: u16) -> SocketAddr {
    let parsed = reqwest::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    let host = parsed.host_str().unwrap_or_else(|| panic!("{url} names no host"));
    let port = parsed.port().unwrap_or(default_port);
    tokio::net::lookup_host((host, port))
        .await
        .unwrap_or_else(|e| panic!("cannot resolve {host}:{port}: {e}"))
        .next()
        .unwrap_or_else(|| panic!("{host}:{port} resolves to nothing"))
}

/// `url` with its host and port replaced by `addr` (user, path and query kept).
pub fn through(url: &str, addr: SocketAddr) -> String {
    let mut parsed = reqwest::Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
    parsed.set_host(Some(&addr.ip().to_string())).expect("the URL takes a host");
    parsed.set_port(Some(addr.port())).expect("the URL takes a port");
    parsed.to_string()
}

/// One line of a Prometheus text scrape: the value of the series whose name
/// and labels are exactly `series` (e.g. `name{a="b"}`).
pub fn scraped_value(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn init_test_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_env_filter("debug").with_test_writer().try_init();
    }
}

/// A TCP forwarder (to Postgres, to Redis) that a test can cut and restore,
/// so the service becomes unreachable for one gateway only.
pub struct CuttableLink {
    pub addr: SocketAddr,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl CuttableLink {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let link = Self { addr: listener.local_addr().unwrap(), target, tasks: Arc::default() };
        link.serve(listener);
        link
    }

    fn serve(&self, listener: TcpListener) {
        let tasks = self.tasks.clone();
        let target = self.target;
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(conn);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Stops accepting and kills every open connection.
    pub fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    pub async fn restore(&self) {
        // The port is free once the cut connections are gone.
        let listener =
            wait_for("the link's port can be bound again", PATIENCE, async || TcpListener::bind(self.addr).await.ok())
                .await;
        self.serve(listener);
    }
}
