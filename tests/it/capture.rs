//! Capture and export of shared traffic: what is kept (sharing projects of
//! an org with `capture = true`, after redaction), what is not (a project
//! that does not share: nothing, anywhere), the round trip through
//! `tokenwarden export` into OpenAI's chat fine-tuning format, the retention
//! purge, and export memory that does not grow with the rows.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use tokenwarden::gateway::Clock;

use crate::harness::{start, Harness};

const SHARED: &str = "tw-capture-shared-0000001";
const PRIVATE: &str = "tw-capture-private-000001";
const MARKER: &str = "zebra-quartz-5581-never-stored";

fn orgs() -> String {
    format!(
        "[[orgs]]\nname = \"plat\"\nsharing = \"selected\"\ncapture = true\ncapture_retention_days = 7\n\n[[orgs.projects]]\nname = \"tenant\"\nsharing = true\nprivacy_guard = \"redact\"\nkeys = [\"{SHARED}\"]\n\n[[orgs.projects]]\nname = \"vault\"\nsharing = false\nkeys = [\"{PRIVATE}\"]\n"
    )
}

/// A configuration file for the CLI, on the harness's ledger.
fn cli_config(h: &Harness) -> std::path::PathBuf {
    let path = h.dir.join("export.toml");
    let text = format!(
        "[store]\nurl = \"{}\"\n\n[upstreams.main]\nbase_url = \"http://127.0.0.1:9/v1\"\n\n{}",
        crate::harness::store_url(&h.dir),
        orgs()
    );
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    path
}

fn tokenwarden(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn post(h: &Harness, path: &str, key: &str, body: Value) -> String {
    let r = h
        .post(path, key)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.status().as_u16(), 200, "{path}");
    r.text().await.unwrap_or_default()
}

/// Every byte of the ledger's files (the database and its WAL).
fn ledger_bytes(dir: &Path) -> Vec<u8> {
    crate::harness::ledger_copy(dir)
        .into_iter()
        .flat_map(|(_, bytes)| bytes)
        .collect()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_calls_round_trip_into_the_fine_tuning_format_and_private_ones_leave_nothing() {
    let h = start("capture", &orgs()).await;
    let chat = post(
        &h,
        "/chat/completions",
        SHARED,
        json!({"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Write to ada@example.com about the plan."}]}),
    )
    .await;
    let chat: Value = serde_json::from_str(&chat).unwrap_or_default();
    let streamed = post(
        &h,
        "/chat/completions",
        SHARED,
        json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "Stream a story."}]}),
    )
    .await;
    post(
        &h,
        "/responses",
        SHARED,
        json!({"model": "gpt-4o", "instructions": "Be brief.", "input": "Hello there"}),
    )
    .await;
    post(
        &h,
        "/responses",
        SHARED,
        json!({"model": "gpt-4o", "stream": true, "input": [{"role": "user", "content": "Hi, streamed"}]}),
    )
    .await;
    post(
        &h,
        "/embeddings",
        SHARED,
        json!({"model": "text-embedding-3-small", "input": "not kept"}),
    )
    .await;
    // A cut stream is not a finished exchange: not kept.
    let cut = h
        .post("/chat/completions", SHARED)
        .header("x-sim-fault", "cut=2")
        .json(&json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "Cut me off."}]}))
        .send()
        .await;
    if let Ok(r) = cut {
        let _ = r.bytes().await;
    }
    // The project that does not share: nothing kept, whatever the org says.
    for stream in [false, true] {
        post(
            &h,
            "/chat/completions",
            PRIVATE,
            json!({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": format!("secret plan {MARKER}")}]}),
        )
        .await;
    }
    h.settled().await;
    // Captures are written in the background: wait for the four.
    for _ in 0..200 {
        if h.gateway.store.count_captures("plat").await.unwrap_or(0) >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(h.gateway.store.count_captures("plat").await.unwrap_or(0), 4);
    let files = ledger_bytes(&h.dir);
    assert!(!files.is_empty());
    assert!(
        !contains(&files, MARKER),
        "a private call's content is in the ledger"
    );
    assert!(
        !contains(&files, "ada@example.com"),
        "a redacted address is in the ledger"
    );
    assert!(
        !contains(&files, "You are terse."),
        "captured content is not compressed at rest"
    );

    let config = cli_config(&h);
    let config = config.to_string_lossy().into_owned();
    let (ok, chat_lines, stderr) = tokenwarden(&[
        "export", "--config", &config, "--org", "plat", "--format", "chat",
    ]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("4 calls written"), "{stderr}");
    assert!(stderr.contains("peak memory"), "{stderr}");
    let examples: Vec<Value> = chat_lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_default())
        .collect();
    assert_eq!(examples.len(), 4, "{chat_lines}");
    for e in &examples {
        assert!(tokenwarden::finetune::errors(e).is_empty(), "{e}");
    }
    // The first is the unstreamed chat: its reply is the one the client got,
    // and the address went out (and was kept) redacted.
    let first = &examples[0]["messages"];
    assert_eq!(
        first[0],
        json!({"role": "system", "content": "You are terse."})
    );
    assert_eq!(
        first[1]["content"],
        "Write to [REDACTED_EMAIL] about the plan."
    );
    assert_eq!(first[2]["role"], "assistant");
    assert_eq!(
        first[2]["content"],
        chat["choices"][0]["message"]["content"]
    );
    // The streamed one was assembled from the events the client got.
    let streamed_text: String = streamed
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect();
    assert!(!streamed_text.is_empty());
    assert_eq!(examples[1]["messages"][1]["content"], streamed_text);
    assert_eq!(examples[2]["messages"][0]["content"], "Be brief.");
    assert_eq!(examples[3]["messages"][0]["content"], "Hi, streamed");

    // The file passes the fine-tuning format check, and a bad one does not.
    let file = h.dir.join("train.jsonl");
    std::fs::write(&file, &chat_lines).unwrap_or_else(|e| panic!("{e}"));
    let (ok, out, err) = tokenwarden(&["check-finetune", &file.to_string_lossy()]);
    assert!(ok && out.contains("4 examples"), "{out}{err}");
    let bad = h.dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (ok, _, err) = tokenwarden(&["check-finetune", &bad.to_string_lossy()]);
    assert!(
        !ok && err.contains("example_missing_assistant_message"),
        "{err}"
    );

    // Raw: metadata, request and response; filters by project and day.
    let (ok, raw, stderr) = tokenwarden(&[
        "export",
        "--config",
        &config,
        "--org",
        "plat",
        "--format",
        "raw",
        "--project",
        "tenant",
        "--since",
        "2026-11-24",
        "--until",
        "2026-11-24",
    ]);
    assert!(ok, "{stderr}");
    let raw: Vec<Value> = raw
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_default())
        .collect();
    assert_eq!(raw.len(), 4);
    assert_eq!(raw[1]["streamed"], true);
    assert_eq!(raw[1]["project"], "tenant");
    assert!(raw[0]["output_tokens"].as_u64().unwrap_or(0) > 0);
    let (ok, none, _) = tokenwarden(&[
        "export",
        "--config",
        &config,
        "--org",
        "plat",
        "--since",
        "2026-11-25",
    ]);
    assert!(ok && none.is_empty());
    assert!(!raw.iter().any(|r| r.to_string().contains(MARKER)));
}

