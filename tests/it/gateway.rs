//! The gateway driven over HTTP, in front of the simulated upstream.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokenwarden::simulator::SimConfig;

use crate::harness::{start, start_with, Harness, NOON_MS, UPSTREAM_KEY};

const BLOCK: &str = "tw-test-block-00000000001";
const BILL: &str = "tw-test-bill-000000000001";
const CLAMP: &str = "tw-test-clamp-00000000001";
const DOWN: &str = "tw-test-downgrade-0000001";
const PRIVATE: &str = "tw-test-private-000000001";
const SMALL: &str = "tw-test-small-tier-000001";

/// Org acme (tier 5, selected sharing) with one project per policy and a
/// private one; org small (tier 2); flagship capped at `cap` a day.
fn config(cap: u64, extra_program: &str) -> String {
    format!(
        r#"
[[orgs]]
name = "acme"
tier = 5
sharing = "selected"

[[orgs.projects]]
name = "blocky"
on_exhausted = "block"
keys = ["{BLOCK}"]

[[orgs.projects]]
name = "billy"
keys = ["{BILL}"]

[[orgs.projects]]
name = "clampy"
on_exhausted = "clamp"
keys = ["{CLAMP}"]

[[orgs.projects]]
name = "downy"
on_exhausted = "downgrade"
keys = ["{DOWN}"]

[[orgs.projects]]
name = "private"
sharing = false
keys = ["{PRIVATE}"]

[[orgs]]
name = "small"
tier = 2

[[orgs.projects]]
name = "app"
keys = ["{SMALL}"]

[program]
{extra_program}

[program.groups.flagship]
daily_tokens = {cap}
"#
    )
}

/// "Hello!" as one user message is 9 prompt tokens; the simulator writes
/// `output` tokens when the cap allows.
fn chat(model: &str, max_tokens: u64) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": max_tokens})
}

async fn send(
    h: &Harness,
    key: &str,
    body: &Value,
    output: u64,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let response = h
        .post("/chat/completions", key)
        .header("x-sim-output-tokens", output.to_string())
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.json::<Value>().await.unwrap_or_default();
    (status, headers, body)
}

fn header(headers: &reqwest::header::HeaderMap, name: &str) -> u64 {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The data payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn a_call_is_metered_settled_and_reported_in_headers() {
    let h = start("metered", &config(1_000, "")).await;
    let (status, headers, body) = send(&h, BILL, &chat("gpt-4o", 16), 16).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["total_tokens"], 25);
    assert_eq!(body["model"], "gpt-4o-2024-08-06");
    assert_eq!(header(&headers, "x-free-tokens-limit"), 1_000);
    assert_eq!(header(&headers, "x-free-tokens-remaining"), 975);
    assert_eq!(header(&headers, "x-free-tokens-reset"), 12 * 3600);
    assert!(headers.contains_key("x-request-id"));
    assert_eq!(h.free_used("acme", "flagship").await, 25);
    let record = &h.gateway.store.recent(1).await.unwrap_or_default()[0];
    assert_eq!(
        (
            record.state.as_str(),
            record.free,
            record.input,
            record.output
        ),
        ("settled", true, 9, 16)
    );
    assert_eq!(h.served().total_tokens, 25);
}

#[tokio::test]
async fn streams_hide_the_usage_chunk_unless_asked_and_are_settled() {
    let h = start("stream", &config(1_000, "")).await;
    // Not asked: no `stream_options` (the gateway adds it to the client's
    // bytes), `null`, an object without the flag, the flag false.
    let options = [
        None,
        Some(json!(null)),
        Some(json!({})),
        Some(json!({"include_usage": false})),
        Some(json!({"include_usage": true})),
    ];
    for option in &options {
        let asked = option.as_ref().is_some_and(|o| o["include_usage"] == true);
        let mut body = chat("gpt-4o", 16);
        body["stream"] = json!(true);
        if let Some(option) = option {
            body["stream_options"] = option.clone();
        }
        let text = h
            .post("/chat/completions", BILL)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            text.headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream; charset=utf-8")
        );
        let text = text.text().await.unwrap_or_default();
        let data = sse_data(&text);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let usage_chunks: Vec<Value> = data
            .iter()
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter(|v| v["choices"].as_array().is_some_and(Vec::is_empty))
            .collect();
        if asked {
            assert_eq!(usage_chunks.len(), 1);
            assert_eq!(usage_chunks[0]["usage"]["total_tokens"], 25);
        } else {
            assert!(
                usage_chunks.is_empty(),
                "a usage chunk reached a client that did not ask: {text}"
            );
        }
    }
    h.settled().await;
    // Each settled with the usage upstream reported, none estimated.
    let calls = options.len() as u64;
    let records = h.gateway.store.recent(calls).await.unwrap_or_default();
    assert_eq!(records.len() as u64, calls);
    assert!(records.iter().all(|r| !r.estimated), "{records:?}");
    assert_eq!(h.free_used("acme", "flagship").await, 25 * calls);
}

