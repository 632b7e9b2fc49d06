//! The one pooled HTTP client to the upstream, and how a request is sent.
//!
//! The gateway adds the upstream key; the client's own credentials never leave
//! the gateway. Redirects are not followed: an OpenAI-compatible API does not
//! redirect, so a redirect means a wrong base URL and becomes a 502.

mod lanes;
mod plain;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prometheus::IntCounter;
use secrecy::ExposeSecret;

use tollgate_openai::Api;

use crate::config::{ConfigError, UpstreamConfig, UpstreamProtocol};
use crate::error::GatewayError;
use crate::proxy::headers::ForwardedHeaders;
use crate::request_id::{RequestId, X_REQUEST_ID};
use crate::upstream_keys::{TakenKey, UpstreamKeys};

#[derive(Debug, thiserror::Error)]
pub enum UpstreamSetupError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Keys(#[from] crate::upstream_keys::KeyError),
    #[error("cannot set up TLS to the upstream: {0}")]
    Tls(#[from] rustls::Error),
    #[error("upstream.base_url is not a URL: {0}")]
    BaseUrl(String),
}

/// An upstream answer whose body has not been read yet.
pub type UpstreamResponse = http::Response<ResponseBody>;

/// An answer's body as the connection it came on gives it.
#[derive(Debug)]
pub enum ResponseBody {
    /// Over hyper-util's client (https, HTTP/2).
    Pooled(Incoming),
    /// Over the gateway's own HTTP/1.1 connection (plain http).
    Plain(plain::Body),
}

/// A body that failed while it was read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{0}")]
    Pooled(#[source] hyper::Error),
    #[error("{0}")]
    Plain(#[source] std::io::Error),
}

/// How far a call to the upstream got when it failed: what decides whether
/// another attempt (the same target again, or a fallback) is safe and can
/// help. After the first event reached the client, only an error event can
/// follow; that is the stream relay's business, not a failure of this type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No connection was made: the request never left.
    BeforeSend,
    /// Sent, and no response headers came.
    AfterSend,
    /// Headers came, and the body failed before anything reached the client.
    AfterHeaders,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Its `max_in_flight` requests are out: this one was not sent.
    AtCapacity,
    /// Refused, reset or closed.
    Unreachable,
    /// No headers (or no next chunk) in time.
    Timeout,
}

/// A transport failure talking to the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFailure {
    pub phase: Phase,
    pub kind: FailureKind,
}

impl UpstreamFailure {
    /// Whether the upstream can have seen (and billed) the request. Nothing
    /// was relayed to the client in any phase of this type, so another
    /// attempt is always invisible to it; one that may have reached the
    /// upstream may cost twice, which the route's retry policy weighs.
    pub fn may_have_reached_upstream(self) -> bool {
        self.phase != Phase::BeforeSend
    }
}

impl From<UpstreamFailure> for GatewayError {
    fn from(failure: UpstreamFailure) -> Self {
        match failure.kind {
            FailureKind::Timeout => GatewayError::UpstreamTimeout,
            FailureKind::Unreachable => GatewayError::UpstreamUnavailable,
            FailureKind::AtCapacity => GatewayError::UpstreamBusy,
        }
    }
}

/// hyper's pooled client, used directly rather than through reqwest: per
/// request reqwest parsed a URL (with IDNA host processing), ran a redirect
/// policy even with redirects off and wrapped every call in further futures,
/// about a seventh of the gateway's CPU per proxied request (callgrind).
/// The gateway needs none of that: one base URL, no redirects, no proxies,
/// no decompression.
type HttpClient = Client<HttpsConnector<Counted>, Full<Bytes>>;

/// hyper-util's connector, counting the connections it opens.
#[derive(Clone)]
struct Counted {
    inner: HttpConnector,
    opened: IntCounter,
}

impl tower::Service<Uri> for Counted {
    type Response = <HttpConnector as tower::Service<Uri>>::Response;
    type Error = <HttpConnector as tower::Service<Uri>>::Error;
    // Boxed: a new connection is rare next to the requests it carries.
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let opened = self.opened.clone();
        Box::pin(async move {
            let connection = connecting.await?;
            opened.inc();
            Ok(connection)
        })
    }
}