#[tokio::test]
async fn captures_past_their_retention_are_purged_without_being_asked() {
    let h = start("capture-purge", &orgs()).await;
    post(
        &h,
        "/chat/completions",
        SHARED,
        json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Keep me a while."}]}),
    )
    .await;
    for _ in 0..200 {
        if h.gateway.store.count_captures("plat").await.unwrap_or(0) == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(h.gateway.store.count_captures("plat").await.unwrap_or(0), 1);
    // Six days on, still within the org's 7 days: a restart keeps it.
    h.clock.set(h.clock.now_ms() + 6 * 86_400_000);
    drop(h.restart().await);
    assert_eq!(h.gateway.store.count_captures("plat").await.unwrap_or(0), 1);
    // Eight days on: the purge that runs when the gateway starts removes it.
    h.clock.set(h.clock.now_ms() + 2 * 86_400_000);
    drop(h.restart().await);
    assert_eq!(h.gateway.store.count_captures("plat").await.unwrap_or(0), 0);
}

/// Fill `org` with `n` captured calls straight into the ledger in `dir`.
async fn fill(dir: &Path, org: &str, n: u64) {
    let pair = json!({
        "request": {"model": "gpt-4o-mini", "messages": [
            {"role": "system", "content": "You are a helpful assistant for a travel company."},
            {"role": "user", "content": "Which documents do I need for a trip from Lisbon to Toronto?"}]},
        "response": {"choices": [{"index": 0, "message": {"role": "assistant",
            "content": "You need a valid passport and an eTA; check the airline's rules too."}, "finish_reason": "stop"}]},
    });
    let body = tokenwarden::capture::compress(&pair).unwrap_or_default();
    if crate::pg::selected() {
        let url = crate::harness::store_url(dir);
        crate::pg::connect(&url)
            .await
            .execute(
                "INSERT INTO captures (org, id, started_ms, project, model, endpoint, streamed, input_tokens, output_tokens, body)
                 SELECT $1, i, 1795521600000 + i, 'tenant', 'gpt-4o-mini', '/v1/chat/completions', false, 40, 20, $3
                 FROM generate_series(1, $2::BIGINT) i",
                &[&org, &(n as i64), &body],
            )
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        return;
    }
    let conn = rusqlite::Connection::open(dir.join("ledger.db")).unwrap_or_else(|e| panic!("{e}"));
    conn.execute(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
         INSERT INTO captures (started_ms, org, project, model, endpoint, streamed, input_tokens, output_tokens, body)
         SELECT 1795521600000 + i, ?2, 'tenant', 'gpt-4o-mini', '/v1/chat/completions', 0, 40, 20, ?3 FROM n",
        rusqlite::params![n as i64, org, body],
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

fn peak_mb(stderr: &str) -> f64 {
    stderr
        .split("peak memory ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|mb| mb.parse().ok())
        .unwrap_or_else(|| panic!("no peak memory in {stderr}"))
}

#[tokio::test]
async fn export_memory_does_not_grow_with_the_rows() {
    let h = start("capture-memory", &orgs()).await;
    fill(&h.dir, "small", 5_000).await;
    fill(&h.dir, "large", 100_000).await;
    let config = cli_config(&h);
    let config = config.to_string_lossy().into_owned();
    let run = |org: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(["export", "--config", &config, "--org", org])
            .stdout(std::process::Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let small = run("small");
    let large = run("large");
    assert!(large.contains("100000 calls written"), "{large}");
    let (small_mb, large_mb) = (peak_mb(&small), peak_mb(&large));
    eprintln!("export peak memory: 5,000 rows {small_mb} MB, 100,000 rows {large_mb} MB");
    // 20 times the rows, a few MB more at most (SQLite's page cache fills up;
    // PostgreSQL's rows come through a bounded buffer).
    assert!(large_mb < small_mb + 8.0, "{small_mb} MB -> {large_mb} MB");
}
