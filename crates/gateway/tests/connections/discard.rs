//! Early answers to requests whose body is still arriving (413 over the
//! limit, 401 without a key): the client reads the answer instead of a reset,
//! because the gateway reads and discards the rest, within bounds; a client
//! that waits for `100 Continue` is refused before it sends the body.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tollgate_gateway::Config;

use crate::HEAVY;
use crate::helpers::TestGateway;
use crate::raw::{self, CHAT, Closed};

const LIMIT: usize = 1024 * 1024;
const OVER: usize = 8 * LIMIT;
/// Generous: a close due at once may still take a moment on a loaded machine.
const PROMPTLY: Duration = Duration::from_secs(3);

fn small_limit(c: &mut Config) {
    c.server.max_body_bytes = LIMIT;
}

/// Sends a chat request on an open connection and expects it answered.
async fn chat_on(stream: &mut tokio::net::TcpStream, key: &str) {
    let request = format!("{}{CHAT}", raw::chat_head(Some(key), CHAT.len(), ""));
    stream.write_all(request.as_bytes()).await.unwrap();
    let response = raw::read_response(stream, PROMPTLY).await.unwrap();
    assert_eq!(response.status, 200, "the connection was reused: {response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_reads_the_413_and_keeps_its_connection() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start_with(small_limit).await;

    // Declared too large: refused from the head, the rest discarded.
    let mut stream = raw::connect(gw.addr).await;
    stream.write_all(raw::chat_head(Some(&gw.key), OVER, "").as_bytes()).await.unwrap();
    raw::write_filler(&mut stream, OVER).await.expect("the whole body is taken, not reset");
    let response = raw::read_response(&mut stream, PROMPTLY).await.unwrap();
    assert_eq!(response.status, 413, "{response:?}");
    assert!(response.body.contains("request_too_large"));
    chat_on(&mut stream, &gw.key).await;

    // Chunked, so only found too large while reading it.
    let mut stream = raw::connect(gw.addr).await;
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {}\r\ntransfer-encoding: chunked\r\n\r\n",
        gw.key
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
    for _ in 0..(OVER / (64 * 1024)) {
        stream.write_all(chunk.as_bytes()).await.expect("the whole body is taken, not reset");
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let response = raw::read_response(&mut stream, PROMPTLY).await.unwrap();
    assert_eq!(response.status, 413, "{response:?}");
    chat_on(&mut stream, &gw.key).await;
    assert_eq!(gw.fake.requests().len(), 2, "only the requests within the limit were forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_without_a_key_gets_a_readable_401() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start_with(small_limit).await;
    let mut stream = raw::connect(gw.addr).await;
    stream.write_all(raw::chat_head(None, OVER, "").as_bytes()).await.unwrap();
    raw::write_filler(&mut stream, OVER).await.expect("the whole body is taken, not reset");
    let response = raw::read_response(&mut stream, PROMPTLY).await.unwrap();
    assert_eq!(response.status, 401, "{response:?}");
    assert!(response.body.contains("invalid_api_key"));
    chat_on(&mut stream, &gw.key).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_expect_100_continue_the_refusal_comes_before_the_body() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start_with(small_limit).await;
    for (key, status) in [(Some(gw.key.as_str()), 413), (None, 401)] {
        let mut stream = raw::connect(gw.addr).await;
        stream.write_all(raw::chat_head(key, OVER, "expect: 100-continue\r\n").as_bytes()).await.unwrap();
        let response = raw::read_response(&mut stream, PROMPTLY).await.unwrap();
        assert_eq!(response.status, status, "refused at once, without inviting the body: {response:?}");
        // The body was never sent and never will be: the gateway closes.
        let closed = raw::wait_closed(&mut stream, Instant::now(), PROMPTLY).await;
        assert!(matches!(closed, Closed::After(_)), "{status}: the connection was left open");
    }

    // Within the limit, the client is invited to send the body.
    let mut stream = raw::connect(gw.addr).await;
    stream.write_all(raw::chat_head(Some(&gw.key), CHAT.len(), "expect: 100-continue\r\n").as_bytes()).await.unwrap();
    let interim = raw::read_response(&mut stream, PROMPTLY).await.unwrap();
    assert!(interim.head.starts_with("HTTP/1.1 100"), "{interim:?}");
    stream.write_all(CHAT.as_bytes()).await.unwrap();
    let response = raw::read_response(&mut stream, PROMPTLY).await.unwrap();
    assert_eq!(response.status, 200, "{response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_sending_mid_body_is_cut_off_within_the_idle_bound() {
    let _heavy = HEAVY.lock().await;
    const IDLE: Duration = Duration::from_secs(1);
    let gw = TestGateway::start_with(|c| {
        small_limit(c);
        c.server.body_idle_timeout = IDLE;
    })
    .await;
    let mut stream = raw::connect(gw.addr).await;
    stream.write_all(raw::chat_head(Some(&gw.key), OVER, "").as_bytes()).await.unwrap();
    // Before the last bytes are sent: the gateway's idle timer starts later.
    let stopped = Instant::now();
    raw::write_filler(&mut stream, LIMIT / 2).await.unwrap();
    let response = raw::read_response(&mut stream, PROMPTLY).await.unwrap();
    assert_eq!(response.status, 413);
    let Closed::After(after) = raw::wait_closed(&mut stream, stopped, IDLE + PROMPTLY).await else {
        panic!("a client that stopped sending was kept past the idle bound");
    };
    assert!(after + Duration::from_millis(100) >= IDLE, "cut off after {after:?}, before the idle bound");
    println!("a client that stopped mid-body was cut off after {after:?} (idle bound {IDLE:?})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarding_stops_at_its_byte_bound_and_at_its_time_bound() {
    let _heavy = HEAVY.lock().await;
    const DISCARD_BYTES: u64 = 2 * 1024 * 1024;
    const DISCARD_TIME: Duration = Duration::from_secs(1);
    let gw = TestGateway::start_with(|c| {
        small_limit(c);
        c.server.discard_max_bytes = DISCARD_BYTES;
        c.server.discard_timeout = DISCARD_TIME;
    })
    .await;
    let huge = 256 * 1024 * 1024;

    // Bytes: a client that would send 256 MiB is closed on long before.
    let mut stream = raw::connect(gw.addr).await;
    stream.write_all(raw::chat_head(Some(&gw.key), huge, "").as_bytes()).await.unwrap();
    let Err((written, _)) = raw::write_filler(&mut stream, huge).await else {
        panic!("256 MiB were discarded past a bound of {DISCARD_BYTES}");
    };
    assert!(written < 64 * 1024 * 1024, "{written} bytes taken with a discard bound of {DISCARD_BYTES}");
    println!("discard byte bound {DISCARD_BYTES}: the client got {written} bytes out before the close");

    // Time: a client that keeps sending, slowly, is closed at the time bound
    // (counted here from before the request: the discard starts later).
    let answered = Instant::now();
    let mut stream = raw::connect(gw.addr).await;
    stream.write_all(raw::chat_head(Some(&gw.key), huge, "").as_bytes()).await.unwrap();
    let response = raw::read_response(&mut stream, PROMPTLY).await.unwrap();
    assert_eq!(response.status, 413);
    let (mut reader, mut writer) = stream.into_split();
    let drip = async {
        for _ in 0..1000 {
            if writer.write_all(&[b' '; 1024]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let closed = async {
        let mut sink = [0u8; 1024];
        loop {
            match tokio::io::AsyncReadExt::read(&mut reader, &mut sink).await {
                Ok(0) | Err(_) => return answered.elapsed(),
                Ok(_) => {}
            }
        }
    };
    let after = tokio::select! {
        after = closed => after,
        () = drip => panic!("the gateway kept discarding for 20 s past a bound of {DISCARD_TIME:?}"),
    };
    assert!(after + Duration::from_millis(100) >= DISCARD_TIME, "closed after {after:?}");
    assert!(after <= DISCARD_TIME + PROMPTLY, "closed after {after:?}");
    println!("discard time bound {DISCARD_TIME:?}: closed after {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_while_large_bodies_are_discarded() {
    let _heavy = HEAVY.lock().await;
    const BODY: usize = 48 * 1024 * 1024;
    const PER_CONNECTION: usize = 3;
    let gw = TestGateway::start_with(small_limit).await;
    // One request first, so what every request allocates once is counted
    // in the baseline.
    let mut warm = raw::connect(gw.addr).await;
    chat_on(&mut warm, &gw.key).await;

    let before = raw::rss_bytes();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let (peak, sampling) = (peak.clone(), sampling.clone());
        async move {
            while !sampling.is_cancelled() {
                peak.fetch_max(raw::rss_bytes(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let senders: Vec<_> = (0..2)
        .map(|_| {
            let (addr, key) = (gw.addr, gw.key.clone());
            tokio::spawn(async move {
                let mut stream = raw::connect(addr).await;
                for _ in 0..PER_CONNECTION {
                    stream.write_all(raw::chat_head(Some(&key), BODY, "").as_bytes()).await.unwrap();
                    raw::write_filler(&mut stream, BODY).await.expect("discarded, not reset");
                    let response = raw::read_response(&mut stream, PROMPTLY).await.unwrap();
                    assert_eq!(response.status, 413);
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    sampling.cancel();
    sampler.await.unwrap();
    let grew = peak.load(std::sync::atomic::Ordering::Relaxed).saturating_sub(before);
    let discarded = 2 * PER_CONNECTION * BODY;
    println!("discarded {} MiB; resident memory grew by at most {} KiB", discarded >> 20, grew >> 10);
    assert!(grew < 16 * 1024 * 1024, "resident memory grew by {grew} bytes while discarding {discarded}");
}
