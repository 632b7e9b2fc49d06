//! `/admin/v1/tenants`

use axum::Json;
use axum::extract::{Path, State};
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tollgate_store::{Change, NewTenant, Tenant, TenantPatch, TenantPolicy, TenantStatus};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::error::AdminError;
use super::extract::{AdminJson, AdminQuery};
use super::{AdminState, validate};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// Slug: 1-63 lowercase letters, digits and dashes.
    pub id: String,
    pub display_name: String,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// Limits, token and thinking caps (all optional).
    #[serde(default)]
    pub policy: Option<TenantPolicy>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTenant {
    pub display_name: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// Replaces the whole policy.
    pub policy: Option<TenantPolicy>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Page size, 1-200 (default 50).
    pub limit: Option<u32>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TenantList {
    pub data: Vec<Tenant>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(post, path = "/admin/v1/tenants", tag = "tenants", request_body = CreateTenant,
    responses((status = 201, body = Tenant), (status = 400, description = "validation failed"), (status = 409, description = "exists")))]
pub async fn create(
    State(state): State<AdminState>,
    admin: Admin,
    AdminJson(body): AdminJson<CreateTenant>,
) -> Result<(StatusCode, Json<Tenant>), AdminError> {
    validate::tenant_id(&body.id)?;
    validate::name("display_name", &body.display_name)?;
    let metadata = body.metadata.unwrap_or_else(|| serde_json::json!({}));
    validate::metadata(&metadata)?;
    let policy = body.policy.unwrap_or_default();
    validate::policy(&policy)?;
    let tenant = state
        .store
        .create_tenant(&NewTenant { id: body.id, display_name: body.display_name, metadata, policy }, &admin.actor)
        .await?;
    state.changed(Change::Tenant(tenant.id.clone())).await;
    Ok((StatusCode::CREATED, Json(tenant)))
}

#[utoipa::path(get, path = "/admin/v1/tenants", tag = "tenants", params(PageQuery),
    responses((status = 200, body = TenantList)))]
pub async fn list(
    State(state): State<AdminState>,
    _admin: Admin,
    AdminQuery(query): AdminQuery<PageQuery>,
) -> Result<Json<TenantList>, AdminError> {
    let limit = validate::page_limit(query.limit)?;
    let rows = state.store.list_tenants(query.cursor.as_deref(), limit + 1).await?;
    let (data, next_cursor) = validate::paginate(rows, limit, |t| t.id.clone());
    Ok(Json(TenantList { data, next_cursor }))
}

#[utoipa::path(get, path = "/admin/v1/tenants/{id}", tag = "tenants",
    responses((status = 200, body = Tenant), (status = 404, description = "not found")))]
pub async fn get(
    State(state): State<AdminState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<Tenant>, AdminError> {
    Ok(Json(state.store.get_tenant(&id).await.map_err(not_found)?))
}

#[utoipa::path(patch, path = "/admin/v1/tenants/{id}", tag = "tenants", request_body = UpdateTenant,
    responses((status = 200, body = Tenant), (status = 404, description = "not found")))]
pub async fn update(
    State(state): State<AdminState>,
    admin: Admin,
    Path(id): Path<String>,
    AdminJson(body): AdminJson<UpdateTenant>,
) -> Result<Json<Tenant>, AdminError> {
    if let Some(name) = &body.display_name {
        validate::name("display_name", name)?;
    }
    if let Some(metadata) = &body.metadata {
        validate::metadata(metadata)?;
    }
    if let Some(policy) = &body.policy {
        validate::policy(policy)?;
    }
    let patch = TenantPatch { display_name: body.display_name, metadata: body.metadata, policy: body.policy };
    let tenant = state.store.update_tenant(&id, &patch, &admin.actor).await.map_err(not_found)?;
    state.changed(Change::Tenant(id)).await;
    Ok(Json(tenant))
}

#[utoipa::path(post, path = "/admin/v1/tenants/{id}/suspend", tag = "tenants",
    responses((status = 200, body = Tenant), (status = 404, description = "not found")))]
pub async fn suspend(
    State(state): State<AdminState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<Tenant>, AdminError> {
    set_status(state, admin, id, TenantStatus::Suspended).await
}

#[utoipa::path(post, path = "/admin/v1/tenants/{id}/resume", tag = "tenants",
    responses((status = 200, body = Tenant), (status = 404, description = "not found")))]
pub async fn resume(
    State(state): State<AdminState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<Tenant>, AdminError> {
    set_status(state, admin, id, TenantStatus::Active).await
}

async fn set_status(
    state: AdminState,
    admin: Admin,
    id: String,
    status: TenantStatus,
) -> Result<Json<Tenant>, AdminError> {
    let tenant = state.store.set_tenant_status(&id, status, &admin.actor).await.map_err(not_found)?;
    state.changed(Change::Tenant(id)).await;
    Ok(Json(tenant))
}

/// Deletes the tenant and revokes all its keys.
#[utoipa::path(delete, path = "/admin/v1/tenants/{id}", tag = "tenants",
    responses((status = 200, body = Tenant), (status = 404, description = "not found")))]
pub async fn delete(
    State(state): State<AdminState>,
    admin: Admin,
    Path(id): Path<String>,
) -> Result<Json<Tenant>, AdminError> {
    let tenant = state.store.delete_tenant(&id, &admin.actor).await.map_err(not_found)?;
    // The tenant's keys were revoked with it: reload them all.
    state.reload_all().await;
    Ok(Json(tenant))
}

fn not_found(e: tollgate_store::StoreError) -> AdminError {
    match e {
        tollgate_store::StoreError::NotFound => AdminError::not_found("tenant"),
        other => other.into(),
    }
}
