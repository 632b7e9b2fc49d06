//! The admin audit log: one row per change, written in the change's own
//! transaction so a change and its audit row exist together or not at all.

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::{AuditEntry, Store, StoreError, StoreResult, from_millis, now_millis};

pub(crate) struct Audit<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub target_type: &'a str,
    pub target_id: &'a str,
    pub details: serde_json::Value,
}

impl Audit<'_> {
    pub(crate) async fn write(self, tx: &mut sqlx::Transaction<'_, sqlx::Any>) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, target_type, target_id, details) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(now_millis())
        .bind(self.actor)
        .bind(self.action)
        .bind(self.target_type)
        .bind(self.target_id)
        .bind(self.details.to_string())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

fn entry(row: &AnyRow) -> StoreResult<AuditEntry> {
    let details: String = row.try_get("details")?;
    Ok(AuditEntry {
        id: row.try_get("id")?,
        at: from_millis(row.try_get("at")?),
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        target_type: row.try_get("target_type")?,
        target_id: row.try_get("target_id")?,
        details: serde_json::from_str(&details).map_err(|e| StoreError::Corrupt(e.to_string()))?,
    })
}

impl Store {
    /// Newest first; `before` is the id of the last entry of the previous page.
    pub async fn list_audit(&self, before: Option<i64>, limit: u32) -> StoreResult<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target_type, target_id, details FROM audit_log \
             WHERE id < $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(before.unwrap_or(i64::MAX))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(entry).collect()
    }
}
