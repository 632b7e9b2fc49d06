//! What the load is sent to: the fake upstream (the direct path), nginx as a
//! plain reverse proxy in front of it, and the gateway with every feature on
//! (keys, tenant limits, a hard budget, accounting to Postgres, metrics
//! scraped every second).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::json;

use crate::procs::{Cpus, Proc, free_addr, pinned, wait_listening, which};

pub const ADMIN_TOKEN: &str = "bench-admin-token";

/// One thing the load generator can aim at.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: &'static str,
    /// Base URL up to and including `/v1`.
    pub base: String,
    /// A tenant key, for the gateway.
    pub key: Option<String>,
    pub pid: u32,
}

impl Target {
    pub fn chat_url(&self) -> String {
        format!("{}/chat/completions", self.base)
    }
}

pub struct Upstream {
    pub addr: SocketAddr,
    proc: Proc,
}

impl Upstream {
    /// The fake upstream as a separate process (this binary, `upstream`).
    pub async fn start(cpus: &Cpus) -> anyhow::Result<Self> {
        let addr = free_addr()?;
        let exe = std::env::current_exe()?;
        let mut cmd = pinned(cpus.load.as_deref(), &exe);
        cmd.arg("upstream").arg("--listen").arg(addr.to_string());
        let mut proc = Proc::spawn("fake upstream", cmd)?;
        wait_listening(&mut proc, addr).await?;
        Ok(Self { addr, proc })
    }

    pub fn target(&self) -> Target {
        Target { name: "direct", base: format!("http://{}/v1", self.addr), key: None, pid: self.proc.pid() }
    }
}

pub struct Nginx {
    pub addr: SocketAddr,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx with one worker, keep-alive to the upstream, buffering off.
    pub async fn start(cpus: &Cpus, upstream: SocketAddr) -> anyhow::Result<Self> {
        let binary = which("nginx")
            .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
            .context("nginx is not installed (scripts/ensure-services installs it)")?;
        let dir = tempfile::tempdir()?;
        let addr = free_addr()?;
        let d = dir.path().display();
        // Running as root, nginx would switch its worker to `nobody`, which
        // cannot write the temporary directory.
        let user = if std::env::var("USER").as_deref() == Ok("root") { "user root;" } else { "" };
        let conf = format!(
            "{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream fake {{
        server {upstream};
        keepalive 512;
    }}
    server {{
        listen {addr} backlog=4096;
        keepalive_requests 1000000;
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf)?;
        let mut cmd = pinned(cpus.under_test.as_deref(), &binary);
        cmd.arg("-p").arg(dir.path()).arg("-c").arg(dir.path().join("nginx.conf")).arg("-g").arg("daemon off;");
        let mut proc = Proc::spawn("nginx", cmd)?;
        wait_listening(&mut proc, addr).await?;
        Ok(Self { addr, proc, _dir: dir })
    }

    pub fn target(&self) -> Target {
        Target { name: "nginx", base: format!("http://{}/v1", self.addr), key: None, pid: self.proc.pid() }
    }
}

/// crabllm (crates.io: `cargo install crabllm --locked`), a peer gateway in
/// Rust, in front of the fake upstream like nginx. It has no tenant keys,
/// limits, budgets or usage ledger to turn on; its Prometheus metrics and
/// request ids are always on, its info log is turned off (`RUST_LOG=warn`)
/// as nginx's access log is.
pub struct Crabllm {
    pub addr: SocketAddr,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl Crabllm {
    /// The installed binary, if any.
    pub fn binary() -> Option<PathBuf> {
        which("crabllm").or_else(|| {
            let home = std::env::var_os("HOME")?;
            Some(PathBuf::from(home).join(".cargo/bin/crabllm")).filter(|p| p.is_file())
        })
    }

    /// `crabllm 0.0.25`, as cargo recorded the install (the binary has no
    /// version flag).
    pub fn version() -> String {
        let listed = std::process::Command::new("cargo").args(["install", "--list"]).output();
        let text = listed.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("crabllm v")?.split(':').next().map(|v| format!("crabllm {v}")))
            .unwrap_or_else(|| "crabllm".to_owned())
    }

    pub async fn start(binary: &std::path::Path, cpus: &Cpus, upstream: SocketAddr) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let addr = free_addr()?;
        // An existing file, always: without one crabllm writes a starter
        // config with keys (client authentication) turned on.
        let conf = format!(
            r#"listen = "{addr}"
openapi = false
shutdown_timeout = 2

[providers.openai]
kind = "openai"
base_url = "http://{upstream}/v1"
api_key = "sk-bench"
models = ["gpt-4.1-mini"]
max_retries = 0
timeout = 30
"#
        );
        let file = dir.path().join("crabllm.toml");
        std::fs::write(&file, conf)?;
        let mut cmd = pinned(cpus.under_test.as_deref(), binary);
        cmd.arg("serve").arg("--config").arg(&file).arg("--bind").arg(addr.to_string()).env("RUST_LOG", "warn");
        let mut proc = Proc::spawn("crabllm", cmd)?;
        wait_listening(&mut proc, addr).await?;
        Ok(Self { addr, proc, _dir: dir })
    }

    pub fn target(&self) -> Target {
        Target { name: "crabllm", base: format!("http://{}/v1", self.addr), key: None, pid: self.proc.pid() }
    }
}

