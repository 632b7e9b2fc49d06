//! HTTP/1.1 to an upstream over plain TCP, the gateway's own.
//!
//! Why not hyper-util's client here, as for https and HTTP/2: measured with
//! 5,000 concurrent streams (`bench`, scenario d), each HTTP/1.1 upstream
//! connection cost about 24 KiB over hyper (an 8 KiB read buffer and an 8 KiB
//! header write buffer per connection, a 9 KiB block of the channel between
//! the request and the connection's own task, that task), and every
//! response chunk crossed from the connection's task to the request's.
//! Here the request's task reads the socket itself, and a connection costs
//! its socket, and a read buffer only while there is something to read
//! (none while a stream waits for its next event). The request is written
//! whole (head and body in one vectored write); the answer's head is parsed
//! by `httparse`, as in hyper. An answer the upstream sends before it has
//! read the whole body is relayed, whether it then resets the connection or
//! only stops reading.
//!
//! What it does not do, because the gateway never needs it: request bodies
//! that stream, `Expect: 100-continue`, upgrades, pipelining, proxies, TLS
//! (https upstreams go through hyper-util and rustls).

mod chunked;
mod head;
mod names;
mod pool;

use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method};
use prometheus::IntCounter;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use chunked::{ChunkedDecoder, Decoded};
use head::{Framing, HeadError};

/// A response head larger than this is refused.
const MAX_HEAD: usize = 64 * 1024;
/// What a connection reads at a time at first: an event of a stream, or a
/// small answer whole.
const FIRST_READ: usize = 2 * 1024;
/// What it reads at a time at most, for large answers.
const MAX_READ: usize = 64 * 1024;

/// Where the upstream is, as configured.
#[derive(Debug, Clone)]
enum Address {
    Ip(SocketAddr),
    /// Resolved on each new connection, as the system resolver says.
    Name(String, u16),
}

