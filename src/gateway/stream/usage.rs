//! The usage object of a body, chunk or Responses object, and a whole
//! answer's text for an estimate when upstream reports no usage.

use serde_json::Value;

use crate::meter::Usage;
use crate::tokens::request::Endpoint;

/// The number at `path` (object keys; `Value::pointer` would parse and
/// unescape a pointer string on every call): 0 when absent or `null`,
/// `Err` when present and not a non-negative integer.
fn number(value: &Value, path: &[&str]) -> Result<u64, ()> {
    let mut at = value;
    for key in path {
        match at.get(key) {
            None | Some(Value::Null) => return Ok(0),
            Some(next) => at = next,
        }
    }
    at.as_u64().ok_or(())
}

/// The usage object of a body, chunk or Responses object. A number that is
/// not a non-negative integer (`-5`, `"9"`, `12.0`, `1e20`), or one past
/// [`crate::meter::MAX_CALL_TOKENS`], makes the whole usage missing: the
/// call settles with its estimate rather than with a number upstream got
/// wrong.
pub fn usage_of(endpoint: Endpoint, usage: &Value) -> Option<Usage> {
    if !usage.is_object() {
        return None;
    }
    let [input, cached, output, reasoning]: [&[&str]; 4] = match endpoint {
        Endpoint::Responses => [
            &["input_tokens"],
            &["input_tokens_details", "cached_tokens"],
            &["output_tokens"],
            &["output_tokens_details", "reasoning_tokens"],
        ],
        _ => [
            &["prompt_tokens"],
            &["prompt_tokens_details", "cached_tokens"],
            &["completion_tokens"],
            &["completion_tokens_details", "reasoning_tokens"],
        ],
    };
    let read = (|| {
        Ok::<_, ()>(Usage {
            input: number(usage, input)?,
            cached: number(usage, cached)?,
            output: number(usage, output)?,
            reasoning: number(usage, reasoning)?,
        })
    })();
    match read {
        Ok(usage) if usage.is_sane() => Some(usage),
        _ => {
            tracing::warn!("upstream reported usage that is not a non-negative integer within bounds; the call settles with its estimate");
            None
        }
    }
}

/// A usage object deserialized into its numbers: the same result as
/// [`usage_of`] on an object whose numbers are all unsigned integers;
/// anything else fails to deserialize. Settling read whole answers and
/// chunks this way before `scan`; the tests hold the scan to it.
#[cfg(test)]
#[derive(serde::Deserialize)]
pub struct UsageFields {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

#[cfg(test)]
#[derive(serde::Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

#[cfg(test)]
impl UsageFields {
    pub fn usage(&self, endpoint: Endpoint) -> Usage {
        let cached = |d: &Option<Details>| d.as_ref().and_then(|d| d.cached_tokens).unwrap_or(0);
        let reasoning =
            |d: &Option<Details>| d.as_ref().and_then(|d| d.reasoning_tokens).unwrap_or(0);
        match endpoint {
            Endpoint::Responses => Usage {
                input: self.input_tokens.unwrap_or(0),
                cached: cached(&self.input_tokens_details),
                output: self.output_tokens.unwrap_or(0),
                reasoning: reasoning(&self.output_tokens_details),
            },
            _ => Usage {
                input: self.prompt_tokens.unwrap_or(0),
                cached: cached(&self.prompt_tokens_details),
                output: self.completion_tokens.unwrap_or(0),
                reasoning: reasoning(&self.completion_tokens_details),
            },
        }
    }
}

/// The output text of a whole (non-streamed) body, for an estimate.
pub fn body_text(endpoint: Endpoint, body: &Value) -> String {
    let mut text = String::new();
    let push = |text: &mut String, v: Option<&Value>| {
        if let Some(s) = v.and_then(Value::as_str) {
            text.push_str(s);
        }
    };
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Completions => {
            for choice in body
                .get("choices")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                push(&mut text, choice.pointer("/message/content"));
                push(&mut text, choice.get("text"));
            }
        }
        Endpoint::Responses => {
            for item in body
                .get("output")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    push(&mut text, part.get("text"));
                }
            }
        }
        Endpoint::Embeddings => {}
    }
    text
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_shapes() {
        let chat: Value = serde_json::json!({"prompt_tokens": 10, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 4}, "completion_tokens_details": {"reasoning_tokens": 2}});
        assert_eq!(
            usage_of(Endpoint::ChatCompletions, &chat),
            Some(Usage {
                input: 10,
                cached: 4,
                output: 5,
                reasoning: 2
            })
        );
        let resp: Value = serde_json::json!({"input_tokens": 7, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 1}, "output_tokens_details": {"reasoning_tokens": 0}});
        assert_eq!(
            usage_of(Endpoint::Responses, &resp),
            Some(Usage {
                input: 7,
                cached: 1,
                output: 3,
                reasoning: 0
            })
        );
        assert_eq!(usage_of(Endpoint::ChatCompletions, &Value::Null), None);
    }

    #[test]
    fn usage_fields_read_what_usage_of_reads() {
        let shapes = [
            json!({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
                   "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
                   "completion_tokens_details": {"reasoning_tokens": 2, "accepted_prediction_tokens": 0}}),
            json!({"input_tokens": 5, "output_tokens": 9, "total_tokens": 14,
                   "input_tokens_details": {"cached_tokens": 1},
                   "output_tokens_details": {"reasoning_tokens": 4}}),
            json!({"prompt_tokens": 4, "total_tokens": 4}),
            json!({"prompt_tokens": 4, "prompt_tokens_details": null}),
            json!({}),
        ];
        for usage in shapes {
            let fields: UsageFields =
                serde_json::from_value(usage.clone()).unwrap_or_else(|e| panic!("{e}: {usage}"));
            for endpoint in [
                Endpoint::ChatCompletions,
                Endpoint::Responses,
                Endpoint::Embeddings,
            ] {
                assert_eq!(
                    Some(fields.usage(endpoint)),
                    usage_of(endpoint, &usage),
                    "{usage}"
                );
            }
        }
        // Anything else falls back to the Value path.
        for odd in [
            json!({"prompt_tokens": -1}),
            json!({"prompt_tokens": "4"}),
            json!([1]),
        ] {
            assert!(serde_json::from_value::<UsageFields>(odd).is_err());
        }
    }
}
