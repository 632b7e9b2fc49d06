//! Budgets and the spend they are measured against.

use chrono::{Datelike, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;
use utoipa::ToSchema;

use crate::audit::Audit;
use crate::{Change, Store, StoreError, StoreResult, from_millis, now_millis};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    Lifetime,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Daily => "daily",
            Self::Weekly => "weekly",
            Self::Monthly => "monthly",
            Self::Lifetime => "lifetime",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "daily" => Some(Self::Daily),
            "weekly" => Some(Self::Weekly),
            "monthly" => Some(Self::Monthly),
            "lifetime" => Some(Self::Lifetime),
            _ => None,
        }
    }

    /// The first UTC day of the period containing `day` (weeks start on
    /// Monday; lifetime starts at the epoch).
    pub fn start(self, day: NaiveDate) -> NaiveDate {
        match self {
            Self::Daily => day,
            Self::Weekly => day - Duration::days(i64::from(day.weekday().num_days_from_monday())),
            Self::Monthly => day.with_day(1).unwrap_or(day),
            Self::Lifetime => NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or(day),
        }
    }

    /// The first day after the period that starts on `start`.
    pub fn end(self, start: NaiveDate) -> Option<NaiveDate> {
        match self {
            Self::Daily => start.succ_opt(),
            Self::Weekly => Some(start + Duration::days(7)),
            Self::Monthly => start.checked_add_months(chrono::Months::new(1)),
            Self::Lifetime => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Budget {
    pub id: String,
    pub tenant_id: String,
    /// Set for a budget on one key; absent for the whole tenant.
    pub key_id: Option<String>,
    pub period: Period,
    pub amount_micros: i64,
    /// Hard budgets refuse requests that could exceed them; soft ones only alert.
    pub hard: bool,
    /// Alert thresholds in percent of the amount.
    pub thresholds: Vec<u32>,
    pub created_at: chrono::DateTime<Utc>,
    pub updated_at: chrono::DateTime<Utc>,
}

const COLUMNS: &str = "id, tenant_id, key_id, period, amount_micros, hard, thresholds, created_at, updated_at";

fn budget(row: &AnyRow) -> StoreResult<Budget> {
    let period: String = row.try_get("period")?;
    let thresholds: String = row.try_get("thresholds")?;
    Ok(Budget {
        id: row.try_get("id")?,
        tenant_id: row.try_get("tenant_id")?,
        key_id: row.try_get("key_id")?,
        period: Period::parse(&period).ok_or_else(|| StoreError::Corrupt(format!("budget period {period}")))?,
        amount_micros: row.try_get("amount_micros")?,
        hard: row.try_get::<i32, _>("hard")? != 0,
        thresholds: serde_json::from_str(&thresholds).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        created_at: from_millis(row.try_get("created_at")?),
        updated_at: from_millis(row.try_get("updated_at")?),
    })
}

impl Store {
    pub async fn create_budget(&self, b: &Budget, actor: &str) -> StoreResult<Budget> {
        let now = now_millis();
        let mut tx = self.begin_write().await?;
        let tenant_ok = sqlx::query("SELECT id FROM tenants WHERE id = $1 AND status <> 'deleted'")
            .bind(&b.tenant_id)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !tenant_ok {
            return Err(StoreError::NotFound);
        }
        sqlx::query(&format!("INSERT INTO budgets ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)"))
            .bind(&b.id)
            .bind(&b.tenant_id)
            .bind(b.key_id.as_deref())
            .bind(b.period.as_str())
            .bind(b.amount_micros)
            .bind(i32::from(b.hard))
            .bind(json!(b.thresholds).to_string())
            .bind(now)
            .execute(&mut *tx)
            .await?;
        Audit {
            actor,
            action: "budget.create",
            target_type: "budget",
            target_id: &b.id,
            details: json!({"tenant_id": b.tenant_id, "key_id": b.key_id, "period": b.period,
                "amount_micros": b.amount_micros, "hard": b.hard, "thresholds": b.thresholds}),
        }
        .write(&mut tx)
        .await?;
        self.notify(&mut tx, &Change::Budget(b.tenant_id.clone())).await?;
        tx.commit().await?;
        self.get_budget(&b.id).await
    }

    pub async fn get_budget(&self, id: &str) -> StoreResult<Budget> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM budgets WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(StoreError::NotFound)?;
        budget(&row)
    }

    pub async fn list_budgets(&self, tenant_id: &str) -> StoreResult<Vec<Budget>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM budgets WHERE tenant_id = $1 ORDER BY created_at, id"))
            .bind(tenant_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(budget).collect()
    }

    pub async fn all_budgets(&self) -> StoreResult<Vec<Budget>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM budgets")).fetch_all(&self.pool).await?;
        rows.iter().map(budget).collect()
    }

    pub async fn update_budget(&self, b: &Budget, actor: &str) -> StoreResult<Budget> {
        let mut tx = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE budgets SET amount_micros = $1, hard = $2, thresholds = $3, updated_at = $4 WHERE id = $5",
        )
        .bind(b.amount_micros)
        .bind(i32::from(b.hard))
        .bind(json!(b.thresholds).to_string())
        .bind(now_millis())
        .bind(&b.id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Audit {
            actor,
            action: "budget.update",
            target_type: "budget",
            target_id: &b.id,
            details: json!({"amount_micros": b.amount_micros, "hard": b.hard, "thresholds": b.thresholds}),
        }
        .write(&mut tx)
        .await?;
        self.notify(&mut tx, &Change::Budget(b.tenant_id.clone())).await?;
        tx.commit().await?;
        self.get_budget(&b.id).await
    }

    pub async fn delete_budget(&self, id: &str, actor: &str) -> StoreResult<Budget> {
        let b = self.get_budget(id).await?;
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM budgets WHERE id = $1").bind(id).execute(&mut *tx).await?;
        Audit { actor, action: "budget.delete", target_type: "budget", target_id: id, details: json!({}) }
            .write(&mut tx)
            .await?;
        self.notify(&mut tx, &Change::Budget(b.tenant_id.clone())).await?;
        tx.commit().await?;
        Ok(b)
    }

    /// Spend recorded in the ledger's daily rollups from `from_day` on, for
    /// a tenant (and one key, when given).
    pub async fn spend_since(&self, tenant_id: &str, key_id: Option<&str>, from_day: NaiveDate) -> StoreResult<i64> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(cost_micros), 0) AS BIGINT) AS spent FROM usage_daily \
             WHERE tenant_id = $1 AND ($2 = '' OR key_id = $2) AND day >= $3",
        )
        .bind(tenant_id)
        .bind(key_id.unwrap_or(""))
        .bind(from_day.format("%Y-%m-%d").to_string())
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("spent")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_calendar_aligned() {
        let d = NaiveDate::from_ymd_opt(2026, 11, 26).unwrap(); // a Thursday
        assert_eq!(Period::Daily.start(d), d);
        assert_eq!(Period::Weekly.start(d), NaiveDate::from_ymd_opt(2026, 11, 23).unwrap());
        assert_eq!(Period::Monthly.start(d), NaiveDate::from_ymd_opt(2026, 11, 1).unwrap());
        assert_eq!(Period::Monthly.end(Period::Monthly.start(d)), NaiveDate::from_ymd_opt(2026, 12, 1));
        assert_eq!(Period::Lifetime.end(Period::Lifetime.start(d)), None);
    }
}
