use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::Audit;
use crate::{
    ApiKey, Change, KeyPatch, Limits, NewKey, Store, StoreError, StoreResult, from_millis, is_unique_violation,
    now_millis, to_millis,
};

const COLUMNS: &str = "id, tenant_id, name, secret_hash, created_at, updated_at, last_used_at, expires_at, \
                       revoked_at, allowed_models, limits, rotated_from, rotated_to";

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn key(row: &AnyRow) -> StoreResult<ApiKey> {
    let models: String = row.try_get("allowed_models")?;
    let limits: String = row.try_get("limits")?;
    let opt_time =
        |col: &str| -> StoreResult<Option<DateTime<Utc>>> { Ok(row.try_get::<Option<i64>, _>(col)?.map(from_millis)) };
    Ok(ApiKey {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        name: row.try_get("name")?,
        secret_hash: row.try_get("secret_hash")?,
        created_at: from_millis(row.try_get("created_at")?),
        updated_at: from_millis(row.try_get("updated_at")?),
        last_used_at: opt_time("last_used_at")?,
        expires_at: opt_time("expires_at")?,
        revoked_at: opt_time("revoked_at")?,
        allowed_models: serde_json::from_str(&models).map_err(corrupt)?,
        limits: serde_json::from_str::<Limits>(&limits).map_err(corrupt)?,
        rotated_from: row.try_get("rotated_from")?,
        rotated_to: row.try_get("rotated_to")?,
    })
}

fn models_json(models: &[String]) -> String {
    serde_json::Value::from(models.to_vec()).to_string()
}

fn limits_json(limits: &Limits) -> String {
    serde_json::to_string(limits).unwrap_or_else(|_| "{}".to_owned())
}