#[tokio::test]
async fn responses_completions_and_embeddings_are_metered() {
    let h = start("endpoints", &config(100_000, "")).await;
    let r = h
        .post("/responses", BILL)
        .json(&json!({"model": "gpt-4o", "input": "Hello!", "max_output_tokens": 5}))
        .send()
        .await;
    let body: Value = r
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(body["usage"]["output_tokens"], 5, "{body}");
    let input = body["usage"]["input_tokens"].as_u64().unwrap_or_default();

    let r = h
        .post("/responses", BILL)
        .json(
            &json!({"model": "gpt-4o", "input": "Hello!", "max_output_tokens": 5, "stream": true}),
        )
        .send()
        .await;
    let text = r
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    assert!(text.contains("event: response.incomplete"), "{text}");

    let r = h
        .post("/completions", BILL)
        .json(&json!({"model": "gpt-3.5-turbo", "prompt": "Say hi", "max_tokens": 4}))
        .send()
        .await;
    let body: Value = r
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");

    let r = h
        .post("/embeddings", BILL)
        .json(&json!({"model": "text-embedding-3-small", "input": ["a b c", "d e"]}))
        .send()
        .await;
    let body: Value = r
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2), "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], 5);

    h.settled().await;
    assert_eq!(h.free_used("acme", "flagship").await, 2 * (input + 5));
    // gpt-3.5-turbo and embeddings are outside the program: billed, at list price.
    let outside = h
        .daily("acme", "")
        .await
        .unwrap_or_else(|| panic!("no billed totals"));
    assert_eq!(outside.free_tokens, 0);
    assert!(outside.billed_tokens > 5 && outside.cost_pico > 0);
}

#[tokio::test]
async fn keys_are_required_and_errors_speak_openai() {
    let h = start("auth", &config(1_000, "")).await;
    let url = format!("{}/chat/completions", h.base);
    for request in [
        h.client.post(&url),
        h.client.post(&url).bearer_auth("tw-not-a-real-key-0000000"),
    ] {
        let r = request
            .json(&chat("gpt-4o", 5))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 401);
        let body: Value = r.json().await.unwrap_or_default();
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let r = h
        .client
        .get(format!("{}/models", h.base))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 401, "every /v1 route needs a key");
    let r = h
        .client
        .get(format!("{}/models", h.base))
        .bearer_auth(BILL)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let models: Value = r.json().await.unwrap_or_default();
    assert!(models["data"]
        .as_array()
        .is_some_and(|d| d.iter().any(|m| m["id"] == "gpt-4o")));
    let healthz = h.base.replace("/v1", "/healthz");
    assert_eq!(
        h.client
            .get(healthz)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0),
        200
    );
    assert_eq!(h.served().requests, 0);
}

/// The server takes metered calls past the router (`gateway::App`); the
/// router alone takes them down the same road: keys, metering, headers,
/// and OpenAI's answers to other methods on both.
#[tokio::test]
async fn the_router_alone_meters_calls_the_same_way() {
    let h = start("router-alone", &config(1_000, "")).await;
    let (addr, _stop) =
        crate::harness::spawn(tokenwarden::gateway::router(h.gateway.clone())).await;
    let url = format!("http://{addr}/v1/chat/completions");
    let r = h
        .client
        .post(&url)
        .json(&chat("gpt-4o", 5))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 401);
    let r = h
        .client
        .post(&url)
        .bearer_auth(BILL)
        .header("x-sim-output-tokens", "16")
        .json(&chat("gpt-4o", 16))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(r.headers(), "x-free-tokens-remaining"), 975);
    assert_eq!(h.free_used("acme", "flagship").await, 25);
    for base in [h.base.clone(), format!("http://{addr}/v1")] {
        let url = format!("{base}/chat/completions");
        let r = h
            .client
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 401, "{base}");
        // (GET lists the stored chat completions: tests/it/stored.rs.)
        let r = h
            .client
            .put(&url)
            .bearer_auth(BILL)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 404, "{base}");
        let body: Value = r.json().await.unwrap_or_default();
        assert_eq!(
            body["error"]["message"],
            "Invalid URL (PUT /v1/chat/completions)"
        );
    }
    assert_eq!(h.served().requests, 1);
}

