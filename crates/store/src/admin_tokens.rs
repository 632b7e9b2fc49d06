use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::Audit;
use crate::{AdminToken, Change, Store, StoreError, StoreResult, from_millis, now_millis};

const COLUMNS: &str = "id, name, secret_hash, created_at, revoked_at";

fn token(row: &AnyRow) -> StoreResult<AdminToken> {
    Ok(AdminToken {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        secret_hash: row.try_get("secret_hash")?,
        created_at: from_millis(row.try_get("created_at")?),
        revoked_at: row.try_get::<Option<i64>, _>("revoked_at")?.map(from_millis),
    })
}

impl Store {
    pub async fn create_admin_token(
        &self,
        id: &str,
        name: &str,
        secret_hash: &str,
        actor: &str,
    ) -> StoreResult<AdminToken> {
        let mut tx = self.begin_write().await?;
        sqlx::query("INSERT INTO admin_tokens (id, name, secret_hash, created_at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(name)
            .bind(secret_hash)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?;
        Audit {
            actor,
            action: "admin_token.create",
            target_type: "admin_token",
            target_id: id,
            details: json!({"name": name}),
        }
        .write(&mut tx)
        .await?;
        self.notify(&mut tx, &Change::AdminToken(id.to_owned())).await?;
        tx.commit().await?;
        self.get_admin_token(id).await
    }

    pub async fn get_admin_token(&self, id: &str) -> StoreResult<AdminToken> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM admin_tokens WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        token(&row)
    }

    pub async fn list_admin_tokens(&self) -> StoreResult<Vec<AdminToken>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM admin_tokens ORDER BY created_at, id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(token).collect()
    }

    pub async fn revoke_admin_token(&self, id: &str, actor: &str) -> StoreResult<AdminToken> {
        self.get_admin_token(id).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query("UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now_millis())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        Audit { actor, action: "admin_token.revoke", target_type: "admin_token", target_id: id, details: json!({}) }
            .write(&mut tx)
            .await?;
        self.notify(&mut tx, &Change::AdminToken(id.to_owned())).await?;
        tx.commit().await?;
        self.get_admin_token(id).await
    }
}
