//! An incremental Server-Sent Events scanner.
//!
//! Upstream chunks arrive at arbitrary boundaries. The scanner splits them into
//! whole events (each ending with its blank line) so the gateway can forward
//! complete frames and, when the upstream fails mid-stream, append an error
//! event without corrupting a half-written one.
//!
//! It only looks for line terminators (with `memchr`); it never parses the
//! JSON inside an event. When a chunk holds whole events, as upstreams nearly
//! always send them, the events are zero-copy slices of that chunk; only a
//! partial event at a chunk boundary is copied and carried to the next chunk.
//!
//! Line terminators follow the SSE specification: `\r\n`, `\n` or `\r`.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

/// One complete SSE event, including its terminating blank line, exactly as
/// received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent(Bytes);

impl SseEvent {
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    pub fn into_bytes(self) -> Bytes {
        self.0
    }

    /// The event's data: the `data:` lines joined with `\n`, with the one
    /// optional space after the colon removed. Comments and other fields are
    /// skipped. Borrowed when the event has a single data line.
    pub fn data(&self) -> Option<Cow<'_, [u8]>> {
        let mut found: Option<Cow<'_, [u8]>> = None;
        for line in lines(&self.0) {
            let Some(rest) = line.strip_prefix(b"data") else {
                continue;
            };
            let value = match rest.first() {
                None => rest,
                Some(b':') => rest[1..].strip_prefix(b" ").unwrap_or(&rest[1..]),
                // A field named e.g. "database": not ours.
                Some(_) => continue,
            };
            found = Some(match found {
                None => Cow::Borrowed(value),
                Some(prev) => {
                    let mut joined = prev.into_owned();
                    joined.push(b'\n');
                    joined.extend_from_slice(value);
                    Cow::Owned(joined)
                }
            });
        }
        found
    }

    /// The value of the event's `event:` field, if it has one.
    pub fn event_name(&self) -> Option<&str> {
        lines(&self.0).find_map(|line| {
            let rest = line.strip_prefix(b"event:")?;
            let value = rest.strip_prefix(b" ").unwrap_or(rest);
            std::str::from_utf8(value).ok()
        })
    }

    /// Whether this is the `data: [DONE]` sentinel that ends OpenAI streams.
    pub fn is_done(&self) -> bool {
        self.data().is_some_and(|d| d.as_ref() == b"[DONE]")
    }
}

/// Splits `bytes` into lines without their terminators.
fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match memchr::memchr2(b'\r', b'\n', rest) {
            None => {
                let line = rest;
                rest = &[];
                Some(line)
            }
            Some(pos) => {
                let line = &rest[..pos];
                let skip = if rest[pos] == b'\r' && rest.get(pos + 1) == Some(&b'\n') { 2 } else { 1 };
                rest = &rest[pos + skip..];
                Some(line)
            }
        }
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SseScannerError {
    /// An event grew past the configured bound without ending.
    EventTooLarge { limit: usize },
}

impl std::fmt::Display for SseScannerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::EventTooLarge { limit } => {
                write!(f, "an SSE event exceeded {limit} bytes without ending")
            }
        }
    }
}

impl std::error::Error for SseScannerError {}

#[derive(Debug)]
pub struct SseScanner {
    /// Bytes of the event in progress (copied; only ever a partial event).
    carry: BytesMut,
    /// How far `carry` has been scanned, and whether that offset is at the
    /// start of a line. A trailing `\r` is left unscanned until the next byte
    /// says whether it is a `\r\n`.
    scanned: usize,
    at_line_start: bool,
    max_event_bytes: usize,
}

impl SseScanner {
    pub fn new(max_event_bytes: usize) -> Self {
        Self { carry: BytesMut::new(), scanned: 0, at_line_start: true, max_event_bytes }
    }

    /// Feeds one chunk and appends every event it completes to `out`.
    pub fn push(&mut self, chunk: Bytes, out: &mut Vec<SseEvent>) -> Result<(), SseScannerError> {
        if self.carry.is_empty() {
            // Fast path: events are slices of the chunk itself.
            let mut event_start = 0;
            let (pos, at_line_start) = scan(&chunk, 0, true, |end| {
                out.push(SseEvent(chunk.slice(event_start..end)));
                event_start = end;
            });
            self.carry.extend_from_slice(&chunk[event_start..]);
            self.scanned = pos - event_start;
            self.at_line_start = at_line_start;
        } else {
            self.carry.extend_from_slice(&chunk);
            let mut ends = Vec::new();
            let (pos, at_line_start) = scan(&self.carry, self.scanned, self.at_line_start, |end| ends.push(end));
            let mut taken = 0;
            for end in ends {
                out.push(SseEvent(self.carry.split_to(end - taken).freeze()));
                taken = end;
            }
            self.scanned = pos - taken;
            self.at_line_start = at_line_start;
        }
        if self.carry.len() > self.max_event_bytes {
            return Err(SseScannerError::EventTooLarge { limit: self.max_event_bytes });
        }
        Ok(())
    }

