//! Admin authentication: the bootstrap token from the environment, or an
//! admin token issued through the API (`tga-<id>-<secret>`, stored hashed).
//! Admin calls are rare, so tokens are checked against the database each
//! time: a revoked admin token stops working at once on every replica.

use axum::extract::FromRequestParts;
use http::request::Parts;
use subtle::ConstantTimeEq;
use tollgate_store::StoreError;

use super::AdminState;
use super::error::AdminError;
use crate::auth::credentials::presented_key;
use crate::auth::hasher::digest_from_hex;
use crate::auth::token::{self, ADMIN_TOKEN_PREFIX};

/// Who is making an admin call; recorded as the audit log's actor.
pub struct Admin {
    pub actor: String,
}

impl FromRequestParts<AdminState> for Admin {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, Self::Rejection> {
        // Past its failures for the minute, an address is refused before
        // any token is checked (see `auth::throttle`).
        let ip = crate::auth::peer_ip(&parts.extensions);
        let now_ms = state.clock.now_ms();
        if state.failures.refused(ip, now_ms).is_some() {
            return Err(AdminError::throttled());
        }
        let verified = verify(parts, state).await;
        if verified.as_ref().is_err_and(|e| e.status == http::StatusCode::UNAUTHORIZED) {
            state.failures.record(ip, now_ms);
        }
        verified
    }
}

async fn verify(parts: &Parts, state: &AdminState) -> Result<Admin, AdminError> {
    let presented =
        presented_key(&parts.headers).ok_or_else(|| AdminError::unauthorized("an admin token is required"))?;
    if let Some(bootstrap) = &state.bootstrap_digest {
        let digest = state.hasher.digest(presented);
        if bool::from(digest.ct_eq(bootstrap)) {
            return Ok(Admin { actor: "bootstrap".to_owned() });
        }
    }
    let invalid = || AdminError::unauthorized("invalid admin token");
    let parsed = token::parse(ADMIN_TOKEN_PREFIX, presented).ok_or_else(invalid)?;
    let stored = match state.store.get_admin_token(parsed.id).await {
        Ok(t) => t,
        Err(StoreError::NotFound) => return Err(invalid()),
        Err(e) => return Err(e.into()),
    };
    let digest = digest_from_hex(&stored.secret_hash).ok_or_else(invalid)?;
    if !state.hasher.verify(parsed.secret, &digest) {
        return Err(invalid());
    }
    if stored.revoked_at.is_some() {
        return Err(AdminError::unauthorized("this admin token has been revoked"));
    }
    Ok(Admin { actor: format!("admin_token:{}", stored.id) })
}
