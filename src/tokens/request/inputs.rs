//! Completions prompts and Embeddings inputs: a string, an array of strings,
//! an array of token ids, or an array of such arrays.

use serde_json::{Map, Value};

use super::{invalid, missing, positive_integer, wrong_type, Counted, Counter, RequestError};
use crate::tokens::Count;

impl Counter<'_> {
    pub(super) fn completions(&self, body: &Map<String, Value>) -> Result<Counted, RequestError> {
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

    pub(super) fn embeddings(&self, body: &Map<String, Value>) -> Result<Counted, RequestError> {
        let (count, _) = self.inputs(body, "input")?;
        Ok((count, 0, "embeddings produce no output"))
    }

    /// A string, an array of strings, an array of token ids, or an array of
    /// arrays of token ids; returns the count and the number of inputs.
    pub(super) fn inputs(
        &self,
        body: &Map<String, Value>,
        key: &str,
    ) -> Result<(Count, u64), RequestError> {
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
