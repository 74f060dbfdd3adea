//! The simulator's streams, as the API streams: chat and completions
//! chunks made one at a time as the stream reaches them, a Responses
//! stream's events made up front; faults (`cut=N`) and delays applied per
//! event.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use serde_json::Value;

use super::shapes::Output;
use super::{Call, Simulator};
use crate::tokens::request::Endpoint;

/// Every event of a Responses stream, each a complete SSE frame.
pub(super) fn response_events(call: &Call, output: &Output<'_>) -> Vec<Bytes> {
    output
        .response_events()
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

/// One event of a chat or completions stream, by what it carries.
#[derive(Clone, Copy)]
enum Step {
    /// Chat: a choice's first chunk (its role).
    Role(usize),
    /// A choice's text piece.
    Piece(usize, usize),
    /// Chat: a choice's function call begins (its id and name), or a piece
    /// of its arguments.
    Call(usize, usize, Option<usize>),
    /// A choice's finishing chunk.
    Finish(usize),
    Usage,
    Done,
}

/// A chat or completions stream's events in order: each choice's role (chat),
/// its text or calls a token at a time, its finish; the usage chunk when
/// asked for; `[DONE]`.
fn steps(call: &Call) -> Vec<Step> {
    let chat = call.endpoint != Endpoint::Completions;
    let mut steps = Vec::new();
    for (index, choice) in call.output.iter().enumerate() {
        if chat {
            steps.push(Step::Role(index));
        }
        steps.extend((0..choice.pieces.len()).map(|i| Step::Piece(index, i)));
        for (k, c) in choice.calls.iter().enumerate() {
            steps.push(Step::Call(index, k, None));
            steps.extend((0..c.pieces.len()).map(|i| Step::Call(index, k, Some(i))));
        }
        steps.push(Step::Finish(index));
    }
    if call.include_usage && !call.faults.no_usage {
        steps.push(Step::Usage);
    }
    steps.push(Step::Done);
    steps
}

/// A step of a chat or completions stream, a complete SSE frame.
fn chunk_event(call: &Call, output: &Output<'_>, step: Step) -> Bytes {
    let frame = |data: &Value| Bytes::from(format!("data: {data}\n\n"));
    let usage = call.include_usage;
    if call.endpoint == Endpoint::Completions {
        return match step {
            Step::Piece(index, i) => frame(&output.text_chunk(index, Some(i))),
            Step::Finish(index) => frame(&output.text_chunk(index, None)),
            Step::Usage => frame(&output.text_usage_chunk()),
            _ => Bytes::from_static(b"data: [DONE]\n\n"),
        };
    }
    match step {
        Step::Role(index) => frame(&output.chat_role_chunk(index, usage)),
        Step::Piece(index, i) => frame(&output.chat_piece_chunk(index, i, usage)),
        Step::Call(index, k, piece) => frame(&output.chat_call_chunk(index, k, piece, usage)),
        Step::Finish(index) => frame(&output.finish_chunk(index, usage)),
        Step::Usage => frame(&output.chat_usage_chunk()),
        Step::Done => Bytes::from_static(b"data: [DONE]\n\n"),
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
    let steps = if made.is_none() {
        steps(&call)
    } else {
        Vec::new()
    };
    let total = made.as_ref().map_or(steps.len(), Vec::len);
    let stream = futures_util::stream::unfold(
        (0usize, sim, call, id, made, steps),
        move |(i, sim, call, id, made, steps)| async move {
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
                    (total, sim, call, id, made, steps),
                ));
            }
            if i + 1 == total {
                let completion: u64 = call.output.iter().map(|c| c.tokens).sum();
                sim.record(&call.key, |s| {
                    s.completed += 1;
                    if reports_usage {
                        s.prompt_tokens += call.prompt_tokens;
                        s.completion_tokens += completion;
                        s.total_tokens += call.prompt_tokens + completion;
                    }
                });
                sim.tally(
                    call.project.as_deref(),
                    &call.model,
                    call.prompt_tokens,
                    completion,
                );
            }
            let event = match &made {
                Some(events) => events.get(i).cloned().unwrap_or_default(),
                None => chunk_event(&call, &call.output(&id, created), steps[i]),
            };
            Some((Ok(event), (i + 1, sim, call, id, made, steps)))
        },
    );
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    response
}
