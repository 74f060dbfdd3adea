//! A validator of OpenAI's chat fine-tuning format, written from its
//! documentation (the fine-tuning guide and the cookbook's
//! "Data preparation and analysis for chat model fine-tuning" checks):
//!
//! - each line is a JSON object (`data_type`) with a non-empty `messages`
//!   list (`missing_messages_list`), and only `messages`, `tools`,
//!   `parallel_tool_calls` and `functions` at the top level;
//! - each message has a `role` (`message_missing_key`) that is `system`,
//!   `user`, `assistant`, `tool` or `function` (`unrecognized_role`), and no
//!   keys but `role`, `content`, `name`, `weight`, `function_call`,
//!   `tool_calls` and `tool_call_id` (`message_unrecognized_key`);
//! - `content` is a non-empty string, or a list of text and image parts, and
//!   may be missing only on an assistant message with `tool_calls` or
//!   `function_call` (`missing_content`);
//! - `weight`, only on assistant messages, is 0 or 1 (`invalid_weight`);
//! - a `tool` message has a `tool_call_id` (`missing_tool_call_id`);
//! - there is at least one assistant message
//!   (`example_missing_assistant_message`), and, as tokenwarden's export
//!   promises, the assistant's reply is last (`last_message_not_assistant`).

use serde_json::Value;

const TOP_KEYS: [&str; 4] = ["messages", "tools", "parallel_tool_calls", "functions"];
const MESSAGE_KEYS: [&str; 7] = [
    "role",
    "content",
    "name",
    "weight",
    "function_call",
    "tool_calls",
    "tool_call_id",
];
const ROLES: [&str; 5] = ["system", "user", "assistant", "tool", "function"];

/// The format errors of one example (empty when it is valid).
pub fn errors(example: &Value) -> Vec<&'static str> {
    let mut out = Vec::new();
    let Some(object) = example.as_object() else {
        return vec!["data_type"];
    };
    if object.keys().any(|k| !TOP_KEYS.contains(&k.as_str())) {
        out.push("unrecognized_key");
    }
    let Some(messages) = object
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
    else {
        out.push("missing_messages_list");
        return out;
    };
    for message in messages {
        let Some(m) = message.as_object() else {
            out.push("data_type");
            continue;
        };
        let Some(role) = m.get("role").and_then(Value::as_str) else {
            out.push("message_missing_key");
            continue;
        };
        if !ROLES.contains(&role) {
            out.push("unrecognized_role");
        }
        if m.keys().any(|k| !MESSAGE_KEYS.contains(&k.as_str())) {
            out.push("message_unrecognized_key");
        }
        let calls = m
            .get("tool_calls")
            .is_some_and(|c| c.as_array().is_some_and(|a| !a.is_empty()))
            || m.get("function_call").is_some_and(Value::is_object);
        let content_ok = match m.get("content") {
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(parts)) => {
                !parts.is_empty()
                    && parts
                        .iter()
                        .all(|p| match p.get("type").and_then(Value::as_str) {
                            Some("text") => p.get("text").and_then(Value::as_str).is_some(),
                            Some("image_url") => p
                                .pointer("/image_url/url")
                                .and_then(Value::as_str)
                                .is_some(),
                            _ => false,
                        })
            }
            None | Some(Value::Null) => role == "assistant" && calls,
            _ => false,
        };
        if !content_ok {
            out.push("missing_content");
        }
        if let Some(weight) = m.get("weight") {
            let ok = role == "assistant" && matches!(weight.as_u64(), Some(0 | 1));
            if !ok {
                out.push("invalid_weight");
            }
        }
        if role == "tool" && m.get("tool_call_id").and_then(Value::as_str).is_none() {
            out.push("missing_tool_call_id");
        }
    }
    let role_of = |m: &Value| m.get("role").and_then(Value::as_str).map(str::to_owned);
    if !messages
        .iter()
        .any(|m| role_of(m).as_deref() == Some("assistant"))
    {
        out.push("example_missing_assistant_message");
    }
    if messages.last().and_then(role_of).as_deref() != Some("assistant") {
        out.push("last_message_not_assistant");
    }
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_valid_example() {
        let e = json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!", "weight": 1}]});
        assert!(errors(&e).is_empty(), "{:?}", errors(&e));
        let tools = json!({"messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [{"id": "t1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."}],
            "tools": []});
        assert!(errors(&tools).is_empty(), "{:?}", errors(&tools));
    }

    #[test]
    fn each_documented_error() {
        let cases = [
            (json!([1]), "data_type"),
            (json!({"messages": []}), "missing_messages_list"),
            (
                json!({"messages": [{"content": "x"}]}),
                "message_missing_key",
            ),
            (
                json!({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
                "unrecognized_role",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x", "mood": 1}, {"role": "assistant", "content": "y"}]}),
                "message_unrecognized_key",
            ),
            (
                json!({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}),
                "missing_content",
            ),
            (
                json!({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}),
                "missing_content",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]}),
                "invalid_weight",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}),
                "invalid_weight",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}]}),
                "example_missing_assistant_message",
            ),
            (
                json!({"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]}),
                "last_message_not_assistant",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}),
                "missing_tool_call_id",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "prompt": "z"}),
                "unrecognized_key",
            ),
        ];
        for (example, expected) in cases {
            assert!(
                errors(&example).contains(&expected),
                "{example}: {:?}",
                errors(&example)
            );
        }
    }
}
