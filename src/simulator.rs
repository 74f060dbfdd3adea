//! The simulated upstream: an OpenAI-compatible server for demos, load tests
//! and CI. It serves the same endpoints as the API with deterministic output,
//! counts usage with the same counter the gateway meters with, honours output
//! caps, streams exactly as the API streams (including `include_usage`), and
//! can be told per request to fail:
//!
//! - `x-sim-fault: status=500` (any status) answers with that error;
//! - `x-sim-fault: cut=N` ends a stream abruptly after N events;
//! - `x-sim-fault: no-usage` leaves usage out;
//! - `x-sim-fault: stall=MS` waits MS milliseconds before answering;
//! - `x-sim-output-tokens: N` asks for N output tokens (default 16);
//! - `x-sim-ttft-ms` and `x-sim-token-ms` set the latency of one call.
//!
//! `GET /stats` reports, per API key, the calls served and the tokens of the
//! usage it reported: the witness that tests audit the gateway against.
//!
//! It bounds its own work ([`limits`]): OpenAI's limits on a request (2,048
//! embedding inputs, `n`, `dimensions`), the model's largest output, a body
//! of [`MAX_BODY_BYTES`], delays of ten minutes, [`MAX_KEYS`] keys in its
//! stats; embeddings are written as they are sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{json, Value};

use crate::catalog::Catalog;
use crate::gateway::error::ApiError;
use crate::tokens::request::{count_request, parse_body, Endpoint};

mod answer;
mod embeddings;
pub mod limits;
mod schema;
mod shapes;
mod stored;
mod stream;
mod usage;

use shapes::Output;
use stream::{response_events, stream_response};

/// Words that are one token each, with their leading space, in both
/// encodings, so an output of N words is N tokens (checked in the tests).
const WORDS: [&str; 24] = [
    " the", " of", " and", " to", " in", " is", " that", " for", " it", " as", " with", " was",
    " on", " be", " by", " this", " are", " from", " at", " or", " an", " which", " have", " not",
];

/// The largest request body the simulator reads: twice the gateway's
/// default limit (`server.max_body_bytes`), so what a default gateway
/// forwards is read; a larger one is a 413 in OpenAI's shape.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Keys whose stats are kept apart; calls with further keys are counted
/// together under [`OTHER_KEYS`], so a flood of made-up keys costs bounded
/// memory.
pub const MAX_KEYS: usize = 10_000;
pub const OTHER_KEYS: &str = "(other keys)";

/// Latency and output defaults for every call.
#[derive(Clone, Copy, Debug)]
pub struct SimConfig {
    /// Time to the first token (or to the whole answer when not streaming).
    pub ttft: Duration,
    /// Delay between streamed tokens.
    pub token_delay: Duration,
    /// Output tokens per call when the request allows that many.
    pub output_tokens: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            ttft: Duration::ZERO,
            token_delay: Duration::ZERO,
            output_tokens: 16,
        }
    }
}

/// What the simulator served to one API key.
#[derive(Clone, Copy, Debug, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct KeyStats {
    /// Calls received (valid or not).
    pub requests: u64,
    /// Calls answered in full (a stream through its last event).
    pub completed: u64,
    /// Tokens of the usage reported to the client.
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

pub struct Simulator {
    catalog: Catalog,
    config: SimConfig,
    /// Per API key; the witness for audits.
    stats: Mutex<HashMap<String, KeyStats>>,
    /// Makes response ids unique and deterministic in order.
    next_id: AtomicU64,
    /// Requests being answered now, and the most there were at once.
    open: AtomicU64,
    peak_open: AtomicU64,
    /// Responses and stored chat completions, per key.
    stored: Mutex<stored::Stored>,
    /// What it answered, per day, project and model, for the Usage and
    /// Costs APIs ([`usage`]).
    books: Mutex<usage::Books>,
    /// The day those are counted in.
    clock: Arc<dyn crate::gateway::Clock>,
}

impl Simulator {
    pub fn new(catalog: Catalog, config: SimConfig) -> Arc<Self> {
        Simulator::with_clock(catalog, config, Arc::new(crate::gateway::SystemClock))
    }

    /// A simulator whose Usage and Costs APIs count days by `clock` (a
    /// test's, shared with its gateway).
    pub fn with_clock(
        catalog: Catalog,
        config: SimConfig,
        clock: Arc<dyn crate::gateway::Clock>,
    ) -> Arc<Self> {
        Arc::new(Simulator {
            catalog,
            config,
            stats: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            open: AtomicU64::new(0),
            peak_open: AtomicU64::new(0),
            stored: Mutex::new(stored::Stored::default()),
            books: Mutex::new(usage::Books::default()),
            clock,
        })
    }

