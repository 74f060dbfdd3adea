//! HTTP/1.1 to an upstream, by hand: a keep-alive pool per upstream, the
//! request written in one buffer, the answer's head parsed by httparse, and
//! its body framed by `Content-Length`, the chunked coding or the end of the
//! connection.
//!
//! Why not hyper-util's client: at 1,000 calls/s a bare proxy on it used
//! 20 µs more CPU a call than the same proxy writing and reading HTTP/1.1
//! itself, and its p99 was 70 µs later (docs/benchmarks.md, ninth session).
//! Its pool runs a task per connection and hands each answer across
//! channels; here the call's own task does the reading.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

pub use crate::gateway::http1::put_header;
use crate::gateway::http1::{
    content_length, decode, has_token, last_coding_is_chunked, Decoded, Framing,
};

/// The most an answer's head (status line and headers) may take.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most headers an answer may have (hyper's default is 100).
const MAX_HEADERS: usize = 128;
/// How much room each read asks for.
const READ_BYTES: usize = 16 * 1024;
/// A body up to this size goes out in the same write as the head.
const INLINE_BODY_BYTES: usize = 64 * 1024;
/// Idle connections kept per upstream; more are closed.
const MAX_IDLE: usize = 1024;
/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The limit on connecting, the TLS handshake included.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection's byte stream: plain TCP or TLS over it.
enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One connection to an upstream.
struct Conn {
    io: Io,
    /// Bytes read and not yet used: the rest of a head, or body bytes that
    /// came with it.
    buf: BytesMut,
    /// When it went back to the pool; an old one is not reused.
    idle_since: Instant,
}

impl Conn {
    /// Read more into `buf`; `Ok(0)` at the connection's end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.buf.reserve(READ_BYTES);
        // `read_buf` is cancel-safe: a read that is not ready loses nothing.
        pin!(self.io.read_buf(&mut self.buf)).poll(cx)
    }

    async fn fill(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx)).await
    }
}

/// Where an upstream is, how to reach it, and its idle connections.
pub struct Origin {
    /// The host to connect to (an IPv6 address without its brackets).
    host: String,
    port: u16,
    /// The `Host` header: the URL's authority as written.
    authority: String,
    /// The URL's path without its trailing `/`; each call's path follows it.
    prefix: String,
    /// For an `https` URL: the connector and the name the certificate must match.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    /// Idle keep-alive connections, the most recently used last.
    idle: Mutex<Vec<Conn>>,
}

impl Origin {
    /// The origin of a base URL (`http` or `https`, no user, no query);
    /// `None` when it is not one.
    pub fn new(base_url: &str, tls: &tokio_rustls::TlsConnector) -> Option<Origin> {
        let uri: Uri = base_url.parse().ok()?;
        let https = match uri.scheme_str()? {
            "http" => false,
            "https" => true,
            _ => return None,
        };
        let authority = uri.authority()?;
        if authority.as_str().contains('@') || uri.query().is_some() {
            return None;
        }
        let host = authority.host();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let tls = if https {
            let name = rustls::pki_types::ServerName::try_from(bare.to_owned()).ok()?;
            Some((tls.clone(), name))
        } else {
            None
        };
        Some(Origin {
            host: bare.to_owned(),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
            prefix: uri.path().trim_end_matches('/').to_owned(),
            tls,
            idle: Mutex::new(Vec::new()),
        })
    }

    /// A request head's first lines: `METHOD prefix+path HTTP/1.1` and
    /// `host`. Add headers with [`put_header`], end it with [`end_head`].
    pub fn start_head(&self, method: &str, path_and_query: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        out.extend_from_slice(method.as_bytes());
        out.push(b' ');
        out.extend_from_slice(self.prefix.as_bytes());
        out.extend_from_slice(path_and_query.as_bytes());
        if self.prefix.is_empty() && !path_and_query.starts_with('/') {
            // A request target is never empty: at least `/`.
            out.insert(method.len() + 1, b'/');
        }
        out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
        out.extend_from_slice(self.authority.as_bytes());
        out.extend_from_slice(b"\r\n");
        out
    }

    /// The most recently used idle connection that is still open.
    fn take_idle(&self) -> Option<Conn> {
        loop {
            let mut conn = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()?;
            if conn.idle_since.elapsed() > IDLE_TIMEOUT {
                // The rest went idle earlier still.
                self.idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clear();
                return None;
            }
            // An open, quiet connection has nothing to read; one the
            // upstream closed reads its end at once.
            if conn.fill().now_or_never().is_none() {
                return Some(conn);
            }
        }
    }