    /// Whether the bytes seen so far end exactly at an event boundary.
    pub fn at_event_boundary(&self) -> bool {
        self.carry.is_empty()
    }

    /// Ends the stream: a final event whose blank line was cut by a lone
    /// trailing `\r` is completed; anything else left over is returned as an
    /// incomplete tail.
    pub fn finish(&mut self, out: &mut Vec<SseEvent>) -> Option<Bytes> {
        if self.carry.is_empty() {
            return None;
        }
        let (pos, _) = scan_final(&self.carry, self.scanned, self.at_line_start);
        if let Some(end) = pos {
            out.push(SseEvent(self.carry.split_to(end).freeze()));
        }
        self.scanned = 0;
        self.at_line_start = true;
        if self.carry.is_empty() { None } else { Some(self.carry.split().freeze()) }
    }
}

/// Scans `data` from `pos`, calling `on_event_end` with the offset just past
/// each blank line. Returns where scanning stopped and whether that offset is
/// at a line start. Stops before a trailing `\r` it cannot classify yet.
fn scan(data: &[u8], mut pos: usize, mut at_line_start: bool, mut on_event_end: impl FnMut(usize)) -> (usize, bool) {
    while let Some(offset) = memchr::memchr2(b'\r', b'\n', &data[pos..]) {
        let term = pos + offset;
        let len = if data[term] == b'\r' {
            match data.get(term + 1) {
                // A trailing '\r' may be the first half of "\r\n": resume at it.
                None if term == pos => return (pos, at_line_start),
                None => return (term, false),
                Some(b'\n') => 2,
                Some(_) => 1,
            }
        } else {
            1
        };
        let empty_line = at_line_start && term == pos;
        pos = term + len;
        at_line_start = true;
        if empty_line {
            on_event_end(pos);
        }
    }
    if pos < data.len() { (data.len(), false) } else { (pos, at_line_start) }
}

