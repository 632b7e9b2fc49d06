//! Request extractors for the admin API that fail with our error shape.

use axum::extract::{FromRequest, FromRequestParts, Request};
use bytes::Bytes;
use http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::AdminError;

/// JSON body: malformed JSON, unknown fields and wrong types become a 400
/// whose `param` is the path of the offending field.
pub struct AdminJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AdminJson<T> {
    type Rejection = AdminError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = Bytes::from_request(request, state).await.map_err(|_| AdminError {
            status: http::StatusCode::PAYLOAD_TOO_LARGE,
            code: "request_too_large",
            message: "the request body is too large".to_owned(),
            param: None,
        })?;
        let deserializer = &mut serde_json::Deserializer::from_slice(&body);
        serde_path_to_error::deserialize(deserializer).map(AdminJson).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." { String::new() } else { path };
            AdminError {
                status: http::StatusCode::BAD_REQUEST,
                code: "invalid_body",
                message: e.inner().to_string(),
                param: (!field.is_empty()).then_some(field),
            }
        })
    }
}

/// Query string, with the same error shape.
pub struct AdminQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for AdminQuery<T> {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        parse_query(query).map(AdminQuery)
    }
}

fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, AdminError> {
    axum::extract::Query::<T>::try_from_uri(
        &format!("/?{query}").parse().map_err(|_| AdminError::invalid("query", "bad query string"))?,
    )
    .map(|q| q.0)
    .map_err(|e| AdminError::invalid("query", e.body_text()))
}
