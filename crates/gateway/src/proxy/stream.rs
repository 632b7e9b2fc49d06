//! Relaying an upstream SSE stream to the client, event by event.
//!
//! Each upstream chunk is split into whole events by the scanner and the
//! events are forwarded as they complete: nothing is re-encoded and nothing
//! waits for more than the rest of its own event. Because the client only
//! ever receives whole events, a failure can always be reported by appending
//! one `data: {"error":…}` event, which makes the SDKs raise `APIError`.
//!
//! A stream is complete only when its protocol's end marker arrived
//! ([`EndMarker`]); one the upstream closed before it, however cleanly, ends
//! with an error event and its record is flagged `upstream:stream_truncated`.
//!
//! Dropping the stream (the client went away) drops the upstream response,
//! which closes or resets the upstream connection and so cancels the request.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use tollgate_openai::{Api, EndMarker, ErrorEnvelope, SseScanner, anthropic, gemini};

use crate::accounting::tap::StreamTap;

/// Where a relayed stream gets its bytes: the upstream response in
/// production, a scripted source in unit tests.
pub trait ChunkSource: Send + 'static {
    fn next_chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, String>> + Send;
}

impl ChunkSource for crate::upstream::UpstreamBody {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        crate::upstream::UpstreamBody::next_chunk(self).await.map_err(|e| e.to_string())
    }
}

struct Relay<S> {
    source: S,
    scanner: SseScanner,
    ready: VecDeque<Bytes>,
    idle_timeout: Duration,
    /// The API whose error event ends a failed stream.
    api: Api,
    finished: bool,
    /// The marker a complete stream ends with (`None`: not checked).
    end: Option<EndMarker>,
    /// Whether the end marker arrived.
    complete: bool,
    tap: Option<StreamTap>,
    /// The upstream's in-flight slot, given back when the stream ends or is
    /// dropped.
    _in_flight: Option<crate::upstream::InFlightSlot>,
}

/// One event in the stream's own API that makes its SDK raise: the status
/// says what kind of failure it was (502 broken, 504 silent).
fn error_event(api: Api, message: &str, code: &str) -> Bytes {
    let status = if code == "upstream_timeout" { 504 } else { 502 };
    match api {
        Api::OpenAi => Bytes::from(ErrorEnvelope::new(message, "upstream_error", code).to_sse_event()),
        Api::Gemini => Bytes::from(gemini::error_event(status, message, code)),
        Api::Anthropic => Bytes::from(anthropic::error_event(status, message)),
    }
}

/// Bounds on a relayed stream.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub idle_timeout: Duration,
    pub max_event_bytes: usize,
}

impl<S: ChunkSource> Relay<S> {
    /// Reads from the upstream until at least one frame is ready or the
    /// stream is over.
    async fn fill(&mut self) {
        let mut events = Vec::new();
        while self.ready.is_empty() && !self.finished {
            match tokio::time::timeout(self.idle_timeout, self.source.next_chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    if let Err(e) = self.scanner.push(chunk, &mut events) {
                        self.forward(&mut events);
                        self.fail(&e.to_string(), "upstream_bad_response");
                    }
                }
                Ok(Ok(None)) => {
                    let tail = self.scanner.finish(&mut events);
                    self.forward(&mut events);
                    if tail.is_some() {
                        self.fail("the upstream stream ended in the middle of an event", "upstream_disconnected");
                    } else if self.end.is_some() && !self.complete {
                        self.fail("the upstream ended the stream before the answer was complete", "stream_truncated");
                    } else if let Some(tap) = &mut self.tap {
                        tap.finish();
                    }
                    self.finished = true;
                }
                Ok(Err(detail)) => {
                    tracing::warn!(error = %detail, "upstream stream failed");
                    self.fail("the upstream connection failed during the stream", "upstream_disconnected");
                }
                Err(_elapsed) => {
                    self.fail("the upstream stopped sending during the stream", "upstream_timeout");
                }
            }
            self.forward(&mut events);
        }
    }

    /// Queues whole events for the client, through the accounting tap.
    fn forward(&mut self, events: &mut Vec<tollgate_openai::SseEvent>) {
        for event in events.drain(..) {
            if !self.complete && self.end.is_some_and(|end| end.is_end(&event)) {
                self.complete = true;
            }
            match &mut self.tap {
                None => self.ready.push_back(event.into_bytes()),
                Some(tap) => self.ready.extend(tap.on_event(event)),
            }
        }
    }

    fn fail(&mut self, message: &str, code: &str) {
        self.ready.push_back(error_event(self.api, message, code));
        if let Some(tap) = &mut self.tap {
            tap.fail(code);
        }
        self.finished = true;
    }
}

