//! Reading usage out of responses: a whole JSON body, or a stream of
//! server-sent events tapped as they pass.
//!
//! The tap forwards each complete event as soon as it arrives, unchanged,
//! except the usage chunk the gateway asked for on the client's behalf,
//! which a client that did not ask never sees. It settles the call when the
//! stream ends, when upstream cuts it, and when the client hangs up (then
//! dropping the upstream response cancels the upstream call).

use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use memchr::memmem::Finder;
use serde_json::Value;

use super::call::{Call, Outcome};
use crate::meter::Usage;
use crate::tokens::request::Endpoint;

mod usage;

#[cfg(test)]
pub use usage::UsageFields;
pub use usage::{body_text, usage_of};

/// The raw (still escaped) JSON string value that follows `key` (which ends
/// with the opening quote), up to its closing quote.
fn string_after<'a>(data: &'a [u8], key: &Finder<'_>) -> Option<&'a [u8]> {
    let at = key.find(data)? + key.needle().len();
    let rest = &data[at..];
    let mut i = 0;
    while i < rest.len() {
        match rest[i] {
            b'\\' => i += 2,
            b'"' => return Some(&rest[..i]),
            _ => i += 1,
        }
    }
    None
}

/// The most one event may take; a longer one cuts the stream (the tap
/// holds an event whole until its end, so this bounds its memory).
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// The end of the first complete event in `buf` (after its blank line:
/// `\n\n` or `\r\n\r\n`, whichever comes first). One pass over the
/// line feeds, so a buffer of many events is split in linear time.
fn event_end(buf: &[u8]) -> Option<usize> {
    event_end_from(buf, 0)
}

/// [`event_end`], searching from `from` on: `buf[..from + 2]` was searched
/// before and had no end (an end's first line feed needs at most the two
/// bytes after it to be told), so an event that arrives in many pieces is
/// searched once, not once a piece.
fn event_end_from(buf: &[u8], from: usize) -> Option<usize> {
    let from = from.min(buf.len());
    for i in memchr::memchr_iter(b'\n', &buf[from..]) {
        let n = from + i;
        match buf.get(n + 1) {
            Some(b'\n') => return Some(n + 2),
            Some(b'\r') if n >= 1 && buf[n - 1] == b'\r' && buf.get(n + 2) == Some(&b'\n') => {
                return Some(n + 3)
            }
            _ => {}
        }
    }
    None
}

/// The `data:` payload of an event, if it has one.
fn data_of(event: &[u8]) -> Option<&[u8]> {
    let mut start = 0;
    // Line by line, the line feeds found with memchr (an event's data line
    // is long, and usually its first).
    let ends = memchr::memchr_iter(b'\n', event).chain(std::iter::once(event.len()));
    for end in ends {
        let line = &event[start..end];
        start = end + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(data) = line.strip_prefix(b"data:") {
            return Some(data.strip_prefix(b" ").unwrap_or(data));
        }
    }
    None
}

/// What a Responses event is, from its `"type"` (a `"response.…"` name
/// that is the value of a `"type"` member): one pass over the event for
/// every name.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ResponsesEvent {
    /// `response.completed`, `response.incomplete` or `response.failed`:
    /// the final response, with its usage.
    Final,
    /// `response.output_text.delta`: text to count if the stream is cut.
    TextDelta,
    Other,
}

fn responses_event(data: &[u8]) -> ResponsesEvent {
    fn is_type(before: &[u8]) -> bool {
        let before = before.trim_ascii_end();
        before
            .strip_suffix(b":")
            .is_some_and(|b| b.trim_ascii_end().ends_with(b"\"type\""))
    }
    let mut kind = ResponsesEvent::Other;
    for at in RESPONSE_DOT.find_iter(data) {
        if !is_type(&data[..at]) {
            continue;
        }
        let name = &data[at + RESPONSE_DOT.needle().len()..];
        if [&b"completed\""[..], b"incomplete\"", b"failed\""]
            .iter()
            .any(|n| name.starts_with(n))
        {
            return ResponsesEvent::Final;
        }
        if name.starts_with(b"output_text.delta\"") {
            kind = ResponsesEvent::TextDelta;
        }
    }
    kind
}

