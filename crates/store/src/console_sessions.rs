//! Sessions of the admin console. The browser holds a random secret in a
//! cookie; only its keyed hash is stored here, so a copy of the database
//! opens no session.

use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::audit::Audit;
use crate::{Store, StoreError, StoreResult, from_millis, now_millis};

/// One console session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSession {
    /// The keyed hash of the cookie's secret.
    pub id: String,
    /// Who signed in, as the audit log names them (`bootstrap`,
    /// `admin_token:<id>`).
    pub actor: String,
    /// The admin token signed in with; its revocation ends the session.
    pub admin_token_id: Option<String>,
    /// The keyed hash of the credential signed in with.
    pub credential: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    pub ended_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What the audit log shows of a session: a prefix of its hashed id.
fn audit_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn session(row: &AnyRow) -> StoreResult<ConsoleSession> {
    Ok(ConsoleSession {
        id: row.try_get("id")?,
        actor: row.try_get("actor")?,
        admin_token_id: row.try_get("admin_token_id")?,
        credential: row.try_get("credential")?,
        created_at: from_millis(row.try_get("created_at")?),
        expires_at: from_millis(row.try_get("expires_at")?),
        ended_at: row.try_get::<Option<i64>, _>("ended_at")?.map(from_millis),
    })
}

const COLUMNS: &str = "id, actor, admin_token_id, credential, created_at, expires_at, ended_at";

impl Store {
    /// Opens a session (audited as `console.sign_in`) and forgets sessions
    /// that ended or expired more than a day ago.
    pub async fn create_console_session(&self, new: &ConsoleSession) -> StoreResult<()> {
        let now = now_millis();
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM console_sessions WHERE expires_at < $1 OR ended_at < $1")
            .bind(now - 86_400_000)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO console_sessions (id, actor, admin_token_id, credential, created_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&new.id)
        .bind(&new.actor)
        .bind(new.admin_token_id.as_deref())
        .bind(&new.credential)
        .bind(new.created_at.timestamp_millis())
        .bind(new.expires_at.timestamp_millis())
        .execute(&mut *tx)
        .await?;
        Audit {
            actor: &new.actor,
            action: "console.sign_in",
            target_type: "console_session",
            target_id: audit_id(&new.id),
            details: json!({"expires_at": new.expires_at}),
        }
        .write(&mut tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get_console_session(&self, id: &str) -> StoreResult<ConsoleSession> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM console_sessions WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        session(&row)
    }

    /// Ends a session (audited as `console.sign_out`); ending it twice
    /// keeps the first time.
    pub async fn end_console_session(&self, id: &str, actor: &str) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("UPDATE console_sessions SET ended_at = $1 WHERE id = $2 AND ended_at IS NULL")
            .bind(now_millis())
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() > 0 {
            Audit {
                actor,
                action: "console.sign_out",
                target_type: "console_session",
                target_id: audit_id(id),
                details: json!({}),
            }
            .write(&mut tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
