//! Capture of shared traffic, for platforms that run the program for their
//! own tenants: each call of a sharing project of an org with
//! `capture = true` keeps its request (as sent upstream, so after the privacy
//! guard's redaction) and its completion (a streamed one assembled from its
//! events), compressed at rest with DEFLATE. Nothing is kept for a project
//! that does not share, nor for a call that failed or was cut short.
//!
//! Export turns a captured call into OpenAI's chat fine-tuning format
//! (`{"messages": [...]}`, the assistant's reply last) or a raw line.

use std::io::{Read, Write};

use serde_json::{json, Map, Value};

use crate::tokens::request::Endpoint;

/// A captured call, compressed: what goes into the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capture {
    pub started_ms: i64,
    pub org: String,
    pub project: String,
    pub model: String,
    pub endpoint: &'static str,
    pub streamed: bool,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// DEFLATE of `{"request": ..., "response": ...}`.
    pub body: Vec<u8>,
}

pub fn compress(value: &Value) -> std::io::Result<Vec<u8>> {
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    serde_json::to_writer(&mut encoder, value)?;
    encoder.finish()
}

pub fn decompress(bytes: &[u8]) -> std::io::Result<Value> {
    let mut text = Vec::with_capacity(bytes.len() * 4);
    flate2::read::DeflateDecoder::new(bytes).read_to_end(&mut text)?;
    serde_json::from_slice(&text).map_err(std::io::Error::other)
}

/// Assemble a streamed completion from its events' data into the body the
/// same call would have had unstreamed. `None` when nothing came.
pub fn assemble(endpoint: Endpoint, events: &[Value], completed: Option<&Value>) -> Option<Value> {
    match endpoint {
        Endpoint::Responses => completed.cloned(),
        Endpoint::ChatCompletions => assemble_chat(events),
        Endpoint::Completions => assemble_completion(events),
        Endpoint::Embeddings => None,
    }
}

fn append(target: &mut Map<String, Value>, key: &str, piece: &str) {
    match target.get_mut(key) {
        Some(Value::String(s)) => s.push_str(piece),
        _ => {
            target.insert(key.to_owned(), Value::String(piece.to_owned()));
        }
    }
}

fn assemble_chat(events: &[Value]) -> Option<Value> {
    let mut first: Option<&Value> = None;
    // index -> (message, finish_reason)
    let mut choices: Vec<(Map<String, Value>, Value)> = Vec::new();
    for event in events {
        first.get_or_insert(event);
        for choice in event
            .get("choices")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if index > 127 {
                continue;
            }
            while choices.len() <= index {
                let mut message = Map::new();
                message.insert("role".into(), json!("assistant"));
                message.insert("content".into(), Value::Null);
                choices.push((message, Value::Null));
            }
            let (message, finish) = &mut choices[index];
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                *finish = reason.clone();
            }
            let Some(delta) = choice.get("delta") else {
                continue;
            };
            for key in ["content", "refusal"] {
                if let Some(piece) = delta.get(key).and_then(Value::as_str) {
                    append(message, key, piece);
                }
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let at = call.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let calls = message
                    .entry("tool_calls")
                    .or_insert_with(|| Value::Array(Vec::new()));
                let Some(calls) = calls.as_array_mut() else {
                    continue;
                };
                if at > 127 {
                    continue;
                }
                while calls.len() <= at {
                    calls.push(json!({"id": "", "type": "function", "function": {"name": "", "arguments": ""}}));
                }
                let target = &mut calls[at];
                if let Some(id) = call.get("id").and_then(Value::as_str) {
                    target["id"] = json!(id);
                }
                if let Some(function) = target.get_mut("function").and_then(Value::as_object_mut) {
                    for key in ["name", "arguments"] {
                        if let Some(piece) = call
                            .pointer(&format!("/function/{key}"))
                            .and_then(Value::as_str)
                        {
                            append(function, key, piece);
                        }
                    }
                }
            }
        }
    }
    let first = first?;
    let choices: Vec<Value> = choices
        .into_iter()
        .enumerate()
        .map(|(i, (message, finish))| json!({"index": i, "message": message, "finish_reason": finish}))
        .collect();
    Some(json!({
        "id": first.get("id").cloned().unwrap_or(Value::Null),
        "object": "chat.completion",
        "created": first.get("created").cloned().unwrap_or(Value::Null),
        "model": first.get("model").cloned().unwrap_or(Value::Null),
        "choices": choices,
    }))
}

fn assemble_completion(events: &[Value]) -> Option<Value> {
    let first = events.first()?;
    let mut text = String::new();
    let mut finish = Value::Null;
    for event in events {
        if let Some(choice) = event.pointer("/choices/0") {
            if let Some(piece) = choice.get("text").and_then(Value::as_str) {
                text.push_str(piece);
            }
            if let Some(reason) = choice.get("finish_reason").filter(|r| !r.is_null()) {
                finish = reason.clone();
            }
        }
    }
    Some(json!({
        "id": first.get("id").cloned().unwrap_or(Value::Null),
        "object": "text_completion",
        "model": first.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{"index": 0, "text": text, "finish_reason": finish}],
    }))
}

