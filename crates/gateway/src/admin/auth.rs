//! Admin authentication: the bootstrap token from the environment, or an
//! admin token issued through the API (`tga-<id>-<secret>`, stored hashed).
//! Admin calls are rare, so tokens are checked against the database each
//! time: a revoked admin token stops working at once on every replica.
//! The console's requests carry a session cookie instead (`console::session`).

use axum::extract::FromRequestParts;
use http::request::Parts;
use subtle::ConstantTimeEq;
use tollgate_store::StoreError;

use super::AdminState;
use super::error::AdminError;
use crate::auth::credentials::presented_key;
use crate::auth::hasher::digest_from_hex;
use crate::auth::token::{self, ADMIN_TOKEN_PREFIX};
use crate::console::session::{self, SignedIn};

/// Who is making an admin call; recorded as the audit log's actor.
pub struct Admin {
    pub actor: String,
}

impl FromRequestParts<AdminState> for Admin {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Self, Self::Rejection> {
        let token = presented_key(&parts.headers).map(str::to_owned);
        // The console's requests: a session cookie instead of a token.
        let cookie = if token.is_none() { session::presented(&parts.headers) } else { None };
        let presented = token.is_some() || cookie.is_some();
        guarded(parts, state, presented, async |parts, state| match (token, cookie) {
            (Some(token), _) => verify_token(&token, state).await.map(|signed_in| Admin { actor: signed_in.actor }),
            (None, Some(secret)) => session::authenticate(parts, state, secret).await.map(|a| a.admin),
            (None, None) => Err(AdminError::unauthorized("an admin token is required")),
        })
        .await
    }
}

/// Runs an authentication under the per-address throttle: past its failures
/// for the minute, an address is refused before any credential is checked
/// (see `auth::throttle`), and each 401 for a credential that was
/// `presented` counts as a failure (a request with none, such as the
/// console's first look for a session, guesses nothing).
pub async fn guarded<T>(
    parts: &Parts,
    state: &AdminState,
    presented: bool,
    check: impl AsyncFnOnce(&Parts, &AdminState) -> Result<T, AdminError>,
) -> Result<T, AdminError> {
    let ip = crate::auth::peer_ip(&parts.extensions);
    let now_ms = state.clock.now_ms();
    if state.failures.refused(ip, now_ms).is_some() {
        return Err(AdminError::throttled());
    }
    let verified = check(parts, state).await;
    if presented && verified.as_ref().is_err_and(|e| e.status == http::StatusCode::UNAUTHORIZED) {
        state.failures.record(ip, now_ms);
    }
    verified
}

/// Checks an admin token: the bootstrap token or an issued, unrevoked one.
pub async fn verify_token(presented: &str, state: &AdminState) -> Result<SignedIn, AdminError> {
    if let Some(bootstrap) = &state.bootstrap_digest {
        let digest = state.hasher.digest(presented);
        if bool::from(digest.ct_eq(bootstrap)) {
            return Ok(SignedIn {
                actor: "bootstrap".to_owned(),
                admin_token_id: None,
                credential: hex::encode(digest),
            });
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
    Ok(SignedIn {
        actor: format!("admin_token:{}", stored.id),
        admin_token_id: Some(stored.id),
        credential: stored.secret_hash,
    })
}
