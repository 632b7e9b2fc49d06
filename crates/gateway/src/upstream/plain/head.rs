//! A request's head as it goes on the wire, and a response's head as it
//! comes back: status, headers, and how its body is framed.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};

/// Response headers at most, as hyper allows by default.
const MAX_HEADERS: usize = 100;

/// The request line and headers, ending with the blank line. `Host` is
/// among `headers` (the caller writes it); the body's length is written
/// here, from the body itself.
pub fn encode_request(method: &Method, path_and_query: &str, headers: &HeaderMap, body_len: usize) -> Vec<u8> {
    let mut head = Vec::with_capacity(256 + headers.len() * 48);
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(path_and_query.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    // As hyper: a length for any body, and for an empty one only where the
    // method is expected to carry one.
    if body_len > 0 || !matches!(*method, Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS) {
        head.extend_from_slice(b"content-length: ");
        head.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// How a response's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (`HEAD`, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Whatever comes until the upstream closes the connection.
    UntilClose,
}

#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// Whether the connection can carry another request once this body has
    /// been read to its end.
    pub keep_alive: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("the upstream sent an invalid response head: {0}")]
    Invalid(String),
    #[error("the upstream sent conflicting or invalid content-length headers")]
    InvalidLength,
    #[error("the upstream answered with 101 Switching Protocols, which the gateway does not ask for")]
    Upgrade,
}

/// Parses a response head off the front of `buf`; `None` while the buffer
/// does not hold all of it. Interim (1xx) responses are skipped.
pub fn parse_response(buf: &mut BytesMut, method: &Method) -> Result<Option<ResponseHead>, HeadError> {
    loop {
        // Slots left uninitialised: an array of `EMPTY_HEADER`s is written
        // whole (3 KiB) before every parse.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut []);
        let len =
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(HeadError::Invalid(e.to_string())),
            };
        let code = parsed.code.unwrap_or_default();
        let status = StatusCode::from_u16(code).map_err(|_| HeadError::Invalid(format!("status {code}")))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(HeadError::Upgrade);
        }
        if status.is_informational() {
            buf.advance(len);
            continue;
        }
        let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        // One copy of the head that every value points into, rather than
        // an allocation per value. A copy, not the read buffer itself: a
        // value kept for a long stream would otherwise keep that buffer.
        let head = Bytes::copy_from_slice(&buf[..len]);
        let start_of_head = buf.as_ptr().addr();
        let mut headers = HeaderMap::with_capacity(parsed.headers.len());
        for header in parsed.headers.iter() {
            let name = super::names::header_name(header.name.as_bytes())
                .map_err(|_| HeadError::Invalid(format!("header name {:?}", header.name)))?;
            // httparse hands out slices of `buf`'s head.
            let start = header.value.as_ptr().addr().wrapping_sub(start_of_head);
            let within_head = start.checked_add(header.value.len()).filter(|&end| end <= head.len());
            let value = match within_head {
                Some(end) => HeaderValue::from_maybe_shared(head.slice(start..end)),
                None => HeaderValue::from_bytes(header.value),
            }
            .map_err(|_| HeadError::Invalid(format!("value of {}", header.name)))?;
            headers.append(name, value);
        }
        buf.advance(len);
        let (framing, framing_allows_reuse) = framing(&headers, status, method)?;
        let keep_alive = framing_allows_reuse && wants_keep_alive(&headers, version);
        return Ok(Some(ResponseHead { status, version, headers, framing, keep_alive }));
    }
}

/// The body's framing, and whether the connection may be reused after it.
fn framing(headers: &HeaderMap, status: StatusCode, method: &Method) -> Result<(Framing, bool), HeadError> {
    if *method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Empty, true));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        // Chunked only when it is the last coding; a response that also
        // declares a length is read as chunked and its connection not
        // reused (RFC 9112 §6.3).
        let last = headers.get_all(TRANSFER_ENCODING).iter().next_back().map(HeaderValue::as_bytes);
        let chunked = last
            .and_then(|value| value.rsplit(|&b| b == b',').next())
            .is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked {
            (Framing::Chunked, !headers.contains_key(CONTENT_LENGTH))
        } else {
            (Framing::UntilClose, false)
        });
    }
    let mut length = None;
    for value in headers.get_all(CONTENT_LENGTH) {
        // A list (`5, 5`) is allowed when its members agree.
        for member in value.as_bytes().split(|&b| b == b',') {
            let member = member.trim_ascii();
            let parsed = std::str::from_utf8(member)
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or(HeadError::InvalidLength)?;
            if length.is_some_and(|seen| seen != parsed) {
                return Err(HeadError::InvalidLength);
            }
            length = Some(parsed);
        }
    }
    Ok(match length {
        Some(0) => (Framing::Empty, true),
        Some(n) => (Framing::Length(n), true),
        None => (Framing::UntilClose, false),
    })
}

