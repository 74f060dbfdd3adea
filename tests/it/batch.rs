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