#[tokio::test]
async fn block_refuses_with_429_insufficient_quota_and_retry_after() {
    let h = start("block", &config(1_000, "")).await;
    let (status, _, _) = send(&h, BLOCK, &chat("gpt-4o", 500), 500).await;
    assert_eq!(status, 200);
    let (status, headers, body) = send(&h, BLOCK, &chat("gpt-4o", 500), 500).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], "insufficient_quota");
    assert_eq!(body["error"]["code"], "free_tokens_exhausted");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("flagship") && message.contains("491") && message.contains("00:00 UTC"),
        "{message}"
    );
    assert_eq!(header(&headers, "retry-after"), 12 * 3600);
    assert_eq!(header(&headers, "x-free-tokens-limit"), 1_000);
    assert_eq!(header(&headers, "x-free-tokens-remaining"), 491);
    assert_eq!(header(&headers, "x-free-tokens-reset"), 12 * 3600);
    // The refused call never reached upstream; the mini group is still open.
    assert_eq!(h.served().requests, 1);
    let (status, _, _) = send(&h, BLOCK, &chat("gpt-4o-mini", 500), 500).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_whole_request_rule() {
    let h = start("whole", &config(1_000, "")).await;
    for _ in 0..2 {
        let (_, _, body) = send(&h, BILL, &chat("gpt-4o", 480), 480).await;
        assert_eq!(body["usage"]["total_tokens"], 489);
    }
    // 978 used: a 489-token call is billed whole; a 12-token call after it is still free.
    send(&h, BILL, &chat("gpt-4o", 480), 480).await;
    send(&h, BILL, &chat("gpt-4o", 3), 3).await;
    let totals = h
        .daily("acme", "flagship")
        .await
        .unwrap_or_else(|| panic!("no totals"));
    assert_eq!((totals.free_tokens, totals.billed_tokens), (990, 489));
    // gpt-4o input $2.50 and output $10.00 per million: 9 * 2.5e6 + 480 * 10e6 pico-dollars.
    assert_eq!(totals.cost_pico, 9 * 2_500_000 + 480 * 10_000_000);
}

#[tokio::test]
async fn clamp_lowers_the_output_cap_to_fit() {
    let h = start("clamp", &config(1_000, "")).await;
    send(&h, CLAMP, &chat("gpt-4o", 480), 480).await;
    send(&h, CLAMP, &chat("gpt-4o", 480), 480).await;
    let (status, _, body) = send(&h, CLAMP, &chat("gpt-4o", 480), 480).await;
    assert_eq!(status, 200);
    // 22 left, 9 of prompt: the output was clamped to 13.
    assert_eq!(body["usage"]["completion_tokens"], 13, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(h.free_used("acme", "flagship").await, 1_000);
    let (status, _, body) = send(&h, CLAMP, &chat("gpt-4o", 480), 480).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("free_tokens_exhausted"))
    );
}

#[tokio::test]
async fn downgrade_sends_the_call_to_the_mini_model() {
    let h = start("downgrade", &config(100, "")).await;
    let (status, _, body) = send(&h, DOWN, &chat("gpt-4o", 200), 200).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["model"], "gpt-4o-mini-2024-07-18",
        "the response names the model that served it"
    );
    assert_eq!(h.free_used("acme", "mini").await, 209);
    assert_eq!(h.free_used("acme", "flagship").await, 0);
    let record = &h.gateway.store.recent(1).await.unwrap_or_default()[0];
    assert_eq!(
        (record.decision.as_str(), record.served_model.as_str()),
        ("downgraded", "gpt-4o-mini-2024-07-18")
    );
}

