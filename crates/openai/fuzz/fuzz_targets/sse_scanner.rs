//! `cargo +nightly fuzz run sse_scanner` (from crates/openai).
//!
//! Feeds arbitrary bytes, cut at arbitrary points, to the SSE scanner and
//! the usage finder, and checks the scanner's core property: whatever the
//! chunking, the events plus the unfinished tail are exactly the input.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate_openai::{SseScanner, find_usage};

fuzz_target!(|data: &[u8]| {
    let Some((&cuts, stream)) = data.split_first() else { return };
    let mut scanner = SseScanner::new(1 << 20);
    let mut events = Vec::new();
    let step = usize::from(cuts).max(1);
    for chunk in stream.chunks(step) {
        if scanner.push(Bytes::copy_from_slice(chunk), &mut events).is_err() {
            return;
        }
    }
    let tail = scanner.finish(&mut events);
    let mut rebuilt: Vec<u8> = events.iter().flat_map(|e| e.as_bytes().to_vec()).collect();
    rebuilt.extend_from_slice(tail.as_deref().unwrap_or_default());
    assert_eq!(rebuilt, stream);
    for event in &events {
        let _ = event.data();
        let _ = find_usage(event.as_bytes());
    }
});
