//! `/admin/v1/tenants/{id}/keys` and `/admin/v1/keys/{key_id}`

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use http::StatusCode;
use secrecy::ExposeSecret;
use serde::{Deserialize, Deserializer, Serialize};
use tollgate_store::{ApiKey, Change, KeyPatch, Limits, NewKey, StoreError};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::error::AdminError;
use super::extract::{AdminJson, AdminPath, AdminQuery};
use super::tenants::{NOT_FOUND as TENANT_NOT_FOUND, PageQuery, TenantId};
use super::{AdminState, validate};
use crate::auth::token::{self, TENANT_KEY_PREFIX};

/// Longest rotation grace period accepted.
const MAX_GRACE: Duration = Duration::from_secs(30 * 24 * 3600);

/// The `{key_id}` of `/admin/v1/keys/{key_id}/...`.
#[derive(IntoParams)]
#[into_params(parameter_in = Path)]
#[allow(dead_code)] // Only describes the path to the OpenAPI document.
pub struct KeyId {
    /// The key's public id: the `<id>` of `tg-<id>-<secret>`.
    key_id: String,
}

const NOT_FOUND: &str = "No key has this id (`not_found`).";

#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

/// A key as the admin API shows it: never the secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    #[serde(flatten)]
    pub key: ApiKey,
    pub status: KeyStatus,
}

impl KeyView {
    /// The key and its status as of `now` (the gateway's clock, which also
    /// decides when authentication starts refusing it).
    pub fn at(key: ApiKey, now: DateTime<Utc>) -> Self {
        let status = if key.revoked_at.is_some() {
            KeyStatus::Revoked
        } else if key.expires_at.is_some_and(|t| t <= now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        };
        Self { key, status }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub key: KeyView,
    /// The full key, `tg-<id>-<secret>`. Shown once: it cannot be retrieved later.
    pub secret: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RotatedKey {
    pub key: KeyView,
    /// The new full key. Shown once.
    pub secret: String,
    /// The key that was rotated, valid until its `expires_at`.
    pub previous_key: KeyView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub data: Vec<KeyView>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// 1-200 characters, not only spaces, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub name: String,
    /// RFC 3339 time, in the future, after which the key stops working.
    pub expires_at: Option<DateTime<Utc>>,
    /// Exact model names or glob patterns (each 1-200 characters without
    /// spaces); empty or absent allows every model.
    #[serde(default)]
    #[schema(max_items = 256)]
    pub allowed_models: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKey {
    /// 1-200 characters, not only spaces, no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001f\\u007f-\\u009f]*[^\\s\\u0000-\\u001f\\u007f-\\u009f][^\\u0000-\\u001f\\u007f-\\u009f]*$"
    )]
    pub name: Option<String>,
    /// A new expiry, or `null` to remove it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<DateTime<Utc>>)]
    pub expires_at: Option<Option<DateTime<Utc>>>,
    /// Replaces the list; empty allows every model.
    #[schema(max_items = 256)]
    pub allowed_models: Option<Vec<String>>,
    pub limits: Option<Limits>,
}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKey {
    /// How long the old key keeps working, e.g. `"24h"`, `"1h 30m"`, `"0s"` (at most 30
    /// days): numbers with units `ns`, `us`, `ms`, `s`, `m`, `h`, `d`, `w`, `M`, `y` or their
    /// long forms.
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String, example = "24h", pattern = "^\\s*([0-9][0-9\\s]*(\\.[0-9]*)?\\s*[A-Za-zµ]+\\s*)+$")]
    pub grace_period: Duration,
}

#[utoipa::path(post, path = "/admin/v1/tenants/{id}/keys", tag = "keys", operation_id = "createKey", params(TenantId), request_body = CreateKey,
    responses((status = 201, description = "Created; the secret is in this answer only", body = CreatedKey,
        links(
            ("getKey" = (operation_id = "getKey", parameters(("key_id" = "$response.body#/key/id")))),
            ("updateKey" = (operation_id = "updateKey", parameters(("key_id" = "$response.body#/key/id")))),
            ("revokeKey" = (operation_id = "revokeKey", parameters(("key_id" = "$response.body#/key/id")))),
            ("rotateKey" = (operation_id = "rotateKey", parameters(("key_id" = "$response.body#/key/id")))),
        )), (status = 404, description = TENANT_NOT_FOUND)))]
pub async fn create(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(tenant_id): AdminPath,
    AdminJson(body): AdminJson<CreateKey>,
) -> Result<(StatusCode, Json<CreatedKey>), AdminError> {
    validate::name("name", &body.name)?;
    validate::models(&body.allowed_models)?;
    validate::limits(&body.limits)?;
    if body.expires_at.is_some_and(|t| t <= state.clock.now()) {
        return Err(AdminError::invalid("expires_at", "must be in the future"));
    }
    let issued = token::issue(TENANT_KEY_PREFIX);
    let new = NewKey {
        id: issued.id.clone(),
        tenant_id,
        name: body.name,
        secret_hash: state.hasher.hash_hex(issued.secret.expose_secret()),
        expires_at: body.expires_at,
        allowed_models: body.allowed_models,
        limits: body.limits,
    };
    let key = state.store.create_key(&new, &admin.actor).await.map_err(|e| match e {
        StoreError::NotFound => AdminError::not_found("tenant"),
        other => other.into(),
    })?;
    state.changed(Change::Key(key.id.clone())).await;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey { key: KeyView::at(key, state.clock.now()), secret: issued.full.expose_secret().to_owned() }),
    ))
}

#[utoipa::path(get, path = "/admin/v1/tenants/{id}/keys", tag = "keys", operation_id = "listKeys", params(TenantId, PageQuery),
    responses((status = 200, description = "One page of the tenant's keys by id, revoked ones included", body = KeyList), (status = 404, description = TENANT_NOT_FOUND)))]
