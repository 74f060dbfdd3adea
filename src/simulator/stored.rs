//! What the simulator keeps of its answers, as OpenAI keeps them: responses
//! (`store`, true by default) with their input items, and chat completions
//! made with `store: true`; each visible only to the API key that made it
//! (OpenAI scopes them to a project). The routes of the SDKs' `responses`
//! resource (retrieve, delete, cancel, input items, compact, input tokens)
//! and of stored chat completions (list, retrieve, update, delete,
//! messages) read them. At most [`MAX_KEPT`] of each kind; the oldest go
//! first.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{bearer, Simulator};
use crate::gateway::error::ApiError;

/// Objects of each kind kept at most.
pub const MAX_KEPT: usize = 10_000;

/// One kept object: whose it is, the object, what it was asked.
#[derive(Clone)]
struct Kept {
    key: String,
    object: Value,
    /// A response's input items, a chat completion's messages (each with an id).
    items: Vec<Value>,
}

#[derive(Default)]
pub struct Stored {
    responses: VecDeque<Kept>,
    completions: VecDeque<Kept>,
}

fn find<'a>(kept: &'a VecDeque<Kept>, key: &str, id: &str) -> Option<&'a Kept> {
    kept.iter().find(|k| k.key == key && k.object["id"] == id)
}

fn push(kept: &mut VecDeque<Kept>, item: Kept) {
    if kept.len() >= MAX_KEPT {
        kept.pop_front();
    }
    kept.push_back(item);
}

/// A request's input as items, each with an id (`msg_…`, or its own).
pub fn input_items(input: Option<&Value>, id: &str) -> Vec<Value> {
    let items = match input {
        Some(Value::String(text)) => vec![json!({"type": "message", "role": "user",
            "content": [{"type": "input_text", "text": text}]})],
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, mut item)| {
            if item.get("type").is_none() && item.get("role").is_some() {
                item["type"] = json!("message");
            }
            if let Some(Value::String(text)) = item.get("content").cloned() {
                let kind = if item["role"] == "assistant" {
                    "output_text"
                } else {
                    "input_text"
                };
                item["content"] = json!([{"type": kind, "text": text}]);
            }
            if item.get("id").is_none() {
                item["id"] = json!(format!("msg_{}_{i}", id.trim_start_matches("resp_")));
            }
            if item["type"] == "message" && item.get("status").is_none() {
                item["status"] = json!("completed");
            }
            item
        })
        .collect()
}

impl Simulator {
    /// Keep a response `key` made (unless it asked for `store: false`).
    pub(super) fn keep_response(
        &self,
        key: &str,
        request: &Value,
        response: impl FnOnce() -> Value,
    ) {
        if request.get("store").and_then(Value::as_bool) == Some(false) {
            return;
        }
        let object = response();
        let items = input_items(
            request.get("input"),
            object["id"].as_str().unwrap_or_default(),
        );
        if let Ok(mut stored) = self.stored.lock() {
            push(
                &mut stored.responses,
                Kept {
                    key: key.to_owned(),
                    object,
                    items,
                },
            );
        }
    }

    /// Keep a chat completion `key` made with `store: true`.
    pub(super) fn keep_completion(
        &self,
        key: &str,
        request: &Value,
        completion: impl FnOnce() -> Value,
    ) {
        if request.get("store").and_then(Value::as_bool) != Some(true) {
            return;
        }
        let mut object = completion();
        let id = object["id"].as_str().unwrap_or_default().to_owned();
        object["metadata"] = request.get("metadata").cloned().unwrap_or(json!({}));
        let items = request
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .map(|(i, m)| {
                let mut m = m.clone();
                m["id"] = json!(format!("{id}-{i}"));
                m
            })
            .collect();
        if let Ok(mut stored) = self.stored.lock() {
            push(
                &mut stored.completions,
                Kept {
                    key: key.to_owned(),
                    object,
                    items,
                },
            );
        }
    }

    /// The kept response `id` of `key`: its usage's input and output tokens
    /// (what a call continuing it is billed again as input).
    pub(super) fn previous_tokens(&self, key: &str, id: &str) -> Option<u64> {
        let stored = self.stored.lock().ok()?;
        let kept = find(&stored.responses, key, id)?;
        let usage = &kept.object["usage"];
        Some(
            usage["input_tokens"].as_u64().unwrap_or(0)
                + usage["output_tokens"].as_u64().unwrap_or(0),
        )
    }
}

/// The two kinds of kept object.
#[derive(Clone, Copy)]
pub enum Kind {
    Response,
    Completion,
}

impl Kind {
    fn kept(self, stored: &mut Stored) -> &mut VecDeque<Kept> {
        match self {
            Kind::Response => &mut stored.responses,
            Kind::Completion => &mut stored.completions,
        }
    }

    /// OpenAI's 404 for an id of this kind that is nowhere (or another key's).
    fn missing(self, id: &str) -> ApiError {
        let what = match self {
            Kind::Response => "response",
            Kind::Completion => "chat completion",
        };
        ApiError::NoSuchObject(format!(
            "No {what} found with id '{}'.",
            crate::excerpt(id, 64)
        ))
    }

    /// What a deletion answers.
    fn deleted(self, id: &str) -> Value {
        match self {
            Kind::Response => json!({"id": id, "object": "response", "deleted": true}),
            Kind::Completion => {
                json!({"object": "chat.completion.deleted", "id": id, "deleted": true})
            }
        }
    }
}