    /// The most requests it was answering at once (until each answer's
    /// head was made: a stream's body runs on after).
    pub fn peak_open(&self) -> u64 {
        self.peak_open.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> HashMap<String, KeyStats> {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn record(&self, key: &str, f: impl FnOnce(&mut KeyStats)) {
        if let Ok(mut stats) = self.stats.lock() {
            let key = if stats.len() < MAX_KEYS || stats.contains_key(key) {
                key
            } else {
                OTHER_KEYS
            };
            f(stats.entry(key.to_owned()).or_default());
        }
    }
}

/// The simulator's routes.
pub fn router(sim: Arc<Simulator>) -> Router {
    Router::new()
        .route(
            "/v1/chat/completions",
            endpoint_route(Endpoint::ChatCompletions).get(stored::list_completions),
        )
        .route(
            "/v1/chat/completions/{id}",
            get(|s, p, h| stored::get(stored::Kind::Completion, s, p, h))
                .post(stored::update_completion)
                .delete(|s, p, h| stored::delete(stored::Kind::Completion, s, p, h)),
        )
        .route(
            "/v1/chat/completions/{id}/messages",
            get(|s, p, q, h| stored::items(stored::Kind::Completion, s, p, q, h)),
        )
        .route("/v1/responses", endpoint_route(Endpoint::Responses))
        .route(
            "/v1/responses/{id}",
            get(|s, p, h| stored::get(stored::Kind::Response, s, p, h))
                .delete(|s, p, h| stored::delete(stored::Kind::Response, s, p, h)),
        )
        .route("/v1/responses/{id}/cancel", post(stored::cancel_response))
        .route(
            "/v1/responses/{id}/input_items",
            get(|s, p, q, h| stored::items(stored::Kind::Response, s, p, q, h)),
        )
        .route("/v1/responses/input_tokens", post(input_tokens))
        .route("/v1/responses/compact", post(compact))
        .route("/v1/completions", endpoint_route(Endpoint::Completions))
        .route("/v1/embeddings", endpoint_route(Endpoint::Embeddings))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model).delete(delete_model))
        .route(
            "/v1/organization/usage/completions",
            get(usage::completions),
        )
        .route("/v1/organization/costs", get(usage::costs))
        .route("/stats", get(stats))
        .fallback(unknown_route)
        .layer(axum::middleware::from_fn_with_state(
            sim.clone(),
            count_open,
        ))
        .with_state(sim)
}

/// Keeps [`Simulator::peak_open`].
async fn count_open(
    State(sim): State<Arc<Simulator>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    /// Counts the request closed however it ends (a hang-up drops it).
    struct Open<'a>(&'a AtomicU64);
    impl Drop for Open<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let now = sim.open.fetch_add(1, Ordering::Relaxed) + 1;
    sim.peak_open.fetch_max(now, Ordering::Relaxed);
    let _open = Open(&sim.open);
    next.run(request).await
}

/// The faults and latency one request asks for.
#[derive(Default)]
struct Faults {
    status: Option<StatusCode>,
    cut_after: Option<usize>,
    no_usage: bool,
    stall: Option<Duration>,
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn faults(headers: &HeaderMap) -> Faults {
    let mut faults = Faults::default();
    let Some(value) = headers.get("x-sim-fault").and_then(|v| v.to_str().ok()) else {
        return faults;
    };
    for part in value.split(',').map(str::trim) {
        match part.split_once('=') {
            Some(("status", n)) => {
                faults.status = n.parse().ok().and_then(|n| StatusCode::from_u16(n).ok())
            }
            Some(("cut", n)) => faults.cut_after = n.parse().ok(),
            Some(("stall", ms)) => faults.stall = ms.parse().ok().map(limits::delay),
            None if part == "no-usage" => faults.no_usage = true,
            _ => {}
        }
    }
    faults
}

fn bearer(headers: &HeaderMap) -> Result<String, ApiError> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::gateway::auth::bearer_token)
        .map(str::to_owned)
        .ok_or(ApiError::Unauthorized("You didn't provide an API key."))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An error as the API sends it, with the headers a client retries by.