/// HTTP/1.1 keeps the connection unless told to close it; HTTP/1.0 closes
/// it unless told to keep it.
fn wants_keep_alive(headers: &HeaderMap, version: Version) -> bool {
    let mentions = |token: &[u8]| {
        headers
            .get_all(CONNECTION)
            .iter()
            .any(|value| value.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token)))
    };
    if version == Version::HTTP_10 { mentions(b"keep-alive") } else { !mentions(b"close") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(wire: &str, method: &Method) -> Result<Option<ResponseHead>, HeadError> {
        parse_response(&mut BytesMut::from(wire), method)
    }

    fn head(wire: &str) -> ResponseHead {
        parse(wire, &Method::POST).unwrap().unwrap()
    }

    #[test]
    fn a_request_head_carries_its_headers_and_its_body_length() {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_static("up:8080"));
        headers.append("x-stainless-lang", HeaderValue::from_static("python"));
        let head = encode_request(&Method::POST, "/v1/chat/completions?a=b", &headers, 42);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "POST /v1/chat/completions?a=b HTTP/1.1\r\nhost: up:8080\r\nx-stainless-lang: python\r\ncontent-length: 42\r\n\r\n"
        );
        let get = encode_request(&Method::GET, "/v1/models", &HeaderMap::new(), 0);
        assert_eq!(String::from_utf8(get).unwrap(), "GET /v1/models HTTP/1.1\r\n\r\n");
        let empty_post = encode_request(&Method::POST, "/v1/x", &HeaderMap::new(), 0);
        assert!(String::from_utf8(empty_post).unwrap().contains("content-length: 0\r\n"));
    }

    #[test]
    fn a_head_split_across_reads_waits_for_its_end_and_leaves_the_body() {
        let wire = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        for cut in 1..wire.len() - 2 {
            assert!(parse(&wire[..cut], &Method::POST).unwrap().is_none(), "{cut}");
        }
        let mut buf = BytesMut::from(wire);
        let head = parse_response(&mut buf, &Method::POST).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers["content-type"], "application/json");
        assert_eq!(head.framing, Framing::Length(2));
        assert!(head.keep_alive);
        assert_eq!(&buf[..], b"{}");
    }

    #[test]
    fn header_values_are_the_upstreams_bytes_and_outlive_the_read_buffer() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nx-empty:\r\nset-cookie: a=1\r\nX-Vendor:  caf\xe9 \t\r\nset-cookie: b=2\r\ncontent-length: 3\r\n\r\nabc"[..],
        );
        let head = parse_response(&mut buf, &Method::POST).unwrap().unwrap();
        // The read buffer is reused for the next answer on the connection.
        buf.clear();
        buf.extend_from_slice(&[b'z'; 512]);
        assert_eq!(head.headers["x-empty"], "");
        assert_eq!(head.headers["x-vendor"].as_bytes(), b"caf\xe9", "surrounding whitespace trimmed, obs-text kept");
        let cookies: Vec<_> = head.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"], "repeated headers kept in order");
        assert_eq!(head.headers.len(), 5);
    }

    #[test]
    fn bodies_are_framed_as_the_rfc_says() {
        let te = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!((te.framing, te.keep_alive), (Framing::Chunked, true));
        let gzip_chunked = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n");
        assert_eq!(gzip_chunked.framing, Framing::Chunked);
        let both = head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n");
        assert_eq!((both.framing, both.keep_alive), (Framing::Chunked, false));
        let not_chunked = head("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n");
        assert_eq!((not_chunked.framing, not_chunked.keep_alive), (Framing::UntilClose, false));
        let none = head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((none.framing, none.keep_alive), (Framing::UntilClose, false));
        assert_eq!(head("HTTP/1.1 204 No Content\r\n\r\n").framing, Framing::Empty);
        assert_eq!(head("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").framing, Framing::Empty);
        assert_eq!(head("HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\n\r\n").framing, Framing::Length(7));
        let to_head = parse("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", &Method::HEAD).unwrap().unwrap();
        assert_eq!(to_head.framing, Framing::Empty);
        for bad in ["5, 6", "-1", "", "1e3", "99999999999999999999999"] {
            let wire = format!("HTTP/1.1 200 OK\r\ncontent-length: {bad}\r\n\r\n");
            assert_eq!(parse(&wire, &Method::POST).unwrap_err(), HeadError::InvalidLength, "{bad:?}");
        }
    }

    #[test]
    fn the_connection_is_kept_as_the_version_and_connection_header_say() {
        assert!(!head("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n").keep_alive);
        assert!(!head("HTTP/1.1 200 OK\r\nConnection: foo, Close\r\ncontent-length: 1\r\n\r\n").keep_alive);
        assert!(!head("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n").keep_alive);
        assert!(head("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n").keep_alive);
    }

    #[test]
    fn interim_responses_are_skipped_and_upgrades_refused() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: x\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
        );
        let head = parse_response(&mut buf, &Method::POST).unwrap().unwrap();
        assert_eq!(head.status, StatusCode::CREATED);
        assert!(buf.is_empty());
        assert_eq!(parse("HTTP/1.1 101 Switching Protocols\r\n\r\n", &Method::POST).unwrap_err(), HeadError::Upgrade);
    }

    #[test]
    fn garbage_and_too_many_headers_are_errors() {
        assert!(matches!(parse("<html>oops</html>\r\n\r\n", &Method::POST), Err(HeadError::Invalid(_))));
        assert!(matches!(parse("HTTP/1.1 20 Twenty\r\n\r\n", &Method::POST), Err(HeadError::Invalid(_))));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("x-h{i}: v\r\n")).collect();
        let wire = format!("HTTP/1.1 200 OK\r\n{many}\r\n");
        assert!(matches!(parse(&wire, &Method::POST), Err(HeadError::Invalid(_))));
    }
}
