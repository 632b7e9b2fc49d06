//! Typed configuration: a TOML file, then `TOLLGATE_<SECTION>__<KEY>`
//! environment overrides, validated once at start-up.
//!
//! Unknown keys (in the file or the environment) are start-up errors that name
//! the key, so a typo never silently falls back to a default. Secrets are
//! never part of the file: the config names the environment variable or file
//! they are read from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use reqwest::Url;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

/// Environment variables with the `TOLLGATE_` prefix that are not config keys.
/// (Secrets and the CLI's own settings.)
const NON_CONFIG_ENV: &[&str] = &["CONFIG", "ADMIN_TOKEN", "ADMIN_URL", "DATABASE_URL", "HASH_SECRET", "REDIS_URL"];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    /// The default upstream: where requests for models no route names go.
    pub upstream: UpstreamConfig,
    /// Further upstreams that routes can send to, each with a `name`.
    pub upstreams: Vec<UpstreamConfig>,
    /// Model routes: fallbacks, retries and weighted variants.
    pub routes: Vec<crate::routing::config::RouteConfig>,
    pub routing: RoutingConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub admin: AdminConfig,
    pub accounting: AccountingConfig,
    pub limits: LimitsConfig,
    pub redis: RedisConfig,
    pub alerts: AlertsConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
}

/// `[telemetry]`: trace export, off unless `[telemetry.otlp]` is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    pub otlp: Option<crate::telemetry::traces::config::OtlpConfig>,
}

impl TelemetryConfig {
    /// The export settings, when export is on. An empty `endpoint` leaves it
    /// off, for templates (compose, Helm) that always set the variable.
    pub fn otlp(&self) -> Option<&crate::telemetry::traces::config::OtlpConfig> {
        self.otlp.as_ref().filter(|o| !o.endpoint.trim().is_empty())
    }
}

/// The HTTP versions spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Auto,
    Http1,
    Http2,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// A file of `[[routes]]`, used instead of the routes in this file and
    /// reloaded when it changes (routes and weights change without a restart).
    pub routes_file: Option<PathBuf>,
    /// How often the routes file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub reload_interval: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self { routes_file: None, reload_interval: Duration::from_secs(5) }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// How often budgets are checked against the ledger for alerts.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
    /// How often the alert outbox is delivered.
    #[serde(with = "humantime_serde")]
    pub delivery_interval: Duration,
    /// First retry delay after a failed delivery; doubles per attempt, up to
    /// ten minutes.
    #[serde(with = "humantime_serde")]
    pub retry_base: Duration,
    pub webhooks: Vec<WebhookConfig>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            check_interval: Duration::from_secs(30),
            delivery_interval: Duration::from_secs(1),
            retry_base: Duration::from_secs(2),
            webhooks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// `generic` (signed JSON) or `slack`.
    #[serde(default = "generic_format")]
    pub format: crate::alerts::WebhookFormat,
    /// Environment variable holding the HMAC signing secret (generic format).
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
}

fn generic_format() -> crate::alerts::WebhookFormat {
    crate::alerts::WebhookFormat::Generic
}

