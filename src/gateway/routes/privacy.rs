//! The privacy guard's step on a metered call's road: before anything is
//! counted or sent.

use serde_json::Value;

use crate::config::Guard;
use crate::gateway::auth::Caller;
use crate::gateway::error::ApiError;
use crate::gateway::Gateway;
use crate::guard;

/// Call `f` on every string of a body's content: messages, input, prompt,
/// instructions (not roles, types, ids, model names or image data).
fn visit_content(body: &mut Value, f: &mut impl FnMut(&mut String)) {
    fn walk(value: &mut Value, f: &mut impl FnMut(&mut String)) {
        match value {
            Value::String(text) => f(text),
            Value::Array(items) => items.iter_mut().for_each(|v| walk(v, f)),
            Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    let skip = matches!(
                        key.as_str(),
                        "role"
                            | "type"
                            | "id"
                            | "call_id"
                            | "model"
                            | "detail"
                            | "image_url"
                            | "file_data"
                            | "file_id"
                    );
                    if !skip {
                        walk(v, f);
                    }
                }
            }
            _ => {}
        }
    }
    if let Value::Object(map) = body {
        for key in ["messages", "input", "prompt", "instructions", "suffix"] {
            if let Some(v) = map.get_mut(key) {
                walk(v, f);
            }
        }
    }
}

/// The privacy guard, before anything is counted or sent. A call marked
/// `x-tokenwarden-private: true` goes to the project's `reroute_to`; a
/// sharing project's call with findings is blocked, rerouted or redacted as
/// the project says. Only the kinds found are ever logged or returned.
/// Returns whether the body was changed, and the project the call goes to.
pub(super) fn apply_privacy_guard(
    gateway: &Gateway,
    caller: &Caller,
    private: bool,
    body: &mut Value,
) -> Result<(bool, usize), ApiError> {
    let (org, project) = caller.org_project().ok_or(ApiError::Internal)?;
    let unchanged = Ok((false, caller.project));
    if private {
        return match project.reroute_to {
            Some(target) => Ok((false, target)),
            None if !project.shares => unchanged,
            None => Err(ApiError::InvalidRequest {
                message: format!("x-tokenwarden-private: project {} shares its traffic and has no reroute_to project.", project.name),
                param: None,
                code: Some("no_private_route"),
            }),
        };
    }
    if !project.shares || project.privacy_guard == Guard::Off {
        return unchanged;
    }
    let mut kinds: Vec<guard::Kind> = Vec::new();
    visit_content(body, &mut |text| {
        for finding in guard::scan(text) {
            if !kinds.contains(&finding.kind) {
                kinds.push(finding.kind);
            }
        }
    });
    if kinds.is_empty() {
        return unchanged;
    }
    kinds.sort();
    let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
    tracing::info!(org = %org.name, project = %project.name, kinds = ?names, action = ?project.privacy_guard, "privacy guard findings");
    let action = match project.privacy_guard {
        Guard::Off => "off",
        Guard::Block => "block",
        Guard::Reroute => "reroute",
        Guard::Redact => "redact",
    };
    gateway
        .metrics
        .findings(caller.org, caller.project, &names, action);
    match project.privacy_guard {
        Guard::Off => unchanged,
        Guard::Block => Err(ApiError::InvalidRequest {
            message: format!(
                "This call would share data that must not be shared ({}). Remove it, or send the call with x-tokenwarden-private: true.",
                names.join(", ")
            ),
            param: None,
            code: Some("sensitive_data_detected"),
        }),
        Guard::Reroute => Ok((false, project.reroute_to.ok_or(ApiError::Internal)?)),
        Guard::Redact => {
            visit_content(body, &mut |text| {
                let (redacted, _) = guard::redact(text);
                *text = redacted;
            });
            Ok((true, caller.project))
        }
    }
}