/// An API root and, when requests to it go over HTTP/1, the `Host` header
/// they carry. hyper-util would otherwise format that header from the URI
/// on every request (about 1k instructions under callgrind); HTTP/2 carries
/// the authority in the URI instead.
struct ApiRoot {
    url: String,
    host: Option<HeaderValue>,
    /// The URL's path (`/v1`, or empty): what the plain-http client's
    /// request line starts with.
    path: String,
}

impl ApiRoot {
    fn new(url: String, multiplexed: bool) -> Self {
        let parsed = url.parse::<Uri>().ok();
        let host = if multiplexed { None } else { parsed.as_ref().and_then(http1_host) };
        let path = parsed.as_ref().map_or("", Uri::path).trim_end_matches('/').to_owned();
        Self { url, host, path }
    }

    /// The URI of `path_and_query` under this root, for hyper's client.
    fn uri(&self, path_and_query: &str) -> Option<Uri> {
        let mut uri = String::with_capacity(self.url.len() + path_and_query.len());
        uri.push_str(&self.url);
        uri.push_str(path_and_query);
        Uri::try_from(uri).ok()
    }

    /// The request line's target for `path_and_query` under this root, for
    /// the plain-http client (which knows its upstream): no URI is parsed
    /// for it (about 1 % of a proxied request's instructions under
    /// callgrind). Refused where a URI would be and a request line cannot
    /// carry it: spaces, control bytes, anything not ASCII.
    fn request_target(&self, path_and_query: &str) -> Option<String> {
        let mut target = String::with_capacity(self.path.len() + path_and_query.len());
        target.push_str(&self.path);
        target.push_str(path_and_query);
        let valid = target.starts_with('/') && target.bytes().all(|b| b.is_ascii_graphic());
        valid.then_some(target)
    }
}

/// `Host` for a URI as hyper-util writes it: the host, and the port when
/// it is not the scheme's default.
fn http1_host(uri: &Uri) -> Option<HeaderValue> {
    let host = uri.host()?;
    let default_port = match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let value = match uri.port_u16() {
        Some(port) if port != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    };
    HeaderValue::from_str(&value).ok()
}

/// How requests reach the upstream.
enum Transport {
    /// hyper-util's pooled clients; more than one when connections may be
    /// HTTP/2.
    Pooled(lanes::Lanes<HttpClient>),
    /// HTTP/1.1 over plain TCP (an `http://` base URL not marked `http2`).
    Plain(plain::Client),
}

/// The transport one request goes by, and where it goes as that
/// transport takes it.
enum Via<'a> {
    Pooled(&'a HttpClient, Uri),
    /// The request line's target: the path and query.
    Plain(&'a plain::Client, String),
}

pub struct Upstream {
    transport: Transport,
    /// e.g. `https://api.cometapi.com/v1`, checked once; a request's URI is
    /// this followed by its path and query.
    base: ApiRoot,
    /// The Gemini API root (`…/v1beta`).
    gemini_base: ApiRoot,
    apis: Vec<Api>,
    authority: (String, u16),
    keys: UpstreamKeys,
    /// Caps requests in flight to this upstream (`max_in_flight`).
    in_flight: Option<Arc<tokio::sync::Semaphore>>,
    first_byte_timeout: Duration,
    idle_timeout: Duration,
    max_event_bytes: usize,
    forwarded: ForwardedHeaders,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base_url", &self.base.url)
            .field("has_key", &!self.keys.is_empty())
            .finish_non_exhaustive()
    }
}

