//! Which headers cross the gateway, in each direction: allow-lists, since
//! anything passed by default is a way for one party to reach the other.
//!
//! Client → upstream: only headers an OpenAI-compatible API reads from its
//! callers (content negotiation, the SDKs' own `x-stainless-*` telemetry,
//! `openai-beta`, idempotency keys, trace context), each bounded in size,
//! plus any the operator adds with `upstream.forward_request_headers`.
//! Never the client's credentials, never `OpenAI-Organization` or
//! `OpenAI-Project` (which would let a tenant choose which of the
//! operator's organizations pays), never hop-by-hop headers.
//!
//! Upstream → client: only what a client needs to read the answer. Never
//! the upstream account's organization or project, its `x-ratelimit-*`
//! (those describe the operator's key, shared by every tenant; the
//! gateway's own replace them), `server`, `via` or cookies.

use http::{HeaderMap, HeaderName};

/// Headers forwarded to the upstream, besides `x-stainless-*`.
/// `anthropic-version` and `anthropic-beta` choose the Messages API's
/// version and features; `x-goog-api-client` is google-genai's telemetry.
const REQUEST_ALLOWED: &[&str] = &[
    "content-type",
    "accept",
    "user-agent",
    "openai-beta",
    "idempotency-key",
    "traceparent",
    "tracestate",
    "anthropic-version",
    "anthropic-beta",
    "x-goog-api-client",
];
/// Headers never forwarded, whatever the operator allows (an entry such as
/// `x-*` or `*` included): the client's credentials, the organization and
/// project that choose who pays, and what the gateway writes itself for the
/// request it sends (`host`, the body's length and framing) or what belongs
/// to one connection. Forwarding the client's `host` beside the upstream's,
/// or its `content-length` for a body the gateway rewrote, would make the
/// request invalid.
const NEVER_FORWARDED: &[&str] = &[
    "host",
    "authorization",
    "proxy-authorization",
    "api-key",
    "x-api-key",
    "x-goog-api-key",
    "cookie",
    "openai-organization",
    "openai-project",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];
/// The SDKs' telemetry prefix; a few such headers are forwarded.
const STAINLESS_PREFIX: &str = "x-stainless-";
const MAX_STAINLESS_HEADERS: usize = 16;
/// A forwarded header value longer than this is dropped, so no client can
/// make the upstream refuse the request (431) and have it blamed on the
/// upstream.
const MAX_FORWARDED_VALUE_BYTES: usize = 1024;

/// Headers relayed from the upstream to the client (its `x-request-id` is
/// relayed as `x-upstream-request-id`).
const RESPONSE_ALLOWED: &[&str] = &[
    "content-type",
    "content-encoding",
    "content-language",
    "cache-control",
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
    "openai-processing-ms",
    "openai-version",
    "anthropic-version",
];

/// The request headers an operator allows on top of the built-in list:
/// exact names, or prefixes written with a trailing `*`.
#[derive(Debug, Clone, Default)]
pub struct ForwardedHeaders {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl ForwardedHeaders {
    pub fn new(extra: &[String]) -> Self {
        let mut allowed = Self::default();
        for name in extra {
            let name = name.to_ascii_lowercase();
            match name.strip_suffix('*') {
                Some(prefix) => allowed.prefixes.push(prefix.to_owned()),
                None => allowed.exact.push(name),
            }
        }
        allowed
    }