/// A database of its own for one gateway, dropped at the end.
pub struct BenchDb {
    pub url: String,
    admin_url: String,
    name: String,
}

impl BenchDb {
    pub async fn create(server: &str, label: &str) -> anyhow::Result<Self> {
        let name = format!("tollgate_bench_{label}_{}", std::process::id());
        let admin = tollgate_store::Store::connect(server, 1).await.context("cannot reach Postgres")?;
        execute(&admin, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
        execute(&admin, &format!("CREATE DATABASE {name}")).await?;
        let base = server.rsplit_once('/').map_or(server, |(base, _)| base);
        Ok(Self { url: format!("{base}/{name}"), admin_url: server.to_owned(), name })
    }

    pub async fn drop_now(&self) {
        if let Ok(admin) = tollgate_store::Store::connect(&self.admin_url, 1).await {
            let _ = execute(&admin, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await;
        }
    }
}

/// One statement outside the store's own queries (database set-up, bulk
/// inserts).
pub async fn execute(store: &tollgate_store::Store, sql: &str) -> anyhow::Result<u64> {
    Ok(sqlx::query(sql).execute(store.pool()).await?.rows_affected())
}

pub struct Gateway {
    pub public: SocketAddr,
    pub admin: SocketAddr,
    pub key: String,
    proc: Proc,
    http: reqwest::Client,
    scraper: tokio::task::JoinHandle<()>,
    /// Holds the spool directory for as long as the gateway runs.
    _data: tempfile::TempDir,
    /// The target's name in the report: `gateway`, or `baseline`.
    name: &'static str,
}

impl Gateway {
    /// The release (or, for the smoke run, debug) `tollgate` binary beside
    /// this one.
    pub fn binary() -> anyhow::Result<PathBuf> {
        let exe = std::env::current_exe()?;
        let path = exe.with_file_name("tollgate");
        if !path.is_file() {
            bail!("{} is missing: build it first (bench/run builds both)", path.display());
        }
        Ok(path)
    }

    /// Starts the gateway on `db` on the system under test's CPU, with the
    /// runtime's default worker count (one per CPU it may run on), then gives it a tenant with limits, a budget and a
    /// key (unless `existing_key` is given: then the database already has them).
    pub async fn start(
        cpus: &Cpus,
        upstream: SocketAddr,
        db: &BenchDb,
        existing_key: Option<String>,
    ) -> anyhow::Result<Self> {
        Self::start_with_routes(cpus, upstream, db, existing_key, None).await
    }

    /// Like `start`, with `routes` (a routes file's text) in force.
    pub async fn start_with_routes(
        cpus: &Cpus,
        upstream: SocketAddr,
        db: &BenchDb,
        existing_key: Option<String>,
        routes: Option<&str>,
    ) -> anyhow::Result<Self> {
        Self::start_with_settings(cpus, upstream, db, existing_key, routes, &[]).await
    }

    /// Like `start_with_routes`, with further settings (`TOLLGATE_*` variables).
    pub async fn start_with_settings(
        cpus: &Cpus,
        upstream: SocketAddr,
        db: &BenchDb,
        existing_key: Option<String>,
        routes: Option<&str>,
        settings: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        Self::start_binary(&Self::binary()?, cpus, upstream, db, existing_key, routes, settings).await
    }

    /// The same gateway under another name in the report.
    pub fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// Another build of the gateway (`TOLLGATE_BENCH_BASELINE`), measured
    /// beside this one in the same run: a change's effect, told apart from
    /// the machine's noise between runs.
    pub async fn start_baseline(
        binary: &std::path::Path,
        cpus: &Cpus,
        upstream: SocketAddr,
        db: &BenchDb,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(binary.is_file(), "TOLLGATE_BENCH_BASELINE: {} is not a file", binary.display());
        let mut gateway = Self::start_binary(binary, cpus, upstream, db, None, None, &[]).await?;
        gateway.name = "baseline";
        Ok(gateway)
    }

    pub async fn start_binary(
        binary: &std::path::Path,
        cpus: &Cpus,
        upstream: SocketAddr,
        db: &BenchDb,
        existing_key: Option<String>,
        routes: Option<&str>,
        settings: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let command = |public: SocketAddr, admin: SocketAddr| -> anyhow::Result<std::process::Command> {
            // TOLLGATE_BENCH_WRAP (e.g. `heaptrack` or `valgrind --tool=callgrind`)
            // runs the gateway under a profiler.
            let wrap = std::env::var("TOLLGATE_BENCH_WRAP").unwrap_or_default();
            let mut words = wrap.split_whitespace();
            let mut cmd = match words.next() {
                Some(profiler) => {
                    let mut cmd = pinned(cpus.under_test.as_deref(), &which(profiler).context("the profiler")?);
                    cmd.args(words).arg(binary);
                    cmd
                }
                None => pinned(cpus.under_test.as_deref(), binary),
            };
            cmd.arg("serve").env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default());
            // The runtime's own default: one worker per CPU the gateway may run
            // on, so one when pinned, as nginx runs one worker. Background work
            // (ledger batches, scrapes) has the gateway's background thread.
            // Two workers on the one CPU cost more CPU per request and a longer
            // tail at 1,000 req/s in side-by-side runs, and the same throughput.
            if let Ok(workers) = std::env::var("TOLLGATE_BENCH_WORKERS") {
                cmd.env("TOKIO_WORKER_THREADS", workers);
            }
            cmd.env("TOLLGATE_SERVER__LISTEN", public.to_string())
                .env("TOLLGATE_ADMIN__LISTEN", admin.to_string())
                .env("TOLLGATE_UPSTREAM__BASE_URL", format!("http://{upstream}/v1"))
                // The streaming scenarios steer the fake upstream with x-fake-* headers.
                .env("TOLLGATE_UPSTREAM__FORWARD_REQUEST_HEADERS", r#"["x-fake-*"]"#)
                .env("TOLLGATE_DATABASE_URL", &db.url)
                .env("TOLLGATE_ACCOUNTING__SPOOL_DIR", data.path().join("spool"))
                .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("TOLLGATE_HASH_SECRET", "bench-hash-secret")
                .env("TOLLGATE_LOG__FORMAT", "json")
                .env("COMETAPI_KEY", "sk-bench");
            // Configuration settings (TOLLGATE_<SECTION>__<KEY>) in the benchmark's
            // own environment override the defaults above, e.g.
            // TOLLGATE_LOG__LEVEL=warn to price the logs. Other TOLLGATE_*
            // variables (the test suite's, the benchmark's own) are not settings.
            cmd.envs(std::env::vars().filter(|(k, _)| k.starts_with("TOLLGATE_") && k.contains("__")));
            cmd.envs(settings.iter().map(|(k, v)| (*k, v.as_str())));
            if let Some(routes) = routes {
                let file = data.path().join("routes.toml");
                std::fs::write(&file, routes)?;
                cmd.env("TOLLGATE_ROUTING__ROUTES_FILE", file);
            }
            Ok(cmd)
        };
        // A port found free can be taken by another process (an outgoing
        // connection's ephemeral port) before the gateway binds it: then it
        // exits at once, and is started again on other ports.
        let mut attempts = 0;
        let (proc, public, admin) = loop {
            attempts += 1;
            let (public, admin) = (free_addr()?, free_addr()?);
            let mut proc = Proc::spawn("gateway", command(public, admin)?)?;
            let listening = match wait_listening(&mut proc, public).await {
                Ok(()) => wait_listening(&mut proc, admin).await,
                Err(e) => Err(e),
            };
            match listening {
                Ok(()) => break (proc, public, admin),
                Err(_) if attempts < 3 && proc.exited() => continue,
                Err(e) => return Err(e),
            }
        };
        let http = reqwest::Client::builder().no_proxy().build()?;
        let key = match existing_key {
            Some(key) => key,
            None => provision(&http, admin).await?,
        };
        // A Prometheus-like scrape every second, as in production.
        let scrape_http = http.clone();
        let scraper = tokio::spawn(async move {
            loop {
                let _ = scrape_http.get(format!("http://{admin}/metrics")).send().await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(Self { name: "gateway", public, admin, key, proc, http, scraper, _data: data })
    }

    pub fn target(&self) -> Target {
        Target {
            name: self.name,
            base: format!("http://{}/v1", self.public),
            key: Some(self.key.clone()),
            pid: self.proc.pid(),
        }
    }

    /// One value from `/metrics`, summed over its series.
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let text = self.http.get(format!("http://{}/metrics", self.admin)).send().await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.scraper.abort();
    }
}

/// Tenant `bench` with limits far above the load (so every check runs and
/// none refuses), a hard monthly budget, and nine more keys beside the one
/// returned: ten keys in all.
async fn provision(http: &reqwest::Client, admin: SocketAddr) -> anyhow::Result<String> {
    let call = |path: &str, body: serde_json::Value| {
        http.post(format!("http://{admin}/admin/v1{path}")).bearer_auth(ADMIN_TOKEN).json(&body).send()
    };
    let policy = json!({"limits": {"rpm": 100_000_000, "tpm": 100_000_000_000_u64, "max_concurrent": 100_000}});
    let r = call("/tenants", json!({"id": "bench", "display_name": "Bench", "policy": policy})).await?;
    if !r.status().is_success() {
        bail!("cannot create the bench tenant: {}", r.text().await?);
    }
    let r = call("/tenants/bench/budgets", json!({"period": "monthly", "amount_usd": "1000000000"})).await?;
    if !r.status().is_success() {
        bail!("cannot create the bench budget: {}", r.text().await?);
    }
    let mut first = None;
    for i in 0..10 {
        let r = call("/tenants/bench/keys", json!({"name": format!("k{i}")})).await?;
        let created: serde_json::Value = r.json().await?;
        let secret = created["secret"].as_str().context("no key secret in the answer")?.to_owned();
        first.get_or_insert(secret);
    }
    first.context("no key")
}
