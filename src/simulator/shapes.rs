//! The bodies and stream events of OpenAI's API, as the simulator writes
//! them: field for field what the official SDKs parse.

use serde_json::{json, Value};

use super::answer::{Choice, ToolCall};

/// What one simulated call produced.
pub struct Output<'a> {
    pub id: &'a str,
    pub created: u64,
    /// The snapshot that "served" the call (an alias resolves to one).
    pub model: &'a str,
    pub choices: &'a [Choice],
    pub prompt_tokens: u64,
    /// Log probabilities asked for: how many alternatives each token lists
    /// (chat `logprobs` with `top_logprobs`, completions `logprobs`).
    pub logprobs: Option<usize>,
    /// The request, for what a response repeats of it.
    pub request: &'a Value,
}

/// A token's made-up log probability (deterministic, below zero).
fn logprob(i: usize) -> f64 {
    -0.125 * ((i % 7) as f64 + 1.0)
}

/// `k` alternatives for token `i`: the token itself, then other words.
fn alternatives(token: &str, i: usize, k: usize) -> Vec<&str> {
    let others = (0..super::WORDS.len())
        .map(|j| super::WORDS[(i + j) % super::WORDS.len()])
        .filter(|w| *w != token);
    std::iter::once(token).chain(others).take(k).collect()
}

