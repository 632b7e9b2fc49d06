//! The usage ledger and its daily rollups.

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use sqlx::Row;
use sqlx::any::AnyRow;
use utoipa::ToSchema;

use crate::{Backend, Store, StoreError, StoreResult, from_millis};

/// One proxied request, as recorded. Serialized as-is into the local spool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageEvent {
    /// The gateway's own id for this record (idempotency key).
    pub id: String,
    /// When the request arrived, in milliseconds since the epoch.
    pub at: i64,
    pub request_id: String,
    pub tenant_id: String,
    pub key_id: String,
    /// e.g. `/v1/chat/completions`.
    pub endpoint: String,
    /// The model the client asked for (empty when none was given).
    pub requested_model: String,
    /// The model the upstream says answered.
    pub upstream_model: Option<String>,
    pub stream: bool,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cached_tokens: i64,
    /// Prompt tokens written to the provider's cache (Anthropic).
    #[serde(default)]
    pub cache_write_tokens: i64,
    pub total_tokens: i64,
    /// max(completion, total − prompt): what output is billed on.
    pub billed_output_tokens: i64,
    pub cost_micros: i64,
    /// Token counts were estimated because the upstream reported none.
    pub estimated: bool,
    /// The model had no price: cost is 0.
    pub unpriced: bool,
    /// The gateway changed the request (caps, defaults).
    pub modified: bool,
    /// HTTP status returned to the client.
    pub status: i32,
    /// Set when the request failed: `client`, `upstream` or `gateway`, then a code.
    pub error_class: Option<String>,
    pub latency_ms: i64,
    /// Time to the first streamed event, for streams.
    pub ttft_ms: Option<i64>,
    /// The route that sent the request (its `model`), when one did.
    #[serde(default)]
    pub route: Option<String>,
    /// The route target (variant) that served: `route/group/index`.
    #[serde(default)]
    pub target: Option<String>,
    /// The upstream that served (`default` for `[upstream]`).
    #[serde(default)]
    pub upstream: Option<String>,
    /// Attempts sent upstream for this request (retries and fallbacks).
    #[serde(default = "one_attempt")]
    pub attempts: i32,
    /// The API the request used: `openai`, `gemini` or `anthropic`.
    #[serde(default = "openai")]
    pub api: String,
}

fn openai() -> String {
    "openai".to_owned()
}

fn one_attempt() -> i32 {
    1
}

impl UsageEvent {
    pub fn day(&self) -> String {
        day_of(self.at)
    }

    pub fn is_error(&self) -> bool {
        self.status >= 400 || self.error_class.is_some()
    }
}

/// `YYYY-MM-DD` (UTC) of a millisecond timestamp.
pub fn day_of(at_ms: i64) -> String {
    from_millis(at_ms).format("%Y-%m-%d").to_string()
}

/// The columns of `usage_events` in the order inserts (and the benchmark's `COPY`) name them.
pub const COLUMNS: &str = "id, at, day, request_id, tenant_id, key_id, endpoint, requested_model, upstream_model, stream, \
    prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens, total_tokens, billed_output_tokens, \
    cost_micros, estimated, unpriced, modified, status, error_class, latency_ms, ttft_ms, route, target, upstream, \
    attempts, api, cache_write_tokens";
const NCOLS: usize = 30;

pub(crate) const ROLLUP_UPDATE: &str = "ON CONFLICT (day, tenant_id, key_id, model) DO UPDATE SET \
    requests = usage_daily.requests + excluded.requests, errors = usage_daily.errors + excluded.errors, \
    estimated_requests = usage_daily.estimated_requests + excluded.estimated_requests, \
    prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens, \
    completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens, \
    reasoning_tokens = usage_daily.reasoning_tokens + excluded.reasoning_tokens, \
    cached_tokens = usage_daily.cached_tokens + excluded.cached_tokens, \
    cache_write_tokens = usage_daily.cache_write_tokens + excluded.cache_write_tokens, \
    billed_output_tokens = usage_daily.billed_output_tokens + excluded.billed_output_tokens, \
    cost_micros = usage_daily.cost_micros + excluded.cost_micros";

