//! `/admin/v1/audit`: every admin change, newest first.

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use tollgate_store::AuditEntry;
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::AdminError;
use super::extract::AdminQuery;
use super::tenants::PageQuery;
use super::{AdminState, validate};

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    pub data: Vec<AuditEntry>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/admin/v1/audit", tag = "audit", operation_id = "listAudit", params(PageQuery),
    responses((status = 200, description = "One page of the audit log, newest first", body = AuditList)))]
pub async fn list(
    State(state): State<AdminState>,
    _admin: Admin,
    AdminQuery(query): AdminQuery<PageQuery>,
) -> Result<Json<AuditList>, AdminError> {
    let limit = validate::page_limit(query.limit)?;
    let before = match query.cursor.as_deref() {
        None => None,
        Some(c) => Some(c.parse::<i64>().map_err(|_| AdminError::invalid("cursor", "not a cursor from this listing"))?),
    };
    let rows = state.store.list_audit(before, limit + 1).await?;
    let (data, next_cursor) = validate::paginate(rows, limit, |e| e.id.to_string());
    Ok(Json(AuditList { data, next_cursor }))
}
