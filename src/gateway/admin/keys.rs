//! Keys at runtime: a project's `api_keys` and `service_accounts` (a
//! service account is made with a key, returned once), and the org's
//! `admin_api_keys` (made and deleted with the platform's admin token).
//! A key's value is shown once, when it is made; only its hash is kept.
//! OpenAI's `last_used_at` is `null`: tokenwarden does not track it yet.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::projects::project;
use super::{change, field, list, missing, only, Body, Target};
use crate::changes::{configured_ids, Change};
use crate::config::{Project, RuntimeKey};
use crate::gateway::auth::{make_key, Admin};
use crate::gateway::error::ApiError;
use crate::gateway::Gateway;

pub(super) fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route(
            "/v1/organization/projects/{project_id}/api_keys",
            get(list_keys),
        )
        .route(
            "/v1/organization/projects/{project_id}/api_keys/{key_id}",
            get(retrieve_key).delete(delete_key),
        )
        .route(
            "/v1/organization/projects/{project_id}/service_accounts",
            get(list_accounts).post(create_account),
        )
        .route(
            "/v1/organization/projects/{project_id}/service_accounts/{account_id}",
            get(retrieve_account).delete(delete_account),
        )
        .route(
            "/v1/organization/admin_api_keys",
            get(list_admin_keys).post(create_admin_key),
        )
        .route(
            "/v1/organization/admin_api_keys/{key_id}",
            get(retrieve_admin_key).delete(delete_admin_key),
        )
}

/// Every key of a project, as `(id, object)`: configured ones, then those
/// made through the API.
fn project_keys(p: &Project) -> Vec<(String, Value)> {
    let configured = configured_ids(&p.keys)
        .filter(|id| !p.deleted_keys.iter().any(|d| **d == **id))
        .map(|id| {
            let object = json!({
                "object": "organization.project.api_key",
                "id": id,
                "name": "configured key",
                "redacted_value": format!("...{}", &id[id.len() - 4..]),
                "created_at": 0,
                "last_used_at": null,
                "owner": {"type": "service_account", "service_account": {
                    "id": "configuration", "name": "configuration file", "created_at": 0, "role": "member"}},
                "owner_project_access": if p.active() { "active" } else { "inactive" },
            });
            (id, object)
        });
    let runtime = p.runtime_keys.iter().map(|k| {
        let account = k.service_account.as_deref().unwrap_or("configuration");
        let object = json!({
            "object": "organization.project.api_key",
            "id": &*k.id,
            "name": k.name,
            "redacted_value": k.redacted,
            "created_at": k.created_at,
            "last_used_at": null,
            "owner": {"type": "service_account", "service_account": {
                "id": account, "name": k.name, "created_at": k.created_at, "role": "member"}},
            "owner_project_access": if p.active() { "active" } else { "inactive" },
        });
        (k.id.to_string(), object)
    });
    configured.chain(runtime).collect()
}

fn no_key(id: &str) -> ApiError {
    ApiError::NoSuchObject(format!(
        "No API key with id '{}' in this project.",
        crate::excerpt(id, 64)
    ))
}

async fn list_keys(
    target: Target,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(list(
        project_keys(project(&target, &id)?),
        raw.as_deref(),
    )?))
}

async fn retrieve_key(
    target: Target,
    Path((id, key)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    project_keys(project(&target, &id)?)
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, object)| Json(object))
        .ok_or_else(|| no_key(&key))
}

async fn delete_key(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
    Path((id, key)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    if !project_keys(project(&target, &id)?)
        .iter()
        .any(|(k, _)| *k == key)
    {
        return Err(no_key(&key));
    }
    change(
        &gateway,
        &target,
        Change::KeyDeleted {
            project_id: id,
            key_id: key.clone(),
        },
    )
    .await?;
    Ok(Json(
        json!({"object": "organization.project.api_key.deleted", "id": key, "deleted": true}),
    ))
}

/// The service accounts of a project: its keys made with one.
fn accounts(p: &Project) -> Vec<(String, Value)> {
    p.runtime_keys
        .iter()
        .filter_map(|k| {
            let id = k.service_account.clone()?;
            let object = json!({
                "object": "organization.project.service_account",
                "id": id,
                "name": k.name,
                "role": "member",
                "created_at": k.created_at,
            });
            Some((id, object))
        })
        .collect()
}

fn no_account(id: &str) -> ApiError {
    ApiError::NoSuchObject(format!(
        "No service account with id '{}' in this project.",
        crate::excerpt(id, 64)
    ))
}

async fn list_accounts(
    target: Target,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(list(
        accounts(project(&target, &id)?),
        raw.as_deref(),
    )?))
}

/// A key's name: 1 to 256 characters, no control characters.
fn name(body: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    let name: String = field(body, "name")?.ok_or_else(|| missing("name"))?;
    if name.is_empty() || name.chars().count() > 256 || name.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest {
            message: "'name' must be 1 to 256 characters, none of them control characters.".into(),
            param: Some("name".into()),
            code: Some("invalid_value"),
        });
    }
    Ok(name)
}

