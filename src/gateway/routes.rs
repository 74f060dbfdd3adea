//! Thin handlers: read and check the request, ask the meter, forward, answer.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, MethodRouter};
use axum::{Extension, Json};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use serde_json::{json, Value};

use super::auth::Caller;
use super::call::{Call, Labels, Outcome};
use super::error::ApiError;
use super::stream::{body_text, usage_of, Tap};
use super::{scan, upstream, Gateway};
use crate::catalog::ModelRef;
use crate::config::Guard;
use crate::day::Day;
use crate::guard;
use crate::meter::{self, Decision, Downgrade, PoolKey};
use crate::store::Admitted;
use crate::tokens::request::{count_request, parse_body, Endpoint};

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    not_found_now(&method, &uri)
}

/// OpenAI's 404 for a URL it does not serve, echoing a short prefix of it.
pub fn not_found_now(method: &Method, uri: &axum::http::Uri) -> ApiError {
    ApiError::UnknownRoute {
        method: super::path::excerpt(method.as_str(), 16),
        path: super::path::excerpt(uri.path(), 128),
    }
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
/// route, then OpenAI's answer to a URL it does not serve.
async fn wrong_method(
    State(gateway): State<Arc<Gateway>>,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> ApiError {
    match super::auth::caller(&gateway, &headers) {
        Err(e) => e,
        Ok(_) => not_found(method, uri).await,
    }
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
    // The head is taken apart, not copied (`HeaderMap` as an extractor
    // would clone every header).
    let (parts, body) = request.into_parts();
    let caller = match super::auth::caller(&gateway, &parts.headers) {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let (org, project) = (caller.org, caller.project);
    let metrics_gateway = gateway.clone();
    let response = metered(gateway, caller, endpoint, parts.headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    metrics_gateway
        .metrics
        .request(org, project, response.status().as_u16());
    response
}

/// `GET /v1/models`: the catalog's models (every project may use every model).
pub async fn models(State(gateway): State<Arc<Gateway>>) -> Json<Value> {
    let data: Vec<Value> = gateway
        .config
        .catalog
        .models
        .iter()
        .filter(|m| !m.name.contains('*'))
        .map(|m| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "tokenwarden"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Any other `/v1/*` call: refused with 404 unless one of the project's
/// `forward` rules allows its method and path; then forwarded to the
/// project's upstream, unmetered, and recorded in the ledger.
pub async fn passthrough(
    State(gateway): State<Arc<Gateway>>,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> Response {
    let (started, started_ms) = (std::time::Instant::now(), gateway.clock.now_ms());
    let (parts, body) = request.into_parts();
    let Some((org, project)) = org_project(&gateway, &caller) else {
        return ApiError::Internal.into_response();
    };
    let path = parts.uri.path();
    let upstream_path = path.strip_prefix("/v1").unwrap_or(path);
    let method = parts.method.as_str();
    let Some(rule) = project
        .forward
        .iter()
        .find(|r| r.allows(method, upstream_path))
    else {
        return ApiError::NotForwarded {
            method: super::path::excerpt(method, 16),
            path: super::path::excerpt(path, 128),
        }
        .into_response();
    };
    let body = match read_body(body, gateway.config.server.max_body_bytes).await {
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
        &gateway,
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
        project: project.name.clone(),
        key_id: caller.key_id.clone(),
        method: rule.method.as_str(),
        path: upstream_path.to_owned(),
        status: response.status().as_u16(),
        latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    if let Err(e) = gateway.store.forward_nowait(forwarded) {
        tracing::error!(error = %e, "could not record a forwarded call");
    }
    response
}

fn org_project<'a>(
    gateway: &'a Gateway,
    caller: &Caller,
) -> Option<(&'a crate::config::Org, &'a crate::config::Project)> {
    let org = gateway.config.orgs.get(caller.org)?;
    Some((org, org.projects.get(caller.project)?))
}

/// The free-token headers of a call's group: limit, remaining, seconds to reset.
fn free_token_headers(gateway: &Gateway, headers: &mut HeaderMap, pool: Option<PoolKey>, cap: u64) {
    let remaining = match (pool, gateway.ledger.lock()) {
        (Some(pool), Ok(ledger)) => ledger.state(pool, cap).left(),
        _ => 0,
    };
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
/// Returns whether the body was changed.
fn apply_privacy_guard(
    gateway: &Gateway,
    caller: &mut Caller,
    private: bool,
    body: &mut Value,
) -> Result<bool, ApiError> {
    let (org, project) = org_project(gateway, caller).ok_or(ApiError::Internal)?;
    if private {
        return match project.reroute_to {
            Some(target) => {
                caller.project = target;
                Ok(false)
            }
            None if !project.shares => Ok(false),
            None => Err(ApiError::InvalidRequest {
                message: format!("x-tokenwarden-private: project {} shares its traffic and has no reroute_to project.", project.name),
                param: None,
                code: Some("no_private_route"),
            }),
        };
    }
    if !project.shares || project.privacy_guard == Guard::Off {
        return Ok(false);
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
        return Ok(false);
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
        Guard::Off => Ok(false),
        Guard::Block => Err(ApiError::InvalidRequest {
            message: format!(
                "This call would share data that must not be shared ({}). Remove it, or send the call with x-tokenwarden-private: true.",
                names.join(", ")
            ),
            param: None,
            code: Some("sensitive_data_detected"),
        }),
        Guard::Reroute => {
            caller.project = project.reroute_to.ok_or(ApiError::Internal)?;
            Ok(false)
        }
        Guard::Redact => {
            visit_content(body, &mut |text| {
                let (redacted, _) = guard::redact(text);
                *text = redacted;
            });
            Ok(true)
        }
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

/// What settling needs of a whole successful answer: its usage and model,
/// or (usage missing or absurd) its text for the estimate, counted here
/// when `count_in` gives the encoding; the whole answer when captured.
fn read_answer(
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
const INLINE_READ_BYTES: usize = 64 * 1024;

/// A request's body as the meter needs it.
struct Read {
    value: Value,
    /// The caller, rerouted to another project by the privacy guard maybe.
    caller: Caller,
    /// The guard changed the body.
    redacted: bool,
    counted: crate::tokens::request::RequestCount,
}

/// Parse the body, apply the privacy guard, count the prompt: inline for a
/// small body, on the blocking pool for a large one (at most
/// [`Gateway::heavy_reads`] at once; the others wait their turn there).
async fn read_request(
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
        let redacted = apply_privacy_guard(gateway, &mut caller, private, &mut value)?;
        let counted = count_request(&gateway.config.catalog, Some(endpoint), &value, None)?;
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
    let _turn = gateway
        .heavy_reads
        .acquire()
        .await
        .map_err(|_| ApiError::Internal)?;
    let gateway = gateway.clone();
    tokio::task::spawn_blocking(move || read(&gateway, caller, private, endpoint, &bytes))
        .await
        .map_err(|_| ApiError::Internal)?
}

async fn metered(
    gateway: Arc<Gateway>,
    caller: Caller,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    let bytes = read_body(body, gateway.config.server.max_body_bytes).await?;
    let private = headers
        .get("x-tokenwarden-private")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let Read {
        mut value,
        mut caller,
        redacted,
        mut counted,
    } = read_request(&gateway, caller, private, endpoint, bytes.clone()).await?;
    let catalog = &gateway.config.catalog;
    let model = catalog
        .lookup(&counted.model)
        .map_err(|e| ApiError::ModelNotFound(e.to_string()))?;
    let (org, project) = org_project(&gateway, &caller).ok_or(ApiError::Internal)?;

    let now_ms = gateway.clock.now_ms();
    let day = Day::from_unix(now_ms.div_euclid(1000));
    let running =
        catalog.program_starts <= day && catalog.program_ends.is_none_or(|ends| day <= ends);
    let eligible = org.eligible && project.shares && running;
    let pool_of = |m: &ModelRef<'_>| {
        m.group_index().filter(|_| eligible).map(|group| PoolKey {
            org: caller.org,
            group,
            day,
        })
    };
    let cap_of = |m: &ModelRef<'_>| m.group().map_or(0, |g| g.daily_tokens_for_tier(org.tier));
    // Only a project whose policy is downgrade needs the target's side.
    let target = model
        .model
        .downgrade
        .as_deref()
        .filter(|_| project.on_exhausted == crate::config::Policy::Downgrade)
        .and_then(|name| catalog.lookup(name).ok().map(|t| (name, t)));
    let downgrade = target.and_then(|(name, t)| {
        let prompt = if t.model.encoding == model.model.encoding {
            counted.prompt.tokens
        } else {
            let mut body = value.clone();
            body["model"] = json!(name);
            count_request(catalog, Some(endpoint), &body, None)
                .ok()?
                .prompt
                .tokens
        };
        Some(Downgrade {
            pool: pool_of(&t)?,
            cap: cap_of(&t),
            prompt,
            output_cap: counted.output_cap.min(t.model.max_output),
        })
    });
    let request = meter::Request {
        pool: pool_of(&model),
        cap: cap_of(&model),
        prompt: counted.prompt.tokens,
        output_cap: counted.output_cap,
        policy: project.on_exhausted,
        fallback: project.downgrade_fallback,
        downgrade,
    };
    let decision = gateway
        .ledger
        .lock()
        .map_err(|_| ApiError::Internal)?
        .admit(&request);

    let stream = value
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let model_name: Arc<str> = std::mem::take(&mut counted.model).into();
    let mut admitted = Admitted {
        started_ms: now_ms,
        day,
        org: org.name.clone(),
        project: project.name.clone(),
        key_id: std::mem::take(&mut caller.key_id),
        endpoint: endpoint.path(),
        requested_model: model_name.clone(),
        served_model: model_name,
        group: model.group().map(|g| g.name.clone()),
        decision: "free",
        reserved: 0,
        free_lane: false,
        streamed: stream,
        shared: org.shared(caller.project),
    };
    let mut modified = redacted;
    let (ticket, served, header_pool, header_cap) = match decision {
        Decision::Refused { pool, cap, left } => {
            let retry_after = gateway.seconds_to_reset();
            let group = catalog.groups.get(pool.group).map_or("?", |g| &*g.name);
            if let Err(e) = gateway.store.refuse(admitted, 429) {
                tracing::error!(error = %e, "could not record a refused call");
            }
            return Err(ApiError::FreeTokensExhausted {
                message: format!(
                    "Free tokens exhausted: this call needs up to {} tokens of the {group} group, and {left} of today's {cap} are left for org {}. The allowance resets at 00:00 UTC, in {retry_after} seconds.",
                    request.prompt.saturating_add(request.output_cap),
                    org.name
                ),
                retry_after,
                limit: cap,
                remaining: left,
            });
        }
        Decision::Free(ticket) => (ticket, model, request.pool, request.cap),
        Decision::Billed(ticket) => {
            admitted.decision = "billed";
            (ticket, model, request.pool, request.cap)
        }
        Decision::Clamped { ticket, output_cap } => {
            admitted.decision = "clamped";
            set_output_cap(endpoint, &mut value, output_cap);
            modified = true;
            (ticket, model, request.pool, request.cap)
        }
        Decision::Downgraded(ticket) => {
            let (name, t) = target.ok_or(ApiError::Internal)?;
            admitted.decision = "downgraded";
            admitted.served_model = name.into();
            if admitted.group.is_some() {
                if let Some(group) = t.group() {
                    admitted.group = Some(group.name.clone());
                }
            }
            value["model"] = json!(name);
            modified = true;
            (ticket, t, ticket.pool, ticket.cap)
        }
    };
    admitted.reserved = ticket.reserved;
    admitted.free_lane = ticket.reserved > 0;

    // Always ask for the usage chunk; remember whether the client did.
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
        Bytes::from(serde_json::to_vec(&value).map_err(|_| ApiError::Internal)?)
    } else if splice_usage {
        with_usage_asked(&bytes).ok_or(ApiError::Internal)?
    } else {
        bytes
    };

    let row = match gateway.store.admit(admitted) {
        Ok(row) => row,
        Err(e) => {
            tracing::error!(error = %e, "could not record an admitted call");
            if let Ok(mut ledger) = gateway.ledger.lock() {
                ledger.settle(&ticket, &meter::Usage::default());
            }
            return Err(ApiError::Internal);
        }
    };
    let mut call = Call::new(
        gateway.clone(),
        Labels {
            org: caller.org,
            project: caller.project,
            model: served.model.name.clone(),
            group: served.group_index(),
            arrived,
            started_ms: now_ms,
        },
        row,
        ticket,
        served.prices(),
        counted.prompt.tokens,
        served.model.encoding,
    );
    if org.captures(caller.project) {
        call.capture(endpoint, body.clone());
    }
    let path = endpoint.path().trim_start_matches("/v1");
    call.sending();
    let mut response = match upstream::send(
        &gateway,
        &project.upstream,
        caller.org,
        Method::POST,
        path,
        &headers,
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
            });
            return Err(e);
        }
    };
    let status = response.status();
    if matches!(status.as_u16(), 401 | 403) {
        // The client's key was good; the gateway's own credentials were not.
        tracing::error!(upstream = %project.upstream, status = status.as_u16(), "the upstream refused the gateway's credentials");
        call.settle_and_store(Outcome {
            failed: true,
            status: 502,
            ..Outcome::default()
        });
        return Err(ApiError::BadGateway(format!(
            "The upstream '{}' refused the gateway's credentials.",
            project.upstream
        )));
    }
    let is_stream = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut out_headers = response.take_headers();

    if status.is_success() && is_stream {
        free_token_headers(&gateway, &mut out_headers, header_pool, header_cap);
        let tap = Tap::new(call, response, endpoint, client_wants_usage);
        let mut out = Response::new(Body::from_stream(tap));
        *out.headers_mut() = out_headers;
        return Ok(out);
    }

    let upstream_body = match response.bytes().await {
        Ok(bytes) => bytes,
        Err(e) => {
            let error = ApiError::from(e);
            call.settle_and_store(Outcome {
                status: error.status_code().as_u16(),
                ..Outcome::default()
            });
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
        let _turn = gateway
            .heavy_reads
            .acquire()
            .await
            .map_err(|_| ApiError::Internal)?;
        tokio::task::spawn_blocking(move || {
            read_answer(endpoint, &body, captures, status.as_u16(), Some(encoding))
        })
        .await
        .unwrap_or_else(|_| Outcome {
            status: status.as_u16(),
            ..Outcome::default()
        })
    };
    call.settle_and_store(outcome);
    free_token_headers(&gateway, &mut out_headers, header_pool, header_cap);
    let mut out = Response::new(Body::from(upstream_body));
    *out.status_mut() = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    *out.headers_mut() = out_headers;
    Ok(out)
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
