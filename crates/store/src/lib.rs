//! Tollgate's durable state behind one interface, [`Store`], on two backends:
//! Postgres (production, several replicas) and a SQLite file (the embedded
//! single-node default).
//!
//! Both backends share one query layer through sqlx's `Any` driver: the
//! schemas keep to portable types (TEXT, BIGINT milliseconds), and each
//! backend has its own migrations under `migrations/`. Every change made
//! through the store writes its audit row in the same transaction and, on
//! Postgres, a `NOTIFY` so other replicas refresh their caches at commit.

mod admin_tokens;
pub mod alerts;
mod audit;
pub mod budgets;
mod console_sessions;
mod keys;
pub mod model;
mod settings;
pub mod tenants;
mod time;
pub mod usage;
mod usage_copy;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

pub use alerts::BudgetAlert;
pub use budgets::{Budget, Period};
pub use console_sessions::ConsoleSession;
pub use model::*;
pub use tenants::TenantSearch;
pub use time::{from_millis, now_millis, to_millis};
pub use usage::{GroupBy, UsageEvent, UsageFilter, UsageTotals};

/// The Postgres channel that carries cache invalidations.
pub const CHANGES_CHANNEL: &str = "tollgate_changes";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Conflict(String),
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl StoreError {
    /// Whether the database itself answered with this error (a constraint,
    /// a value it cannot store), as opposed to not answering at all.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Database(sqlx::Error::Database(_)))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A change other replicas must apply to their caches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Tenant(String),
    Key(String),
    AdminToken(String),
    /// The budgets of a tenant changed.
    Budget(String),
}

impl Change {
    pub fn to_payload(&self) -> String {
        match self {
            Self::Tenant(id) => format!("tenant:{id}"),
            Self::Key(id) => format!("key:{id}"),
            Self::AdminToken(id) => format!("admin_token:{id}"),
            Self::Budget(tenant) => format!("budget:{tenant}"),
        }
    }

    pub fn from_payload(payload: &str) -> Option<Self> {
        let (kind, id) = payload.split_once(':')?;
        let id = id.to_owned();
        match kind {
            "tenant" => Some(Self::Tenant(id)),
            "key" => Some(Self::Key(id)),
            "admin_token" => Some(Self::AdminToken(id)),
            "budget" => Some(Self::Budget(id)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// Postgres only: a native pool for what the `Any` driver cannot do
    /// (`COPY` of ledger batches). Connects on first use.
    copy_pool: Option<sqlx::PgPool>,
    backend: Backend,
    url: String,
}

impl Store {
    /// Connects to `postgres://…` or `sqlite://…` (the file is created if
    /// missing).
    pub async fn connect(url: &str, max_connections: u32) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else {
            return Err(StoreError::Conflict("the database URL must start with postgres:// or sqlite:".into()));
        };
        let options = AnyConnectOptions::from_str(url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers work while the writer commits.
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let copy_pool = match backend {
            // The ledger writes one batch at a time (two while a replay runs).
            Backend::Postgres => Some(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_lazy(url)?,
            ),
            Backend::Sqlite => None,
        };
        Ok(Self { pool, backend, copy_pool, url: url.to_owned() })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A transaction that will write. SQLite starts it with the write lock
    /// (`BEGIN IMMEDIATE`): a deferred transaction that reads, then writes,
    /// fails at once with "database is locked" when another write committed
    /// after its read (`busy_timeout` cannot wait for that), whereas waiting
    /// for the lock up front is covered by `busy_timeout`.
    pub(crate) async fn begin_write(&self) -> StoreResult<sqlx::Transaction<'static, sqlx::Any>> {
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(tx)
    }

    /// The URL this store was opened with (it may hold a password: never log it).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub async fn migrate(&self) -> StoreResult<()> {
        match self.backend {
            Backend::Postgres => sqlx::migrate!("../../migrations/postgres").run(&self.pool).await?,
            Backend::Sqlite => sqlx::migrate!("../../migrations/sqlite").run(&self.pool).await?,
        }
        Ok(())
    }

    /// A cheap round trip, for readiness checks.
    pub async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
        if let Some(pool) = &self.copy_pool {
            pool.close().await;
        }
    }

    /// Queues a change notification inside `tx`; Postgres delivers it at
    /// commit, so no replica ever reloads state that is not committed yet.
    pub(crate) async fn notify(&self, tx: &mut sqlx::Transaction<'_, sqlx::Any>, change: &Change) -> StoreResult<()> {
        if self.backend == Backend::Postgres {
            // Selecting a value (rather than pg_notify's `void`) keeps the
            // result decodable by the Any driver.
            sqlx::query("SELECT 1 AS queued FROM (SELECT pg_notify($1, $2)) AS n")
                .bind(CHANGES_CHANNEL)
                .bind(change.to_payload())
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

/// Whether an error is a unique-constraint violation on either backend.
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| c == "23505" || c == "2067" || c == "1555") || db.message().contains("UNIQUE")
        }
        _ => false,
    }
}

#[cfg(feature = "testing")]
pub mod testing;
