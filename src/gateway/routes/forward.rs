//! Calls past the meter: any other `/v1/*` path, forwarded only where the
//! project's `forward` rules allow it (see [`crate::gateway::path`]); and
//! the objects OpenAI keeps of a project's calls (stored responses and chat
//! completions), forwarded for a project alone on its upstream.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Extension;

use super::read_body;
use crate::gateway::auth::Caller;
use crate::gateway::error::ApiError;
use crate::gateway::{path, upstream, Gateway};

/// Any other `/v1/*` call: refused with 404 unless one of the project's
/// `forward` rules allows its method and path; then forwarded to the
/// project's upstream, unmetered, and recorded in the ledger.
pub async fn passthrough(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> Response {
    let started = (std::time::Instant::now(), gateway.clock.now_ms());
    let (parts, body) = request.into_parts();
    let Some((_, project)) = caller.org_project() else {
        return ApiError::Internal.into_response();
    };
    let path = parts.uri.path();
    let upstream_path = path.strip_prefix("/v1").unwrap_or(path);
    let method = parts.method.as_str();
    // The server routes only plain paths (see `App`); checked here too, so
    // that no router built another way can forward a `..` segment.
    let rule = project
        .forward
        .iter()
        .find(|r| r.allows(method, upstream_path))
        .filter(|_| path::is_plain(path));
    let Some(rule) = rule else {
        return ApiError::not_forwarded(method, path).into_response();
    };
    let method = rule.method.as_str();
    forward(&gateway, &caller, parts, body, method, started).await
}

/// The routes of what OpenAI keeps of a project's calls: stored responses
/// (`/v1/responses/{id}`, its `cancel` and `input_items`, and
/// `/v1/responses/input_tokens`), stored chat completions (`GET
/// /v1/chat/completions`, `/v1/chat/completions/{id}` and its `messages`)
/// and fine-tuned models (`DELETE /v1/models/{id}`).
/// An upstream keeps them under its key, so only a project alone on its
/// upstream ([`Caller::alone_on_upstream`]) can tell them apart from
/// another's: forwarded for it, unmetered and recorded; for the others
/// only where a `forward` rule opens them, as any other path.
pub async fn stored_object(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> Response {
    if !caller.alone_on_upstream() {
        return passthrough(State(gateway), Extension(caller), request).await;
    }
    let started = (std::time::Instant::now(), gateway.clock.now_ms());
    let (parts, body) = request.into_parts();
    let method = match parts.method {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        axum::http::Method::DELETE => "DELETE",
        _ => return super::not_found_now(&parts.method, &parts.uri).into_response(),
    };
    if !path::is_plain(parts.uri.path()) {
        return super::not_found_now(&parts.method, &parts.uri).into_response();
    }
    forward(&gateway, &caller, parts, body, method, started).await
}

/// Send a call to the project's upstream as it came, unmetered, and record
/// it in the ledger; `started`: when it came (an instant, Unix ms).
async fn forward(
    gateway: &Gateway,
    caller: &Caller,
    parts: axum::http::request::Parts,
    body: Body,
    method: &'static str,
    (started, started_ms): (std::time::Instant, i64),
) -> Response {
    let Some((org, project)) = caller.org_project() else {
        return ApiError::Internal.into_response();
    };
    let path = parts.uri.path();
    let upstream_path = path.strip_prefix("/v1").unwrap_or(path);
    let body = match read_body(body, caller.live.config.server.max_body_bytes).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    let target = parts
        .uri
        .path_and_query()
        .map_or(path, |p| p.as_str())
        .strip_prefix("/v1")
        .unwrap_or_default();
    tracing::info!(org = %org.name, project = %project.name, method, path = upstream_path, "forwarded unmetered");
    let answer = upstream::send(
        &caller.live.client,
        &project.upstream,
        caller.org,
        parts.method.clone(),
        target,
        &parts.headers,
        body,
    )
    .await;
    let response = match answer {
        Ok(mut response) => {
            let status = response.status();
            let headers = response.take_headers();
            let mut out = Response::new(Body::from_stream(response.into_stream()));
            *out.status_mut() = status;
            *out.headers_mut() = headers;
            out
        }
        Err(e) => e.into_response(),
    };
    let forwarded = crate::store::Forwarded {
        started_ms,
        org: org.name.clone(),
        project: project.id.clone(),
        key_id: caller.key_id.clone(),
        method,
        path: upstream_path.to_owned(),
        status: response.status().as_u16(),
        latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    if let Err(e) = gateway.store.forwarded(forwarded) {
        tracing::error!(error = %e, "could not record a forwarded call");
    }
    response
}
