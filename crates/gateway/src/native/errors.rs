//! Errors in each API's own envelope, so each SDK raises its own exception
//! types and retries only what it should.
//!
//! Every error the gateway makes is rendered once, as an OpenAI envelope,
//! with an [`ErrorLog`] riding on the response (see `error.rs`). On the
//! Gemini and Anthropic routes this layer, above the key check, rewrites
//! such a response's body into that API's envelope, keeping its status and
//! headers (`retry-after`, `x-should-retry`): Google's
//! `{"error":{"code","message","status"}}`, Anthropic's
//! `{"type":"error","error":{"type","message"}}`. Upstream answers carry no
//! `ErrorLog` and pass untouched: they are already in the API's shape.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderValue, header};
use tollgate_openai::{Api, anthropic, gemini};

use crate::error::ErrorLog;

/// The body of a gateway error in `api`'s shape.
pub fn body(api: Api, status: u16, error: &ErrorLog) -> Vec<u8> {
    match api {
        Api::Gemini => gemini::error_body(status, &error.message, error.code),
        Api::Anthropic => anthropic::error_body(status, &error.message),
        Api::OpenAi => tollgate_openai::ErrorEnvelope::new(error.message.clone(), "invalid_request_error", error.code)
            .to_json_bytes(),
    }
}

/// Rewrites the gateway's own error responses into `api`'s envelope.
pub async fn in_api_shape(State(api): State<Api>, request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let Some(error) = response.extensions().get::<ErrorLog>().cloned() else { return response };
    let (mut head, _) = response.into_parts();
    let body = body(api, head.status.as_u16(), &error);
    head.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    head.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(head, Body::from(body))
}
