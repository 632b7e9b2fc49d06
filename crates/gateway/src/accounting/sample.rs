//! An even, bounded sample of a stream's events, for estimating the output
//! of a stream that ends before its usage.
//!
//! Usage normally arrives only at a stream's end, so every open stream holds
//! its sample until then: the bound is what thousands of held streams cost,
//! and it is a few KiB. Keeping only the stream's first events would make
//! the estimate of a long stream a guess from its beginning. The sample
//! spans the whole stream instead: it keeps every event until it is full,
//! then halves itself (every other event dropped) and from then on keeps
//! one event in two, then one in four when full again, and so on. The
//! estimate scales the sample's tokens by the bytes of every event offered
//! over the bytes kept.

use bytes::{Bytes, BytesMut};
use tollgate_openai::{SseEvent, SseScanner};

use super::estimate;

/// The most event bytes a sample holds: about a dozen chat-completion
/// chunks (each about 180 bytes for a token or two of content), half a
/// memory page. Events of one stream are alike in what their bytes carry,
/// so a dozen spread over the stream scale well (see the tests). An event
/// larger than this on its own is still kept when the sample is empty, so
/// a stream of large events is not estimated at nothing.
pub const MAX_SAMPLE_BYTES: usize = 2 * 1024;

#[derive(Debug)]
pub struct StreamSample {
    /// The kept events, copied end to end: an event is a slice of the
    /// upstream read buffer it arrived in (often hundreds of KB), and
    /// holding the slice would pin that whole buffer for the stream's life.
    kept: BytesMut,
    /// Events kept so far are those whose place in the stream is a multiple
    /// of this (a power of two).
    stride: u64,
    /// Events offered, kept or not.
    offered: u64,
    /// Bytes of every event offered, kept or not.
    seen: u64,
}

impl Default for StreamSample {
    fn default() -> Self {
        Self { kept: BytesMut::new(), stride: 1, offered: 0, seen: 0 }
    }
}

impl StreamSample {
    pub fn offer(&mut self, event: &SseEvent) {
        let bytes = event.as_bytes();
        let place = self.offered;
        self.offered += 1;
        self.seen = self.seen.saturating_add(bytes.len() as u64);
        if !place.is_multiple_of(self.stride) {
            return;
        }
        if self.kept.is_empty() {
            // Allocated once, at its bound: growing by doubling would
            // overshoot it.
            self.kept.reserve(MAX_SAMPLE_BYTES.max(bytes.len()));
        } else if self.kept.len() + bytes.len() > MAX_SAMPLE_BYTES {
            self.halve();
            if !place.is_multiple_of(self.stride) || self.kept.len() + bytes.len() > MAX_SAMPLE_BYTES {
                return;
            }
        }
        self.kept.extend_from_slice(bytes);
    }

    /// Drops every other kept event and doubles the stride, so the sample
    /// stays even over the stream.
    fn halve(&mut self) {
        let events = split(std::mem::take(&mut self.kept).freeze());
        let mut kept = BytesMut::with_capacity(MAX_SAMPLE_BYTES);
        for event in events.iter().step_by(2) {
            kept.extend_from_slice(event.as_bytes());
        }
        self.kept = kept;
        self.stride = self.stride.saturating_mul(2);
    }

    /// Nothing more is needed (the stream's usage arrived): frees the
    /// sample.
    pub fn discard(&mut self) {
        self.kept = BytesMut::new();
    }

    /// Output tokens estimated for the whole stream: the sample's, scaled
    /// by the bytes offered over the bytes kept. Tokenizes: call it off the
    /// request workers.
    pub fn estimate_tokens(self) -> u64 {
        let kept = self.kept.freeze();
        let kept_bytes = kept.len() as u64;
        let counted = estimate::stream_tokens(&split(kept));
        if kept_bytes == 0 || self.seen <= kept_bytes {
            return counted;
        }
        u64::try_from(u128::from(counted) * u128::from(self.seen) / u128::from(kept_bytes)).unwrap_or(u64::MAX)
    }

    #[cfg(test)]
    fn kept_bytes(&self) -> usize {
        self.kept.len()
    }
}

/// The kept bytes as events again. Whole events only were kept, so the
/// scanner cannot fail on them; were it to, the sample is counted as empty.
fn split(kept: Bytes) -> Vec<SseEvent> {
    let mut events = Vec::new();
    if SseScanner::new(usize::MAX).push(kept, &mut events).is_err() {
        events.clear();
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(content: &str) -> SseEvent {
        let data = serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4.1",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}],
        });
        let mut events = split(Bytes::from(format!("data: {data}\n\n")));
        assert_eq!(events.len(), 1);
        events.remove(0)
    }

    fn tokens_of(events: &[SseEvent]) -> u64 {
        estimate::stream_tokens(events)
    }

    #[test]
    fn a_short_stream_is_kept_whole_and_counted_exactly() {
        let events: Vec<SseEvent> = (0..10).map(|i| chunk(&format!(" word{i}"))).collect();
        let mut sample = StreamSample::default();
        for event in &events {
            sample.offer(event);
        }
        assert_eq!(sample.kept_bytes(), events.iter().map(|e| e.as_bytes().len()).sum::<usize>());
        assert_eq!(sample.estimate_tokens(), tokens_of(&events));
    }

    #[test]
    fn a_long_stream_stays_within_the_bound_and_is_sampled_over_its_whole_length() {
        // The first half says little per event, the second half a lot: a
        // sample of the beginning alone would miss most of the output.
        let events: Vec<SseEvent> = (0..4_000)
            .map(|i| if i < 2_000 { chunk(" a") } else { chunk(" several words of content in every chunk here") })
            .collect();
        let exact = tokens_of(&events) as f64;
        let mut sample = StreamSample::default();
        for event in &events {
            sample.offer(event);
            assert!(sample.kept_bytes() <= MAX_SAMPLE_BYTES, "{} bytes kept", sample.kept_bytes());
        }
        let estimated = sample.estimate_tokens() as f64;
        let error = (estimated - exact).abs() / exact;
        assert!(error < 0.1, "estimated {estimated} tokens for {exact}: off by {:.1} %", error * 100.0);
    }

    #[test]
    fn an_event_larger_than_the_bound_is_kept_when_it_is_the_first() {
        let big = chunk(&" many tokens".repeat(1_000));
        let mut sample = StreamSample::default();
        sample.offer(&big);
        sample.offer(&chunk(" more"));
        assert_eq!(sample.kept_bytes(), big.as_bytes().len(), "the big event, and nothing past the bound");
        assert!(sample.estimate_tokens() >= tokens_of(std::slice::from_ref(&big)));
    }

    #[test]
    fn a_stream_of_events_each_larger_than_the_bound_keeps_one_and_scales_it() {
        let events: Vec<SseEvent> = (0..50).map(|_| chunk(&" many tokens".repeat(300))).collect();
        let mut sample = StreamSample::default();
        for event in &events {
            sample.offer(event);
            assert_eq!(sample.kept_bytes(), events[0].as_bytes().len(), "one event held, however many come");
        }
        let (estimated, exact) = (sample.estimate_tokens() as f64, tokens_of(&events) as f64);
        assert!((estimated - exact).abs() / exact < 0.1, "estimated {estimated} tokens for {exact}");
    }

    #[test]
    fn a_discarded_sample_holds_nothing() {
        let mut sample = StreamSample::default();
        sample.offer(&chunk(" word"));
        sample.discard();
        assert_eq!(sample.kept_bytes(), 0);
        assert_eq!(sample.kept.capacity(), 0);
    }
}
