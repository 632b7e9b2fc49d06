//! Serving a listener: accepting connections under a cap, HTTP/1.1 and h2c
//! on each, and the timeouts that keep slow or silent clients from holding
//! connections.
//!
//! Each connection is bounded at every stage:
//!
//! - before its first request and between requests, it is closed once it has
//!   had no request in flight for `keep_alive_timeout` (both protocols);
//! - an HTTP/1.1 request head must be complete within `header_read_timeout`
//!   of the connection being ready for it (hyper's own timer);
//! - a request body must keep arriving (`body_idle_timeout`) and be complete
//!   within `body_read_timeout` (see [`body`]);
//! - when an answer leaves before the request body has arrived, the rest is
//!   read and discarded within `discard_max_bytes` and `discard_timeout`, so
//!   the client is not reset before it reads the answer (see [`body`]).
//!
//! At `max_connections` open connections a listener stops accepting: new
//! connections wait in the kernel's accept queue until one closes, rather
//! than being accepted and dropped. The timeouts above make sure one does.

pub mod body;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::ConnectInfo;
use http::{Request, Version, header};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::router::Routes;
use body::{BodyLimits, Discard, RequestBody};

/// What every connection of every listener is held to.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub keep_alive_timeout: Duration,
    pub max_connections: usize,
    pub bodies: Arc<BodyLimits>,
}

impl ConnectionLimits {
    pub fn new(config: &ServerConfig, bodies: Arc<BodyLimits>) -> Self {
        Self {
            header_read_timeout: config.header_read_timeout,
            keep_alive_timeout: config.keep_alive_timeout,
            max_connections: config.max_connections,
            bodies,
        }
    }
}

/// Serves `listener` until `stop` is cancelled, then stops accepting, asks
/// every connection to finish its requests and close, and returns once they
/// have. (The caller bounds that wait with `server.shutdown_grace` and drops
/// this future past it, which drops the connections.)
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    routes: Routes,
    limits: ConnectionLimits,
    stop: CancellationToken,
) {
    let builders = Arc::new(Builders::new(&limits));
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut warned_full: Option<Instant> = None;
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Once a minute at most: under a flood this would otherwise
                // be one line per accepted connection.
                if warned_full.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(
                        listener = name,
                        max_connections = limits.max_connections,
                        "connection limit reached; new connections wait until one closes"
                    );
                    warned_full = Some(Instant::now());
                }
                tokio::select! {
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    () = stop.cancelled() => break,
                    Some(_) = connections.join_next() => continue,
                }
            }
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(name, &e).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
            // Finished connections are collected as they end, so the set
            // holds only open ones.
            Some(_) = connections.join_next() => continue,
        };
        connections.spawn(connection(
            stream,
            remote,
            builders.clone(),
            routes.clone(),
            limits.clone(),
            stop.clone(),
            permit,
        ));
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Every listener serves HTTP/1.1 and, on the same port, HTTP/2 with prior
/// knowledge (h2c). The protocol is told from the connection's first bytes,
/// looked at without reading them (`sniff`), and the connection is served
/// by the builder for that protocol alone.
///
/// Why not `auto`'s own detection: it reads the first 24 bytes into a buffer
/// of its own and hands them back to HTTP/1 as a first, short read. The
/// request head is then incomplete, the second read does not fit the 8 KiB
/// read buffer beside the first, and the buffer is regrown to 16 KiB, for
/// the life of every HTTP/1 connection (heaptrack: 66 MB of the gateway's
/// peak with 5,000 open streams). And HTTP/1 is served by hyper's HTTP/1
/// connection itself: `auto`'s holds room for the HTTP/2 one beside it,
/// about 900 bytes more in every connection's task.
struct Builders {
    http1: http1::Builder,
    http2: auto::Builder<TokioExecutor>,
    /// For a connection whose first bytes are a part of the HTTP/2 preface
    /// and no more: `auto` reads the rest and decides.
    either: auto::Builder<TokioExecutor>,
}

