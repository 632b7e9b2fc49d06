//! The in-memory view of keys and tenants that authentication reads.
//!
//! Readers load an immutable snapshot through `ArcSwap` (no lock, no
//! database); writers build a new snapshot and swap it in. Writes are rare
//! (admin changes, periodic refresh), reads happen on every request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arc_swap::ArcSwap;
use tollgate_store::{ApiKey, Limits, Tenant, TenantPolicy, TenantStatus};

use super::hasher::{Digest, digest_from_hex};
use super::models::ModelRules;

#[derive(Debug)]
pub struct CachedKey {
    pub id: String,
    pub tenant_id: String,
    pub digest: Digest,
    pub expires_at_ms: Option<i64>,
    pub revoked: bool,
    pub models: ModelRules,
    pub limits: Limits,
    /// Seconds of the last time this key's use was queued for recording.
    pub(crate) last_touch_s: AtomicI64,
}

impl CachedKey {
    fn from_record(key: &ApiKey) -> Option<Self> {
        Some(Self {
            id: key.id.clone(),
            tenant_id: key.tenant_id.clone(),
            digest: digest_from_hex(&key.secret_hash)?,
            expires_at_ms: key.expires_at.map(|t| t.timestamp_millis()),
            revoked: key.revoked_at.is_some(),
            models: ModelRules::new(&key.allowed_models),
            limits: key.limits.clone(),
            last_touch_s: AtomicI64::new(0),
        })
    }
}

#[derive(Debug, Clone)]
pub struct CachedTenant {
    pub id: String,
    pub status: TenantStatus,
    pub policy: TenantPolicy,
}

impl CachedTenant {
    fn from_record(t: &Tenant) -> Self {
        Self { id: t.id.clone(), status: t.status, policy: t.policy.clone() }
    }
}

#[derive(Debug, Default)]
struct Snapshot {
    keys: HashMap<String, Arc<CachedKey>>,
    tenants: HashMap<String, Arc<CachedTenant>>,
}

#[derive(Debug, Default)]
pub struct KeyCache {
    snapshot: ArcSwap<Snapshot>,
}

impl KeyCache {
    pub fn key(&self, id: &str) -> Option<Arc<CachedKey>> {
        self.snapshot.load().keys.get(id).cloned()
    }

    pub fn tenant(&self, id: &str) -> Option<Arc<CachedTenant>> {
        self.snapshot.load().tenants.get(id).cloned()
    }

    pub fn key_count(&self) -> usize {
        self.snapshot.load().keys.len()
    }

    /// Replaces everything (start-up and periodic refresh).
    pub fn replace_all(&self, keys: &[ApiKey], tenants: &[Tenant]) {
        let keys = keys.iter().filter_map(|k| CachedKey::from_record(k).map(|c| (k.id.clone(), Arc::new(c)))).collect();
        let tenants = tenants.iter().map(|t| (t.id.clone(), Arc::new(CachedTenant::from_record(t)))).collect();
        self.snapshot.store(Arc::new(Snapshot { keys, tenants }));
    }

    pub fn upsert_key(&self, key: &ApiKey) {
        let Some(cached) = CachedKey::from_record(key).map(Arc::new) else { return };
        self.snapshot.rcu(|old| {
            let mut keys = old.keys.clone();
            keys.insert(cached.id.clone(), cached.clone());
            Snapshot { keys, tenants: old.tenants.clone() }
        });
    }

    pub fn remove_key(&self, id: &str) {
        self.snapshot.rcu(|old| {
            let mut keys = old.keys.clone();
            keys.remove(id);
            Snapshot { keys, tenants: old.tenants.clone() }
        });
    }

    pub fn upsert_tenant(&self, tenant: &Tenant) {
        let cached = Arc::new(CachedTenant::from_record(tenant));
        self.snapshot.rcu(|old| {
            let mut tenants = old.tenants.clone();
            tenants.insert(cached.id.clone(), cached.clone());
            Snapshot { keys: old.keys.clone(), tenants }
        });
    }
}

impl CachedKey {
    /// Whether this key's use should be queued for the `last_used_at`
    /// writer: at most once a minute per key, decided without a lock.
    pub(crate) fn should_touch(&self, now_s: i64) -> bool {
        let last = self.last_touch_s.load(Ordering::Relaxed);
        now_s - last >= 60
            && self.last_touch_s.compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}
