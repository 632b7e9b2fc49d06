//! `/admin/v1/admin-tokens`: further admin tokens, beside the bootstrap one.

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tollgate_store::{AdminToken, Change, StoreError};
use utoipa::ToSchema;

use super::auth::Admin;
use super::error::AdminError;
use super::extract::{AdminJson, AdminPath};
use super::{AdminState, validate};
use crate::auth::token::{self, ADMIN_TOKEN_PREFIX};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAdminToken {
    /// 1-200 characters, not only spaces, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedAdminToken {
    pub token: AdminToken,
    /// The full token, `tga-<id>-<secret>`. Shown once.
    pub secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdminTokenList {
    pub data: Vec<AdminToken>,
}

#[utoipa::path(post, path = "/admin/v1/admin-tokens", tag = "admin tokens", operation_id = "createAdminToken", request_body = CreateAdminToken,
    responses((status = 201, description = "Created; the secret is in this answer only", body = CreatedAdminToken,
        links(
            ("revokeAdminToken" = (operation_id = "revokeAdminToken", parameters(("token_id" = "$response.body#/token/id")))),
        ))))]
pub async fn create(
    State(state): State<AdminState>,
    admin: Admin,
    AdminJson(body): AdminJson<CreateAdminToken>,
) -> Result<(StatusCode, Json<CreatedAdminToken>), AdminError> {
    validate::name("name", &body.name)?;
    let issued = token::issue(ADMIN_TOKEN_PREFIX);
    let hash = state.hasher.hash_hex(issued.secret.expose_secret());
    let token = state.store.create_admin_token(&issued.id, &body.name, &hash, &admin.actor).await?;
    Ok((StatusCode::CREATED, Json(CreatedAdminToken { token, secret: issued.full.expose_secret().to_owned() })))
}

#[utoipa::path(get, path = "/admin/v1/admin-tokens", tag = "admin tokens", operation_id = "listAdminTokens",
    responses((status = 200, description = "Every admin token, revoked ones included, without secrets", body = AdminTokenList)))]
pub async fn list(State(state): State<AdminState>, _admin: Admin) -> Result<Json<AdminTokenList>, AdminError> {
    Ok(Json(AdminTokenList { data: state.store.list_admin_tokens().await? }))
}

#[utoipa::path(post, path = "/admin/v1/admin-tokens/{token_id}/revoke", tag = "admin tokens", operation_id = "revokeAdminToken",
    params(("token_id" = String, Path, description = "The token's public id: the `<id>` of `tga-<id>-<secret>`.")),
    responses((status = 200, description = "The revoked token (revoking twice keeps the first time)", body = AdminToken), (status = 404, description = "No admin token has this id (`not_found`).")))]
pub async fn revoke(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(token_id): AdminPath,
) -> Result<Json<AdminToken>, AdminError> {
    let token = state.store.revoke_admin_token(&token_id, &admin.actor).await.map_err(|e| match e {
        StoreError::NotFound => AdminError::not_found("admin token"),
        other => other.into(),
    })?;
    state.changed(Change::AdminToken(token_id)).await;
    Ok(Json(token))
}