fn fault_response(status: StatusCode) -> Response {
    let (kind, code) = match status.as_u16() {
        429 => ("requests", Some("rate_limit_exceeded")),
        400..=499 => ("invalid_request_error", None),
        _ => ("server_error", None),
    };
    let body = json!({"error": {"message": format!("Simulated failure ({status})."), "type": kind, "param": null, "code": code}});
    let mut response = (status, Json(body)).into_response();
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// One call's plan: who asked, what it may produce, and how it misbehaves.
struct Call {
    key: String,
    /// The `OpenAI-Project` header it came with.
    project: Option<String>,
    endpoint: Endpoint,
    model: String,
    prompt_tokens: u64,
    output: Vec<answer::Choice>,
    /// Alternatives per token when log probabilities are asked for.
    logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
    faults: Faults,
    ttft: Duration,
    token_delay: Duration,
    body: Value,
}

impl Call {
    /// What the call produced, as the response shapes read it.
    fn output<'a>(&'a self, id: &'a str, created: u64) -> Output<'a> {
        Output {
            id,
            created,
            model: &self.model,
            choices: &self.output,
            prompt_tokens: self.prompt_tokens,
            logprobs: self.logprobs,
            request: &self.body,
        }
    }

    /// Output tokens of every choice.
    fn output_tokens(&self) -> u64 {
        self.output.iter().map(|c| c.tokens).sum()
    }
}

impl Simulator {
    fn plan(
        &self,
        endpoint: Endpoint,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<Call, Box<Response>> {
        let key = bearer(headers).map_err(|e| Box::new(e.into_response()))?;
        self.record(&key, |s| s.requests += 1);
        let faults = faults(headers);
        if let Some(status) = faults.status {
            return Err(Box::new(fault_response(status)));
        }
        let refuse = |e: ApiError| Box::new(e.into_response());
        let value = parse_body(body).map_err(|e| refuse(e.into()))?;
        let mut counted = count_request(&self.catalog, Some(endpoint), &value, None)
            .map_err(|e| refuse(e.into()))?;
        // A response that continues another is billed its input and
        // output again, as input, as OpenAI bills it.
        if let Some(previous) = value.get("previous_response_id").and_then(Value::as_str) {
            let tokens = self.previous_tokens(&key, previous).ok_or_else(|| {
                refuse(ApiError::InvalidRequest {
                    message: format!(
                        "Previous response with id '{}' not found.",
                        crate::excerpt(previous, 64)
                    ),
                    param: Some("previous_response_id".into()),
                    code: Some("previous_response_not_found"),
                })
            })?;
            counted.prompt.tokens += tokens;
        }
        let model = self
            .catalog
            .lookup(&counted.model)
            .map_err(|e| refuse(ApiError::ModelNotFound(e.to_string())))?;
        let served = model
            .model
            .served_as
            .clone()
            .unwrap_or_else(|| counted.model.clone());
        limits::check(endpoint, &value, &served).map_err(refuse)?;
        // The request's cap, else the model's largest output (also the
        // bound on what `x-sim-output-tokens` gets).
        let cap = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|k| value.get(*k).and_then(Value::as_u64))
            .or((endpoint == Endpoint::Completions).then_some(16))
            .unwrap_or(u64::MAX)
            .min(limits::output_limit(model.model.max_output));
        let wanted =
            header_u64(headers, "x-sim-output-tokens").unwrap_or(self.config.output_tokens);
        let output = answer::choices(
            &answer::Plan {
                endpoint,
                body: &value,
                encoding: model.model.encoding,
                seed: counted.prompt.tokens as usize,
                wanted,
                cap,
            },
            &|| self.next_id.fetch_add(1, Ordering::Relaxed),
        );
        let ms = |name: &str, default: Duration| {
            header_u64(headers, name).map_or(default, limits::delay)
        };
        let project = headers
            .get("openai-project")
            .and_then(|v| v.to_str().ok())
            .map(|p| crate::excerpt(p, 64));
        Ok(Call {
            key,
            project,
            endpoint,
            model: served,
            prompt_tokens: counted.prompt.tokens,
            output,
            logprobs: logprobs(endpoint, &value),
            stream: value
                .get("stream")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            include_usage: value
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            faults,
            ttft: ms("x-sim-ttft-ms", self.config.ttft),
            token_delay: ms("x-sim-token-ms", self.config.token_delay),
            body: value,
        })
    }

    /// Keep what the call made, as OpenAI keeps it ([`stored`]).
    /// `answer`: the whole response or chat completion (a stream's made
    /// only when it is kept).
    fn keep(&self, call: &Call, answer: impl FnOnce() -> Value) {
        match call.endpoint {
            Endpoint::Responses => self.keep_response(&call.key, &call.body, answer),
            Endpoint::ChatCompletions => self.keep_completion(&call.key, &call.body, answer),
            _ => {}
        }
    }

    fn id(&self, endpoint: Endpoint) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let prefix = match endpoint {
            Endpoint::ChatCompletions => "chatcmpl-",
            Endpoint::Responses => "resp_",
            Endpoint::Completions => "cmpl-",
            Endpoint::Embeddings => "emb-",
        };
        format!("{prefix}sim{n:016x}")
    }
}