impl Upstream {
    /// The client for one configured upstream; each connection it opens is
    /// counted in `opened`.
    pub fn new(config: &UpstreamConfig, opened: IntCounter) -> Result<Self, UpstreamSetupError> {
        install_crypto_provider();

        let env_key = match &config.api_key_file {
            Some(_) => None,
            None => config.api_key()?,
        };
        let keys = UpstreamKeys::new(config.api_key_file.as_deref(), env_key.as_ref().map(|k| k.expose_secret()))
            .map_err(UpstreamSetupError::Keys)?;
        if keys.is_empty() {
            tracing::warn!(
                env = %config.api_key_env,
                "no upstream API key configured; requests are forwarded without one"
            );
        }

        let base = config.base_url.trim_end_matches('/').to_owned();
        let parsed: Uri =
            base.parse().map_err(|e: http::uri::InvalidUri| UpstreamSetupError::BaseUrl(e.to_string()))?;
        if !matches!(parsed.scheme_str(), Some("http" | "https")) || parsed.authority().is_none() {
            return Err(UpstreamSetupError::BaseUrl(format!("{base} is not an http:// or https:// URL")));
        }
        if parsed.query().is_some() {
            return Err(UpstreamSetupError::BaseUrl(format!("{base} has a query; give the API root only")));
        }

        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(config.connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(30)));
        // The TLS layer decides between http and https.
        http.enforce_http(false);
        let builder = hyper_rustls::HttpsConnectorBuilder::new().try_with_platform_verifier()?.https_or_http();
        // https: ALPN offers what the protocol allows; plain http: HTTP/2 only
        // by prior knowledge (`http2`), else HTTP/1.1.
        let http = Counted { inner: http, opened: opened.clone() };
        let connector = match config.protocol {
            UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
            UpstreamProtocol::Http2 => builder.enable_http2().wrap_connector(http),
            UpstreamProtocol::Auto => builder.enable_all_versions().wrap_connector(http),
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(config.protocol == UpstreamProtocol::Http2);
        // HTTP/2 is possible by prior knowledge, or by ALPN on https.
        let multiplexed = match config.protocol {
            UpstreamProtocol::Http1 => false,
            UpstreamProtocol::Http2 => true,
            UpstreamProtocol::Auto => parsed.scheme_str() == Some("https"),
        };
        let plain = parsed.scheme_str() == Some("http") && config.protocol != UpstreamProtocol::Http2;
        let transport = if plain {
            Transport::Plain(
                plain::Client::new(
                    parsed.host().unwrap_or_default(),
                    parsed.port_u16().unwrap_or(80),
                    config.connect_timeout,
                    config.pool_max_idle_per_host,
                    config.pool_idle_timeout,
                )
                .counting_connections(opened),
            )
        } else {
            Transport::Pooled(lanes::Lanes::new(multiplexed, config.http2_streams_per_connection, move || {
                builder.build(connector.clone())
            }))
        };
        let root = |url: String| ApiRoot::new(url, multiplexed);
        Ok(Self {
            transport,
            base: root(base),
            keys,
            in_flight: config.max_in_flight.map(|n| Arc::new(tokio::sync::Semaphore::new(n))),
            first_byte_timeout: config.first_byte_timeout,
            idle_timeout: config.idle_timeout,
            max_event_bytes: config.max_event_bytes,
            forwarded: ForwardedHeaders::new(&config.forward_request_headers),
            gemini_base: root(config.gemini_base()),
            apis: config.apis.clone(),
            authority: (
                parsed.host().unwrap_or_default().to_owned(),
                parsed.port_u16().unwrap_or(if parsed.scheme_str() == Some("https") { 443 } else { 80 }),
            ),
        })
    }

    /// The APIs this upstream serves.
    pub fn apis(&self) -> &[Api] {
        &self.apis
    }

    pub fn speaks(&self, api: Api) -> bool {
        self.apis.contains(&api)
    }

    /// The upstream's host and port (`server.address`, `server.port` on spans).
    pub fn authority(&self) -> (&str, u16) {
        (&self.authority.0, self.authority.1)
    }