/// Whether a chunk has a `"usage"` member that is an object (not the
/// `"usage":null` of every other chunk): one pass over the chunk, or none
/// for a chunk that ends with `"usage":null}` (OpenAI's member order, and
/// the simulator's): its top-level usage is null, and the last member of a
/// name is the one read, so whatever else it holds is no usage to settle.
fn has_usage_object(data: &[u8]) -> bool {
    if data.trim_ascii_end().ends_with(br#""usage":null}"#) {
        return false;
    }
    USAGE.find_iter(data).any(|at| {
        let rest = data[at + USAGE.needle().len()..].trim_ascii_start();
        rest.first() == Some(&b':') && rest[1..].trim_ascii_start().first() == Some(&b'{')
    })
}

/// What the tap looks for in every event, each searcher built once
/// (building one per search took a third of the tap's time).
macro_rules! needles {
    ($($name:ident = $bytes:expr;)*) => {
        $(static $name: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new($bytes));)*
    };
}
needles! {
    RESPONSE_DOT = b"\"response.";
    USAGE = b"\"usage\"";
    DELTA_KEY = b"\"delta\":\"";
    TEXT_KEY = b"\"text\":\"";
    CONTENT_KEY = b"\"content\":\"";
}

type Upstream = super::upstream::BodyStream;

pub struct Tap {
    /// Settled when the stream ends; if the tap is dropped first, its drop settles.
    call: Option<Call>,
    upstream: Upstream,
    endpoint: Endpoint,
    /// Bytes of an event not yet complete.
    buffer: BytesMut,
    /// Where the search for the end of the event in `buffer` resumes.
    searched: usize,
    /// The client asked for the usage chunk itself.
    client_wants_usage: bool,
    usage: Option<Usage>,
    served_model: Option<String>,
    /// The output text streamed so far, as the JSON string literals of the
    /// events' deltas (`"Hel","lo",`): counted if the stream ends without
    /// usage. Copied out of each event, so no event buffer stays pinned: a
    /// long stream holds its text, not its events.
    text: Vec<u8>,
    /// Bytes of delta text past [`MAX_KEPT_TEXT_BYTES`], not kept: an
    /// estimate counts them as a token per four bytes.
    text_overflow: u64,
    /// Data of every event, kept only when the call is captured (to
    /// assemble the completion), at most `max_answer_bytes` of it.
    seen: Vec<Bytes>,
    /// The bytes in `seen`.
    seen_bytes: usize,
    /// The most `seen` may hold: past it the call is not captured.
    max_seen_bytes: usize,
    /// Upstream has ended (or failed): never poll it again.
    ended: bool,
    /// The call is captured: assemble its completion when the stream ends.
    capture: bool,
    /// A Responses stream's final response object (when captured).
    completed: Option<Value>,
    /// Once the stream has ended: its settled record on its way to the
    /// ledger, and the last bytes, which the client gets once it is durable.
    closing: Option<(futures_util::future::BoxFuture<'static, ()>, Option<Bytes>)>,
}

impl Tap {
    pub fn new(
        call: Call,
        upstream: super::upstream::Answer,
        endpoint: Endpoint,
        client_wants_usage: bool,
    ) -> Self {
        Tap {
            max_seen_bytes: call.live().config.server.max_answer_bytes,
            capture: call.captures(),
            completed: None,
            call: Some(call),
            upstream: upstream.into_stream(),
            endpoint,
            buffer: BytesMut::new(),
            searched: 0,
            client_wants_usage,
            usage: None,
            served_model: None,
            text: Vec::new(),
            text_overflow: 0,
            seen: Vec::new(),
            seen_bytes: 0,
            ended: false,
            closing: None,
        }
    }