impl AlertsConfig {
    pub fn webhooks(&self) -> Result<Vec<crate::alerts::Webhook>, ConfigError> {
        self.webhooks
            .iter()
            .map(|w| {
                let secret = match (&w.secret_file, &w.secret_env) {
                    (None, None) => None,
                    (file, env) => {
                        read_secret(file.as_deref(), env.as_deref().unwrap_or(""), "alerts.webhooks.secret_file")?
                    }
                };
                Ok(crate::alerts::Webhook { url: w.url.clone(), format: w.format, secret })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Environment variable holding a `redis://` URL. When set, rate limits
    /// and budgets are shared by every replica through Redis.
    pub url_env: String,
    pub url_file: Option<PathBuf>,
    /// How many replicas share the limits: while Redis is unreachable each
    /// replica enforces limit ÷ replicas on its own.
    pub replicas: u64,
    /// Prefix of every key Tollgate writes, so deployments can share a Redis.
    pub key_prefix: String,
    /// How many requests' worth of each shared limit and budget a replica
    /// takes from Redis at a time and admits from by itself (at most a 64th
    /// of the limit; limits too small for two requests' worth are checked
    /// in Redis request by request). The smallest block: a replica that
    /// uses its blocks up fast takes larger ones (see `shared::lease`).
    /// 0: every admission asks Redis.
    pub lease_requests: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url_env: "TOLLGATE_REDIS_URL".to_owned(),
            url_file: None,
            replicas: 1,
            key_prefix: "tollgate".to_owned(),
            lease_requests: 64,
        }
    }
}

impl RedisConfig {
    pub fn url(&self) -> Result<Option<SecretString>, ConfigError> {
        read_secret(self.url_file.as_deref(), &self.url_env, "redis.url_file")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests per minute for tenants whose policy sets none (unset: no limit).
    pub rpm: Option<u64>,
    /// Tokens per minute for tenants whose policy sets none.
    pub tpm: Option<u64>,
    /// Requests in flight for tenants whose policy sets none.
    pub max_concurrent: Option<u64>,
    /// Output tokens assumed, for token limits and budget reservations, when
    /// a request sets no limit.
    pub default_output_tokens: u64,
    /// How long a request may wait for other requests' budget reservations
    /// to settle before it is throttled (429 `rate_limit_exceeded`,
    /// retryable). `0s`: never wait.
    #[serde(with = "humantime_serde")]
    pub budget_wait: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            rpm: None,
            tpm: None,
            max_concurrent: None,
            default_output_tokens: 4096,
            budget_wait: Duration::from_secs(2),
        }
    }
}

