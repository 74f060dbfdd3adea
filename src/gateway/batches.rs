//! `/v1/batches`: OpenAI's Batch API, run by tokenwarden on its own metered
//! road ([`run`]), paced into the free allowance.
//!
//! A batch belongs to its project (another project's is a 404). Creating
//! one validates its input file a part at a time ([`validate`]): a bad file
//! fails the batch with OpenAI's `errors`, a good one is `in_progress` and
//! its lines wait in the ledger for the runner.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::auth::Caller;
use super::error::ApiError;
use super::Gateway;
use crate::store::{BatchRow, FileMeta};

pub mod run;
mod validate;

/// OpenAI's batch object.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    pub object: String,
    pub endpoint: String,
    pub errors: Option<Value>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: String,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: Counts,
    pub metadata: Option<Value>,
    pub usage: Usage,
    pub model: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Counts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub input_tokens_details: Value,
    pub output_tokens: u64,
    pub output_tokens_details: Value,
    pub total_tokens: u64,
}

impl Batch {
    /// The ledger's row of this batch.
    pub fn row(&self, org: &str, project: &str) -> BatchRow {
        BatchRow {
            org: org.to_owned(),
            id: self.id.clone(),
            project: project.to_owned(),
            created_at: self.created_at,
            status: self.status.clone(),
            object: serde_json::to_string(self).unwrap_or_default(),
        }
    }

    pub fn from_row(row: &BatchRow) -> Option<Batch> {
        serde_json::from_str(&row.object).ok()
    }
}

/// A completion window: OpenAI's `24h`, or longer for free-only work
/// (`48h`, `7d`, at most `30d`); its seconds.
fn window_seconds(window: &str) -> Option<i64> {
    let (n, unit) = window.split_at(window.len().checked_sub(1)?);
    let n: i64 = n.parse().ok()?;
    let seconds = match unit {
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    (86_400..=30 * 86_400).contains(&seconds).then_some(seconds)
}

fn bad(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param.to_owned()),
        code: Some("invalid_value"),
    }
}

fn no_batch(id: &str) -> ApiError {
    ApiError::NoSuchObject(format!("No such Batch object: {}", crate::excerpt(id, 64)))
}

/// The caller's batch `id`, or the 404 of a batch that is nowhere.
async fn find(gateway: &Gateway, caller: &Caller, id: &str) -> Result<Batch, ApiError> {
    let (org, project) = caller.owner()?;
    gateway
        .store
        .batches(Some(org), Some(project))
        .await
        .map_err(ApiError::store)?
        .iter()
        .find(|b| b.id == id)
        .and_then(Batch::from_row)
        .ok_or_else(|| no_batch(id))
}

