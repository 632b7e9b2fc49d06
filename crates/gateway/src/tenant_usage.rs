//! `GET /v1/usage` and `GET /v1/usage/records`: a tenant key reads its own
//! tenant's usage, and nothing else (the tenant filter is forced).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, State};
use tollgate_store::Store;

use crate::admin::error::AdminError;
use crate::admin::extract::AdminQuery;
use crate::admin::usage::{self, RecordList, RecordsQuery, Summary, SummaryQuery};
use crate::auth::Principal;

#[derive(Clone)]
pub struct TenantUsageState {
    pub store: Store,
}

#[utoipa::path(get, path = "/v1/usage", tag = "tenant usage", operation_id = "tenantUsageSummary", params(SummaryQuery),
    security(("tenant_key" = [])),
    responses((status = 200, description = "The caller's tenant's totals", body = Summary),
        (status = 403, description = "The key's tenant is suspended (`tenant_suspended`).")))]
pub async fn summary(
    State(state): State<Arc<TenantUsageState>>,
    Extension(principal): Extension<Principal>,
    AdminQuery(query): AdminQuery<SummaryQuery>,
) -> Result<Json<Summary>, AdminError> {
    Ok(Json(usage::summarize(&state.store, query, Some(principal.tenant_id())).await?))
}

#[utoipa::path(get, path = "/v1/usage/records", tag = "tenant usage", operation_id = "tenantUsageRecords", params(RecordsQuery),
    security(("tenant_key" = [])),
    responses((status = 200, description = "One page of the caller's tenant's records", body = RecordList),
        (status = 403, description = "The key's tenant is suspended (`tenant_suspended`).")))]
pub async fn records(
    State(state): State<Arc<TenantUsageState>>,
    Extension(principal): Extension<Principal>,
    AdminQuery(query): AdminQuery<RecordsQuery>,
) -> Result<Json<RecordList>, AdminError> {
    Ok(Json(usage::records(&state.store, query, Some(principal.tenant_id())).await?))
}
