//! Slow and silent clients: hundreds of connections that trickle a head, send
//! nothing, or stall or crawl through a body are each closed within their
//! bound, while normal requests keep being answered at once.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tollgate_gateway::Config;

use crate::HEAVY;
use crate::helpers::TestGateway;
use crate::raw::{self, CHAT, Closed};

const HEADER_READ: Duration = Duration::from_secs(3);
const KEEP_ALIVE: Duration = Duration::from_secs(3);
const BODY_IDLE: Duration = Duration::from_secs(3);
const BODY_TOTAL: Duration = Duration::from_secs(5);
/// Room for a loaded machine between a bound and the close being observed.
const SLACK: Duration = Duration::from_secs(3);

fn short_bounds(c: &mut Config) {
    c.server.header_read_timeout = HEADER_READ;
    c.server.keep_alive_timeout = KEEP_ALIVE;
    c.server.body_idle_timeout = BODY_IDLE;
    c.server.body_read_timeout = BODY_TOTAL;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    /// Connects and sends nothing.
    Silent,
    /// Sends a head one byte at a time, never finishing it.
    TricklingHead,
    /// Sends a head and part of the body, then nothing.
    StalledBody,
    /// Sends a body a byte at a time, never going quiet for long.
    CrawlingBody,
}

impl Kind {
    /// When the gateway must have closed the connection by.
    fn bound(self) -> Duration {
        match self {
            Self::Silent => KEEP_ALIVE,
            Self::TricklingHead => HEADER_READ,
            Self::StalledBody => BODY_IDLE,
            Self::CrawlingBody => BODY_TOTAL,
        }
    }

    /// Whether the gateway answers before closing (a body it was reading).
    fn answers_408(self) -> bool {
        matches!(self, Self::StalledBody | Self::CrawlingBody)
    }
}

/// Holds one slow connection until the gateway ends it; returns how long
/// that took and, for bodies, the answer.
async fn slow_client(
    gw_addr: std::net::SocketAddr,
    key: String,
    kind: Kind,
) -> (Kind, Closed, Option<raw::RawResponse>) {
    // From before connecting: every timer of the gateway starts later, so
    // a close sooner than the bound is a close for some other reason (with
    // hundreds of clients starting at once, this task may resume well after
    // the gateway accepted its connection).
    let since = Instant::now();
    let mut stream = raw::connect(gw_addr).await;
    let limit = kind.bound() + SLACK * 2;
    match kind {
        Kind::Silent => {}
        Kind::TricklingHead => {
            let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\nx-slow: ";
            stream.write_all(head.as_bytes()).await.unwrap();
            let trickle = async {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    if stream.write_all(b"a").await.is_err() {
                        break;
                    }
                }
            };
            // The trickle stops when the gateway closes; bounded all the same.
            let _ = tokio::time::timeout(limit, trickle).await;
            return (kind, Closed::After(since.elapsed()).bounded(limit), None);
        }
        Kind::StalledBody => {
            stream.write_all(raw::chat_head(Some(&key), 1000, "").as_bytes()).await.unwrap();
            stream.write_all(&CHAT.as_bytes()[..10]).await.unwrap();
        }
        Kind::CrawlingBody => {
            stream.write_all(raw::chat_head(Some(&key), 1000, "").as_bytes()).await.unwrap();
            let (mut reader, mut writer) = stream.into_split();
            let crawl = async {
                for _ in 0..1000 {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if writer.write_all(b" ").await.is_err() {
                        break;
                    }
                }
            };
            let read = async {
                let mut stream_half = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut stream_half).await;
                stream_half
            };
            let answered = tokio::select! {
                answered = tokio::time::timeout(limit, read) => answered.ok(),
                () = crawl => None,
            };
            let closed = Closed::After(since.elapsed()).bounded(limit);
            let response = answered.map(|bytes| parse(&bytes));
            return (kind, closed, response);
        }
    }
    let response = if kind.answers_408() { raw::read_response(&mut stream, limit).await.ok() } else { None };
    let closed = raw::wait_closed(&mut stream, since, limit).await;
    (kind, closed, response)
}

fn parse(bytes: &[u8]) -> raw::RawResponse {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    raw::RawResponse { status, head: head.to_owned(), body: body.to_owned() }
}