/// A usage record as one element of the JSON array the Postgres insert
/// unpacks: the column names and types of `usage_events`.
#[derive(Serialize)]
struct JsonRow<'a> {
    id: &'a str,
    at: i64,
    day: String,
    request_id: &'a str,
    tenant_id: &'a str,
    key_id: &'a str,
    endpoint: &'a str,
    requested_model: Cow<'a, str>,
    upstream_model: Option<Cow<'a, str>>,
    stream: i32,
    prompt_tokens: i64,
    completion_tokens: i64,
    reasoning_tokens: i64,
    cached_tokens: i64,
    total_tokens: i64,
    billed_output_tokens: i64,
    cost_micros: i64,
    estimated: i32,
    unpriced: i32,
    modified: i32,
    status: i32,
    error_class: Option<&'a str>,
    latency_ms: i64,
    ttft_ms: Option<i64>,
    route: Option<&'a str>,
    target: Option<&'a str>,
    upstream: Option<&'a str>,
    attempts: i32,
    api: &'a str,
    cache_write_tokens: i64,
}

impl<'a> From<&'a UsageEvent> for JsonRow<'a> {
    fn from(e: &'a UsageEvent) -> Self {
        Self {
            id: &e.id,
            at: e.at,
            day: e.day(),
            request_id: &e.request_id,
            tenant_id: &e.tenant_id,
            key_id: &e.key_id,
            endpoint: &e.endpoint,
            requested_model: storable(&e.requested_model),
            upstream_model: e.upstream_model.as_deref().map(storable),
            stream: i32::from(e.stream),
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            reasoning_tokens: e.reasoning_tokens,
            cached_tokens: e.cached_tokens,
            total_tokens: e.total_tokens,
            billed_output_tokens: e.billed_output_tokens,
            cost_micros: e.cost_micros,
            estimated: i32::from(e.estimated),
            unpriced: i32::from(e.unpriced),
            modified: i32::from(e.modified),
            status: e.status,
            error_class: e.error_class.as_deref(),
            latency_ms: e.latency_ms,
            ttft_ms: e.ttft_ms,
            route: e.route.as_deref(),
            target: e.target.as_deref(),
            upstream: e.upstream.as_deref(),
            attempts: e.attempts,
            api: &e.api,
            cache_write_tokens: e.cache_write_tokens,
        }
    }
}

/// The columns of `usage_events` with their types, as `json_to_recordset`
/// reads them (in [`COLUMNS`] order).
const RECORD_TYPES: &str = "id TEXT, at BIGINT, day TEXT, request_id TEXT, tenant_id TEXT, key_id TEXT, \
    endpoint TEXT, requested_model TEXT, upstream_model TEXT, stream INTEGER, prompt_tokens BIGINT, \
    completion_tokens BIGINT, reasoning_tokens BIGINT, cached_tokens BIGINT, total_tokens BIGINT, \
    billed_output_tokens BIGINT, cost_micros BIGINT, estimated INTEGER, unpriced INTEGER, modified INTEGER, \
    status INTEGER, error_class TEXT, latency_ms BIGINT, ttft_ms BIGINT, route TEXT, target TEXT, upstream TEXT, \
    attempts INTEGER, api TEXT, cache_write_tokens BIGINT";

/// Inserts the records of `$1` (a JSON array of [`JsonRow`]), skipping ids
/// already stored, and adds exactly the inserted ones to the daily rollups.
fn insert_usage_from_json() -> String {
    format!(
        "WITH ins AS (INSERT INTO usage_events ({COLUMNS}) \
         SELECT {COLUMNS} FROM json_to_recordset($1::json) AS r({RECORD_TYPES}) ON CONFLICT DO NOTHING \
         RETURNING day, tenant_id, key_id, requested_model, status, error_class, estimated, prompt_tokens, \
         completion_tokens, reasoning_tokens, cached_tokens, cache_write_tokens, billed_output_tokens, cost_micros), \
         up AS (INSERT INTO usage_daily (day, tenant_id, key_id, model, requests, errors, estimated_requests, \
         prompt_tokens, completion_tokens, reasoning_tokens, cached_tokens, cache_write_tokens, billed_output_tokens, \
         cost_micros) \
         SELECT day, tenant_id, key_id, requested_model, COUNT(*), \
         SUM(CASE WHEN status >= 400 OR error_class IS NOT NULL THEN 1 ELSE 0 END), SUM(estimated), \
         SUM(prompt_tokens), SUM(completion_tokens), SUM(reasoning_tokens), SUM(cached_tokens), \
         SUM(cache_write_tokens), SUM(billed_output_tokens), SUM(cost_micros) FROM ins \
         GROUP BY day, tenant_id, key_id, requested_model \
         ORDER BY day, tenant_id, key_id, requested_model \
         {ROLLUP_UPDATE}) SELECT COUNT(*) AS n FROM ins"
    )
}

