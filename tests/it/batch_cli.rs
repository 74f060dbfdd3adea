//! `tokenwarden batch`: a file of requests run from the command line as a
//! project's batch, on a real ledger, the binary in front of a simulator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokenwarden::simulator::{SimConfig, Simulator};

const KEY: &str = "tw-batch-cli-key-00000001";

/// A simulator, and a configuration file on a ledger in `dir` (`sqlite`:
/// always SQLite, else the tests' store).
async fn setup(
    label: &str,
    sim_config: SimConfig,
    sqlite: bool,
) -> (Arc<Simulator>, PathBuf, tokio::sync::oneshot::Sender<()>) {
    let dir = crate::harness::temp_dir(label);
    let sim = Simulator::new(crate::catalog(), sim_config);
    let (addr, stop) = crate::harness::spawn(tokenwarden::simulator::router(sim.clone())).await;
    let store = if sqlite {
        format!("sqlite://{}", dir.join("ledger.db").display())
    } else {
        crate::harness::store_url(&dir)
    };
    let file = dir.join("tokenwarden.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"{store}\"\n\n[upstreams.sim]\nbase_url = \"http://{addr}/v1\"\napi_key = \"${{UPSTREAM_KEY}}\"\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"{KEY}\"]\nbatch_concurrency = 4\n"
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (sim, file, stop)
}

/// An input file of `lines` chat requests.
fn input(dir: &Path, lines: usize) -> PathBuf {
    let text: String = (0..lines)
        .map(|i| {
            serde_json::json!({"custom_id": format!("line-{i}"), "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": format!("question {i}")}]}})
            .to_string()
                + "\n"
        })
        .collect();
    let path = dir.join("input.jsonl");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
    path
}

fn command(config: &Path, input: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tokenwarden"));
    command
        .args(["batch", "--config"])
        .arg(config)
        .args(["--project", "web"])
        .arg(input)
        .env("UPSTREAM_KEY", crate::harness::UPSTREAM_KEY);
    command
}

async fn run(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn served(sim: &Simulator) -> u64 {
    sim.stats()
        .get(crate::harness::UPSTREAM_KEY)
        .map_or(0, |s| s.requests)
}

/// custom_id -> how many output lines name it; and how many have a response.
fn tally(stdout: &[u8]) -> (HashMap<String, usize>, usize) {
    let mut seen = HashMap::new();
    let mut answered = 0;
    for line in String::from_utf8_lossy(stdout).lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        if v["response"]["status_code"] == 200 {
            answered += 1;
        }
        *seen
            .entry(v["custom_id"].as_str().unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    (seen, answered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_command_runs_a_file_and_prints_it_again_without_running_it() {
    let (sim, config, _stop) = setup("batch-cli", SimConfig::default(), false).await;
    let dir = config.parent().unwrap_or_else(|| panic!("no folder"));
    let lines = 40;
    let input = input(dir, lines);
    let first = run(command(&config, &input)).await;
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    let (seen, answered) = tally(&first.stdout);
    assert_eq!(seen.len(), lines, "{stderr}");
    assert!(seen.values().all(|n| *n == 1), "each line once");
    assert_eq!(answered, lines);
    assert_eq!(served(&sim), lines as u64);
    assert!(
        stderr.contains("completed: 40 lines, 40 completed"),
        "{stderr}"
    );

    let again = run(command(&config, &input)).await;
    assert!(again.status.success());
    assert_eq!(again.stdout, first.stdout, "the same output");
    assert_eq!(served(&sim), lines as u64, "nothing ran again");

    // A file that is not a batch input: OpenAI's line errors, exit 1.
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"custom_id\": \"a\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\", \"body\": {}}\nnot json\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let failed = run(command(&config, &bad)).await;
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(!failed.status.success());
    assert!(
        stderr.contains("failed") && stderr.contains("line 2"),
        "{stderr}"
    );
    assert!(failed.stdout.is_empty());
}

/// `kill -9` while the command runs, then the same command again: it goes
/// on with the same batch, every line in its output exactly once, and no
/// line went upstream twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_command_goes_on_after_kill_9() {
    let slow = SimConfig {
        ttft: Duration::from_millis(20),
        token_delay: Duration::from_millis(5),
        output_tokens: 8,
    };
    let (sim, config, _stop) = setup("batch-cli-kill", slow, true).await;
    let dir = config.parent().unwrap_or_else(|| panic!("no folder"));
    let lines = 150;
    let input = input(dir, lines);
    let mut child = command(&config, &input)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..1000 {
        if served(&sim) >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap_or_else(|e| panic!("kill -9: {e}"));
    let _ = child.wait();
    let at_kill = served(&sim);
    assert!(
        (20..lines as u64).contains(&at_kill),
        "{at_kill} served when killed"
    );

    let again = run(command(&config, &input)).await;
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(
        stderr.contains("going on from where an earlier run stopped"),
        "{stderr}"
    );
    let (seen, answered) = tally(&again.stdout);
    assert_eq!(seen.len(), lines, "every line is in the output");
    assert!(seen.values().all(|n| *n == 1), "each exactly once");
    assert!(
        served(&sim) <= lines as u64,
        "no line went upstream twice: {}",
        served(&sim)
    );
    // Lines the kill cut are reported, not run again.
    assert!(answered + 4 >= lines, "{answered} answered");
}
