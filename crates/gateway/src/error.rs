//! The one place where failures become client responses.
//!
//! Every error a client sees is an OpenAI error envelope with the status the
//! SDKs expect. An error records whose fault it is (the client, the upstream
//! or the gateway), which decides the status and whether a retry can help.
//! Constructing or converting an error never logs: the trace layer logs each
//! response once, with its status.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use tollgate_openai::ErrorEnvelope;

/// Whose fault a failure is. Drives the status class, the ledger's error
/// class and, later, metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Upstream,
    Gateway,
}

impl Fault {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Upstream => "upstream",
            Self::Gateway => "gateway",
        }
    }
}

/// Why a tenant key was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Invalid,
    Revoked,
    Expired,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{}", auth_message(*.0))]
    Unauthenticated(AuthFailure),
    #[error("too many failed authentications from this address; retry later")]
    AuthThrottled { retry_after: std::time::Duration },
    #[error("this tenant is suspended; contact the gateway's administrators")]
    TenantSuspended,
    #[error("this API key may not use the model `{0}`")]
    ModelNotAllowed(String),
    #[error("the model `{0}` has no price configured, and this gateway refuses unpriced models")]
    ModelNotPriced(String),
    #[error("usage accounting is unavailable; try again shortly")]
    AccountingUnavailable,
    #[error("{message} for this tenant")]
    OverCap { param: &'static str, message: String },
    #[error("{}", throttled_message(.0))]
    RateLimited(crate::limits::Throttled),
    #[error(
        "You exceeded your current quota: the {period} budget {budget_id} is spent. Raise the budget or wait for the next period."
    )]
    BudgetExhausted { budget_id: String, period: &'static str },
    #[error("Too many requests are in flight against the {budget_id} budget right now; retry shortly.")]
    BudgetBusy { budget_id: String, retry_after: std::time::Duration },
    #[error(
        "the model `{0}` has no price configured, so a hard budget cannot bound its cost; ask the gateway's administrators to price it"
    )]
    UnpricedUnderBudget(String),
    #[error("{0}")]
    InvalidModel(&'static str),
    #[error(
        "the request body could not be checked against this tenant's policy (nested too deeply, or a number out of range)"
    )]
    PolicyUncheckable,
    #[error("you must provide a model parameter")]
    MissingModel,
    #[error("{0}")]
    InvalidJson(String),
    #[error("request bodies must not be compressed (content-encoding other than identity)")]
    UnsupportedContentEncoding,
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("failed to read the request body")]
    BodyRead,
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("unknown path {0}")]
    UnknownRoute(String),
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("the upstream could not be reached")]
    UpstreamUnavailable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the upstream is at its limit of requests in flight; retry shortly")]
    UpstreamBusy,
    /// The detail names what the upstream sent (and which setting to check)
    /// for the log line; the client gets the generic message.
    #[error("the upstream answered with something that is not an API response")]
    UpstreamBadResponse(String),
    /// The upstream refused the gateway's own credentials (401/403): a
    /// configuration fault of the gateway, not the tenant's key.
    #[error("the gateway could not authenticate to its upstream; contact the gateway's administrators")]
    UpstreamRejectedCredentials { status: u16 },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("this gateway's upstream does not serve the {0} API")]
    ApiNotServed(tollgate_openai::Api),
    #[error("internal error")]
    Internal,
}

fn throttled_message(t: &crate::limits::Throttled) -> String {
    use crate::limits::Kind;
    match (t.kind, t.too_large) {
        (Kind::Tokens, true) => {
            format!("Request too large: it needs more tokens than the limit of {} per minute", t.limit)
        }
        (Kind::Tokens, false) => format!("Rate limit reached: {} tokens per minute", t.limit),
        (Kind::Requests, _) => format!("Rate limit reached: {} requests per minute", t.limit),
        (Kind::Concurrency, _) => format!("Too many requests in flight: at most {} at once", t.limit),
    }
}

fn auth_message(failure: AuthFailure) -> &'static str {
    match failure {
        AuthFailure::Missing => {
            "You didn't provide an API key. Send it as `Authorization: Bearer tg-...` (or in an `api-key` header)."
        }
        AuthFailure::Invalid => "Incorrect API key provided.",
        AuthFailure::Revoked => "This API key has been revoked.",
        AuthFailure::Expired => "This API key has expired.",
    }
}