/// Text from clients or the upstream as a column can hold it: Postgres text
/// cannot contain NUL (legal in JSON as `\u0000`), and one such record
/// would fail its whole batch again at every replay. NUL becomes U+FFFD,
/// on both backends alike.
pub(crate) fn storable(text: &str) -> Cow<'_, str> {
    if text.contains('\0') { Cow::Owned(text.replace('\0', "\u{fffd}")) } else { Cow::Borrowed(text) }
}

fn bind_event<'q>(
    q: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    e: &'q UsageEvent,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    q.bind(&e.id)
        .bind(e.at)
        .bind(e.day())
        .bind(&e.request_id)
        .bind(&e.tenant_id)
        .bind(&e.key_id)
        .bind(&e.endpoint)
        .bind(storable(&e.requested_model).into_owned())
        .bind(e.upstream_model.as_deref().map(|m| storable(m).into_owned()))
        .bind(i32::from(e.stream))
        .bind(e.prompt_tokens)
        .bind(e.completion_tokens)
        .bind(e.reasoning_tokens)
        .bind(e.cached_tokens)
        .bind(e.total_tokens)
        .bind(e.billed_output_tokens)
        .bind(e.cost_micros)
        .bind(i32::from(e.estimated))
        .bind(i32::from(e.unpriced))
        .bind(i32::from(e.modified))
        .bind(e.status)
        .bind(e.error_class.as_deref())
        .bind(e.latency_ms)
        .bind(e.ttft_ms)
        .bind(e.route.as_deref())
        .bind(e.target.as_deref())
        .bind(e.upstream.as_deref())
        .bind(e.attempts)
        .bind(&e.api)
        .bind(e.cache_write_tokens)
}

fn event(row: &AnyRow) -> StoreResult<UsageEvent> {
    Ok(UsageEvent {
        id: row.try_get("id")?,
        at: row.try_get("at")?,
        request_id: row.try_get("request_id")?,
        tenant_id: row.try_get("tenant_id")?,
        key_id: row.try_get("key_id")?,
        endpoint: row.try_get("endpoint")?,
        requested_model: row.try_get("requested_model")?,
        upstream_model: row.try_get("upstream_model")?,
        stream: row.try_get::<i32, _>("stream")? != 0,
        prompt_tokens: row.try_get("prompt_tokens")?,
        completion_tokens: row.try_get("completion_tokens")?,
        reasoning_tokens: row.try_get("reasoning_tokens")?,
        cached_tokens: row.try_get("cached_tokens")?,
        cache_write_tokens: row.try_get("cache_write_tokens")?,
        total_tokens: row.try_get("total_tokens")?,
        billed_output_tokens: row.try_get("billed_output_tokens")?,
        cost_micros: row.try_get("cost_micros")?,
        estimated: row.try_get::<i32, _>("estimated")? != 0,
        unpriced: row.try_get::<i32, _>("unpriced")? != 0,
        modified: row.try_get::<i32, _>("modified")? != 0,
        status: row.try_get("status")?,
        error_class: row.try_get("error_class")?,
        latency_ms: row.try_get("latency_ms")?,
        ttft_ms: row.try_get("ttft_ms")?,
        route: row.try_get("route")?,
        target: row.try_get("target")?,
        upstream: row.try_get("upstream")?,
        attempts: row.try_get("attempts")?,
        api: row.try_get("api")?,
    })
}