    fn put_idle(&self, mut conn: Conn) {
        let now = Instant::now();
        conn.idle_since = now;
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        // Oldest first: drop those too old to be reused.
        let stale = idle
            .iter()
            .take_while(|c| now.duration_since(c.idle_since) > IDLE_TIMEOUT)
            .count();
        idle.drain(..stale);
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    async fn connect(&self) -> io::Result<Conn> {
        let connect = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
            tcp.set_nodelay(true)?;
            let io = match &self.tls {
                None => Io::Plain(tcp),
                Some((connector, name)) => {
                    Io::Tls(Box::new(connector.connect(name.clone(), tcp).await?))
                }
            };
            Ok(Conn {
                io,
                buf: BytesMut::new(),
                idle_since: Instant::now(),
            })
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "connecting took longer than 10 s",
                ))
            })
    }

    /// Send a request (`head` from [`Origin::start_head`] and [`end_head`])
    /// and read the answer's head. A reused connection that turns out to
    /// have been closed before any byte of the answer came is replaced by a
    /// new one, once: the upstream closed it while idle, so it never saw
    /// the request.
    pub async fn call(
        self: &Arc<Self>,
        head: Vec<u8>,
        body: Bytes,
        head_request: bool,
    ) -> io::Result<Answer> {
        let mut message = head;
        let separate = if body.len() <= INLINE_BODY_BYTES {
            message.extend_from_slice(&body);
            None
        } else {
            Some(body)
        };
        let mut retried = false;
        loop {
            let (mut conn, reused) = match self.take_idle() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            match exchange(&mut conn, &message, separate.as_ref(), head_request).await {
                Ok((status, headers, framing, keep_alive)) => {
                    return Ok(Answer {
                        status,
                        headers,
                        body: Body {
                            conn: Some(conn),
                            framing,
                            keep_alive,
                            origin: Arc::clone(self),
                        },
                    })
                }
                Err(Failure::Unanswered(_)) if reused && !retried => retried = true,
                Err(Failure::Unanswered(e) | Failure::Other(e)) => return Err(e),
            }
        }
    }
}

/// End a request head: its `content-length` when it has a body or its
/// method expects one, then the empty line.
pub fn end_head(out: &mut Vec<u8>, body_len: usize, method_has_body: bool) {
    if body_len > 0 || method_has_body {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// How an exchange failed.
enum Failure {
    /// The connection ended or was reset before any byte of the answer.
    Unanswered(io::Error),
    Other(io::Error),
}

fn invalid(message: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Write the request, read the answer's head (skipping `1xx` interim
/// answers), and tell how its body is framed and whether the connection may
/// be reused after it.
async fn exchange(
    conn: &mut Conn,
    message: &[u8],
    separate: Option<&Bytes>,
    head_request: bool,
) -> Result<(StatusCode, HeaderMap, Framing, bool), Failure> {
    let unanswered = |e: io::Error| match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::UnexpectedEof => Failure::Unanswered(e),
        _ => Failure::Other(e),
    };
    conn.io.write_all(message).await.map_err(unanswered)?;
    if let Some(body) = separate {
        conn.io.write_all(body).await.map_err(unanswered)?;
    }
    conn.io.flush().await.map_err(unanswered)?;
    let mut answered = false;
    loop {
        if !conn.buf.is_empty() {
            answered = true;
            if let Some(parsed) = parse_head(&mut conn.buf, head_request)? {
                match parsed {
                    Some(head) => return Ok(head),
                    None => continue, // an interim answer
                }
            }
            if conn.buf.len() > MAX_HEAD_BYTES {
                return Err(Failure::Other(invalid("the answer's head is too large")));
            }
        }
        let read = conn.fill().await;
        match read {
            Ok(0) if !answered => {
                return Err(Failure::Unanswered(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed before an answer",
                )))
            }
            Ok(0) => {
                return Err(Failure::Other(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed in the answer's head",
                )))
            }
            Ok(_) => {}
            Err(e) if !answered => return Err(unanswered(e)),
            Err(e) => return Err(Failure::Other(e)),
        }
    }
}