    /// Read one complete event; returns whether to pass it to the client.
    fn inspect(&mut self, event: &Bytes) -> bool {
        let Some(data) = data_of(event) else {
            return true;
        };
        if !data.starts_with(b"{") {
            return true;
        }
        let offset = data.as_ptr() as usize - event.as_ptr() as usize;
        let data_bytes = event.slice(offset..offset + data.len());
        let (usage_like, text_delta) = match self.endpoint {
            Endpoint::Responses => match responses_event(data) {
                ResponsesEvent::Final => (true, false),
                ResponsesEvent::TextDelta => (false, true),
                ResponsesEvent::Other => (false, false),
            },
            _ => (has_usage_object(data), false),
        };
        if !usage_like {
            self.keep(data, data_bytes, text_delta);
            return true;
        }
        if self.endpoint != Endpoint::Responses {
            // Read past the rest (see `scan`); the full parse below when unsure.
            if let Some(chunk) = super::scan::members_of(data, self.endpoint) {
                // An absurd usage is kept as missing (settling warns of it);
                // the chunk is still the usage chunk, hidden or passed on.
                let usage = chunk.usage;
                let choices_empty = chunk.no_choices;
                if usage.is_some() {
                    self.usage = usage.filter(Usage::is_sane);
                    self.served_model = chunk.model;
                }
                if !choices_empty {
                    self.keep(data, data_bytes, false);
                }
                return !(choices_empty && usage.is_some() && !self.client_wants_usage);
            }
        }
        let Ok(value) = serde_json::from_slice::<Value>(data) else {
            return true;
        };
        match self.endpoint {
            Endpoint::Responses => {
                if let Some(response) = value.get("response") {
                    if self.capture
                        && value.get("type").and_then(Value::as_str) == Some("response.completed")
                    {
                        self.completed = Some(response.clone());
                    }
                    self.usage = response
                        .get("usage")
                        .and_then(|u| usage_of(self.endpoint, u))
                        .or(self.usage);
                    self.served_model = response
                        .get("model")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                }
                true
            }
            _ => {
                let usage = value.get("usage").and_then(|u| usage_of(self.endpoint, u));
                let choices_empty = value
                    .get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(Vec::is_empty);
                if usage.is_some() {
                    self.usage = usage;
                    self.served_model = value
                        .get("model")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                }
                if !choices_empty {
                    self.keep(data, data_bytes, false);
                }
                // The usage chunk the gateway asked for on the client's behalf stays here.
                !(choices_empty && usage.is_some() && !self.client_wants_usage)
            }
        }
    }

    /// Keep what settling may need of an event: its delta's text, and the
    /// whole event when the call is captured. `text_delta`: a Responses
    /// event is a `response.output_text.delta`.
    fn keep(&mut self, data: &[u8], event: Bytes, text_delta: bool) {
        let key: Option<&Finder<'static>> = match self.endpoint {
            Endpoint::Responses if text_delta => Some(&DELTA_KEY),
            Endpoint::Responses | Endpoint::Embeddings => None,
            Endpoint::Completions => Some(&TEXT_KEY),
            Endpoint::ChatCompletions => Some(&CONTENT_KEY),
        };
        if let Some(literal) = key.and_then(|key| string_after(data, key)) {
            if self.text.len() + literal.len() > MAX_KEPT_TEXT_BYTES {
                self.text_overflow = self.text_overflow.saturating_add(literal.len() as u64);
            } else {
                if self.text.capacity() == 0 {
                    // A stream's text grows a few bytes an event: start with room.
                    self.text.reserve(256);
                }
                self.text.push(b'"');
                self.text.extend_from_slice(literal);
                self.text.extend_from_slice(b"\",");
            }
        }
        if self.capture {
            self.seen_bytes = self.seen_bytes.saturating_add(event.len());
            if self.seen_bytes > self.max_seen_bytes {
                // Too long to assemble and keep: this call is not captured.
                tracing::warn!("a captured stream passed max_answer_bytes; it is not captured");
                self.capture = false;
                self.seen = Vec::new();
            } else {
                self.seen.push(event);
            }
        }
    }