impl GatewayError {
    pub fn fault(&self) -> Fault {
        match self {
            Self::Unauthenticated(_)
            | Self::AuthThrottled { .. }
            | Self::TenantSuspended
            | Self::ModelNotAllowed(_)
            | Self::ModelNotPriced(_)
            | Self::OverCap { .. }
            | Self::RateLimited(_)
            | Self::BudgetExhausted { .. }
            | Self::BudgetBusy { .. }
            | Self::UnpricedUnderBudget(_)
            | Self::InvalidModel(_)
            | Self::MissingModel
            | Self::PolicyUncheckable
            | Self::InvalidJson(_)
            | Self::UnsupportedContentEncoding
            | Self::BodyTooLarge { .. }
            | Self::BodyRead
            | Self::RequestTimeout
            | Self::UnknownRoute(_)
            | Self::ApiNotServed(_)
            | Self::MethodNotAllowed { .. } => Fault::Client,
            Self::UpstreamUnavailable | Self::UpstreamTimeout | Self::UpstreamBusy | Self::UpstreamBadResponse(_) => {
                Fault::Upstream
            }
            Self::ShuttingDown
            | Self::Internal
            | Self::AccountingUnavailable
            | Self::UpstreamRejectedCredentials { .. } => Fault::Gateway,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::RateLimited(_)
            | Self::BudgetExhausted { .. }
            | Self::BudgetBusy { .. }
            | Self::AuthThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::TenantSuspended | Self::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            Self::InvalidJson(_)
            | Self::PolicyUncheckable
            | Self::InvalidModel(_)
            | Self::MissingModel
            | Self::BodyRead
            | Self::ModelNotPriced(_)
            | Self::UnpricedUnderBudget(_)
            | Self::OverCap { .. } => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedContentEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::UnknownRoute(_) | Self::ApiNotServed(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::UpstreamUnavailable | Self::UpstreamBadResponse(_) | Self::UpstreamRejectedCredentials { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::ShuttingDown | Self::AccountingUnavailable | Self::UpstreamBusy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable `code` of the envelope.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated(AuthFailure::Missing | AuthFailure::Invalid) => "invalid_api_key",
            Self::Unauthenticated(AuthFailure::Revoked) => "api_key_revoked",
            Self::Unauthenticated(AuthFailure::Expired) => "api_key_expired",
            Self::TenantSuspended => "tenant_suspended",
            Self::ModelNotAllowed(_) => "model_not_allowed",
            Self::ModelNotPriced(_) | Self::UnpricedUnderBudget(_) => "model_not_priced",
            Self::AccountingUnavailable => "accounting_unavailable",
            Self::OverCap { .. } => "over_policy_cap",
            Self::RateLimited(_) | Self::BudgetBusy { .. } | Self::AuthThrottled { .. } => "rate_limit_exceeded",
            Self::BudgetExhausted { .. } => "insufficient_quota",
            Self::InvalidJson(_) => "invalid_json",
            Self::UnsupportedContentEncoding => "unsupported_content_encoding",
            Self::InvalidModel(_) => "invalid_model",
            Self::PolicyUncheckable => "invalid_request_body",
            Self::MissingModel => "missing_required_parameter",
            Self::BodyTooLarge { .. } => "request_too_large",
            Self::BodyRead => "invalid_body",
            Self::RequestTimeout => "request_timeout",
            Self::UnknownRoute(_) => "unknown_url",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamBusy => "upstream_busy",
            Self::UpstreamBadResponse(_) => "upstream_bad_response",
            Self::UpstreamRejectedCredentials { .. } => "upstream_auth_failed",
            Self::ShuttingDown => "shutting_down",
            Self::ApiNotServed(_) => "api_not_served",
            Self::Internal => "internal_error",
        }
    }

    /// The envelope `type`, following OpenAI's vocabulary.
    pub fn kind(&self) -> &'static str {
        if let Self::BudgetExhausted { .. } = self {
            return "insufficient_quota";
        }
        if let Self::BudgetBusy { .. } | Self::AuthThrottled { .. } = self {
            return "requests";
        }
        if let Self::RateLimited(t) = self {
            return match t.kind {
                crate::limits::Kind::Tokens => "tokens",
                _ => "requests",
            };
        }
        match self.fault() {
            Fault::Client => "invalid_request_error",
            Fault::Upstream => "upstream_error",
            Fault::Gateway => "server_error",
        }
    }

    /// What the log line says beyond the client's message, if anything.
    pub fn log_detail(&self) -> Option<String> {
        match self {
            Self::UpstreamBadResponse(detail) => Some(detail.clone()),
            Self::UpstreamRejectedCredentials { status } => Some(format!(
                "the upstream answered {status} to the gateway's own key: check the upstream key (upstream.api_key_env / api_key_file) and its permissions"
            )),
            _ => None,
        }
    }

    pub fn envelope(&self) -> ErrorEnvelope {
        let envelope = ErrorEnvelope::new(self.to_string(), self.kind(), self.code());
        match self {
            Self::ModelNotAllowed(_)
            | Self::ModelNotPriced(_)
            | Self::UnpricedUnderBudget(_)
            | Self::InvalidModel(_)
            | Self::MissingModel => envelope.with_param("model"),
            Self::OverCap { param, .. } => envelope.with_param(*param),
            _ => envelope,
        }
    }
}

// Constants, not `&str`s: a string name is validated again on every insert,
// and refusals can come by the thousand in a burst.
const X_SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");
const RETRY_AFTER_MS: http::HeaderName = http::HeaderName::from_static("retry-after-ms");

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response = (status, self.envelope().to_json_bytes()).into_response();
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Self::RateLimited(t) = &self {
            // What the SDKs wait for before retrying a throttled request.
            let headers = response.headers_mut();
            write_retry_after(headers, t.retry_after);
            let retry = if t.too_large { "false" } else { "true" };
            headers.insert(X_SHOULD_RETRY, HeaderValue::from_static(retry));
            // The limit that refused the request, spent.
            let allowance = match t.kind {
                crate::limits::Kind::Requests => {
                    crate::limits::Allowance { requests: Some((t.limit, 0)), tokens: None, reset: t.retry_after }
                }
                crate::limits::Kind::Tokens => {
                    crate::limits::Allowance { requests: None, tokens: Some((t.limit, 0)), reset: t.retry_after }
                }
                crate::limits::Kind::Concurrency => crate::limits::Allowance::default(),
            };
            allowance.write(headers);
        } else if let Self::BudgetBusy { retry_after, .. } | Self::AuthThrottled { retry_after } = &self {
            // Other requests hold the budget for now: a retry can succeed.
            write_retry_after(response.headers_mut(), *retry_after);
            response.headers_mut().insert(X_SHOULD_RETRY, HeaderValue::from_static("true"));
        } else if (self.fault() == Fault::Client && !matches!(self, Self::RequestTimeout))
            || matches!(self, Self::UpstreamRejectedCredentials { .. })
        {
            // A retry of the same bad request cannot succeed, nor can one
            // while the gateway's own upstream key is refused; tell the SDKs
            // so they do not retry. (A body that stalled on the way may well
            // arrive the next time: 408 keeps the SDKs' own retry rule.)
            response.headers_mut().insert(X_SHOULD_RETRY, HeaderValue::from_static("false"));
        }
        response.extensions_mut().insert(self.fault());
        response.extensions_mut().insert(ErrorLog {
            code: self.code(),
            detail: self.log_detail(),
            message: self.to_string(),
        });
        response
    }
}

