//! The client side's HTTP/1.1, by hand: one task per connection reads a
//! request's head (httparse), hands the request to the [`App`], and writes
//! the answer, keeping the connection alive between calls.
//!
//! Why not hyper's server: at 1,000 calls/s a bare proxy on it used 26 µs
//! more CPU a call than the same proxy reading and writing HTTP/1.1 itself,
//! and its p99 was 50 µs later (docs/benchmarks.md, ninth session). Most
//! requests here are a small `POST` that arrives whole with its head: its
//! body is handed over as it is, and a whole answer goes out in one write.
//!
//! What a connection does:
//! - a request's head must arrive within the head's time limit (an idle
//!   keep-alive connection waits under the same limit); a late one gets a
//!   408 if it had begun, and the connection closes;
//! - a malformed head gets a 400, one too large a 431, an unsupported
//!   transfer coding a 501; each closes the connection;
//! - a body is framed by `Content-Length` or the chunked coding; a body not
//!   yet all there is streamed to the handler as it arrives (with `100
//!   Continue` first when the client asked for it), so the handler's own
//!   limits (size, time) apply to it;
//! - while a call runs, a client that closes its connection cancels it (the
//!   handler's future is dropped, which settles the call as hung up);
//! - an answer whose length is known goes out with `Content-Length`, any
//!   other chunked, each piece as it comes;
//! - `Connection: close`, HTTP/1.0, a body the handler left unread, and a
//!   shutdown each close the connection after the answer.

use std::io;
use std::pin::pin;
use std::time::Duration;

use axum::body::Body;
use axum::http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::http1::{self, Decoded, Framing};
use super::App;

/// The most a request's head may take.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most headers a request may have (hyper's default is 100).
const MAX_HEADERS: usize = 100;
/// How much room each read asks for.
const READ_BYTES: usize = 16 * 1024;
/// How much a client may send ahead (pipelined) while a call runs.
const MAX_AHEAD_BYTES: usize = 64 * 1024;

/// A request's head, parsed.
struct Head {
    request: Request<()>,
    framing: Framing,
    /// Whether the connection may carry another request after this one.
    keep_alive: bool,
    /// The client waits for `100 Continue` before it sends its body.
    expects_continue: bool,
}

/// Why a head could not be read.
enum HeadError {
    /// The connection ended (or failed) between requests: nothing to answer.
    Gone,
    /// An answer to send before closing.
    Answer(StatusCode, &'static str),
}

/// Serve one connection until it closes, its client goes away, or
/// `closing` says the server is shutting down (between requests).
pub async fn connection(
    mut tcp: TcpStream,
    app: App,
    header_timeout: Duration,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let (mut rd, mut wr) = tcp.split();
    let mut buf = BytesMut::with_capacity(READ_BYTES);
    let mut out = Vec::with_capacity(4096);
    loop {
        let idle = buf.is_empty();
        let read = tokio::select! {
            biased;
            read = tokio::time::timeout(header_timeout, read_head(&mut rd, &mut buf)) => read,
            // An idle connection closes at once on shutdown; one that has
            // begun a request gets its answer first.
            () = shutting_down(&mut closing), if idle => return,
        };
        let head = match read {
            Ok(head) => head,
            // Nothing of a request came: close without a word.
            Err(_) if buf.is_empty() => return,
            Err(_) => Err(HeadError::Answer(
                StatusCode::REQUEST_TIMEOUT,
                "The request's head took too long.",
            )),
        };
        let head = match head {
            Ok(head) => head,
            Err(HeadError::Gone) => return,
            Err(HeadError::Answer(status, message)) => {
                if write_plain(&mut wr, &mut out, status, message)
                    .await
                    .is_ok()
                {
                    linger(&mut rd, &mut wr).await;
                }
                return;
            }
        };
        let Head {
            request,
            framing,
            mut keep_alive,
            expects_continue,
        } = head;
        let head_request = request.method() == Method::HEAD;
        // The body: whole when it is all here (most calls), else streamed.
        let (body, mut pump) = match framing {
            Framing::Length(n) if buf.len() as u64 >= n => {
                let whole = buf
                    .split_to(usize::try_from(n).unwrap_or(usize::MAX))
                    .freeze();
                (Body::from(whole), None)
            }
            framing => {
                if expects_continue
                    && wr
                        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                        .await
                        .is_err()
                {
                    return;
                }
                let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(4);
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|item| (item, rx))
                });
                (Body::from_stream(stream), Some((framing, tx)))
            }
        };
        let request = request.map(|()| body);
        let mut call = pin!(app.call(request));
        // Run the call; meanwhile feed it its body, then watch for the
        // client going away.
        let response = loop {
            let feeding = async {
                match pump.as_mut() {
                    Some((framing, tx)) => feed(&mut rd, &mut buf, framing, tx).await,
                    None => {
                        watch(&mut rd, &mut buf).await;
                        Fed::Gone
                    }
                }
            };
            tokio::select! {
                biased;
                response = &mut call => break response,
                fed = feeding => match fed {
                    Fed::Done => pump = None,
                    Fed::Gone => return,
                    // The handler was told; its answer closes the connection.
                    Fed::Malformed => {
                        keep_alive = false;
                        pump = None;
                    }
                    // The handler stopped reading: the rest of the body is
                    // never read, so the connection cannot carry another call.
                    Fed::Refused => {
                        keep_alive = false;
                        pump = None;
                        // Watch no more: the unread body would read as ahead.
                        let Ok(response) = (&mut call).await;
                        break Ok(response);
                    }
                },
            }
        };
        let Ok(response) = response;
        if pump.is_some() {
            // The body was not all read: what follows on the connection is
            // the rest of it, not a request.
            keep_alive = false;
        }
        drop(pump);
        if *closing.borrow() {
            keep_alive = false;
        }
        match write_response(
            &mut rd,
            &mut wr,
            &mut buf,
            &mut out,
            response,
            head_request,
            keep_alive,
        )
        .await
        {
            Ok(true) if keep_alive => {}
            _ => return,
        }
    }
}

