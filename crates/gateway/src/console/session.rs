//! Console sessions: a random secret in an HttpOnly, SameSite=Strict cookie,
//! stored only as its keyed hash; and the CSRF token every change must carry
//! in `x-csrf-token`, derived from that secret with the gateway's key (so
//! it needs no storage and another site can neither read nor compute it).
//!
//! A session is as strong as the admin token it was opened with, no more:
//! each request checks that the session has not ended or expired, that the
//! admin token has not been revoked since, and (bootstrap sessions) that the
//! bootstrap token is still the one signed in with.

use axum::http::{HeaderMap, HeaderValue, Method};
use chrono::{DateTime, Utc};
use http::request::Parts;
use rand::RngCore;
use subtle::ConstantTimeEq;
use tollgate_store::{ConsoleSession, StoreError};

use crate::admin::AdminState;
use crate::admin::auth::Admin;
use crate::admin::error::AdminError;

/// The cookie holding the session secret.
pub const COOKIE: &str = "tollgate_console";
/// The header a change carries the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// A session secret as the browser holds it: 32 random bytes, hex.
pub struct Secret(String);

impl Secret {
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(hex::encode(bytes))
    }

    /// The stored id: a keyed hash, so the database never holds the secret.
    pub fn id(&self, state: &AdminState) -> String {
        state.hasher.hash_hex(&format!("console-session:{}", self.0))
    }

    /// The CSRF token of this session.
    pub fn csrf_token(&self, state: &AdminState) -> String {
        state.hasher.hash_hex(&format!("console-csrf:{}", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The session secret in the request's cookies, if any (well formed).
pub fn presented(headers: &HeaderMap) -> Option<Secret> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|v| Secret(v.to_owned()))
}

/// What signing in opens: the secret for the cookie and the session row.
pub fn open(state: &AdminState, admin: &SignedIn, now: DateTime<Utc>) -> (Secret, ConsoleSession) {
    let secret = Secret::generate();
    let ttl = chrono::Duration::from_std(state.console.session_ttl).unwrap_or(chrono::Duration::hours(12));
    let session = ConsoleSession {
        id: secret.id(state),
        actor: admin.actor.clone(),
        admin_token_id: admin.admin_token_id.clone(),
        credential: admin.credential.clone(),
        created_at: now,
        expires_at: now + ttl,
        ended_at: None,
    };
    (secret, session)
}

/// Who signed in, and with what (for tying the session to it).
pub struct SignedIn {
    pub actor: String,
    pub admin_token_id: Option<String>,
    /// Keyed hash of the token signed in with.
    pub credential: String,
}

/// A request authenticated by a console session.
pub struct Authenticated {
    pub admin: Admin,
    pub secret: Secret,
    pub session: ConsoleSession,
}

/// Checks the session cookie; for a change (anything but GET and HEAD) also
/// the CSRF token and, when the browser sends one, the Origin.
pub async fn authenticate(parts: &Parts, state: &AdminState, secret: Secret) -> Result<Authenticated, AdminError> {
    let session = match state.store.get_console_session(&secret.id(state)).await {
        Ok(s) => s,
        Err(StoreError::NotFound) => return Err(signed_out("no such console session: sign in again")),
        Err(e) => return Err(e.into()),
    };
    if session.ended_at.is_some() {
        return Err(signed_out("this console session has ended: sign in again"));
    }
    if session.expires_at <= state.clock.now() {
        return Err(signed_out("this console session has expired: sign in again"));
    }
    match &session.admin_token_id {
        Some(token_id) => match state.store.get_admin_token(token_id).await {
            Ok(token) if token.revoked_at.is_none() => {}
            Ok(_) | Err(StoreError::NotFound) => {
                return Err(signed_out("the admin token of this session has been revoked"));
            }
            Err(e) => return Err(e.into()),
        },
        None => {
            let current = state.bootstrap_digest.as_ref().map(hex::encode);
            let same = current.is_some_and(|c| bool::from(c.as_bytes().ct_eq(session.credential.as_bytes())));
            if !same {
                return Err(signed_out("the bootstrap token has changed since this session began"));
            }
        }
    }
    if !matches!(parts.method, Method::GET | Method::HEAD) {
        check_change(&parts.headers, &secret.csrf_token(state))?;
    }
    Ok(Authenticated { admin: Admin { actor: session.actor.clone() }, secret, session })
}

fn signed_out(message: &str) -> AdminError {
    AdminError { code: "session_expired", ..AdminError::unauthorized(message) }
}

/// A change must carry the session's CSRF token, and must not come from a
/// page of another origin.
fn check_change(headers: &HeaderMap, expected: &str) -> Result<(), AdminError> {
    let refused = |message: &str| AdminError {
        status: http::StatusCode::FORBIDDEN,
        code: "csrf_failed",
        message: message.to_owned(),
        param: None,
    };
    let presented = headers.get(CSRF_HEADER).map(HeaderValue::as_bytes).unwrap_or_default();
    if !bool::from(presented.ct_eq(expected.as_bytes())) {
        return Err(refused("a console change needs the session's CSRF token in x-csrf-token"));
    }
    if !same_origin(headers) {
        return Err(refused("a console change must come from the console's own origin"));
    }
    Ok(())
}

/// True when the request has no `Origin` (not sent by every browser for
/// same-origin requests) or one whose host is the request's `Host`.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(http::header::ORIGIN) else { return true };
    let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, rest)| rest);
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// The `Set-Cookie` value that stores `secret` for `max_age_secs` (0 clears it).
pub fn cookie(secret: &str, max_age_secs: i64, secure: bool) -> String {
    let secure = if secure { "; Secure" } else { "" };
    format!("{COOKIE}={secret}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}")
}

/// Whether the cookie should be `Secure`: always when configured, else when
/// the request came over https through a proxy that says so.
pub fn secure(state: &AdminState, headers: &HeaderMap) -> bool {
    state.console.secure_cookies
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').next().is_some_and(|p| p.trim().eq_ignore_ascii_case("https")))
}
