//! `/admin/v1/tenants/{id}/budgets` and `/admin/v1/budgets/{budget_id}`

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tollgate_store::{Budget, Change, Period, StoreError};
use utoipa::{IntoParams, ToSchema};

use super::AdminState;
use super::auth::Admin;
use super::error::AdminError;
use super::extract::{AdminJson, AdminPath};
use super::tenants::{NOT_FOUND as TENANT_NOT_FOUND, TenantId};

/// The `{budget_id}` of `/admin/v1/budgets/{budget_id}`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only describes the path to the OpenAPI document.
pub struct BudgetId {
    /// The budget's id, `bud_...`.
    budget_id: String,
}

const NOT_FOUND: &str = "No budget has this id (`not_found`).";

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBudget {
    /// `daily`, `weekly` (from Monday), `monthly` (calendar months, UTC) or `lifetime`.
    pub period: Period,
    /// The amount in USD as a decimal string, e.g. `"500"` or `"12.50"` (up to 6
    /// decimals), more than zero and at most 9223372036854.775807.
    #[schema(pattern = "^\\s*([0-9]+(\\.[0-9]{0,6})?|\\.[0-9]{1,6})\\s*$", example = "500")]
    pub amount_usd: String,
    /// Refuse requests that could exceed it (default true); false only alerts.
    #[serde(default = "yes")]
    pub hard: bool,
    /// Alert thresholds in percent, each 1-1000 (default 50, 80, 100).
    #[serde(default)]
    #[schema(max_items = 10)]
    pub thresholds: Option<Vec<u32>>,
    /// Limit the budget to one key of the tenant.
    #[serde(default)]
    pub key_id: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateBudget {
    /// A decimal string, as for creation.
    #[schema(pattern = "^\\s*([0-9]+(\\.[0-9]{0,6})?|\\.[0-9]{1,6})\\s*$", example = "500")]
    pub amount_usd: Option<String>,
    pub hard: Option<bool>,
    /// Alert thresholds in percent, each 1-1000.
    #[schema(max_items = 10)]
    pub thresholds: Option<Vec<u32>>,
}

/// A budget with its current period.
#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetView {
    #[serde(flatten)]
    pub budget: Budget,
    pub amount_usd: String,
    /// Settled spend this period.
    pub spent_micros: i64,
    /// Amount minus spend and in-flight reservations.
    pub remaining_micros: i64,
    /// The spend at the end of this period if it goes on at the rate seen
    /// so far (absent for lifetime budgets and too early in a period).
    pub forecast_micros: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BudgetList {
    pub data: Vec<BudgetView>,
}

/// `"12.5"` → 12_500_000 micro-dollars, exactly (no floating point).
pub fn parse_usd(field: &'static str, text: &str) -> Result<i64, AdminError> {
    let bad = || AdminError::invalid(field, "must be a positive decimal amount in USD with at most 6 decimals");
    let (whole, frac) = text.trim().split_once('.').unwrap_or((text.trim(), ""));
    if whole.is_empty() && frac.is_empty()
        || frac.len() > 6
        || !whole.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: i64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| bad())? };
    let frac: i64 = format!("{frac:0<6}").parse().map_err(|_| bad())?;
    let micros = whole.checked_mul(1_000_000).and_then(|w| w.checked_add(frac)).ok_or_else(bad)?;
    if micros <= 0 {
        return Err(bad());
    }
    Ok(micros)
}

fn validate_thresholds(thresholds: &[u32]) -> Result<(), AdminError> {
    if thresholds.len() > 10 || thresholds.iter().any(|t| *t == 0 || *t > 1000) {
        return Err(AdminError::invalid("thresholds", "at most 10 percentages, each between 1 and 1000"));
    }
    Ok(())
}

fn view(state: &AdminState, budget: Budget) -> BudgetView {
    let live = state.budgets.for_tenant(&budget.tenant_id).into_iter().find(|s| s.budget.id == budget.id);
    let (spent, remaining) = live.map_or((0, budget.amount_micros), |s| (s.spent(), s.remaining()));
    let now = state.clock.now();
    let fraction_of_day = f64::from(chrono::Timelike::num_seconds_from_midnight(&now)) / 86_400.0;
    BudgetView {
        forecast_micros: crate::alerts::forecast_micros(budget.period, spent, now.date_naive(), fraction_of_day),
        amount_usd: crate::accounting::format_usd(budget.amount_micros),
        spent_micros: spent,
        remaining_micros: remaining,
        budget,
    }
}

#[utoipa::path(post, path = "/admin/v1/tenants/{id}/budgets", tag = "budgets", operation_id = "createBudget", params(TenantId), request_body = CreateBudget,
    responses((status = 201, description = "Created, with this period's spend", body = BudgetView,
        links(
            ("updateBudget" = (operation_id = "updateBudget", parameters(("budget_id" = "$response.body#/id")))),
            ("deleteBudget" = (operation_id = "deleteBudget", parameters(("budget_id" = "$response.body#/id")))),
        )), (status = 404, description = TENANT_NOT_FOUND)))]
