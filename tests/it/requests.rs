//! Whole request bodies, counted as the API bills them.

use base64::Engine as _;
use serde_json::{json, Value};
use tokenwarden::tokens::request::{
    count_body, count_request, Endpoint, RequestCount, RequestError,
};
use tokenwarden::tokens::{Encoding, Exactness};

use crate::catalog;

fn count(endpoint: Option<Endpoint>, body: Value) -> RequestCount {
    match count_request(&catalog(), endpoint, &body, None) {
        Ok(counted) => counted,
        Err(e) => panic!("{body}: {e}"),
    }
}

fn error(endpoint: Option<Endpoint>, body: &[u8]) -> RequestError {
    match count_body(&catalog(), endpoint, body, None) {
        Ok(counted) => panic!("{} counted as {counted:?}", String::from_utf8_lossy(body)),
        Err(e) => e,
    }
}

/// The OpenAI cookbook's example conversation, with `name` fields.
fn cookbook_messages() -> Value {
    json!([
        {"role": "system", "content": "You are a helpful, pattern-following assistant that translates corporate jargon into plain English."},
        {"role": "system", "name": "example_user", "content": "New synergies will help drive top-line growth."},
        {"role": "system", "name": "example_assistant", "content": "Things working well together will increase revenue."},
        {"role": "system", "name": "example_user", "content": "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage."},
        {"role": "system", "name": "example_assistant", "content": "Let's talk later when we're less busy about how to do better."},
        {"role": "user", "content": "This late pivot means we don't have time to boil the ocean for the client deliverable."},
    ])
}

#[test]
fn chat_formula_matches_the_api_with_and_without_names() {
    // The cookbook reports these prompt_tokens from the API itself.
    let with_names = count(
        None,
        json!({"model": "gpt-4o", "messages": cookbook_messages()}),
    );
    assert_eq!(with_names.endpoint, Endpoint::ChatCompletions);
    assert_eq!(
        (with_names.prompt.tokens, with_names.prompt.exactness),
        (124, Exactness::Exact)
    );
    let gpt4 = count(
        None,
        json!({"model": "gpt-4-0613", "messages": cookbook_messages()}),
    );
    assert_eq!(gpt4.prompt.tokens, 129);

    // Without names: each name costs its tokens plus one.
    let mut plain = cookbook_messages();
    let mut saved = 0;
    for message in plain.as_array_mut().into_iter().flatten() {
        if let Some(Value::String(name)) = message.as_object_mut().and_then(|m| m.remove("name")) {
            saved += Encoding::O200kBase.count(&name) + 1;
        }
    }
    let without = count(None, json!({"model": "gpt-4o", "messages": plain}));
    assert_eq!(without.prompt.tokens, 124 - saved);
    assert!(saved > 4);
}

#[test]
fn tool_definitions_follow_the_cookbook() {
    let tools = json!([{
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                    "unit": {"type": "string", "description": "The unit of temperature to return", "enum": ["celsius", "fahrenheit"]}
                },
                "required": ["location"]
            }
        }
    }]);
    let messages = json!([
        {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
        {"role": "user", "content": "What's the weather like in San Francisco?"}
    ]);
    // The API's prompt_tokens for this request, as the cookbook recorded them.
    for (model, expected) in [
        ("gpt-4o", 101),
        ("gpt-4o-mini", 101),
        ("gpt-4", 105),
        ("gpt-3.5-turbo", 105),
    ] {
        let counted = count(
            None,
            json!({"model": model, "messages": messages, "tools": tools}),
        );
        assert_eq!(counted.prompt.tokens, expected, "{model}");
        assert_eq!(counted.prompt.exactness, Exactness::Estimate);
    }
    // The same function in the Responses API's flat shape costs the same.
    let flat = json!([{
        "type": "function",
        "name": "get_current_weather",
        "description": "Get the current weather in a given location",
        "parameters": tools[0]["function"]["parameters"].clone()
    }]);
    let chat = count(
        None,
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "tools": tools}),
    );
    let responses = count(
        None,
        json!({"model": "gpt-4o", "input": [{"role": "user", "content": "hi"}], "tools": flat}),
    );
    assert_eq!(responses.endpoint, Endpoint::Responses);
    assert_eq!(chat.prompt.tokens, responses.prompt.tokens);
}

fn png(width: u32, height: u32) -> String {
    let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    bytes.extend_from_slice(&width.to_be_bytes());
    bytes.extend_from_slice(&height.to_be_bytes());
    bytes.extend_from_slice(&[8, 6, 0, 0, 0]);
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn with_image(model: &str, url: &str, detail: Option<&str>) -> RequestCount {
    let mut image = json!({"url": url});
    if let Some(detail) = detail {
        image["detail"] = json!(detail);
    }
    count(
        None,
        json!({"model": model, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": image}
        ]}]}),
    )
}

