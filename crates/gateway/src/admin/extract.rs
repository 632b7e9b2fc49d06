//! Request extractors for the admin API that fail with our error shape.

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use bytes::Bytes;
use http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::AdminError;
use super::strict_json::StrictValue;

/// JSON body: malformed JSON, unknown fields and wrong types (an array where
/// an object belongs included) become a 400 whose `param` is the path of the
/// offending field.
pub struct AdminJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for AdminJson<T> {
    type Rejection = AdminError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = Bytes::from_request(request, state).await.map_err(|rejection| {
            if crate::server::body::is_timeout(&rejection) {
                return AdminError {
                    status: http::StatusCode::REQUEST_TIMEOUT,
                    code: "request_timeout",
                    message: "the request body did not arrive in time".to_owned(),
                    param: None,
                };
            }
            AdminError {
                status: http::StatusCode::PAYLOAD_TOO_LARGE,
                code: "request_too_large",
                message: "the request body is too large".to_owned(),
                param: None,
            }
        })?;
        let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| AdminError {
            status: http::StatusCode::BAD_REQUEST,
            code: "invalid_body",
            message: e.to_string(),
            param: None,
        })?;
        serde_path_to_error::deserialize(StrictValue(&value)).map(AdminJson).map_err(|e| {
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

/// The one id in a resource's path. No resource has an id that is not valid
/// UTF-8 once percent-decoded, or that holds a NUL (ids are slugs or
/// generated, and Postgres text cannot hold NUL): such a path names nothing,
/// a 404 in our error shape rather than axum's plain-text rejection or a
/// database error.
pub struct AdminPath(pub String);

impl<S: Send + Sync> FromRequestParts<S> for AdminPath {
    type Rejection = AdminError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(id)) if !id.contains('\0') => Ok(AdminPath(id)),
            _ => Err(AdminError::not_found("resource")),
        }
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
    let uri: http::Uri = format!("/?{query}").parse().map_err(|_| AdminError::invalid("query", "bad query string"))?;
    // Values are filters and cursors compared with stored text, which
    // cannot hold NUL: refuse them here rather than fail in the database.
    let pairs = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&uri)
        .map_err(|e| AdminError::invalid("query", e.body_text()))?;
    if let Some((name, _)) = pairs.0.iter().find(|(_, value)| value.contains('\0')) {
        return Err(AdminError::invalid(name.clone(), "must not contain NUL characters"));
    }
    axum::extract::Query::<T>::try_from_uri(&uri).map(|q| q.0).map_err(|e| AdminError::invalid("query", e.body_text()))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Filter {
        #[allow(dead_code)]
        model: Option<String>,
    }

    #[test]
    fn query_values_with_nul_name_their_parameter() {
        let error = parse_query::<Filter>("model=a%00b").unwrap_err();
        assert_eq!((error.status.as_u16(), error.param.as_deref()), (400, Some("model")));
        assert!(parse_query::<Filter>("model=gpt-4.1").is_ok());
        assert_eq!(parse_query::<Filter>("colour=red").unwrap_err().param.as_deref(), Some("query"));
    }
}