/// The client-facing body stream for an upstream SSE response.
pub fn relay<S: ChunkSource>(
    source: S,
    limits: Limits,
    shape: super::relay::Shape,
    tap: Option<StreamTap>,
    slot: Option<crate::upstream::InFlightSlot>,
) -> impl Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static {
    let relay = Relay {
        source,
        scanner: SseScanner::new(limits.max_event_bytes),
        ready: VecDeque::new(),
        idle_timeout: limits.idle_timeout,
        api: shape.api,
        finished: false,
        end: shape.end,
        complete: false,
        tap,
        _in_flight: slot,
    };
    futures_util::stream::unfold(relay, |mut relay| async move {
        relay.fill().await;
        let frame = relay.ready.pop_front()?;
        Some((Ok(frame), relay))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    struct Script(VecDeque<Result<Option<Bytes>, String>>);

    impl ChunkSource for Script {
        async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
            match self.0.pop_front() {
                Some(step) => step,
                // Stall forever: lets the idle timeout fire.
                None => std::future::pending().await,
            }
        }
    }

    async fn run(steps: Vec<Result<Option<&'static [u8]>, &'static str>>) -> Vec<Bytes> {
        run_with(None, steps).await
    }

    async fn run_with(end: Option<EndMarker>, steps: Vec<Result<Option<&'static [u8]>, &'static str>>) -> Vec<Bytes> {
        let script =
            Script(steps.into_iter().map(|s| s.map(|o| o.map(Bytes::from_static)).map_err(str::to_owned)).collect());
        let limits = Limits { idle_timeout: Duration::from_millis(50), max_event_bytes: 1024 };
        let shape = super::super::relay::Shape { api: Api::OpenAi, strip_usage: false, end };
        relay(script, limits, shape, None, None).map(|r| r.unwrap()).collect().await
    }

    #[tokio::test]
    async fn a_stream_closed_cleanly_before_its_end_marker_ends_with_an_error_event() {
        let frames = run_with(Some(EndMarker::Done), vec![Ok(Some(b"data: 1\n\ndata: 2\n\n")), Ok(None)]).await;
        assert_eq!(frames.len(), 3, "{frames:?}");
        assert!(String::from_utf8_lossy(&frames[2]).contains("stream_truncated"), "{frames:?}");
        let complete = run_with(Some(EndMarker::Done), vec![Ok(Some(b"data: 1\n\ndata: [DONE]\n\n")), Ok(None)]).await;
        assert_eq!(complete.len(), 2, "a stream with its marker ends as it came: {complete:?}");
        assert_eq!(complete[1], Bytes::from_static(b"data: [DONE]\n\n"));
    }

    #[tokio::test]
    async fn forwards_whole_events_and_reassembles_split_ones() {
        let frames = run(vec![Ok(Some(b"data: 1\n\ndata: ")), Ok(Some(b"2\n\n")), Ok(None)]).await;
        assert_eq!(frames, vec![Bytes::from_static(b"data: 1\n\n"), Bytes::from_static(b"data: 2\n\n")]);
    }

    #[tokio::test]
    async fn a_failure_mid_stream_ends_with_one_error_event_at_a_boundary() {
        let frames = run(vec![Ok(Some(b"data: 1\n\ndata: {\"partial")), Err("reset")]).await;
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0], Bytes::from_static(b"data: 1\n\n"));
        assert!(frames[1].starts_with(b"data: {\"error\":"), "{:?}", frames[1]);
        assert!(String::from_utf8_lossy(&frames[1]).contains("upstream_disconnected"));
    }

    #[tokio::test]
    async fn a_stream_cut_inside_an_event_reports_an_error() {
        let frames = run(vec![Ok(Some(b"data: 1\n\ndata: 2")), Ok(None)]).await;
        assert_eq!(frames.len(), 2);
        assert!(String::from_utf8_lossy(&frames[1]).contains("upstream_disconnected"));
    }

    #[tokio::test]
    async fn a_stalled_upstream_times_out_with_an_error_event() {
        let frames = run(vec![Ok(Some(b"data: 1\n\n"))]).await;
        assert_eq!(frames.len(), 2);
        assert!(String::from_utf8_lossy(&frames[1]).contains("upstream_timeout"));
    }
}
