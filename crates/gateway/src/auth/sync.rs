//! Keeping every replica's [`KeyCache`] current.
//!
//! - A change made through this replica's admin API is applied at once.
//! - On Postgres, every change also sends a `NOTIFY` at commit; each replica
//!   listens and reloads the changed key or tenant (well under a second).
//! - A periodic full reload is the safety net for missed notifications, and
//!   runs again whenever the listener reconnects.
//!
//! All cache writes go through one mutex and read the database under it,
//! so an older read can never overwrite a newer one (a revoke cannot be
//! undone by a refresh that started before it).

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;
use tollgate_store::{Backend, CHANGES_CHANNEL, Change, Store, StoreError, StoreResult};

use super::cache::KeyCache;
use super::touches::Touches;
use crate::budget::BudgetBook;
use crate::clock::Clock;

/// Revoked or expired keys stay cached this long, so their callers are told
/// why they are refused.
const DEAD_KEY_RETENTION_MS: i64 = 30 * 24 * 3600 * 1000;

#[derive(Debug)]
pub struct CacheSync {
    store: Store,
    cache: Arc<KeyCache>,
    budgets: Arc<BudgetBook>,
    write: tokio::sync::Mutex<()>,
    /// The database's auth fingerprint at the last full reload.
    fingerprint: std::sync::Mutex<Option<String>>,
    /// Which keys count as long dead, and which budget period is current.
    clock: Clock,
}

impl CacheSync {
    pub fn new(store: Store, cache: Arc<KeyCache>, budgets: Arc<BudgetBook>, clock: Clock) -> Self {
        Self {
            store,
            cache,
            budgets,
            write: tokio::sync::Mutex::new(()),
            fingerprint: std::sync::Mutex::default(),
            clock,
        }
    }

    pub async fn refresh_all(&self) -> StoreResult<()> {
        let _guard = self.write.lock().await;
        // Taken before the load: a change made during it shows next time.
        let fingerprint = self.store.auth_fingerprint().await?;
        let tenants = self.store.all_tenants().await?;
        let keys = self.store.keys_alive_since(self.clock.now_ms() - DEAD_KEY_RETENTION_MS).await?;
        self.cache.replace_all(&keys, &tenants);
        self.budgets.reload_definitions(&self.store, self.clock.today()).await?;
        *self.fingerprint.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(fingerprint);
        tracing::debug!(keys = keys.len(), tenants = tenants.len(), "key cache reloaded");
        Ok(())
    }

    /// The periodic safety net: reloads keys and tenants only if the
    /// database's fingerprint moved (a missed notification). Reloading
    /// 100,000 keys every interval for nothing stalled requests.
    pub async fn refresh_if_changed(&self) -> StoreResult<()> {
        let current = self.store.auth_fingerprint().await?;
        let known = self.fingerprint.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if known.as_deref() == Some(current.as_str()) {
            let _guard = self.write.lock().await;
            return self.budgets.reload_definitions(&self.store, self.clock.today()).await;
        }
        self.refresh_all().await
    }

    pub async fn apply(&self, change: &Change) -> StoreResult<()> {
        let _guard = self.write.lock().await;
        match change {
            Change::Key(id) => match self.store.get_key(id).await {
                Ok(key) => self.cache.upsert_key(&key),
                Err(StoreError::NotFound) => self.cache.remove_key(id),
                Err(e) => return Err(e),
            },
            Change::Tenant(id) => match self.store.load_tenant(id).await {
                Ok(tenant) => self.cache.upsert_tenant(&tenant),
                Err(StoreError::NotFound) => {}
                Err(e) => return Err(e),
            },
            Change::Budget(tenant) => {
                self.budgets.reload_tenant(&self.store, tenant, self.clock.today()).await?;
            }
            // Admin tokens are checked against the database on each admin call.
            Change::AdminToken(_) => {}
        }
        Ok(())
    }

    /// Reloads everything every `interval` until cancelled.
    pub async fn refresh_loop(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            if let Err(e) = self.refresh_if_changed().await {
                tracing::warn!(error = %e, "key cache refresh failed; serving the cached keys");
            }
        }
    }

    /// Applies Postgres change notifications until cancelled, reconnecting
    /// (and reloading everything) whenever the connection drops.
    pub async fn listen_loop(self: Arc<Self>, cancel: CancellationToken) {
        if self.store.backend() != Backend::Postgres {
            return;
        }
        let mut backoff = Duration::from_millis(200);
        loop {
            let listener = async {
                let mut listener = PgListener::connect(self.store.url()).await?;
                listener.listen(CHANGES_CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = tokio::select! {
                () = cancel.cancelled() => return,
                result = listener => match result {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for key changes; retrying");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                        continue;
                    }
                },
            };
            backoff = Duration::from_millis(200);
            // Changes made while we were not listening.
            if let Err(e) = self.refresh_all().await {
                tracing::warn!(error = %e, "key cache refresh failed");
            }
            loop {
                let received = tokio::select! {
                    () = cancel.cancelled() => return,
                    received = listener.try_recv() => received,
                };
                match received {
                    Ok(Some(notification)) => {
                        let Some(change) = Change::from_payload(notification.payload()) else { continue };
                        if let Err(e) = self.apply(&change).await {
                            tracing::warn!(error = %e, "cannot apply a key change; a full reload will follow");
                            let _ = self.refresh_all().await;
                        }
                    }
                    // The connection dropped: sqlx reconnects on the next call,
                    // and anything sent meanwhile is lost, so reload.
                    Ok(None) => {
                        if let Err(e) = self.refresh_all().await {
                            tracing::warn!(error = %e, "key cache refresh failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "key change listener failed; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

/// Writes queued `last_used_at` times every `interval`, and once more when
/// cancelled so a shutdown loses none.
pub async fn touch_writer(store: Store, touches: Arc<Touches>, interval: Duration, cancel: CancellationToken) {
    loop {
        let stopping = tokio::select! {
            () = cancel.cancelled() => true,
            () = tokio::time::sleep(interval) => false,
        };
        let ids = touches.take();
        if !ids.is_empty() {
            let mut unique = ids.clone();
            unique.sort_unstable();
            unique.dedup();
            if let Err(e) = store.touch_keys(&unique, chrono::Utc::now()).await {
                tracing::warn!(error = %e, "cannot record key use; will retry");
                touches.restore(ids);
            }
        }
        if stopping {
            return;
        }
    }
}