/// Resolve once the server is shutting down.
async fn shutting_down(closing: &mut tokio::sync::watch::Receiver<bool>) {
    while !*closing.borrow_and_update() {
        if closing.changed().await.is_err() {
            // The server is gone without saying so: go on until the client leaves.
            std::future::pending::<()>().await;
        }
    }
}

/// Read a request's head from `rd` into `buf` and parse it.
async fn read_head(rd: &mut ReadHalf<'_>, buf: &mut BytesMut) -> Result<Head, HeadError> {
    loop {
        if !buf.is_empty() {
            if let Some((len, head)) = parse_head(buf)? {
                buf.advance(len);
                return Ok(head);
            }
            if buf.len() > MAX_HEAD_BYTES {
                return Err(HeadError::Answer(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "The request's head is too large.",
                ));
            }
        }
        buf.reserve(READ_BYTES);
        match rd.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Err(HeadError::Gone),
            Ok(0) => {
                return Err(HeadError::Answer(
                    StatusCode::BAD_REQUEST,
                    "The connection ended inside a request's head.",
                ))
            }
            Ok(_) => {}
            Err(_) => return Err(HeadError::Gone),
        }
    }
}

fn bad(message: &'static str) -> HeadError {
    HeadError::Answer(StatusCode::BAD_REQUEST, message)
}

/// A whole head at the start of `buf` and its length; `None` while it is
/// incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Head)>, HeadError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut slots);
    let len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD_BYTES => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(_)) => {
            return Err(HeadError::Answer(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "The request's head is too large.",
            ))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError::Answer(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "The request has too many headers.",
            ))
        }
        Err(_) => return Err(bad("The request's head is malformed.")),
    };
    let method = Method::from_bytes(parsed.method.unwrap_or_default().as_bytes())
        .map_err(|_| bad("The request's method is malformed."))?;
    let uri: Uri = parsed
        .path
        .unwrap_or_default()
        .parse()
        .map_err(|_| bad("The request's target is malformed."))?;
    let version = if parsed.version == Some(1) {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut keep_alive = version == Version::HTTP_11;
    let mut expects_continue = false;
    let mut chunked = false;
    let mut length: Option<u64> = None;
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| bad("A request header's name is malformed."))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| bad("A request header's value is malformed."))?;
        if name == header::CONTENT_LENGTH {
            let n = http1::content_length(h.value)
                .ok_or_else(|| bad("The Content-Length is malformed."))?;
            if length.is_some_and(|l| l != n) {
                return Err(bad("The request has two Content-Lengths."));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            if !http1::last_coding_is_chunked(h.value) || chunked {
                return Err(HeadError::Answer(
                    StatusCode::NOT_IMPLEMENTED,
                    "Only the chunked transfer coding is supported.",
                ));
            }
            chunked = true;
        } else if name == header::CONNECTION {
            if http1::has_token(h.value, b"close") {
                keep_alive = false;
            } else if http1::has_token(h.value, b"keep-alive") {
                keep_alive = true;
            }
        } else if name == header::EXPECT {
            expects_continue = h.value.eq_ignore_ascii_case(b"100-continue");
        }
        headers.append(name, value);
    }
    let framing = match (chunked, length) {
        (true, Some(_)) => {
            return Err(bad(
                "The request has both a Content-Length and a Transfer-Encoding.",
            ))
        }
        (true, None) => Framing::ChunkSize,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::Length(0),
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Ok(Some((
        len,
        Head {
            request,
            framing,
            keep_alive,
            expects_continue,
        },
    )))
}

