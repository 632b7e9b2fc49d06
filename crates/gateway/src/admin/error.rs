//! Admin API errors: the same envelope as the OpenAI surface, with a stable
//! `code` and, for validation errors, the offending field in `param`.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use tollgate_openai::ErrorEnvelope;
use tollgate_store::StoreError;

#[derive(Debug)]
pub struct AdminError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl AdminError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "validation_failed",
            message: message.into(),
            param: Some(field.into()),
        }
    }

    pub fn not_found(what: &str) -> Self {
        Self { status: StatusCode::NOT_FOUND, code: "not_found", message: format!("{what} not found"), param: None }
    }

    pub fn unauthorized(message: &str) -> Self {
        Self { status: StatusCode::UNAUTHORIZED, code: "invalid_admin_token", message: message.to_owned(), param: None }
    }

    pub fn throttled() -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "too_many_failed_attempts",
            message: "too many failed authentications from this address; retry in a minute".to_owned(),
            param: None,
        }
    }

    pub fn unavailable() -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "database_unavailable",
            message: "the database is unavailable; try again".to_owned(),
            param: None,
        }
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => Self::not_found("resource"),
            StoreError::Conflict(message) => {
                Self { status: StatusCode::CONFLICT, code: "conflict", message, param: None }
            }
            StoreError::Database(ref db) => {
                tracing::error!(error = %db, "admin API database error");
                Self::unavailable()
            }
            StoreError::Corrupt(_) | StoreError::Migrate(_) => {
                tracing::error!(error = %e, "admin API storage error");
                Self {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    code: "internal_error",
                    message: "internal error".to_owned(),
                    param: None,
                }
            }
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let kind = if self.status.is_server_error() { "server_error" } else { "invalid_request_error" };
        let mut envelope = ErrorEnvelope::new(self.message, kind, self.code);
        if let Some(param) = self.param {
            envelope = envelope.with_param(param);
        }
        let mut response = (self.status, envelope.to_json_bytes()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}
