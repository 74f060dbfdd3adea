//! Hostile clients and a misbehaving upstream cannot make one request cost
//! the others, or poison the ledger.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use serde_json::{json, Value};
use tokenwarden::config::Config;
use tokenwarden::gateway::{self, Gateway, ManualClock};
use tokenwarden::store::SqliteStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{
    dashboard_page, serve_process, spawn, start, start_with_server, temp_dir, Harness, NOON_MS,
    UPSTREAM_KEY,
};

const KEY: &str = "tw-test-hostile-key-000001";
const GUARDED: &str = "tw-test-hostile-guarded-01";

fn config() -> String {
    format!(
        r#"
[[orgs]]
name = "acme"

[[orgs.projects]]
name = "web"
on_exhausted = "block"
keys = ["{KEY}"]

[[orgs.projects]]
name = "guarded"
privacy_guard = "block"
keys = ["{GUARDED}"]

[program.groups.flagship]
daily_tokens = 100
"#
    )
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4})
}

async fn call(h: &Harness, key: &str, body: &Value) -> (u16, String) {
    let r = h
        .post("/chat/completions", key)
        .json(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

#[tokio::test]
async fn a_long_model_name_is_a_400_that_echoes_little_and_records_nothing() {
    let h = start("hostile-model", &config()).await;
    for name in [
        "x".repeat(900_000),
        format!("ft:gpt-4o-mini:{}", "y".repeat(300_000)),
        format!("gpt-4o{}", "\r".repeat(300)),
    ] {
        let (status, body) = call(&h, KEY, &chat(&name)).await;
        assert_eq!(status, 400, "{}", &body[..body.len().min(300)]);
        assert!(body.len() < 1_000, "{} bytes back", body.len());
        let error: Value = serde_json::from_str(&body).unwrap_or_default();
        assert_eq!(error["error"]["param"], "model");
    }
    // An unknown name of a plausible length: a short 404, its echo bounded.
    let (status, body) = call(&h, KEY, &chat(&"z".repeat(250))).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.len() < 600, "{body}");
    assert_eq!(h.served().requests, 0);
    assert!(h
        .gateway
        .store
        .recent(10)
        .await
        .unwrap_or_default()
        .is_empty());
}

#[tokio::test]
async fn a_refusal_never_wraps_the_tokens_it_needs() {
    let h = start("hostile-wrap", &config()).await;
    let mut body = chat("gpt-4o");
    body["max_tokens"] = json!(u64::MAX);
    let (status, text) = call(&h, KEY, &body).await;
    assert_eq!(status, 429, "{text}");
    let error: Value = serde_json::from_str(&text).unwrap_or_default();
    let message = error["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("needs up to {} tokens", u64::MAX)),
        "{message}"
    );
}

/// Send a head announcing `length` bytes and no body: the answer's status.
async fn declared_length(h: &Harness, length: u64) -> u16 {
    let address = h.base.trim_start_matches("http://").trim_end_matches("/v1");
    let mut tcp = tokio::net::TcpStream::connect(address)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n");
    tcp.write_all(head.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut answer = vec![0; 4096];
    // The body-read limit is 30 s: an answer before 20 s did not wait for it.
    let n = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut answer))
        .await
        .unwrap_or_else(|_| panic!("no answer within 20 s"))
        .unwrap_or_else(|e| panic!("{e}"));
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

#[tokio::test]
async fn a_declared_length_over_the_limit_is_a_413_at_once() {
    let h = start("hostile-length", &config()).await;
    assert_eq!(declared_length(&h, 1_000_000_000).await, 413);
    // A length that is no number hyper can hold is refused by hyper itself.
    assert!(matches!(
        declared_length(&h, u64::MAX).await,
        400 | 413 | 431
    ));
}

/// Large bodies that are slow to scan, sent at once, while a health probe
/// and a small call are timed: neither waits for the large bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_do_not_hold_the_workers_other_connections_need() {
    let h = Arc::new(
        start_with_server(
            "hostile-heavy",
            &config(),
            "max_body_bytes = 8388608\nupstream_timeout_secs = 60\n",
        )
        .await,
    );
    let heavy = json!({"model": "gpt-4o-mini", "max_tokens": 1,
        "messages": [{"role": "user", "content": "a@b.co ".repeat(80_000)}]});
    let started = Instant::now();
    let mut large = Vec::new();
    for _ in 0..4 {
        let (h, heavy) = (h.clone(), heavy.clone());
        large.push(tokio::spawn(async move { call(&h, GUARDED, &heavy).await }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let probe = Instant::now();
    let health = h
        .client
        .get(h.base.replace("/v1", "/healthz"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let health_took = probe.elapsed();
    assert_eq!(health.status().as_u16(), 200);
    let probe = Instant::now();
    let (status, body) = call(&h, KEY, &chat("gpt-4o-mini")).await;
    let small_took = probe.elapsed();
    assert_eq!(status, 200, "{body}");
    for task in large {
        let (status, body) = task.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 400, "{}", &body[..body.len().min(300)]);
        assert!(body.contains("sensitive_data_detected"), "{body}");
    }
    eprintln!(
        "large bodies: 4 x {} KB guarded in {:?}; /healthz answered in {health_took:?}, a small call in {small_took:?}",
        heavy.to_string().len() / 1024,
        started.elapsed()
    );
    // Generous: on a worker the four bodies held them for seconds.
    assert!(health_took < Duration::from_secs(2), "{health_took:?}");
    assert!(small_took < Duration::from_secs(2), "{small_took:?}");
}

/// A gateway in front of `upstream` (a test's own fake), with its harness
/// parts: the gateway, its base URL and the ledger's directory.
async fn gateway_before(
    label: &str,
    upstream: axum::Router,
) -> (Arc<Gateway>, String, std::path::PathBuf) {
    let dir = temp_dir(label);
    let (up, up_stop) = spawn(upstream).await;
    // Both servers live as long as the test's runtime.
    std::mem::forget(up_stop);
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[upstreams.fake]\nbase_url = \"http://{up}/v1\"\napi_key = \"sk-fake\"\n\n{}",
        config()
    );
    let config = Config::from_toml(&text, &std::collections::HashMap::new())
        .unwrap_or_else(|e| panic!("{e}"));
    let store = crate::harness::open_store(&dir).await;
    let gateway = Gateway::new(config, store, Arc::new(ManualClock::new(NOON_MS)))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (addr, stop) = spawn(gateway::app(gateway.clone())).await;
    std::mem::forget(stop);
    (gateway, format!("http://{addr}/v1"), dir)
}

/// An upstream whose answer's usage is the request's `x-usage` header.
fn absurd_upstream() -> axum::Router {
    axum::Router::new().route(
        "/v1/chat/completions",
        post(|headers: axum::http::HeaderMap| async move {
            let usage = headers
                .get("x-usage")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("null")
                .to_owned();
            let body = format!(
                r#"{{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"Hi there"}},"finish_reason":"stop"}}],"usage":{usage}}}"#
            );
            ([("content-type", "application/json")], body)
        }),
    )
}

#[tokio::test]
async fn absurd_usage_settles_with_the_estimate_and_the_ledger_stays_integers() {
    let (gateway, base, dir) = gateway_before("hostile-usage", absurd_upstream()).await;
    let client = crate::harness::http_client();
    let absurd = [
        r#"{"prompt_tokens":100000000000000,"completion_tokens":2,"total_tokens":100000000000002}"#,
        r#"{"prompt_tokens":-5,"completion_tokens":2,"total_tokens":-3}"#,
        r#"{"prompt_tokens":"9","completion_tokens":2,"total_tokens":11}"#,
        r#"{"prompt_tokens":12.0,"completion_tokens":2,"total_tokens":14}"#,
        r#"{"prompt_tokens":1e20,"completion_tokens":2,"total_tokens":1e20}"#,
        r#"{"prompt_tokens":9,"completion_tokens":18446744073709551615,"total_tokens":0}"#,
        r#"{"prompt_tokens":9,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":-1}}"#,
    ];
    for usage in absurd {
        let r = client
            .post(format!("{base}/chat/completions"))
            .bearer_auth(KEY)
            .header("x-usage", usage)
            .json(&chat("gpt-4o-mini"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let status = r.status().as_u16();
        assert_eq!(
            status,
            200,
            "{usage}: {}",
            r.text().await.unwrap_or_default()
        );
        let record = &gateway
            .store
            .recent(1)
            .await
            .unwrap_or_else(|e| panic!("{e}"))[0];
        // The estimate: the counted prompt and the answer's text.
        assert!(record.estimated, "{usage}: {record:?}");
        assert_eq!((record.input, record.output), (9, 2), "{usage}: {record:?}");
    }
    // A sane usage is taken as reported.
    let r = client
        .post(format!("{base}/chat/completions"))
        .bearer_auth(KEY)
        .header(
            "x-usage",
            r#"{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}"#,
        )
        .json(&chat("gpt-4o-mini"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 200);
    let record = &gateway
        .store
        .recent(1)
        .await
        .unwrap_or_else(|e| panic!("{e}"))[0];
    assert!(!record.estimated && record.output == 3, "{record:?}");
    let totals = gateway
        .store
        .daily(gateway.today())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        totals.iter().map(|t| t.free_tokens).sum::<u64>(),
        7 * 11 + 12
    );
    // Every count and amount is a non-negative integer: SQLite's values are
    // checked for their type, PostgreSQL's columns are BIGINT (an overflow
    // would have been an error), so for their sign.
    let integers: i64 = if crate::pg::selected() {
        crate::pg::connect(&crate::harness::store_url(&dir))
            .await
            .query_one(
                "SELECT COUNT(*) FROM requests WHERE input_tokens < 0 OR cost_pico < 0",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .get(0)
    } else {
        rusqlite::Connection::open(dir.join("ledger.db"))
            .and_then(|c| {
                c.query_row(
                    "SELECT COUNT(*) FROM requests WHERE typeof(input_tokens) != 'integer' OR typeof(cost_pico) != 'integer'",
                    [],
                    |r| r.get(0),
                )
            })
            .unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(integers, 0);
}

/// A ledger in which an older version let a sum overflow into a REAL
/// still opens: `serve` starts on it and `usage` reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_with_reals_from_an_older_version_still_opens() {
    let dir = temp_dir("hostile-reals");
    let db = dir.join("ledger.db");
    let config = dir.join("tokenwarden.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"admin-token-0123456789\"\n\n[store]\nurl = \"sqlite://{}\"\n\n[upstreams.sim]\nbase_url = \"http://127.0.0.1:9/v1\"\napi_key = \"${{UPSTREAM_KEY}}\"\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"{KEY}\"]\n",
            db.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // The ledger as an older version left it: a call whose usage was
    // 1e14 prompt tokens, its day's cost past i64 (a REAL).
    drop(SqliteStore::open(&db).unwrap_or_else(|e| panic!("{e}")));
    let today = tokenwarden::day::Day::from_unix(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    );
    let now_ms = today.0 * 86_400_000 + 1_000;
    let conn = rusqlite::Connection::open(&db).unwrap_or_else(|e| panic!("{e}"));
    conn.execute_batch(&format!(
        "INSERT INTO requests (started_ms, day, org, project, key_id, endpoint, requested_model, served_model, grp, decision, reserved, free_lane, streamed, state, input_tokens, output_tokens, cost_pico, status)
         VALUES ({now_ms}, {day}, 'acme', 'web', 'k', '/v1/chat/completions', 'gpt-4o', 'gpt-4o', 'flagship', 'billed', 0, 0, 0, 'settled', 1e14, 2, 2.5e20, 200),
                ({now_ms}, {day}, 'acme', 'web', 'k', '/v1/chat/completions', 'gpt-4o', 'gpt-4o', 'flagship', 'billed', 0, 0, 0, 'settled', 9223372036854775807, 2, 9223372036854775807, 200);
         INSERT INTO daily (day, org, grp, free_tokens, billed_tokens, cost_pico, requests)
         VALUES ({day}, 'acme', 'flagship', 0, 1e14, 2.5e20, 2);",
        day = today.0
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    drop(conn);

    let usage = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["usage", "--json", "--config"])
        .arg(&config)
        .env("UPSTREAM_KEY", UPSTREAM_KEY)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        usage.status.success(),
        "{}",
        String::from_utf8_lossy(&usage.stderr)
    );
    let (mut child, base) = serve_process(
        Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("UPSTREAM_KEY", UPSTREAM_KEY)
            .stderr(Stdio::null()),
    );
    let client = crate::harness::http_client();
    let report = client
        .get(format!(
            "{base}/organization/usage/completions?bucket_width=1d&limit=31&start_time={}",
            today.0 * 86_400
        ))
        .bearer_auth("admin-token-0123456789")
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let status = report.status().as_u16();
    let text = report.text().await.unwrap_or_default();
    // The dashboard shows the day's billed cost, not 0.
    let page = dashboard_page(base.trim_end_matches("/v1"), "admin-token-0123456789").await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200, "{text}");
    let marker = "data-metric=\"cost\" data-org=\"acme\" data-group=\"flagship\" data-value=\"";
    let cost: u64 = page
        .split(marker)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no flagship cost on the dashboard: {page}"));
    assert!(cost > 0, "the dashboard shows {cost} billed");
    // The two rows' cost saturates rather than fail the report.
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copied ledger gives away no credential: neither a client key nor the
/// upstream's key is in the database, its WAL or the call journal (a key
/// is kept only as a 12-hex-digit prefix of its SHA-256).
#[tokio::test]
async fn a_copied_ledger_holds_no_key() {
    let h = start("hostile-copied", &config()).await;
    for _ in 0..3 {
        let (status, body) = call(&h, KEY, &chat("gpt-4o-mini")).await;
        assert_eq!(status, 200, "{body}");
    }
    h.settled().await;
    let parts = crate::harness::ledger_copy(&h.dir);
    for (part, bytes) in &parts {
        for secret in [KEY, UPSTREAM_KEY, "Bearer"] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} in {part}"
            );
        }
    }
    // SQLite: the database and its journal at least; PostgreSQL: its dump.
    let expected = if crate::pg::selected() { 1 } else { 2 };
    assert!(
        parts.len() >= expected,
        "{:?}",
        parts.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    assert!(parts.iter().any(|(_, bytes)| !bytes.is_empty()));
    let record = &h.gateway.store.recent(1).await.unwrap_or_default()[0];
    assert_eq!(record.key_id.len(), 12);
}