pub async fn list(
    State(state): State<AdminState>,
    _admin: Admin,
    AdminPath(tenant_id): AdminPath,
    AdminQuery(query): AdminQuery<PageQuery>,
) -> Result<Json<KeyList>, AdminError> {
    let limit = validate::page_limit(query.limit)?;
    state.store.get_tenant(&tenant_id).await.map_err(|e| match e {
        StoreError::NotFound => AdminError::not_found("tenant"),
        other => other.into(),
    })?;
    let rows = state.store.list_keys(&tenant_id, query.cursor.as_deref(), limit + 1).await?;
    let (keys, next_cursor) = validate::paginate(rows, limit, |k| k.id.clone());
    let now = state.clock.now();
    Ok(Json(KeyList { data: keys.into_iter().map(|k| KeyView::at(k, now)).collect(), next_cursor }))
}

#[utoipa::path(get, path = "/admin/v1/keys/{key_id}", tag = "keys", operation_id = "getKey", params(KeyId),
    responses((status = 200, description = "The key, without its secret", body = KeyView), (status = 404, description = NOT_FOUND)))]
pub async fn get(
    State(state): State<AdminState>,
    _admin: Admin,
    AdminPath(key_id): AdminPath,
) -> Result<Json<KeyView>, AdminError> {
    let key = state.store.get_key(&key_id).await.map_err(key_not_found)?;
    Ok(Json(KeyView::at(key, state.clock.now())))
}

#[utoipa::path(patch, path = "/admin/v1/keys/{key_id}", tag = "keys", operation_id = "updateKey", params(KeyId), request_body = UpdateKey,
    responses((status = 200, description = "The updated key", body = KeyView), (status = 404, description = NOT_FOUND)))]
pub async fn update(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(key_id): AdminPath,
    AdminJson(body): AdminJson<UpdateKey>,
) -> Result<Json<KeyView>, AdminError> {
    if let Some(name) = &body.name {
        validate::name("name", name)?;
    }
    if let Some(models) = &body.allowed_models {
        validate::models(models)?;
    }
    if let Some(limits) = &body.limits {
        validate::limits(limits)?;
    }
    let patch = KeyPatch {
        name: body.name,
        expires_at: body.expires_at,
        allowed_models: body.allowed_models,
        limits: body.limits,
    };
    let key = state.store.update_key(&key_id, &patch, &admin.actor).await.map_err(key_not_found)?;
    state.changed(Change::Key(key_id)).await;
    Ok(Json(KeyView::at(key, state.clock.now())))
}

#[utoipa::path(post, path = "/admin/v1/keys/{key_id}/revoke", tag = "keys", operation_id = "revokeKey", params(KeyId),
    responses((status = 200, description = "The revoked key (revoking twice keeps the first time)", body = KeyView), (status = 404, description = NOT_FOUND)))]
pub async fn revoke(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(key_id): AdminPath,
) -> Result<Json<KeyView>, AdminError> {
    let key = state.store.revoke_key(&key_id, &admin.actor).await.map_err(key_not_found)?;
    state.changed(Change::Key(key_id)).await;
    Ok(Json(KeyView::at(key, state.clock.now())))
}

/// Issues a new key with the same tenant, name, models and limits; the old
/// key keeps working for `grace_period`.
#[utoipa::path(post, path = "/admin/v1/keys/{key_id}/rotate", tag = "keys", operation_id = "rotateKey", params(KeyId), request_body = RotateKey,
    responses((status = 201, description = "The new key and its secret, and the old key with its new expiry", body = RotatedKey,
        links(
            ("getKey" = (operation_id = "getKey", parameters(("key_id" = "$response.body#/key/id")))),
            ("revokeKey" = (operation_id = "revokeKey", parameters(("key_id" = "$response.body#/key/id")))),
            ("rotateKey" = (operation_id = "rotateKey", parameters(("key_id" = "$response.body#/key/id")))),
        )), (status = 404, description = NOT_FOUND), (status = 409, description = "The key is revoked or was already rotated (`conflict`).")))]
pub async fn rotate(
    State(state): State<AdminState>,
    admin: Admin,
    AdminPath(key_id): AdminPath,
    AdminJson(body): AdminJson<RotateKey>,
) -> Result<(StatusCode, Json<RotatedKey>), AdminError> {
    if body.grace_period > MAX_GRACE {
        return Err(AdminError::invalid("grace_period", "must be at most 30 days"));
    }
    let old = state.store.get_key(&key_id).await.map_err(key_not_found)?;
    let issued = token::issue(TENANT_KEY_PREFIX);
    let new = NewKey {
        id: issued.id.clone(),
        tenant_id: old.tenant_id.clone(),
        name: old.name.clone(),
        secret_hash: state.hasher.hash_hex(issued.secret.expose_secret()),
        expires_at: old.expires_at,
        allowed_models: old.allowed_models.clone(),
        limits: old.limits.clone(),
    };
    let grace = chrono::Duration::from_std(body.grace_period).unwrap_or(chrono::Duration::zero());
    let (previous, key) =
        state.store.rotate_key(&key_id, &new, state.clock.now() + grace, &admin.actor).await.map_err(key_not_found)?;
    state.changed(Change::Key(key_id)).await;
    state.changed(Change::Key(key.id.clone())).await;
    Ok((
        StatusCode::CREATED,
        Json(RotatedKey {
            key: KeyView::at(key, state.clock.now()),
            secret: issued.full.expose_secret().to_owned(),
            previous_key: KeyView::at(previous, state.clock.now()),
        }),
    ))
}

fn key_not_found(e: StoreError) -> AdminError {
    match e {
        StoreError::NotFound => AdminError::not_found("key"),
        other => other.into(),
    }
}
