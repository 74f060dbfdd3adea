//! A whole request body's prompt, counted as the API bills it, and the output
//! it may produce.
//!
//! - Chat Completions: OpenAI's cookbook formula, 3 tokens per message plus
//!   the tokens of each field's value, 1 more for a `name`, 3 to prime the
//!   reply; content parts by kind; tool definitions by the cookbook's
//!   per-function and per-property constants; images by [`super::image`].
//! - Responses: `instructions` and `input` (a string or items) as messages,
//!   the same tool formula on flattened function tools.
//! - Completions and Embeddings: a string, an array of strings, an array of
//!   token ids or an array of such arrays.
//!
//! Each endpoint has its submodule (`chat`, `tools`, `responses`, `inputs`).
//! A malformed body is an error that names the parameter, in the words and
//! codes OpenAI uses, so the gateway can return it as a 400 as it is.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::catalog::{format_usd, Catalog, Kind, ModelRef, Picodollars, UnknownModel};
use crate::tokens::{Count, Encoding};

mod chat;
mod inputs;
mod responses;
mod tools;

/// The metered endpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Endpoint {
    #[serde(rename = "/v1/chat/completions")]
    ChatCompletions,
    #[serde(rename = "/v1/responses")]
    Responses,
    #[serde(rename = "/v1/completions")]
    Completions,
    #[serde(rename = "/v1/embeddings")]
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Responses => "/v1/responses",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    /// A path (`/v1/chat/completions`) or a short name (`chat`, `responses`,
    /// `completions`, `embeddings`).
    pub fn parse(name: &str) -> Option<Endpoint> {
        let name = name.trim_start_matches('/').trim_start_matches("v1/");
        match name {
            "chat" | "chat/completions" => Some(Endpoint::ChatCompletions),
            "responses" => Some(Endpoint::Responses),
            "completions" => Some(Endpoint::Completions),
            "embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
    }
}

/// A request that cannot be counted, in OpenAI's error vocabulary.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A 400 `invalid_request_error`.
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    /// A 404 `model_not_found`.
    #[error(transparent)]
    UnknownModel(#[from] UnknownModel),
}

impl RequestError {
    pub fn param(&self) -> Option<&str> {
        match self {
            RequestError::Invalid { param, .. } => param.as_deref(),
            RequestError::UnknownModel(_) => Some("model"),
        }
    }

    pub fn code(&self) -> Option<&'static str> {
        match self {
            RequestError::Invalid { code, .. } => *code,
            RequestError::UnknownModel(_) => Some("model_not_found"),
        }
    }
}

fn invalid(
    message: impl Into<String>,
    param: impl Into<String>,
    code: &'static str,
) -> RequestError {
    RequestError::Invalid {
        message: message.into(),
        param: Some(param.into()),
        code: Some(code),
    }
}