impl LimitsConfig {
    pub fn defaults(&self) -> tollgate_store::Limits {
        tollgate_store::Limits { rpm: self.rpm, tpm: self.tpm, max_concurrent: self.max_concurrent }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountingConfig {
    /// Model prices (see `config/pricing.toml`). Unset: the built-in list.
    pub pricing_file: Option<PathBuf>,
    /// How often the pricing file is checked for changes.
    #[serde(with = "humantime_serde")]
    pub pricing_reload_interval: Duration,
    /// Refuse requests for models without a price (400 `model_not_priced`)
    /// instead of recording them with cost 0.
    pub reject_unpriced: bool,
    /// Where usage records wait while the database is unavailable.
    pub spool_dir: PathBuf,
    /// The spool's bound; when it is full, new requests get 503.
    pub max_spool_bytes: u64,
    /// Records written to the database per batch...
    pub batch_size: usize,
    /// ...or after this long, whichever comes first.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// A database write slower than this sends its batch to the spool.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Days of per-request records kept (0 = forever). Daily rollups are kept.
    pub retention_days: u32,
    /// Build the tokenizer (about 10 MB once built) at start-up rather than at the first
    /// request whose usage must be estimated.
    pub preload_tokenizer: bool,
}

impl Default for AccountingConfig {
    fn default() -> Self {
        Self {
            pricing_file: None,
            pricing_reload_interval: Duration::from_secs(10),
            reject_unpriced: false,
            spool_dir: PathBuf::from("data/spool"),
            max_spool_bytes: 1024 * 1024 * 1024,
            batch_size: 5000,
            flush_interval: Duration::from_millis(200),
            write_timeout: Duration::from_secs(5),
            retention_days: 90,
            preload_tokenizer: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Environment variable holding a `postgres://` URL (it may contain a
    /// password, so it never lives in this file). When it is unset, Tollgate
    /// uses the embedded SQLite file at `sqlite_path`.
    pub url_env: String,
    /// File holding the database URL (takes precedence over `url_env`).
    pub url_file: Option<PathBuf>,
    pub sqlite_path: PathBuf,
    pub max_connections: u32,
    /// Apply pending migrations at start-up (else run `tollgate migrate`).
    pub migrate_on_start: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url_env: "TOLLGATE_DATABASE_URL".to_owned(),
            url_file: None,
            sqlite_path: PathBuf::from("data/tollgate.db"),
            max_connections: 10,
            migrate_on_start: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Environment variable holding the secret keyed into key hashes. Every
    /// replica must use the same one. Unset: one is generated once and kept
    /// in the database.
    pub hash_secret_env: String,
    pub hash_secret_file: Option<PathBuf>,
    /// Full reload of the key cache, a safety net behind change notifications.
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
    /// Failed authentications per minute from one address (tenant keys and
    /// admin tokens, counted apart) before every further attempt from it is
    /// refused with 429 until the minute ends.
    pub failed_attempts_per_minute: u32,
    /// How often keys' `last_used_at` times are written (in one batch).
    #[serde(with = "humantime_serde")]
    pub last_used_flush_interval: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            hash_secret_env: "TOLLGATE_HASH_SECRET".to_owned(),
            hash_secret_file: None,
            refresh_interval: Duration::from_secs(30),
            failed_attempts_per_minute: 20,
            last_used_flush_interval: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Listener for `/admin/v1`, `/metrics` and the health endpoints, kept
    /// off the public network.
    pub listen: Option<SocketAddr>,
    /// Serve the admin API and `/metrics` on the public listener instead
    /// (`listen` is then ignored). Anyone who reaches the public port can
    /// then try admin tokens and read every tenant's metrics: only for a
    /// public listener that is itself private.
    pub share_public_listener: bool,
    /// Environment variable holding the bootstrap admin token.
    pub bootstrap_token_env: String,
    pub bootstrap_token_file: Option<PathBuf>,
    /// The admin console in the browser, served where the admin API is.
    pub console: ConsoleConfig,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8081))),
            share_public_listener: false,
            bootstrap_token_env: "TOLLGATE_ADMIN_TOKEN".to_owned(),
            bootstrap_token_file: None,
            console: ConsoleConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleConfig {
    /// Serve the console (`/` and `/console/` on the admin listener).
    pub enabled: bool,
    /// How long a sign-in lasts; the console asks for the token again after.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Mark the session cookie `Secure` on every answer. Without it the
    /// cookie is `Secure` when the request came over https through a proxy
    /// that says so (`X-Forwarded-Proto: https`).
    pub secure_cookies: bool,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self { enabled: true, session_ttl: Duration::from_secs(12 * 3600), secure_cookies: false }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the public OpenAI-compatible listener. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger ones get 413 before
    /// anything is sent upstream. The default leaves room for inline images.
    pub max_body_bytes: usize,
    /// How long in-flight requests and streams may run after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// HTTP/1.1: a request head (request line and headers) must be complete
    /// within this long of the connection being ready for it, that is of
    /// being accepted or of its previous response ending. Past it the
    /// connection is closed without an answer.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed
    /// (HTTP/1.1 keep-alive and HTTP/2 alike). At most `header_read_timeout`:
    /// an idle HTTP/1.1 connection is waiting for a request head.
    #[serde(with = "humantime_serde")]
    pub keep_alive_timeout: Duration,
    /// Longest silence while a request body is arriving; past it the request
    /// gets 408 `request_timeout` and the connection is closed.
    #[serde(with = "humantime_serde")]
    pub body_idle_timeout: Duration,
    /// A request body must be complete within this long of the gateway
    /// starting to read it; past it, 408 as above.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Open connections per listener. At the cap the listener stops
    /// accepting; new connections wait in the kernel's queue until one closes.
    pub max_connections: usize,
    /// After answering a request whose body is still arriving (413, 401, ...),
    /// up to this many more bytes of it are read and thrown away so the client
    /// can read the answer instead of a connection reset. 0: close at once.
    pub discard_max_bytes: u64,
    /// ...for at most this long (and never past a `body_idle_timeout` of
    /// silence).
    #[serde(with = "humantime_serde")]
    pub discard_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 32 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(10),
            body_idle_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            discard_max_bytes: 64 * 1024 * 1024,
            discard_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// The name routes use (`[[upstreams]]`); the `[upstream]` section is
    /// always `default`.
    pub name: String,
    /// OpenAI-compatible base URL, including its `/v1` (or equivalent) prefix.
    pub base_url: String,
    /// Environment variable holding the upstream API key.
    pub api_key_env: String,
    /// File holding the upstream API key (takes precedence over `api_key_env`).
    pub api_key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed from sending the request to receiving response headers.
    #[serde(with = "humantime_serde")]
    pub first_byte_timeout: Duration,
    /// Longest silence allowed between two chunks of a response body.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long an unused pooled connection is kept.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Upper bound on one SSE event from the upstream.
    pub max_event_bytes: usize,
    /// Upper bound on a non-streamed upstream response body.
    pub max_response_bytes: usize,
    /// Requests in flight to this upstream at most (unset: no cap); past it
    /// a request is not sent: a route tries its next target, else the
    /// client gets 503 `upstream_busy`.
    pub max_in_flight: Option<usize>,
    /// `auto` (HTTP/2 when an https upstream offers it by ALPN, else
    /// HTTP/1.1), `http1`, or `http2` (also on plain http, by prior
    /// knowledge: one connection carries many requests).
    pub protocol: UpstreamProtocol,
    /// Requests one HTTP/2 connection carries at once before another is
    /// opened (keep it at or below the upstream's
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`, commonly 100–250).
    pub http2_streams_per_connection: usize,
    /// Client request headers forwarded besides the built-in allow-list
    /// (`content-type`, `accept`, `user-agent`, `openai-beta`,
    /// `idempotency-key`, `traceparent`, `tracestate`, `x-stainless-*`):
    /// exact names, or prefixes ending in `*`, e.g. `["x-my-trace-*"]`.
    /// Credentials, `host`, the organization and project headers and the
    /// body's framing are never forwarded, whatever this lists.
    pub forward_request_headers: Vec<String>,
    /// The APIs this upstream serves: `openai` (at `base_url`), `anthropic`
    /// (`/messages` under `base_url`) and `gemini` (at `gemini_base_url`).
    /// CometAPI serves all three; a plain OpenAI-compatible upstream only
    /// `openai`, and requests in another API's shape are then refused
    /// instead of forwarded.
    pub apis: Vec<tollgate_openai::Api>,
    /// Where the Gemini API is served (`…/v1beta`); unset: `base_url` with
    /// its trailing `/v1` replaced by `/v1beta`.
    pub gemini_base_url: Option<String>,
}

impl UpstreamConfig {
    /// The Gemini API root: `gemini_base_url`, else derived from `base_url`.
    pub fn gemini_base(&self) -> String {
        if let Some(url) = &self.gemini_base_url {
            return url.trim_end_matches('/').to_owned();
        }
        let base = self.base_url.trim_end_matches('/');
        match base.strip_suffix("/v1") {
            Some(root) => format!("{root}/v1beta"),
            None => format!("{base}/v1beta"),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            name: "default".to_owned(),
            base_url: "https://api.cometapi.com/v1".to_owned(),
            api_key_env: "COMETAPI_KEY".to_owned(),
            api_key_file: None,
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(120),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle_per_host: 256,
            max_event_bytes: 16 * 1024 * 1024,
            max_response_bytes: 256 * 1024 * 1024,
            forward_request_headers: Vec::new(),
            protocol: UpstreamProtocol::Auto,
            http2_streams_per_connection: 100,
            max_in_flight: None,
            apis: tollgate_openai::Api::ALL.to_vec(),
            gemini_base_url: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `tollgate_gateway=debug,info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, level: "info".to_owned() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not `#[source]`: figment's message already is the whole story, and a
    /// source would print it twice in an error chain.
    #[error("configuration: {0}")]
    Load(Box<figment::Error>),
    #[error("configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
    #[error("configuration: `{key}` {problem}")]
    InvalidRoute { key: String, problem: String },
    #[error("configuration: `{key}` {path}: {source}")]
    SecretFile { key: &'static str, path: PathBuf, source: std::io::Error },
}

impl From<Box<figment::Error>> for ConfigError {
    fn from(e: Box<figment::Error>) -> Self {
        Self::Load(e)
    }
}

impl Config {
    /// Defaults, then the file (if any), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::Invalid {
                    key: "--config",
                    problem: format!("names {}, which does not exist", path.display()),
                });
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed("TOLLGATE_").ignore(NON_CONFIG_ENV).split("__"));
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        fn check_base_url(base_url: &str, key: &'static str) -> Result<(), ConfigError> {
            let invalid = |problem: String| ConfigError::Invalid { key, problem };
            let url = Url::parse(base_url).map_err(|e| invalid(format!("is not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(invalid("must be an http or https URL".to_owned()));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(invalid("must not have a query or fragment".to_owned()));
            }
            Ok(())
        }
        fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
            ConfigError::Invalid { key, problem: problem.into() }
        }
        if self.admin.listen.is_none() && !self.admin.share_public_listener {
            return Err(invalid(
                "admin.listen",
                "is required (or set admin.share_public_listener = true to serve the admin API on the public listener)",
            ));
        }
        check_base_url(&self.upstream.base_url, "upstream.base_url")?;
        for upstream in std::iter::once(&self.upstream).chain(&self.upstreams) {
            if let Some(url) = &upstream.gemini_base_url {
                check_base_url(url, "upstreams.gemini_base_url")?;
            }
            if upstream.http2_streams_per_connection == 0 {
                return Err(invalid("upstream.http2_streams_per_connection", "must be greater than 0"));
            }
        }
        let mut names = vec!["default"];
        for upstream in &self.upstreams {
            let name = upstream.name.as_str();
            if name.is_empty() || name == "default" || names.contains(&name) {
                return Err(invalid(
                    "upstreams.name",
                    format!("{name:?}: every [[upstreams]] needs its own name (\"default\" is [upstream])"),
                ));
            }
            check_base_url(&upstream.base_url, "upstreams.base_url")?;
            names.push(name);
        }
        let speaking: Vec<(&str, &[tollgate_openai::Api])> =
            std::iter::once(("default", self.upstream.apis.as_slice()))
                .chain(self.upstreams.iter().map(|u| (u.name.as_str(), u.apis.as_slice())))
                .collect();
        crate::routing::config::validate(&self.routes, &speaking)
            .map_err(|(key, problem)| ConfigError::InvalidRoute { key, problem })?;
        if let Some(otlp) = self.telemetry.otlp() {
            otlp.validate().map_err(|(key, problem)| invalid(key, problem))?;
        }
        if self.routing.routes_file.is_some() && !self.routes.is_empty() {
            return Err(invalid("routing.routes_file", "replaces [[routes]] here: keep the routes in one place"));
        }
        let ttl = self.admin.console.session_ttl;
        if ttl < Duration::from_secs(60) || ttl > Duration::from_secs(30 * 86_400) {
            return Err(invalid("admin.console.session_ttl", "must be between 1 minute and 30 days"));
        }
        if self.server.max_body_bytes == 0 {
            return Err(invalid("server.max_body_bytes", "must be greater than 0"));
        }
        for (key, value) in [
            ("server.header_read_timeout", self.server.header_read_timeout),
            ("server.keep_alive_timeout", self.server.keep_alive_timeout),
            ("server.body_idle_timeout", self.server.body_idle_timeout),
            ("server.body_read_timeout", self.server.body_read_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.server.keep_alive_timeout > self.server.header_read_timeout {
            return Err(invalid(
                "server.keep_alive_timeout",
                "must not exceed server.header_read_timeout: an idle HTTP/1.1 connection is waiting for a request \
                 head, which header_read_timeout already bounds",
            ));
        }
        if self.server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be greater than 0"));
        }
        if self.upstream.max_event_bytes == 0 {
            return Err(invalid("upstream.max_event_bytes", "must be greater than 0"));
        }
        if self.upstream.max_response_bytes == 0 {
            return Err(invalid("upstream.max_response_bytes", "must be greater than 0"));
        }
        for (key, value) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.first_byte_timeout", self.upstream.first_byte_timeout),
            ("upstream.idle_timeout", self.upstream.idle_timeout),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.database.max_connections == 0 {
            return Err(invalid("database.max_connections", "must be greater than 0"));
        }
        if self.auth.refresh_interval.is_zero() {
            return Err(invalid("auth.refresh_interval", "must be greater than 0"));
        }
        for (key, value) in [
            ("limits.rpm", self.limits.rpm),
            ("limits.tpm", self.limits.tpm),
            ("limits.max_concurrent", self.limits.max_concurrent),
        ] {
            if value == Some(0) {
                return Err(invalid(key, "must be greater than 0 (leave it unset for no limit)"));
            }
        }
        for hook in &self.alerts.webhooks {
            let url =
                Url::parse(&hook.url).map_err(|e| invalid("alerts.webhooks.url", format!("is not a URL: {e}")))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(invalid("alerts.webhooks.url", "must be an http or https URL"));
            }
        }
        if self.alerts.check_interval.is_zero() || self.alerts.delivery_interval.is_zero() {
            return Err(invalid("alerts.check_interval", "intervals must be greater than 0"));
        }
        if self.redis.replicas == 0 {
            return Err(invalid("redis.replicas", "must be at least 1"));
        }
        if self.accounting.batch_size == 0 {
            return Err(invalid("accounting.batch_size", "must be greater than 0"));
        }
        for (key, value) in [
            ("accounting.flush_interval", self.accounting.flush_interval),
            ("accounting.write_timeout", self.accounting.write_timeout),
            ("accounting.pricing_reload_interval", self.accounting.pricing_reload_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be greater than 0"));
            }
        }
        if self.auth.last_used_flush_interval.is_zero() {
            return Err(invalid("auth.last_used_flush_interval", "must be greater than 0"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| invalid("log.level", format!("is not a valid filter: {e}")))?;
        Ok(())
    }
}

/// A secret from a file (trimmed) or else an environment variable.
fn read_secret(file: Option<&Path>, env: &str, key: &'static str) -> Result<Option<SecretString>, ConfigError> {
    if let Some(path) = file {
        let raw = std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
            key,
            path: path.to_owned(),
            source,
        })?;
        return Ok(Some(SecretString::from(raw.trim().to_owned())));
    }
    Ok(std::env::var(env).ok().map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).map(SecretString::from))
}

