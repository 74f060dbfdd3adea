//! The organization's settings, projects and keys at runtime, in OpenAI's
//! Admin API shape, so that OpenAI's admin SDK calls and the scripts teams
//! have work unchanged: `/v1/organization/data_sharing`, `/projects` (with
//! their `api_keys`, `service_accounts` and `model_permissions`) and
//! `/admin_api_keys`.
//!
//! Every route is behind an admin credential ([`super::auth::require_admin`]).
//! The org is the org admin key's own; the platform's admin token names one
//! with `OpenAI-Organization` (the header OpenAI's SDKs send for their
//! `organization` option), which it may leave out when there is one org.
//! A change is checked, kept in the ledger with who made it and when, and
//! applies from the next call ([`crate::changes`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};

use super::auth::{Actor, Admin};
use super::error::ApiError;
use super::{ChangeError, Gateway};
use crate::changes::Change;
use crate::config::{Org, OrgSharing};

mod keys;
mod projects;

/// An admin request's body: JSON, at most this large.
const MAX_BODY: usize = 64 * 1024;

/// The admin routes of this module (the caller adds the credential layer).
pub fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route(
            "/v1/organization/data_sharing",
            get(data_sharing).post(set_data_sharing),
        )
        .merge(projects::routes())
        .merge(keys::routes())
}

/// The org an admin request is about: the org admin key's own, or the one
/// `OpenAI-Organization` names for the platform's token.
pub(super) struct Target {
    pub(super) live: Arc<super::Live>,
    pub(super) org: usize,
    pub(super) admin: Admin,
    pub(super) actor: Actor,
}

impl Target {
    pub(super) fn org(&self) -> &Org {
        &self.live.config.orgs[self.org]
    }

    /// The same org in the configuration running now (after a change).
    pub(super) fn again(&self, gateway: &Gateway) -> Target {
        Target {
            live: gateway.live(),
            org: self.org,
            admin: self.admin.clone(),
            actor: self.actor.clone(),
        }
    }
}

impl axum::extract::FromRequestParts<Arc<Gateway>> for Target {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        gateway: &Arc<Gateway>,
    ) -> Result<Self, Self::Rejection> {
        let admin = parts.extensions.get::<Admin>().cloned();
        let actor = parts.extensions.get::<Actor>().cloned();
        match (admin, actor) {
            (Some(admin), Some(actor)) => target(gateway, admin, actor, &parts.headers),
            // The routes are behind `require_admin`, which puts both there.
            _ => Err(ApiError::Internal),
        }
    }
}

/// An admin request's JSON object body (an empty body is `{}`), read
/// within [`MAX_BODY`].
pub(super) struct Body(pub(super) serde_json::Map<String, Value>);

impl axum::extract::FromRequest<Arc<Gateway>> for Body {
    type Rejection = ApiError;

    async fn from_request(
        request: axum::extract::Request,
        _: &Arc<Gateway>,
    ) -> Result<Self, Self::Rejection> {
        body(&read(request.into_body()).await?).map(Body)
    }
}

/// OpenAI's 400 for a required parameter left out.
pub(super) fn missing(name: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: format!("Missing required parameter: '{name}'."),
        param: Some(name.to_owned()),
        code: Some("missing_required_parameter"),
    }
}

fn target(
    gateway: &Gateway,
    admin: Admin,
    actor: Actor,
    headers: &HeaderMap,
) -> Result<Target, ApiError> {
    let live = gateway.live();
    let named = headers
        .get("openai-organization")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let orgs: Vec<usize> = (0..live.config.orgs.len())
        .filter(|&o| !live.config.orgs[o].retired)
        .collect();
    let find = |name: &str| {
        orgs.iter()
            .copied()
            .find(|&o| *live.config.orgs[o].name == *name)
    };
    let org = match (&admin, named) {
        (Admin::Org(own), Some(name)) if **own != *name => {
            return Err(ApiError::PermissionDenied(
                "This admin key belongs to another organization.".into(),
            ))
        }
        (Admin::Org(own), _) => find(own),
        (Admin::Platform, Some(name)) => find(name),
        (Admin::Platform, None) if orgs.len() == 1 => orgs.first().copied(),
        (Admin::Platform, None) => {
            return Err(ApiError::InvalidRequest {
                message: "This gateway has several organizations: name one with the OpenAI-Organization header.".into(),
                param: None,
                code: Some("missing_organization"),
            })
        }
    };
    let org = org.ok_or_else(|| ApiError::NoSuchObject("No such organization.".into()))?;
    Ok(Target {
        live,
        org,
        admin,
        actor,
    })
}

/// Parse an admin request's JSON body (an empty one is `{}`).
fn body(bytes: &Bytes) -> Result<serde_json::Map<String, Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(ApiError::InvalidRequest {
            message: "The body must be a JSON object.".into(),
            param: None,
            code: None,
        }),
    }
}

