//! What a simulated call answers: for each choice (`n` of them), words,
//! JSON valid against the request's schema (`response_format`,
//! `text.format`), or calls of the request's functions (`tools`,
//! `tool_choice`, `parallel_tool_calls`), with arguments valid against each
//! function's parameters. Deterministic: the same request gets the same
//! answer. Its tokens are counted with the model's encoding, the counter
//! the gateway meters with.

use std::borrow::Cow;

use serde_json::{json, Value};

use super::{schema, WORDS};
use crate::tokens::request::Endpoint;
use crate::tokens::Encoding;

/// One choice of an answer.
#[derive(Clone, Debug, Default)]
pub struct Choice {
    /// The text, a token (or a few bytes of one) per element.
    pub pieces: Vec<Cow<'static, str>>,
    /// Function calls made instead of text.
    pub calls: Vec<ToolCall>,
    /// Output tokens.
    pub tokens: u64,
    /// Whether the output stopped at the request's cap.
    pub truncated: bool,
}

impl Choice {
    pub fn text(&self) -> String {
        self.pieces.concat()
    }
}

/// A function call: its arguments (JSON) in the pieces a stream sends.
#[derive(Clone, Debug)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub pieces: Vec<String>,
}

impl ToolCall {
    pub fn arguments(&self) -> String {
        self.pieces.concat()
    }
}

/// What the request asks the answer to be.
enum Shape {
    Words,
    /// JSON: against a schema, or any object (`json_object`).
    Json(Option<Value>),
    /// These functions' (name, parameters).
    Calls(Vec<(String, Value)>),
}

/// What the answer is made from.
pub struct Plan<'a> {
    pub endpoint: Endpoint,
    pub body: &'a Value,
    pub encoding: Encoding,
    /// Picks the words.
    pub seed: usize,
    /// Output tokens asked for (`x-sim-output-tokens` or the default).
    pub wanted: u64,
    /// The request's cap, or the model's largest output.
    pub cap: u64,
}

/// The answer's choices; `next_id` numbers the function calls.
pub fn choices(plan: &Plan<'_>, next_id: &dyn Fn() -> u64) -> Vec<Choice> {
    let n = match plan.endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions => plan
            .body
            .get("n")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .max(1),
        _ => 1,
    };
    let shape = shape(plan.endpoint, plan.body);
    (0..n as usize)
        .map(|i| {
            let seed = plan.seed + i * 5;
            match &shape {
                Shape::Words => words(plan, seed),
                Shape::Json(schema) => {
                    let value = match schema {
                        Some(s) => schema::instance(s, seed),
                        None => json!({"answer": words(plan, seed).text().trim()}),
                    };
                    let mut choice = Choice::default();
                    let (pieces, tokens, cut) = split(plan.encoding, &value.to_string(), plan.cap);
                    choice.pieces = pieces.into_iter().map(Cow::Owned).collect();
                    (choice.tokens, choice.truncated) = (tokens, cut);
                    choice
                }
                Shape::Calls(functions) => calls(plan, functions, seed, next_id),
            }
        })
        .collect()
}

fn words(plan: &Plan<'_>, seed: usize) -> Choice {
    let length = plan.wanted.min(plan.cap);
    Choice {
        pieces: (0..length as usize)
            .map(|i| Cow::Borrowed(WORDS[(seed + i) % WORDS.len()]))
            .collect(),
        calls: Vec::new(),
        tokens: length,
        truncated: plan.cap < plan.wanted,
    }
}

fn calls(
    plan: &Plan<'_>,
    functions: &[(String, Value)],
    seed: usize,
    next_id: &dyn Fn() -> u64,
) -> Choice {
    let mut choice = Choice::default();
    let mut left = plan.cap;
    for (j, (name, parameters)) in functions.iter().enumerate() {
        let arguments = schema::instance(parameters, seed + j).to_string();
        let name_tokens = plan.encoding.count(name);
        let (pieces, tokens, cut) =
            split(plan.encoding, &arguments, left.saturating_sub(name_tokens));
        choice.calls.push(ToolCall {
            id: format!("call_sim{:016x}", next_id()),
            name: name.clone(),
            pieces,
        });
        choice.tokens += name_tokens + tokens;
        left = left.saturating_sub(name_tokens + tokens);
        if cut {
            choice.truncated = true;
            break;
        }
    }
    choice
}