#[test]
fn images_cost_what_openai_documents() {
    let text_only = count(
        None,
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "text", "text": "What is in this image?"}]}]}),
    )
    .prompt
    .tokens;
    let image = |url: &str, detail| with_image("gpt-4o", url, detail);
    let high = image(&png(1024, 1024), Some("high"));
    assert_eq!(
        (high.prompt.tokens - text_only, high.prompt.exactness),
        (765, Exactness::Exact)
    );
    assert_eq!(
        image(&png(2048, 4096), Some("high")).prompt.tokens - text_only,
        1105
    );
    let low = image(&png(2048, 4096), Some("low"));
    assert_eq!(
        (low.prompt.tokens - text_only, low.prompt.exactness),
        (85, Exactness::Exact)
    );

    // By URL the size is unknown: the largest cost, and the count says so.
    let by_url = image("https://example.com/cat.jpg", Some("high"));
    assert_eq!(by_url.prompt.tokens - text_only, 85 + 170 * 8);
    assert_eq!(by_url.prompt.exactness, Exactness::UpperBound);
    assert!(!by_url.prompt.notes.is_empty());
    // detail auto may be low or high: counted as high, an upper bound.
    let auto = image(&png(1024, 1024), None);
    assert_eq!(
        (auto.prompt.tokens - text_only, auto.prompt.exactness),
        (765, Exactness::UpperBound)
    );
    // Other families use other constants: gpt-4o-mini's tiles, gpt-4.1-mini's patches.
    let mini = with_image("gpt-4o-mini", &png(1024, 1024), Some("high"));
    assert_eq!(mini.prompt.tokens - text_only, 2833 + 5667 * 4);
    let patches = with_image("gpt-4.1-mini", &png(1024, 1024), Some("high"));
    assert_eq!(patches.prompt.tokens - text_only, 1659);
}

#[test]
fn responses_completions_and_embeddings() {
    let text = "The quick brown fox jumps over the lazy dog.";
    let n = Encoding::O200kBase.count(text);
    let m = Encoding::Cl100kBase.count(text);
    let user = Encoding::O200kBase.count("user");

    let responses = count(
        None,
        json!({"model": "o3", "input": text, "max_output_tokens": 500}),
    );
    assert_eq!(responses.endpoint, Endpoint::Responses);
    assert_eq!(responses.prompt.tokens, 3 + 3 + user + n);
    assert_eq!(
        (responses.output_cap, responses.output_cap_source),
        (500, "max_output_tokens")
    );
    let with_instructions = count(
        None,
        json!({"model": "o3", "input": text, "instructions": text}),
    );
    assert!(with_instructions.prompt.tokens > responses.prompt.tokens + n);
    assert_eq!(with_instructions.output_cap, 100_000);
    let continued = count(
        None,
        json!({"model": "o3", "previous_response_id": "resp_1", "input": "go on"}),
    );
    assert_eq!(continued.prompt.exactness, Exactness::Estimate);

    let one = count(
        Some(Endpoint::Completions),
        json!({"model": "gpt-3.5-turbo", "prompt": text}),
    );
    assert_eq!((one.prompt.tokens, one.output_cap), (m, 16));
    let many = count(
        None,
        json!({"model": "gpt-3.5-turbo", "prompt": [text, text, text], "max_tokens": 10, "n": 2}),
    );
    assert_eq!(many.endpoint, Endpoint::Completions);
    assert_eq!((many.prompt.tokens, many.output_cap), (3 * m, 60));
    let ids = count(
        None,
        json!({"model": "gpt-3.5-turbo", "prompt": [[1, 2, 3], [4, 5]]}),
    );
    assert_eq!(ids.prompt.tokens, 5);

    let embedding = count(
        None,
        json!({"model": "text-embedding-3-small", "input": [text, text]}),
    );
    assert_eq!(embedding.endpoint, Endpoint::Embeddings);
    assert_eq!((embedding.prompt.tokens, embedding.output_cap), (2 * m, 0));
    assert_eq!(embedding.group, None);
    let token_ids = count(
        Some(Endpoint::Embeddings),
        json!({"model": "text-embedding-3-large", "input": [10, 20, 30]}),
    );
    assert_eq!(token_ids.prompt.tokens, 3);
}

