//! The in-memory view of keys and tenants that authentication reads.
//!
//! Readers load an immutable snapshot through `ArcSwap` (no lock, no
//! database); writers build a new snapshot and swap it in. Writes are rare
//! (admin changes, periodic refresh), reads happen on every request.

use crate::fast_hash::FastMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tollgate_store::{ApiKey, Limits, Tenant, TenantPolicy, TenantStatus};

use super::hasher::{Digest, SecretHasher, digest_from_hex};
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
    /// The rate limits' scopes, `t:<tenant id>` and `k:<key id>`, made
    /// once here rather than for every request.
    pub limit_scopes: LimitScopes,
    /// Seconds of the last time this key's use was queued for recording.
    pub(crate) last_touch_s: AtomicI64,
    /// The secret, once a request has presented one whose keyed hash
    /// matched `digest`. Later requests compare against it in constant time
    /// instead of computing the HMAC again (two SHA-256 compressions per
    /// request otherwise). It lives and dies with this entry: any change to
    /// the key (revocation, expiry, rotation) or a refresh builds a new
    /// entry that starts without it.
    verified_secret: OnceLock<SecretString>,
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
            limit_scopes: LimitScopes::new(&key.tenant_id, &key.id),
            last_touch_s: AtomicI64::new(0),
            verified_secret: OnceLock::new(),
        })
    }
}

/// The names a key's and its tenant's rate-limit counters start with.
#[derive(Debug, Clone)]
pub struct LimitScopes {
    pub tenant: Arc<str>,
    pub key: Arc<str>,
}

impl LimitScopes {
    pub fn new(tenant_id: &str, key_id: &str) -> Self {
        Self { tenant: ["t:", tenant_id].concat().into(), key: ["k:", key_id].concat().into() }
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
    keys: FastMap<String, Arc<CachedKey>>,
    tenants: FastMap<String, Arc<CachedTenant>>,
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
    /// Whether `secret` is this key's secret. Constant-time either way: the
    /// remembered secret is compared with `subtle`, a new one is hashed and
    /// its digest compared with `subtle`; only a match is remembered.
    pub(crate) fn verify_secret(&self, hasher: &SecretHasher, secret: &str) -> bool {
        if let Some(known) = self.verified_secret.get() {
            return known.expose_secret().as_bytes().ct_eq(secret.as_bytes()).into();
        }
        let matches = hasher.verify(secret, &self.digest);
        if matches {
            // A concurrent first match may have set it already; same value.
            let _ = self.verified_secret.set(SecretString::from(secret));
        }
        matches
    }

    /// Whether this key's use should be queued for the `last_used_at`
    /// writer: at most once a minute per key, decided without a lock.
    pub(crate) fn should_touch(&self, now_s: i64) -> bool {
        let last = self.last_touch_s.load(Ordering::Relaxed);
        now_s - last >= 60
            && self.last_touch_s.compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(hasher: &SecretHasher, secret: &str) -> ApiKey {
        let now = chrono::Utc::now();
        ApiKey {
            id: "k1".into(),
            tenant_id: "t1".into(),
            name: "k".into(),
            secret_hash: hasher.hash_hex(secret),
            created_at: now,
            updated_at: now,
            last_used_at: None,
            expires_at: None,
            revoked_at: None,
            allowed_models: Vec::new(),
            limits: Limits::default(),
            rotated_from: None,
            rotated_to: None,
        }
    }

    #[test]
    fn a_remembered_secret_matches_only_itself_and_only_until_the_key_changes() {
        let hasher = SecretHasher::new(&SecretString::from("server-secret"));
        let cache = KeyCache::default();
        cache.upsert_key(&record(&hasher, "right"));
        let key = cache.key("k1").unwrap();
        assert!(!key.verify_secret(&hasher, "wrong"), "a wrong secret never matches");
        assert!(key.verified_secret.get().is_none(), "a failed check remembers nothing");
        assert!(key.verify_secret(&hasher, "right"));
        assert!(key.verified_secret.get().is_some(), "a match is remembered");
        assert!(key.verify_secret(&hasher, "right"), "the remembered secret matches itself");
        assert!(!key.verify_secret(&hasher, "righ"), "and not a prefix of itself");
        assert!(!key.verify_secret(&hasher, "right!"), "nor a longer string");
        assert!(!key.verify_secret(&hasher, "wrong"));

        // Rotation: the stored hash changes, the old secret stops working at once.
        cache.upsert_key(&record(&hasher, "rotated"));
        let key = cache.key("k1").unwrap();
        assert!(!key.verify_secret(&hasher, "right"), "a new entry forgets the old secret");
        assert!(key.verify_secret(&hasher, "rotated"));
    }
}