fn placeholders(rows: usize, start: usize) -> String {
    (0..rows)
        .map(|r| {
            let cols: Vec<String> = (1..=NCOLS).map(|c| format!("${}", start + r * NCOLS + c)).collect();
            format!("({})", cols.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Filters for usage queries; every field is optional.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub tenant_id: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Tenant,
    Key,
    Model,
    Day,
    /// The route that sent the request (empty: none).
    Route,
    /// The route target (variant) that served it.
    Target,
    /// The upstream that served it.
    Upstream,
    /// The model that served it (the upstream's answer, else the one asked).
    ServedModel,
    /// The API the request used (`openai`, `gemini`, `anthropic`).
    Api,
    /// The UTC hour the request was recorded in, `YYYY-MM-DDTHH:00`.
    Hour,
}

impl GroupBy {
    /// The rollup column.
    fn column(self) -> &'static str {
        match self {
            Self::Tenant => "tenant_id",
            Self::Key => "key_id",
            Self::Model => "model",
            Self::Day => "day",
            Self::Route => "route",
            Self::Target => "target",
            Self::Upstream => "upstream",
            Self::ServedModel => "served_model",
            Self::Api => "api",
            Self::Hour => "hour",
        }
    }

    /// The expression over per-request records, named as [`Self::column`].
    fn record_expression(self) -> &'static str {
        match self {
            Self::Tenant => "tenant_id",
            Self::Key => "key_id",
            Self::Model => "requested_model AS model",
            Self::Day => "day",
            Self::Route => "COALESCE(route, '') AS route",
            Self::Target => "COALESCE(target, '') AS target",
            Self::Upstream => "COALESCE(upstream, '') AS upstream",
            Self::ServedModel => "COALESCE(upstream_model, requested_model) AS served_model",
            Self::Api => "api",
            // The hour's number since the epoch: grouping on an integer is
            // several times cheaper than formatting every record's time;
            // only the groups are formatted (`hour_label`).
            Self::Hour => "(at / 3600000) AS hour",
        }
    }

    /// Whether the daily rollups hold this dimension; the routing ones are
    /// read from the per-request records.
    fn in_rollups(self) -> bool {
        matches!(self, Self::Tenant | Self::Key | Self::Model | Self::Day)
    }
}

/// Totals for one group (or for everything).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct UsageTotals {
    pub tenant_id: Option<String>,
    pub key_id: Option<String>,
    pub model: Option<String>,
    pub day: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hour: Option<String>,
    pub requests: i64,
    pub errors: i64,
    pub estimated_requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub reasoning_tokens: i64,
    pub cached_tokens: i64,
    #[serde(default)]
    pub cache_write_tokens: i64,
    pub billed_output_tokens: i64,
    pub cost_micros: i64,
}

/// A day written exactly `YYYY-MM-DD` (chrono alone also reads `2026-1-5`
/// and signed years); `None` for anything else. Reports take only such
/// days, and only such a day is ever written into a statement.
pub fn parse_day(day: &str) -> Option<NaiveDate> {
    let shaped = day.len() == 10
        && day.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    NaiveDate::parse_from_str(day, "%Y-%m-%d").ok().filter(|_| shaped)
}

/// The first millisecond of a `YYYY-MM-DD` day (UTC).
fn day_start(day: &str) -> Option<i64> {
    Some(parse_day(day)?.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis())
}

/// The hour `hours` hours after the epoch, `YYYY-MM-DDTHH:00` (UTC).
fn hour_label(hours: i64) -> String {
    from_millis(hours.saturating_mul(3_600_000)).format("%Y-%m-%dT%H:00").to_string()
}

fn day_string(ms: i64) -> String {
    day_of(ms)
}

/// The first millisecond of the UTC day `ms` falls in.
pub fn day_start_ms(ms: i64) -> i64 {
    let d = from_millis(ms).date_naive();
    d.and_hms_opt(0, 0, 0).map_or(ms, |t| t.and_utc().timestamp_millis())
}

impl Store {
    /// Inserts events, skipping ids already recorded, and adds the inserted
    /// ones to the daily rollups in the same transaction. Returns how many
    /// were new. Safe to repeat: replays never double-count.
    pub async fn insert_usage(&self, events: &[UsageEvent]) -> StoreResult<u64> {
        match self.backend {
            Backend::Postgres => self.insert_usage_postgres(events).await,
            Backend::Sqlite => self.insert_usage_sqlite(events).await,
        }
    }

