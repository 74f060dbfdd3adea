//! Reading a call's request and its whole answer: inline when small, on
//! the blocking pool when large, so that one large body never holds an
//! async worker other connections need.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::Value;

use super::privacy::apply_privacy_guard;
use crate::gateway::auth::Caller;
use crate::gateway::call::Outcome;
use crate::gateway::error::ApiError;
use crate::gateway::stream::{body_text, usage_of};
use crate::gateway::{scan, Gateway};
use crate::tokens::request::{count_request, parse_body, Endpoint, RequestCount};

/// What settling needs of a whole successful answer: its usage and model,
/// or (usage missing or absurd) its text for the estimate, counted here
/// when `count_in` gives the encoding; the whole answer when captured.
pub(super) fn read_answer(
    endpoint: Endpoint,
    body: &[u8],
    captures: bool,
    status: u16,
    count_in: Option<crate::tokens::Encoding>,
) -> Outcome {
    // Most answers carry their usage and are not captured: read only
    // `usage` and `model`, past the rest (see [`scan`]).
    let head = if captures {
        None
    } else {
        scan::members_of(body, endpoint)
    };
    if let Some(scan::Members {
        usage: Some(usage),
        model,
        ..
    }) = head.filter(|m| m.usage.is_some_and(|u| u.is_sane()))
    {
        return Outcome {
            usage: Some(usage),
            status,
            served_model: model,
            ..Outcome::default()
        };
    }
    let parsed: Value = serde_json::from_slice(body).unwrap_or_default();
    let usage = parsed.get("usage").and_then(|u| usage_of(endpoint, u));
    let output_text = if usage.is_none() {
        body_text(endpoint, &parsed)
    } else {
        String::new()
    };
    Outcome {
        usage,
        output_tokens: count_in.map(|encoding| encoding.count(&output_text)),
        output_text,
        status,
        served_model: parsed
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_owned),
        completion: captures.then_some(parsed),
        ..Outcome::default()
    }
}

/// A body up to this size is parsed, guarded and counted on the async
/// worker that read it (tens of microseconds); a larger one on the blocking
/// pool, so that one large body never holds a worker other connections
/// need (a megabyte takes milliseconds to count and scan).
pub(super) const INLINE_READ_BYTES: usize = 64 * 1024;

/// A request's body as the meter needs it.
pub(super) struct Read {
    pub(super) value: Value,
    /// The caller, rerouted to another project by the privacy guard maybe.
    pub(super) caller: Caller,
    /// The guard changed the body.
    pub(super) redacted: bool,
    pub(super) counted: RequestCount,
}

/// Parse the body, apply the privacy guard, count the prompt: inline for a
/// small body, on the blocking pool for a large one (at most
/// [`Gateway::off_workers`]).
pub(super) async fn read_request(
    gateway: &Arc<Gateway>,
    caller: Caller,
    private: bool,
    endpoint: Endpoint,
    bytes: Bytes,
) -> Result<Read, ApiError> {
    fn read(
        gateway: &Gateway,
        mut caller: Caller,
        private: bool,
        endpoint: Endpoint,
        bytes: &[u8],
    ) -> Result<Read, ApiError> {
        let mut value = parse_body(bytes)?;
        may_use_model(&caller, &value)?;
        let (redacted, project) = apply_privacy_guard(gateway, &caller, private, &mut value)?;
        caller.project = project;
        may_continue_stored(&caller, &value)?;
        let counted = count_request(&caller.live.config.catalog, Some(endpoint), &value, None)?;
        Ok(Read {
            value,
            caller,
            redacted,
            counted,
        })
    }
    if bytes.len() <= INLINE_READ_BYTES {
        return read(gateway, caller, private, endpoint, &bytes);
    }
    let shared = gateway.clone();
    gateway
        .off_workers(move || read(&shared, caller, private, endpoint, &bytes))
        .await
        .ok_or(ApiError::Internal)?
}

/// A call that continues what the upstream kept (`previous_response_id`, a
/// `conversation`) reads it under the upstream's key: only a project alone
/// on its upstream can be sure it is its own ([`Caller::alone_on_upstream`]).
fn may_continue_stored(caller: &Caller, body: &Value) -> Result<(), ApiError> {
    let Some(param) = ["previous_response_id", "conversation"]
        .into_iter()
        .find(|k| body.get(*k).is_some_and(|v| !v.is_null()))
    else {
        return Ok(());
    };
    if caller.alone_on_upstream() {
        return Ok(());
    }
    Err(ApiError::InvalidRequest {
        message: format!(
            "'{param}' is not available here: this project shares its upstream with other projects, so what the upstream keeps cannot be told apart from theirs. Send the conversation in 'input' instead."
        ),
        param: Some(param.to_owned()),
        code: Some("stored_state_not_available"),
    })
}

/// A project with a `models` list may call only those: any other model is
/// OpenAI's 403 for a project without access to it.
fn may_use_model(caller: &Caller, body: &Value) -> Result<(), ApiError> {
    let Some((_, project)) = caller.org_project() else {
        return Err(ApiError::Internal);
    };
    match body.get("model").and_then(Value::as_str) {
        Some(model) if !project.allows(model) => Err(ApiError::NoModelAccess {
            project: project.id.to_string(),
            model: crate::excerpt(model, 256),
        }),
        _ => Ok(()),
    }
}