impl DatabaseConfig {
    /// The database URL: Postgres when configured, else the SQLite file.
    pub fn url(&self) -> Result<SecretString, ConfigError> {
        if let Some(url) = read_secret(self.url_file.as_deref(), &self.url_env, "database.url_file")? {
            return Ok(url);
        }
        if let Some(parent) = self.sqlite_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| ConfigError::SecretFile {
                key: "database.sqlite_path",
                path: parent.to_owned(),
                source,
            })?;
        }
        Ok(SecretString::from(format!("sqlite://{}?mode=rwc", self.sqlite_path.display())))
    }
}

impl AuthConfig {
    pub fn hash_secret(&self) -> Result<Option<SecretString>, ConfigError> {
        read_secret(self.hash_secret_file.as_deref(), &self.hash_secret_env, "auth.hash_secret_file")
    }
}

impl AdminConfig {
    pub fn bootstrap_token(&self) -> Result<Option<SecretString>, ConfigError> {
        read_secret(self.bootstrap_token_file.as_deref(), &self.bootstrap_token_env, "admin.bootstrap_token_file")
    }
}

impl UpstreamConfig {
    /// The upstream key, from `api_key_file` or else `api_key_env`. `None`
    /// when neither is set: requests are then forwarded without a key, which
    /// suits local upstreams that need none.
    pub fn api_key(&self) -> Result<Option<SecretString>, ConfigError> {
        read_secret(self.api_key_file.as_deref(), &self.api_key_env, "upstream.api_key_file")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file layers of `Config::load`, without the environment (which the
    /// test runner's own `TOLLGATE_*` variables would pollute).
    fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::file_exact(path))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn a_config_from_before_the_connection_settings_loads_with_their_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.toml");
        std::fs::write(
            &path,
            "[server]\nlisten = \"127.0.0.1:9000\"\nmax_body_bytes = 1024\nshutdown_grace = \"5s\"\n",
        )
        .unwrap();
        let server = from_file(&path).unwrap().server;
        assert_eq!(server.max_body_bytes, 1024);
        let defaults = ServerConfig::default();
        assert_eq!(server.header_read_timeout, defaults.header_read_timeout);
        assert_eq!(server.keep_alive_timeout, defaults.keep_alive_timeout);
        assert_eq!(server.body_idle_timeout, defaults.body_idle_timeout);
        assert_eq!(server.body_read_timeout, defaults.body_read_timeout);
        assert_eq!(server.max_connections, defaults.max_connections);
        assert_eq!(server.discard_max_bytes, defaults.discard_max_bytes);
        assert_eq!(server.discard_timeout, defaults.discard_timeout);
    }