impl Closed {
    fn bounded(self, limit: Duration) -> Self {
        match self {
            Self::After(d) if d < limit => self,
            _ => Self::StillOpen,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_traffic_flows_while_hundreds_of_slow_connections_are_held_and_each_is_closed_in_its_bound() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start_with(short_bounds).await;
    const PER_KIND: usize = 100;

    let started = Instant::now();
    let mut slow = JoinSet::new();
    for kind in [Kind::Silent, Kind::TricklingHead, Kind::StalledBody, Kind::CrawlingBody] {
        for _ in 0..PER_KIND {
            slow.spawn(slow_client(gw.addr, gw.key.clone(), kind));
        }
    }

    // Normal traffic, on fresh connections each time, while they are held.
    let mut latencies = Vec::new();
    for _ in 0..30 {
        let client = crate::helpers::client_with_key(&gw.key);
        let at = Instant::now();
        let response = client
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(CHAT)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
        latencies.push(at.elapsed());
    }
    let normal_done = started.elapsed();
    assert!(
        normal_done < KEEP_ALIVE.min(HEADER_READ).min(BODY_IDLE),
        "the normal requests ran while the slow connections were held ({normal_done:?})"
    );
    let slowest = latencies.iter().max().unwrap();
    assert!(*slowest < Duration::from_secs(2), "normal requests were held up: slowest {slowest:?}");

    let mut closed_by_kind: std::collections::HashMap<Kind, Vec<Duration>> = Default::default();
    while let Some(result) = slow.join_next().await {
        let (kind, closed, response) = result.unwrap();
        let Closed::After(after) = closed else {
            panic!("a {kind:?} connection was still open past its bound {:?} + slack", kind.bound());
        };
        // Closed by its own bound, not earlier by something else.
        assert!(
            after + Duration::from_millis(250) >= kind.bound(),
            "{kind:?} closed after only {after:?}: {response:?}"
        );
        assert!(after <= kind.bound() + SLACK, "{kind:?} closed after {after:?}, bound {:?}", kind.bound());
        if kind.answers_408() {
            let response = response.unwrap_or_else(|| panic!("{kind:?}: no answer before the close"));
            assert_eq!(response.status, 408, "{kind:?}: {response:?}");
            assert!(response.body.contains("request_timeout"), "{kind:?}: {response:?}");
        }
        closed_by_kind.entry(kind).or_default().push(after);
    }
    for (kind, times) in &closed_by_kind {
        assert_eq!(times.len(), PER_KIND);
        println!(
            "{kind:?}: {} closed between {:?} and {:?} (bound {:?})",
            times.len(),
            times.iter().min().unwrap(),
            times.iter().max().unwrap(),
            kind.bound()
        );
    }
    println!("normal requests: 30 in {normal_done:?}, slowest {slowest:?}");
    assert!(gw.fake.requests().len() == 30, "only the normal requests reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_cap_new_connections_wait_for_a_free_slot_instead_of_failing() {
    let _heavy = HEAVY.lock().await;
    const CAP: usize = 20;
    let gw = TestGateway::start_with(|c| {
        short_bounds(c);
        c.server.max_connections = CAP;
    })
    .await;
    // The set-up used only the admin listener: these fill the public one.
    let since = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..CAP {
        silent.push(raw::connect(gw.addr).await);
    }
    let response = gw.post_json("/v1/chat/completions", CHAT).await;
    let waited = since.elapsed();
    assert_eq!(response.status(), 200, "the waiting connection was served once a slot freed");
    // It could only be served once the silent connections were closed as idle.
    assert!(waited + Duration::from_millis(500) >= KEEP_ALIVE, "served after {waited:?}, before any slot was free");
    assert!(waited <= KEEP_ALIVE + SLACK, "served after {waited:?}");
    println!("a connection over the cap of {CAP} was served after {waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_admin_body_is_a_408_too() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start_with(short_bounds).await;
    let since = Instant::now();
    let mut stream = raw::connect(gw.admin_addr).await;
    let head = format!(
        "POST /admin/v1/tenants HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"id\":",
        crate::helpers::ADMIN_TOKEN
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let response = raw::read_response(&mut stream, BODY_IDLE + SLACK).await.unwrap();
    assert_eq!(response.status, 408, "{response:?}");
    assert!(response.body.contains("request_timeout"), "{response:?}");
    assert!(since.elapsed() + Duration::from_millis(250) >= BODY_IDLE);
    assert!(matches!(raw::wait_closed(&mut stream, since, SLACK).await, Closed::After(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_is_still_served_and_idle_h2_connections_are_closed() {
    let _heavy = HEAVY.lock().await;
    let gw = TestGateway::start_with(short_bounds).await;
    let client = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().unwrap();
    let response = client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();

    // Over the limit on HTTP/2: the stream is reset after the answer, which
    // stays readable; nothing to discard.
    let response = client
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(&gw.key)
        .header("content-type", "application/json")
        .body(vec![b' '; 33 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);

    // An HTTP/2 connection that only sent its preface is closed as idle; it
    // never acknowledges the GOAWAY, so it is dropped after another quiet
    // period at the latest.
    let since = Instant::now();
    let mut stream = raw::connect(gw.addr).await;
    stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
    let Closed::After(after) = raw::wait_closed(&mut stream, since, KEEP_ALIVE * 2 + SLACK).await else {
        panic!("an idle HTTP/2 connection was kept open");
    };
    assert!(after + Duration::from_millis(250) >= KEEP_ALIVE, "closed after {after:?}");
    println!("an idle HTTP/2 connection that ignored GOAWAY was closed after {after:?}");
}
