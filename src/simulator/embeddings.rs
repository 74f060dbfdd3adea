//! The embeddings answer, written as it is sent: a few vectors at a time,
//! so a call holds one chunk of its answer, not the whole of it (2,048
//! vectors of 3,072 numbers are some 60 MB of JSON).

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use base64::Engine as _;
use serde_json::{json, Value};

use super::limits::{embedding_inputs, native_dimensions};

/// Vectors per chunk of the body.
const PER_CHUNK: usize = 16;

/// What an embeddings call answers with.
pub struct Answer {
    pub model: String,
    pub inputs: usize,
    pub dimensions: u64,
    pub base64: bool,
    /// Prompt tokens to report; `None` leaves usage out.
    pub usage: Option<u64>,
}

impl Answer {
    /// The answer to `body` (already checked against the limits).
    pub fn new(body: &Value, model: &str, usage: Option<u64>) -> Answer {
        Answer {
            model: model.to_owned(),
            inputs: embedding_inputs(body),
            dimensions: body
                .get("dimensions")
                .and_then(Value::as_u64)
                .unwrap_or_else(|| native_dimensions(model)),
            base64: body.get("encoding_format").and_then(Value::as_str) == Some("base64"),
            usage,
        }
    }

    /// Vector `index`, deterministic.
    fn item(&self, index: usize) -> Value {
        let vector: Vec<f32> = (0..self.dimensions)
            .map(|d| ((index as u64 * 31 + d) % 97) as f32 / 97.0 - 0.5)
            .collect();
        let embedding = if self.base64 {
            let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            json!(vector)
        };
        json!({"object": "embedding", "index": index, "embedding": embedding})
    }

    /// Chunk `i` of the body: the head and the first vectors, then more
    /// vectors, then the tail with the model and usage.
    fn chunk(&self, i: usize) -> Option<Bytes> {
        let first = i * PER_CHUNK;
        if first > self.inputs {
            return None;
        }
        let mut out = Vec::new();
        if i == 0 {
            out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
        }
        for index in first..self.inputs.min(first + PER_CHUNK) {
            if index > 0 {
                out.push(b',');
            }
            out.extend_from_slice(self.item(index).to_string().as_bytes());
        }
        if first + PER_CHUNK > self.inputs {
            let mut tail = json!({"model": self.model});
            if let Some(tokens) = self.usage {
                tail["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
            }
            let tail = tail.to_string();
            out.extend_from_slice(b"],");
            // The tail object's fields, without its braces' opening one.
            out.extend_from_slice(tail.trim_start_matches('{').as_bytes());
        }
        Some(Bytes::from(out))
    }

    pub fn response(self) -> Response {
        let stream = futures_util::stream::unfold((self, 0usize), |(answer, i)| async move {
            let chunk = answer.chunk(i)?;
            Some((Ok::<_, std::convert::Infallible>(chunk), (answer, i + 1)))
        });
        let mut response = Response::new(Body::from_stream(stream));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(answer: &Answer) -> Value {
        let mut text = Vec::new();
        let mut i = 0;
        while let Some(chunk) = answer.chunk(i) {
            text.extend_from_slice(&chunk);
            i += 1;
        }
        serde_json::from_slice(&text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_chunks_make_one_json_answer() {
        for inputs in [0, 1, 15, 16, 17, 33] {
            let answer = Answer {
                model: "text-embedding-3-small".into(),
                inputs,
                dimensions: 3,
                base64: false,
                usage: Some(7),
            };
            let value = whole(&answer);
            assert_eq!(value["data"].as_array().map(Vec::len), Some(inputs));
            assert_eq!(value["usage"]["total_tokens"], 7);
            assert_eq!(value["model"], "text-embedding-3-small");
            if inputs > 0 {
                assert_eq!(value["data"][inputs - 1]["index"], inputs - 1);
                assert_eq!(value["data"][0]["embedding"][0], -0.5);
                assert_eq!(
                    value["data"][0]["embedding"].as_array().map(Vec::len),
                    Some(3)
                );
            }
        }
        let quiet = Answer {
            model: "m".into(),
            inputs: 2,
            dimensions: 2,
            base64: true,
            usage: None,
        };
        let value = whole(&quiet);
        assert!(value.get("usage").is_none() && value["data"][1]["embedding"].is_string());
    }
}
