//! The request-side stages of a `/v1` call: reading the body, parsing it
//! once, authorizing its model, and building the bytes to forward.

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, header};
use serde_json::Value;
use tollgate_openai::RequestPeek;
use tollgate_openai::rewrite;

use super::{Proxy, body, identifiers};
use crate::auth::Principal;
use crate::error::GatewayError;

/// Reads the body: uncompressed, under the size limit, and UTF-8.
pub async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, GatewayError> {
    // The gateway reads the body to check it, so it must be the bytes it
    // reads: a compressed body would pass unchecked.
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(GatewayError::UnsupportedContentEncoding);
    }
    let body = body::read_limited(body, headers, limit).await?;
    // JSON is UTF-8 (RFC 8259); the peek skips strings it does not read
    // without checking them, so the whole body is checked here, at once.
    if let Err(e) = std::str::from_utf8(&body) {
        return Err(GatewayError::InvalidJson(format!(
            "the request body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        )));
    }
    Ok(body)
}

/// Parses the body once: the fields the gateway acts on, every other member
/// checked to be JSON and skipped.
pub fn parse(body: &[u8]) -> Result<RequestPeek<'_>, GatewayError> {
    RequestPeek::parse(body).map_err(|e| GatewayError::InvalidJson(e.to_string()))
}

/// The request's model. Every endpoint here needs one; a missing one must
/// not slip past an allow-list, and none may be stored or logged unbounded.
pub fn model<'p>(peek: &'p RequestPeek<'_>) -> Result<&'p str, GatewayError> {
    let model = peek.model.as_deref().ok_or(GatewayError::MissingModel)?;
    identifiers::check_model(model)?;
    Ok(model)
}

/// The key's model allow-list, for the model asked for and every model its
/// route may send, and the pricing gate for each of those.
pub fn authorize(proxy: &Proxy, principal: &Principal, model: &str, candidates: &[&str]) -> Result<(), GatewayError> {
    // Without a route the only candidate is the model itself.
    let routed_to = candidates.iter().copied().filter(|c| *c != model);
    for name in std::iter::once(model).chain(routed_to) {
        if !principal.key.models.allows(name) {
            return Err(GatewayError::ModelNotAllowed(name.to_owned()));
        }
    }
    for name in candidates {
        if proxy.accounting.reject_unpriced && !proxy.accounting.is_billable(name) {
            return Err(GatewayError::ModelNotPriced((*name).to_owned()));
        }
    }
    Ok(())
}

/// The bytes sent upstream.
#[derive(Debug)]
pub struct Forwarded {
    pub body: Bytes,
    /// The gateway asked for stream usage on the client's behalf: the tap
    /// hides it from the client.
    pub strip_usage: bool,
}

/// Endpoints whose streams can carry usage when asked with
/// `stream_options.include_usage`.
fn supports_stream_usage(endpoint: &str) -> bool {
    matches!(endpoint, "/v1/chat/completions" | "/v1/completions")
}

/// The body to forward: the client's bytes, with the policy's edits and,
/// for streams, usage asked for on the client's behalf (so every stream is
/// billed from the upstream's own counts), in one rewrite. With neither,
/// the client's bytes go as they are; with only the usage option, it is
/// spliced in without parsing the body again.
pub fn forwarded_body(
    body: &Bytes,
    peek: &RequestPeek<'_>,
    edits: &[(&'static str, Option<Value>)],
    endpoint: &str,
) -> Result<Forwarded, GatewayError> {
    let ask_usage = peek.is_stream() && supports_stream_usage(endpoint) && !peek.client_asked_for_usage();
    let rewritten = match (edits.is_empty(), ask_usage) {
        (true, false) => return Ok(Forwarded { body: body.clone(), strip_usage: false }),
        (true, true) => tollgate_openai::stream_options::with_include_usage(body, peek.has_stream_options(), false),
        (false, _) => rewrite::rewrite(body, edits, ask_usage),
    };
    // The body parsed as JSON already; only one the rewrite cannot hold
    // (nested past its limit) fails here, and it was not checked.
    let rewritten = rewritten.ok_or(GatewayError::PolicyUncheckable)?;
    Ok(Forwarded { body: Bytes::from(rewritten), strip_usage: ask_usage })
}

/// The upstream path of a `/v1` POST endpoint: the route's own path after
/// `/v1`, never the client's query string (no endpoint here defines one).
pub fn upstream_path(endpoint: &str) -> &str {
    endpoint.strip_prefix("/v1").unwrap_or(endpoint)
}

/// The endpoint as recorded and labelled: the route, never the raw path
/// (a model id in the path would make metric series without bound).
pub fn endpoint_name(path: &str) -> &str {
    if path.starts_with("/v1/models/") { "/v1/models/{id}" } else { path }
}

/// The model id of `GET /v1/models/{id}`, decoded and checked: no encoded
/// separators (`%2F`, `%5C`), valid UTF-8, and a model name that is a safe
/// path (no dot or empty segments), so it cannot walk the upstream's tree.
pub fn model_id_from_path(raw: &str) -> Result<String, GatewayError> {
    let lower = raw.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") {
        return Err(GatewayError::InvalidModel("the model id in the path must not contain encoded separators"));
    }
    let id = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| GatewayError::InvalidModel("the model id in the path is not valid UTF-8"))?;
    identifiers::check_model_path(&id)?;
    Ok(id.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn post_endpoints_map_to_their_own_upstream_path() {
        assert_eq!(upstream_path("/v1/chat/completions"), "/chat/completions");
        assert_eq!(endpoint_name("/v1/models/some-id"), "/v1/models/{id}");
    }

    #[test]
    fn model_ids_in_paths_cannot_traverse() {
        assert_eq!(model_id_from_path("google/gemini-2.5-pro").unwrap(), "google/gemini-2.5-pro");
        assert_eq!(model_id_from_path("gemini%2D2.5").unwrap(), "gemini-2.5");
        for bad in
            ["..", "..%2F..%2Ffiles", "%2e%2e", "%2E%2E/files", "gemini-x%2F..%2F..%2Fstats", "a/../b", "a%5Cb", "%ff"]
        {
            assert!(model_id_from_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bounded_model_is_required() {
        let model_of = |body: &[u8]| parse(body).and_then(|p| model(&p).map(str::to_owned));
        assert_eq!(model_of(br#"{"model":"gpt-4.1","messages":[]}"#).unwrap(), "gpt-4.1");
        assert_eq!(model_of(br#"{"model":"google\/gemini"}"#).unwrap(), "google/gemini", "escapes are decoded");
        assert!(matches!(model_of(br#"{"messages":[]}"#), Err(GatewayError::MissingModel)));
        assert!(matches!(model_of(br#"{"model":null}"#), Err(GatewayError::MissingModel)));
        assert!(matches!(model_of(br#"{"model":"a b"}"#), Err(GatewayError::InvalidModel(_))));
    }

    #[test]
    fn the_forwarded_body_is_the_clients_unless_something_must_change() {
        let plain = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
        let peek = parse(&plain).unwrap();
        let same = forwarded_body(&plain, &peek, &[], "/v1/chat/completions").unwrap();
        assert_eq!(same.body, plain);
        assert!(!same.strip_usage);

        let stream = Bytes::from_static(br#"{"model":"m","stream":true,"stream_options":null,"max_tokens":9}"#);
        let peek = parse(&stream).unwrap();
        let edited =
            forwarded_body(&stream, &peek, &[("max_tokens", Some(serde_json::json!(5)))], "/v1/chat/completions")
                .unwrap();
        assert!(edited.strip_usage);
        let sent: Value = serde_json::from_slice(&edited.body).unwrap();
        assert_eq!(sent["stream_options"], serde_json::json!({"include_usage": true}));
        assert_eq!(sent["max_tokens"], 5);
        assert_eq!(String::from_utf8_lossy(&edited.body).matches("stream_options").count(), 1);
    }
}