impl Output<'_> {
    pub fn completion_tokens(&self) -> u64 {
        self.choices.iter().map(|c| c.tokens).sum()
    }

    pub fn finish_reason(choice: &Choice) -> &'static str {
        match (choice.truncated, choice.calls.is_empty()) {
            (true, _) => "length",
            (false, false) => "tool_calls",
            (false, true) => "stop",
        }
    }

    pub fn chat_usage(&self) -> Value {
        let completion = self.completion_tokens();
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "audio_tokens": 0},
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
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.prompt_tokens + output
        })
    }

    /// A token's entry in chat `logprobs.content`: the token, with `k`
    /// alternatives (the token itself first).
    fn token_logprob(&self, token: &str, i: usize) -> Value {
        let alternatives: Vec<Value> = alternatives(token, i, self.logprobs.unwrap_or(0))
            .into_iter()
            .enumerate()
            .map(|(j, alt)| json!({"token": alt, "logprob": logprob(i) - j as f64, "bytes": alt.as_bytes()}))
            .collect();
        json!({"token": token, "logprob": logprob(i), "bytes": token.as_bytes(), "top_logprobs": alternatives})
    }

    /// A choice's chat `logprobs`, when asked for.
    fn chat_logprobs(&self, choice: &Choice) -> Value {
        if self.logprobs.is_none() || !choice.calls.is_empty() {
            return Value::Null;
        }
        let content: Vec<Value> = choice
            .pieces
            .iter()
            .enumerate()
            .map(|(i, p)| self.token_logprob(p, i))
            .collect();
        json!({"content": content, "refusal": null})
    }

    // ---- Chat Completions ----------------------------------------------

    fn tool_call(call: &ToolCall) -> Value {
        json!({"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments()}})
    }

    fn chat_message(choice: &Choice) -> Value {
        let mut message = json!({"role": "assistant", "content": choice.text(), "refusal": null, "annotations": []});
        if !choice.calls.is_empty() {
            message["content"] = Value::Null;
            message["tool_calls"] = choice.calls.iter().map(Self::tool_call).collect();
        }
        message
    }

    pub fn chat_completion(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                json!({
                    "index": index,
                    "message": Self::chat_message(c),
                    "logprobs": self.chat_logprobs(c),
                    "finish_reason": Self::finish_reason(c)
                })
            })
            .collect();
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.chat_usage(),
            "service_tier": "default",
            "system_fingerprint": "fp_tokenwarden"
        })
    }

    /// A chunk of choice `index` with `delta` and `finish_reason`; `usage:
    /// null` when the client asked for a usage chunk, as the API does.
    pub fn chat_chunk(
        &self,
        index: usize,
        delta: Value,
        logprobs: Value,
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
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
        });
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    /// The chunk of token `i` of choice `index`'s text.
    pub fn chat_piece_chunk(&self, index: usize, i: usize, include_usage: bool) -> Value {
        let choice = &self.choices[index];
        let piece = choice.pieces.get(i).map_or("", |p| p);
        let logprobs = if self.logprobs.is_some() {
            json!({"content": [self.token_logprob(piece, i)], "refusal": null})
        } else {
            Value::Null
        };
        self.chat_chunk(
            index,
            json!({"content": piece}),
            logprobs,
            None,
            include_usage,
        )
    }

    /// The chunk that begins call `k` of choice `index` (its id and name),
    /// or piece `i` of its arguments.
    pub fn chat_call_chunk(
        &self,
        index: usize,
        k: usize,
        piece: Option<usize>,
        include_usage: bool,
    ) -> Value {
        let call = &self.choices[index].calls[k];
        let delta = match piece {
            None => json!({"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]}),
            Some(i) => {
                json!({"tool_calls": [{"index": k, "function": {"arguments": call.pieces.get(i).map_or("", |p| p)}}]})
            }
        };
        self.chat_chunk(index, delta, Value::Null, None, include_usage)
    }

    pub fn chat_role_chunk(&self, index: usize, include_usage: bool) -> Value {
        let content = if self.choices[index].calls.is_empty() {
            json!("")
        } else {
            Value::Null
        };
        self.chat_chunk(
            index,
            json!({"role": "assistant", "content": content, "refusal": null}),
            Value::Null,
            None,
            include_usage,
        )
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

    pub fn finish_chunk(&self, index: usize, include_usage: bool) -> Value {
        let reason = Self::finish_reason(&self.choices[index]);
        self.chat_chunk(index, json!({}), Value::Null, Some(reason), include_usage)
    }

    // ---- Completions ---------------------------------------------------

    fn text_usage(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens(),
            "total_tokens": self.prompt_tokens + self.completion_tokens()
        })
    }

    /// The legacy `logprobs` of pieces `pieces`, starting at text offset `offset`.
    fn text_logprobs(
        &self,
        pieces: &[std::borrow::Cow<'static, str>],
        first: usize,
        offset: usize,
    ) -> Value {
        let Some(k) = self.logprobs else {
            return Value::Null;
        };
        let mut at = offset;
        let mut offsets = Vec::new();
        for p in pieces {
            offsets.push(at);
            at += p.len();
        }
        let top: Vec<Value> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let top: serde_json::Map<String, Value> = alternatives(p, first + i, k)
                    .into_iter()
                    .enumerate()
                    .map(|(j, alt)| (alt.to_owned(), json!(logprob(first + i) - j as f64)))
                    .collect();
                Value::Object(top)
            })
            .collect();
        json!({
            "tokens": pieces,
            "token_logprobs": (0..pieces.len()).map(|i| logprob(first + i)).collect::<Vec<_>>(),
            "top_logprobs": top,
            "text_offset": offsets
        })
    }

    pub fn text_completion(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                json!({"text": c.text(), "index": index, "logprobs": self.text_logprobs(&c.pieces, 0, 0),
                       "finish_reason": Self::finish_reason(c)})
            })
            .collect();
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.text_usage()
        })
    }

    pub fn text_chunk(&self, index: usize, piece: Option<usize>) -> Value {
        let choice = &self.choices[index];
        let (text, finish_reason, logprobs) = match piece {
            Some(i) => {
                let offset: usize = choice.pieces[..i].iter().map(|p| p.len()).sum();
                let one = &choice.pieces[i..=i];
                (one[0].to_string(), None, self.text_logprobs(one, i, offset))
            }
            None => (
                String::new(),
                Some(Self::finish_reason(choice)),
                Value::Null,
            ),
        };
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}]
        })
    }

    pub fn text_usage_chunk(&self) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.text_usage()
        })
    }

    // ---- Responses -----------------------------------------------------

    /// The first choice's text.
    pub fn answer_text(&self) -> String {
        self.answer().text()
    }

    fn answer(&self) -> &Choice {
        static NONE: std::sync::LazyLock<Choice> = std::sync::LazyLock::new(Choice::default);
        self.choices.first().unwrap_or(&NONE)
    }

    fn message_id(&self) -> String {
        format!("msg_{}", self.id.trim_start_matches("resp_"))
    }

    fn message(&self, done: bool) -> Value {
        let content = if done {
            json!([{"type": "output_text", "text": self.answer().text(), "annotations": [], "logprobs": []}])
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

    fn function_call(call: &ToolCall, done: bool) -> Value {
        json!({
            "type": "function_call",
            "id": format!("fc_{}", call.id.trim_start_matches("call_")),
            "call_id": call.id,
            "name": call.name,
            "arguments": if done { call.arguments() } else { String::new() },
            "status": if done { "completed" } else { "in_progress" }
        })
    }

    /// The output items: the function calls, or the message.
    fn items(&self, done: bool) -> Vec<Value> {
        let answer = self.answer();
        if answer.calls.is_empty() {
            vec![self.message(done)]
        } else {
            answer
                .calls
                .iter()
                .map(|c| Self::function_call(c, done))
                .collect()
        }
    }

    /// The response object; `done` gives the final state with usage.
    pub fn response(&self, done: bool) -> Value {
        let truncated = self.answer().truncated;
        let status = match (done, truncated) {
            (false, _) => "in_progress",
            (true, false) => "completed",
            (true, true) => "incomplete",
        };
        let asked = |key: &str, default: Value| {
            self.request
                .get(key)
                .filter(|v| !v.is_null())
                .cloned()
                .unwrap_or(default)
        };
        json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": asked("background", json!(false)),
            "error": null,
            "incomplete_details": if done && truncated { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": asked("instructions", Value::Null),
            "max_output_tokens": asked("max_output_tokens", Value::Null),
            "model": self.model,
            "output": if done { json!(self.items(true)) } else { json!([]) },
            "parallel_tool_calls": asked("parallel_tool_calls", json!(true)),
            "previous_response_id": asked("previous_response_id", Value::Null),
            "reasoning": {"effort": null, "summary": null},
            "service_tier": "default",
            "store": asked("store", json!(true)),
            "temperature": asked("temperature", json!(1.0)),
            "text": asked("text", json!({"format": {"type": "text"}})),
            "tool_choice": asked("tool_choice", json!("auto")),
            "tools": asked("tools", json!([])),
            "top_p": asked("top_p", json!(1.0)),
            "truncation": asked("truncation", json!("disabled")),
            "usage": if done { self.responses_usage() } else { Value::Null },
            "user": null,
            "metadata": asked("metadata", json!({}))
        })
    }

    /// Every event of a streamed response, in order, as (event name, data).
    pub fn response_events(&self) -> Vec<(&'static str, Value)> {
        let mut events = vec![
            (
                "response.created",
                json!({"response": self.response(false)}),
            ),
            (
                "response.in_progress",
                json!({"response": self.response(false)}),
            ),
        ];
        let answer = self.answer();
        if answer.calls.is_empty() {
            self.message_events(&mut events);
        }
        for (index, call) in answer.calls.iter().enumerate() {
            let item = Self::function_call(call, false);
            let item_id = item["id"].clone();
            events.push((
                "response.output_item.added",
                json!({"output_index": index, "item": item}),
            ));
            for piece in &call.pieces {
                events.push((
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id, "output_index": index, "delta": piece}),
                ));
            }
            events.push((
                "response.function_call_arguments.done",
                json!({"item_id": item_id, "output_index": index, "name": call.name, "arguments": call.arguments()}),
            ));
            events.push((
                "response.output_item.done",
                json!({"output_index": index, "item": Self::function_call(call, true)}),
            ));
        }
        let last = if answer.truncated {
            "response.incomplete"
        } else {
            "response.completed"
        };
        events.push((last, json!({"response": self.response(true)})));
        for (sequence, (name, data)) in events.iter_mut().enumerate() {
            data["type"] = json!(name);
            data["sequence_number"] = json!(sequence);
        }
        events
    }

    fn message_events(&self, events: &mut Vec<(&'static str, Value)>) {
        let item_id = self.message_id();
        events.push((
            "response.output_item.added",
            json!({"output_index": 0, "item": self.message(false)}),
        ));
        events.push((
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                   "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
        ));
        for piece in &self.answer().pieces {
            events.push((
                "response.output_text.delta",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece, "logprobs": []}),
            ));
        }
        let text = self.answer().text();
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
    }
}