    /// The API root requests go to.
    pub fn base_url(&self) -> &str {
        &self.base.url
    }

    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// Sends one request and waits for the response headers, at most
    /// `first_byte_timeout`. `path_and_query` is what follows `/v1`, still
    /// percent-encoded as the client sent it.
    pub async fn send(&self, outbound: Outbound<'_>, body: Option<Bytes>) -> Result<UpstreamResponse, UpstreamFailure> {
        let root = if outbound.api == Api::Gemini { &self.gemini_base } else { &self.base };
        let permit = match &self.in_flight {
            None => None,
            Some(cap) => Some(
                cap.clone()
                    .try_acquire_owned()
                    .map_err(|_| UpstreamFailure { phase: Phase::BeforeSend, kind: FailureKind::AtCapacity })?,
            ),
        };
        // Paths are the gateway's own routes and checked identifiers, so
        // they are valid here; were one not, the request never leaves.
        let invalid = UpstreamFailure { phase: Phase::BeforeSend, kind: FailureKind::Unreachable };
        let (via, place) = match &self.transport {
            Transport::Pooled(lanes) => {
                let uri = root.uri(outbound.path).ok_or(invalid)?;
                let (client, place) = lanes.take();
                (Via::Pooled(client, uri), place)
            }
            Transport::Plain(client) => (Via::Plain(client, root.request_target(outbound.path).ok_or(invalid)?), None),
        };
        let method = outbound.method.clone();
        let mut response = self.send_with_keys(via, method, root.host.as_ref(), &outbound, body).await?;
        if permit.is_some() || place.is_some() {
            response.extensions_mut().insert(InFlightSlot { _held: Arc::new((permit, place)) });
        }
        Ok(response)
    }

    async fn send_with_keys(
        &self,
        via: Via<'_>,
        method: Method,
        host: Option<&HeaderValue>,
        outgoing: &Outbound<'_>,
        body: Option<Bytes>,
    ) -> Result<UpstreamResponse, UpstreamFailure> {
        let body = body.unwrap_or_default();
        let now = crate::proxy::forward::monotonic_ms();
        let key = self.keys.take(now);
        let response = self.attempt(&via, &method, host, outgoing, body.clone(), key.as_ref()).await?;
        // The upstream refused this key: set it aside and, if there is
        // another, send the same request again with it (nothing was done).
        if let Some(key) = key
            && matches!(response.status(), http::StatusCode::UNAUTHORIZED | http::StatusCode::FORBIDDEN)
        {
            self.keys.set_aside(&key, now);
            if let Some(other) = self.keys.take_other(now, Some(&key)).filter(|_| self.keys.has_other(&key, now)) {
                return self.attempt(&via, &method, host, outgoing, body, Some(&other)).await;
            }
        }
        Ok(response)
    }

    /// One request with one key.
    async fn attempt(
        &self,
        via: &Via<'_>,
        method: &Method,
        host: Option<&HeaderValue>,
        outgoing: &Outbound<'_>,
        body: Bytes,
        key: Option<&TakenKey>,
    ) -> Result<UpstreamResponse, UpstreamFailure> {
        let mut headers = HeaderMap::with_capacity(outgoing.client_headers.len() + 4);
        if let Some(host) = host {
            headers.insert(header::HOST, host.clone());
        }
        self.forwarded.copy_request_headers(outgoing.client_headers, &mut headers);
        headers.insert(X_REQUEST_ID.clone(), outgoing.request_id.header_value().clone());
        // The attempt's own span becomes the upstream's parent.
        if let Some(traceparent) = &outgoing.traceparent {
            headers.insert(TRACEPARENT, traceparent.clone());
        }
        // The Messages API requires its version header; the SDKs send it,
        // a bare HTTP client may not.
        if outgoing.api == Api::Anthropic && !headers.contains_key(ANTHROPIC_VERSION) {
            headers.insert(ANTHROPIC_VERSION, HeaderValue::from_static("2023-06-01"));
        }
        // Each API's own key header, as its SDKs send it.
        if let Some(key) = key {
            match outgoing.api {
                Api::OpenAi => headers.insert(header::AUTHORIZATION, key.header.clone()),
                Api::Gemini => headers.insert(X_GOOG_API_KEY, key.bare.clone()),
                Api::Anthropic => headers.insert(X_API_KEY, key.bare.clone()),
            };
        }

        let sending = async {
            match via {
                Via::Pooled(client, uri) => {
                    let mut request = http::Request::new(Full::new(body));
                    *request.method_mut() = method.clone();
                    *request.uri_mut() = uri.clone();
                    *request.headers_mut() = headers;
                    match client.request(request).await {
                        Ok(response) => Ok(response.map(ResponseBody::Pooled)),
                        // A connect error means the request never left.
                        Err(e) if e.is_connect() => Err(classify(&e, Phase::BeforeSend)),
                        Err(e) => Err(classify(&e, Phase::AfterSend)),
                    }
                }
                Via::Plain(client, path) => match client.send(method, path, &headers, &body).await {
                    Ok(response) => Ok(response.map(ResponseBody::Plain)),
                    Err(e) if e.is_connect() => Err(classify(&e, Phase::BeforeSend)),
                    Err(e) => Err(classify(&e, Phase::AfterSend)),
                },
            }
        };
        match tokio::time::timeout(self.first_byte_timeout, sending).await {
            Err(_elapsed) => Err(UpstreamFailure { phase: Phase::AfterSend, kind: FailureKind::Timeout }),
            Ok(result) => result,
        }
    }

