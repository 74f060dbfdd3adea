//! The official OpenAI SDKs, Python and Node, as clients of the gateway.
//! `scripts/test` installs them (pinned: tests/sdk/requirements.txt and
//! tests/sdk/node/package-lock.json); without them these tests fail, they
//! are never skipped.

use std::path::PathBuf;
use std::process::Command;

use crate::harness::{repo, start};

const KEY: &str = "tw-sdk-test-key-000000001";
const BLOCK_KEY: &str = "tw-sdk-test-block-0000001";

fn config() -> String {
    format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{KEY}\"]\n\n[[orgs]]\nname = \"tight\"\n\n[[orgs.projects]]\nname = \"batch\"\non_exhausted = \"block\"\nkeys = [\"{BLOCK_KEY}\"]\n\n[program.groups.flagship]\ndaily_tokens = 1000\n"
    )
}

async fn run_sdk(label: &str, program: PathBuf, script: PathBuf) {
    assert!(
        program.exists() || program.components().count() == 1,
        "{} is missing: run scripts/test, which installs the SDKs",
        program.display()
    );
    let h = start(label, &config()).await;
    let base = h.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(&program)
            .arg(&script)
            .args([&base, KEY, BLOCK_KEY])
            .output()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("{label}: {e} (run scripts/test, which installs the SDKs)"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{label} failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" ok"), "{stdout}");
    // Every call the SDK made was settled in the ledger.
    h.settled().await;
    let records = h.gateway.store.recent(100).await.unwrap_or_default();
    assert!(records.len() >= 8, "only {} calls recorded", records.len());
    assert!(records.iter().all(|r| r.state == "settled"));
    // Two refusals: one at max_retries=0, one at the SDK's default retry
    // settings, which did not retry it (x-should-retry: false).
    let refused = records.iter().filter(|r| r.decision == "refused").count();
    assert_eq!(refused, 2, "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_openai_sdk() {
    let python = std::env::var_os("TOKENWARDEN_SDK_PYTHON")
        .map_or_else(|| repo("target/sdk/venv/bin/python"), PathBuf::from);
    run_sdk("python-sdk", python, repo("tests/sdk/python_sdk.py")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_openai_sdk() {
    assert!(
        repo("tests/sdk/node/node_modules/openai").exists(),
        "tests/sdk/node/node_modules is missing: run scripts/test, which installs the Node SDK"
    );
    run_sdk(
        "node-sdk",
        PathBuf::from("node"),
        repo("tests/sdk/node/sdk.mjs"),
    )
    .await;
}

/// Structured outputs, tool calls (streamed too), `n` choices and log
/// probabilities through the gateway, in the shapes the SDK's helpers
/// parse; every call settled with the usage the simulator reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_parses_structured_outputs_and_tool_calls() {
    let h = start("sdk-fidelity", &config()).await;
    let stdout = crate::harness::python("python_fidelity.py", &[&h.base, KEY]).await;
    assert!(stdout.contains("python fidelity ok"), "{stdout}");
    h.settled().await;
    let records = h.gateway.store.recent(100).await.unwrap_or_default();
    assert!(records.len() >= 15, "{} calls", records.len());
    assert!(records.iter().all(|r| r.state == "settled"), "{records:?}");
    // The ledger's output tokens are the simulator's, call for call.
    let served = h.served();
    let ledger: u64 = records.iter().map(|r| r.output).sum();
    assert_eq!(ledger, served.completion_tokens);
    assert!(records.iter().all(|r| !r.estimated), "{records:?}");
}

/// Stored responses and stored chat completions, every route of the SDK's
/// resources, against the simulated upstream itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_keeps_responses_and_chat_completions_as_openai_does() {
    let sim = tokenwarden::simulator::Simulator::new(
        crate::catalog(),
        tokenwarden::simulator::SimConfig::default(),
    );
    let (addr, _stop) = crate::harness::spawn(tokenwarden::simulator::router(sim)).await;
    let stdout = crate::harness::python("python_stored.py", &[&format!("http://{addr}/v1")]).await;
    assert!(stdout.contains("python stored ok"), "{stdout}");
}
