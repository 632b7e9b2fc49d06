//! `/admin/v1/tenants`

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use serde::{Deserialize, Serialize};
use tollgate_store::{Change, NewTenant, Tenant, TenantPatch, TenantPolicy, TenantStatus};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::error::AdminError;
use super::extract::{AdminJson, AdminPath, AdminQuery};
use super::{AdminState, validate};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    /// Slug: 1-63 lowercase letters, digits and dashes, not starting or ending with a dash.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")]
    pub id: String,
    /// 1-200 characters, not only spaces, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub display_name: String,
    /// A JSON object of at most 16 KiB, for the operator's own use (default `{}`).
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
    /// 1-200 characters, not only spaces, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub display_name: Option<String>,
    /// Replaces the metadata: a JSON object of at most 16 KiB.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Value>,
    /// Replaces the whole policy.
    pub policy: Option<TenantPolicy>,
}

/// The `{id}` of `/admin/v1/tenants/{id}/...`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only describes the path to the OpenAPI document.
pub struct TenantId {
    /// The tenant's id.
    id: String,
}

/// A 404's description for operations on one tenant.
pub const NOT_FOUND: &str = "No tenant has this id, or it was deleted (`not_found`).";

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TenantListQuery {
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u32>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
    /// Only tenants whose id or display name contains this text, any case
    /// (at most 200 characters).
    pub q: Option<String>,
    /// Only tenants with this status.
    #[param(inline)]
    pub status: Option<ListedStatus>,
}

/// The statuses a listing can be narrowed to (deleted tenants are never listed).
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ListedStatus {
    Active,
    Suspended,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TenantList {
    pub data: Vec<Tenant>,
    pub next_cursor: Option<String>,
}

#[utoipa::path(post, path = "/admin/v1/tenants", tag = "tenants", operation_id = "createTenant", request_body = CreateTenant,
    responses((status = 201, description = "Created", body = Tenant,
        links(
            ("getTenant" = (operation_id = "getTenant", parameters(("id" = "$response.body#/id")))),
            ("updateTenant" = (operation_id = "updateTenant", parameters(("id" = "$response.body#/id")))),
            ("suspendTenant" = (operation_id = "suspendTenant", parameters(("id" = "$response.body#/id")))),
            ("resumeTenant" = (operation_id = "resumeTenant", parameters(("id" = "$response.body#/id")))),
            ("deleteTenant" = (operation_id = "deleteTenant", parameters(("id" = "$response.body#/id")))),
            ("createKey" = (operation_id = "createKey", parameters(("id" = "$response.body#/id")))),
            ("listKeys" = (operation_id = "listKeys", parameters(("id" = "$response.body#/id")))),
            ("createBudget" = (operation_id = "createBudget", parameters(("id" = "$response.body#/id")))),
            ("listBudgets" = (operation_id = "listBudgets", parameters(("id" = "$response.body#/id")))),
        )), (status = 409, description = "A tenant with this id exists (`conflict`), deleted ones included.")))]
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

#[utoipa::path(get, path = "/admin/v1/tenants", tag = "tenants", operation_id = "listTenants", params(TenantListQuery),
    responses((status = 200, description = "One page of tenants by id, deleted ones excluded", body = TenantList)))]
pub async fn list(
    State(state): State<AdminState>,
    _admin: Admin,
    AdminQuery(query): AdminQuery<TenantListQuery>,
) -> Result<Json<TenantList>, AdminError> {
    let limit = validate::page_limit(query.limit)?;
    let text = query.q.map(|q| q.trim().to_owned()).filter(|q| !q.is_empty());
    if text.as_ref().is_some_and(|q| q.chars().count() > 200 || q.chars().any(char::is_control)) {
        return Err(AdminError::invalid("q", "at most 200 characters, no control characters"));
    }
    let status = query.status.map(|s| match s {
        ListedStatus::Active => TenantStatus::Active,
        ListedStatus::Suspended => TenantStatus::Suspended,
    });
    let search = tollgate_store::TenantSearch { text, status };
    let rows = state.store.list_tenants(query.cursor.as_deref(), limit + 1, &search).await?;
    let (data, next_cursor) = validate::paginate(rows, limit, |t| t.id.clone());
    Ok(Json(TenantList { data, next_cursor }))
}

#[utoipa::path(get, path = "/admin/v1/tenants/{id}", tag = "tenants", operation_id = "getTenant", params(TenantId),
    responses((status = 200, description = "The tenant", body = Tenant), (status = 404, description = NOT_FOUND)))]
pub async fn get(
    State(state): State<AdminState>,
    _admin: Admin,
    AdminPath(id): AdminPath,
) -> Result<Json<Tenant>, AdminError> {
    Ok(Json(state.store.get_tenant(&id).await.map_err(not_found)?))
}

#[utoipa::path(patch, path = "/admin/v1/tenants/{id}", tag = "tenants", operation_id = "updateTenant", params(TenantId), request_body = UpdateTenant,
    responses((status = 200, description = "The updated tenant", body = Tenant), (status = 404, description = NOT_FOUND)))]
pub async fn update(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(id): AdminPath,
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

#[utoipa::path(post, path = "/admin/v1/tenants/{id}/suspend", tag = "tenants", operation_id = "suspendTenant", params(TenantId),
    responses((status = 200, description = "The suspended tenant", body = Tenant), (status = 404, description = NOT_FOUND)))]
pub async fn suspend(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(id): AdminPath,
) -> Result<Json<Tenant>, AdminError> {
    set_status(state, admin, id, TenantStatus::Suspended).await
}

#[utoipa::path(post, path = "/admin/v1/tenants/{id}/resume", tag = "tenants", operation_id = "resumeTenant", params(TenantId),
    responses((status = 200, description = "The active tenant", body = Tenant), (status = 404, description = NOT_FOUND)))]
pub async fn resume(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(id): AdminPath,
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
#[utoipa::path(delete, path = "/admin/v1/tenants/{id}", tag = "tenants", operation_id = "deleteTenant", params(TenantId),
    responses((status = 200, description = "The deleted tenant", body = Tenant), (status = 404, description = NOT_FOUND)))]
pub async fn delete(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(id): AdminPath,
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