    /// Keys set aside since start.
    pub fn keys_set_aside(&self) -> u64 {
        self.keys.set_aside_count()
    }

    /// Rereads the key file whenever it changes, until cancelled.
    pub async fn watch_keys(self: Arc<Self>, every: Duration, cancel: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.keys.reload_if_changed() {
                Ok(Some(n)) => tracing::info!(keys = n, base_url = %self.base.url, "upstream keys reloaded"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "upstream key file refused; the keys in force stay"),
            }
        }
    }
}

/// One request to an upstream, besides its body.
pub struct Outbound<'a> {
    pub method: Method,
    /// Decides the API root (`base_url`, or the Gemini root) and how the
    /// upstream key is sent.
    pub api: Api,
    /// What follows the API root, e.g. `/chat/completions` or
    /// `/models/gemini-2.5-flash:streamGenerateContent?alt=sse`: the
    /// gateway's own routes and checked identifiers, never the client's
    /// query string.
    pub path: &'a str,
    pub client_headers: &'a HeaderMap,
    pub request_id: &'a RequestId,
    /// The attempt's span, when traces are exported.
    pub traceparent: Option<HeaderValue>,
}

const X_GOOG_API_KEY: http::HeaderName = http::HeaderName::from_static("x-goog-api-key");
const X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");
const ANTHROPIC_VERSION: http::HeaderName = http::HeaderName::from_static("anthropic-version");

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// What a request holds from sending until its answer is relayed to the
/// end: one of the upstream's `max_in_flight` slots (when capped) and its
/// place on a connection lane. It rides in the response's extensions until
/// the relay takes it.
#[derive(Debug, Clone)]
pub struct InFlightSlot {
    _held: Arc<(Option<tokio::sync::OwnedSemaphorePermit>, Option<lanes::LanePlace>)>,
}

/// An upstream answer's body as the relay reads it: straight from the
/// connection, or with its first piece (or all of it) already read by the
/// forward stage, which looks before it commits to an answer.
#[derive(Debug)]
pub enum UpstreamBody {
    Live(ResponseBody),
    /// A first piece read ahead, then the rest.
    Started {
        first: Option<Bytes>,
        rest: ResponseBody,
    },
    /// Read whole.
    Read(Option<Bytes>),
}

impl UpstreamBody {
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        match self {
            Self::Live(body) => next_chunk(body).await,
            Self::Started { first, rest } => match first.take() {
                Some(chunk) => Ok(Some(chunk)),
                None => next_chunk(rest).await,
            },
            Self::Read(whole) => Ok(whole.take()),
        }
    }
}

/// The next piece of an upstream body, skipping trailers; `None` at its end.
pub async fn next_chunk(body: &mut ResponseBody) -> Result<Option<Bytes>, BodyError> {
    match body {
        ResponseBody::Pooled(body) => {
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.map_err(BodyError::Pooled)?.into_data() {
                    return Ok(Some(data));
                }
            }
            Ok(None)
        }
        ResponseBody::Plain(body) => body.next_chunk().await.map_err(BodyError::Plain),
    }
}