    #[test]
    fn an_http2_connection_must_carry_at_least_one_request() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        let extra = "[[upstreams]]\nname = \"backup\"\nbase_url = \"https://backup.example/v1\"\n";
        for text in [
            "[upstream]\nhttp2_streams_per_connection = 0\n".to_owned(),
            format!("{extra}http2_streams_per_connection = 0\n"),
        ] {
            std::fs::write(&path, &text).unwrap();
            let error = from_file(&path).unwrap_err().to_string();
            assert!(error.contains("http2_streams_per_connection"), "{text}: {error}");
        }
        std::fs::write(&path, format!("{extra}http2_streams_per_connection = 250\n")).unwrap();
        let config = from_file(&path).unwrap();
        assert_eq!(config.upstreams[0].http2_streams_per_connection, 250);
        assert_eq!(config.upstream.http2_streams_per_connection, 100, "the default");
    }

    #[test]
    fn the_example_config_states_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/tollgate.example.toml");
        let example = serde_json::to_value(from_file(&path).unwrap().server).unwrap();
        assert_eq!(example, serde_json::to_value(ServerConfig::default()).unwrap());
    }

    #[test]
    fn connection_settings_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tollgate.toml");
        std::fs::write(
            &path,
            "[server]\nheader_read_timeout = \"20s\"\nkeep_alive_timeout = \"15s\"\nbody_idle_timeout = \"1m\"\n\
             max_connections = 500\ndiscard_max_bytes = 0\n",
        )
        .unwrap();
        let server = from_file(&path).unwrap().server;
        assert_eq!(server.header_read_timeout, Duration::from_secs(20));
        assert_eq!(server.keep_alive_timeout, Duration::from_secs(15));
        assert_eq!(server.body_idle_timeout, Duration::from_secs(60));
        assert_eq!(server.max_connections, 500);
        assert_eq!(server.discard_max_bytes, 0);

        for (toml, key) in [
            ("keep_alive_timeout = \"11s\"", "server.keep_alive_timeout"),
            ("max_connections = 0", "server.max_connections"),
            ("body_idle_timeout = \"0s\"", "server.body_idle_timeout"),
        ] {
            std::fs::write(&path, format!("[server]\n{toml}\n")).unwrap();
            let err = from_file(&path).unwrap_err().to_string();
            assert!(err.contains(key), "{toml}: {err}");
        }
    }
}
