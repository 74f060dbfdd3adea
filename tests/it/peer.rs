//! A peer's test suite: openai-python's own API tests (tests/api_resources
//! of the pinned openai package's sdist, which scripts/test downloads), run
//! against the gateway in front of its simulator, changed only where no
//! real server could accept them (tests/sdk/api_resources.py lists every
//! change and every test left out, with its reason).

use crate::harness::{repo, start};

const KEY: &str = "tw-peer-suite-key-0000001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_pythons_own_api_tests_pass_against_the_gateway() {
    let requirements = std::fs::read_to_string(repo("tests/sdk/requirements.txt"))
        .unwrap_or_else(|e| panic!("{e}"));
    let version = requirements
        .lines()
        .find_map(|l| l.strip_prefix("openai=="))
        .unwrap_or_else(|| panic!("no pinned openai"));
    let sdist = repo(&format!("target/sdk/openai-python-{version}"));
    assert!(
        sdist.join("tests/conftest.py").exists(),
        "{} is missing: run scripts/test, which downloads it",
        sdist.display()
    );
    // One project alone on its upstream: stored responses and chat
    // completions are its own to read.
    let config = format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{KEY}\"]\n"
    );
    let h = start("peer-suite", &config).await;
    let work = h.dir.join("openai-python");
    let stdout = crate::harness::python(
        "api_resources.py",
        &[
            &sdist.display().to_string(),
            &work.display().to_string(),
            &h.base,
            KEY,
        ],
    )
    .await;
    let summary = stdout
        .lines()
        .rev()
        .find(|l| l.contains(" passed"))
        .unwrap_or_else(|| panic!("no summary: {stdout}"));
    let passed: u64 = summary
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        !summary.contains("failed") && !summary.contains("error"),
        "{summary}"
    );
    // Every file's tests ran, not a handful.
    assert!(passed >= 300, "{summary}");
    assert!(h.served().requests >= 150, "the calls reached the upstream");
}