    fn allows(&self, name: &str) -> bool {
        // The built-in list never names a never-forwarded header, so it is
        // consulted first; the never-forwarded list only guards the
        // operator's entries (most deployments have none, and this runs for
        // every header of every request).
        if REQUEST_ALLOWED.contains(&name) {
            return true;
        }
        if self.exact.is_empty() && self.prefixes.is_empty() || NEVER_FORWARDED.contains(&name) {
            return false;
        }
        self.exact.iter().any(|e| e == name) || self.prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// Client → upstream: copies the allowed headers of bounded size.
    pub fn copy_request_headers(&self, from: &HeaderMap, to: &mut HeaderMap) {
        let mut stainless = 0;
        for (name, value) in from {
            if value.len() > MAX_FORWARDED_VALUE_BYTES {
                continue;
            }
            let name_str = name.as_str();
            let allowed = if name_str.starts_with(STAINLESS_PREFIX) {
                stainless += 1;
                stainless <= MAX_STAINLESS_HEADERS
            } else {
                self.allows(name_str)
            };
            if allowed {
                to.append(name.clone(), value.clone());
            }
        }
    }
}

/// Upstream → client: copies the allowed headers, the upstream's request id
/// as `x-upstream-request-id` so both ids can be quoted in a support ticket.
pub fn copy_response_headers(from: &HeaderMap, to: &mut HeaderMap) {
    static UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");
    for (name, value) in from {
        if name.as_str() == "x-request-id" {
            to.insert(UPSTREAM_REQUEST_ID.clone(), value.clone());
        } else if RESPONSE_ALLOWED.contains(&name.as_str()) {
            to.append(name.clone(), value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_static(k), HeaderValue::from_str(v).unwrap());
        }
        m
    }

    #[test]
    fn only_allowed_client_headers_are_forwarded() {
        let from = map(&[
            ("authorization", "Bearer tg-secret"),
            ("api-key", "k"),
            ("x-api-key", "k"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("host", "gw"),
            ("accept-encoding", "gzip"),
            ("openai-organization", "org-operator-2"),
            ("openai-project", "proj-x"),
            ("cookie", "a=b"),
            ("x-custom", "1"),
            ("openai-beta", "assistants=v2"),
            ("x-stainless-lang", "python"),
            ("content-type", "application/json"),
        ]);
        let mut to = HeaderMap::new();
        ForwardedHeaders::default().copy_request_headers(&from, &mut to);
        let mut names: Vec<_> = to.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "openai-beta", "x-stainless-lang"]);
    }

    #[test]
    fn operators_can_allow_more_and_sizes_and_counts_are_bounded() {
        let mut from = map(&[("x-fake-chunks", "3"), ("x-trace-tag", "t"), ("user-agent", &"a".repeat(5000))]);
        for i in 0..40 {
            from.append(HeaderName::try_from(format!("x-stainless-n{i}")).unwrap(), HeaderValue::from_static("v"));
        }
        let mut to = HeaderMap::new();
        ForwardedHeaders::new(&["x-fake-*".to_owned(), "X-Trace-Tag".to_owned()]).copy_request_headers(&from, &mut to);
        assert!(to.contains_key("x-fake-chunks") && to.contains_key("x-trace-tag"));
        assert!(!to.contains_key("user-agent"), "an oversized value is dropped");
        assert_eq!(to.keys().filter(|k| k.as_str().starts_with("x-stainless-")).count(), MAX_STAINLESS_HEADERS);
    }

    #[test]
    fn credentials_host_and_framing_are_never_forwarded_even_when_an_operator_allows_everything() {
        let from = map(&[
            ("host", "gateway.internal"),
            ("authorization", "Bearer tg-secret"),
            ("x-api-key", "tg-secret"),
            ("x-goog-api-key", "tg-secret"),
            ("cookie", "a=b"),
            ("openai-organization", "org-operator-2"),
            ("content-length", "12"),
            ("transfer-encoding", "chunked"),
            ("connection", "close"),
            ("x-trace-tag", "t"),
            ("content-type", "application/json"),
        ]);
        let mut to = HeaderMap::new();
        ForwardedHeaders::new(&["*".to_owned(), "Host".to_owned(), "Authorization".to_owned()])
            .copy_request_headers(&from, &mut to);
        let mut names: Vec<_> = to.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "x-trace-tag"]);
    }

    #[test]
    fn the_built_in_list_names_no_header_that_is_never_forwarded() {
        // `allows` consults the built-in list before the never-forwarded one.
        for name in REQUEST_ALLOWED {
            assert!(!NEVER_FORWARDED.contains(name), "{name}");
        }
        let from = map(&[("authorization", "Bearer tg-secret"), ("content-type", "application/json")]);
        let mut to = HeaderMap::new();
        ForwardedHeaders::default().copy_request_headers(&from, &mut to);
        assert_eq!(to.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["content-type"]);
    }

    #[test]
    fn only_allowed_upstream_headers_reach_the_client() {
        let from = map(&[
            ("x-request-id", "up-1"),
            ("openai-processing-ms", "12"),
            ("openai-organization", "org-operator"),
            ("openai-project", "proj"),
            ("x-ratelimit-remaining-requests", "4999"),
            ("via", "1.1 proxy"),
            ("server", "cloudflare"),
            ("set-cookie", "a=b"),
            ("content-type", "application/json"),
            ("retry-after", "3"),
        ]);
        let mut to = HeaderMap::new();
        copy_response_headers(&from, &mut to);
        let mut names: Vec<_> = to.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "openai-processing-ms", "retry-after", "x-upstream-request-id"]);
        assert_eq!(to["x-upstream-request-id"], "up-1");
    }
}