impl Builders {
    fn new(limits: &ConnectionLimits) -> Self {
        let mut http1 = http1::Builder::new();
        http1.timer(TokioTimer::new()).keep_alive(true).header_read_timeout(limits.header_read_timeout);
        // `either` may serve HTTP/1 too: the same settings as `http1`.
        let builder = || {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new()).keep_alive(true).header_read_timeout(limits.header_read_timeout);
            builder
        };
        Self { http1, http2: builder().http2_only(), either: builder() }
    }
}

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sniffed {
    Http1,
    Http2,
    Unsure,
}

/// The preface every HTTP/2 connection starts with (RFC 9113, 3.4).
const HTTP2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits for the connection's first bytes and tells its protocol from them,
/// leaving them unread for the server. A connection closed before sending
/// anything is served as HTTP/1, which ends it quietly.
async fn sniff(stream: &TcpStream) -> std::io::Result<Sniffed> {
    let mut first = [0u8; HTTP2_PREFACE.len()];
    let n = stream.peek(&mut first).await?;
    Ok(sniffed(&first[..n]))
}

fn sniffed(first: &[u8]) -> Sniffed {
    if first.is_empty() || !HTTP2_PREFACE.starts_with(first) {
        Sniffed::Http1
    } else if first.len() == HTTP2_PREFACE.len() {
        Sniffed::Http2
    } else {
        Sniffed::Unsure
    }
}

/// Errors of one connection that was already gone (reset before it was
/// accepted) do not stop the loop. Others, such as running out of file
/// descriptors, would repeat at once: wait a moment so the loop does not spin
/// while connections close.
async fn accept_failed(name: &'static str, e: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(e.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused) {
        return;
    }
    tracing::warn!(listener = name, error = %e, "cannot accept a connection");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn connection(
    stream: TcpStream,
    remote: SocketAddr,
    builders: Arc<Builders>,
    routes: Routes,
    limits: ConnectionLimits,
    stop: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    // Small SSE frames must leave at once, not wait for Nagle.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY");
    }
    let activity = Arc::new(Activity::new());
    // Nothing is in flight yet: shutting down, or a client silent for the
    // keep-alive timeout, closes the connection at once.
    let protocol = tokio::select! {
        sniffed = sniff(&stream) => match sniffed {
            Ok(protocol) => protocol,
            Err(e) => {
                tracing::debug!(%remote, error = %e, "connection failed before its first request");
                return;
            }
        },
        () = stop.cancelled() => return,
        () = activity.quiet_for(activity.opened, limits.keep_alive_timeout) => return,
    };
    let service = {
        let activity = activity.clone();
        let bodies = limits.bodies.clone();
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let in_flight = InFlight::begin(&activity);
            let request = prepare(request, remote, &bodies, &activity);
            let routes = routes.clone();
            // Boxed, and so freed once the answer's head is ready: hyper
            // keeps room for this future as long as the connection is open,
            // and inline it is about 1 KiB that a stream, or an idle
            // keep-alive connection, would hold for nothing.
            Box::pin(async move {
                let response = routes.serve(request).await;
                Ok::<_, Infallible>(response.map(|body| body::Tracked::new(body, in_flight)))
            })
        })
    };
    let io = TokioIo::new(stream);
    let watch = Watch { activity: &activity, limits: &limits, stop: &stop, remote };
    match protocol {
        Sniffed::Http1 => watch.drive(builders.http1.serve_connection(io, service)).await,
        // Boxed: each carries many requests, and inline their larger state
        // (the HTTP/2 machine, or both) would size every connection's task.
        Sniffed::Http2 => Box::pin(watch.drive(builders.http2.serve_connection(io, service))).await,
        Sniffed::Unsure => Box::pin(watch.drive(builders.either.serve_connection(io, service))).await,
    }
}

/// What a served connection is closed by.
struct Watch<'a> {
    activity: &'a Arc<Activity>,
    limits: &'a ConnectionLimits,
    stop: &'a CancellationToken,
    remote: SocketAddr,
}

