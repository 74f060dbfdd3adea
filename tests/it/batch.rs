//! OpenAI's Files and Batch APIs, run by tokenwarden.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::{repo, start};

const WEB_KEY: &str = "tw-batch-web-key-00000001";
const LAB_KEY: &str = "tw-batch-lab-key-00000001";

fn config() -> String {
    format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"{WEB_KEY}\"]\n\n[[orgs.projects]]\nname = \"lab\"\nkeys = [\"{LAB_KEY}\"]\n"
    )
}

fn python() -> PathBuf {
    let python = std::env::var_os("TOKENWARDEN_SDK_PYTHON")
        .map_or_else(|| repo("target/sdk/venv/bin/python"), PathBuf::from);
    assert!(
        python.exists(),
        "{} is missing: run scripts/test, which installs the SDKs",
        python.display()
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_uploads_lists_reads_and_deletes_files() {
    let h = start("batch-files", &config()).await;
    let (python, base) = (python(), h.base.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(repo("tests/sdk/python_files.py"))
            .args([&base, WEB_KEY, LAB_KEY])
            .output()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("python: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("python files sdk ok"), "{stdout}");
    assert_eq!(h.served().requests, 0, "no file went upstream");
    // What is left in the ledger: the second file only, in one part.
    let files = h
        .gateway
        .store
        .files("acme".into(), "web".into())
        .await
        .unwrap_or_default();
    assert_eq!(files.len(), 1);
    let parts = h
        .gateway
        .store
        .file_parts("acme".into(), files[0].id.clone(), 0, 100)
        .await
        .unwrap_or_default();
    assert_eq!(
        parts.iter().map(bytes::Bytes::len).sum::<usize>() as u64,
        files[0].bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_runs_a_batch_to_completed() {
    let h = start("batch-run", &config()).await;
    let (python, base) = (python(), h.base.clone());
    let output = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(repo("tests/sdk/python_batch.py"))
            .args([&base, WEB_KEY, LAB_KEY, "40"])
            .output()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("python: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("python batch sdk ok"), "{stdout}");
    let batch = stdout.lines().last().unwrap_or_default().to_owned();
    // Each line was a call on the metered road, recorded with the batch's id.
    h.settled().await;
    let records = h.gateway.store.recent(200).await.unwrap_or_default();
    let of_batch: Vec<_> = records.iter().filter(|r| *r.key_id == *batch).collect();
    assert_eq!(of_batch.len(), 40, "{batch}: {records:?}");
    assert!(of_batch.iter().all(|r| r.state == "settled" && r.free));
    assert_eq!(h.served().requests, 40);
}

/// Put a batch input file of `lines` chat lines in the ledger, as an upload
/// of project `web` would.
async fn input_file(h: &crate::harness::Harness, lines: usize) -> String {
    let text: String = (0..lines)
        .map(|i| {
            serde_json::json!({"custom_id": format!("req-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}})
            .to_string()
                + "\n"
        })
        .collect();
    let meta = tokenwarden::store::FileMeta {
        id: "file-test000000000000000000001".into(),
        org: "acme".into(),
        project: "web".into(),
        purpose: String::new(),
        filename: "input.jsonl".into(),
        bytes: 0,
        created_at: 1,
    };
    let store = &h.gateway.store;
    let fail = |e: tokenwarden::store::StoreError| panic!("{e}");
    store.file_begin(meta.clone()).await.unwrap_or_else(fail);
    store
        .file_part(
            "acme".into(),
            meta.id.clone(),
            0,
            bytes::Bytes::from(text.clone()),
        )
        .await
        .unwrap_or_else(fail);
    store
        .file_end(
            "acme".into(),
            meta.id.clone(),
            "batch".into(),
            text.len() as u64,
        )
        .await
        .unwrap_or_else(fail);
    meta.id
}

async fn batch_status(h: &crate::harness::Harness, id: &str) -> serde_json::Value {
    h.client
        .get(format!("{}/batches/{id}", h.base))
        .bearer_auth(WEB_KEY)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default()
}

/// Under `batch_spend = "free"` a batch larger than the day's allowance
/// stops short of it (the reserve left to live calls) with nothing billed,
/// and goes on when the day rolls over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_only_batch_stops_at_the_cap_and_goes_on_the_next_day() {
    let config = format!("{}\n[program.groups.mini]\ndaily_tokens = 1000\n", config());
    let h = start("batch-free-only", &config).await;
    let file = input_file(&h, 140).await;
    let created: serde_json::Value = h
        .post("/batches", WEB_KEY)
        .json(&serde_json::json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "7d"}))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    let id = created["id"].as_str().unwrap_or_default().to_owned();
    assert_eq!(created["status"], "in_progress", "{created}");
    // Wait until the runner stops: lines still pending, none running.
    let counts = || async {
        let c = h
            .gateway
            .store
            .batch_counts("acme".into(), id.clone())
            .await
            .unwrap_or_default();
        let n = |s: &str| c.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
        (n("pending"), n("running"), n("done"))
    };
    let mut last = (0, 0, 0);
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = counts().await;
        if now.1 == 0 && now.0 > 0 && now == last {
            break;
        }
        last = now;
    }
    let (pending, running, done) = counts().await;
    assert!(
        pending > 0 && running == 0 && done > 0,
        "{:?}",
        (pending, running, done)
    );
    h.settled().await;
    let day = h
        .daily("acme", "mini")
        .await
        .unwrap_or_else(|| panic!("no daily row"));
    assert_eq!(day.billed_tokens, 0, "nothing billed");
    assert!(
        day.free_tokens <= 900,
        "the 10% reserve stays for live calls: {}",
        day.free_tokens
    );
    assert_eq!(batch_status(&h, &id).await["status"], "in_progress");
    // The next day: it goes on to the end, still free.
    h.clock.set(crate::harness::NOON_MS + 86_400_000);
    let mut status = serde_json::Value::Null;
    for _ in 0..200 {
        status = batch_status(&h, &id).await;
        if status["status"] == "completed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status["status"], "completed", "{status}");
    assert_eq!(status["request_counts"]["completed"], 140, "{status}");
    h.settled().await;
    let next = h
        .daily("acme", "mini")
        .await
        .unwrap_or_else(|| panic!("no daily row"));
    assert_eq!(next.billed_tokens, 0, "nothing billed the next day either");
}
