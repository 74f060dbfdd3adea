//! `/v1/organization/projects`: OpenAI's project objects, with tokenwarden's
//! settings beside them (`sharing`, `on_exhausted`, `downgrade_fallback`,
//! `privacy_guard`, `reroute_to`), and each project's `model_permissions`.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::{change, field, list, missing, only, Body, Target};
use crate::changes::{Change, ModelMode};
use crate::config::{Fallback, Guard, Org, Policy, Project};
use crate::gateway::error::ApiError;
use crate::gateway::Gateway;

pub(super) fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/v1/organization/projects", get(list_projects).post(create))
        .route(
            "/v1/organization/projects/{project_id}",
            get(retrieve).post(modify),
        )
        .route(
            "/v1/organization/projects/{project_id}/archive",
            post(archive),
        )
        .route(
            "/v1/organization/projects/{project_id}/model_permissions",
            get(model_permissions)
                .post(set_model_permissions)
                .delete(delete_model_permissions),
        )
}

fn name_of<T: serde::Serialize>(value: T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// OpenAI's `organization.project`, and the project's settings.
pub(super) fn object(org: &Org, p: &Project) -> Value {
    json!({
        "object": "organization.project",
        "id": &*p.id,
        "name": &*p.name,
        "created_at": p.created_at,
        "archived_at": p.archived_at,
        "status": if p.archived_at.is_some() { "archived" } else { "active" },
        "sharing": p.shares && org.eligible,
        "on_exhausted": name_of(p.on_exhausted),
        "downgrade_fallback": name_of(p.downgrade_fallback),
        "privacy_guard": name_of(p.privacy_guard),
        "reroute_to": p.reroute_to.and_then(|t| org.projects.get(t)).map(|t| &*t.id),
    })
}

/// The project `id` of the target's org (archived ones included), or a 404.
pub(super) fn project<'a>(target: &'a Target, id: &str) -> Result<&'a Project, ApiError> {
    target
        .org()
        .projects
        .iter()
        .find(|p| *p.id == *id && !p.retired)
        .ok_or_else(|| {
            ApiError::NoSuchObject(format!(
                "No project with id '{}' in this organization.",
                crate::excerpt(id, 64)
            ))
        })
}

/// The same project in the configuration now running (after a change).
fn now(gateway: &Gateway, target: &Target, id: &str) -> Result<Json<Value>, ApiError> {
    let after = target.again(gateway);
    Ok(Json(object(after.org(), project(&after, id)?)))
}

async fn list_projects(target: Target, RawQuery(raw): RawQuery) -> Result<Json<Value>, ApiError> {
    let archived = raw
        .as_deref()
        .unwrap_or_default()
        .split('&')
        .any(|p| p == "include_archived=true");
    let org = target.org();
    let items = org
        .projects
        .iter()
        .filter(|p| !p.retired && (archived || p.archived_at.is_none()))
        .map(|p| (p.id.to_string(), object(org, p)))
        .collect();
    Ok(Json(list(items, raw.as_deref())?))
}

/// A new project's id: `proj_` and 24 characters nobody can guess.
fn new_id() -> String {
    let key = crate::gateway::auth::new_key("");
    format!("proj_{}", &key[..24])
}

async fn create(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    only(&body, &["name", "upstream"])?;
    let name: String = field(&body, "name")?.ok_or_else(|| missing("name"))?;
    check_name(&name)?;
    let org = target.org();
    let upstreams = &target.live.config.upstreams;
    let upstream = match field::<String>(&body, "upstream")? {
        Some(u) => u,
        None if upstreams.len() == 1 => upstreams.keys().next().cloned().unwrap_or_default(),
        // The upstream of the org's first project, else one must be named.
        None => org
            .projects
            .iter()
            .find(|p| !p.retired)
            .map(|p| p.upstream.clone())
            .ok_or_else(|| ApiError::InvalidRequest {
                message: "This gateway has several upstreams: name one with 'upstream'.".into(),
                param: Some("upstream".into()),
                code: Some("missing_required_parameter"),
            })?,
    };
    let id = new_id();
    let created_at = gateway.clock.now_ms().div_euclid(1000);
    change(
        &gateway,
        &target,
        Change::ProjectCreated {
            project_id: id.clone(),
            name,
            upstream,
            created_at,
        },
    )
    .await?;
    now(&gateway, &target, &id)
}

