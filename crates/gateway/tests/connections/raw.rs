//! A raw HTTP/1.1 client over TCP, for clients no library would be: ones that
//! send half a head, stop mid-body, or keep sending after the answer.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

pub const CHAT: &str = r#"{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"hi"}]}"#;

pub async fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).await.expect("connects");
    stream.set_nodelay(true).unwrap();
    stream
}

/// A `POST /v1/chat/completions` head declaring `length` body bytes.
pub fn chat_head(key: Option<&str>, length: usize, extra: &str) -> String {
    let auth = key.map(|k| format!("authorization: Bearer {k}\r\n")).unwrap_or_default();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n{auth}{extra}content-length: {length}\r\n\r\n"
    )
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Reads one response (a `content-length` body) within `limit`. Interim
/// `1xx` answers are returned as responses of their own.
pub async fn read_response(stream: &mut TcpStream, limit: Duration) -> std::io::Result<RawResponse> {
    tokio::time::timeout(limit, read_response_inner(stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response in time"))?
}

async fn read_response_inner(stream: &mut TcpStream) -> std::io::Result<RawResponse> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut byte = [0u8; 1];
        // Byte by byte: nothing past this response's head is consumed.
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before a response"));
        }
        buf.push(byte[0]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await?;
    Ok(RawResponse { status, head, body: String::from_utf8_lossy(&body).into_owned() })
}

/// How the server ended a connection the client keeps open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// End of stream or a reset, after this long.
    After(Duration),
    /// Still open when the test stopped waiting.
    StillOpen,
}

/// Waits up to `limit` for the server to close `stream`, discarding what it
/// sends meanwhile; measured from `since`.
pub async fn wait_closed(stream: &mut TcpStream, since: Instant, limit: Duration) -> Closed {
    let mut sink = [0u8; 4096];
    let read_until_closed = async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return since.elapsed(),
                Ok(_) => {}
            }
        }
    };
    match tokio::time::timeout(limit, read_until_closed).await {
        Ok(elapsed) => Closed::After(elapsed),
        Err(_) => Closed::StillOpen,
    }
}

/// Writes `total` bytes of filler from one small buffer (the test must not
/// hold what it sends), returning how many were written before an error.
pub async fn write_filler(stream: &mut TcpStream, total: usize) -> Result<(), (usize, std::io::Error)> {
    let chunk = vec![b' '; 64 * 1024];
    let mut written = 0;
    while written < total {
        let n = chunk.len().min(total - written);
        if let Err(e) = stream.write_all(&chunk[..n]).await {
            return Err((written, e));
        }
        written += n;
    }
    Ok(())
}

/// The process's resident memory, in bytes (the gateway runs in this process).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}