/// `POST /v1/batches` `{input_file_id, endpoint, completion_window, metadata}`.
pub async fn create(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    request: axum::extract::Request,
) -> Response {
    match create_batch(&gateway, &caller, request).await {
        Ok(batch) => Json(batch).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn create_batch(
    gateway: &Arc<Gateway>,
    caller: &Caller,
    request: axum::extract::Request,
) -> Result<Batch, ApiError> {
    let bytes = super::routes::read_body(request.into_body(), 64 * 1024).await?;
    let body: serde_json::Map<String, Value> = serde_json::from_slice(&bytes)
        .map_err(|_| bad("The body must be a JSON object.", "body"))?;
    if let Some(k) = body.keys().find(|k| {
        !["input_file_id", "endpoint", "completion_window", "metadata"].contains(&k.as_str())
    }) {
        return Err(bad(
            format!(
                "Unrecognized request argument supplied: {}",
                crate::excerpt(k, 64)
            ),
            k,
        ));
    }
    let text = |name: &str| {
        body.get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ApiError::InvalidRequest {
                message: format!("Missing required parameter: '{name}'."),
                param: Some(name.to_owned()),
                code: Some("missing_required_parameter"),
            })
    };
    let order = Order {
        endpoint: text("endpoint")?,
        completion_window: text("completion_window")?,
        metadata: body.get("metadata").cloned().filter(|m| !m.is_null()),
    };
    let file_id = text("input_file_id")?;
    let file = super::files::find(gateway, caller, &file_id).await?;
    if file.purpose != "batch" {
        return Err(bad(
            format!(
                "The input file must have purpose batch, not {}.",
                file.purpose
            ),
            "input_file_id",
        ));
    }
    start(gateway, caller, &file, order).await
}

/// What a batch is asked to do with its input file.
pub struct Order {
    pub endpoint: String,
    pub completion_window: String,
    pub metadata: Option<Value>,
}

/// Check `order`, validate `file`'s lines and start the batch (or keep it
/// `failed`, with the lines' errors).
pub async fn start(
    gateway: &Gateway,
    caller: &Caller,
    file: &FileMeta,
    order: Order,
) -> Result<Batch, ApiError> {
    let Order {
        endpoint,
        completion_window: window,
        metadata,
    } = order;
    let Some(endpoint_kind) = super::routes::metered_endpoint(&endpoint) else {
        return Err(bad(
            "'endpoint' must be /v1/chat/completions, /v1/responses, /v1/completions or /v1/embeddings.",
            "endpoint",
        ));
    };
    let (_, project) = caller.org_project().ok_or(ApiError::Internal)?;
    let seconds = window_seconds(&window).ok_or_else(|| {
        bad(
            "'completion_window' must be 24h, or up to 30d (48h, 7d, ...).",
            "completion_window",
        )
    })?;
    if seconds > 86_400 && project.batch_spend != crate::config::BatchSpend::Free {
        return Err(bad(
            "A completion window past 24h is for free-only work (batch_spend = \"free\").",
            "completion_window",
        ));
    }
    check_metadata(metadata.as_ref())?;
    let (org, project_id) = caller.owner()?;
    let now_s = gateway.clock.now_ms().div_euclid(1000);
    let mut batch = Batch {
        id: format!("batch_{}", &super::auth::new_key("")[..24]),
        object: "batch".into(),
        endpoint,
        input_file_id: file.id.clone(),
        completion_window: window,
        status: "validating".into(),
        created_at: now_s,
        metadata,
        usage: Usage {
            input_tokens_details: json!({"cached_tokens": 0}),
            output_tokens_details: json!({"reasoning_tokens": 0}),
            ..Usage::default()
        },
        ..Batch::default()
    };
    gateway
        .store
        .batch_save(batch.row(&org, &project_id))
        .await
        .map_err(ApiError::store)?;
    match validate::lines(gateway, file, &batch.id, endpoint_kind).await {
        Ok((total, model)) => {
            batch.model = model;
            batch.status = "in_progress".into();
            batch.in_progress_at = Some(now_s);
            batch.expires_at = Some(now_s + seconds);
            batch.request_counts.total = total;
        }
        Err(validate::Invalid::Lines(errors)) => {
            batch.status = "failed".into();
            batch.failed_at = Some(now_s);
            batch.errors = Some(json!({"object": "list", "data": errors}));
        }
        Err(validate::Invalid::Store(e)) => return Err(ApiError::store(e)),
    }
    gateway
        .store
        .batch_save(batch.row(&org, &project_id))
        .await
        .map_err(ApiError::store)?;
    gateway.batches.notify_one();
    Ok(batch)
}

/// OpenAI's limits: at most 16 keys, each at most 64 characters, each value
/// a string of at most 512.
fn check_metadata(metadata: Option<&Value>) -> Result<(), ApiError> {
    let Some(m) = metadata else { return Ok(()) };
    let ok = m.as_object().is_some_and(|m| {
        m.len() <= 16
            && m.iter().all(|(k, v)| {
                k.chars().count() <= 64 && v.as_str().is_some_and(|v| v.chars().count() <= 512)
            })
    });
    if ok {
        Ok(())
    } else {
        Err(bad(
            "'metadata' is an object of at most 16 string values (keys at most 64 characters, values at most 512).",
            "metadata",
        ))
    }
}

/// `GET /v1/batches/{id}`.
pub async fn retrieve(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Batch>, ApiError> {
    find(&gateway, &caller, &id).await.map(Json)
}

/// `POST /v1/batches/{id}/cancel`: `cancelling` until the lines running
/// end; lines not yet run are not run.
pub async fn cancel(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Batch>, ApiError> {
    let mut batch = find(&gateway, &caller, &id).await?;
    if matches!(batch.status.as_str(), "validating" | "in_progress") {
        batch.status = "cancelling".into();
        batch.cancelling_at = Some(gateway.clock.now_ms().div_euclid(1000));
        let (org, project) = caller.owner()?;
        gateway
            .store
            .batch_save(batch.row(&org, &project))
            .await
            .map_err(ApiError::store)?;
        gateway.batches.notify_one();
    }
    Ok(Json(batch))
}

/// `GET /v1/batches?after=&limit=`: newest first.
pub async fn list(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let (org, project) = caller.owner()?;
    let mut batches: Vec<Batch> = gateway
        .store
        .batches(Some(org), Some(project))
        .await
        .map_err(ApiError::store)?
        .iter()
        .filter_map(Batch::from_row)
        .collect();
    batches.reverse();
    let (mut after, mut limit) = (None, 20usize);
    for pair in raw
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "after" => after = Some(super::usage::decode(v)),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| bad("'limit' must be an integer from 1 to 100.", "limit"))?
            }
            _ => {}
        }
    }
    let start = after
        .and_then(|id| batches.iter().position(|b| b.id == id).map(|p| p + 1))
        .unwrap_or(0);
    let page: Vec<&Batch> = batches.iter().skip(start).take(limit).collect();
    Ok(Json(json!({
        "object": "list",
        "data": page,
        "first_id": page.first().map(|b| &b.id),
        "last_id": page.last().map(|b| &b.id),
        "has_more": start + page.len() < batches.len(),
    })))
}