/// How many alternatives each token lists, when log probabilities are
/// asked for: chat `logprobs: true` with `top_logprobs` (0-20), completions
/// `logprobs` (0-5).
fn logprobs(endpoint: Endpoint, body: &Value) -> Option<usize> {
    let n = |key: &str, max: u64| {
        body.get(key)
            .and_then(Value::as_u64)
            .map(|n| n.min(max) as usize)
    };
    match endpoint {
        Endpoint::ChatCompletions
            if body.get("logprobs").and_then(Value::as_bool) == Some(true) =>
        {
            Some(n("top_logprobs", 20).unwrap_or(0))
        }
        Endpoint::Completions => n("logprobs", 5),
        _ => None,
    }
}

fn with_headers(mut response: Response, started: std::time::Instant) -> Response {
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("req_sim{:x}", started.elapsed().as_nanos())) {
        headers.insert("x-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&started.elapsed().as_millis().to_string()) {
        headers.insert("openai-processing-ms", v);
    }
    response
}

async fn serve_call(
    sim: Arc<Simulator>,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = std::time::Instant::now();
    let call = match sim.plan(endpoint, &headers, &body) {
        Ok(call) => call,
        Err(response) => return *response,
    };
    if let Some(stall) = call.faults.stall {
        tokio::time::sleep(stall).await;
    }
    let id = sim.id(endpoint);
    let output = call.output(&id, now());
    if call.stream {
        // A Responses stream's events are made up front (they repeat the
        // whole response); chat and completions chunks as the stream
        // reaches them, so an open stream holds its call, not its events.
        let made = (call.endpoint == Endpoint::Responses).then(|| response_events(&call, &output));
        sim.keep(&call, || match call.endpoint {
            Endpoint::Responses => output.response(true),
            _ => output.chat_completion(),
        });
        let created = output.created;
        let response = stream_response(sim, call, id, created, made);
        return with_headers(response, started);
    }
    if !call.ttft.is_zero() {
        tokio::time::sleep(limits::answer_time(
            call.ttft,
            call.token_delay,
            call.output_tokens() as usize,
        ))
        .await;
    }
    let mut body = match endpoint {
        Endpoint::ChatCompletions => output.chat_completion(),
        Endpoint::Responses => output.response(true),
        Endpoint::Completions => output.text_completion(),
        Endpoint::Embeddings => return with_headers(embeddings_answer(&sim, &call), started),
    };
    sim.keep(&call, || body.clone());
    let completion = output.completion_tokens();
    if call.faults.no_usage {
        if let Some(map) = body.as_object_mut() {
            map.remove("usage");
        }
    }
    sim.record(&call.key, |s| {
        s.completed += 1;
        if !call.faults.no_usage {
            s.prompt_tokens += call.prompt_tokens;
            s.completion_tokens += completion;
            s.total_tokens += call.prompt_tokens + completion;
        }
    });
    sim.tally(
        call.project.as_deref(),
        &call.model,
        call.prompt_tokens,
        completion,
    );
    with_headers((StatusCode::OK, Json(body)).into_response(), started)
}

/// An embeddings answer, written as it is sent.
fn embeddings_answer(sim: &Simulator, call: &Call) -> Response {
    let usage = (!call.faults.no_usage).then_some(call.prompt_tokens);
    sim.record(&call.key, |s| {
        s.completed += 1;
        s.prompt_tokens += usage.unwrap_or(0);
        s.total_tokens += usage.unwrap_or(0);
    });
    sim.tally(call.project.as_deref(), &call.model, call.prompt_tokens, 0);
    embeddings::Answer::new(&call.body, &call.model, usage).response()
}