/// The body's fields other than `allowed`: each is an error.
pub(super) fn only(
    body: &serde_json::Map<String, Value>,
    allowed: &[&str],
) -> Result<(), ApiError> {
    match body.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(ApiError::InvalidRequest {
            message: format!(
                "Unrecognized request argument supplied: {}",
                crate::excerpt(k, 64)
            ),
            param: Some(crate::excerpt(k, 64)),
            code: None,
        }),
        None => Ok(()),
    }
}

/// A field of `body` as `T`, if present (a wrong type is an error naming it).
pub(super) fn field<T: serde::de::DeserializeOwned>(
    body: &serde_json::Map<String, Value>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| ApiError::InvalidRequest {
                    message: format!("Invalid value for '{name}': {e}"),
                    param: Some(name.to_owned()),
                    code: Some("invalid_value"),
                })
        }
    }
}

/// Make a change for `target`'s org; its errors as the API's.
pub(super) async fn change(
    gateway: &Gateway,
    target: &Target,
    change: Change,
) -> Result<crate::changes::Recorded, ApiError> {
    let org = target.org().name.clone();
    gateway
        .change(&org, &target.actor.0, change)
        .await
        .map_err(|e| match e {
            ChangeError::Invalid(message) => ApiError::InvalidRequest {
                message,
                param: None,
                code: None,
            },
            ChangeError::Store(e) => {
                tracing::error!(error = %e, "could not keep a change");
                ApiError::StoreUnavailable
            }
        })
}

/// The request's body, read within the admin limit.
async fn read(body: axum::body::Body) -> Result<Bytes, ApiError> {
    super::routes::read_body(body, MAX_BODY).await
}

fn sharing_name(sharing: OrgSharing) -> &'static str {
    match sharing {
        OrgSharing::Disabled => "disabled",
        OrgSharing::All => "all",
        OrgSharing::Selected => "selected",
    }
}

/// The org's data-sharing setting, and how it changed.
async fn sharing_object(gateway: &Gateway, org: &Org) -> Value {
    let selected: Vec<&str> = if org.sharing == OrgSharing::Selected {
        org.projects
            .iter()
            .filter(|p| p.active() && p.selected)
            .map(|p| &*p.id)
            .collect()
    } else {
        Vec::new()
    };
    let history: Vec<Value> = gateway
        .changes_of(Some(&org.name))
        .await
        .into_iter()
        .filter_map(|c| match c.change {
            Change::DataSharing {
                sharing,
                project_ids,
            } => Some(json!({
                "changed_at": c.at_ms.div_euclid(1000),
                "changed_by": c.actor,
                "sharing": sharing_name(sharing),
                "project_ids": project_ids,
            })),
            _ => None,
        })
        .collect();
    json!({
        "object": "organization.data_sharing",
        "organization": &*org.name,
        "sharing": sharing_name(org.sharing),
        "project_ids": selected,
        "eligible": org.eligible,
        "history": history,
    })
}

/// `GET /v1/organization/data_sharing`.
async fn data_sharing(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(sharing_object(&gateway, target.org()).await))
}

/// `POST /v1/organization/data_sharing` `{"sharing": "disabled" | "all" |
/// "selected", "project_ids": [...]}`: from the next call.
async fn set_data_sharing(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    only(&body, &["sharing", "project_ids"])?;
    let sharing: OrgSharing = field(&body, "sharing")?.ok_or_else(|| missing("sharing"))?;
    let project_ids: Vec<String> = field(&body, "project_ids")?.unwrap_or_default();
    if sharing != OrgSharing::Selected && !project_ids.is_empty() {
        return Err(ApiError::InvalidRequest {
            message: "'project_ids' goes with \"sharing\": \"selected\" only.".into(),
            param: Some("project_ids".into()),
            code: Some("invalid_value"),
        });
    }
    change(
        &gateway,
        &target,
        Change::DataSharing {
            sharing,
            project_ids,
        },
    )
    .await?;
    let after = target.again(&gateway);
    Ok(Json(sharing_object(&gateway, after.org()).await))
}

/// A page of `items` after the one whose id is `after`, OpenAI's list shape.
pub(super) fn list(items: Vec<(String, Value)>, raw: Option<&str>) -> Result<Value, ApiError> {
    let mut after = None;
    let mut limit = 20usize;
    for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "after" => after = Some(super::usage::decode(v)),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=100).contains(n))
                    .ok_or_else(|| ApiError::InvalidRequest {
                        message: "'limit' must be an integer from 1 to 100.".into(),
                        param: Some("limit".into()),
                        code: Some("invalid_value"),
                    })?
            }
            _ => {}
        }
    }
    let start = match &after {
        Some(id) => items
            .iter()
            .position(|(i, _)| i == id)
            .map_or(items.len(), |p| p + 1),
        None => 0,
    };
    let page: Vec<&(String, Value)> = items.iter().skip(start).take(limit).collect();
    let has_more = start + page.len() < items.len();
    Ok(json!({
        "object": "list",
        "data": page.iter().map(|(_, v)| v).collect::<Vec<_>>(),
        "first_id": page.first().map(|(id, _)| id),
        "last_id": page.last().map(|(id, _)| id),
        "has_more": has_more,
    }))
}
