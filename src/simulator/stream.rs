//! The simulator's streams, as the API streams: chat and completions
//! chunks made one at a time as the stream reaches them, a Responses
//! stream's events made up front; faults (`cut=N`) and delays applied per
//! event.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use serde_json::{json, Value};

use super::shapes::Output;
use super::{Call, Simulator};
use crate::tokens::request::Endpoint;

/// Every event of a Responses stream, each a complete SSE frame.
pub(super) fn response_events(call: &Call, output: &Output<'_>) -> Vec<Bytes> {
    output
        .response_events(call.max_output_tokens)
        .into_iter()
        .map(|(name, mut data)| {
            if call.faults.no_usage {
                if let Some(response) = data.get_mut("response").and_then(Value::as_object_mut) {
                    response.insert("usage".into(), Value::Null);
                }
            }
            Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
        })
        .collect()
}

/// How many events a chat or completions stream has: a chunk per token
/// (chat first sends the role), the finishing chunk, the usage chunk when
/// asked for, and `[DONE]`.
fn chunk_count(call: &Call) -> usize {
    let usage = call.include_usage && !call.faults.no_usage;
    let role = usize::from(call.endpoint != Endpoint::Completions);
    role + call.output.len() + 1 + usize::from(usage) + 1
}

/// Event `i` of a chat or completions stream, a complete SSE frame.
fn chunk_event(call: &Call, output: &Output<'_>, i: usize) -> Bytes {
    let frame = |data: &Value| Bytes::from(format!("data: {data}\n\n"));
    let tokens = call.output.len();
    if i + 1 == chunk_count(call) {
        return Bytes::from_static(b"data: [DONE]\n\n");
    }
    if call.endpoint == Endpoint::Completions {
        return match call.output.get(i) {
            Some(token) => frame(&output.text_chunk(token, None)),
            None if i == tokens => frame(&output.text_finish()),
            None => frame(&output.text_usage_chunk()),
        };
    }
    match i.checked_sub(1).map(|t| call.output.get(t)) {
        None => frame(&output.chat_chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            None,
            call.include_usage,
        )),
        Some(Some(token)) => {
            frame(&output.chat_chunk(json!({"content": token}), None, call.include_usage))
        }
        Some(None) if i == tokens + 1 => frame(&output.finish_chunk(call.include_usage)),
        Some(None) => frame(&output.chat_usage_chunk()),
    }
}

/// A streamed answer: `made` holds a Responses stream's events; chat and
/// completions chunks are made as the stream reaches them.
pub(super) fn stream_response(
    sim: Arc<Simulator>,
    call: Call,
    id: String,
    created: u64,
    made: Option<Vec<Bytes>>,
) -> Response {
    let reports_usage =
        !call.faults.no_usage && (call.include_usage || call.endpoint == Endpoint::Responses);
    let total = made.as_ref().map_or_else(|| chunk_count(&call), Vec::len);
    let stream = futures_util::stream::unfold(
        (0usize, sim, call, id, made),
        move |(i, sim, call, id, made)| async move {
            if i == total {
                return None;
            }
            let delay = if i == 0 { call.ttft } else { call.token_delay };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if call.faults.cut_after == Some(i) {
                // An abrupt end: the connection closes mid-stream (after the
                // usual delay, so the events before it have left).
                return Some((
                    Err(std::io::Error::other("simulated cut")),
                    (total, sim, call, id, made),
                ));
            }
            if i + 1 == total {
                let completion = call.output.len() as u64;
                sim.record(&call.key, |s| {
                    s.completed += 1;
                    if reports_usage {
                        s.prompt_tokens += call.prompt_tokens;
                        s.completion_tokens += completion;
                        s.total_tokens += call.prompt_tokens + completion;
                    }
                });
            }
            let event = match &made {
                Some(events) => events.get(i).cloned().unwrap_or_default(),
                None => chunk_event(&call, &call.output(&id, created), i),
            };
            Some((Ok(event), (i + 1, sim, call, id, made)))
        },
    );
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    response
}
