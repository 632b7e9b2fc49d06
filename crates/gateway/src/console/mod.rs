//! The admin console: a browser client of the admin API, served by the
//! binary itself on the admin listener. Its pages are static files built
//! into the binary (`crates/gateway/console/`: HTML, CSS and plain ES
//! modules, no build step); all they read and change goes through
//! `/admin/v1`, authenticated by a session cookie instead of a bearer token
//! (`session`), so the console can do nothing the admin API would refuse,
//! and every change is validated and audited as the API's own.
//!
//! Here: the pages (`assets`) and signing in and out (`/console/api/session`).

mod assets;
pub mod session;

use axum::extract::State;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use http::request::Parts;
use http::{HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};

use crate::admin::AdminState;
use crate::admin::auth::{guarded, verify_token};
use crate::admin::error::AdminError;
use crate::admin::extract::AdminJson;

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route("/console/", get(assets::index))
        .route("/console/assets/{file}", get(assets::file))
        .route("/console/api/session", get(current).post(sign_in).delete(sign_out))
        .layer(axum::extract::DefaultBodyLimit::max(4 * 1024))
        .with_state(state)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    token: String,
}

/// What the console knows of its session (never the secret).
#[derive(Serialize)]
struct SessionView {
    actor: String,
    /// To send in `x-csrf-token` with every change.
    csrf_token: String,
    expires_at: chrono::DateTime<chrono::Utc>,
}

async fn sign_in(
    State(state): State<AdminState>,
    parts: Parts,
    AdminJson(body): AdminJson<SignIn>,
) -> Result<Response, AdminError> {
    if !session::same_origin(&parts.headers) {
        return Err(AdminError {
            status: StatusCode::FORBIDDEN,
            code: "csrf_failed",
            message: "sign in from the console's own origin".to_owned(),
            param: None,
        });
    }
    let token = body.token.trim();
    let signed_in = guarded(&parts, &state, true, async |_, state| {
        if token.is_empty() || token.contains(char::is_whitespace) {
            return Err(AdminError::unauthorized("invalid admin token"));
        }
        verify_token(token, state).await
    })
    .await?;
    let (secret, stored) = session::open(&state, &signed_in, state.clock.now());
    state.store.create_console_session(&stored).await?;
    let max_age = state.console.session_ttl.as_secs() as i64;
    let view =
        SessionView { actor: stored.actor, csrf_token: secret.csrf_token(&state), expires_at: stored.expires_at };
    let cookie = session::cookie(secret.as_str(), max_age, session::secure(&state, &parts.headers));
    Ok(with_cookie((StatusCode::CREATED, Json(view)).into_response(), &cookie))
}

async fn current(State(state): State<AdminState>, parts: Parts) -> Result<Json<SessionView>, AdminError> {
    let signed_in = authenticated(&parts, &state).await?;
    Ok(Json(SessionView {
        actor: signed_in.admin.actor,
        csrf_token: signed_in.secret.csrf_token(&state),
        expires_at: signed_in.session.expires_at,
    }))
}

async fn sign_out(State(state): State<AdminState>, parts: Parts) -> Result<Response, AdminError> {
    let signed_in = authenticated(&parts, &state).await?;
    state.store.end_console_session(&signed_in.session.id, &signed_in.admin.actor).await?;
    let cookie = session::cookie("", 0, session::secure(&state, &parts.headers));
    Ok(with_cookie(StatusCode::NO_CONTENT.into_response(), &cookie))
}

async fn authenticated(parts: &Parts, state: &AdminState) -> Result<session::Authenticated, AdminError> {
    let cookie = session::presented(&parts.headers);
    guarded(parts, state, cookie.is_some(), async |parts, state| match cookie {
        Some(secret) => session::authenticate(parts, state, secret).await,
        None => Err(AdminError { code: "session_expired", ..AdminError::unauthorized("not signed in") }),
    })
    .await
}

fn with_cookie(mut response: Response, cookie: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