/// Like [`scan`] at end of input, where a trailing `\r` is a terminator.
/// Returns the end of the last complete event, if any.
fn scan_final(data: &[u8], pos: usize, at_line_start: bool) -> (Option<usize>, bool) {
    let mut last_end = None;
    let (pos, at_line_start) = scan(data, pos, at_line_start, |end| last_end = Some(end));
    if &data[pos..] == b"\r" && at_line_start {
        return (Some(data.len()), true);
    }
    (last_end, at_line_start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(chunks: &[&[u8]]) -> (Vec<Vec<u8>>, Option<Vec<u8>>) {
        let mut scanner = SseScanner::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            scanner.push(Bytes::copy_from_slice(c), &mut out).unwrap();
        }
        let tail = scanner.finish(&mut out).map(|b| b.to_vec());
        (out.into_iter().map(|e| e.into_bytes().to_vec()).collect(), tail)
    }

    #[test]
    fn whole_events_in_one_chunk_are_split() {
        let (events, tail) = feed(&[b"data: {\"a\":1}\n\ndata: [DONE]\n\n"]);
        assert_eq!(events, vec![b"data: {\"a\":1}\n\n".to_vec(), b"data: [DONE]\n\n".to_vec()]);
        assert_eq!(tail, None);
    }

    #[test]
    fn whole_events_are_zero_copy_slices_of_the_chunk() {
        let chunk = Bytes::from_static(b"data: 1\n\ndata: 2\n\n");
        let mut scanner = SseScanner::new(1024);
        let mut out = Vec::new();
        scanner.push(chunk.clone(), &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].as_bytes().as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn events_split_across_chunks_at_every_offset_are_reassembled() {
        let stream: &[u8] = b"data: {\"x\":\"hello\"}\n\n: keep-alive\n\ndata: [DONE]\n\n";
        let expected =
            vec![b"data: {\"x\":\"hello\"}\n\n".to_vec(), b": keep-alive\n\n".to_vec(), b"data: [DONE]\n\n".to_vec()];
        for cut in 0..=stream.len() {
            let (events, tail) = feed(&[&stream[..cut], &stream[cut..]]);
            assert_eq!(events, expected, "cut at {cut}");
            assert_eq!(tail, None);
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(feed(&bytes).0, expected);
    }

    #[test]
    fn crlf_and_cr_terminators_are_recognised_even_when_split() {
        let stream: &[u8] = b"data: a\r\n\r\ndata: b\r\rdata: c\n\r\n";
        let expected = vec![b"data: a\r\n\r\n".to_vec(), b"data: b\r\r".to_vec(), b"data: c\n\r\n".to_vec()];
        for cut in 0..=stream.len() {
            let (events, tail) = feed(&[&stream[..cut], &stream[cut..]]);
            assert_eq!(events, expected, "cut at {cut}");
            assert_eq!(tail, None, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(feed(&bytes).0, expected);
    }

    #[test]
    fn a_lone_trailing_cr_completes_the_last_event_at_end_of_stream() {
        let (events, tail) = feed(&[b"data: x\r\r"]);
        assert_eq!(events, vec![b"data: x\r\r".to_vec()]);
        assert_eq!(tail, None);
    }

    #[test]
    fn an_unfinished_event_is_reported_as_tail() {
        let (events, tail) = feed(&[b"data: 1\n\ndata: {\"trunc"]);
        assert_eq!(events, vec![b"data: 1\n\n".to_vec()]);
        assert_eq!(tail.as_deref(), Some(&b"data: {\"trunc"[..]));
        let (_, tail) = feed(&[b"data: 2\n"]);
        assert_eq!(tail.as_deref(), Some(&b"data: 2\n"[..]));
    }

    #[test]
    fn boundary_is_tracked() {
        let mut scanner = SseScanner::new(1024);
        let mut out = Vec::new();
        scanner.push(Bytes::from_static(b"data: 1\n"), &mut out).unwrap();
        assert!(!scanner.at_event_boundary());
        scanner.push(Bytes::from_static(b"\n"), &mut out).unwrap();
        assert!(scanner.at_event_boundary());
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn oversized_events_are_an_error_not_unbounded_memory() {
        let mut scanner = SseScanner::new(16);
        let mut out = Vec::new();
        let err = scanner.push(Bytes::from_static(b"data: 0123456789abcdef"), &mut out).unwrap_err();
        assert_eq!(err, SseScannerError::EventTooLarge { limit: 16 });
    }

    /// The fuzz target's property on many pseudo-random inputs, on stable:
    /// however the stream is cut, events plus tail give back the input, and
    /// the events do not depend on the cuts.
    #[test]
    fn any_chunking_preserves_every_byte_and_the_same_events() {
        let alphabet: &[u8] = b"data: {}\r\n:x\n\n\r\r";
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..2_000 {
            let len = (next() % 64) as usize;
            let stream: Vec<u8> = (0..len).map(|_| alphabet[(next() % alphabet.len() as u64) as usize]).collect();
            let whole = feed(&[&stream]);
            let mut chunks = Vec::new();
            let mut rest = &stream[..];
            while !rest.is_empty() {
                let cut = ((next() % 5) as usize + 1).min(rest.len());
                chunks.push(&rest[..cut]);
                rest = &rest[cut..];
            }
            let (events, tail) = feed(&chunks);
            assert_eq!((events.clone(), tail.clone()), whole, "chunking changed the result for {stream:?}");
            let mut rebuilt: Vec<u8> = events.concat();
            rebuilt.extend_from_slice(tail.as_deref().unwrap_or_default());
            assert_eq!(rebuilt, stream);
        }
    }

    #[test]
    fn data_joins_multiple_lines_and_skips_comments_and_other_fields() {
        let ev = SseEvent(Bytes::from_static(b": comment\nevent: x\ndata: a\ndata:b\ndatabase: no\r\n\r\n"));
        assert_eq!(ev.data().as_deref(), Some(&b"a\nb"[..]));
        assert!(SseEvent(Bytes::from_static(b"data: [DONE]\n\n")).is_done());
        assert!(!SseEvent(Bytes::from_static(b": ping\n\n")).is_done());
        assert_eq!(SseEvent(Bytes::from_static(b": ping\n\n")).data(), None);
    }
}
