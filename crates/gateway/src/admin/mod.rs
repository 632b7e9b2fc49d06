//! The admin REST API under `/admin/v1`: tenants, keys, budgets, admin
//! tokens, the audit log and usage reports, authenticated by admin tokens,
//! documented by an OpenAPI 3.1 document generated from these handlers
//! (`openapi`).

mod audit;
pub mod auth;
mod budgets;
pub mod error;
pub mod extract;
mod keys;
pub mod openapi;
mod routing;
mod strict_json;
mod tenants;
mod tokens;
pub mod usage;
mod validate;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tollgate_store::{Change, Store};

use crate::auth::hasher::{Digest, SecretHasher};
use crate::auth::sync::CacheSync;
use crate::budget::BudgetBook;
use crate::clock::Clock;
pub use error::AdminError;
pub use openapi::openapi_json;

/// Admin request bodies are small JSON documents.
const MAX_ADMIN_BODY: usize = 64 * 1024;

#[derive(Clone)]
pub struct AdminState {
    pub store: Store,
    pub sync: Arc<CacheSync>,
    pub hasher: SecretHasher,
    /// Keyed hash of the bootstrap token (never the token itself).
    pub bootstrap_digest: Option<Digest>,
    pub budgets: Arc<BudgetBook>,
    /// The routes in force (read-only here).
    pub routes: Arc<crate::routing::reload::Routes>,
    /// Failed admin authentications per address (see `auth::throttle`).
    pub failures: Arc<crate::auth::throttle::FailedAttempts>,
    /// Decides key expiry in views, validation and rotation grace, as
    /// authentication does.
    pub clock: Clock,
    /// Console sign-in settings (sessions authenticate admin calls too).
    pub console: crate::config::ConsoleConfig,
}

impl AdminState {
    /// Applies a change to this replica's cache at once; other replicas get
    /// it by notification. A failure here is healed by the next refresh.
    async fn changed(&self, change: Change) {
        if let Err(e) = self.sync.apply(&change).await {
            tracing::warn!(error = %e, "cannot apply an admin change to the key cache yet");
        }
    }

    async fn reload_all(&self) {
        if let Err(e) = self.sync.refresh_all().await {
            tracing::warn!(error = %e, "cannot reload the key cache yet");
        }
    }
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/admin/v1/openapi.json", get(openapi::serve))
        .route("/admin/v1/tenants", post(tenants::create).get(tenants::list))
        .route("/admin/v1/tenants/{id}", get(tenants::get).patch(tenants::update).delete(tenants::delete))
        .route("/admin/v1/tenants/{id}/suspend", post(tenants::suspend))
        .route("/admin/v1/tenants/{id}/resume", post(tenants::resume))
        .route("/admin/v1/tenants/{id}/keys", post(keys::create).get(keys::list))
        .route("/admin/v1/keys/{key_id}", get(keys::get).patch(keys::update))
        .route("/admin/v1/keys/{key_id}/revoke", post(keys::revoke))
        .route("/admin/v1/keys/{key_id}/rotate", post(keys::rotate))
        .route("/admin/v1/tenants/{id}/budgets", post(budgets::create).get(budgets::list))
        .route("/admin/v1/budgets/{budget_id}", axum::routing::patch(budgets::update).delete(budgets::delete))
        .route("/admin/v1/alerts", get(budgets::alerts))
        .route("/admin/v1/admin-tokens", post(tokens::create).get(tokens::list))
        .route("/admin/v1/admin-tokens/{token_id}/revoke", post(tokens::revoke))
        .route("/admin/v1/audit", get(audit::list))
        .route("/admin/v1/routes", get(routing::routes))
        .route("/admin/v1/upstreams", get(routing::upstreams))
        .route("/admin/v1/usage/summary", get(usage::admin_summary))
        .route("/admin/v1/usage/records", get(usage::admin_records))
        .route("/admin/v1/usage/records.csv", get(usage::admin_csv))
        .layer(DefaultBodyLimit::max(MAX_ADMIN_BODY))
        .with_state(state)
}
