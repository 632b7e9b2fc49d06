//! Reading a request body under the configured size limit.

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderMap, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};

use crate::error::GatewayError;

/// Reads the whole body, refusing it with 413 as soon as it is known to be
/// too large: at once from `content-length`, or once the streamed bytes pass
/// the limit. Nothing has been sent upstream at that point. A body that
/// stalls is a 408 (the read timeouts are the connection layer's, see
/// `server::body`). The limit is checked before the body is read, so a client
/// that sent `Expect: 100-continue` is refused before it sends the body.
pub async fn read_limited(body: Body, headers: &HeaderMap, limit: usize) -> Result<Bytes, GatewayError> {
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(GatewayError::BodyTooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(owned(collected.to_bytes())),
        Err(e) if e.is::<LengthLimitError>() => Err(GatewayError::BodyTooLarge { limit }),
        Err(e) if crate::server::body::is_timeout(&*e) => Err(GatewayError::RequestTimeout),
        Err(_) => Err(GatewayError::BodyRead),
    }
}

/// Bodies up to this size are copied out of what they were read into.
const COPIED_UP_TO: usize = 64 * 1024;

/// The body in an allocation of its own. A body that arrived in one read is
/// a slice of the connection's read buffer (8 KiB and up), and the request's
/// record keeps the body until the answer ends (for the prompt's estimate
/// should usage be missing): for a stream, that pinned the buffer for the
/// stream's life, and the connection read into a second one meanwhile. A
/// body read in several pieces was already copied into one allocation of
/// its size, and a large one is not copied again.
fn owned(body: Bytes) -> Bytes {
    if body.len() <= COPIED_UP_TO { Bytes::copy_from_slice(&body) } else { body }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepts_a_body_at_the_limit() {
        let body = read_limited(Body::from("abcd"), &HeaderMap::new(), 4).await.unwrap();
        assert_eq!(&body[..], b"abcd");
    }

    #[tokio::test]
    async fn a_small_body_read_at_once_keeps_nothing_of_what_it_was_read_into() {
        // A connection's read buffer, the body a slice of it.
        let read_buffer = Bytes::from(vec![b'x'; 8192]);
        let body = read_limited(Body::from(read_buffer.slice(..100)), &HeaderMap::new(), 1 << 20).await.unwrap();
        assert_eq!(&body[..], &read_buffer[..100]);
        assert!(read_buffer.is_unique(), "the body is a copy of its own");
    }

    #[tokio::test]
    async fn refuses_a_streamed_body_past_the_limit() {
        let err = read_limited(Body::from("abcde"), &HeaderMap::new(), 4).await.unwrap_err();
        assert!(matches!(err, GatewayError::BodyTooLarge { limit: 4 }));
    }

    #[tokio::test]
    async fn refuses_a_declared_length_past_the_limit_without_reading() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_LENGTH, "1000".parse().unwrap());
        let err = read_limited(Body::from("x"), &headers, 4).await.unwrap_err();
        assert!(matches!(err, GatewayError::BodyTooLarge { .. }));
    }
}
