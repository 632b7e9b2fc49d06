//! Reading the key a client presents: `Authorization: Bearer <key>`, or the
//! `api-key` / `x-api-key` / `x-goog-api-key` headers some clients and SDKs
//! send instead; on the Gemini routes also the `key` query parameter, as
//! Google's API takes it. Parsed strictly: a malformed header is no
//! credential at all.

use http::{HeaderMap, Uri};

pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || has_blank(token) {
            return None;
        }
        return Some(token);
    }
    for name in ["api-key", "x-api-key", "x-goog-api-key"] {
        if let Some(value) = headers.get(name) {
            let token = value.to_str().ok()?;
            return (!token.is_empty() && !has_blank(token)).then_some(token);
        }
    }
    None
}

/// Whether a header value holds whitespace. `HeaderValue::to_str` admits
/// only visible ASCII, spaces and tabs, so those two are all there is to
/// look for (a byte search, rather than decoding every character to ask
/// Unicode).
fn has_blank(value: &str) -> bool {
    value.as_bytes().contains(&b' ') || value.as_bytes().contains(&b'\t')
}

/// The `key` query parameter (Google's API takes the key there too).
pub fn query_key(uri: &Uri) -> Option<&str> {
    uri.query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("key="))
        .filter(|token| !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic() && b != b'%'))
}

/// `uri` without its `key` query parameter, so that no later stage (a log
/// line, a trace, the upstream request) can see the tenant's key. `None`
/// when there was none to remove.
pub fn without_query_key(uri: &Uri) -> Option<Uri> {
    let query = uri.query()?;
    if !query.split('&').any(|pair| pair == "key" || pair.starts_with("key=")) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|pair| *pair != "key" && !pair.starts_with("key=")).collect();
    let path_and_query =
        if kept.is_empty() { uri.path().to_owned() } else { format!("{}?{}", uri.path(), kept.join("&")) };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), v.parse().unwrap())).collect()
    }

    #[test]
    fn bearer_tokens_are_read_strictly() {
        assert_eq!(presented_key(&headers(&[("authorization", "Bearer abc")])), Some("abc"));
        assert_eq!(presented_key(&headers(&[("authorization", "bearer abc")])), Some("abc"));
        for bad in ["Bearer", "Bearer ", "Bearer  abc", "Basic abc", "Bearer a b", "Bearer a\tb", "Bearer\tabc", "abc"]
        {
            assert_eq!(presented_key(&headers(&[("authorization", bad)])), None, "{bad:?}");
        }
    }

    #[test]
    fn api_key_headers_are_accepted() {
        assert_eq!(presented_key(&headers(&[("api-key", "k1")])), Some("k1"));
        assert_eq!(presented_key(&headers(&[("x-api-key", "k2")])), Some("k2"));
        assert_eq!(presented_key(&headers(&[("x-goog-api-key", "k3")])), Some("k3"));
        assert_eq!(presented_key(&headers(&[])), None);
        for bad in ["k 1", "k\t1", ""] {
            assert_eq!(presented_key(&headers(&[("x-api-key", bad)])), None, "{bad:?}");
        }
    }

    #[test]
    fn the_key_query_parameter_is_read_and_removed() {
        let uri: Uri = "/v1beta/models/m:streamGenerateContent?alt=sse&key=tg_a.b".parse().unwrap();
        assert_eq!(query_key(&uri), Some("tg_a.b"));
        assert_eq!(without_query_key(&uri).unwrap().to_string(), "/v1beta/models/m:streamGenerateContent?alt=sse");
        let only: Uri = "/v1beta/models/m:generateContent?key=x".parse().unwrap();
        assert_eq!(without_query_key(&only).unwrap().to_string(), "/v1beta/models/m:generateContent");
        let none: Uri = "/v1beta/models/m:generateContent?alt=sse".parse().unwrap();
        assert_eq!(query_key(&none), None);
        assert!(without_query_key(&none).is_none());
        let empty: Uri = "/x?key=&alt=sse".parse().unwrap();
        assert_eq!(query_key(&empty), None);
        assert_eq!(without_query_key(&empty).unwrap().to_string(), "/x?alt=sse");
    }
}