/// A whole head at the start of `buf`, taken out of it: unless it is an
/// interim (`1xx`) answer, its status, headers, framing and reusability.
/// `None` while it is incomplete (`buf` is left as it is).
#[allow(clippy::type_complexity)]
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<Option<(StatusCode, HeaderMap, Framing, bool)>>, Failure> {
    // Where each header's name and value lie in the head: the values become
    // slices of the head's bytes, not copies (one allocation a header less).
    // A head is at most 64 KiB, so `u16` holds every offset, and the table
    // is 1 KiB to clear rather than 4.
    let mut spans = [[0u16; 4]; MAX_HEADERS];
    let (len, code, version, count) = {
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut slots);
        let len = match parsed.parse(buf) {
            Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_BYTES => len,
            Ok(httparse::Status::Complete(_)) => {
                return Err(Failure::Other(invalid("the answer's head is too large")))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Failure::Other(invalid("the answer has too many headers")))
            }
            Err(_) => return Err(Failure::Other(invalid("the answer's head is malformed"))),
        };
        let base = buf.as_ptr() as usize;
        let short = |n: usize| {
            u16::try_from(n).map_err(|_| Failure::Other(invalid("the answer's head is too large")))
        };
        for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
            let (name, value) = (h.name.as_bytes(), h.value);
            *span = [
                short(name.as_ptr() as usize - base)?,
                short(name.len())?,
                short(value.as_ptr() as usize - base)?,
                short(value.len())?,
            ];
        }
        (
            len,
            parsed.code.unwrap_or(0),
            parsed.version,
            parsed.headers.len(),
        )
    };
    if (100..200).contains(&code) {
        if code == 101 {
            return Err(Failure::Other(invalid(
                "the upstream switched protocols, which a proxied call cannot",
            )));
        }
        buf.advance(len);
        return Ok(Some(None));
    }
    let status =
        StatusCode::from_u16(code).map_err(|_| Failure::Other(invalid("bad status code")))?;
    let head = buf.split_to(len).freeze();
    let mut keep_alive = version == Some(1);
    let mut chunked = false;
    let mut other_coding = false;
    let mut length: Option<u64> = None;
    let mut headers = HeaderMap::with_capacity(count + 4);
    for span in &spans[..count] {
        let [name_at, name_len, value_at, value_len] = span.map(usize::from);
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])
            .map_err(|_| Failure::Other(invalid("bad header name")))?;
        let raw = head.slice(value_at..value_at + value_len);
        let value = HeaderValue::from_maybe_shared(raw.clone())
            .map_err(|_| Failure::Other(invalid("bad header value")))?;
        if name == axum::http::header::CONTENT_LENGTH {
            let n = content_length(&raw)
                .ok_or_else(|| Failure::Other(invalid("bad content-length")))?;
            if length.is_some_and(|l| l != n) {
                return Err(Failure::Other(invalid("conflicting content-length")));
            }
            length = Some(n);
        } else if name == axum::http::header::TRANSFER_ENCODING {
            chunked = last_coding_is_chunked(&raw);
            other_coding = !chunked;
        } else if name == axum::http::header::CONNECTION && has_token(&raw, b"close") {
            keep_alive = false;
        }
        headers.append(name, value);
    }
    let framing = if head_request || matches!(code, 204 | 304) {
        Framing::Length(0)
    } else if chunked {
        Framing::ChunkSize
    } else if other_coding {
        Framing::Eof
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        Framing::Eof
    };
    if matches!(framing, Framing::Eof) {
        keep_alive = false;
    }
    Ok(Some(Some((status, headers, framing, keep_alive))))
}

/// An answer's status, headers and body.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Body,
}

/// An answer's body. Read to its end, its connection goes back to the
/// pool; dropped before, the connection is closed (which is how a call the
/// client gave up on is cancelled upstream).
pub struct Body {
    /// `None` once the body is read (the connection is back in the pool or
    /// closed) or failed.
    conn: Option<Conn>,
    framing: Framing,
    /// Whether the connection may carry another call after this body.
    keep_alive: bool,
    /// The pool the connection goes back to.
    origin: Arc<Origin>,
}

impl Body {
    /// The next piece of the body, as it arrives; `None` at its end.
    pub fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        let result = self.poll_step(cx);
        if let Poll::Ready(Err(_)) = result {
            self.conn = None;
            self.framing = Framing::Done;
        }
        result
    }

    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(Ok(None));
            };
            match decode(&mut self.framing, &mut conn.buf)? {
                Decoded::Data(data) => return Poll::Ready(Ok(Some(data))),
                Decoded::End => {
                    let conn = self.conn.take();
                    if let Some(conn) = conn.filter(|c| self.keep_alive && c.buf.is_empty()) {
                        self.origin.put_idle(conn);
                    }
                    return Poll::Ready(Ok(None));
                }
                Decoded::More => {
                    if ready!(conn.poll_fill(cx))? == 0 {
                        if self.framing != Framing::Eof {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the body was cut short",
                            )));
                        }
                        self.framing = Framing::Done;
                    }
                }
            }
        }
    }

    /// The whole body.
    pub async fn collect(&mut self) -> io::Result<Bytes> {
        let mut first: Option<Bytes> = None;
        let mut more = BytesMut::new();
        while let Some(chunk) = std::future::poll_fn(|cx| self.poll_chunk(cx)).await? {
            match &first {
                None => first = Some(chunk),
                Some(head) => {
                    if more.is_empty() {
                        more.extend_from_slice(head);
                    }
                    more.extend_from_slice(&chunk);
                }
            }
        }
        Ok(match first {
            None => Bytes::new(),
            Some(only) if more.is_empty() => only,
            Some(_) => more.freeze(),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