    /// `COPY` when every record is new (the usual case, see
    /// `usage_copy`); the conflict-skipping insert when some are stored
    /// already (a replay).
    async fn insert_usage_postgres(&self, events: &[UsageEvent]) -> StoreResult<u64> {
        if let Some(pool) = &self.copy_pool
            && let crate::usage_copy::Copied::All(stored) = crate::usage_copy::copy_usage(pool, events).await?
        {
            return Ok(stored);
        }
        self.insert_new_usage_postgres(events).await
    }

    /// One statement per batch with the rows in a single JSON parameter
    /// (unpacked by `json_to_recordset`): binding and planning 24
    /// parameters per row cost more than the insert itself. Rollup groups are
    /// upserted in key order, as the `COPY` path does, so two replicas'
    /// batches take the rollups' row locks in the same order and cannot
    /// deadlock on each other.
    async fn insert_new_usage_postgres(&self, events: &[UsageEvent]) -> StoreResult<u64> {
        let mut inserted = 0;
        let sql = insert_usage_from_json();
        let mut tx = self.begin_write().await?;
        for chunk in events.chunks(5000) {
            let rows: Vec<JsonRow<'_>> = chunk.iter().map(JsonRow::from).collect();
            let rows = serde_json::to_string(&rows).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let row = sqlx::query(&sql).bind(rows).fetch_one(&mut *tx).await?;
            inserted += row.try_get::<i64, _>("n")? as u64;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn insert_usage_sqlite(&self, events: &[UsageEvent]) -> StoreResult<u64> {
        let mut inserted = 0;
        let mut tx = self.begin_write().await?;
        let insert =
            format!("INSERT INTO usage_events ({COLUMNS}) VALUES {} ON CONFLICT (id) DO NOTHING", placeholders(1, 0));
        let rollup = format!(
            "INSERT INTO usage_daily (day, tenant_id, key_id, model, requests, errors, estimated_requests, prompt_tokens, \
             completion_tokens, reasoning_tokens, cached_tokens, billed_output_tokens, cost_micros, cache_write_tokens) \
             VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8, $9, $10, $11, $12, $13) {ROLLUP_UPDATE}"
        );
        for e in events {
            let done = bind_event(sqlx::query(&insert), e).execute(&mut *tx).await?;
            if done.rows_affected() == 0 {
                continue;
            }
            inserted += 1;
            sqlx::query(&rollup)
                .bind(e.day())
                .bind(&e.tenant_id)
                .bind(&e.key_id)
                .bind(storable(&e.requested_model).into_owned())
                .bind(i64::from(e.is_error()))
                .bind(i64::from(e.estimated))
                .bind(e.prompt_tokens)
                .bind(e.completion_tokens)
                .bind(e.reasoning_tokens)
                .bind(e.cached_tokens)
                .bind(e.billed_output_tokens)
                .bind(e.cost_micros)
                .bind(e.cache_write_tokens)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Creates the daily partitions from `from_ms`'s day for `days` days
    /// (Postgres; a no-op on SQLite). Existing ones are left alone.
    pub async fn ensure_usage_partitions(&self, from_ms: i64, days: u32) -> StoreResult<()> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        let mut start = day_start_ms(from_ms);
        for _ in 0..days {
            let end = start + 86_400_000;
            let name = format!("usage_events_{}", day_string(start).replace('-', ""));
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {name} PARTITION OF usage_events FOR VALUES FROM ({start}) TO ({end})"
            );
            if let Err(e) = sqlx::query(&sql).execute(&self.pool).await {
                // Rows for that day already sit in the default partition;
                // they stay there and are still counted.
                tracing::warn!(partition = %name, error = %e, "cannot create a usage partition");
            }
            start = end;
        }
        Ok(())
    }

    /// Removes ledger rows older than `cutoff_ms`: whole daily partitions on
    /// Postgres (plus any stragglers in the default partition), a DELETE on
    /// SQLite. Daily rollups are kept. Returns the partitions dropped.
    pub async fn drop_usage_before(&self, cutoff_ms: i64) -> StoreResult<Vec<String>> {
        let mut dropped = Vec::new();
        match self.backend {
            Backend::Sqlite => {
                sqlx::query("DELETE FROM usage_events WHERE at < $1").bind(cutoff_ms).execute(&self.pool).await?;
            }
            Backend::Postgres => {
                let rows = sqlx::query(
                    "SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
                     JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'usage_events' \
                     AND c.relname LIKE 'usage\\_events\\_2%'",
                )
                .fetch_all(&self.pool)
                .await?;
                for row in rows {
                    let name: String = row.try_get("name")?;
                    let Some(day) = name.strip_prefix("usage_events_") else { continue };
                    let Ok(date) = NaiveDate::parse_from_str(day, "%Y%m%d") else { continue };
                    let Some(end) = date.succ_opt().and_then(|d| d.and_hms_opt(0, 0, 0)) else { continue };
                    if end.and_utc().timestamp_millis() <= cutoff_ms {
                        sqlx::query(&format!("DROP TABLE IF EXISTS {name}")).execute(&self.pool).await?;
                        dropped.push(name);
                    }
                }
                sqlx::query("DELETE FROM usage_events_default WHERE at < $1")
                    .bind(cutoff_ms)
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(dropped)
    }

    pub async fn count_usage_events(&self) -> StoreResult<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM usage_events").fetch_one(&self.pool).await?;
        Ok(row.try_get("n")?)
    }

    /// Ledger rows, newest first, after the cursor `(at, id)` of the last row
    /// of the previous page.
    pub async fn list_usage_events(
        &self,
        filter: &UsageFilter,
        before: Option<(i64, String)>,
        limit: u32,
    ) -> StoreResult<Vec<UsageEvent>> {
        let (cursor_at, cursor_id) = before.unwrap_or((i64::MAX, String::new()));
        let sql = format!(
            "SELECT {COLUMNS} FROM usage_events WHERE at >= $1 AND at < $2 \
             AND ($3 = '' OR tenant_id = $3) AND ($4 = '' OR key_id = $4) AND ($5 = '' OR requested_model = $5) \
             AND (at < $6 OR (at = $6 AND ($7 = '' OR id < $7))) ORDER BY at DESC, id DESC LIMIT $8"
        );
        let rows = sqlx::query(&sql)
            .bind(filter.from_ms.unwrap_or(0))
            .bind(filter.to_ms.unwrap_or(i64::MAX))
            .bind(filter.tenant_id.clone().unwrap_or_default())
            .bind(filter.key_id.clone().unwrap_or_default())
            .bind(filter.model.clone().unwrap_or_default())
            .bind(cursor_at)
            .bind(cursor_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(event).collect()
    }

    /// Totals from the daily rollups over whole UTC days `[from, to]`,
    /// grouped as asked (no grouping: one row of grand totals).
    pub async fn usage_totals(
        &self,
        from_day: &str,
        to_day: &str,
        filter: &UsageFilter,
        group_by: &[GroupBy],
    ) -> StoreResult<Vec<UsageTotals>> {
        let groups: Vec<&str> = group_by.iter().map(|g| g.column()).collect();
        let group_clause = if groups.is_empty() { String::new() } else { format!("GROUP BY {}", groups.join(", ")) };
        let order_clause = if groups.is_empty() { String::new() } else { format!("ORDER BY {}", groups.join(", ")) };
        // CAST keeps SUM's type an integer on both backends. The rollups hold
        // the sums already; the records are summed as they are.
        let rollups = group_by.iter().all(|g| g.in_rollups());
        let sum = |rollup_column: &str, record_expression: &str, name: &str| {
            let summed = if rollups { rollup_column } else { record_expression };
            format!("CAST(COALESCE(SUM({summed}), 0) AS BIGINT) AS {name}")
        };
        let totals = [
            sum("requests", "1", "requests"),
            sum("errors", "CASE WHEN status >= 400 OR error_class IS NOT NULL THEN 1 ELSE 0 END", "errors"),
            sum("estimated_requests", "estimated", "estimated_requests"),
            sum("prompt_tokens", "prompt_tokens", "prompt_tokens"),
            sum("completion_tokens", "completion_tokens", "completion_tokens"),
            sum("reasoning_tokens", "reasoning_tokens", "reasoning_tokens"),
            sum("cached_tokens", "cached_tokens", "cached_tokens"),
            sum("cache_write_tokens", "cache_write_tokens", "cache_write_tokens"),
            sum("billed_output_tokens", "billed_output_tokens", "billed_output_tokens"),
            sum("cost_micros", "cost_micros", "cost_micros"),
        ]
        .join(", ");
        let select_groups: String = group_by
            .iter()
            .map(|g| format!("{}, ", if rollups { g.column() } else { g.record_expression() }))
            .collect();
        // Routing dimensions are not in the rollups: the records of the range
        // are summed then (their day column is the rollups' day).
        let (table, model_column) =
            if rollups { ("usage_daily", "model") } else { ("usage_events", "requested_model") };
        // The range is written into the statement, and only the filters
        // given become conditions: with parameters for a range (or a
        // `($3 = '' OR …)` form), Postgres's generic plan, used once a
        // statement is cached, expects a few hundred rows and sorts a month
        // of rollups on disk (three times slower at 120,000 rollup rows).
        let (from_ms, to_ms) = match (day_start(from_day), day_start(to_day)) {
            (Some(from), Some(to)) => (from, to + 86_400_000),
            _ => return Err(StoreError::Corrupt(format!("not a day range: {from_day:?} to {to_day:?}"))),
        };
        let mut conditions = vec![format!("day >= '{from_day}' AND day <= '{to_day}'")];
        let mut texts: Vec<&str> = Vec::new();
        for (column, value) in [
            ("tenant_id", filter.tenant_id.as_deref()),
            ("key_id", filter.key_id.as_deref()),
            (model_column, filter.model.as_deref()),
        ] {
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                texts.push(value);
                conditions.push(format!("{column} = ${}", texts.len()));
            }
        }
        // On the records, the range is also given in milliseconds: Postgres
        // prunes the daily partitions by `at`, not by `day`.
        if !rollups {
            conditions.push(format!("at >= {from_ms} AND at < {to_ms}"));
        }
        let sql = format!(
            "SELECT {select_groups}{totals} FROM {table} WHERE {} {group_clause} {order_clause}",
            conditions.join(" AND ")
        );
        let mut query = sqlx::query(&sql);
        for text in texts {
            query = query.bind(text);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| {
                let text = |g: GroupBy| -> StoreResult<Option<String>> {
                    if !group_by.contains(&g) {
                        Ok(None)
                    } else if g == GroupBy::Hour {
                        Ok(Some(hour_label(row.try_get::<i64, _>(g.column())?)))
                    } else {
                        Ok(Some(row.try_get::<String, _>(g.column())?))
                    }
                };
                Ok(UsageTotals {
                    tenant_id: text(GroupBy::Tenant)?,
                    key_id: text(GroupBy::Key)?,
                    model: text(GroupBy::Model)?,
                    day: text(GroupBy::Day)?,
                    route: text(GroupBy::Route)?,
                    target: text(GroupBy::Target)?,
                    upstream: text(GroupBy::Upstream)?,
                    served_model: text(GroupBy::ServedModel)?,
                    api: text(GroupBy::Api)?,
                    hour: text(GroupBy::Hour)?,
                    requests: row.try_get("requests")?,
                    errors: row.try_get("errors")?,
                    estimated_requests: row.try_get("estimated_requests")?,
                    prompt_tokens: row.try_get("prompt_tokens")?,
                    completion_tokens: row.try_get("completion_tokens")?,
                    reasoning_tokens: row.try_get("reasoning_tokens")?,
                    cached_tokens: row.try_get("cached_tokens")?,
                    cache_write_tokens: row.try_get("cache_write_tokens")?,
                    billed_output_tokens: row.try_get("billed_output_tokens")?,
                    cost_micros: row.try_get("cost_micros")?,
                })
            })
            .collect()
    }
}

/// Today's UTC date, for default report ranges.
pub fn today() -> String {
    let now: DateTime<Utc> = Utc::now();
    format!("{:04}-{:02}-{:02}", now.year(), now.month(), now.day())
}