/// The route of one of the four endpoints the simulator serves.
fn endpoint_route(endpoint: Endpoint) -> axum::routing::MethodRouter<Arc<Simulator>> {
    post(
        move |State(sim): State<Arc<Simulator>>, headers: HeaderMap, body: Body| async move {
            match crate::gateway::routes::read_body(body, MAX_BODY_BYTES).await {
                Ok(body) => serve_call(sim, endpoint, headers, body).await,
                Err(e) => e.into_response(),
            }
        },
    )
}

async fn models(State(sim): State<Arc<Simulator>>, headers: HeaderMap) -> Response {
    if let Err(e) = bearer(&headers) {
        return e.into_response();
    }
    let data: Vec<Value> = sim
        .catalog
        .models
        .iter()
        .filter(|m| !m.name.contains('*'))
        .map(|m| json!({"id": m.name, "object": "model", "created": 1_700_000_000, "owned_by": "system"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `POST /v1/responses/input_tokens`: what the request's input would count.
async fn input_tokens(
    State(sim): State<Arc<Simulator>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let counted = bearer(&headers).and_then(|key| {
        let value = parse_body(&body)?;
        let mut counted = count_request(&sim.catalog, Some(Endpoint::Responses), &value, None)?;
        if let Some(previous) = value.get("previous_response_id").and_then(Value::as_str) {
            counted.prompt.tokens += sim.previous_tokens(&key, previous).unwrap_or(0);
        }
        Ok(counted.prompt.tokens)
    });
    match counted {
        Ok(n) => {
            Json(json!({"object": "response.input_tokens", "input_tokens": n})).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/responses/compact`: the input's user messages and one
/// compaction item standing for the rest; billed as a call of the model.
async fn compact(State(sim): State<Arc<Simulator>>, headers: HeaderMap, body: Bytes) -> Response {
    let call = match sim.plan(Endpoint::Responses, &headers, &body) {
        Ok(call) => call,
        Err(response) => return *response,
    };
    let id = sim.id(Endpoint::Responses);
    let output = call.output(&id, now());
    let mut items: Vec<Value> = stored::input_items(call.body.get("input"), &id)
        .into_iter()
        .filter(|i| i["role"] == "user")
        .collect();
    let summary = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        output.answer_text(),
    );
    items.push(json!({"type": "compaction", "id": format!("cmp_{}", id.trim_start_matches("resp_")), "encrypted_content": summary}));
    let usage = output.responses_usage();
    sim.record(&call.key, |s| {
        s.completed += 1;
        s.prompt_tokens += call.prompt_tokens;
        s.completion_tokens += output.completion_tokens();
        s.total_tokens += call.prompt_tokens + output.completion_tokens();
    });
    sim.tally(
        call.project.as_deref(),
        &call.model,
        call.prompt_tokens,
        output.completion_tokens(),
    );
    Json(json!({"id": id, "object": "response.compaction", "created_at": output.created, "output": items, "usage": usage}))
        .into_response()
}

/// `GET /v1/models/{id}`: a model of the catalog, else OpenAI's 404.
async fn model(
    State(sim): State<Arc<Simulator>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = bearer(&headers) {
        return e.into_response();
    }
    if id.contains('*') || sim.catalog.lookup(&id).is_err() {
        return ApiError::ModelNotFound(format!(
            "The model '{}' does not exist or you do not have access to it.",
            crate::excerpt(&id, 128)
        ))
        .into_response();
    }
    Json(json!({"id": id, "object": "model", "created": 1_700_000_000, "owned_by": "system"}))
        .into_response()
}

/// `DELETE /v1/models/{id}`: a fine-tuned model (`ft:...`) is deleted; a
/// base model is OpenAI's 403.
async fn delete_model(
    State(sim): State<Arc<Simulator>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = bearer(&headers) {
        return e.into_response();
    }
    if !id.starts_with("ft:") || sim.catalog.lookup(&id).is_err() {
        return ApiError::PermissionDenied(format!(
            "You have insufficient permissions to delete model '{}'.",
            crate::excerpt(&id, 128)
        ))
        .into_response();
    }
    Json(json!({"id": id, "object": "model", "deleted": true})).into_response()
}

/// Any other path: OpenAI's 404, counted against the key that asked.
async fn unknown_route(
    State(sim): State<Arc<Simulator>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    match bearer(&headers) {
        Ok(key) => sim.record(&key, |s| s.requests += 1),
        Err(e) => return e.into_response(),
    }
    ApiError::UnknownRoute {
        method: method.to_string(),
        path: uri.path().to_owned(),
    }
    .into_response()
}

async fn stats(State(sim): State<Arc<Simulator>>) -> Response {
    Json(json!({"keys": sim.stats()})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::Encoding;

    /// The data of every event of a streamed call to `endpoint`.
    async fn streamed(endpoint: Endpoint, body: Value) -> Vec<String> {
        use http_body_util::BodyExt;
        let sim = Simulator::new(
            crate::catalog::Catalog::builtin().unwrap_or_else(|e| panic!("{e}")),
            SimConfig::default(),
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sk-test"),
        );
        let response = serve_call(sim, endpoint, headers, Bytes::from(body.to_string())).await;
        assert_eq!(response.status(), StatusCode::OK);
        let bytes = response
            .into_body()
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .to_bytes();
        let text = String::from_utf8(bytes.to_vec()).unwrap_or_else(|e| panic!("{e}"));
        assert!(text.ends_with("\n\n"), "{text}");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap_or(e).to_owned())
            .collect()
    }

    /// Chat and completions chunks, made one at a time: in OpenAI's order,
    /// each token once, the usage chunk only when asked for, `[DONE]` last.
    #[tokio::test]
    async fn stream_chunks_come_in_openais_order() {
        for usage in [false, true] {
            let chat = streamed(
                Endpoint::ChatCompletions,
                json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 5,
                       "stream_options": {"include_usage": usage},
                       "messages": [{"role": "user", "content": "Hi"}]}),
            )
            .await;
            assert_eq!(chat.len(), 1 + 5 + 1 + usize::from(usage) + 1, "{chat:?}");
            assert_eq!(chat.last().map(String::as_str), Some("[DONE]"));
            let chunks: Vec<Value> = chat[..chat.len() - 1]
                .iter()
                .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
                .collect();
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            for chunk in &chunks[1..6] {
                let token = chunk["choices"][0]["delta"]["content"].as_str();
                assert!(token.is_some_and(|t| WORDS.contains(&t)), "{chunk}");
            }
            assert_eq!(chunks[6]["choices"][0]["finish_reason"], "length");
            if usage {
                assert_eq!(chunks[7]["choices"], json!([]));
                assert_eq!(chunks[7]["usage"]["completion_tokens"], 5);
            }
            assert!(chunks
                .iter()
                .all(|c| c["id"] == chunks[0]["id"] && c["created"] == chunks[0]["created"]));

            let completions = streamed(
                Endpoint::Completions,
                json!({"model": "gpt-3.5-turbo", "stream": true, "max_tokens": 3,
                       "stream_options": {"include_usage": usage}, "prompt": "Hi"}),
            )
            .await;
            assert_eq!(
                completions.len(),
                3 + 1 + usize::from(usage) + 1,
                "{completions:?}"
            );
            assert_eq!(completions.last().map(String::as_str), Some("[DONE]"));
            let chunks: Vec<Value> = completions[..completions.len() - 1]
                .iter()
                .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
                .collect();
            assert!(chunks[..3]
                .iter()
                .all(|c| c["choices"][0]["finish_reason"].is_null()));
            assert_eq!(chunks[3]["choices"][0]["finish_reason"], "length");
            if usage {
                assert_eq!(chunks[4]["usage"]["completion_tokens"], 3);
            }
        }
    }

    #[test]
    fn stats_keep_at_most_max_keys_apart() {
        let sim = Simulator::new(
            crate::catalog::Catalog::builtin().unwrap_or_else(|e| panic!("{e}")),
            SimConfig::default(),
        );
        for i in 0..MAX_KEYS + 50 {
            sim.record(&format!("sk-{i}"), |s| s.requests += 1);
        }
        sim.record("sk-0", |s| s.requests += 1);
        let stats = sim.stats();
        assert_eq!(stats.len(), MAX_KEYS + 1);
        assert_eq!(stats.get(OTHER_KEYS).map(|s| s.requests), Some(50));
        assert_eq!(stats.get("sk-0").map(|s| s.requests), Some(2));
    }

    #[test]
    fn every_word_is_one_token_in_both_encodings() {
        for encoding in Encoding::ALL {
            for word in WORDS {
                assert_eq!(encoding.count(word), 1, "{word:?} in {}", encoding.name());
            }
            assert_eq!(encoding.count(&WORDS.concat()), WORDS.len() as u64);
        }
    }
}
