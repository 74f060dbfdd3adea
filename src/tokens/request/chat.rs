//! Chat Completions: messages by OpenAI's cookbook formula, content parts, images.

use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::{
    invalid, missing, positive_integer, wrong_type, Counted, Counter, RequestError,
    NOTE_IMAGE_AUTO, NOTE_IMAGE_URL, NOTE_OTHER_PARTS, NOTE_SCHEMA, REPLY_PRIMING,
    TOKENS_PER_MESSAGE, TOKENS_PER_NAME,
};
use crate::tokens::image::{data_url_size, image_tokens, Detail};
use crate::tokens::{Count, Exactness};

impl Counter<'_> {
    pub(super) fn chat(&self, body: &Map<String, Value>) -> Result<Counted, RequestError> {
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
        // One buffer for every message's parameter path (named in errors).
        let mut param = String::with_capacity(16);
        for (i, message) in messages.iter().enumerate() {
            param.clear();
            let _ = write!(param, "messages[{i}]");
            count.merge(self.chat_message(message, &param)?);
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

    pub(super) fn chat_message(&self, message: &Value, param: &str) -> Result<Count, RequestError> {
        let Value::Object(message) = message else {
            return Err(wrong_type(param, "an object", message));
        };
        match message.get("role") {
            Some(Value::String(role))
                if matches!(role.as_str(), "system" | "developer" | "user" | "assistant" | "tool" | "function") => {}
            Some(Value::String(role)) => {
                return Err(invalid(
                    format!("Invalid value: '{}'. Supported values are: 'system', 'assistant', 'user', 'function', 'tool', and 'developer'.", crate::excerpt(role, 64)),
                    format!("{param}.role"),
                    "invalid_value",
                ))
            }
            None => return Err(missing(&format!("{param}.role"))),
            Some(other) => return Err(wrong_type(&format!("{param}.role"), "a string", other)),
        }
        let mut count = Count::exact(TOKENS_PER_MESSAGE);
        for (key, value) in message {
            match (key.as_str(), value) {
                (_, Value::Null) => {}
                ("content", Value::Array(parts)) => {
                    for (j, part) in parts.iter().enumerate() {
                        count.merge(self.content_part(part, &format!("{param}.{key}[{j}]"))?);
                    }
                }
                ("content", Value::String(text)) => count.add(self.text(text)),
                ("content", other) => {
                    return Err(wrong_type(
                        &format!("{param}.{key}"),
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
    pub(super) fn content_part(&self, part: &Value, param: &str) -> Result<Count, RequestError> {
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

    pub(super) fn image(
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
}