    /// Settle with what the stream showed: its usage, or an estimate.
    /// `complete`: the stream ended as it should (only then is it captured).
    /// Resolves when the record is durable.
    fn finish(
        &mut self,
        status: u16,
        complete: bool,
    ) -> futures_util::future::BoxFuture<'static, ()> {
        let Some(mut call) = self.call.take() else {
            return Box::pin(std::future::ready(()));
        };
        let capture = self.capture && complete;
        let seen = if capture {
            std::mem::take(&mut self.seen)
        } else {
            Vec::new()
        };
        let (endpoint, completed) = (self.endpoint, self.completed.take());
        // The text is for an estimate: only a stream without usage needs it.
        let (text, overflow) = if self.usage.is_none() {
            (std::mem::take(&mut self.text), self.text_overflow)
        } else {
            (Vec::new(), 0)
        };
        let heavy = text.len() > LONG_TEXT_BYTES || (capture && self.seen_bytes > LONG_TEXT_BYTES);
        let mut outcome = Outcome {
            usage: self.usage,
            status,
            served_model: self.served_model.take(),
            ..Outcome::default()
        };
        let settle = move || {
            if capture {
                let events: Vec<Value> = seen
                    .iter()
                    .filter_map(|data| serde_json::from_slice(data).ok())
                    .collect();
                outcome.completion =
                    crate::capture::assemble(endpoint, &events, completed.as_ref());
            }
            if !text.is_empty() {
                outcome.output_text = streamed_text(text);
            }
            if overflow > 0 {
                let kept = call.encoding().count(&outcome.output_text);
                outcome.output_tokens = Some(kept.saturating_add(overflow.div_ceil(4)));
            }
            call.settle_in_place(outcome)
        };
        // Without usage the streamed text is counted, and a captured
        // stream's events are assembled: a long one on the blocking pool,
        // so that it never holds a worker other connections need (40 MB of
        // text is seconds of counting).
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if heavy => {
                let settling = runtime.spawn_blocking(settle);
                Box::pin(async move {
                    if let Ok(durable) = settling.await {
                        durable.wait().await;
                    }
                })
            }
            _ => Box::pin(settle().wait()),
        }
    }
}

/// The most delta text a stream keeps for an estimate; past it, a token per
/// four bytes is counted instead (OpenAI's rule of thumb), so a misbehaving
/// upstream's endless stream costs no more memory than this.
const MAX_KEPT_TEXT_BYTES: usize = 16 * 1024 * 1024;

/// Streamed text past this many bytes is counted on the blocking pool.
const LONG_TEXT_BYTES: usize = 64 * 1024;

/// The text of a stream's deltas, kept as JSON string literals each
/// followed by a comma (see [`Tap::keep`]), unescaped and joined.
fn streamed_text(mut literals: Vec<u8>) -> String {
    literals.pop();
    let mut array = Vec::with_capacity(literals.len() + 2);
    array.push(b'[');
    array.extend_from_slice(&literals);
    array.push(b']');
    serde_json::from_slice::<Vec<String>>(&array)
        .map(|pieces| pieces.concat())
        .unwrap_or_default()
}

