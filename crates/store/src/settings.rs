use sqlx::Row;

use crate::{Store, StoreResult};

impl Store {
    /// Returns the stored value of `name`, storing `candidate` first if there
    /// is none. Every replica gets the same value, whoever stored it.
    pub async fn setting_or_insert(&self, name: &str, candidate: &str) -> StoreResult<String> {
        sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(candidate)
            .execute(&self.pool)
            .await?;
        let row = sqlx::query("SELECT value FROM settings WHERE name = $1").bind(name).fetch_one(&self.pool).await?;
        Ok(row.try_get("value")?)
    }
}
