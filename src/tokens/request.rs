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
//! A malformed body is an error that names the parameter, in the words and
//! codes OpenAI uses, so the gateway can return it as a 400 as it is.

use serde::Serialize;
use serde_json::{Map, Value};

use crate::catalog::{format_usd, Catalog, Kind, ModelRef, Picodollars, UnknownModel};
use crate::tokens::image::{data_url_size, image_tokens, Detail};
use crate::tokens::{Count, Encoding, Exactness};

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
    pub group: Option<String>,
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
    let text = std::str::from_utf8(body).map_err(|e| RequestError::Invalid {
        message: format!(
            "The request body is not valid UTF-8 (at byte {}).",
            e.valid_up_to()
        ),
        param: None,
        code: None,
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| RequestError::Invalid {
        message: format!(
            "We could not parse the JSON body of your request: {e}. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
        ),
        param: None,
        code: None,
    })?;
    count_request(catalog, endpoint, &value, default_model)
}

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

struct Counter<'a> {
    encoding: Encoding,
    model: ModelRef<'a>,
}

type Counted = (Count, u64, &'static str);

impl Counter<'_> {
    fn text(&self, text: &str) -> u64 {
        self.encoding.count(text)
    }

    // ---- Chat Completions ------------------------------------------------

    fn chat(&self, body: &Map<String, Value>) -> Result<Counted, RequestError> {
        let messages = match body.get("messages") {
            None | Some(Value::Null) => return Err(missing("messages")),
            Some(Value::Array(messages)) => messages,
            Some(other) => return Err(wrong_type("messages", "an array", other)),
        };
        if messages.is_empty() {
            return Err(invalid(
                "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
                "messages",
                "empty_array",
            ));
        }
        let mut count = Count::exact(REPLY_PRIMING);
        for (i, message) in messages.iter().enumerate() {
            count.merge(self.chat_message(message, &format!("messages[{i}]"))?);
        }
        self.tools(body, &mut count)?;
        self.response_format(body.get("response_format"), &mut count);
        let n = positive_integer(body, "n")?.unwrap_or(1);
        let (cap, source) = match positive_integer(body, "max_completion_tokens")? {
            Some(cap) => (cap, "max_completion_tokens"),
            None => match positive_integer(body, "max_tokens")? {
                Some(cap) => (cap, "max_tokens"),
                None => (self.model.model.max_output, "model maximum"),
            },
        };
        Ok((count, cap.saturating_mul(n), source))
    }

    fn chat_message(&self, message: &Value, param: &str) -> Result<Count, RequestError> {
        let Value::Object(message) = message else {
            return Err(wrong_type(param, "an object", message));
        };
        match message.get("role") {
            Some(Value::String(role))
                if matches!(role.as_str(), "system" | "developer" | "user" | "assistant" | "tool" | "function") => {}
            Some(Value::String(role)) => {
                return Err(invalid(
                    format!("Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and 'developer'."),
                    format!("{param}.role"),
                    "invalid_value",
                ))
            }
            None => return Err(missing(&format!("{param}.role"))),
            Some(other) => return Err(wrong_type(&format!("{param}.role"), "a string", other)),
        }
        let mut count = Count::exact(TOKENS_PER_MESSAGE);
        for (key, value) in message {
            let field = format!("{param}.{key}");
            match (key.as_str(), value) {
                (_, Value::Null) => {}
                ("content", Value::Array(parts)) => {
                    for (j, part) in parts.iter().enumerate() {
                        count.merge(self.content_part(part, &format!("{field}[{j}]"))?);
                    }
                }
                ("content", Value::String(text)) => count.add(self.text(text)),
                ("content", other) => {
                    return Err(wrong_type(
                        &field,
                        "one of a string or array of objects",
                        other,
                    ))
                }
                ("name", Value::String(name)) => count.add(self.text(name) + TOKENS_PER_NAME),
                (_, Value::String(text)) => count.add(self.text(text)),
                // tool_calls, function_call, audio: their text, as an estimate.
                (_, other) => {
                    let tokens = self.json_text(other);
                    if tokens > 0 {
                        count.add_inexact(tokens, Exactness::Estimate, NOTE_SCHEMA);
                    }
                }
            }
        }
        Ok(count)
    }

    /// One content part of a chat message or a Responses input message.
    fn content_part(&self, part: &Value, param: &str) -> Result<Count, RequestError> {
        let Value::Object(part) = part else {
            if let Value::String(text) = part {
                return Ok(Count::exact(self.text(text)));
            }
            return Err(wrong_type(param, "an object", part));
        };
        let kind = match part.get("type") {
            Some(Value::String(kind)) => kind.as_str(),
            None => return Err(missing(&format!("{param}.type"))),
            Some(other) => return Err(wrong_type(&format!("{param}.type"), "a string", other)),
        };
        match kind {
            "text" | "input_text" | "output_text" | "refusal" => {
                let key = if kind == "refusal" { "refusal" } else { "text" };
                match part.get(key) {
                    Some(Value::String(text)) => Ok(Count::exact(self.text(text))),
                    None => Err(missing(&format!("{param}.{key}"))),
                    Some(other) => Err(wrong_type(&format!("{param}.{key}"), "a string", other)),
                }
            }
            "image_url" => {
                let (url, detail) = match part.get("image_url") {
                    Some(Value::Object(image)) => (image.get("url"), image.get("detail")),
                    Some(url @ Value::String(_)) => (Some(url), None),
                    None => return Err(missing(&format!("{param}.image_url"))),
                    Some(other) => {
                        return Err(wrong_type(
                            &format!("{param}.image_url"),
                            "an object",
                            other,
                        ))
                    }
                };
                let url = match url {
                    Some(Value::String(url)) => Some(url.as_str()),
                    None => return Err(missing(&format!("{param}.image_url.url"))),
                    Some(other) => {
                        return Err(wrong_type(
                            &format!("{param}.image_url.url"),
                            "a string",
                            other,
                        ))
                    }
                };
                self.image(url, detail, &format!("{param}.image_url.detail"))
            }
            "input_image" => {
                let url = match part.get("image_url") {
                    Some(Value::String(url)) => Some(url.as_str()),
                    None | Some(Value::Null) => None,
                    Some(other) => {
                        return Err(wrong_type(&format!("{param}.image_url"), "a string", other))
                    }
                };
                self.image(url, part.get("detail"), &format!("{param}.detail"))
            }
            _ => {
                let mut count = Count::exact(0);
                count.add_inexact(0, Exactness::Estimate, NOTE_OTHER_PARTS);
                Ok(count)
            }
        }
    }

    fn image(
        &self,
        url: Option<&str>,
        detail: Option<&Value>,
        param: &str,
    ) -> Result<Count, RequestError> {
        let detail = match detail {
            None | Some(Value::Null) => Detail::parse(None),
            Some(Value::String(d)) => Detail::parse(Some(d)),
            Some(other) => return Err(wrong_type(param, "a string", other)),
        }
        .ok_or_else(|| {
            invalid(
                "Invalid value for 'detail': expected one of 'low', 'high' or 'auto'.",
                param,
                "invalid_value",
            )
        })?;
        let mut count = Count::exact(0);
        let Some(cost) = self.model.model.images else {
            // The model takes no images; upstream will refuse the call.
            return Ok(count);
        };
        let size = url.and_then(data_url_size);
        let (tokens, exactness) = image_tokens(cost, detail, size);
        match exactness {
            Exactness::Exact => count.add(tokens),
            _ if size.is_none() => count.add_inexact(tokens, exactness, NOTE_IMAGE_URL),
            _ => count.add_inexact(tokens, exactness, NOTE_IMAGE_AUTO),
        }
        Ok(count)
    }

    /// Tool definitions: `tools` (Chat's nested and Responses' flat function
    /// shapes) and the legacy `functions`.
    fn tools(&self, body: &Map<String, Value>, count: &mut Count) -> Result<(), RequestError> {
        // The cookbook's constants; cl100k models were measured with 10 at the start of a function.
        let func_init: u64 = if self.encoding == Encoding::Cl100kBase {
            10
        } else {
            7
        };
        let (prop_init, prop_key, enum_item, func_end): (u64, u64, u64, u64) = (3, 3, 3, 12);
        let enum_init: i64 = -3;

        let mut functions: Vec<(&Map<String, Value>, String)> = Vec::new();
        for key in ["tools", "functions"] {
            let list = match body.get(key) {
                None | Some(Value::Null) => continue,
                Some(Value::Array(list)) => list,
                Some(other) => return Err(wrong_type(key, "an array", other)),
            };
            for (i, tool) in list.iter().enumerate() {
                let param = format!("{key}[{i}]");
                let Value::Object(tool) = tool else {
                    return Err(wrong_type(&param, "an object", tool));
                };
                let is_function = key == "functions"
                    || tool.get("type").and_then(Value::as_str) == Some("function");
                if !is_function {
                    count.add_inexact(0, Exactness::Estimate, NOTE_BUILTIN_TOOLS);
                    continue;
                }
                // Chat nests the definition under "function"; Responses and "functions" do not.
                let (def, def_param) = match tool.get("function") {
                    Some(Value::Object(def)) => (def, format!("{param}.function")),
                    Some(other) => {
                        return Err(wrong_type(&format!("{param}.function"), "an object", other))
                    }
                    None => (tool, param),
                };
                functions.push((def, def_param));
            }
        }
        if functions.is_empty() {
            return Ok(());
        }
        let mut tokens: i64 = 0;
        for (def, param) in functions {
            let name = match def.get("name") {
                Some(Value::String(name)) => name.as_str(),
                None => return Err(missing(&format!("{param}.name"))),
                Some(other) => return Err(wrong_type(&format!("{param}.name"), "a string", other)),
            };
            let description = def
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let description = description.strip_suffix('.').unwrap_or(description);
            tokens += func_init as i64 + self.text(&format!("{name}:{description}")) as i64;
            let properties = def
                .get("parameters")
                .and_then(|p| p.get("properties"))
                .and_then(Value::as_object);
            let Some(properties) = properties.filter(|p| !p.is_empty()) else {
                continue;
            };
            tokens += prop_init as i64;
            for (key, property) in properties {
                tokens += prop_key as i64;
                let p_type = match property.get("type") {
                    Some(Value::String(t)) => t.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                let p_desc = property
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if let Some(Value::Array(items)) = property.get("enum") {
                    tokens += enum_init;
                    for item in items {
                        tokens += enum_item as i64;
                        tokens += match item {
                            Value::String(s) => self.text(s),
                            other => self.text(&other.to_string()),
                        } as i64;
                    }
                }
                let p_desc = p_desc.strip_suffix('.').unwrap_or(p_desc);
                tokens += self.text(&format!("{key}:{p_type}:{p_desc}")) as i64;
                for nested in ["properties", "items", "anyOf", "oneOf", "allOf"] {
                    if let Some(schema) = property.get(nested) {
                        count.add_inexact(self.json_text(schema), Exactness::Estimate, NOTE_SCHEMA);
                    }
                }
            }
        }
        tokens += func_end as i64;
        count.add_inexact(tokens.max(0) as u64, Exactness::Estimate, NOTE_TOOLS);
        Ok(())
    }

    /// A JSON schema in `response_format` (Chat) or `text.format` (Responses).
    fn response_format(&self, format: Option<&Value>, count: &mut Count) {
        if let Some(schema) = format.and_then(|f| f.get("json_schema").or_else(|| f.get("schema")))
        {
            count.add_inexact(self.json_text(schema), Exactness::Estimate, NOTE_SCHEMA);
        }
    }

    /// Tokens of a JSON value's compact text (for parts with no formula).
    fn json_text(&self, value: &Value) -> u64 {
        match value {
            Value::Null => 0,
            Value::String(s) => self.text(s),
            other => self.text(&other.to_string()),
        }
    }

    // ---- Responses -----------------------------------------------------

    fn responses(&self, body: &Map<String, Value>) -> Result<Counted, RequestError> {
        let mut count = Count::exact(REPLY_PRIMING);
        count.add_inexact(0, Exactness::Estimate, NOTE_RESPONSES);
        match body.get("instructions") {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => {
                count.add(TOKENS_PER_MESSAGE + self.text("developer") + self.text(text))
            }
            Some(other) => return Err(wrong_type("instructions", "a string", other)),
        }
        let has_context = ["previous_response_id", "conversation", "prompt"]
            .iter()
            .any(|key| body.get(*key).is_some_and(|v| !v.is_null()));
        match body.get("input") {
            None | Some(Value::Null) if has_context => {}
            None | Some(Value::Null) => return Err(missing("input")),
            Some(Value::String(text)) => {
                count.add(TOKENS_PER_MESSAGE + self.text("user") + self.text(text))
            }
            Some(Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    count.merge(self.response_item(item, &format!("input[{i}]"))?);
                }
            }
            Some(other) => return Err(wrong_type("input", "a string or an array", other)),
        }
        if has_context {
            count.add_inexact(0, Exactness::Estimate, NOTE_PREVIOUS);
        }
        self.tools(body, &mut count)?;
        self.response_format(body.get("text").and_then(|t| t.get("format")), &mut count);
        let (cap, source) = match positive_integer(body, "max_output_tokens")? {
            Some(cap) => (cap, "max_output_tokens"),
            None => (self.model.model.max_output, "model maximum"),
        };
        Ok((count, cap, source))
    }

    fn response_item(&self, item: &Value, param: &str) -> Result<Count, RequestError> {
        let Value::Object(fields) = item else {
            return Err(wrong_type(param, "an object", item));
        };
        let kind = fields.get("type").and_then(Value::as_str);
        if kind.is_none_or(|k| k == "message") && fields.contains_key("role") {
            return self.chat_message(item, param);
        }
        // function_call, function_call_output, reasoning, item_reference, ...:
        // their text fields, with the framing of a message.
        let mut count = Count::exact(0);
        let text: u64 = fields
            .iter()
            .filter(|(key, _)| !matches!(key.as_str(), "type" | "id" | "call_id" | "status"))
            .map(|(_, value)| self.json_text(value))
            .sum();
        count.add_inexact(TOKENS_PER_MESSAGE + text, Exactness::Estimate, NOTE_ITEMS);
        Ok(count)
    }

    // ---- Completions and Embeddings -------------------------------------

    fn completions(&self, body: &Map<String, Value>) -> Result<Counted, RequestError> {
        let (mut count, prompts) = self.inputs(body, "prompt")?;
        if let Some(Value::String(suffix)) = body.get("suffix") {
            count.add(self.text(suffix));
        }
        let n = positive_integer(body, "n")?.unwrap_or(1);
        let best_of = positive_integer(body, "best_of")?.unwrap_or(1);
        // The legacy endpoint's default output cap is 16 tokens.
        let (cap, source) = match positive_integer(body, "max_tokens")? {
            Some(cap) => (cap, "max_tokens"),
            None => (16, "completions default"),
        };
        let choices = n.max(best_of).saturating_mul(prompts);
        Ok((count, cap.saturating_mul(choices), source))
    }

    fn embeddings(&self, body: &Map<String, Value>) -> Result<Counted, RequestError> {
        let (count, _) = self.inputs(body, "input")?;
        Ok((count, 0, "embeddings produce no output"))
    }

    /// A string, an array of strings, an array of token ids, or an array of
    /// arrays of token ids; returns the count and the number of inputs.
    fn inputs(&self, body: &Map<String, Value>, key: &str) -> Result<(Count, u64), RequestError> {
        let expected =
            "a string, array of strings, array of integers, or array of arrays of integers";
        let value = match body.get(key) {
            None | Some(Value::Null) => return Err(missing(key)),
            Some(value) => value,
        };
        let tokens_of = |value: &Value, param: &str| -> Result<u64, RequestError> {
            match value {
                Value::String(text) => Ok(self.text(text)),
                Value::Array(ids) => {
                    for (k, id) in ids.iter().enumerate() {
                        if !id.is_u64() {
                            return Err(wrong_type(
                                &format!("{param}[{k}]"),
                                "an integer token id",
                                id,
                            ));
                        }
                    }
                    Ok(ids.len() as u64)
                }
                other => Err(wrong_type(param, expected, other)),
            }
        };
        match value {
            Value::String(text) => Ok((Count::exact(self.text(text)), 1)),
            Value::Array(items) if items.is_empty() => Err(invalid(
                format!("Invalid '{key}': empty array. Expected an array with minimum length 1, but got an empty array instead."),
                key,
                "empty_array",
            )),
            // An array of token ids is one input.
            Value::Array(items) if items.iter().all(Value::is_number) => Ok((Count::exact(tokens_of(value, key)?), 1)),
            Value::Array(items) => {
                let mut total = 0u64;
                for (i, item) in items.iter().enumerate() {
                    let param = format!("{key}[{i}]");
                    if !matches!(item, Value::String(_) | Value::Array(_)) {
                        return Err(wrong_type(&param, "a string or an array of integers", item));
                    }
                    total = total.saturating_add(tokens_of(item, &param)?);
                }
                Ok((Count::exact(total), items.len() as u64))
            }
            other => Err(wrong_type(key, expected, other)),
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