impl Tap {
    /// Take a chunk from upstream: the data from the start of the pending
    /// event with the end of the first complete event in it, or `None`
    /// while that event goes on (the chunk is then kept in `buffer`). A
    /// chunk that starts an event is not copied.
    fn pending(&mut self, chunk: Bytes) -> Option<(Bytes, usize)> {
        if self.buffer.is_empty() {
            if let Some(end) = event_end(&chunk) {
                return Some((chunk, end));
            }
            self.buffer.extend_from_slice(&chunk);
            self.searched = self.buffer.len();
            return None;
        }
        let from = self.searched.saturating_sub(2);
        self.buffer.extend_from_slice(&chunk);
        match event_end_from(&self.buffer, from) {
            Some(end) => {
                self.searched = 0;
                Some((self.buffer.split().freeze(), end))
            }
            None => {
                self.searched = self.buffer.len();
                None
            }
        }
    }

    /// End the stream as cut, upstream's or by the gateway: settle on an
    /// estimate, and cut the client's stream too.
    fn cut(&mut self, why: &'static str) -> std::io::Error {
        self.ended = true;
        self.buffer = BytesMut::new();
        // The client sees a cut stream, not an answer: nothing waits.
        drop(self.finish(200, false));
        std::io::Error::other(why)
    }
}

