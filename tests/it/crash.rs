//! `kill -9` the gateway under load and restart it: the ledger holds every
//! call the upstream served, and `tokenwarden usage` reads it back.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokenwarden::catalog::Catalog;
use tokenwarden::simulator::{self, SimConfig, Simulator};
use tokenwarden::store::SqliteStore;

use crate::harness::{serve_process, spawn, temp_dir, UPSTREAM_KEY};

const KEY: &str = "tw-crash-test-key-0000001";

/// Write a configuration with one org and one project (`policy` its
/// `on_exhausted`) in front of the simulator at `sim_addr`, its ledger in `dir`.
fn write_config(
    dir: &std::path::Path,
    sim_addr: std::net::SocketAddr,
    policy: &str,
) -> std::path::PathBuf {
    let config = dir.join("tokenwarden.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"sqlite://{}\"\n\n[upstreams.sim]\nbase_url = \"http://{sim_addr}/v1\"\napi_key = \"${{UPSTREAM_KEY}}\"\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\non_exhausted = \"{policy}\"\nkeys = [\"{KEY}\"]\n",
            dir.join("ledger.db").display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    config
}

/// Start `tokenwarden serve` at log level `log`, its stderr to `stderr`, and
/// wait for the address it prints.
fn start_gateway(config: &std::path::Path, log: &str, stderr: Stdio) -> (Child, String) {
    serve_process(
        Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(["serve", "--config"])
            .arg(config)
            .env("UPSTREAM_KEY", UPSTREAM_KEY)
            .env("TOKENWARDEN_LOG", log)
            .stderr(stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_no_served_call() {
    let dir = temp_dir("crash");
    let sim = Simulator::new(
        Catalog::builtin().unwrap_or_else(|e| panic!("{e}")),
        SimConfig {
            ttft: Duration::from_millis(5),
            token_delay: Duration::from_millis(1),
            output_tokens: 16,
        },
    );
    let (sim_addr, _sim_stop) = spawn(simulator::router(sim.clone())).await;
    let db = dir.join("ledger.db");
    let config = write_config(&dir, sim_addr, "block");

    let (mut gateway, base) = start_gateway(&config, "info", Stdio::null());
    let client = crate::harness::http_client();
    // Load until 60 calls have been answered (however slow the machine), then
    // kill -9 while the workers keep calls in flight.
    let answered_so_far = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    for worker in 0..16 {
        let (client, url, counter) = (
            client.clone(),
            format!("{base}/chat/completions"),
            answered_so_far.clone(),
        );
        workers.push(tokio::spawn(async move {
            let mut ok = 0u64;
            loop {
                let body = json!({"model": "gpt-4o-mini", "stream": worker % 2 == 0, "max_tokens": 16,
                                  "messages": [{"role": "user", "content": "Hello!"}]});
                let Ok(response) = client.post(&url).bearer_auth(KEY).json(&body).send().await else { break };
                if response.status().as_u16() != 200 || response.text().await.is_err() {
                    break;
                }
                ok += 1;
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            ok
        }));
    }
    let started = Instant::now();
    while answered_so_far.load(std::sync::atomic::Ordering::Relaxed) < 60 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the gateway answered too few calls in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gateway.kill().unwrap_or_else(|e| panic!("kill -9: {e}"));
    let _ = gateway.wait();
    let mut answered = 0;
    for w in workers {
        answered += w.await.unwrap_or(0);
    }
    assert!(answered >= 60, "{answered} calls answered");

    // Restart on the same ledger: pending calls are recovered as interrupted.
    let (mut gateway, _) = start_gateway(&config, "info", Stdio::null());
    let served = sim.stats().get(UPSTREAM_KEY).copied().unwrap_or_default();
    let store = SqliteStore::open(&db).unwrap_or_else(|e| panic!("{e}"));
    let settled = store.count_requests("settled").unwrap_or_default();
    let interrupted = store.count_requests("interrupted").unwrap_or_default();
    assert_eq!(store.count_requests("pending").unwrap_or(1), 0);
    assert!(
        settled + interrupted >= served.requests,
        "the upstream served {} calls; the ledger holds {settled} settled and {interrupted} interrupted",
        served.requests
    );
    // Whole answers are durable before they are sent; a stream's settled row
    // is written just after its last event, so a stream the client finished
    // may come back as interrupted (its reservation counted), never missing.
    assert!(
        settled + interrupted >= answered,
        "{answered} answered calls but {settled} + {interrupted} in the ledger"
    );
    eprintln!("crash test: answered {answered}, upstream served {} ({} completed), ledger {settled} settled + {interrupted} interrupted", served.requests, served.completed);

    // `tokenwarden usage` reads the same ledger: free used covers at least what the upstream reported.
    let out = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["usage", "--json", "--config"])
        .arg(&config)
        .env("UPSTREAM_KEY", UPSTREAM_KEY)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let usage: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mini = usage["usage"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["group"] == "mini"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(mini["org"], "acme");
    assert_eq!(mini["daily_cap"], 10_000_000);
    let free_used = mini["free_used"].as_u64().unwrap_or_default();
    assert!(
        free_used >= served.total_tokens,
        "free used {free_used} < served {}",
        served.total_tokens
    );
    assert_eq!(mini["free_left"].as_u64(), Some(10_000_000 - free_used));
    let table = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["usage", "--config"])
        .arg(&config)
        .env("UPSTREAM_KEY", UPSTREAM_KEY)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("free left") && table.contains(&free_used.to_string()),
        "{table}"
    );

    let _ = gateway.kill();
    let _ = gateway.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Even at the most verbose log level, no log line holds a client key, the
/// upstream key or any content of a call; and a project that does not share,
/// in an org that captures its shared traffic, leaves its content neither in
/// the logs nor in the ledger's files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_hold_no_keys_and_no_content() {
    let dir = temp_dir("logs");
    let sim = Simulator::new(
        Catalog::builtin().unwrap_or_else(|e| panic!("{e}")),
        SimConfig::default(),
    );
    let (sim_addr, _sim_stop) = spawn(simulator::router(sim.clone())).await;
    let config = write_config(&dir, sim_addr, "bill");
    const PRIVATE_KEY: &str = "tw-crash-private-00000001";
    let private_marker = "PRIVATE-MARKER-9902";
    let mut text = std::fs::read_to_string(&config).unwrap_or_default();
    text.push_str(&format!(
        "\n[[orgs]]\nname = \"platform\"\nsharing = \"selected\"\ncapture = true\n\n[[orgs.projects]]\nname = \"vault\"\nsharing = false\nkeys = [\"{PRIVATE_KEY}\"]\n"
    ));
    std::fs::write(&config, text).unwrap_or_else(|e| panic!("{e}"));
    let log = dir.join("stderr.log");
    let stderr = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
    let (mut child, base) = start_gateway(&config, "trace", Stdio::from(stderr));
    let marker = "CONTENT-MARKER-4471";
    let client = crate::harness::http_client();
    for stream in [false, true] {
        let body = json!({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": marker}]});
        let r = client
            .post(format!("{base}/chat/completions"))
            .bearer_auth(KEY)
            .json(&body)
            .send()
            .await;
        assert_eq!(r.map(|r| r.status().as_u16()).unwrap_or(0), 200);
        let body = json!({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": private_marker}]});
        let r = client
            .post(format!("{base}/chat/completions"))
            .bearer_auth(PRIVATE_KEY)
            .json(&body)
            .send()
            .await;
        let r = r.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 200);
        let _ = r.bytes().await;
    }
    // A wrong key, a missing model: their errors are logged too, if at all.
    let _ = client
        .post(format!("{base}/chat/completions"))
        .bearer_auth("tw-wrong-key-0000000000")
        .json(&json!({}))
        .send()
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("call settled"),
        "the trace log is empty:\n{text}"
    );
    for secret in [
        KEY,
        PRIVATE_KEY,
        UPSTREAM_KEY,
        marker,
        private_marker,
        "tw-wrong-key-0000000000",
    ] {
        assert!(!text.contains(secret), "{secret} is in the log:\n{text}");
    }
    // Nor in the ledger: neither org's content (acme does not capture; the
    // platform's project does not share).
    let mut ledger = Vec::new();
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with("ledger.db") {
            ledger.extend(std::fs::read(entry.path()).unwrap_or_default());
        }
    }
    assert!(ledger.len() > 4096, "no ledger files in {}", dir.display());
    for content in [marker, private_marker] {
        assert!(
            !ledger
                .windows(content.len())
                .any(|w| w == content.as_bytes()),
            "{content} is in the ledger"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