/// Rides on an error response so the trace layer, which logs every response
/// once, can say why (handlers and errors never log themselves).
#[derive(Debug, Clone)]
pub struct ErrorLog {
    pub code: &'static str,
    pub detail: Option<String>,
    /// What the client was told (for re-rendering in another API's shape).
    pub message: String,
}

/// `retry-after-ms` and `retry-after`, which the SDKs wait for before retrying.
fn write_retry_after(headers: &mut http::HeaderMap, after: std::time::Duration) {
    let ms = after.as_millis().max(1);
    if let Ok(v) = HeaderValue::try_from(ms.to_string()) {
        headers.insert(RETRY_AFTER_MS, v);
    }
    if let Ok(v) = HeaderValue::try_from(ms.div_ceil(1000).to_string()) {
        headers.insert(header::RETRY_AFTER, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn renders_an_openai_envelope_with_status() {
        let response = GatewayError::BodyTooLarge { limit: 10 }.into_response();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let envelope: ErrorEnvelope = serde_json::from_slice(&body).unwrap();
        assert_eq!(envelope.error.code.as_deref(), Some("request_too_large"));
        assert_eq!(envelope.error.kind, "invalid_request_error");
    }

    #[test]
    fn upstream_faults_are_5xx_and_client_faults_4xx() {
        assert_eq!(GatewayError::UpstreamTimeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(GatewayError::UpstreamUnavailable.status(), StatusCode::BAD_GATEWAY);
        assert!(GatewayError::InvalidJson("x".into()).status().is_client_error());
        assert_eq!(GatewayError::Internal.fault(), Fault::Gateway);
    }
}