#[tokio::test]
async fn private_projects_outside_models_and_tiers() {
    let h = start("eligibility", &config(1_000, "")).await;
    let (_, headers, _) = send(&h, PRIVATE, &chat("gpt-4o", 5), 5).await;
    assert_eq!(header(&headers, "x-free-tokens-limit"), 0);
    let (_, _, _) = send(&h, BILL, &chat("o1-pro", 5), 5).await;
    h.settled().await;
    let flagship = h
        .daily("acme", "flagship")
        .await
        .unwrap_or_else(|| panic!("no totals"));
    assert_eq!((flagship.free_tokens, flagship.billed_tokens), (0, 14));
    let outside = h
        .daily("acme", "")
        .await
        .unwrap_or_else(|| panic!("no totals"));
    assert_eq!((outside.free_tokens, outside.billed_tokens), (0, 14));
    // Tier 2 gets the smaller cap of the mini group.
    let (_, headers, _) = send(&h, SMALL, &chat("gpt-4o-mini", 5), 5).await;
    assert_eq!(header(&headers, "x-free-tokens-limit"), 2_500_000);
    let (_, headers, _) = send(&h, BILL, &chat("gpt-4o-mini", 5), 5).await;
    assert_eq!(header(&headers, "x-free-tokens-limit"), 10_000_000);
}

#[tokio::test]
async fn no_free_tokens_after_the_program_ends() {
    let h = start("ended", &config(1_000, "ends = \"2026-11-23\"")).await;
    let (status, headers, _) = send(&h, BLOCK, &chat("gpt-4o", 5), 5).await;
    assert_eq!(header(&headers, "x-free-tokens-limit"), 0);
    assert_eq!(
        status, 200,
        "with no free tokens at all the call is billed, not blocked"
    );
    assert_eq!(h.free_used("acme", "flagship").await, 0);
}

#[tokio::test]
async fn the_allowance_resets_at_midnight_utc() {
    let h = start("midnight", &config(1_000, "")).await;
    h.clock.set(NOON_MS + 12 * 3600 * 1000 - 1000); // 23:59:59
    let (_, headers, _) = send(&h, BLOCK, &chat("gpt-4o", 900), 900).await;
    assert_eq!(header(&headers, "x-free-tokens-reset"), 1);
    let (status, _, _) = send(&h, BLOCK, &chat("gpt-4o", 900), 900).await;
    assert_eq!(status, 429);
    h.clock.set(NOON_MS + 12 * 3600 * 1000 + 1000); // 00:00:01 the next day
    let (status, headers, _) = send(&h, BLOCK, &chat("gpt-4o", 900), 900).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-free-tokens-remaining"), 1_000 - 909);
}