/// A project's name: 1 to 256 characters, no control characters.
fn check_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.chars().count() > 256 || name.chars().any(char::is_control) {
        return Err(ApiError::InvalidRequest {
            message: "'name' must be 1 to 256 characters, none of them control characters.".into(),
            param: Some("name".into()),
            code: Some("invalid_value"),
        });
    }
    Ok(())
}

async fn retrieve(target: Target, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    Ok(Json(object(target.org(), project(&target, &id)?)))
}

/// `POST /v1/organization/projects/{id}`: its name and policies.
async fn modify(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    project(&target, &id)?;
    only(
        &body,
        &[
            "name",
            "on_exhausted",
            "downgrade_fallback",
            "privacy_guard",
            "reroute_to",
        ],
    )?;
    let name: Option<String> = field(&body, "name")?;
    if let Some(name) = &name {
        check_name(name)?;
    }
    change(
        &gateway,
        &target,
        Change::Project {
            project_id: id.clone(),
            name,
            on_exhausted: field::<Policy>(&body, "on_exhausted")?,
            downgrade_fallback: field::<Fallback>(&body, "downgrade_fallback")?,
            privacy_guard: field::<Guard>(&body, "privacy_guard")?,
            reroute_to: field(&body, "reroute_to")?,
        },
    )
    .await?;
    now(&gateway, &target, &id)
}

async fn archive(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if project(&target, &id)?.archived_at.is_none() {
        let archived_at = gateway.clock.now_ms().div_euclid(1000);
        change(
            &gateway,
            &target,
            Change::ProjectArchived {
                project_id: id.clone(),
                archived_at,
            },
        )
        .await?;
    }
    now(&gateway, &target, &id)
}

fn permissions(p: &Project) -> Value {
    json!({
        "object": "project.model_permissions",
        "mode": if p.models_denied || p.models.is_empty() { "deny_list" } else { "allow_list" },
        "model_ids": p.models,
    })
}

async fn model_permissions(
    target: Target,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(permissions(project(&target, &id)?)))
}

/// `POST .../model_permissions` `{"mode": "allow_list" | "deny_list", "model_ids": [...]}`.
async fn set_model_permissions(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
    Path(id): Path<String>,
    Body(body): Body,
) -> Result<Json<Value>, ApiError> {
    project(&target, &id)?;
    only(&body, &["mode", "model_ids"])?;
    let missing = |name: &str| ApiError::InvalidRequest {
        message: format!("Missing required parameter: '{name}'."),
        param: Some(name.to_owned()),
        code: Some("missing_required_parameter"),
    };
    let mode: ModelMode = field(&body, "mode")?.ok_or_else(|| missing("mode"))?;
    let model_ids: Vec<String> = field(&body, "model_ids")?.ok_or_else(|| missing("model_ids"))?;
    if model_ids.len() > 1000 || model_ids.iter().any(|m| m.len() > 256) {
        return Err(ApiError::InvalidRequest {
            message: "'model_ids' holds at most 1,000 names of at most 256 bytes.".into(),
            param: Some("model_ids".into()),
            code: Some("invalid_value"),
        });
    }
    change(
        &gateway,
        &target,
        Change::ModelPermissions {
            project_id: id.clone(),
            mode: Some(mode),
            model_ids,
        },
    )
    .await?;
    Ok(Json(permissions(project(&target.again(&gateway), &id)?)))
}

async fn delete_model_permissions(
    State(gateway): State<Arc<Gateway>>,
    target: Target,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    project(&target, &id)?;
    change(
        &gateway,
        &target,
        Change::ModelPermissions {
            project_id: id,
            mode: None,
            model_ids: Vec::new(),
        },
    )
    .await?;
    Ok(Json(
        json!({"object": "project.model_permissions.deleted", "deleted": true}),
    ))
}
