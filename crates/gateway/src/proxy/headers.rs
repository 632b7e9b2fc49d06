//! Which headers cross the gateway, in each direction.
//!
//! Everything not listed here passes through untouched (`openai-beta`,
//! `x-stainless-*`, provider-specific headers, …).

use http::{HeaderMap, HeaderName, header};

/// Connection-scoped headers (RFC 9110 §7.6.1) never cross a proxy.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Client → upstream. Dropped besides hop-by-hop headers:
/// - every credential the client sent (the gateway adds the upstream key);
/// - `host` and `content-length`, which the client sets for the new request;
/// - `accept-encoding`, so the upstream answers uncompressed and the gateway
///   can read usage from bodies and forward SSE frames as they come;
/// - `cookie`, which has no meaning to an API upstream;
/// - `x-request-id`, replaced by the gateway's own.
pub fn copy_request_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        let drop = is_hop_by_hop(name)
            || matches!(
                name.as_str(),
                "authorization"
                    | "api-key"
                    | "x-api-key"
                    | "host"
                    | "content-length"
                    | "accept-encoding"
                    | "cookie"
                    | "x-request-id"
            );
        if !drop {
            to.append(name.clone(), value.clone());
        }
    }
}

/// Upstream → client. Dropped besides hop-by-hop headers: `content-length`
/// (recomputed by the server), `set-cookie`, and the upstream's
/// `x-request-id`, which is passed on as `x-upstream-request-id` so both ids
/// can be quoted in a support ticket.
pub fn copy_response_headers(from: &HeaderMap, to: &mut HeaderMap) {
    static UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");
    for (name, value) in from {
        if is_hop_by_hop(name) || *name == header::CONTENT_LENGTH || *name == header::SET_COOKIE {
            continue;
        }
        if name.as_str() == "x-request-id" {
            to.insert(UPSTREAM_REQUEST_ID.clone(), value.clone());
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn client_credentials_and_hop_by_hop_headers_are_not_forwarded() {
        let mut from = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer tg-secret"),
            ("api-key", "k"),
            ("x-api-key", "k"),
            ("connection", "keep-alive"),
            ("host", "gw"),
            ("accept-encoding", "gzip"),
            ("openai-beta", "assistants=v2"),
            ("x-stainless-lang", "python"),
            ("content-type", "application/json"),
        ] {
            from.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let mut to = HeaderMap::new();
        copy_request_headers(&from, &mut to);
        let names: Vec<_> = to.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(to.contains_key("openai-beta") && to.contains_key("x-stainless-lang"));
        assert!(to.contains_key("content-type"));
    }

    #[test]
    fn upstream_request_id_is_renamed() {
        let mut from = HeaderMap::new();
        from.insert("x-request-id", HeaderValue::from_static("up-1"));
        from.insert("openai-processing-ms", HeaderValue::from_static("12"));
        from.insert("set-cookie", HeaderValue::from_static("a=b"));
        let mut to = HeaderMap::new();
        copy_response_headers(&from, &mut to);
        assert_eq!(to["x-upstream-request-id"], "up-1");
        assert_eq!(to["openai-processing-ms"], "12");
        assert!(!to.contains_key("set-cookie") && !to.contains_key("x-request-id"));
    }
}