impl Stream for Tap {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some((durable, _)) = &mut this.closing {
            if durable.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let last = this.closing.take().and_then(|(_, last)| last);
            return Poll::Ready(last.map(Ok));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.upstream).poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    let Some((data, first)) = this.pending(chunk) else {
                        if this.buffer.len() > MAX_EVENT_BYTES {
                            tracing::warn!("an upstream event passed 16 MiB: the stream is cut");
                            return Poll::Ready(Some(Err(
                                this.cut("an upstream event passed 16 MiB")
                            )));
                        }
                        continue;
                    };
                    // The events passed on are a slice of `data` until one
                    // is held back; from then on they are copied.
                    let mut at = 0;
                    let mut next = Some(first);
                    let mut copied: Option<BytesMut> = None;
                    while let Some(end) = next {
                        let event = data.slice(at..end);
                        let pass = this.inspect(&event);
                        match (&mut copied, pass) {
                            (Some(out), true) => out.extend_from_slice(&event),
                            (None, false) => copied = Some(BytesMut::from(&data[..at])),
                            _ => {}
                        }
                        at = end;
                        next = event_end(&data[at..]).map(|len| at + len);
                    }
                    if at < data.len() {
                        this.buffer.extend_from_slice(&data[at..]);
                        this.searched = this.buffer.len();
                    }
                    let out = copied.map_or_else(|| data.slice(..at), BytesMut::freeze);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::warn!(error = %e, "upstream stream ended abruptly");
                    return Poll::Ready(Some(Err(this.cut("upstream stream ended abruptly"))));
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    this.searched = 0;
                    let rest = std::mem::take(&mut this.buffer);
                    if !rest.is_empty() {
                        let rest = rest.freeze();
                        let pass = this.inspect(&rest);
                        let durable = this.finish(200, true);
                        this.closing = Some((durable, pass.then_some(rest)));
                    } else {
                        this.closing = Some((this.finish(200, true), None));
                    }
                    // The end goes out once the call's record is durable.
                    return self.poll_next(cx);
                }
            }
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        // The client hung up mid-stream: what it was sent is counted (and
        // written; nobody waits for it).
        drop(self.finish(0, false));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_and_data() {
        assert_eq!(event_end(b"data: {}\n\ndata: x"), Some(10));
        assert_eq!(event_end(b"data: {}\r\n\r\n"), Some(12));
        assert_eq!(event_end(b"data: {}\n"), None);
        assert_eq!(
            data_of(b"event: response.completed\ndata: {\"a\":1}\n\n"),
            Some(&b"{\"a\":1}"[..])
        );
        assert_eq!(data_of(b": keep-alive\n\n"), None);
        assert_eq!(data_of(b"id: 1\r\ndata:{}\r\n\r\n"), Some(&b"{}"[..]));
        assert_eq!(data_of(b"data: [DONE]"), Some(&b"[DONE]"[..]));
        assert_eq!(data_of(b""), None);
    }

    /// `event_end` finds what the two-pattern search it replaced found, on
    /// every string of up to 8 bytes over `a`, `\r` and `\n`.
    #[test]
    fn event_end_matches_the_plain_search() {
        fn plain(buf: &[u8]) -> Option<usize> {
            let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
            let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
            match (lf, crlf) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        }
        for len in 0..=8u32 {
            for mut code in 0..3usize.pow(len) {
                let mut buf = Vec::new();
                for _ in 0..len {
                    buf.push([b'a', b'\r', b'\n'][code % 3]);
                    code /= 3;
                }
                assert_eq!(event_end(&buf), plain(&buf), "{buf:?}");
            }
        }
    }

    /// Resuming the search two bytes before where a search found no end
    /// finds what a search of the whole buffer finds.
    #[test]
    fn event_end_from_resumes_where_the_search_stopped() {
        for len in 0..=8u32 {
            for mut code in 0..3usize.pow(len) {
                let mut buf = Vec::new();
                for _ in 0..len {
                    buf.push([b'a', b'\r', b'\n'][code % 3]);
                    code /= 3;
                }
                for split in 0..=buf.len() {
                    if event_end(&buf[..split]).is_none() {
                        let from = split.saturating_sub(2);
                        assert_eq!(
                            event_end_from(&buf, from),
                            event_end(&buf),
                            "{buf:?} {split}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn delta_strings_are_found_with_their_escapes() {
        let data =
            br#"{"choices":[{"index":0,"delta":{"content":"say \"hi\"\n"},"finish_reason":null}]}"#;
        assert_eq!(
            string_after(data, &CONTENT_KEY),
            Some(&br#"say \"hi\"\n"#[..])
        );
        assert_eq!(string_after(b"{\"content\":\"cut", &CONTENT_KEY), None);
        assert_eq!(string_after(data, &TEXT_KEY), None);
    }

    #[test]
    fn usage_objects_and_responses_events_are_told_apart() {
        assert!(has_usage_object(
            br#"{"choices":[],"usage":{"prompt_tokens":9}}"#
        ));
        assert!(has_usage_object(
            br#"{"choices":[],"usage" : { "prompt_tokens":9}}"#
        ));
        assert!(!has_usage_object(
            br#"{"choices":[{"delta":{"content":"usage"}}],"usage":null}"#
        ));
        assert!(!has_usage_object(
            br#"{"choices":[{"delta":{"content":"\"usage\":{"}}],"usage":null}"#
        ));
        assert!(!has_usage_object(br#"{"choices":[{"delta":{}}]}"#));
        // Past the short cut for a chunk that ends in a null usage.
        assert!(!has_usage_object(
            br#"{"usage":null,"choices":[{"delta":{"content":"hi"}}]}"#
        ));
        assert!(has_usage_object(
            br#"{"usage":null,"choices":[],"usage":{"prompt_tokens":9}}"#
        ));
        assert!(!has_usage_object(
            br#"{"x":{"usage":{"prompt_tokens":9}},"usage":null} "#
        ));
        for name in ["completed", "incomplete", "failed"] {
            let event = format!(r#"{{"type":"response.{name}","response":{{"usage":{{}}}}}}"#);
            assert_eq!(responses_event(event.as_bytes()), ResponsesEvent::Final);
        }
        assert_eq!(
            responses_event(br#"{"type":"response.output_text.delta","delta":"Hi"}"#),
            ResponsesEvent::TextDelta
        );
        assert_eq!(
            responses_event(br#"{"type":"response.created","response":{"status":"in_progress"}}"#),
            ResponsesEvent::Other
        );
        assert_eq!(
            responses_event(br#"{"type":"response.output_text.done","text":"response.completed"}"#),
            ResponsesEvent::Other,
            "a name that is not the event's type is not its kind"
        );
        assert_eq!(
            responses_event(
                br#"{"delta":"response.failed", "type" : "response.output_text.delta"}"#
            ),
            ResponsesEvent::TextDelta
        );
    }
}