/// rustls is built without a default crypto provider; ring is the smaller
/// one to build. Must run before any TLS client is built (the upstream's and
/// the alert webhooks'); installing twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Classes a transport error that happened in `phase`: a connection that
/// timed out is a timeout, anything else means the upstream is unreachable.
/// The detail (which may include the upstream host) is logged at debug level.
pub fn classify(error: &(dyn std::error::Error + 'static), phase: Phase) -> UpstreamFailure {
    tracing::debug!(error = %error, "upstream transport error");
    let mut source = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
            return UpstreamFailure { phase, kind: FailureKind::Timeout };
        }
        source = e.source();
    }
    UpstreamFailure { phase, kind: FailureKind::Unreachable }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_connect_timeout_anywhere_in_the_chain_is_a_timeout() {
        let timed_out = Wrapped(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"));
        let failure = classify(&timed_out, Phase::BeforeSend);
        assert_eq!(failure, UpstreamFailure { phase: Phase::BeforeSend, kind: FailureKind::Timeout });
        assert!(matches!(GatewayError::from(failure), GatewayError::UpstreamTimeout));
        assert!(!failure.may_have_reached_upstream(), "a connect failure never reached it");
        let refused = Wrapped(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        let failure = classify(&refused, Phase::AfterSend);
        assert!(matches!(GatewayError::from(failure), GatewayError::UpstreamUnavailable));
        assert!(failure.may_have_reached_upstream());
    }

    #[test]
    fn each_transport_gets_the_target_under_its_api_root() {
        let v1 = ApiRoot::new("http://up:8080/v1".to_owned(), false);
        assert_eq!(v1.request_target("/chat/completions?a=b").as_deref(), Some("/v1/chat/completions?a=b"));
        assert_eq!(v1.uri("/models/m").unwrap(), "http://up:8080/v1/models/m");
        let bare = ApiRoot::new("http://up:8080".to_owned(), false);
        assert_eq!(bare.request_target("/models").as_deref(), Some("/models"));
        let nested = ApiRoot::new("https://gw.example/openai/v1".to_owned(), true);
        assert_eq!(nested.request_target("/embeddings").as_deref(), Some("/openai/v1/embeddings"));
        for bad in ["/chat completions", "/x\r\nhost: evil", "/modèle", "no-slash"] {
            assert_eq!(bare.request_target(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn base_urls_must_be_http_or_https_roots() {
        let with = |url: &str| UpstreamConfig { base_url: url.to_owned(), ..UpstreamConfig::default() };
        let opened = || IntCounter::new("opened", "opened").unwrap();
        assert!(Upstream::new(&with("https://api.cometapi.com/v1/"), opened()).is_ok());
        assert!(Upstream::new(&with("http://127.0.0.1:9/v1"), opened()).is_ok());
        for bad in ["ftp://x/v1", "/v1", "https://x/v1?a=b", "not a url"] {
            assert!(matches!(Upstream::new(&with(bad), opened()), Err(UpstreamSetupError::BaseUrl(_))), "{bad}");
        }
    }

    #[test]
    fn http1_requests_carry_the_host_hyper_would_write_and_http2_ones_none() {
        let host = |url: &str| ApiRoot::new(url.to_owned(), false).host.map(|h| h.to_str().unwrap().to_owned());
        assert_eq!(host("https://api.cometapi.com/v1").as_deref(), Some("api.cometapi.com"));
        assert_eq!(host("https://api.cometapi.com:443/v1").as_deref(), Some("api.cometapi.com"));
        assert_eq!(host("http://127.0.0.1:8080/v1").as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(host("http://[::1]:80/v1beta").as_deref(), Some("[::1]"));
        assert_eq!(host("https://up.example:8443").as_deref(), Some("up.example:8443"));
        assert!(ApiRoot::new("https://api.cometapi.com/v1".to_owned(), true).host.is_none());
    }
}
