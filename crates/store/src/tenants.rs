use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::Audit;
use crate::{
    Change, NewTenant, Store, StoreError, StoreResult, Tenant, TenantPatch, TenantStatus, from_millis,
    is_unique_violation, now_millis,
};

const COLUMNS: &str = "id, display_name, status, metadata, policy, created_at, updated_at";

fn tenant(row: &AnyRow) -> StoreResult<Tenant> {
    let status: String = row.try_get("status")?;
    let metadata: String = row.try_get("metadata")?;
    let policy: String = row.try_get("policy")?;
    Ok(Tenant {
        policy: serde_json::from_str(&policy).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        id: row.try_get("id")?,
        display_name: row.try_get("display_name")?,
        status: TenantStatus::parse(&status).ok_or_else(|| StoreError::Corrupt(format!("tenant status {status}")))?,
        metadata: serde_json::from_str(&metadata).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        created_at: from_millis(row.try_get("created_at")?),
        updated_at: from_millis(row.try_get("updated_at")?),
    })
}

/// What narrows a tenant listing; every field is optional.
#[derive(Debug, Clone, Default)]
pub struct TenantSearch {
    /// Part of the id or display name, any case.
    pub text: Option<String>,
    pub status: Option<TenantStatus>,
}

/// `text` anywhere in a lowercased column: LIKE's wildcards in it are
/// matched literally.
fn like_pattern(text: &str) -> String {
    let mut pattern = String::from("%");
    for c in text.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

fn policy_json(policy: &crate::TenantPolicy) -> String {
    serde_json::to_string(policy).unwrap_or_else(|_| "{}".to_owned())
}

impl Store {
    pub async fn create_tenant(&self, new: &NewTenant, actor: &str) -> StoreResult<Tenant> {
        let now = now_millis();
        let mut tx = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO tenants (id, display_name, status, metadata, policy, created_at, updated_at) \
             VALUES ($1, $2, 'active', $3, $5, $4, $4)",
        )
        .bind(&new.id)
        .bind(&new.display_name)
        .bind(new.metadata.to_string())
        .bind(now)
        .bind(policy_json(&new.policy))
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict(format!("tenant {} already exists", new.id)));
            }
            other => other?,
        };
        Audit {
            actor,
            action: "tenant.create",
            target_type: "tenant",
            target_id: &new.id,
            details: json!({"display_name": new.display_name, "metadata": new.metadata, "policy": new.policy}),
        }
        .write(&mut tx)
        .await?;
        self.notify(&mut tx, &Change::Tenant(new.id.clone())).await?;
        tx.commit().await?;
        self.get_tenant(&new.id).await
    }

    /// A tenant, deleted ones included (the cache needs to see deletions).
    pub async fn load_tenant(&self, id: &str) -> StoreResult<Tenant> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM tenants WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        tenant(&row)
    }

    /// A tenant that has not been deleted.
    pub async fn get_tenant(&self, id: &str) -> StoreResult<Tenant> {
        let t = self.load_tenant(id).await?;
        if t.status == TenantStatus::Deleted {
            return Err(StoreError::NotFound);
        }
        Ok(t)
    }

    /// Tenants by id, after `after`, deleted ones excluded.
    /// One page of tenants by id, deleted ones excluded, narrowed by
    /// `search`.
    pub async fn list_tenants(
        &self,
        after: Option<&str>,
        limit: u32,
        search: &TenantSearch,
    ) -> StoreResult<Vec<Tenant>> {
        let pattern = search.text.as_deref().map(like_pattern).unwrap_or_default();
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM tenants WHERE id > $1 AND status <> 'deleted' \
             AND ($3 = '' OR LOWER(id) LIKE $3 ESCAPE '\\' OR LOWER(display_name) LIKE $3 ESCAPE '\\') \
             AND ($4 = '' OR status = $4) ORDER BY id LIMIT $2"
        ))
        .bind(after.unwrap_or(""))
        .bind(i64::from(limit))
        .bind(pattern)
        .bind(search.status.map(TenantStatus::as_str).unwrap_or(""))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(tenant).collect()
    }

    /// Every tenant, for filling the auth cache.
    pub async fn all_tenants(&self) -> StoreResult<Vec<Tenant>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM tenants")).fetch_all(&self.pool).await?;
        rows.iter().map(tenant).collect()
    }

    pub async fn update_tenant(&self, id: &str, patch: &TenantPatch, actor: &str) -> StoreResult<Tenant> {
        let current = self.get_tenant(id).await?;
        let display_name = patch.display_name.clone().unwrap_or(current.display_name);
        let metadata = patch.metadata.clone().unwrap_or(current.metadata);
        let policy = patch.policy.clone().unwrap_or(current.policy);
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE tenants SET display_name = $1, metadata = $2, policy = $5, updated_at = $3 WHERE id = $4")
            .bind(&display_name)
            .bind(metadata.to_string())
            .bind(now_millis())
            .bind(id)
            .bind(policy_json(&policy))
            .execute(&mut *tx)
            .await?;
        Audit {
            actor,
            action: "tenant.update",
            target_type: "tenant",
            target_id: id,
            details: json!({"display_name": patch.display_name, "metadata": patch.metadata, "policy": patch.policy}),
        }
        .write(&mut tx)
        .await?;
        self.notify(&mut tx, &Change::Tenant(id.to_owned())).await?;
        tx.commit().await?;
        self.get_tenant(id).await
    }

    /// Suspends or resumes a tenant.
    pub async fn set_tenant_status(&self, id: &str, status: TenantStatus, actor: &str) -> StoreResult<Tenant> {
        let action = match status {
            TenantStatus::Active => "tenant.resume",
            TenantStatus::Suspended => "tenant.suspend",
            TenantStatus::Deleted => return self.delete_tenant(id, actor).await,
        };
        self.get_tenant(id).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE tenants SET status = $1, updated_at = $2 WHERE id = $3 AND status <> 'deleted'")
            .bind(status.as_str())
            .bind(now_millis())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        Audit { actor, action, target_type: "tenant", target_id: id, details: json!({}) }.write(&mut tx).await?;
        self.notify(&mut tx, &Change::Tenant(id.to_owned())).await?;
        tx.commit().await?;
        self.get_tenant(id).await
    }

    /// Marks the tenant deleted and revokes every key it has. The row stays,
    /// so usage history keeps its tenant.
    pub async fn delete_tenant(&self, id: &str, actor: &str) -> StoreResult<Tenant> {
        self.get_tenant(id).await?;
        let now = now_millis();
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE tenants SET status = 'deleted', updated_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let revoked: Vec<String> = sqlx::query(
            "UPDATE api_keys SET revoked_at = $1, updated_at = $1 WHERE tenant_id = $2 AND revoked_at IS NULL RETURNING id",
        )
        .bind(now)
        .bind(id)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()?;
        Audit {
            actor,
            action: "tenant.delete",
            target_type: "tenant",
            target_id: id,
            details: json!({"revoked_keys": revoked}),
        }
        .write(&mut tx)
        .await?;
        self.notify(&mut tx, &Change::Tenant(id.to_owned())).await?;
        for key in &revoked {
            self.notify(&mut tx, &Change::Key(key.clone())).await?;
        }
        tx.commit().await?;
        self.load_tenant(id).await
    }
}