/// The key's object `id` of `kind`.
fn object(sim: &Simulator, kind: Kind, key: &str, id: &str) -> Result<Kept, ApiError> {
    let mut stored = lock(sim)?;
    find(kind.kept(&mut stored), key, id)
        .cloned()
        .ok_or_else(|| kind.missing(id))
}

/// `limit` (1-100, default 20), `order` (`asc`, `desc`: the default) and
/// `after` over `items`: OpenAI's list page.
fn page(
    items: Vec<Value>,
    query: &std::collections::HashMap<String, String>,
    default_asc: bool,
) -> Value {
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(20)
        .clamp(1, 100);
    let asc = query.get("order").map_or(default_asc, |o| o == "asc");
    let mut items = items;
    if !asc {
        items.reverse();
    }
    let start = query
        .get("after")
        .and_then(|after| items.iter().position(|i| i["id"] == after.as_str()))
        .map_or(0, |p| p + 1);
    let data: Vec<Value> = items.iter().skip(start).take(limit).cloned().collect();
    let has_more = items.len() > start + data.len();
    json!({
        "object": "list",
        "data": data,
        "first_id": data.first().map(|d| d["id"].clone()).unwrap_or(Value::Null),
        "last_id": data.last().map(|d| d["id"].clone()).unwrap_or(Value::Null),
        "has_more": has_more,
    })
}

type Q = Query<std::collections::HashMap<String, String>>;

fn with_key(headers: &HeaderMap, f: impl FnOnce(String) -> Result<Value, ApiError>) -> Response {
    match bearer(headers).and_then(f) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

fn lock(sim: &Simulator) -> Result<std::sync::MutexGuard<'_, Stored>, ApiError> {
    sim.stored.lock().map_err(|_| ApiError::Internal)
}

/// `GET /v1/responses/{id}`, `GET /v1/chat/completions/{id}`.
pub async fn get(
    kind: Kind,
    State(sim): State<Arc<Simulator>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    with_key(&headers, |key| Ok(object(&sim, kind, &key, &id)?.object))
}

/// `DELETE /v1/responses/{id}`, `DELETE /v1/chat/completions/{id}`.
pub async fn delete(
    kind: Kind,
    State(sim): State<Arc<Simulator>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    with_key(&headers, |key| {
        let mut stored = lock(&sim)?;
        let kept = kind.kept(&mut stored);
        let before = kept.len();
        kept.retain(|k| !(k.key == key && k.object["id"] == id.as_str()));
        if kept.len() == before {
            return Err(kind.missing(&id));
        }
        Ok(kind.deleted(&id))
    })
}

/// `POST /v1/responses/{id}/cancel`: only a response made with
/// `background: true` (the simulator's have finished: they stay as they are).
pub async fn cancel_response(
    State(sim): State<Arc<Simulator>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    with_key(&headers, |key| {
        let kept = object(&sim, Kind::Response, &key, &id)?;
        if kept.object["background"] != true {
            return Err(ApiError::InvalidRequest {
                message: "Only responses created with background=true can be cancelled.".into(),
                param: None,
                code: None,
            });
        }
        Ok(kept.object)
    })
}

/// `GET /v1/responses/{id}/input_items` (newest first by default),
/// `GET /v1/chat/completions/{id}/messages` (oldest first).
pub async fn items(
    kind: Kind,
    State(sim): State<Arc<Simulator>>,
    Path(id): Path<String>,
    Query(query): Q,
    headers: HeaderMap,
) -> Response {
    with_key(&headers, |key| {
        let kept = object(&sim, kind, &key, &id)?;
        Ok(page(kept.items, &query, matches!(kind, Kind::Completion)))
    })
}

/// `GET /v1/chat/completions`: the key's stored completions, `model` and
/// `metadata[k]=v` filters, oldest first by default (OpenAI's `asc`).
pub async fn list_completions(
    State(sim): State<Arc<Simulator>>,
    Query(query): Q,
    headers: HeaderMap,
) -> Response {
    with_key(&headers, |key| {
        let stored = lock(&sim)?;
        let items: Vec<Value> = stored
            .completions
            .iter()
            .filter(|k| k.key == key)
            .filter(|k| {
                query
                    .get("model")
                    .is_none_or(|m| k.object["model"] == m.as_str())
            })
            .filter(|k| {
                query.iter().all(|(q, v)| {
                    match q
                        .strip_prefix("metadata[")
                        .and_then(|q| q.strip_suffix(']'))
                    {
                        Some(name) => k.object["metadata"][name] == v.as_str(),
                        None => true,
                    }
                })
            })
            .map(|k| k.object.clone())
            .collect();
        Ok(page(items, &query, true))
    })
}

/// `POST /v1/chat/completions/{id}` `{metadata}`: only the metadata changes.
pub async fn update_completion(
    State(sim): State<Arc<Simulator>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    with_key(&headers, |key| {
        let body: Value = serde_json::from_slice(&body).map_err(|_| ApiError::InvalidRequest {
            message: "The body must be a JSON object.".into(),
            param: None,
            code: None,
        })?;
        let metadata = body.get("metadata").cloned().unwrap_or(Value::Null);
        let mut stored = lock(&sim)?;
        let kept = stored
            .completions
            .iter_mut()
            .find(|k| k.key == key && k.object["id"] == id.as_str())
            .ok_or_else(|| Kind::Completion.missing(&id))?;
        kept.object["metadata"] = if metadata.is_null() {
            json!({})
        } else {
            metadata
        };
        Ok(kept.object.clone())
    })
}
