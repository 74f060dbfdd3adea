//! Thin handlers: read and check the request, ask the meter, forward, answer.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::Json;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};

use super::auth::Caller;
use super::call::{Call, Outcome};
use super::error::ApiError;
use super::stream::Tap;
use super::{upstream, Gateway};
use crate::meter::PoolKey;
use crate::tokens::request::Endpoint;

mod admit;
mod forward;
mod privacy;
mod read;

use admit::{admit, Admission};
pub use forward::{passthrough, stored_object};
use read::{read_answer, read_request, INLINE_READ_BYTES};

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    not_found_now(&method, &uri)
}

/// OpenAI's 404 for a URL it does not serve, echoing a short prefix of it.
pub fn not_found_now(method: &Method, uri: &axum::http::Uri) -> ApiError {
    ApiError::unknown_route(method.as_str(), uri.path())
}

/// How long a client may take to send its body: a client trickling bytes
/// must not hold a connection and its buffer forever.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Read a body up to the configured limit (a larger one is a 413) and
/// within [`BODY_READ_TIMEOUT`] (a slower one is a 408).
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    // A declared length over the limit is refused at once, before a byte
    // of the body is waited for.
    if usize::try_from(axum::body::HttpBody::size_hint(&body).lower()).map_or(true, |n| n > limit) {
        return Err(ApiError::PayloadTooLarge { limit });
    }
    let collect = Limited::new(body, limit).collect();
    match tokio::time::timeout(BODY_READ_TIMEOUT, collect).await {
        Err(_) => Err(ApiError::RequestTimeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::PayloadTooLarge { limit })
        }
        Ok(Err(_)) => Err(ApiError::InvalidRequest {
            message: "The request body could not be read.".into(),
            param: None,
            code: None,
        }),
    }
}

/// The route of a metered endpoint: every one takes the same road,
/// [`metered_call`] (which checks the client key itself).
pub fn metered_route(endpoint: Endpoint) -> MethodRouter<Arc<Gateway>> {
    post(
        move |State(gateway): State<Arc<Gateway>>, request: Request| {
            metered_call(gateway, endpoint, request)
        },
    )
    .fallback(wrong_method)
}

/// Another method on a metered path: the key is checked as on every /v1
/// route; `GET /v1/chat/completions` lists the stored chat completions
/// ([`stored_object`]); anything else is OpenAI's answer to a URL it does
/// not serve.
async fn wrong_method(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let caller = match super::auth::caller(&gateway, request.headers()) {
        Err(e) => return e.into_response(),
        Ok(caller) => caller,
    };
    if request.method() == Method::GET && request.uri().path() == Endpoint::ChatCompletions.path() {
        return stored_object(State(gateway), axum::Extension(caller), request).await;
    }
    not_found_now(request.method(), request.uri()).into_response()
}

/// The metered endpoint a `POST` to `path` is, if it is one.
pub fn metered_endpoint(path: &str) -> Option<Endpoint> {
    [
        Endpoint::ChatCompletions,
        Endpoint::Responses,
        Endpoint::Completions,
        Endpoint::Embeddings,
    ]
    .into_iter()
    .find(|e| e.path() == path)
}

/// A metered call from its request to its response: the client key (or
/// OpenAI's 401), the call, and its count in the metrics. The router's
/// metered routes and the server's own road past the router
/// ([`super::App`]) both come here.
pub async fn metered_call(gateway: Arc<Gateway>, endpoint: Endpoint, request: Request) -> Response {
    metered_call_to(gateway, endpoint, endpoint.path(), request).await
}

/// `POST /v1/responses/compact`: a Responses call (counted, metered,
/// guarded and settled as one, its answer's `usage` read as a response's)
/// sent to the upstream's `/responses/compact`.
pub async fn compact_call(gateway: Arc<Gateway>, request: Request) -> Response {
    metered_call_to(
        gateway,
        Endpoint::Responses,
        "/v1/responses/compact",
        request,
    )
    .await
}