impl Store {
    async fn insert_key(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        new: &NewKey,
        rotated_from: Option<&str>,
    ) -> StoreResult<()> {
        let tenant_ok = sqlx::query("SELECT id FROM tenants WHERE id = $1 AND status <> 'deleted'")
            .bind(&new.tenant_id)
            .fetch_optional(&mut **tx)
            .await?
            .is_some();
        if !tenant_ok {
            return Err(StoreError::NotFound);
        }
        let now = now_millis();
        let inserted = sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, secret_hash, created_at, updated_at, expires_at, \
             allowed_models, limits, rotated_from) VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9)",
        )
        .bind(&new.id)
        .bind(&new.tenant_id)
        .bind(&new.name)
        .bind(&new.secret_hash)
        .bind(now)
        .bind(new.expires_at.map(to_millis))
        .bind(models_json(&new.allowed_models))
        .bind(limits_json(&new.limits))
        .bind(rotated_from)
        .execute(&mut **tx)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!("key id {} already exists", new.id))),
            other => other.map(|_| ()).map_err(Into::into),
        }
    }

    pub async fn create_key(&self, new: &NewKey, actor: &str) -> StoreResult<ApiKey> {
        let mut tx = self.begin_write().await?;
        self.insert_key(&mut tx, new, None).await?;
        Audit {
            actor,
            action: "key.create",
            target_type: "key",
            target_id: &new.id,
            details: json!({"tenant_id": new.tenant_id, "name": new.name, "expires_at": new.expires_at,
                "allowed_models": new.allowed_models, "limits": new.limits}),
        }
        .write(&mut tx)
        .await?;
        self.notify(&mut tx, &Change::Key(new.id.clone())).await?;
        tx.commit().await?;
        self.get_key(&new.id).await
    }

    pub async fn get_key(&self, id: &str) -> StoreResult<ApiKey> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        key(&row)
    }

    pub async fn list_keys(&self, tenant_id: &str, after: Option<&str>, limit: u32) -> StoreResult<Vec<ApiKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE tenant_id = $1 AND id > $2 ORDER BY id LIMIT $3"
        ))
        .bind(tenant_id)
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key).collect()
    }

    /// Every key that could still authenticate, for filling the auth cache.
    pub async fn all_live_keys(&self) -> StoreResult<Vec<ApiKey>> {
        self.keys_alive_since(now_millis()).await
    }

    /// A value that changes whenever a key or tenant is added, changed or
    /// removed (counts and the sum of their `updated_at`), so a cache can
    /// skip reloading when nothing changed. Cheap next to loading every row.
    pub async fn auth_fingerprint(&self) -> StoreResult<String> {
        let row = sqlx::query(
            "SELECT CAST((SELECT COUNT(*) FROM api_keys) AS TEXT) AS k, \
             CAST((SELECT COALESCE(SUM(updated_at), 0) FROM api_keys) AS TEXT) AS ku, \
             CAST((SELECT COUNT(*) FROM tenants) AS TEXT) AS t, \
             CAST((SELECT COALESCE(SUM(updated_at), 0) FROM tenants) AS TEXT) AS tu",
        )
        .fetch_one(&self.pool)
        .await?;
        let part = |name: &str| row.try_get::<String, _>(name);
        Ok(format!("{}:{}:{}:{}", part("k")?, part("ku")?, part("t")?, part("tu")?))
    }

    /// Keys neither revoked nor expired before `since_ms`: the live ones plus
    /// recently dead ones, so the gateway can say "revoked" or "expired"
    /// rather than "unknown".
    pub async fn keys_alive_since(&self, since_ms: i64) -> StoreResult<Vec<ApiKey>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM api_keys WHERE (revoked_at IS NULL OR revoked_at > $1) \
             AND (expires_at IS NULL OR expires_at > $1)"
        ))
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key).collect()
    }

    pub async fn update_key(&self, id: &str, patch: &KeyPatch, actor: &str) -> StoreResult<ApiKey> {
        let current = self.get_key(id).await?;
        let name = patch.name.clone().unwrap_or(current.name);
        let expires_at = patch.expires_at.unwrap_or(current.expires_at);
        let models = patch.allowed_models.clone().unwrap_or(current.allowed_models);
        let limits = patch.limits.clone().unwrap_or(current.limits);
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "UPDATE api_keys SET name = $1, expires_at = $2, allowed_models = $3, limits = $4, updated_at = $5 \
             WHERE id = $6",
        )
        .bind(&name)
        .bind(expires_at.map(to_millis))
        .bind(models_json(&models))
        .bind(limits_json(&limits))
        .bind(now_millis())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        Audit {
            actor,
            action: "key.update",
            target_type: "key",
            target_id: id,
            details: json!({"name": patch.name, "expires_at": patch.expires_at,
                "allowed_models": patch.allowed_models, "limits": patch.limits}),
        }
        .write(&mut tx)
        .await?;
        self.notify(&mut tx, &Change::Key(id.to_owned())).await?;
        tx.commit().await?;
        self.get_key(id).await
    }

    pub async fn revoke_key(&self, id: &str, actor: &str) -> StoreResult<ApiKey> {
        let current = self.get_key(id).await?;
        if current.revoked_at.is_some() {
            return Ok(current);
        }
        let now = now_millis();
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE api_keys SET revoked_at = $1, updated_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        Audit { actor, action: "key.revoke", target_type: "key", target_id: id, details: json!({}) }
            .write(&mut tx)
            .await?;
        self.notify(&mut tx, &Change::Key(id.to_owned())).await?;
        tx.commit().await?;
        self.get_key(id).await
    }

    /// Issues `new` as the successor of `old_id` (same tenant, name, models
    /// and limits are the caller's to copy) and lets the old key live until
    /// `old_valid_until`, or its own earlier expiry.
    pub async fn rotate_key(
        &self,
        old_id: &str,
        new: &NewKey,
        old_valid_until: DateTime<Utc>,
        actor: &str,
    ) -> StoreResult<(ApiKey, ApiKey)> {
        let old = self.get_key(old_id).await?;
        if old.revoked_at.is_some() {
            return Err(StoreError::Conflict(format!("key {old_id} is revoked and cannot be rotated")));
        }
        if old.rotated_to.is_some() {
            return Err(StoreError::Conflict(format!("key {old_id} has already been rotated")));
        }
        let deadline = match old.expires_at {
            Some(existing) if existing < old_valid_until => existing,
            _ => old_valid_until,
        };
        let mut tx = self.begin_write().await?;
        self.insert_key(&mut tx, new, Some(old_id)).await?;
        let updated = sqlx::query(
            "UPDATE api_keys SET expires_at = $1, rotated_to = $2, updated_at = $3 \
             WHERE id = $4 AND rotated_to IS NULL AND revoked_at IS NULL",
        )
        .bind(to_millis(deadline))
        .bind(&new.id)
        .bind(now_millis())
        .bind(old_id)
        .execute(&mut *tx)
        .await?;
        if updated.rows_affected() != 1 {
            return Err(StoreError::Conflict(format!("key {old_id} changed while being rotated")));
        }
        Audit {
            actor,
            action: "key.rotate",
            target_type: "key",
            target_id: old_id,
            details: json!({"new_key_id": new.id, "old_key_valid_until": deadline}),
        }
        .write(&mut tx)
        .await?;
        self.notify(&mut tx, &Change::Key(old_id.to_owned())).await?;
        self.notify(&mut tx, &Change::Key(new.id.clone())).await?;
        tx.commit().await?;
        Ok((self.get_key(old_id).await?, self.get_key(&new.id).await?))
    }

    /// Records that these keys were used at `at` (batched by the caller).
    pub async fn touch_keys(&self, ids: &[String], at: DateTime<Utc>) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await?;
        for id in ids {
            sqlx::query(
                "UPDATE api_keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)",
            )
            .bind(to_millis(at))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