#[tokio::test]
async fn bad_input_is_a_clear_4xx_and_records_nothing() {
    let h = start("badinput", &config(1_000, "")).await;
    let mut deep =
        String::from(r#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi", "x": "#);
    deep.push_str(&"[".repeat(10_000));
    deep.push_str(&"]".repeat(10_000));
    deep.push_str("}]}");
    let big = format!(
        r#"{{"model": "gpt-4o", "messages": [{{"role": "user", "content": "{}"}}]}}"#,
        "a ".repeat(5_000_000)
    );
    let cases: Vec<(Vec<u8>, u16, Option<&str>)> = vec![
        (b"{\"model\": \"gpt-4o\", \"messages\": [".to_vec(), 400, None),
        (br#"{"model": "gpt-4o", "messages": "hi"}"#.to_vec(), 400, Some("messages")),
        (br#"{"model": "gpt-5o", "messages": [{"role": "user", "content": "hi"}]}"#.to_vec(), 404, Some("model")),
        (br#"{"model": "gpt-4o", "messages": []}"#.to_vec(), 400, Some("messages")),
        (big.into_bytes(), 413, None),
        (b"{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"\xff\"}]}".to_vec(), 400, None),
        (deep.into_bytes(), 400, None),
        (br#"{"messages": [{"role": "user", "content": "hi"}]}"#.to_vec(), 400, None),
        (br#"{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}"#.to_vec(), 400, Some("max_tokens")),
    ];
    for (body, status, param) in cases {
        let r = h
            .post("/chat/completions", BILL)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await;
        let r = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), status);
        let error: Value = r.json().await.unwrap_or_default();
        let e = &error["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
        assert!(
            e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(),
            "{error}"
        );
        assert_eq!(e["param"].as_str(), param, "{error}");
    }
    assert_eq!(
        h.gateway.store.recent(10).await.unwrap_or_default().len(),
        0,
        "bad input was recorded"
    );
    assert_eq!(h.served().requests, 0);
}

#[tokio::test]
async fn upstream_faults_release_or_settle_the_reservation() {
    let h = start("faults", &config(10_000, "")).await;
    // An upstream error: passed on, nothing used, nothing left reserved.
    let r = h
        .post("/chat/completions", BLOCK)
        .header("x-sim-fault", "status=500")
        .json(&chat("gpt-4o", 16))
        .send()
        .await;
    let r = r.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 500);
    let r = h
        .post("/chat/completions", BLOCK)
        .header("x-sim-fault", "status=429")
        .json(&chat("gpt-4o", 16))
        .send()
        .await;
    let r = r.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(h.free_used("acme", "flagship").await, 0);

    // Usage missing from a whole answer: estimated from its text.
    let r = h
        .post("/chat/completions", BLOCK)
        .header("x-sim-fault", "no-usage")
        .json(&chat("gpt-4o", 16))
        .send()
        .await;
    assert_eq!(r.map(|r| r.status().as_u16()).unwrap_or(0), 200);
    let record = &h.gateway.store.recent(1).await.unwrap_or_default()[0];
    assert_eq!(
        (record.input, record.output, record.estimated),
        (9, 16, true)
    );

    // A stream cut after the role chunk and 3 tokens: settled with the prompt and those tokens.
    let mut body = chat("gpt-4o", 16);
    body["stream"] = json!(true);
    let r = h
        .post("/chat/completions", BLOCK)
        .header("x-sim-fault", "cut=4")
        .header("x-sim-token-ms", "5")
        .json(&body)
        .send()
        .await;
    let r = r.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.text().await.is_err(),
        "the client's stream must be cut too"
    );
    h.settled().await;
    let record = &h.gateway.store.recent(1).await.unwrap_or_default()[0];
    assert_eq!(
        (record.input, record.output, record.estimated),
        (9, 3, true)
    );

    let state = h.gateway.store.pool_state(pool(&h), 10_000);
    assert_eq!(state.reserved, 0);
    assert_eq!(state.used, 25 + 12);
}

fn pool(h: &Harness) -> tokenwarden::meter::PoolKey {
    tokenwarden::meter::PoolKey {
        org: 0,
        group: group_index(h, "flagship"),
        day: h.today(),
    }
}

fn group_index(h: &Harness, name: &str) -> usize {
    h.gateway
        .live()
        .config
        .catalog
        .groups
        .iter()
        .position(|g| *g.name == *name)
        .unwrap_or(usize::MAX)
}

#[tokio::test]
async fn an_upstream_that_stalls_times_out_with_504() {
    let text = config(10_000, "");
    let h = crate::harness::start_timeout("timeout2", &text, 1).await;
    let r = h
        .post("/chat/completions", BLOCK)
        .header("x-sim-fault", "stall=3000")
        .json(&chat("gpt-4o", 16))
        .send()
        .await;
    let r = r.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 504);
    let state = h.gateway.store.pool_state(pool(&h), 10_000);
    assert_eq!((state.reserved, state.used), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_race_of_250_streams_never_passes_the_cap() {
    let sim = SimConfig {
        token_delay: Duration::from_millis(2),
        ..SimConfig::default()
    };
    let h = start_with("race", &config(2_500, ""), sim).await;
    let mut calls = Vec::new();
    for _ in 0..250 {
        let mut body = chat("gpt-4o", 16);
        body["stream"] = json!(true);
        let request = h.post("/chat/completions", BLOCK).json(&body);
        calls.push(tokio::spawn(async move {
            let r = request.send().await.unwrap_or_else(|e| panic!("{e}"));
            let status = r.status().as_u16();
            let mut stream = r.bytes_stream();
            while let Some(chunk) = stream.next().await {
                chunk.unwrap_or_else(|e| panic!("{e}"));
            }
            status
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for call in calls {
        match call.await.unwrap_or_else(|e| panic!("{e}")) {
            200 => ok += 1,
            429 => refused += 1,
            other => panic!("status {other}"),
        }
    }
    h.settled().await;
    let served = h.served();
    // The witness: the free usage the upstream reports never passes the cap, and 90% of it is used.
    assert!(
        served.total_tokens <= 2_500,
        "upstream served {} free tokens",
        served.total_tokens
    );
    assert!(
        served.total_tokens >= 2_250,
        "only {} of 2,500 used",
        served.total_tokens
    );
    assert_eq!(ok + refused, 250);
    assert_eq!(h.free_used("acme", "flagship").await, served.total_tokens);
    assert_eq!(served.prompt_tokens, 9 * ok);
    let _ = UPSTREAM_KEY;
}

#[tokio::test]
async fn a_client_that_hangs_up_cancels_upstream_and_is_settled() {
    let sim = SimConfig {
        token_delay: Duration::from_millis(60),
        ..SimConfig::default()
    };
    let h = start_with("hangup", &config(10_000, ""), sim).await;
    let mut body = chat("gpt-4o", 16);
    body["stream"] = json!(true);
    let r = h
        .post("/chat/completions", BLOCK)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut stream = r.bytes_stream();
    let mut seen = 0;
    while let Some(chunk) = stream.next().await {
        seen += chunk.map(|c| c.len()).unwrap_or(0);
        if seen > 400 {
            break;
        }
    }
    drop(stream);
    h.settled().await;
    let record = &h.gateway.store.recent(1).await.unwrap_or_default()[0];
    assert!(record.estimated, "{record:?}");
    assert_eq!(record.status, 0, "the client got no complete answer");
    assert!(record.input == 9 && record.output < 16, "{record:?}");
    // The upstream call was cancelled: the simulator never finished it.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(h.served().completed, 0);
    let state = h.gateway.store.pool_state(pool(&h), 10_000);
    assert_eq!((state.reserved, state.used), (0, 9 + record.output));
}

#[tokio::test]
async fn a_restart_remembers_todays_usage() {
    let h = start("restart", &config(1_000, "")).await;
    send(&h, BLOCK, &chat("gpt-4o", 480), 480).await;
    send(&h, BLOCK, &chat("gpt-4o-mini", 16), 16).await;
    let again = h.restart().await;
    let (flagship, mini) = (group_index(&h, "flagship"), group_index(&h, "mini"));
    let state = |group, cap| {
        let key = tokenwarden::meter::PoolKey {
            org: 0,
            group,
            day: h.today(),
        };
        again.store.pool_state(key, cap)
    };
    assert_eq!(state(flagship, 1_000).used, 489);
    assert_eq!(state(mini, 10_000_000).used, 25);
}

#[tokio::test]
async fn enterprise_and_zero_data_retention_orgs_get_no_free_tokens() {
    let extra = "[[orgs]]\nname = \"bigco\"\nenterprise = true\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"tw-test-enterprise-000001\"]\n\n[[orgs]]\nname = \"zdr\"\nzero_data_retention = true\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"tw-test-zdr-0000000000001\"]\n";
    let text = format!("{extra}{}", config(1_000, ""));
    let h = start("enterprise", &text).await;
    for (key, org) in [
        ("tw-test-enterprise-000001", "bigco"),
        ("tw-test-zdr-0000000000001", "zdr"),
    ] {
        let (status, headers, _) = send(&h, key, &chat("gpt-4o", 5), 5).await;
        assert_eq!((status, header(&headers, "x-free-tokens-limit")), (200, 0));
        let totals = h
            .daily(org, "flagship")
            .await
            .unwrap_or_else(|| panic!("no totals for {org}"));
        assert_eq!((totals.free_tokens, totals.billed_tokens), (0, 14));
    }
}

/// A client that sends part of a request's head and then nothing is cut
/// off after the head's time limit, while a complete request on another
/// connection is served meanwhile.
#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = start("head-timeout", "").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tokenwarden::gateway::serve_with_timeout(
        listener,
        tokenwarden::gateway::app(h.gateway.clone()),
        async {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    let mut slow = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let health = h
        .client
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(health.unwrap_or(0), 200);
    // The server closes the slow connection (the cap only keeps a broken
    // server from hanging the suite).
    let mut buf = [0u8; 1024];
    let mut seen = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "the slow connection is still open");
    let head = String::from_utf8_lossy(&seen);
    assert!(
        head.is_empty() || head.starts_with("HTTP/1.1 408"),
        "{head}"
    );
    let _ = stop.send(());
    let _ = server.await;
}
