//! The Responses API: `instructions` and `input` (a string or items), framed
//! as Chat Completions frames messages.

use serde_json::{Map, Value};

use super::{
    missing, positive_integer, wrong_type, Counted, Counter, RequestError, NOTE_ITEMS,
    NOTE_PREVIOUS, NOTE_RESPONSES, REPLY_PRIMING, TOKENS_PER_MESSAGE,
};
use crate::tokens::{Count, Exactness};

impl Counter<'_> {
    pub(super) fn responses(&self, body: &Map<String, Value>) -> Result<Counted, RequestError> {
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

    pub(super) fn response_item(&self, item: &Value, param: &str) -> Result<Count, RequestError> {
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
}