/// `POST .../service_accounts` `{"name"}`: a service account and its key,
/// whose value is in `api_key.value`, this once.
async fn create_account(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    if project(&target, &id)?.archived_at.is_some() {
        return Err(ApiError::InvalidRequest {
            message: "An archived project gets no new keys.".into(),
            param: None,
            code: None,
        });
    }
    only(&body, &["name"])?;
    let name = name(&body)?;
    let now_s = gateway.clock.now_ms().div_euclid(1000);
    let (value, key) = make_key("tw-", &name, now_s, None);
    let account = format!("svc_acct_{}", key.id);
    let key = RuntimeKey {
        service_account: Some(account.clone()),
        ..key
    };
    let key_id = key.id.clone();
    change(
        &gateway,
        &target,
        Change::KeyCreated {
            project_id: id,
            key,
        },
    )
    .await?;
    Ok(Json(json!({
        "object": "organization.project.service_account",
        "id": account,
        "name": name,
        "role": "member",
        "created_at": now_s,
        "api_key": {
            "object": "organization.project.service_account.api_key",
            "value": value,
            "name": "Secret Key",
            "created_at": now_s,
            "id": &*key_id,
        },
    })))
}

async fn retrieve_account(
    target: Target,
    Path((id, account)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    accounts(project(&target, &id)?)
        .into_iter()
        .find(|(a, _)| *a == account)
        .map(|(_, object)| Json(object))
        .ok_or_else(|| no_account(&account))
}

async fn delete_account(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
    Path((id, account)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let key = project(&target, &id)?
        .runtime_keys
        .iter()
        .find(|k| k.service_account.as_deref() == Some(account.as_str()))
        .map(|k| k.id.to_string())
        .ok_or_else(|| no_account(&account))?;
    change(
        &gateway,
        &target,
        Change::KeyDeleted {
            project_id: id,
            key_id: key,
        },
    )
    .await?;
    Ok(Json(
        json!({"object": "organization.project.service_account.deleted", "id": account, "deleted": true}),
    ))
}

/// The org's admin keys, as `(id, object)`.
fn admin_keys(target: &Target) -> Vec<(String, Value)> {
    let org = target.org();
    let object = |id: &str, name: &str, redacted: &str, created_at: i64| {
        json!({
            "object": "organization.admin_api_key",
            "id": id,
            "name": name,
            "redacted_value": redacted,
            "created_at": created_at,
            "last_used_at": null,
            "owner": {"type": "service_account", "object": "organization.service_account", "name": name, "role": "owner"},
        })
    };
    let configured = configured_ids(&org.admin_keys)
        .filter(|id| !org.deleted_admin_keys.iter().any(|d| **d == **id))
        .map(|id| {
            let redacted = format!("...{}", &id[id.len() - 4..]);
            let o = object(&id, "configured admin key", &redacted, 0);
            (id, o)
        });
    let runtime = org.runtime_admin_keys.iter().map(|k| {
        (
            k.id.to_string(),
            object(&k.id, &k.name, &k.redacted, k.created_at),
        )
    });
    configured.chain(runtime).collect()
}

/// Making and deleting admin keys is the platform's.
fn platform_only(target: &Target) -> Result<(), ApiError> {
    match target.admin {
        Admin::Platform => Ok(()),
        Admin::Org(_) => Err(ApiError::PermissionDenied(
            "Admin keys are made and deleted with the platform's admin token.".into(),
        )),
    }
}

async fn list_admin_keys(target: Target, RawQuery(raw): RawQuery) -> Result<Json<Value>, ApiError> {
    Ok(Json(list(admin_keys(&target), raw.as_deref())?))
}

async fn retrieve_admin_key(
    target: Target,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    admin_keys(&target)
        .into_iter()
        .find(|(k, _)| *k == key)
        .map(|(_, object)| Json(object))
        .ok_or_else(|| no_key(&key))
}

/// `POST /v1/organization/admin_api_keys` `{"name"}`: the value, this once.
async fn create_admin_key(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    platform_only(&target)?;
    only(&body, &["name"])?;
    let name = name(&body)?;
    let now_s = gateway.clock.now_ms().div_euclid(1000);
    let (value, key) = make_key("tw-admin-", &name, now_s, None);
    let id = key.id.to_string();
    change(&gateway, &target, Change::AdminKeyCreated { key }).await?;
    let after = target.again(&gateway);
    let kept = after
        .org()
        .runtime_admin_keys
        .iter()
        .find(|k| *k.id == *id)
        .ok_or(ApiError::Internal)?;
    Ok(Json(json!({
        "object": "organization.admin_api_key",
        "id": id,
        "name": kept.name,
        "redacted_value": kept.redacted,
        "value": value,
        "created_at": kept.created_at,
        "last_used_at": null,
        "owner": {"type": "service_account", "object": "organization.service_account", "name": kept.name, "role": "owner"},
    })))
}

async fn delete_admin_key(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
    Path(key): Path<String>,
) -> Result<Json<Value>, ApiError> {
    platform_only(&target)?;
    if !admin_keys(&target).iter().any(|(k, _)| *k == key) {
        return Err(no_key(&key));
    }
    change(
        &gateway,
        &target,
        Change::AdminKeyDeleted {
            key_id: key.clone(),
        },
    )
    .await?;
    Ok(Json(
        json!({"object": "organization.admin_api_key.deleted", "id": key, "deleted": true}),
    ))
}
