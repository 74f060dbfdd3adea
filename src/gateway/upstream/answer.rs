//! An upstream's answer: its head, the headers the client may see, and its
//! body, whole (bounded) or as a stream, read before the call's deadline.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{HeaderMap, HeaderName, StatusCode};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};

use crate::gateway::error::ApiError;

/// Why reading an upstream's body failed.
#[derive(Debug)]
pub enum BodyError {
    /// The call's time limit passed.
    Timeout,
    /// The connection failed or the body was cut.
    Cut(hyper::Error),
    /// A whole answer was larger than `max_answer_bytes`.
    TooLarge,
}

impl std::error::Error for BodyError {}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Timeout => f.write_str("the upstream call took longer than its time limit"),
            BodyError::Cut(e) => write!(f, "{e}"),
            BodyError::TooLarge => f.write_str("the upstream answer was larger than its limit"),
        }
    }
}

impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> ApiError {
        match e {
            BodyError::Timeout => ApiError::GatewayTimeout,
            BodyError::Cut(_) => ApiError::BadGateway("The upstream answer was cut short.".into()),
            BodyError::TooLarge => ApiError::BadGateway(
                "The upstream answer was larger than the gateway accepts.".into(),
            ),
        }
    }
}

/// An upstream's answer: its head, and a body to read before the call's
/// deadline.
pub struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Incoming,
    pub(super) deadline: tokio::time::Instant,
    /// The most of a whole answer [`Answer::bytes`] reads.
    pub(super) max_answer_bytes: usize,
}

impl Answer {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The headers worth passing to the client, taken out of the answer:
    /// those [`passed_response_header`] allows, moved (not copied) into a
    /// map with room for the gateway's own.
    pub fn take_headers(&mut self) -> HeaderMap {
        let mut out = HeaderMap::with_capacity(16);
        // `into_iter` names a header once, then `None` for its other values.
        let mut kept: Option<HeaderName> = None;
        for (name, value) in std::mem::take(&mut self.headers) {
            if let Some(name) = name {
                kept = passed_response_header(&name).then_some(name);
            }
            if let Some(name) = &kept {
                out.append(name.clone(), value);
            }
        }
        out
    }

    /// The whole body, at most `max_answer_bytes` of it. Dropped unread,
    /// the rest closes its connection rather than going back to the pool.
    pub async fn bytes(self) -> Result<Bytes, BodyError> {
        let limit = self.max_answer_bytes;
        if self.body.size_hint().lower() > limit as u64 {
            // Its content-length says so: no need to read it.
            return Err(BodyError::TooLarge);
        }
        match tokio::time::timeout_at(self.deadline, collect(self.body, limit)).await {
            Err(_) => Err(BodyError::Timeout),
            Ok(result) => result,
        }
    }

    /// The body as a stream of chunks, as they arrive.
    pub fn into_stream(self) -> BodyStream {
        BodyStream {
            body: self.body,
            deadline: self.deadline,
            timer: Box::pin(tokio::time::sleep_until(self.deadline)),
            ended: false,
        }
    }
}

/// A whole body up to `limit` bytes. A body of one chunk is not copied.
async fn collect(mut body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    let mut first: Option<Bytes> = None;
    let mut more = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let Ok(chunk) = frame.map_err(BodyError::Cut)?.into_data() else {
            continue; // trailers
        };
        let Some(head) = &first else {
            if chunk.len() > limit {
                return Err(BodyError::TooLarge);
            }
            first = Some(chunk);
            continue;
        };
        if more.is_empty() {
            more.extend_from_slice(head);
        }
        if more.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        more.extend_from_slice(&chunk);
    }
    Ok(match first {
        None => Bytes::new(),
        Some(only) if more.is_empty() => only,
        Some(_) => more.freeze(),
    })
}

/// An upstream's body, chunk by chunk; an error ends it.
pub struct BodyStream {
    body: Incoming,
    /// Checked on every poll: while the body always has more ready, the
    /// timer below is never polled, and a stream ran far past its limit.
    deadline: tokio::time::Instant,
    /// Wakes the stream at the deadline when the body is quiet.
    timer: Pin<Box<tokio::time::Sleep>>,
    ended: bool,
}

impl futures_util::Stream for BodyStream {
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            if tokio::time::Instant::now() >= this.deadline {
                this.ended = true;
                return Poll::Ready(Some(Err(BodyError::Timeout)));
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Poll::Ready(Some(Ok(data)));
                    }
                    // Trailers: nothing for the client; read on.
                }
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(BodyError::Cut(e))));
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    if this.timer.as_mut().poll(cx).is_ready() {
                        this.ended = true;
                        return Poll::Ready(Some(Err(BodyError::Timeout)));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Response headers the client gets from upstream: what OpenAI's SDKs read
/// (the request id, rate limits, when to retry) and what describes the body.
/// Anything else (`server`, `set-cookie`, the upstream's own organization,
/// framing headers no longer true of the body) stays here.
pub(super) fn passed_response_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    matches!(
        name,
        "content-type"
            | "content-disposition"
            | "x-request-id"
            | "openai-processing-ms"
            | "openai-version"
            | "retry-after"
            | "retry-after-ms"
    ) || name.starts_with("x-ratelimit-")
}
