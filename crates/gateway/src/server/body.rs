//! The request body as the handlers see it: hyper's body, with read timeouts,
//! and a bounded discard of whatever a handler answered without reading.
//!
//! Why discard: when a handler answers early (413 from `content-length`, 401
//! before the body is looked at) and drops the body, hyper stops reading and
//! closes the connection once the answer is written. The client is usually
//! still sending; the unread bytes make the kernel reset the connection, and
//! a client that has not yet read the answer sees only the reset (Node's
//! fetch did, most of the time). Reading the rest and throwing it away, as
//! nginx's lingering close does, lets the answer be read. A body that ends
//! within the bounds even leaves the connection reusable.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Activity, InFlight};
use crate::config::ServerConfig;

/// The bounds on reading request bodies, and where discards run.
#[derive(Debug)]
pub struct BodyLimits {
    /// Longest silence while a body is being read (or discarded).
    pub idle_timeout: Duration,
    /// Longest time to read a whole body, from the handler's first read.
    pub read_timeout: Duration,
    /// Most bytes discarded after an early answer; 0 turns discarding off.
    pub discard_max_bytes: u64,
    /// Longest time spent discarding after an early answer.
    pub discard_timeout: Duration,
    /// Discards run here, so shutdown can wait for them.
    tracker: TaskTracker,
    /// Cancelled at shutdown: a stopping gateway does not linger.
    stop: CancellationToken,
}

impl BodyLimits {
    pub fn new(config: &ServerConfig, tracker: TaskTracker, stop: CancellationToken) -> Self {
        Self {
            idle_timeout: config.body_idle_timeout,
            read_timeout: config.body_read_timeout,
            discard_max_bytes: config.discard_max_bytes,
            discard_timeout: config.discard_timeout,
            tracker,
            stop,
        }
    }

    /// Reads and drops the rest of `body` within the discard bounds, in a
    /// task of its own: the handler has already answered. The discard counts
    /// as a request in flight, so the connection is not closed as idle under
    /// it.
    fn discard(self: &Arc<Self>, body: Incoming, in_flight: InFlight) {
        if self.discard_max_bytes == 0 || self.discard_timeout.is_zero() {
            return;
        }
        // Bodies are dropped on the runtime; without one there is nothing to
        // run the discard on, and hyper simply closes the connection.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.tracker.spawn_on(discard_rest(body, self.clone(), in_flight), &runtime);
    }
}

/// What reading a request body failed with, besides the connection's own
/// errors.
#[derive(Debug, thiserror::Error)]
pub enum BodyTimeout {
    #[error("no part of the request body arrived for {0:?}")]
    Idle(Duration),
    #[error("the request body was not complete within {0:?}")]
    Total(Duration),
}

/// Whether `error`, or anything in its chain of sources, is a body timeout.
pub fn is_timeout(error: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<BodyTimeout>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// Whether an unread rest may be discarded after the handler answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    Never,
    /// Only if the handler started reading: the client sent
    /// `Expect: 100-continue` and gets the body's invitation only then.
    IfRead,
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Reading,
    /// The body ended, or the connection failed: nothing left to discard.
    Over,
    /// A timeout fired: the client is not sending, so discarding would only
    /// wait again; hyper closes the connection after the answer.
    TimedOut,
}

/// Hyper's request body with the read timeouts, discarding its unread rest
/// when dropped.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    limits: Arc<BodyLimits>,
    activity: Arc<Activity>,
    discard: Discard,
    state: State,
    /// Set at the first read: when the whole body is due.
    due: Option<Instant>,
    /// When the last frame arrived (or reading started).
    last_frame: Option<Instant>,
    /// Armed only when a read has to wait, so bodies that arrive with their
    /// head never create a timer.
    timer: Option<Pin<Box<Sleep>>>,
}

impl RequestBody {
    pub(super) fn new(inner: Incoming, limits: Arc<BodyLimits>, activity: Arc<Activity>, discard: Discard) -> Self {
        Self {
            inner: Some(inner),
            limits,
            activity,
            discard,
            state: State::Reading,
            due: None,
            last_frame: None,
            timer: None,
        }
    }

    fn deadline(&self, now: Instant) -> (Instant, BodyTimeout) {
        let idle = self.last_frame.unwrap_or(now) + self.limits.idle_timeout;
        let total = self.due.unwrap_or(now + self.limits.read_timeout);
        if idle <= total {
            (idle, BodyTimeout::Idle(self.limits.idle_timeout))
        } else {
            (total, BodyTimeout::Total(self.limits.read_timeout))
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.state != State::Reading {
            return Poll::Ready(None);
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if this.due.is_none() {
            let now = Instant::now();
            this.due = Some(now + this.limits.read_timeout);
            this.last_frame = Some(now);
        }
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_frame = Some(Instant::now());
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state = State::Over;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.state = State::Over;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let (deadline, timeout) = this.deadline(Instant::now());
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                ready!(timer.as_mut().poll(cx));
                this.state = State::TimedOut;
                Poll::Ready(Some(Err(timeout.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state != State::Reading || self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, self.state) {
            (Some(inner), State::Reading) => inner.size_hint(),
            _ => SizeHint::with_exact(0),
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        if self.state != State::Reading || inner.is_end_stream() {
            return;
        }
        let read = self.due.is_some();
        match self.discard {
            Discard::Always => self.limits.discard(inner, InFlight::begin(&self.activity)),
            Discard::IfRead if read => self.limits.discard(inner, InFlight::begin(&self.activity)),
            Discard::IfRead | Discard::Never => {}
        }
    }
}

/// Reads and drops frames until the body ends, the client stops sending for
/// the idle timeout, or the byte or time bound is reached. Dropping `body`
/// then lets hyper finish the connection: kept alive if the body ended,
/// closed otherwise.
async fn discard_rest(mut body: Incoming, limits: Arc<BodyLimits>, _in_flight: InFlight) {
    let started = Instant::now();
    let until = started + limits.discard_timeout;
    let mut discarded: u64 = 0;
    let outcome = loop {
        let wait = (Instant::now() + limits.idle_timeout).min(until);
        let frame = tokio::select! {
            frame = tokio::time::timeout_at(wait, body.frame()) => frame,
            () = limits.stop.cancelled() => break "shutting down",
        };
        match frame {
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    discarded = discarded.saturating_add(data.len() as u64);
                }
                if discarded >= limits.discard_max_bytes {
                    break "byte bound reached";
                }
            }
            Ok(None) => break "body complete",
            Ok(Some(Err(_))) => break "client gone",
            Err(_) if wait == until => break "time bound reached",
            Err(_) => break "client stopped sending",
        }
    };
    tracing::debug!(
        bytes = discarded,
        elapsed_ms = started.elapsed().as_millis() as u64,
        outcome,
        "request body discarded"
    );
}

/// A response body that marks its request finished when it is done or
/// dropped, for the connection's idle timeout.
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub(super) fn new(inner: B, in_flight: InFlight) -> Self {
        Self { inner, _in_flight: in_flight }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