/// [`metered_call`], sent to the upstream's `path` (`/v1/...`).
async fn metered_call_to(
    gateway: Arc<Gateway>,
    endpoint: Endpoint,
    path: &'static str,
    request: Request,
) -> Response {
    // The head is taken apart, not copied (`HeaderMap` as an extractor
    // would clone every header).
    let (parts, body) = request.into_parts();
    let caller = match super::auth::caller(&gateway, &parts.headers) {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let (org, project) = (caller.org, caller.project);
    let metrics_gateway = gateway.clone();
    let response = metered(gateway, caller, endpoint, path, parts.headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    metrics_gateway
        .metrics
        .request(org, project, response.status().as_u16());
    response
}

/// `GET /v1/models`: the catalog's models that the key's project may use.
pub async fn models(axum::Extension(caller): axum::Extension<Caller>) -> Json<Value> {
    let project = caller.org_project().map(|(_, p)| p);
    let data: Vec<Value> = caller
        .live
        .config
        .catalog
        .models
        .iter()
        .filter(|m| !m.name.contains('*') && project.is_some_and(|p| p.allows(&m.name)))
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "tokenwarden"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}`: a model of the catalog the key's project may use
/// (an exact name or a snapshot), else OpenAI's 404.
pub async fn model(
    axum::Extension(caller): axum::Extension<Caller>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Json<Value>, ApiError> {
    let project = caller.org_project().map(|(_, p)| p);
    let known = caller.live.config.catalog.lookup(&id).is_ok() && !id.contains('*');
    if !known || !project.is_some_and(|p| p.allows(&id)) {
        return Err(ApiError::ModelNotFound(format!(
            "The model '{}' does not exist or you do not have access to it.",
            crate::excerpt(&id, 128)
        )));
    }
    Ok(Json(
        json!({"id": id, "object": "model", "created": 0, "owned_by": "tokenwarden"}),
    ))
}

/// The free-token headers of a call's group: limit, remaining, seconds to reset.
fn free_token_headers(gateway: &Gateway, headers: &mut HeaderMap, pool: Option<PoolKey>, cap: u64) {
    let remaining = pool.map_or(0, |pool| gateway.store.pool_state(pool, cap).left());
    // Constants: a name made from a string at run time is validated each time.
    const LIMIT: HeaderName = HeaderName::from_static("x-free-tokens-limit");
    const REMAINING: HeaderName = HeaderName::from_static("x-free-tokens-remaining");
    const RESET: HeaderName = HeaderName::from_static("x-free-tokens-reset");
    let limit = if pool.is_some() { cap } else { 0 };
    // The three numbers in one buffer, each header a slice of it: two
    // allocations where `HeaderValue::from(u64)` made two for each.
    let mut digits = Vec::with_capacity(60);
    let mut ends = [0; 3];
    let mut number = itoa::Buffer::new();
    for (end, value) in ends
        .iter_mut()
        .zip([limit, remaining, gateway.seconds_to_reset()])
    {
        digits.extend_from_slice(number.format(value).as_bytes());
        *end = digits.len();
    }
    let digits = bytes::Bytes::from(digits);
    let mut start = 0;
    for (name, end) in [LIMIT, REMAINING, RESET].into_iter().zip(ends) {
        if let Ok(value) = HeaderValue::from_maybe_shared(digits.slice(start..end)) {
            headers.insert(name, value);
        }
        start = end;
    }
}

/// Set the output cap a clamped call may use, in the field its endpoint reads.
fn set_output_cap(endpoint: Endpoint, body: &mut Value, total: u64) {
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).max(1);
    let per_choice = (total / n).max(1);
    let field = match endpoint {
        Endpoint::Responses => "max_output_tokens",
        Endpoint::Completions => "max_tokens",
        Endpoint::ChatCompletions
            if body.get("max_tokens").is_some() && body.get("max_completion_tokens").is_none() =>
        {
            "max_tokens"
        }
        _ => "max_completion_tokens",
    };
    body[field] = json!(per_choice);
}

/// `body`, a JSON object without `stream_options`, with
/// `"stream_options":{"include_usage":true}` added as its first member: the
/// client's bytes otherwise as they came, instead of the parsed body
/// serialized again (which costs as much as the prompt is long).
fn with_usage_asked(body: &[u8]) -> Option<Bytes> {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true}"#;
    let open = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[open] != b'{' {
        return None;
    }
    let empty = body[open + 1..]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'}');
    let mut out = Vec::with_capacity(body.len() + MEMBER.len() + 1);
    out.extend_from_slice(&body[..=open]);
    out.extend_from_slice(MEMBER);
    if !empty {
        out.push(b',');
    }
    out.extend_from_slice(&body[open + 1..]);
    Some(Bytes::from(out))
}

/// A batch's line on a live call's road (read, guard, count, meter,
/// forward, settle), as `caller`, with no header of a client's.
pub(crate) async fn batch_call(
    gateway: Arc<Gateway>,
    caller: Caller,
    endpoint: Endpoint,
    body: Bytes,
) -> Response {
    let (org, project) = (caller.org, caller.project);
    let metrics_gateway = gateway.clone();
    let response = metered(
        gateway,
        caller,
        endpoint,
        endpoint.path(),
        HeaderMap::new(),
        Body::from(body),
    )
    .await
    .unwrap_or_else(IntoResponse::into_response);
    metrics_gateway
        .metrics
        .request(org, project, response.status().as_u16());
    response
}

/// A metered call's road: read, admit, forward, answer (tap or settle).
async fn metered(
    gateway: Arc<Gateway>,
    caller: Caller,
    endpoint: Endpoint,
    path: &'static str,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let bytes = read_body(body, caller.live.config.server.max_body_bytes).await?;
    let private = headers
        .get("x-tokenwarden-private")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let read = read_request(&gateway, caller, private, endpoint, bytes.clone()).await?;
    let admission = admit(&gateway, endpoint, read, bytes, arrived).await?;
    let (admission, response) = forward(admission, path, &headers).await?;
    answer(&gateway, admission, response, endpoint).await
}

/// Send an admitted call upstream (to `path`, `/v1/...`); a failure settles it.
async fn forward(
    admission: Admission,
    path: &'static str,
    headers: &HeaderMap,
) -> Result<(Admission, upstream::Answer), ApiError> {
    let Admission {
        mut call,
        body,
        client_wants_usage,
        pool,
        cap,
    } = admission;
    let live = call.live().clone();
    let (org, project) = (call.labels().org, call.labels().project);
    let upstream_name = live
        .config
        .orgs
        .get(org)
        .and_then(|o| o.projects.get(project))
        .map_or("", |p| &*p.upstream);
    let path = path.trim_start_matches("/v1");
    call.sending();
    let response = match upstream::send(
        &live.client,
        upstream_name,
        org,
        Method::POST,
        path,
        headers,
        body,
    )
    .await
    {
        Ok(response) => response,
        Err(e) => {
            call.settle_and_store(Outcome {
                failed: true,
                status: e.status_code().as_u16(),
                ..Outcome::default()
            })
            .wait()
            .await;
            return Err(e);
        }
    };
    let status = response.status();
    if matches!(status.as_u16(), 401 | 403) {
        // The client's key was good; the gateway's own credentials were not.
        tracing::error!(upstream = %upstream_name, status = status.as_u16(), "the upstream refused the gateway's credentials");
        call.settle_and_store(Outcome {
            failed: true,
            status: 502,
            ..Outcome::default()
        })
        .wait()
        .await;
        return Err(ApiError::BadGateway(format!(
            "The upstream '{upstream_name}' refused the gateway's credentials."
        )));
    }
    let admission = Admission {
        call,
        body: Bytes::new(),
        client_wants_usage,
        pool,
        cap,
    };
    Ok((admission, response))
}

/// Answer the client: a stream through the tap (which settles when it
/// ends), or a whole answer settled (durably) before it is sent.
async fn answer(
    gateway: &Arc<Gateway>,
    admission: Admission,
    mut response: upstream::Answer,
    endpoint: Endpoint,
) -> Result<Response, ApiError> {
    let Admission {
        mut call,
        client_wants_usage,
        pool,
        cap,
        ..
    } = admission;
    let status = response.status();
    let is_stream = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut out_headers = response.take_headers();

    if status.is_success() && is_stream {
        free_token_headers(gateway, &mut out_headers, pool, cap);
        let tap = Tap::new(call, response, endpoint, client_wants_usage);
        let mut out = Response::new(Body::from_stream(tap));
        *out.headers_mut() = out_headers;
        return Ok(out);
    }

    let answered = answer_whole(gateway, &mut call, response, endpoint).await;
    free_token_headers(gateway, &mut out_headers, pool, cap);
    let (status, upstream_body) = answered?;
    let mut out = Response::new(Body::from(upstream_body));
    *out.status_mut() = status;
    *out.headers_mut() = out_headers;
    Ok(out)
}

/// The body to send upstream, and whether the client asked for a stream's
/// usage chunk: the gateway always asks for it (and hides it from a client
/// that did not). The client's own bytes when nothing changed, or with the
/// member spliced in; the parsed body serialized again otherwise.
fn body_to_send(
    endpoint: Endpoint,
    stream: bool,
    value: &mut Value,
    mut modified: bool,
    bytes: Bytes,
) -> Result<(Bytes, bool), ApiError> {
    let client_wants_usage = value
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut splice_usage = false;
    if stream
        && !client_wants_usage
        && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
    {
        match value.get_mut("stream_options") {
            Some(Value::Object(options)) => {
                options.insert("include_usage".into(), Value::Bool(true));
                modified = true;
            }
            // The usual case: the member is added to the client's own bytes
            // (only when absent: a second `stream_options` would be ambiguous).
            None if !modified => splice_usage = true,
            // Absent from a body rewritten anyway, or `null`.
            _ => {
                value["stream_options"] = json!({"include_usage": true});
                modified = true;
            }
        }
    }
    let body = if modified {
        Bytes::from(serde_json::to_vec(value).map_err(|_| ApiError::Internal)?)
    } else if splice_usage {
        with_usage_asked(&bytes).ok_or(ApiError::Internal)?
    } else {
        bytes
    };
    Ok((body, client_wants_usage))
}

/// A whole answer: read it (within `max_answer_bytes`), settle the call
/// with its usage (or an estimate), and hand back its status and bytes.
async fn answer_whole(
    gateway: &Gateway,
    call: &mut Call,
    response: upstream::Answer,
    endpoint: Endpoint,
) -> Result<(StatusCode, Bytes), ApiError> {
    let status = response.status();
    let upstream_body = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(e) => {
            let error = ApiError::from(e);
            call.settle_in_place(Outcome {
                status: error.status_code().as_u16(),
                ..Outcome::default()
            })
            .wait()
            .await;
            return Err(error);
        }
    };
    let outcome = if !status.is_success() {
        Outcome {
            failed: true,
            status: status.as_u16(),
            ..Outcome::default()
        }
    } else if upstream_body.len() <= INLINE_READ_BYTES {
        read_answer(
            endpoint,
            &upstream_body,
            call.captures(),
            status.as_u16(),
            None,
        )
    } else {
        // A large answer is read (and, without usage, counted) on the
        // blocking pool, as a large request is.
        let (captures, encoding, body) = (call.captures(), call.encoding(), upstream_body.clone());
        gateway
            .off_workers(move || {
                read_answer(endpoint, &body, captures, status.as_u16(), Some(encoding))
            })
            .await
            .unwrap_or_else(|| Outcome {
                status: status.as_u16(),
                ..Outcome::default()
            })
    };
    call.settle_in_place(outcome).wait().await;
    let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    Ok((status, upstream_body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_asked_for_in_the_clients_own_bytes() {
        for body in [
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"{ Hi }"}]}"#,
            " \n\t{ \"model\" : \"gpt-4o\", \"stream\": true }\n",
            "{}",
            "{ }",
        ] {
            let spliced = with_usage_asked(body.as_bytes()).unwrap();
            let mut expected: Value = serde_json::from_str(body).unwrap();
            expected["stream_options"] = json!({"include_usage": true});
            let got: Value = serde_json::from_slice(&spliced).unwrap();
            assert_eq!(got, expected, "{body}");
            // Everything the client sent is still there, byte for byte.
            let text = std::str::from_utf8(&spliced).unwrap();
            assert_eq!(
                text.replacen(r#""stream_options":{"include_usage":true}"#, "", 1)
                    .replacen("{,", "{", 1),
                body
            );
        }
        assert!(with_usage_asked(b"[1]").is_none());
        assert!(with_usage_asked(b"  ").is_none());
    }
}