fn missing(param: &str) -> RequestError {
    invalid(
        format!("Missing required parameter: '{param}'."),
        param,
        "missing_required_parameter",
    )
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> RequestError {
    invalid(
        format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            type_name(got)
        ),
        param,
        "invalid_type",
    )
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a decimal",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What a request will cost at most, before it is sent.
#[derive(Clone, Debug, Serialize)]
pub struct RequestCount {
    pub endpoint: Endpoint,
    /// The model as the request names it.
    pub model: String,
    pub encoding: Encoding,
    /// The program group, or `None` when the model is always billed.
    pub group: Option<std::sync::Arc<str>>,
    pub prompt: Count,
    /// The most output tokens the request allows (all choices together).
    pub output_cap: u64,
    /// Where `output_cap` comes from: a request field or the model's largest output.
    pub output_cap_source: &'static str,
    /// The prompt at list price (uncached), in pico-dollars.
    pub prompt_list_price: Picodollars,
}

impl RequestCount {
    /// What the meter reserves: the prompt plus the largest output.
    pub fn reservation(&self) -> u64 {
        self.prompt.tokens.saturating_add(self.output_cap)
    }

    pub fn prompt_list_price_usd(&self) -> String {
        format_usd(self.prompt_list_price)
    }
}

/// Parse a body and count it; `endpoint` is guessed from the body when `None`.
pub fn count_body(
    catalog: &Catalog,
    endpoint: Option<Endpoint>,
    body: &[u8],
    default_model: Option<&str>,
) -> Result<RequestCount, RequestError> {
    let value = parse_body(body)?;
    count_request(catalog, endpoint, &value, default_model)
}

/// Parse a body as UTF-8 JSON, with OpenAI's messages for what is wrong.
pub fn parse_body(body: &[u8]) -> Result<Value, RequestError> {
    let text = std::str::from_utf8(body).map_err(|e| RequestError::Invalid {
        message: format!(
            "The request body is not valid UTF-8 (at byte {}).",
            e.valid_up_to()
        ),
        param: None,
        code: None,
    })?;
    serde_json::from_str(text).map_err(|e| RequestError::Invalid {
        message: format!(
            "We could not parse the JSON body of your request: {e}. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        ),
        param: None,
        code: None,
    })
}

/// The longest model name a request may give, in bytes: OpenAI's longest
/// (fine-tuned names included) are under 100. Longer names are a 400 before
/// any lookup, so no name costs more than a short one to look up, suggest
/// for, log or keep in the ledger.
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// Count a parsed body; `endpoint` is guessed from the body when `None`.
pub fn count_request(
    catalog: &Catalog,
    endpoint: Option<Endpoint>,
    body: &Value,
    default_model: Option<&str>,
) -> Result<RequestCount, RequestError> {
    let Value::Object(body) = body else {
        return Err(RequestError::Invalid {
            message: format!(
                "The request body must be a JSON object, but got {} instead.",
                type_name(body)
            ),
            param: None,
            code: Some("invalid_type"),
        });
    };
    let model_name = match body.get("model") {
        Some(Value::String(name)) if !name.is_empty() => name.as_str(),
        None | Some(Value::Null) => match default_model {
            Some(name) => name,
            None => {
                return Err(RequestError::Invalid {
                    message: "you must provide a model parameter".into(),
                    param: None,
                    code: None,
                })
            }
        },
        Some(other) => return Err(wrong_type("model", "a string", other)),
    };
    if model_name.len() > MAX_MODEL_NAME_BYTES {
        return Err(RequestError::Invalid {
            message: format!(
                "Invalid 'model': string too long. Expected a string with maximum length {MAX_MODEL_NAME_BYTES}, but got a string with length {} instead.",
                model_name.len()
            ),
            param: Some("model".into()),
            code: Some("string_above_max_length"),
        });
    }
    let model = catalog.lookup(model_name)?;
    let endpoint = match endpoint {
        Some(endpoint) => endpoint,
        None => guess_endpoint(body, &model)?,
    };
    let counter = Counter {
        encoding: model.model.encoding,
        model,
    };
    let (prompt, output_cap, output_cap_source) = match endpoint {
        Endpoint::ChatCompletions => counter.chat(body)?,
        Endpoint::Responses => counter.responses(body)?,
        Endpoint::Completions => counter.completions(body)?,
        Endpoint::Embeddings => counter.embeddings(body)?,
    };
    Ok(RequestCount {
        endpoint,
        model: model_name.to_owned(),
        encoding: model.model.encoding,
        group: model.group().map(|g| g.name.clone()),
        prompt_list_price: model.prices().cost(prompt.tokens, 0, 0),
        prompt,
        output_cap,
        output_cap_source,
    })
}

fn guess_endpoint(
    body: &Map<String, Value>,
    model: &ModelRef<'_>,
) -> Result<Endpoint, RequestError> {
    if body.contains_key("messages") {
        Ok(Endpoint::ChatCompletions)
    } else if body.contains_key("prompt") {
        Ok(Endpoint::Completions)
    } else if body.contains_key("input") && model.model.kind == Kind::Embedding {
        Ok(Endpoint::Embeddings)
    } else if body.contains_key("input") || body.contains_key("previous_response_id") {
        Ok(Endpoint::Responses)
    } else {
        Err(RequestError::Invalid {
            message: "Cannot tell which endpoint this body is for: it has none of 'messages', 'input' or 'prompt'.".into(),
            param: None,
            code: None,
        })
    }
}

const NOTE_TOOLS: &str = "tool definitions use the OpenAI cookbook's estimate";
const NOTE_SCHEMA: &str = "nested schemas and response formats are estimated from their JSON";
const NOTE_IMAGE_URL: &str = "an image by URL or file id is counted at its largest cost";
const NOTE_IMAGE_AUTO: &str = "an image with detail auto is counted as detail high";
const NOTE_OTHER_PARTS: &str = "audio and file inputs are not in the count";
const NOTE_PREVIOUS: &str =
    "the context of previous_response_id or conversation is not in the body";
const NOTE_RESPONSES: &str =
    "Responses API message framing is assumed to match Chat Completions' (OpenAI documents no formula)";
const NOTE_ITEMS: &str = "Responses items other than messages are estimated from their text";
const NOTE_BUILTIN_TOOLS: &str =
    "built-in tools (web search, file search, ...) add tokens not counted here";

/// Tokens the chat format adds around each message and to prime the reply.
const TOKENS_PER_MESSAGE: u64 = 3;
const TOKENS_PER_NAME: u64 = 1;
const REPLY_PRIMING: u64 = 3;

/// Counts one request's parts; each endpoint's rules live in a submodule
/// (`chat`, `tools`, `responses`, `inputs`).
struct Counter<'a> {
    /// The model's encoding, which every text part is counted in.
    encoding: Encoding,
    /// The resolved model: its image constants and largest output.
    model: ModelRef<'a>,
}

/// An endpoint's result: the prompt, the output cap, and where the cap comes from.
type Counted = (Count, u64, &'static str);

impl Counter<'_> {
    fn text(&self, text: &str) -> u64 {
        self.encoding.count(text)
    }

    /// Tokens of a JSON value's compact text (for parts with no formula).
    fn json_text(&self, value: &Value) -> u64 {
        match value {
            Value::Null => 0,
            Value::String(s) => self.text(s),
            other => self.text(&other.to_string()),
        }
    }
}

/// An optional integer field that must be at least 1.
fn positive_integer(body: &Map<String, Value>, key: &str) -> Result<Option<u64>, RequestError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v >= 1 => Ok(Some(v)),
            _ => Err(invalid(
                format!("Invalid value for '{key}': integer below minimum value. Expected a value >= 1, but got {n} instead."),
                key,
                "integer_below_min_value",
            )),
        },
        Some(other) => Err(wrong_type(key, "an integer", other)),
    }
}