pub struct Client {
    address: Address,
    connect_timeout: Duration,
    pool: Arc<pool::Pool>,
    opened: Option<IntCounter>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to the upstream: {0}")]
    Connect(#[source] io::Error),
    #[error("upstream connection failed: {0}")]
    Io(#[source] io::Error),
    #[error(transparent)]
    Head(#[from] HeadError),
}

impl SendError {
    /// No connection was made: the request never left.
    pub fn is_connect(&self) -> bool {
        matches!(self, Self::Connect(_))
    }
}

impl Client {
    /// `host` as a URI gives it (IPv6 in brackets).
    pub fn new(host: &str, port: u16, connect_timeout: Duration, max_idle: usize, idle_timeout: Duration) -> Self {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let address = match bare.parse::<IpAddr>() {
            Ok(ip) => Address::Ip(SocketAddr::new(ip, port)),
            Err(_) => Address::Name(bare.to_owned(), port),
        };
        Self { address, connect_timeout, pool: Arc::new(pool::Pool::new(max_idle, idle_timeout)), opened: None }
    }

    /// Counts each connection opened in `opened`.
    pub fn counting_connections(mut self, opened: IntCounter) -> Self {
        self.opened = Some(opened);
        self
    }

    /// Sends a request and reads its answer's head. `headers` include
    /// `Host`; the body's length is added here.
    pub async fn send(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<http::Response<Body>, SendError> {
        let head = head::encode_request(method, path_and_query, headers, body.len());
        let (mut connection, written) = match self.pool.take() {
            Some(stream) => {
                let mut reused = Connection::new(stream);
                match reused.write_request(&head, body).await {
                    Ok(()) => (reused, Ok(())),
                    // The upstream closed the idle connection just as it was
                    // taken: the request did not reach it whole, so it goes
                    // once more on a new connection.
                    Err(_) => self.connect_and_write(&head, body).await?,
                }
            }
            None => self.connect_and_write(&head, body).await?,
        };
        let cut_short = written.is_err();
        let mut head = match written {
            Ok(()) => connection.read_head(method).await?,
            // An upstream may answer before it has read the whole body (a
            // 413 from a proxy in front of a model server) and close the
            // connection unread, which resets it and fails the write. Its
            // answer is still there to read; without one, the write's
            // error stands.
            Err(error) => connection.read_head(method).await.map_err(|_| SendError::Io(error))?,
        };
        // A request cut short leaves the connection in no state to reuse.
        head.keep_alive &= !cut_short;
        let state = match head.framing {
            Framing::Empty => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
            Framing::UntilClose => BodyState::UntilClose,
        };
        let mut body =
            Body { connection: Some(connection), state, keep_alive: head.keep_alive, pool: self.pool.clone() };
        if matches!(body.state, BodyState::Done) {
            body.finish();
        }
        let mut response = http::Response::new(body);
        *response.status_mut() = head.status;
        *response.version_mut() = head.version;
        *response.headers_mut() = head.headers;
        Ok(response)
    }

    /// A new connection and how writing the request on it went.
    async fn connect_and_write(&self, head: &[u8], body: &Bytes) -> Result<(Connection, io::Result<()>), SendError> {
        let mut connection = Connection::new(self.connect().await.map_err(SendError::Connect)?);
        if let Some(opened) = &self.opened {
            opened.inc();
        }
        let written = connection.write_request(head, body).await;
        Ok((connection, written))
    }

    async fn connect(&self) -> io::Result<TcpStream> {
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "connecting to the upstream timed out");
        let stream = match &self.address {
            Address::Ip(address) => tokio::time::timeout(self.connect_timeout, TcpStream::connect(address))
                .await
                .map_err(|_| timed_out())??,
            Address::Name(host, port) => {
                let deadline = tokio::time::Instant::now() + self.connect_timeout;
                let addresses: Vec<SocketAddr> =
                    tokio::time::timeout_at(deadline, tokio::net::lookup_host((host.as_str(), *port)))
                        .await
                        .map_err(|_| timed_out())??
                        .collect();
                // Each address gets an equal share of what is left, as
                // hyper's connector gives them: one that never answers does
                // not use up the time of the others.
                let mut last = None;
                let mut connected = None;
                for (i, address) in addresses.iter().enumerate() {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    let share = left / u32::try_from(addresses.len() - i).unwrap_or(u32::MAX);
                    match tokio::time::timeout(share, TcpStream::connect(address)).await {
                        Ok(Ok(stream)) => {
                            connected = Some(stream);
                            break;
                        }
                        Ok(Err(e)) => last = Some(e),
                        Err(_) => last = Some(timed_out()),
                    }
                }
                match connected {
                    Some(stream) => stream,
                    None => {
                        return Err(last.unwrap_or_else(|| {
                            io::Error::new(io::ErrorKind::NotFound, "the upstream's host resolved to no address")
                        }));
                    }
                }
            }
        };
        stream.set_nodelay(true)?;
        socket2::SockRef::from(&stream)
            .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(Duration::from_secs(30)))?;
        Ok(stream)
    }

    /// Idle connections now.
    #[cfg(test)]
    pub fn idle_connections(&self) -> usize {
        self.pool.idle()
    }
}

/// A connection in use, with what has been read from it and not yet taken.
struct Connection {
    stream: TcpStream,
    buf: BytesMut,
    read_size: usize,
}

impl Connection {
    fn new(stream: TcpStream) -> Self {
        Self { stream, buf: BytesMut::new(), read_size: FIRST_READ }
    }

    /// Writes the request. While a large body waits for room to be sent,
    /// the connection is also watched for an answer: an upstream may answer
    /// before it has read the body (a 413) and then neither read on nor
    /// close. An answer (or the connection's end) stops the writing with an
    /// error, and what arrived stays in the buffer for `read_head`.
    async fn write_request(&mut self, head: &[u8], body: &[u8]) -> io::Result<()> {
        let mut parts = [IoSlice::new(head), IoSlice::new(body)];
        let mut left: &mut [IoSlice<'_>] = &mut parts;
        while left.iter().any(|part| !part.is_empty()) {
            // Nearly every request goes whole in this first write.
            let written = match self.stream.try_write_vectored(left) {
                Ok(written) => written,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::select! {
                        biased;
                        readable = self.stream.readable() => {
                            readable?;
                            self.buf.reserve(self.read_size);
                            return match self.stream.try_read_buf(&mut self.buf) {
                                Ok(0) => Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "the upstream closed the connection while the request was sent",
                                )),
                                Ok(_) => Err(io::Error::other("the upstream answered before the request was sent whole")),
                                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                                Err(e) => Err(e),
                            };
                        }
                        writable = self.stream.writable() => {
                            writable?;
                            continue;
                        }
                    }
                }
                Err(e) => return Err(e),
            };
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut left, written);
        }
        Ok(())
    }

    async fn read_head(&mut self, method: &Method) -> Result<head::ResponseHead, SendError> {
        loop {
            // Nothing to parse before the first read.
            if !self.buf.is_empty()
                && let Some(head) = head::parse_response(&mut self.buf, method)?
            {
                return Ok(head);
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(HeadError::Invalid(format!("the head is larger than {MAX_HEAD} bytes")).into());
            }
            if self.fill().await.map_err(SendError::Io)? == 0 {
                return Err(SendError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before answering",
                )));
            }
        }
    }

    /// Reads what the socket has into the buffer; 0 at its end. A read
    /// that fills all the room it had doubles the next one's, so large
    /// answers take few reads and a stream's small events keep a small
    /// buffer.
    ///
    /// With nothing left unparsed, it waits for the socket before taking
    /// room: a stream between events (most of its life) then holds no read
    /// buffer, where keeping the rest of the last one cost each open stream
    /// about 2 KiB (heaptrack, 5,000 streams). The events already read are
    /// slices of the old buffer and free it once written to the client. A
    /// new buffer per event costs one allocation; a stream's events are
    /// tens of milliseconds apart.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
            self.stream.readable().await?;
        }
        if self.buf.capacity() - self.buf.len() < self.read_size / 4 {
            self.buf.reserve(self.read_size);
        }
        let room = self.buf.capacity() - self.buf.len();
        let read = self.stream.read_buf(&mut self.buf).await?;
        if read == room && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Ok(read)
    }
}

enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
    Done,
}

/// An answer's body, read from its connection as it is asked for. Read to
/// its end, the connection goes back to the pool; dropped before, it is
/// closed (the upstream sees the request cancelled).
pub struct Body {
    connection: Option<Connection>,
    state: BodyState,
    keep_alive: bool,
    pool: Arc<pool::Pool>,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("plain::Body").field("done", &matches!(self.state, BodyState::Done)).finish_non_exhaustive()
    }
}

impl Body {
    /// The next piece of the body; `None` at its end.
    pub async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let Some(connection) = self.connection.as_mut() else { return Ok(None) };
            let buf = &mut connection.buf;
            match &mut self.state {
                BodyState::Done => return Ok(None),
                BodyState::Length(left) => {
                    if !buf.is_empty() {
                        let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                        let chunk = buf.split_to(n).freeze();
                        *left -= n as u64;
                        if *left == 0 {
                            self.finish();
                        }
                        return Ok(Some(chunk));
                    }
                }
                BodyState::UntilClose => {
                    if !buf.is_empty() {
                        return Ok(Some(buf.split().freeze()));
                    }
                }
                BodyState::Chunked(decoder) => {
                    match decoder.decode(buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
                        Decoded::Data(chunk) => return Ok(Some(chunk)),
                        Decoded::End => {
                            self.finish();
                            return Ok(None);
                        }
                        Decoded::NeedMore => {}
                    }
                }
            }
            if connection.fill().await? == 0 {
                if matches!(self.state, BodyState::UntilClose) {
                    self.state = BodyState::Done;
                    self.connection = None;
                    return Ok(None);
                }
                self.connection = None;
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the upstream closed the connection before the body's end",
                ));
            }
        }
    }

    /// The body is read whole: its connection is kept for the next request
    /// when it may be and nothing unasked followed the body.
    fn finish(&mut self) {
        self.state = BodyState::Done;
        if let Some(connection) = self.connection.take()
            && self.keep_alive
            && connection.buf.is_empty()
        {
            self.pool.put(connection.stream);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::pool::tests::wait_until;
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncBufReadExt;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// What the scripted upstream does with a request.
    enum Answer {
        Send(&'static [u8]),
        SendAndClose(&'static [u8]),
    }

    /// A scripted upstream over real TCP: each connection's requests are
    /// read (head and `content-length` body) and answered by `answer`,
    /// given the request's number on its connection.
    struct Scripted {
        address: SocketAddr,
        accepted: Arc<AtomicUsize>,
        closed: Arc<tokio::sync::Notify>,
    }

    impl Scripted {
        async fn start(answer: fn(usize) -> Answer) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let accepted = Arc::new(AtomicUsize::new(0));
            let closed = Arc::new(tokio::sync::Notify::new());
            let (count, notify) = (accepted.clone(), closed.clone());
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    count.fetch_add(1, Ordering::SeqCst);
                    let notify = notify.clone();
                    tokio::spawn(async move {
                        let (read, mut write) = stream.into_split();
                        let mut read = tokio::io::BufReader::new(read);
                        for nth in 0.. {
                            let mut length = 0;
                            loop {
                                let mut line = String::new();
                                if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                                    notify.notify_one();
                                    return;
                                }
                                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                                    length = value.trim().parse().unwrap();
                                }
                                if line == "\r\n" {
                                    break;
                                }
                            }
                            let mut body = vec![0; length];
                            read.read_exact(&mut body).await.unwrap();
                            let (bytes, close) = match answer(nth) {
                                Answer::Send(bytes) => (bytes, false),
                                Answer::SendAndClose(bytes) => (bytes, true),
                            };
                            if write.write_all(bytes).await.is_err() || close {
                                return;
                            }
                        }
                    });
                }
            });
            Self { address, accepted, closed }
        }

        fn client(&self) -> Client {
            let ip = self.address.ip().to_string();
            Client::new(&ip, self.address.port(), Duration::from_secs(5), 8, Duration::from_secs(60))
        }

        fn connections(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    /// An upstream that reads a request's head only and answers `answer`;
    /// then it closes with the body unread (the kernel resets the
    /// connection) or, with `hold`, keeps the connection open, reading
    /// nothing more, until told, and hands it back.
    async fn answering_before_the_body(
        answer: &'static [u8],
        hold: Option<tokio::sync::oneshot::Receiver<()>>,
    ) -> (Client, tokio::task::JoinHandle<Option<TcpStream>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut byte = [0; 1];
            while !head.ends_with(b"\r\n\r\n") {
                stream.read_exact(&mut byte).await.unwrap();
                head.push(byte[0]);
            }
            stream.write_all(answer).await.unwrap();
            match hold {
                Some(hold) => {
                    let _ = hold.await;
                    Some(stream)
                }
                None => None,
            }
        });
        let client = Client::new("127.0.0.1", address.port(), Duration::from_secs(5), 8, Duration::from_secs(60));
        (client, upstream)
    }

    /// A 64 MiB request: far more than the socket buffers hold, so its
    /// write is still going when the upstream answers.
    async fn send_large(client: &Client) -> Result<http::Response<Body>, SendError> {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, http::HeaderValue::from_static("upstream"));
        let body = Bytes::from(vec![b'x'; 64 << 20]);
        client.send(&Method::POST, "/v1/chat/completions", &headers, &body).await
    }

    #[tokio::test]
    async fn an_answer_sent_before_the_body_was_read_is_relayed_though_the_upstream_reset_the_connection() {
        const TOO_LARGE: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\n\
            content-length: 21\r\nconnection: close\r\n\r\n{\"error\":\"too large\"}";
        let (client, upstream) = answering_before_the_body(TOO_LARGE, None).await;
        let response = send_large(&client).await.expect("the upstream's answer, not the failed write");
        assert_eq!(response.status(), 413);
        let mut body = response.into_body();
        assert_eq!(read_all(&mut body).await.unwrap(), b"{\"error\":\"too large\"}");
        upstream.await.unwrap();
        assert_eq!(client.pool.idle(), 0, "a connection whose request was cut short is not kept");
    }

    #[tokio::test]
    async fn an_early_answer_is_relayed_though_the_upstream_neither_reads_on_nor_closes() {
        const TOO_LARGE: &[u8] = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large";
        let (done, hold) = tokio::sync::oneshot::channel::<()>();
        let (client, upstream) = answering_before_the_body(TOO_LARGE, Some(hold)).await;
        let response = tokio::time::timeout(Duration::from_secs(10), send_large(&client))
            .await
            .expect("the answer, without waiting for the body to be read")
            .expect("the upstream's answer");
        assert_eq!(response.status(), 413);
        let mut body = response.into_body();
        assert_eq!(read_all(&mut body).await.unwrap(), b"too large");
        assert_eq!(client.pool.idle(), 0, "a connection whose request was cut short is not kept");
        done.send(()).unwrap();
        upstream.await.unwrap();
    }

    async fn post(client: &Client) -> Result<http::Response<Body>, SendError> {
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, http::HeaderValue::from_static("upstream"));
        client.send(&Method::POST, "/v1/chat/completions", &headers, &Bytes::from_static(b"{\"model\":\"m\"}")).await
    }

    async fn read_all(body: &mut Body) -> io::Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(chunk) = body.next_chunk().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }

    const JSON: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n{\"n\":1}";
    const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
    const CUT: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this";

    #[tokio::test]
    async fn answers_read_to_their_end_leave_their_connection_for_the_next_request() {
        let upstream = Scripted::start(|nth| Answer::Send(if nth % 2 == 0 { JSON } else { CHUNKED })).await;
        let client = upstream.client();
        for expected in ["{\"n\":1}", "abcde", "{\"n\":1}", "abcde"] {
            let mut response = post(&client).await.unwrap();
            assert_eq!(response.status(), http::StatusCode::OK);
            assert_eq!(read_all(response.body_mut()).await.unwrap(), expected.as_bytes());
            assert_eq!(client.idle_connections(), 1);
        }
        assert_eq!(upstream.connections(), 1, "one connection carried all four");
    }

    #[tokio::test]
    async fn a_body_left_before_its_end_closes_its_connection() {
        let upstream =
            Scripted::start(|_| Answer::Send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"))
                .await;
        let client = upstream.client();
        let closed = upstream.closed.notified();
        let mut response = post(&client).await.unwrap();
        assert_eq!(response.body_mut().next_chunk().await.unwrap().as_deref(), Some(&b"abc"[..]));
        // The upstream is still sending: the body waits for it.
        assert!(tokio::time::timeout(Duration::from_millis(50), response.body_mut().next_chunk()).await.is_err());
        drop(response);
        tokio::time::timeout(Duration::from_secs(10), closed).await.expect("the upstream sees the connection close");
        assert_eq!(client.idle_connections(), 0);
    }

    #[tokio::test]
    async fn a_stream_waiting_for_its_next_event_holds_no_read_buffer() {
        const FIRST: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
            transfer-encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n";
        const REST: &[u8] = b"9\r\ndata: 2\n\n\r\n0\r\n\r\n";
        let (next, told) = tokio::sync::oneshot::channel::<()>();
        let (client, upstream) = answering_before_the_body(FIRST, Some(told)).await;
        let upstream = tokio::spawn(async move {
            let mut stream = upstream.await.unwrap().expect("held open");
            stream.write_all(REST).await.unwrap();
        });
        let mut response = post(&client).await.unwrap();
        let body = response.body_mut();
        assert_eq!(body.next_chunk().await.unwrap().as_deref(), Some(&b"data: 1\n\n"[..]));
        // Polled once with nothing more sent: it waits on the socket.
        assert!(futures_util::FutureExt::now_or_never(body.next_chunk()).is_none());
        let waiting = body.connection.as_ref().expect("the stream is not over");
        assert_eq!(waiting.buf.capacity(), 0, "no buffer is held between events");
        next.send(()).unwrap();
        assert_eq!(read_all(body).await.unwrap(), b"data: 2\n\n");
        upstream.await.unwrap();
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_one_without_length_ends_with_its_connection() {
        let cut = Scripted::start(|_| Answer::SendAndClose(CUT)).await;
        let mut response = post(&cut.client()).await.unwrap();
        assert_eq!(response.body_mut().next_chunk().await.unwrap().as_deref(), Some(&b"only this"[..]));
        let error = response.body_mut().next_chunk().await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);

        let until_close = Scripted::start(|_| Answer::SendAndClose(b"HTTP/1.1 200 OK\r\n\r\nall of it")).await;
        let client = until_close.client();
        let mut response = post(&client).await.unwrap();
        assert_eq!(read_all(response.body_mut()).await.unwrap(), b"all of it");
        assert_eq!(client.idle_connections(), 0, "its end was the connection's");

        let bad_chunks =
            Scripted::start(|_| Answer::Send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nxyz\r\n")).await;
        let mut response = post(&bad_chunks.client()).await.unwrap();
        assert_eq!(response.body_mut().next_chunk().await.unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
        let upstream = Scripted::start(|_| Answer::SendAndClose(JSON)).await;
        let client = upstream.client();
        let mut response = post(&client).await.unwrap();
        assert_eq!(read_all(response.body_mut()).await.unwrap(), b"{\"n\":1}");
        assert_eq!(client.idle_connections(), 1, "kept: the answer did not say it would close");
        // Its close is seen (by the sweep, or when next taken) and the next
        // request goes on a new connection.
        wait_until(|| client.idle_connections() == 0).await;
        let mut response = post(&client).await.unwrap();
        assert_eq!(read_all(response.body_mut()).await.unwrap(), b"{\"n\":1}");
        assert_eq!(upstream.connections(), 2);
    }

    #[tokio::test]
    async fn heads_that_are_garbage_endless_or_missing_are_errors() {
        let garbage = Scripted::start(|_| Answer::Send(b"<html>502 Bad Gateway</html>\r\n\r\n")).await;
        assert!(matches!(post(&garbage.client()).await, Err(SendError::Head(_))));
        static ENDLESS: std::sync::LazyLock<&'static [u8]> = std::sync::LazyLock::new(|| {
            let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
            while head.len() <= MAX_HEAD {
                head.extend_from_slice(b"x-padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
            }
            head.leak()
        });
        let endless = Scripted::start(|_| Answer::Send(&ENDLESS)).await;
        assert!(matches!(post(&endless.client()).await, Err(SendError::Head(_))));
        let silent = Scripted::start(|_| Answer::SendAndClose(b"")).await;
        let error = post(&silent.client()).await.unwrap_err();
        assert!(matches!(&error, SendError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof), "{error}");
        assert!(!error.is_connect(), "the request was sent");
    }

    #[tokio::test]
    async fn a_host_name_is_resolved_and_its_addresses_tried_in_turn() {
        let upstream = Scripted::start(|_| Answer::Send(JSON)).await;
        // `localhost` may resolve to ::1 first, where nothing listens: the
        // next address is tried.
        let client =
            Client::new("localhost", upstream.address.port(), Duration::from_secs(5), 8, Duration::from_secs(60));
        assert!(matches!(client.address, Address::Name(ref host, _) if host == "localhost"));
        let mut response = post(&client).await.unwrap();
        assert_eq!(read_all(response.body_mut()).await.unwrap(), b"{\"n\":1}");

        let v6 = Client::new("[::1]", 8080, Duration::from_secs(5), 8, Duration::from_secs(60));
        assert!(matches!(v6.address, Address::Ip(address) if address == "[::1]:8080".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_connection_refused_never_sent_the_request() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let client = Client::new("127.0.0.1", address.port(), Duration::from_secs(5), 8, Duration::from_secs(60));
        let error = post(&client).await.unwrap_err();
        assert!(error.is_connect(), "{error}");
    }
}
