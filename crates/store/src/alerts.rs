//! The budget alert outbox.

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;
use utoipa::ToSchema;

use crate::{Store, StoreResult, from_millis, now_millis};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BudgetAlert {
    pub id: String,
    pub budget_id: String,
    pub tenant_id: String,
    /// First day of the budget period, `YYYY-MM-DD`.
    pub period_start: String,
    /// `threshold` (spend crossed a percentage) or `forecast` (this month's
    /// run rate would exceed the budget).
    pub kind: String,
    /// Percent of the budget (0 for forecasts).
    pub threshold: i32,
    pub spent_micros: i64,
    pub amount_micros: i64,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub delivered_at: Option<chrono::DateTime<chrono::Utc>>,
    pub attempts: i32,
    pub last_error: Option<String>,
}

const COLUMNS: &str = "id, budget_id, tenant_id, period_start, kind, threshold, spent_micros, amount_micros, \
                       created_at, delivered_at, attempts, last_error";

fn alert(row: &AnyRow) -> StoreResult<BudgetAlert> {
    Ok(BudgetAlert {
        id: row.try_get("id")?,
        budget_id: row.try_get("budget_id")?,
        tenant_id: row.try_get("tenant_id")?,
        period_start: row.try_get("period_start")?,
        kind: row.try_get("kind")?,
        threshold: row.try_get("threshold")?,
        spent_micros: row.try_get("spent_micros")?,
        amount_micros: row.try_get("amount_micros")?,
        created_at: from_millis(row.try_get("created_at")?),
        delivered_at: row.try_get::<Option<i64>, _>("delivered_at")?.map(from_millis),
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
    })
}

impl Store {
    /// Queues an alert unless this budget already fired it this period.
    /// Returns whether it was new.
    pub async fn fire_alert(&self, a: &BudgetAlert) -> StoreResult<bool> {
        let done = sqlx::query(&format!(
            "INSERT INTO budget_alerts ({COLUMNS}, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, 0, NULL, $9) \
             ON CONFLICT (budget_id, period_start, kind, threshold) DO NOTHING"
        ))
        .bind(&a.id)
        .bind(&a.budget_id)
        .bind(&a.tenant_id)
        .bind(&a.period_start)
        .bind(&a.kind)
        .bind(a.threshold)
        .bind(a.spent_micros)
        .bind(a.amount_micros)
        .bind(now_millis())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Claims up to `limit` alerts due for delivery: each claimed alert is
    /// not due again for `lease_ms`, so replicas do not deliver it at once.
    pub async fn claim_due_alerts(&self, limit: u32, lease_ms: i64) -> StoreResult<Vec<BudgetAlert>> {
        let now = now_millis();
        let due = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM budget_alerts WHERE delivered_at IS NULL AND next_attempt_at <= $1 \
             ORDER BY created_at LIMIT $2"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut claimed = Vec::with_capacity(due.len());
        for row in &due {
            let a = alert(row)?;
            let taken = sqlx::query(
                "UPDATE budget_alerts SET next_attempt_at = $1 WHERE id = $2 AND delivered_at IS NULL AND next_attempt_at <= $3",
            )
            .bind(now + lease_ms)
            .bind(&a.id)
            .bind(now)
            .execute(&self.pool)
            .await?;
            if taken.rows_affected() == 1 {
                claimed.push(a);
            }
        }
        Ok(claimed)
    }

    pub async fn mark_alert_delivered(&self, id: &str) -> StoreResult<()> {
        sqlx::query(
            "UPDATE budget_alerts SET delivered_at = $1, attempts = attempts + 1, last_error = NULL WHERE id = $2",
        )
        .bind(now_millis())
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn mark_alert_failed(&self, id: &str, error: &str, retry_at_ms: i64) -> StoreResult<()> {
        sqlx::query(
            "UPDATE budget_alerts SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2 WHERE id = $3",
        )
        .bind(error)
        .bind(retry_at_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Alerts, newest first; `tenant` filters.
    pub async fn list_alerts(&self, tenant: Option<&str>, limit: u32) -> StoreResult<Vec<BudgetAlert>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM budget_alerts WHERE ($1 = '' OR tenant_id = $1) ORDER BY created_at DESC, id DESC LIMIT $2"
        ))
        .bind(tenant.unwrap_or(""))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(alert).collect()
    }
}
