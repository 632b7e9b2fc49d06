//! Reading the key a client presents: `Authorization: Bearer <key>`, or the
//! `api-key` / `x-api-key` headers some clients send instead. Parsed
//! strictly: a malformed header is no credential at all.

use http::HeaderMap;

pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(char::is_whitespace) {
            return None;
        }
        return Some(token);
    }
    for name in ["api-key", "x-api-key"] {
        if let Some(value) = headers.get(name) {
            let token = value.to_str().ok()?;
            return (!token.is_empty() && !token.contains(char::is_whitespace)).then_some(token);
        }
    }
    None
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
        for bad in ["Bearer", "Bearer ", "Bearer  abc", "Basic abc", "Bearer a b", "abc"] {
            assert_eq!(presented_key(&headers(&[("authorization", bad)])), None, "{bad:?}");
        }
    }

    #[test]
    fn api_key_headers_are_accepted() {
        assert_eq!(presented_key(&headers(&[("api-key", "k1")])), Some("k1"));
        assert_eq!(presented_key(&headers(&[("x-api-key", "k2")])), Some("k2"));
        assert_eq!(presented_key(&headers(&[])), None);
    }
}