/// `text` as the pieces a stream sends (a token each, or the few tokens a
/// multi-byte character takes), at most `cap` tokens of it: the pieces,
/// their tokens, and whether it was cut.
fn split(encoding: Encoding, text: &str, cap: u64) -> (Vec<String>, u64, bool) {
    let ids = encoding.encode(text);
    let kept = ids.len().min(usize::try_from(cap).unwrap_or(usize::MAX));
    let mut pieces = Vec::with_capacity(kept);
    let mut pending: Vec<u32> = Vec::new();
    for id in &ids[..kept] {
        pending.push(*id);
        if let Some(piece) = encoding.decode(&pending) {
            pieces.push(piece);
            pending.clear();
        }
    }
    (pieces, kept as u64, kept < ids.len())
}

/// What the request asks for.
fn shape(endpoint: Endpoint, body: &Value) -> Shape {
    let functions = wanted_calls(endpoint, body);
    if !functions.is_empty() {
        return Shape::Calls(functions);
    }
    let format = match endpoint {
        Endpoint::ChatCompletions => body.get("response_format"),
        Endpoint::Responses => body.pointer("/text/format"),
        _ => None,
    };
    match format.and_then(|f| f.get("type")).and_then(Value::as_str) {
        Some("json_object") => Shape::Json(None),
        Some("json_schema") => {
            let schema = match endpoint {
                Endpoint::ChatCompletions => format.and_then(|f| f.pointer("/json_schema/schema")),
                _ => format.and_then(|f| f.get("schema")),
            };
            Shape::Json(Some(schema.cloned().unwrap_or_else(|| json!({}))))
        }
        _ => Shape::Words,
    }
}

/// The functions the answer calls: `tool_choice` named, `required` or
/// `auto` (unless the conversation ends with a function's result: then the
/// answer is text); those whose names the last user message says, else
/// the first; one unless `parallel_tool_calls` allows more.
fn wanted_calls(endpoint: Endpoint, body: &Value) -> Vec<(String, Value)> {
    let functions: Vec<(String, Value)> = body
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|t| t.get("type").and_then(Value::as_str) == Some("function"))
        .filter_map(|t| {
            // Chat nests the function; Responses does not.
            let f = t.get("function").unwrap_or(t);
            let name = f.get("name")?.as_str()?.to_owned();
            let parameters = f.get("parameters").cloned().unwrap_or_else(|| json!({}));
            Some((name, parameters))
        })
        .collect();
    if functions.is_empty() {
        return Vec::new();
    }
    let choice = body.get("tool_choice");
    if let Some(named) = choice.and_then(|c| {
        c.pointer("/function/name")
            .or_else(|| c.get("name"))
            .and_then(Value::as_str)
    }) {
        return functions
            .into_iter()
            .filter(|(n, _)| n == named)
            .take(1)
            .collect();
    }
    match choice.and_then(Value::as_str) {
        Some("none") => return Vec::new(),
        Some("required") => {}
        _ if answered(endpoint, body) => return Vec::new(),
        _ => {}
    }
    let said = last_user_text(endpoint, body);
    let parallel = body.get("parallel_tool_calls").and_then(Value::as_bool) != Some(false);
    let mut named: Vec<(String, Value)> = functions
        .iter()
        .filter(|(n, _)| said.contains(n.as_str()))
        .cloned()
        .collect();
    if named.is_empty() {
        named = functions.into_iter().take(1).collect();
    }
    named.truncate(if parallel { 8 } else { 1 });
    named
}

/// Whether the conversation ends with a function's result.
fn answered(endpoint: Endpoint, body: &Value) -> bool {
    let last = match endpoint {
        Endpoint::ChatCompletions => body.get("messages"),
        _ => body.get("input"),
    }
    .and_then(Value::as_array)
    .and_then(|items| items.last());
    last.is_some_and(|item| {
        item.get("role").and_then(Value::as_str) == Some("tool")
            || item.get("type").and_then(Value::as_str) == Some("function_call_output")
    })
}

/// The text of the last user message (or a Responses string input).
fn last_user_text(endpoint: Endpoint, body: &Value) -> String {
    let items = match endpoint {
        Endpoint::ChatCompletions => body.get("messages"),
        _ => body.get("input"),
    };
    if let Some(text) = items.and_then(Value::as_str) {
        return text.to_owned();
    }
    let last = items
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"));
    match last.and_then(|m| m.get("content")) {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}
