//! `x-request-id`: kept from the client when it is sane, generated otherwise,
//! stored as a request extension for the layers below and echoed on every
//! response (errors included).

use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied id we keep; longer ones are replaced.
const MAX_CLIENT_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// A client id is kept when it is 1..=128 characters of `[A-Za-z0-9._:-]`,
    /// so it is safe to log, to put in headers and to use as a ledger key.
    pub fn from_client(value: &HeaderValue) -> Option<Self> {
        let bytes = value.as_bytes();
        let sane = !bytes.is_empty()
            && bytes.len() <= MAX_CLIENT_ID_LEN
            && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
        // A copy, not a clone: the client's value is a view into the
        // connection's read buffer, and the id lives as long as the request's
        // record (a stream's whole life).
        sane.then(|| HeaderValue::from_bytes(bytes).ok().map(Self)).flatten()
    }

    pub fn generate() -> Self {
        // Written into a buffer of its own size, for every request without
        // an id, rather than through `format!`.
        let mut text = [0u8; 4 + uuid::fmt::Simple::LENGTH];
        text[..4].copy_from_slice(b"req_");
        uuid::Uuid::now_v7().simple().encode_lower(&mut text[4..]);
        // A hex uuid with an ASCII prefix is always a valid header value.
        Self(HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("req_invalid")))
    }

    pub fn as_str(&self) -> &str {
        // Both constructors only admit visible ASCII.
        self.0.to_str().unwrap_or("")
    }

    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestIdService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestIdService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RequestIdService<S> {
    inner: S,
}

impl<S, B, RB> Service<Request<B>> for RequestIdService<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RequestIdFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id =
            request.headers().get(&X_REQUEST_ID).and_then(RequestId::from_client).unwrap_or_else(RequestId::generate);
        request.headers_mut().insert(X_REQUEST_ID.clone(), id.header_value().clone());
        request.extensions_mut().insert(id.clone());
        RequestIdFuture { inner: self.inner.call(request), id: Some(id) }
    }
}

pin_project_lite::pin_project! {
    pub struct RequestIdFuture<F> {
        #[pin]
        inner: F,
        id: Option<RequestId>,
    }
}

impl<F, RB, E> std::future::Future for RequestIdFuture<F>
where
    F: std::future::Future<Output = Result<Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(id) = this.id.take() {
            response.headers_mut().insert(X_REQUEST_ID.clone(), id.0);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::{ServiceExt, service_fn};

    async fn echo_extension(request: Request<()>) -> Result<Response<String>, Infallible> {
        let id = request.extensions().get::<RequestId>().map(|id| id.as_str().to_owned()).unwrap_or_default();
        Ok(Response::new(id))
    }

    async fn call(header: Option<&'static str>) -> (String, String) {
        let svc = RequestIdLayer.layer(service_fn(echo_extension));
        let mut builder = Request::builder();
        if let Some(h) = header {
            builder = builder.header("x-request-id", h);
        }
        let response = svc.oneshot(builder.body(()).unwrap()).await.unwrap();
        let header = response.headers()["x-request-id"].to_str().unwrap().to_owned();
        (header, response.into_body())
    }

    #[tokio::test]
    async fn keeps_a_sane_client_id() {
        let (header, seen) = call(Some("client-abc_1.2:3")).await;
        assert_eq!(header, "client-abc_1.2:3");
        assert_eq!(seen, header);
    }

    #[tokio::test]
    async fn replaces_an_insane_client_id() {
        for bad in ["has space", "", "quote\"d", "é"] {
            let value = HeaderValue::from_bytes(bad.as_bytes()).unwrap();
            assert!(RequestId::from_client(&value).is_none(), "{bad:?} accepted");
        }
        let (header, seen) = call(Some("has space")).await;
        assert!(header.starts_with("req_"), "{header}");
        assert_eq!(seen, header);
        let long = "a".repeat(MAX_CLIENT_ID_LEN + 1);
        assert!(RequestId::from_client(&HeaderValue::from_str(&long).unwrap()).is_none());
    }

    #[tokio::test]
    async fn generates_distinct_ids_when_absent() {
        let (a, _) = call(None).await;
        let (b, _) = call(None).await;
        assert!(a.starts_with("req_") && b.starts_with("req_"));
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 32, "{a}");
        assert!(a[4..].bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{a}");
    }
}
