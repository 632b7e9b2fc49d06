//! `Application`: builds everything from a `Config`, binds its own listeners
//! (port 0 in tests) and serves until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use rand::Rng;
use rand::distr::Alphanumeric;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_store::Store;

use crate::accounting::ledger::{LedgerSettings, Writer};
use crate::accounting::pricing::PriceTable;
use crate::accounting::spool::Spool;
use crate::accounting::{Accounting, Ledger, estimate, maintain_ledger};
use crate::admin::{self, AdminState};
use crate::alerts;
use crate::auth::sync::{CacheSync, touch_writer};
use crate::auth::{Authenticator, KeyCache, SecretHasher};
use crate::background::{Background, BackgroundThread};
use crate::budget::BudgetBook;
use crate::clock::Clock;
use crate::config::Config;
use crate::health::Readiness;
use crate::limits::RateLimiter;
use crate::metrics::{self, GaugeSource, Metrics, MetricsState};
use crate::proxy::Proxy;
use crate::router;
use crate::routing::reload::Routes;
use crate::routing::table::Upstreams;
use crate::server::{self, ConnectionLimits, body::BodyLimits};
use crate::shared::Shared;
use crate::telemetry::traces::Tracing;
use crate::tenant_usage::TenantUsageState;
use crate::upstream::Upstream;

