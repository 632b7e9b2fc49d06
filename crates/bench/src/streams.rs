//! Streaming: time to first token and the spacing of chunks as the client
//! sees them, measured here (a load generator only sees whole responses),
//! and many slow streams held open at once for the memory figures.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::stack::Target;
use crate::stats::Samples;

/// A streamed chat completion of `chunks` events `interval_ms` apart. The
/// fake upstream is steered through the body's `metadata` rather than
/// `x-fake-*` headers: every path forwards the body as it is, while a peer
/// gateway forwards no unknown headers.
pub fn stream_body(chunks: usize, interval_ms: u64) -> String {
    format!(
        r#"{{"model":"gpt-4.1-mini","stream":true,"metadata":{{"x-fake-chunks":"{chunks}","x-fake-chunk-interval-ms":"{interval_ms}"}},"messages":[{{"role":"user","content":"Tell me a story"}}]}}"#
    )
}

/// What the client saw of a batch of streams.
#[derive(Debug, Default)]
pub struct StreamFigures {
    /// Request sent → first content event, in microseconds.
    pub ttft_us: Samples,
    /// Time between consecutive content events, in microseconds.
    pub gap_us: Samples,
    /// Reads that carried more than one content event: events an
    /// intermediary held back and released together.
    pub coalesced_reads: u64,
    pub events: u64,
    pub failed: u64,
}

fn request(http: &reqwest::Client, target: &Target, chunks: usize, interval_ms: u64) -> reqwest::RequestBuilder {
    let mut request =
        http.post(target.chat_url()).header("content-type", "application/json").body(stream_body(chunks, interval_ms));
    if let Some(key) = &target.key {
        request = request.bearer_auth(key);
    }
    request
}

/// `count` streams of `chunks` events `interval_ms` apart, `concurrency` at a time.
pub async fn measure(
    http: &reqwest::Client,
    target: &Target,
    count: usize,
    concurrency: usize,
    chunks: usize,
    interval_ms: u64,
) -> StreamFigures {
    let results = futures_util::stream::iter(0..count)
        .map(|_| one_stream(http, target, chunks, interval_ms))
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    let mut figures = StreamFigures::default();
    for result in results {
        match result {
            Some(one) => {
                figures.ttft_us.push(one.ttft_us);
                figures.gap_us.extend(one.gaps_us);
                figures.coalesced_reads += one.coalesced_reads;
                figures.events += one.events;
            }
            None => figures.failed += 1,
        }
    }
    figures
}

struct OneStream {
    ttft_us: u64,
    gaps_us: Vec<u64>,
    coalesced_reads: u64,
    events: u64,
}

async fn one_stream(http: &reqwest::Client, target: &Target, chunks: usize, interval_ms: u64) -> Option<OneStream> {
    let started = Instant::now();
    let response = request(http, target, chunks, interval_ms).send().await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    let mut body = response.bytes_stream();
    let mut last: Option<Instant> = None;
    let mut one = OneStream { ttft_us: 0, gaps_us: Vec::with_capacity(chunks), coalesced_reads: 0, events: 0 };
    while let Some(chunk) = body.next().await {
        let chunk = chunk.ok()?;
        let now = Instant::now();
        // Content events only: role, usage and [DONE] frames are not tokens.
        let content = count(&chunk, b"\"content\":\"");
        if content == 0 {
            continue;
        }
        match last {
            None => one.ttft_us = micros(now - started),
            Some(previous) => one.gaps_us.push(micros(now - previous)),
        }
        if content > 1 {
            one.coalesced_reads += 1;
        }
        one.events += content;
        last = Some(now);
    }
    (one.events > 0).then_some(one)
}

fn count(haystack: &[u8], needle: &[u8]) -> u64 {
    haystack.windows(needle.len()).filter(|w| *w == needle).count() as u64
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Opens `count` slow streams at once and keeps them open until every one
/// has its first event; returns them (dropping them closes them) and how
/// many opened. Streams that did not open are told on the console, with why
/// the first of them failed.
pub async fn hold_open(http: &reqwest::Client, target: &Target, count: usize) -> (Vec<reqwest::Response>, usize) {
    let results = futures_util::stream::iter(0..count)
        // Long, slow streams: they outlive the measurement.
        .map(|_| async {
            match request(http, target, 600, 100).send().await {
                Ok(response) if response.status().is_success() => Ok(response),
                Ok(response) => Err(format!("status {}", response.status())),
                Err(e) => Err(format!("{e:?}")),
            }
        })
        .buffer_unordered(500)
        .collect::<Vec<_>>()
        .await;
    let mut opened = Vec::with_capacity(count);
    let mut failed: Option<(usize, String)> = None;
    for result in results {
        match result {
            Ok(response) => opened.push(response),
            Err(why) => failed.get_or_insert((0, why)).0 += 1,
        }
    }
    if let Some((n, first)) = failed {
        println!("{}: {n} of {count} streams did not open; the first: {first}", target.name);
    }
    let n = opened.len();
    (opened, n)
}