pub async fn create(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(tenant_id): AdminPath,
    AdminJson(body): AdminJson<CreateBudget>,
) -> Result<(StatusCode, Json<BudgetView>), AdminError> {
    let amount_micros = parse_usd("amount_usd", &body.amount_usd)?;
    let thresholds = body.thresholds.unwrap_or_else(|| vec![50, 80, 100]);
    validate_thresholds(&thresholds)?;
    if let Some(key_id) = &body.key_id {
        let key = state.store.get_key(key_id).await.map_err(|_| AdminError::invalid("key_id", "no such key"))?;
        if key.tenant_id != tenant_id {
            return Err(AdminError::invalid("key_id", "the key belongs to another tenant"));
        }
    }
    let now = chrono::Utc::now();
    let budget = Budget {
        id: format!("bud_{}", uuid::Uuid::now_v7().simple()),
        tenant_id: tenant_id.clone(),
        key_id: body.key_id,
        period: body.period,
        amount_micros,
        hard: body.hard,
        thresholds,
        created_at: now,
        updated_at: now,
    };
    let created = state.store.create_budget(&budget, &admin.actor).await.map_err(|e| match e {
        StoreError::NotFound => AdminError::not_found("tenant"),
        other => other.into(),
    })?;
    state.changed(Change::Budget(tenant_id)).await;
    Ok((StatusCode::CREATED, Json(view(&state, created))))
}

#[utoipa::path(get, path = "/admin/v1/tenants/{id}/budgets", tag = "budgets", operation_id = "listBudgets", params(TenantId),
    responses((status = 200, description = "The tenant's budgets, with this period's spend", body = BudgetList), (status = 404, description = TENANT_NOT_FOUND)))]
pub async fn list(
    State(state): State<AdminState>,
    _admin: Admin,
    AdminPath(tenant_id): AdminPath,
) -> Result<Json<BudgetList>, AdminError> {
    // As for keys: a mistyped tenant id is a 404, not an empty list.
    state.store.get_tenant(&tenant_id).await.map_err(|e| match e {
        StoreError::NotFound => AdminError::not_found("tenant"),
        other => other.into(),
    })?;
    let budgets = state.store.list_budgets(&tenant_id).await?;
    Ok(Json(BudgetList { data: budgets.into_iter().map(|b| view(&state, b)).collect() }))
}

#[utoipa::path(patch, path = "/admin/v1/budgets/{budget_id}", tag = "budgets", operation_id = "updateBudget", params(BudgetId), request_body = UpdateBudget,
    responses((status = 200, description = "The updated budget", body = BudgetView), (status = 404, description = NOT_FOUND)))]
pub async fn update(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(budget_id): AdminPath,
    AdminJson(body): AdminJson<UpdateBudget>,
) -> Result<Json<BudgetView>, AdminError> {
    let mut budget = state.store.get_budget(&budget_id).await.map_err(not_found)?;
    if let Some(amount) = &body.amount_usd {
        budget.amount_micros = parse_usd("amount_usd", amount)?;
    }
    if let Some(hard) = body.hard {
        budget.hard = hard;
    }
    if let Some(thresholds) = body.thresholds {
        validate_thresholds(&thresholds)?;
        budget.thresholds = thresholds;
    }
    let updated = state.store.update_budget(&budget, &admin.actor).await.map_err(not_found)?;
    state.changed(Change::Budget(updated.tenant_id.clone())).await;
    Ok(Json(view(&state, updated)))
}

#[utoipa::path(delete, path = "/admin/v1/budgets/{budget_id}", tag = "budgets", operation_id = "deleteBudget", params(BudgetId),
    responses((status = 200, description = "The deleted budget", body = Budget), (status = 404, description = NOT_FOUND)))]
pub async fn delete(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(budget_id): AdminPath,
) -> Result<Json<Budget>, AdminError> {
    let deleted = state.store.delete_budget(&budget_id, &admin.actor).await.map_err(not_found)?;
    state.changed(Change::Budget(deleted.tenant_id.clone())).await;
    Ok(Json(deleted))
}

fn not_found(e: StoreError) -> AdminError {
    match e {
        StoreError::NotFound => AdminError::not_found("budget"),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usd_amounts_parse_exactly() {
        assert_eq!(parse_usd("a", "500").unwrap(), 500_000_000);
        assert_eq!(parse_usd("a", "12.5").unwrap(), 12_500_000);
        assert_eq!(parse_usd("a", "0.000001").unwrap(), 1);
        assert_eq!(parse_usd("a", ".25").unwrap(), 250_000);
        for bad in ["", "-1", "1.0000001", "abc", "0", "1e3", "99999999999999999"] {
            assert!(parse_usd("a", bad).is_err(), "{bad}");
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AlertQuery {
    /// Only this tenant's alerts.
    pub tenant_id: Option<String>,
    /// How many (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AlertList {
    pub data: Vec<tollgate_store::BudgetAlert>,
}

/// Budget alerts, newest first, with their delivery state.
#[utoipa::path(get, path = "/admin/v1/alerts", tag = "budgets", operation_id = "listAlerts", params(AlertQuery),
    responses((status = 200, description = "The newest alerts", body = AlertList)))]
pub async fn alerts(
    State(state): State<AdminState>,
    _admin: Admin,
    super::extract::AdminQuery(query): super::extract::AdminQuery<AlertQuery>,
) -> Result<Json<AlertList>, AdminError> {
    let limit = super::validate::page_limit(query.limit)?;
    Ok(Json(AlertList { data: state.store.list_alerts(query.tenant_id.as_deref(), limit).await? }))
}