/// How feeding a body to its handler ended.
enum Fed {
    /// All of it was handed over.
    Done,
    /// The handler dropped the body before its end.
    Refused,
    /// The client went away.
    Gone,
    /// The body's chunked coding was malformed (the handler was told).
    Malformed,
}

/// Hand the body to the handler as it arrives.
async fn feed(
    rd: &mut ReadHalf<'_>,
    buf: &mut BytesMut,
    framing: &mut Framing,
    tx: &tokio::sync::mpsc::Sender<io::Result<Bytes>>,
) -> Fed {
    loop {
        match http1::decode(framing, buf) {
            Ok(Decoded::Data(data)) => {
                if tx.send(Ok(data)).await.is_err() {
                    return Fed::Refused;
                }
            }
            Ok(Decoded::End) => return Fed::Done,
            Ok(Decoded::More) => {
                buf.reserve(READ_BYTES);
                match rd.read_buf(buf).await {
                    Ok(0) | Err(_) => {
                        let _ = tx
                            .send(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the body was cut",
                            )))
                            .await;
                        return Fed::Gone;
                    }
                    Ok(_) => {}
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return Fed::Malformed;
            }
        }
    }
}

/// Resolve when the client closes its connection. What it sends meanwhile
/// (a pipelined request) is kept in `buf`, up to a limit.
async fn watch(rd: &mut ReadHalf<'_>, buf: &mut BytesMut) {
    loop {
        if buf.len() >= MAX_AHEAD_BYTES {
            return std::future::pending().await;
        }
        buf.reserve(READ_BYTES);
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Before closing after an error, let the client read the answer: closed
/// with unread bytes in its buffer, a socket sends a reset, which can
/// reach the client before the answer does. So end the writing side and
/// read what the client still sends, for a short while.
async fn linger(rd: &mut ReadHalf<'_>, wr: &mut WriteHalf<'_>) {
    let _ = wr.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut left: usize = 1024 * 1024;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while left > 0 {
            match rd.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Write a short plain-text answer that closes the connection.
async fn write_plain(
    wr: &mut WriteHalf<'_>,
    out: &mut Vec<u8>,
    status: StatusCode,
    message: &str,
) -> io::Result<()> {
    out.clear();
    status_line(out, status);
    out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\nconnection: close\r\n");
    http1::put_date(out);
    out.extend_from_slice(format!("content-length: {}\r\n\r\n{message}", message.len()).as_bytes());
    wr.write_all(out).await
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Write an answer. `Ok(true)` when it went out whole and the connection
/// can go on; `Ok(false)` when the body failed midway or the client went
/// away while it was being written.
async fn write_response(
    rd: &mut ReadHalf<'_>,
    wr: &mut WriteHalf<'_>,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    response: Response<Body>,
    head_request: bool,
    keep_alive: bool,
) -> io::Result<bool> {
    let (parts, mut body) = response.into_parts();
    let status = parts.status;
    let bodiless =
        head_request || status.is_informational() || matches!(status.as_u16(), 204 | 304);
    let mut closes = !keep_alive;
    out.clear();
    status_line(out, status);
    let mut has_length = false;
    for (name, value) in &parts.headers {
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        if name == header::CONTENT_LENGTH {
            has_length = true;
        }
        if name == header::CONNECTION && http1::has_token(value.as_bytes(), b"close") {
            closes = true;
        }
        http1::put_header(out, name, value);
    }
    if !parts.headers.contains_key(header::DATE) {
        http1::put_date(out);
    }
    if closes && !parts.headers.contains_key(header::CONNECTION) {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let exact = axum::body::HttpBody::size_hint(&body).exact();
    let chunked = !bodiless && !has_length && exact.is_none();
    if bodiless {
        if head_request && !has_length {
            if let Some(n) = exact {
                out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
        wr.write_all(out).await?;
        return Ok(!closes);
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
    } else {
        if !has_length {
            let n = exact.unwrap_or(0);
            out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    // A body that is ready now (most answers) goes out with the head.
    loop {
        let next = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                if !out.is_empty() {
                    wr.write_all(out).await?;
                    out.clear();
                }
                tokio::select! {
                    biased;
                    frame = body.frame() => frame,
                    () = watch(rd, buf) => return Ok(false),
                }
            }
        };
        match next {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "an answer's body failed midway");
                if !out.is_empty() {
                    wr.write_all(out).await?;
                }
                return Ok(false);
            }
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue; // trailers are not sent
                };
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                    out.extend_from_slice(&data);
                    out.extend_from_slice(b"\r\n");
                } else {
                    out.extend_from_slice(&data);
                }
                if out.len() >= READ_BYTES {
                    wr.write_all(out).await?;
                    out.clear();
                }
            }
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        wr.write_all(out).await?;
        out.clear();
    }
    Ok(!closes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