pub struct Application {
    public: TcpListener,
    public_router: router::Routes,
    admin: Option<(TcpListener, router::Routes)>,
    readiness: Readiness,
    shutdown_grace: Duration,
    connections: ConnectionLimits,
    /// Discards of unread request bodies (see `server::body`).
    discards: TaskTracker,
    /// Token estimates still finishing records (see `accounting::estimate`).
    estimates: crate::accounting::estimate::Estimates,
    /// Cancelled when the listeners stop accepting.
    stop_accepting: CancellationToken,
    store: Store,
    background: Background,
    stop_background: CancellationToken,
    /// Runs `background` until the application ends (dropped last).
    _background_thread: BackgroundThread,
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        Self::build_with_clock(config, Clock::system()).await
    }

    /// Like `build`, deciding expiry, rate-limit windows and budget periods
    /// by `clock` (tests move an adjustable one instead of sleeping).
    pub async fn build_with_clock(config: Config, clock: Clock) -> anyhow::Result<Self> {
        let store = Store::connect(config.database.url()?.expose_secret(), config.database.max_connections)
            .await
            .map_err(|e| anyhow::anyhow!("cannot open the database: {e}"))?;
        if config.database.migrate_on_start {
            store.migrate().await?;
        }
        let hasher = SecretHasher::new(&hash_secret(&config, &store).await?);

        let cache = Arc::new(KeyCache::default());
        let budgets = Arc::new(BudgetBook::default());
        budgets.load(&store, clock.today()).await.map_err(|e| anyhow::anyhow!("cannot load budgets: {e}"))?;
        let sync = Arc::new(CacheSync::new(store.clone(), cache.clone(), budgets.clone(), clock.clone()));
        sync.refresh_all().await.map_err(|e| anyhow::anyhow!("cannot load keys: {e}"))?;
        let metrics = Arc::new(Metrics::new()?);
        let auth = Arc::new(Authenticator::new(
            cache.clone(),
            hasher.clone(),
            config.auth.failed_attempts_per_minute,
            metrics.clone(),
            clock.clone(),
        ));

        let background_thread =
            BackgroundThread::start().map_err(|e| anyhow::anyhow!("cannot start the background thread: {e}"))?;
        let background = background_thread.background().clone();
        let stop_background = CancellationToken::new();
        background.spawn(sync.clone().refresh_loop(config.auth.refresh_interval, stop_background.clone()));
        background.spawn(sync.clone().listen_loop(stop_background.clone()));
        background.spawn(touch_writer(
            store.clone(),
            auth.touches.clone(),
            config.auth.last_used_flush_interval,
            stop_background.clone(),
        ));

        let bootstrap_digest = config.admin.bootstrap_token()?.map(|t| hasher.digest(t.expose_secret()));
        if bootstrap_digest.is_none() {
            tracing::warn!(
                env = %config.admin.bootstrap_token_env,
                "no bootstrap admin token configured; only admin tokens already issued can use the admin API"
            );
        }
        let opened = |name: &str| metrics.upstream_connections_opened.with_label_values(&[name]);
        let upstream = Arc::new(Upstream::new(&config.upstream, opened("default"))?);
        let mut by_name = std::collections::HashMap::from([("default".to_owned(), upstream.clone())]);
        for extra in &config.upstreams {
            by_name.insert(extra.name.clone(), Arc::new(Upstream::new(extra, opened(&extra.name))?));
        }
        // Key files are reread when they change: a key rotates without a restart.
        let with_key_files = std::iter::once(("default", &config.upstream))
            .chain(config.upstreams.iter().map(|u| (u.name.as_str(), u)))
            .filter(|(_, settings)| settings.api_key_file.is_some());
        for (name, _) in with_key_files {
            if let Some(client) = by_name.get(name) {
                background.spawn(client.clone().watch_keys(config.routing.reload_interval, stop_background.clone()));
            }
        }
        let upstreams = Upstreams::new(by_name);
        let routes = Arc::new(
            Routes::new(&config.routes, config.routing.routes_file.clone(), upstreams, metrics.clone())
                .map_err(|e| anyhow::anyhow!("routes: {e}"))?,
        );
        background.spawn(routes.clone().watch(config.routing.reload_interval, stop_background.clone()));
        let admin_state = AdminState {
            store: store.clone(),
            sync,
            hasher,
            bootstrap_digest,
            budgets: budgets.clone(),
            routes: routes.clone(),
            failures: Arc::new(crate::auth::throttle::FailedAttempts::new(config.auth.failed_attempts_per_minute)),
            clock: clock.clone(),
            console: config.admin.console.clone(),
        };
        let mut admin_router = admin::router(admin_state.clone());
        if config.admin.console.enabled {
            admin_router = admin_router.merge(crate::console::router(admin_state));
        }

        let traces = match config.telemetry.otlp() {
            Some(otlp) => Some(Tracing::start(otlp, &metrics, &background, stop_background.clone())?),
            None => None,
        };
        let accounting = start_accounting(&config, &store, metrics.clone(), &background, &stop_background)?;
        let webhooks = Arc::new(config.alerts.webhooks()?);
        let budget_readings = alerts::BudgetReadings::default();
        background.spawn(alerts::watch_budgets(
            store.clone(),
            config.alerts.check_interval,
            budget_readings.clone(),
            clock.clone(),
            stop_background.clone(),
        ));
        background.spawn(alerts::deliver_alerts(
            store.clone(),
            webhooks,
            config.alerts.delivery_interval,
            config.alerts.retry_base,
            stop_background.clone(),
        ));

        let shared = match config.redis.url()? {
            None => None,
            Some(url) => {
                let shared =
                    Shared::connect(url.expose_secret(), &config.redis.key_prefix, config.redis.lease_requests).await?;
                // Requests wait on the checks one task sends and wake the
                // other with each correction; both talk over the Redis
                // connection that lives on the request runtime. They stay
                // there, tracked with the background tasks.
                background.spawn_here(shared.clone().keep_connecting(stop_background.clone()));
                background.spawn_here(shared.clone().apply_adjustments(stop_background.clone()));
                background.spawn_here(shared.clone().send_checks(stop_background.clone()));
                tracing::info!(replicas = config.redis.replicas, "rate limits and budgets are shared through Redis");
                Some(shared)
            }
        };
        let limiter = Arc::new(RateLimiter::new(shared.clone(), config.redis.replicas, clock.clone()));
        background.spawn(limiter.clone().sweep_loop(stop_background.clone()));
        let gauges = Gauges {
            cache: cache.clone(),
            ledger: accounting.ledger.clone(),
            budget_readings,
            shared: shared.clone(),
            routes: routes.clone(),
            estimates: accounting.estimates.clone(),
        };
        // Prometheus scrapes the admin listener, never the public one.
        let admin_router = admin_router.merge(
            Router::new()
                .route("/metrics", axum::routing::get(metrics::serve))
                .with_state(MetricsState::new(metrics, vec![Box::new(gauges)])),
        );
        let readiness = Readiness::new(accounting.ledger.clone());
        let proxy_estimates = accounting.estimates.clone();
        let proxy = Arc::new(Proxy {
            upstream,
            routes,
            accounting,
            limiter,
            limits: config.limits.clone(),
            budgets,
            shared,
            max_body_bytes: config.server.max_body_bytes,
            max_response_bytes: config.upstream.max_response_bytes,
            clock,
        });
        let public = bind(config.server.listen).await?;
        let (admin, merged_admin) = match (config.admin.share_public_listener, config.admin.listen) {
            (false, Some(addr)) => {
                (Some((bind(addr).await?, router::build_admin(admin_router, readiness.clone()))), None)
            }
            _ => {
                tracing::warn!(
                    public = %config.server.listen,
                    "admin.share_public_listener is on: the admin API and /metrics are served on the PUBLIC \
                     listener, where anyone who reaches it can try admin tokens and read every tenant's metrics"
                );
                (None, Some(admin_router))
            }
        };
        let usage = Arc::new(TenantUsageState { store: store.clone() });
        let public_router = router::build(proxy, readiness.clone(), auth, usage, merged_admin, traces);
        let discards = TaskTracker::new();
        let stop_accepting = CancellationToken::new();
        let bodies = Arc::new(BodyLimits::new(&config.server, discards.clone(), stop_accepting.clone()));
        warn_if_over_file_limit(config.server.max_connections, admin.is_some());
        Ok(Self {
            public,
            public_router,
            admin,
            readiness,
            shutdown_grace: config.server.shutdown_grace,
            connections: ConnectionLimits::new(&config.server, bodies),
            discards,
            estimates: proxy_estimates,
            stop_accepting,
            store,
            background,
            stop_background,
            _background_thread: background_thread,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        local_addr(&self.public)
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// The admin listener's address, or `None` when the admin API shares the
    /// public listener.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(l, _)| local_addr(l))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight
    /// requests and streams finish for up to `server.shutdown_grace`, stops
    /// the background tasks (flushing what they hold) and returns.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let stop_accepting = self.stop_accepting;
        let mut servers = tokio::task::JoinSet::new();
        for (name, listener, router) in
            std::iter::once(("public", self.public, self.public_router)).chain(self.admin.map(|(l, r)| ("admin", l, r)))
        {
            let addr = local_addr(&listener);
            tracing::info!(%addr, listener = name, "listening");
            let serving = server::serve(name, listener, router, self.connections.clone(), stop_accepting.clone());
            // Scrapes and admin calls run beside the background work, not on
            // the request workers.
            if name == "admin" {
                servers.spawn_on(serving, self.background.runtime());
            } else {
                servers.spawn(serving);
            }
        }
        self.readiness.set(true);

        let mut failed = None;
        tokio::select! {
            Some(result) = servers.join_next() => {
                failed = Some(anyhow::anyhow!("a listener stopped unexpectedly: {result:?}"));
            }
            () = shutdown => {}
        }

        self.readiness.set(false);
        stop_accepting.cancel();
        let drained =
            tokio::time::timeout(self.shutdown_grace, async { while servers.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(grace = ?self.shutdown_grace, "shutdown grace period over; closing the connections still open");
            servers.abort_all();
            while servers.join_next().await.is_some() {}
        }
        // Discards end with their connections (or at `stop_accepting`), so
        // this wait is short.
        self.discards.close();
        self.discards.wait().await;
        // Records waiting on a token estimate go to the ledger before its
        // writer is told to stop.
        self.estimates.wait().await;
        self.stop_background.cancel();
        self.background.close();
        self.background.wait().await;
        self.store.close().await;
        tracing::info!("stopped");
        failed.map_or(Ok(()), Err)
    }
}

/// Prices, the ledger writer, pricing reloads and ledger maintenance.
fn start_accounting(
    config: &Config,
    store: &Store,
    metrics: Arc<Metrics>,
    background: &Background,
    cancel: &CancellationToken,
) -> anyhow::Result<Arc<Accounting>> {
    let settings = &config.accounting;
    let prices = PriceTable::load(settings.pricing_file.as_deref())?;
    let spool = Spool::open(&settings.spool_dir, settings.max_spool_bytes)
        .map_err(|e| anyhow::anyhow!("cannot open the usage spool {}: {e}", settings.spool_dir.display()))?;
    let (ledger, records) = Ledger::new(Arc::new(spool));
    let writer = Writer::new(
        &ledger,
        store.clone(),
        LedgerSettings {
            batch_size: settings.batch_size,
            flush_interval: settings.flush_interval,
            write_timeout: settings.write_timeout,
            retry_interval: Duration::from_secs(1),
        },
    );
    let accounting =
        Arc::new(Accounting::new(prices, settings.pricing_file.clone(), settings.reject_unpriced, ledger, metrics));
    // Background tasks are cancelled only after the listeners have drained,
    // so the writer sees every record the finished requests produced.
    background.spawn(writer.run(records, cancel.clone()));
    background.spawn(accounting.clone().watch_prices(settings.pricing_reload_interval, cancel.clone()));
    background.spawn(maintain_ledger(store.clone(), settings.retention_days, cancel.clone()));
    // The tokenizer takes about 10 MB once built (briefly 45 MB while it is
    // built) and is only needed when an upstream omits usage, so by default
    // it is built at the first estimate.
    if settings.preload_tokenizer {
        background.spawn_blocking(estimate::warm_up);
    }
    Ok(accounting)
}

/// Open connections beyond the process's file descriptor limit fail to be
/// accepted instead of waiting at `server.max_connections`; say so at start-up
/// rather than in the middle of a flood. (Linux only: read from /proc.)
fn warn_if_over_file_limit(max_connections: usize, two_listeners: bool) {
    let Ok(limits) = std::fs::read_to_string("/proc/self/limits") else {
        return;
    };
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    let listeners = if two_listeners { 2 } else { 1 };
    if let Some(soft) = soft
        && max_connections.saturating_mul(listeners) > soft
    {
        tracing::warn!(
            max_connections,
            listeners,
            open_files_limit = soft,
            "server.max_connections per listener is above the open files limit: at that limit new connections \
             cannot be accepted; raise the limit (e.g. LimitNOFILE) or lower server.max_connections"
        );
    }
}

/// Connections the kernel completes and queues for `accept`. `TcpListener::bind`
/// uses 128, which a burst of new connections overflows, or one arriving
/// while the listener is at `server.max_connections`; past it the kernel
/// drops handshakes, and with SYN cookies some clients get a reset instead
/// of a wait. (The kernel caps it at `net.core.somaxconn`.)
const LISTEN_BACKLOG: u32 = 1024;

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        // As `TcpListener::bind` does: a restarted gateway can bind at once
        // while the previous one's connections linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    // A bound TCP listener always has a local address.
    listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The key hashing secret: from the configuration, else generated once and
/// kept in the database so every replica shares it.
async fn hash_secret(config: &Config, store: &Store) -> anyhow::Result<SecretString> {
    if let Some(secret) = config.auth.hash_secret()? {
        return Ok(secret);
    }
    let candidate: String = rand::rng().sample_iter(Alphanumeric).take(64).map(char::from).collect();
    let stored = store.setting_or_insert("key_hash_secret", &candidate).await?;
    Ok(SecretString::from(stored))
}

/// The gauges that mirror component state, read at scrape time.
struct Gauges {
    cache: Arc<KeyCache>,
    ledger: Ledger,
    /// From the ledger, so every replica reports the fleet's spend.
    budget_readings: alerts::BudgetReadings,
    shared: Option<Arc<Shared>>,
    routes: Arc<Routes>,
    estimates: estimate::Estimates,
}

impl GaugeSource for Gauges {
    fn refresh(&self, m: &Metrics) {
        let set_aside: u64 = self.routes.upstreams().iter().map(|(_, u)| u.keys_set_aside()).sum();
        let seen = m.upstream_keys_set_aside.get();
        m.upstream_keys_set_aside.inc_by(set_aside.saturating_sub(seen));
        m.breakers_open.set(
            i64::try_from(self.routes.current().breakers_not_closed(crate::proxy::forward::monotonic_ms()))
                .unwrap_or(0),
        );
        m.key_cache_size.set(i64::try_from(self.cache.key_count()).unwrap_or(i64::MAX));
        m.ledger_queue_depth.set(i64::try_from(self.ledger.queue_depth()).unwrap_or(i64::MAX));
        m.estimates_pending.set(i64::try_from(self.estimates.pending()).unwrap_or(i64::MAX));
        m.spool_bytes.set(i64::try_from(self.ledger.spool().bytes()).unwrap_or(i64::MAX));
        // Counters kept by the components are mirrored: the metric catches up
        // to the component's own count at each scrape.
        if let Some(shared) = &self.shared {
            let seen = m.redis_fallbacks.get();
            m.redis_fallbacks.inc_by(shared.fallbacks().saturating_sub(seen));
            let seen = m.shared_corrections_dropped.get();
            m.shared_corrections_dropped.inc_by(shared.corrections_dropped().saturating_sub(seen));
            m.shared_corrections_waiting.set(i64::try_from(shared.corrections_waiting()).unwrap_or(i64::MAX));
            let seen = m.shared_lease_admissions.get();
            m.shared_lease_admissions.inc_by(shared.lease_admissions().saturating_sub(seen));
            let calls = shared.script_calls();
            for (carrying, count) in [("checks", calls.checks), ("corrections", calls.corrections)] {
                let counter = m.shared_script_calls.with_label_values(&[carrying]);
                counter.inc_by(count.saturating_sub(counter.get()));
            }
        }
        let seen = m.log_lines_dropped.get();
        m.log_lines_dropped.inc_by(crate::telemetry::dropped_log_lines().saturating_sub(seen));
        let seen = m.ledger_dead_letters.get();
        m.ledger_dead_letters.inc_by(self.ledger.dead_letters().saturating_sub(seen));
        let seen = m.ledger_write_failures.get();
        m.ledger_write_failures.inc_by(self.ledger.write_failures().saturating_sub(seen));
        // Reset first so deleted budgets disappear from the scrape.
        m.budget_utilisation.reset();
        m.budget_forecast.reset();
        for reading in self.budget_readings.load().iter() {
            let labels = [reading.tenant_id.as_str(), reading.budget_id.as_str()];
            m.budget_utilisation.with_label_values(&labels).set(reading.percent(reading.spent_micros));
            if let Some(forecast) = reading.forecast_micros {
                m.budget_forecast.with_label_values(&labels).set(reading.percent(forecast));
            }
        }
    }
}