impl Watch<'_> {
    /// Serves `conn` until it ends, closing it gracefully on shutdown or
    /// once idle for the keep-alive timeout.
    async fn drive<C>(self, conn: C)
    where
        C: GracefulConnection,
        C::Error: std::fmt::Display,
    {
        let Self { activity, limits, stop, remote } = self;
        tokio::pin!(conn);
        // Idle since it was opened; once closing, quiet since closing began.
        let quiet = activity.quiet_for(activity.opened, limits.keep_alive_timeout);
        tokio::pin!(quiet);
        let mut closing = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => {
                    // Timeouts, resets and clients that leave are routine
                    // here; the requests themselves were logged by the trace
                    // layer.
                    if let Err(e) = result {
                        tracing::debug!(%remote, error = %e, "connection closed with an error");
                    }
                    break;
                }
                // Idle, or shutting down: finish the requests in flight,
                // accept no new one, close.
                () = stop.cancelled(), if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                    quiet.set(activity.quiet_for(Instant::now(), limits.keep_alive_timeout));
                }
                () = &mut quiet => {
                    if closing {
                        // A graceful close still not done with nothing in
                        // flight: an HTTP/2 client that never acknowledges
                        // the GOAWAY's ping would otherwise hold the
                        // connection for ever.
                        break;
                    }
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                    quiet.set(activity.quiet_for(Instant::now(), limits.keep_alive_timeout));
                }
            }
        }
    }
}

/// Hands the router what `axum::serve` used to: the caller's address, and
/// the body as an axum `Body`, here with its timeouts and discard policy.
fn prepare(
    request: Request<Incoming>,
    remote: SocketAddr,
    bodies: &Arc<BodyLimits>,
    activity: &Arc<Activity>,
) -> Request<axum::body::Body> {
    let discard = match request.version() {
        // HTTP/2 ends an unread body with a stream reset of its own, which
        // leaves the answer readable; there is nothing to drain.
        Version::HTTP_2 | Version::HTTP_3 => Discard::Never,
        // Reading the body makes hyper send `100 Continue`, inviting the
        // body the answer just refused: unless the handler asked for the
        // body, let hyper close instead (the client has not sent it).
        _ if expects_continue(request.headers()) => Discard::IfRead,
        _ => Discard::Always,
    };
    let (mut parts, incoming) = request.into_parts();
    parts.extensions.insert(ConnectInfo(remote));
    let body = RequestBody::new(incoming, bodies.clone(), activity.clone(), discard);
    Request::from_parts(parts, axum::body::Body::new(body))
}

fn expects_continue(headers: &http::HeaderMap) -> bool {
    headers.get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// Requests in flight on one connection, and since when it has had none.
#[derive(Debug)]
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `opened` to the end of the last response.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self { opened: Instant::now(), in_flight: AtomicUsize::new(0), idle_since_ms: AtomicU64::new(0) }
    }

    /// Resolves once the connection has had no request in flight for
    /// `timeout`, counting from `floor` at the earliest. Wakes at most once
    /// per `timeout` while requests run, rather than being told of each one.
    async fn quiet_for(self: &Arc<Self>, floor: Instant, timeout: Duration) {
        loop {
            let wake = if self.in_flight.load(Ordering::Acquire) > 0 {
                Instant::now() + timeout
            } else {
                let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
                let expires = (self.opened + since).max(floor) + timeout;
                if expires <= Instant::now() {
                    return;
                }
                expires
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

/// One request in flight; ends when its response body is finished or dropped.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let now = u64::try_from(activity.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Before the count drops, so a watcher that sees none in flight also
        // sees when the last one ended.
        activity.idle_since_ms.fetch_max(now, Ordering::AcqRel);
        activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_bytes_tell_the_protocol() {
        assert_eq!(sniffed(b"POST /v1/chat/completions HTTP/1.1\r\n"), Sniffed::Http1);
        assert_eq!(sniffed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Sniffed::Http1);
        assert_eq!(sniffed(b""), Sniffed::Http1, "closed before a byte");
        assert_eq!(sniffed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Sniffed::Http2);
        assert_eq!(sniffed(b"PRI * HTTP/2"), Sniffed::Unsure, "a part of the preface");
        assert_eq!(sniffed(b"PRI * HTTP/1.1\r\n"), Sniffed::Http1, "not the preface after all");
    }
}
