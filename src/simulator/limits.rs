//! The simulator's own bounds. It makes what a request asks for (vectors,
//! tokens, delays), so without these one request could ask for anything:
//! an embeddings call with 100,000 inputs grew it to 9.5 GB. Where OpenAI
//! has a limit, the simulator has the same one and refuses past it with
//! OpenAI's 400; where OpenAI's is the model's (output tokens), it stops
//! there as the model would.

use std::time::Duration;

use serde_json::Value;

use crate::gateway::error::ApiError;
use crate::tokens::request::Endpoint;

/// Inputs per embeddings request (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;
/// Choices per request (`n`; OpenAI's limit).
const MAX_N: u64 = 128;
/// Output tokens when the catalog gives a model none (embedding models).
const MAX_OUTPUT_TOKENS: u64 = 128_000;
/// The longest delay a header (`x-sim-fault: stall`, `x-sim-ttft-ms`,
/// `x-sim-token-ms`) can ask for, and a whole answer's.
pub const MAX_DELAY: Duration = Duration::from_secs(600);

/// OpenAI's 400 for an integer past its bounds.
fn out_of_range(param: &str, value: u64, min: u64, max: u64) -> ApiError {
    let (bound, code, expected) = if value < min {
        (
            "below minimum",
            "integer_below_min_value",
            format!(">= {min}"),
        )
    } else {
        (
            "above maximum",
            "integer_above_max_value",
            format!("<= {max}"),
        )
    };
    ApiError::InvalidRequest {
        message: format!(
            "Invalid '{param}': integer {bound} value. Expected a value {expected}, but got {value} instead."
        ),
        param: Some(param.to_owned()),
        code: Some(code),
    }
}

/// An integer field, when present, within `min..=max`.
fn in_range(body: &Value, param: &str, min: u64, max: u64) -> Result<(), ApiError> {
    match body.get(param) {
        None | Some(Value::Null) => Ok(()),
        Some(v) => match v.as_u64() {
            Some(n) if (min..=max).contains(&n) => Ok(()),
            Some(n) => Err(out_of_range(param, n, min, max)),
            // Negative or not an integer.
            None => Err(out_of_range(param, 0, min, max)),
        },
    }
}

/// A request's fields within OpenAI's limits: `n`, and for embeddings the
/// number of inputs and `dimensions` (at most the model's own).
pub fn check(endpoint: Endpoint, body: &Value, model: &str) -> Result<(), ApiError> {
    in_range(body, "n", 1, MAX_N)?;
    if endpoint != Endpoint::Embeddings {
        return Ok(());
    }
    if embedding_inputs(body) > MAX_EMBEDDING_INPUTS {
        // OpenAI's words for an input array past 2,048 items.
        return Err(ApiError::InvalidRequest {
            message: "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference.".into(),
            param: None,
            code: None,
        });
    }
    in_range(body, "dimensions", 1, native_dimensions(model))
}

/// How many vectors an embeddings request asks for: one per string or
/// token array in `input`, one for a single string or token array.
pub fn embedding_inputs(body: &Value) -> usize {
    match body.get("input") {
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => 1,
        Some(Value::Array(items)) => items.len(),
        _ => 1,
    }
}

/// The length of a model's vectors.
pub fn native_dimensions(model: &str) -> u64 {
    if model.contains("large") {
        3072
    } else {
        1536
    }
}

/// The most output tokens a call to a model with `max_output` (the
/// catalog's; 0 when it gives none) produces.
pub fn output_limit(max_output: u64) -> u64 {
    if max_output == 0 {
        MAX_OUTPUT_TOKENS
    } else {
        max_output.min(MAX_OUTPUT_TOKENS)
    }
}

/// A delay a header asks for, at most [`MAX_DELAY`].
pub fn delay(ms: u64) -> Duration {
    Duration::from_millis(ms).min(MAX_DELAY)
}

/// Time to the first token plus `tokens` token delays, at most [`MAX_DELAY`]
/// (without overflowing on a large count).
pub fn answer_time(ttft: Duration, token_delay: Duration, tokens: usize) -> Duration {
    let tokens = u32::try_from(tokens).unwrap_or(u32::MAX);
    ttft.saturating_add(token_delay.saturating_mul(tokens))
        .min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn openais_limits() {
        let chat = Endpoint::ChatCompletions;
        assert!(check(chat, &json!({"n": 128}), "gpt-4o").is_ok());
        for n in [json!(0), json!(129), json!(-1), json!(1.5)] {
            assert!(check(chat, &json!({ "n": n }), "gpt-4o").is_err(), "{n}");
        }
        let e = Endpoint::Embeddings;
        let inputs = |n: usize| json!({ "input": vec!["a"; n] });
        assert!(check(e, &inputs(2048), "text-embedding-3-small").is_ok());
        assert!(check(e, &inputs(2049), "text-embedding-3-small").is_err());
        // One token array is one input, however long.
        assert!(check(
            e,
            &json!({"input": vec![1; 5000]}),
            "text-embedding-3-small"
        )
        .is_ok());
        let dims = |d: u64| json!({"input": "a", "dimensions": d});
        assert!(check(e, &dims(3072), "text-embedding-3-large").is_ok());
        assert!(check(e, &dims(3073), "text-embedding-3-large").is_err());
        assert!(check(e, &dims(1537), "text-embedding-3-small").is_err());
        assert!(check(e, &dims(0), "text-embedding-3-small").is_err());
    }

    #[test]
    fn delays_are_bounded_and_do_not_overflow() {
        assert_eq!(delay(u64::MAX), MAX_DELAY);
        assert_eq!(delay(5), Duration::from_millis(5));
        let long = Duration::from_millis(u64::MAX / 2);
        assert_eq!(answer_time(long, long, usize::MAX), MAX_DELAY);
        assert_eq!(
            answer_time(Duration::from_millis(1), Duration::from_millis(2), 3),
            Duration::from_millis(7)
        );
        assert_eq!(output_limit(0), MAX_OUTPUT_TOKENS);
        assert_eq!(output_limit(16_384), 16_384);
    }
}