/// A message's content as fine-tuning takes it: a string, or the text and
/// image parts of a list.
fn content_of(content: &Value) -> Option<Value> {
    match content {
        Value::String(_) => Some(content.clone()),
        Value::Array(parts) => {
            let kept: Vec<Value> = parts
                .iter()
                .filter_map(|p| match p.get("type").and_then(Value::as_str) {
                    Some("text") | Some("input_text") | Some("output_text") => Some(
                        json!({"type": "text", "text": p.get("text").cloned().unwrap_or(json!(""))}),
                    ),
                    Some("image_url") => Some(p.clone()),
                    _ => None,
                })
                .collect();
            // A list of text parts alone is written as one string.
            if kept.iter().all(|p| p["type"] == "text") {
                let text: String = kept
                    .iter()
                    .filter_map(|p| p["text"].as_str())
                    .collect::<Vec<_>>()
                    .join("");
                Some(json!(text))
            } else {
                Some(Value::Array(kept))
            }
        }
        _ => None,
    }
}

/// Keep the keys fine-tuning reads from a chat message.
fn clean_message(message: &Value) -> Option<Value> {
    let role = message.get("role").and_then(Value::as_str)?;
    let role = if role == "developer" { "system" } else { role };
    let mut out = Map::new();
    out.insert("role".into(), json!(role));
    match message.get("content").and_then(content_of) {
        Some(content) => {
            out.insert("content".into(), content);
        }
        None => {
            out.insert("content".into(), Value::Null);
        }
    }
    for key in ["name", "tool_calls", "tool_call_id"] {
        if let Some(v) = message.get(key).filter(|v| !v.is_null()) {
            out.insert(key.into(), v.clone());
        }
    }
    if out["content"].is_null() && !out.contains_key("tool_calls") {
        return None;
    }
    Some(Value::Object(out))
}

/// A captured exchange as one fine-tuning example: the request's messages,
/// then the assistant's reply. `None` when the call is not a chat exchange
/// (embeddings, completions, a reply without text or tool calls).
pub fn to_chat(endpoint: &str, request: &Value, response: &Value) -> Option<Value> {
    let mut messages = Vec::new();
    match endpoint {
        "/v1/chat/completions" => {
            for m in request.get("messages")?.as_array()? {
                messages.push(clean_message(m)?);
            }
            // clean_message keeps only the keys fine-tuning reads (no `refusal`).
            messages.push(clean_message(response.pointer("/choices/0/message")?)?);
        }
        "/v1/responses" => {
            if let Some(instructions) = request.get("instructions").and_then(Value::as_str) {
                messages.push(json!({"role": "system", "content": instructions}));
            }
            match request.get("input")? {
                Value::String(text) => messages.push(json!({"role": "user", "content": text})),
                Value::Array(items) => {
                    for item in items {
                        let is_message = item.get("type").is_none_or(|t| t == "message");
                        if !is_message {
                            return None;
                        }
                        messages.push(clean_message(item)?);
                    }
                }
                _ => return None,
            }
            let mut text = String::new();
            for item in response.get("output")?.as_array()? {
                if item.get("type").and_then(Value::as_str) != Some("message") {
                    continue;
                }
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(t) = part.get("text").and_then(Value::as_str) {
                        text.push_str(t);
                    }
                }
            }
            if text.is_empty() {
                return None;
            }
            messages.push(json!({"role": "assistant", "content": text}));
        }
        _ => return None,
    }
    let mut example = Map::new();
    example.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = request.get("tools").filter(|t| t.is_array()) {
        if endpoint == "/v1/chat/completions" {
            example.insert("tools".into(), tools.clone());
        }
    }
    Some(Value::Object(example))
}

/// Write one JSON line.
pub fn write_line(out: &mut impl Write, value: &Value) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, value)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_round_trips() {
        let value =
            json!({"request": {"messages": [{"role": "user", "content": "hi ".repeat(100)}]}});
        let packed = compress(&value).unwrap_or_default();
        assert!(packed.len() < 100, "{}", packed.len());
        assert_eq!(decompress(&packed).ok(), Some(value));
    }

    #[test]
    fn a_streamed_chat_is_assembled() {
        let events = vec![
            json!({"id": "c1", "model": "gpt-4o", "created": 1, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": null}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": null}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "t1", "type": "function", "function": {"name": "get", "arguments": "{\"a\""}}]}}]}),
            json!({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}, "finish_reason": "tool_calls"}]}),
        ];
        let body = assemble(Endpoint::ChatCompletions, &events, None).unwrap_or_default();
        assert_eq!(body["choices"][0]["message"]["content"], "Hello");
        assert_eq!(
            body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"a\":1}"
        );
        assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(body["model"], "gpt-4o");
    }

    #[test]
    fn chat_and_responses_become_fine_tuning_examples() {
        let request = json!({"model": "gpt-4o", "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]});
        let response = json!({"choices": [{"message": {"role": "assistant", "content": "Hello!", "refusal": null}}]});
        assert_eq!(
            to_chat("/v1/chat/completions", &request, &response),
            Some(json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]}))
        );
        let request = json!({"model": "gpt-4o", "instructions": "Be brief.", "input": "Hi"});
        let response = json!({"output": [{"type": "message", "content": [{"type": "output_text", "text": "Hello!"}]}]});
        assert_eq!(
            to_chat("/v1/responses", &request, &response),
            Some(json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}]}))
        );
        assert_eq!(to_chat("/v1/embeddings", &request, &response), None);
    }
}