#[test]
fn output_caps_and_prices() {
    let base = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let mut body = base.clone();
    assert_eq!(count(None, body.clone()).output_cap, 16_384);
    body["max_tokens"] = json!(100);
    assert_eq!(count(None, body.clone()).output_cap, 100);
    body["max_completion_tokens"] = json!(50);
    body["n"] = json!(3);
    let counted = count(None, body);
    assert_eq!(
        (counted.output_cap, counted.output_cap_source),
        (150, "max_completion_tokens")
    );
    assert_eq!(counted.reservation(), counted.prompt.tokens + 150);
    // gpt-4o input is $2.50 per million tokens = 2,500,000 pico-dollars a token.
    assert_eq!(
        counted.prompt_list_price,
        u128::from(counted.prompt.tokens) * 2_500_000
    );
    assert_eq!(counted.group.as_deref(), Some("flagship"));
}

#[test]
fn unknown_models_are_model_not_found_with_suggestions() {
    let e = error(
        None,
        br#"{"model": "gpt-4o-mimi", "messages": [{"role": "user", "content": "hi"}]}"#,
    );
    assert_eq!(
        (e.code(), e.param()),
        (Some("model_not_found"), Some("model"))
    );
    let message = e.to_string();
    assert!(
        message.contains("gpt-4o-mimi") && message.contains("gpt-4o-mini"),
        "{message}"
    );
}

#[test]
fn malformed_requests_name_what_is_wrong() {
    let chat = Some(Endpoint::ChatCompletions);
    type Case<'a> = (Option<Endpoint>, &'a [u8], Option<&'a str>, &'a str);
    let cases: &[Case] = &[
        (chat, b"{\"model\": \"gpt-4o\", \"messages\": [", None, "parse the JSON"),
        (chat, b"\xff\xfe{}", None, "UTF-8"),
        (chat, b"[1, 2]", None, "JSON object"),
        (chat, br#"{"messages": [{"role": "user", "content": "hi"}]}"#, None, "model parameter"),
        (chat, br#"{"model": 4, "messages": []}"#, Some("model"), "expected a string"),
        (chat, br#"{"model": "gpt-4o"}"#, Some("messages"), "Missing required parameter"),
        (chat, br#"{"model": "gpt-4o", "messages": []}"#, Some("messages"), "empty array"),
        (chat, br#"{"model": "gpt-4o", "messages": "hi"}"#, Some("messages"), "expected an array"),
        (chat, br#"{"model": "gpt-4o", "messages": [{"content": "hi"}]}"#, Some("messages[0].role"), "Missing"),
        (chat, br#"{"model": "gpt-4o", "messages": [{"role": "wizard", "content": "hi"}]}"#, Some("messages[0].role"), "wizard"),
        (chat, br#"{"model": "gpt-4o", "messages": [{"role": "user", "content": 5}]}"#, Some("messages[0].content"), "an integer"),
        (chat, br#"{"model": "gpt-4o", "messages": [{"role": "user", "content": [{"text": "x"}]}]}"#, Some("messages[0].content[0].type"), "Missing"),
        (chat, br#"{"model": "gpt-4o", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "huge"}}]}]}"#, Some("messages[0].content[0].image_url.detail"), "detail"),
        (chat, br#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}"#, Some("max_tokens"), ">= 1"),
        (chat, br#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}"#, Some("max_tokens"), "a string"),
        (chat, br#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {}}]}"#, Some("tools[0].function.name"), "Missing"),
        (Some(Endpoint::Embeddings), br#"{"model": "text-embedding-3-small", "input": [1.5]}"#, Some("input[0]"), "token id"),
        (Some(Endpoint::Embeddings), br#"{"model": "text-embedding-3-small", "input": []}"#, Some("input"), "empty array"),
        (Some(Endpoint::Embeddings), br#"{"model": "text-embedding-3-small", "input": {"a": 1}}"#, Some("input"), "an object"),
        (Some(Endpoint::Responses), br#"{"model": "gpt-4o"}"#, Some("input"), "Missing"),
        (None, br#"{"model": "gpt-4o"}"#, None, "Cannot tell"),
    ];
    for (endpoint, body, param, needle) in cases {
        let e = error(*endpoint, body);
        let shown = String::from_utf8_lossy(body);
        assert_eq!(e.param(), *param, "{shown}: {e}");
        assert!(e.to_string().contains(needle), "{shown}: {e}");
    }
}

#[test]
fn deeply_nested_json_is_an_error_not_a_crash() {
    let mut body =
        String::from(r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi", "x": "#);
    body.push_str(&"[".repeat(100_000));
    body.push_str(&"]".repeat(100_000));
    body.push_str("}]}");
    let e = error(None, body.as_bytes());
    assert!(e.to_string().contains("recursion limit"), "{e}");
}
