//! Usage reports: totals and breakdowns from the daily rollups, per-request
//! records with cursor pagination, and CSV export. The same queries serve
//! admins (any tenant) and tenants (their own usage only, see
//! `crate::tenant_usage`).

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use tollgate_store::{GroupBy, Store, UsageEvent, UsageFilter, UsageTotals};
use utoipa::{IntoParams, ToSchema};

use super::AdminState;
use super::auth::Admin;
use super::error::AdminError;
use super::extract::AdminQuery;
use super::validate;

/// Longest report range, in days.
const MAX_DAYS: i64 = 366;
/// Rows in one CSV export.
const MAX_CSV_ROWS: usize = 1_000_000;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SummaryQuery {
    /// First UTC day, `YYYY-MM-DD` (default: 30 days before `to`); at most
    /// 366 days before `to`.
    #[param(format = Date)]
    pub from: Option<String>,
    /// Last UTC day, inclusive (default: today).
    #[param(format = Date)]
    pub to: Option<String>,
    /// Only this tenant (ignored with a tenant key: always the key's tenant).
    pub tenant_id: Option<String>,
    /// Only this key.
    pub key_id: Option<String>,
    /// Only this requested model.
    pub model: Option<String>,
    /// Comma-separated: any of `tenant`, `key`, `model`, `day`, `hour`
    /// (UTC, read from the per-request records), and what served the
    /// requests: `route`, `target` (or `variant`), `upstream`,
    /// `served_model`, and the API the requests used: `api` (empty: no
    /// grouping).
    #[param(
        pattern = "^\\s*((tenant|key|model|day|hour|route|target|variant|upstream|served_model|api)\\s*(,\\s*(tenant|key|model|day|hour|route|target|variant|upstream|served_model|api)\\s*)*)?$"
    )]
    pub group_by: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct SummaryRow {
    #[serde(flatten)]
    pub totals: UsageTotals,
    /// `cost_micros / requests`, rounded half up (0 without requests).
    pub average_cost_micros: i64,
    /// The cost in USD as an exact decimal string.
    pub cost_usd: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Summary {
    pub from: String,
    pub to: String,
    pub data: Vec<SummaryRow>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RecordsQuery {
    /// RFC 3339 start (inclusive).
    pub from: Option<DateTime<Utc>>,
    /// RFC 3339 end (exclusive).
    pub to: Option<DateTime<Utc>>,
    /// Only this tenant (ignored with a tenant key: always the key's tenant).
    pub tenant_id: Option<String>,
    /// Only this key.
    pub key_id: Option<String>,
    /// Only this requested model.
    pub model: Option<String>,
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
}

/// The records export takes the filters only: it is not paginated.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// RFC 3339 start (inclusive).
    pub from: Option<DateTime<Utc>>,
    /// RFC 3339 end (exclusive).
    pub to: Option<DateTime<Utc>>,
    /// Only this tenant.
    pub tenant_id: Option<String>,
    /// Only this key.
    pub key_id: Option<String>,
    /// Only this requested model.
    pub model: Option<String>,
}

impl From<ExportQuery> for RecordsQuery {
    fn from(q: ExportQuery) -> Self {
        Self {
            from: q.from,
            to: q.to,
            tenant_id: q.tenant_id,
            key_id: q.key_id,
            model: q.model,
            limit: None,
            cursor: None,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RecordList {
    pub data: Vec<UsageEvent>,
    pub next_cursor: Option<String>,
}

/// The document promises an RFC 3339 full date: only that shape is accepted.
fn parse_day(field: &'static str, day: &str) -> Result<NaiveDate, AdminError> {
    tollgate_store::usage::parse_day(day).ok_or_else(|| AdminError::invalid(field, "must be a date, YYYY-MM-DD"))
}

fn parse_group_by(text: Option<&str>) -> Result<Vec<GroupBy>, AdminError> {
    let Some(text) = text.filter(|t| !t.is_empty()) else { return Ok(Vec::new()) };
    let mut groups = Vec::new();
    for part in text.split(',') {
        let group = match part.trim() {
            "tenant" => GroupBy::Tenant,
            "key" => GroupBy::Key,
            "model" => GroupBy::Model,
            "day" => GroupBy::Day,
            "route" => GroupBy::Route,
            "target" | "variant" => GroupBy::Target,
            "upstream" => GroupBy::Upstream,
            "served_model" => GroupBy::ServedModel,
            "api" => GroupBy::Api,
            "hour" => GroupBy::Hour,
            other => {
                return Err(AdminError::invalid(
                    "group_by",
                    format!(
                        "{other:?} is not one of tenant, key, model, day, hour, route, target, upstream, served_model, api"
                    ),
                ));
            }
        };
        if !groups.contains(&group) {
            groups.push(group);
        }
    }
    Ok(groups)
}

/// Runs a summary; `tenant` forces the tenant (tenant-facing calls).
pub async fn summarize(store: &Store, query: SummaryQuery, tenant: Option<&str>) -> Result<Summary, AdminError> {
    let to = match &query.to {
        Some(d) => parse_day("to", d)?,
        None => Utc::now().date_naive(),
    };
    let from = match &query.from {
        Some(d) => parse_day("from", d)?,
        None => to
            .checked_sub_signed(chrono::Duration::days(30))
            .ok_or_else(|| AdminError::invalid("to", "is too early"))?,
    };
    if from > to {
        return Err(AdminError::invalid("from", "must not be after `to`"));
    }
    if (to - from).num_days() > MAX_DAYS {
        return Err(AdminError::invalid("from", format!("the range may span at most {MAX_DAYS} days")));
    }
    let group_by = parse_group_by(query.group_by.as_deref())?;
    let filter = UsageFilter {
        tenant_id: tenant.map(str::to_owned).or(query.tenant_id),
        key_id: query.key_id,
        model: query.model,
        ..UsageFilter::default()
    };
    let (from, to) = (from.format("%Y-%m-%d").to_string(), to.format("%Y-%m-%d").to_string());
    let rows = store.usage_totals(&from, &to, &filter, &group_by).await?;
    let data = rows
        .into_iter()
        .map(|totals| {
            let average_cost_micros =
                if totals.requests > 0 { (totals.cost_micros + totals.requests / 2) / totals.requests } else { 0 };
            let cost_usd = crate::accounting::format_usd(totals.cost_micros);
            SummaryRow { totals, average_cost_micros, cost_usd }
        })
        .collect();
    Ok(Summary { from, to, data })
}

fn records_filter(query: &RecordsQuery, tenant: Option<&str>) -> UsageFilter {
    UsageFilter {
        from_ms: query.from.map(|t| t.timestamp_millis()),
        to_ms: query.to.map(|t| t.timestamp_millis()),
        tenant_id: tenant.map(str::to_owned).or_else(|| query.tenant_id.clone()),
        key_id: query.key_id.clone(),
        model: query.model.clone(),
    }
}

fn parse_cursor(cursor: Option<&str>) -> Result<Option<(i64, String)>, AdminError> {
    let Some(cursor) = cursor else { return Ok(None) };
    let bad = || AdminError::invalid("cursor", "not a cursor from this listing");
    let (at, id) = cursor.split_once(':').ok_or_else(bad)?;
    Ok(Some((at.parse().map_err(|_| bad())?, id.to_owned())))
}

pub async fn records(store: &Store, query: RecordsQuery, tenant: Option<&str>) -> Result<RecordList, AdminError> {
    let limit = validate::page_limit(query.limit)?;
    let cursor = parse_cursor(query.cursor.as_deref())?;
    let rows = store.list_usage_events(&records_filter(&query, tenant), cursor, limit + 1).await?;
    let (data, next_cursor) = validate::paginate(rows, limit, |e| format!("{}:{}", e.at, e.id));
    Ok(RecordList { data, next_cursor })
}

const CSV_HEADER: &str = "id,at,request_id,tenant_id,key_id,endpoint,requested_model,upstream_model,stream,\
prompt_tokens,completion_tokens,reasoning_tokens,cached_tokens,total_tokens,billed_output_tokens,cost_micros,cost_usd,\
estimated,unpriced,modified,status,error_class,latency_ms,ttft_ms,route,target,upstream,attempts\n";

fn csv_field(out: &mut String, value: &str) {
    if value.contains([',', '"', '\n', '\r']) {
        out.push('"');
        out.push_str(&value.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(value);
    }
}

fn csv_row(out: &mut String, e: &UsageEvent) {
    let at = tollgate_store::from_millis(e.at).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let fields: [String; 28] = [
        e.id.clone(),
        at,
        e.request_id.clone(),
        e.tenant_id.clone(),
        e.key_id.clone(),
        e.endpoint.clone(),
        e.requested_model.clone(),
        e.upstream_model.clone().unwrap_or_default(),
        e.stream.to_string(),
        e.prompt_tokens.to_string(),
        e.completion_tokens.to_string(),
        e.reasoning_tokens.to_string(),
        e.cached_tokens.to_string(),
        e.total_tokens.to_string(),
        e.billed_output_tokens.to_string(),
        e.cost_micros.to_string(),
        crate::accounting::format_usd(e.cost_micros),
        e.estimated.to_string(),
        e.unpriced.to_string(),
        e.modified.to_string(),
        e.status.to_string(),
        e.error_class.clone().unwrap_or_default(),
        e.latency_ms.to_string(),
        e.ttft_ms.map(|t| t.to_string()).unwrap_or_default(),
        e.route.clone().unwrap_or_default(),
        e.target.clone().unwrap_or_default(),
        e.upstream.clone().unwrap_or_default(),
        e.attempts.to_string(),
    ];
    for (i, f) in fields.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        csv_field(out, f);
    }
    out.push('\n');
}

pub async fn csv(store: &Store, query: RecordsQuery, tenant: Option<&str>) -> Result<Response, AdminError> {
    let filter = records_filter(&query, tenant);
    let mut out = String::from(CSV_HEADER);
    let mut cursor = None;
    let mut rows = 0;
    loop {
        let page = store.list_usage_events(&filter, cursor.take(), 1000).await?;
        let Some(last) = page.last() else { break };
        cursor = Some((last.at, last.id.clone()));
        for e in &page {
            csv_row(&mut out, e);
        }
        rows += page.len();
        if page.len() < 1000 || rows >= MAX_CSV_ROWS {
            break;
        }
    }
    Ok((
        [
            (http::header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (http::header::CONTENT_DISPOSITION, "attachment; filename=\"usage.csv\""),
        ],
        out,
    )
        .into_response())
}

#[utoipa::path(get, path = "/admin/v1/usage/summary", tag = "usage", operation_id = "usageSummary", params(SummaryQuery),
    responses((status = 200, description = "Totals over whole UTC days, one row per group", body = Summary)))]
pub async fn admin_summary(
    State(state): State<AdminState>,
    _admin: Admin,
    AdminQuery(query): AdminQuery<SummaryQuery>,
) -> Result<Json<Summary>, AdminError> {
    Ok(Json(summarize(&state.store, query, None).await?))
}

#[utoipa::path(get, path = "/admin/v1/usage/records", tag = "usage", operation_id = "usageRecords", params(RecordsQuery),
    responses((status = 200, description = "One page of per-request records, newest first", body = RecordList)))]
pub async fn admin_records(
    State(state): State<AdminState>,
    _admin: Admin,
    AdminQuery(query): AdminQuery<RecordsQuery>,
) -> Result<Json<RecordList>, AdminError> {
    Ok(Json(records(&state.store, query, None).await?))
}

#[utoipa::path(get, path = "/admin/v1/usage/records.csv", tag = "usage", operation_id = "usageRecordsCsv", params(ExportQuery),
    responses((status = 200, description = "CSV with a header line, one row per request, newest first (at most 1,000,000 rows)",
        content_type = "text/csv; charset=utf-8", body = String)))]
pub async fn admin_csv(
    State(state): State<AdminState>,
    _admin: Admin,
    AdminQuery(query): AdminQuery<ExportQuery>,
) -> Result<Response, AdminError> {
    csv(&state.store, query.into(), None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        let mut out = String::new();
        csv_field(&mut out, "plain");
        out.push(',');
        csv_field(&mut out, "a,\"b\"");
        assert_eq!(out, "plain,\"a,\"\"b\"\"\"");
    }

    #[test]
    fn days_are_rfc_3339_full_dates() {
        assert_eq!(parse_day("from", "2026-02-28").unwrap(), NaiveDate::from_ymd_opt(2026, 2, 28).unwrap());
        for bad in ["2026-1-5", "+2026-01-05", "2026-02-30", "20260205", "2026-02-05T00:00:00Z", ""] {
            assert_eq!(parse_day("from", bad).unwrap_err().param.as_deref(), Some("from"), "{bad}");
        }
    }

    #[test]
    fn group_by_parsing() {
        assert_eq!(parse_group_by(Some("tenant, model,tenant")).unwrap(), [GroupBy::Tenant, GroupBy::Model]);
        assert_eq!(parse_group_by(Some("colour")).unwrap_err().param.as_deref(), Some("group_by"));
    }
}
