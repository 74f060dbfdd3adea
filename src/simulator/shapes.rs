//! The bodies and stream events of OpenAI's API, as the simulator writes
//! them: field for field what the official SDKs parse.

use serde_json::{json, Value};

/// What one simulated call produced.
pub struct Output<'a> {
    pub id: &'a str,
    pub created: u64,
    /// The snapshot that "served" the call (an alias resolves to one).
    pub model: &'a str,
    /// The text, one token per element.
    pub tokens: &'a [&'static str],
    pub prompt_tokens: u64,
    /// Whether the output stopped at the request's cap.
    pub truncated: bool,
}

impl Output<'_> {
    pub fn text(&self) -> String {
        self.tokens.concat()
    }

    pub fn completion_tokens(&self) -> u64 {
        self.tokens.len() as u64
    }

    fn finish_reason(&self) -> &'static str {
        if self.truncated {
            "length"
        } else {
            "stop"
        }
    }

    pub fn chat_usage(&self) -> Value {
        let completion = self.completion_tokens();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0
            }
        })
    }

    pub fn responses_usage(&self) -> Value {
        let output = self.completion_tokens();
        json!({
            "input_tokens": self.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + output
        })
    }

    // ---- Chat Completions ----------------------------------------------

    pub fn chat_completion(&self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": self.text(), "refusal": null, "annotations": []},
                "logprobs": null,
                "finish_reason": self.finish_reason()
            }],
            "usage": self.chat_usage(),
            "service_tier": "default",
            "system_fingerprint": "fp_tokenwarden"
        })
    }

    /// A chunk with `delta` and `finish_reason`; `usage: null` when the
    /// client asked for a usage chunk, as the API does.
    pub fn chat_chunk(
        &self,
        delta: Value,
        finish_reason: Option<&str>,
        include_usage: bool,
    ) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": "fp_tokenwarden",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]
        });
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    pub fn chat_usage_chunk(&self) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "service_tier": "default",
            "system_fingerprint": "fp_tokenwarden",
            "choices": [],
            "usage": self.chat_usage()
        })
    }

    pub fn finish_chunk(&self, include_usage: bool) -> Value {
        self.chat_chunk(json!({}), Some(self.finish_reason()), include_usage)
    }

    // ---- Completions ---------------------------------------------------

    pub fn text_completion(&self) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": self.text(), "index": 0, "logprobs": null, "finish_reason": self.finish_reason()}],
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens(),
                "total_tokens": self.prompt_tokens + self.completion_tokens()
            }
        })
    }

    pub fn text_chunk(&self, text: &str, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason}]
        })
    }

    pub fn text_finish(&self) -> Value {
        self.text_chunk("", Some(self.finish_reason()))
    }

    pub fn text_usage_chunk(&self) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens(),
                "total_tokens": self.prompt_tokens + self.completion_tokens()
            }
        })
    }

    // ---- Responses -----------------------------------------------------

    fn message_id(&self) -> String {
        format!("msg_{}", self.id.trim_start_matches("resp_"))
    }

    fn message(&self, done: bool) -> Value {
        let content = if done {
            json!([{"type": "output_text", "text": self.text(), "annotations": [], "logprobs": []}])
        } else {
            json!([])
        };
        json!({
            "type": "message",
            "id": self.message_id(),
            "status": if done { "completed" } else { "in_progress" },
            "role": "assistant",
            "content": content
        })
    }

    /// The response object; `done` gives the final state with usage.
    pub fn response(&self, done: bool, max_output_tokens: Option<u64>) -> Value {
        let status = match (done, self.truncated) {
            (false, _) => "in_progress",
            (true, false) => "completed",
            (true, true) => "incomplete",
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": false,
            "error": null,
            "incomplete_details": if done && self.truncated { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": null,
            "max_output_tokens": max_output_tokens,
            "model": self.model,
            "output": if done { json!([self.message(true)]) } else { json!([]) },
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "service_tier": "default",
            "store": true,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": if done { self.responses_usage() } else { Value::Null },
            "user": null,
            "metadata": {}
        })
    }

    /// Every event of a streamed response, in order, as (event name, data).
    pub fn response_events(&self, max_output_tokens: Option<u64>) -> Vec<(&'static str, Value)> {
        let item_id = self.message_id();
        let mut events = vec![
            (
                "response.created",
                json!({"response": self.response(false, max_output_tokens)}),
            ),
            (
                "response.in_progress",
                json!({"response": self.response(false, max_output_tokens)}),
            ),
            (
                "response.output_item.added",
                json!({"output_index": 0, "item": self.message(false)}),
            ),
            (
                "response.content_part.added",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                       "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
            ),
        ];
        for token in self.tokens {
            events.push((
                "response.output_text.delta",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": token, "logprobs": []}),
            ));
        }
        let text = self.text();
        events.push((
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
        ));
        events.push((
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                   "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}}),
        ));
        events.push((
            "response.output_item.done",
            json!({"output_index": 0, "item": self.message(true)}),
        ));
        let last = if self.truncated {
            "response.incomplete"
        } else {
            "response.completed"
        };
        events.push((
            last,
            json!({"response": self.response(true, max_output_tokens)}),
        ));
        for (sequence, (name, data)) in events.iter_mut().enumerate() {
            data["type"] = json!(name);
            data["sequence_number"] = json!(sequence);
        }
        events
    }
}
