//! Many tenants and keys in the database, so the gateway's key cache holds
//! them all: the cost of authentication must not grow with their number.

use tollgate_store::Store;

use crate::stack::{BenchDb, execute};

/// Adds `count` active tenants with one key each. Their hashes match no
/// secret; they only fill the cache. One statement per table, so 100,000
/// take seconds, not minutes.
pub async fn add_filler(db: &BenchDb, count: usize) -> anyhow::Result<()> {
    let store = Store::connect(&db.url, 1).await?;
    let now = chrono::Utc::now().timestamp_millis();
    execute(
        &store,
        &format!(
            "INSERT INTO tenants (id, display_name, status, metadata, created_at, updated_at)
             SELECT 'filler-' || i, 'Filler ' || i, 'active', '{{}}', {now}, {now}
             FROM generate_series(1, {count}) AS i"
        ),
    )
    .await?;
    execute(
        &store,
        &format!(
            "INSERT INTO api_keys (id, tenant_id, name, secret_hash, created_at, updated_at)
             SELECT 'f' || lpad(i::text, 11, '0'), 'filler-' || i, 'filler', md5(i::text) || md5('k' || i), {now}, {now}
             FROM generate_series(1, {count}) AS i"
        ),
    )
    .await?;
    store.close().await;
    Ok(())
}
