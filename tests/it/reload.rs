//! `SIGHUP` re-reads the configuration file: a valid one replaces orgs,
//! projects, keys and the program while a call is in flight; an invalid one
//! is refused with check-config's message and the running one stays.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokenwarden::simulator::{self, SimConfig, Simulator};

use crate::harness::{serve_process, spawn, store_url, temp_dir, UPSTREAM_KEY};

const OLD_KEY: &str = "tw-reload-old-key-0000001";
const NEW_KEY: &str = "tw-reload-new-key-0000001";
const BETA_KEY: &str = "tw-reload-beta-key-000001";

fn config(store: &str, sim: std::net::SocketAddr, orgs: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\nurl = \"{store}\"\n\n[upstreams.sim]\nbase_url = \"http://{sim}/v1\"\napi_key = \"${{UPSTREAM_KEY}}\"\n\n{orgs}"
    )
}

fn hang_up(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap_or_else(|e| panic!("kill -HUP: {e}"));
    assert!(status.success());
}

async fn status(client: &reqwest::Client, base: &str, key: &str) -> u16 {
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    client
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .map_or(0, |r| r.status().as_u16())
}

/// Wait until `key` gets `want` (a reload is applied a moment after the signal).
async fn until_status(client: &reqwest::Client, base: &str, key: &str, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = status(client, base, key).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{key}: {got}, never {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_replaces_the_configuration_and_keeps_calls_in_flight() {
    let dir = temp_dir("reload");
    let sim = Simulator::new(
        crate::catalog(),
        SimConfig {
            ttft: Duration::from_millis(5),
            token_delay: Duration::from_millis(20),
            output_tokens: 60,
        },
    );
    let (sim_addr, _sim_stop) = spawn(simulator::router(sim)).await;
    let store = store_url(&dir);
    let file = dir.join("tokenwarden.toml");
    let acme = |keys: &str| {
        format!("[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [{keys}]\n")
    };
    let write = |text: String| std::fs::write(&file, text).unwrap_or_else(|e| panic!("{e}"));
    write(config(&store, sim_addr, &acme(&format!("\"{OLD_KEY}\""))));
    let log = dir.join("stderr.log");
    let stderr = std::fs::File::create(&log).unwrap_or_else(|e| panic!("{e}"));
    let (mut child, base) = serve_process(
        Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(["serve", "--config"])
            .arg(&file)
            .env("UPSTREAM_KEY", UPSTREAM_KEY)
            .env("TOKENWARDEN_LOG", "info")
            .stderr(Stdio::from(stderr)),
    );
    let client = crate::harness::http_client();
    assert_eq!(status(&client, &base, OLD_KEY).await, 200);

    // A stream of about 1.2 s, in flight across the reload.
    let in_flight = {
        let (client, base) = (client.clone(), base.clone());
        tokio::spawn(async move {
            let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "a long one"}]});
            let r = client
                .post(format!("{base}/chat/completions"))
                .bearer_auth(OLD_KEY)
                .json(&body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let code = r.status().as_u16();
            (code, r.text().await.unwrap_or_default())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    // The old key goes, a new one and a new org come.
    let mut orgs = acme(&format!("\"{NEW_KEY}\""));
    orgs.push_str(&format!(
        "\n[[orgs]]\nname = \"beta\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{BETA_KEY}\"]\n"
    ));
    write(config(&store, sim_addr, &orgs));
    hang_up(&child);
    until_status(&client, &base, NEW_KEY, 200).await;
    assert_eq!(status(&client, &base, OLD_KEY).await, 401);
    assert_eq!(status(&client, &base, BETA_KEY).await, 200);
    let (code, text) = in_flight.await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 200);
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the stream in flight was cut: {}",
        &text[text.len().saturating_sub(300)..]
    );

    // A file check-config refuses: refused with its message; the running
    // configuration stays.
    write(
        config(&store, sim_addr, &orgs)
            .replace("name = \"beta\"", "name = \"beta\"\ncolour = \"red\""),
    );
    let refused = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["check-config", "--config"])
        .arg(&file)
        .env("UPSTREAM_KEY", UPSTREAM_KEY)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    let message = message.trim().trim_start_matches("tokenwarden: ");
    assert!(message.contains("colour"), "{message}");
    hang_up(&child);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(message) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no line with check-config's message ({message}):\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status(&client, &base, NEW_KEY).await, 200);
    assert_eq!(status(&client, &base, BETA_KEY).await, 200);
    assert_eq!(status(&client, &base, OLD_KEY).await, 401);
    let _ = child.kill();
    let _ = child.wait();
}

/// In one process: orgs, projects and groups keep their positions across a
/// reload (the meter's pools and the metrics are keyed by them), a retired
/// project's key stops working, and a new org gets its own pool.
#[tokio::test]
async fn a_reload_keeps_positions_and_the_meter() {
    let before = format!(
        "[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\nkeys = [\"{OLD_KEY}\"]\n\n[[orgs.projects]]\nname = \"api\"\nkeys = [\"{NEW_KEY}\"]\n"
    );
    let h = crate::harness::start("reload-positions", &before).await;
    let call = |key: &'static str| {
        h.post("/chat/completions", key)
            .json(&json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    assert_eq!(call(OLD_KEY).await.map_or(0, |r| r.status().as_u16()), 200);
    let used = h.free_used("acme", "mini").await;
    assert!(used > 0);
    // web is gone; beta comes before acme in the file; a new group.
    let after = format!(
        "[[orgs]]\nname = \"beta\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{BETA_KEY}\"]\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"api\"\nkeys = [\"{NEW_KEY}\"]\n\n[program.groups.local]\ndaily_tokens = 42\nmodels = [\"o1-pro\"]\n"
    );
    h.reload(&after).await.unwrap_or_else(|e| panic!("{e}"));
    let live = h.gateway.live();
    let orgs: Vec<&str> = live.config.orgs.iter().map(|o| &*o.name).collect();
    assert_eq!(orgs, ["acme", "beta"], "acme keeps position 0");
    let acme = &live.config.orgs[0];
    let projects: Vec<(&str, bool)> = acme
        .projects
        .iter()
        .map(|p| (&*p.name, p.retired))
        .collect();
    assert_eq!(projects, [("web", true), ("api", false)]);
    assert_eq!(
        live.config.catalog.groups.last().map(|g| &*g.name),
        Some("local")
    );
    assert_eq!(call(OLD_KEY).await.map_or(0, |r| r.status().as_u16()), 401);
    assert_eq!(call(NEW_KEY).await.map_or(0, |r| r.status().as_u16()), 200);
    assert_eq!(call(BETA_KEY).await.map_or(0, |r| r.status().as_u16()), 200);
    // acme's pool went on from where it was; beta's started at zero.
    let mini = live
        .config
        .catalog
        .groups
        .iter()
        .position(|g| &*g.name == "mini")
        .unwrap_or(usize::MAX);
    h.settled().await;
    assert!(h.gateway.pool_state(&live.config, 0, mini).used > used);
    assert_eq!(
        h.gateway.pool_state(&live.config, 1, mini).used,
        h.free_used("beta", "mini").await
    );
    // A file check-config refuses is refused here too.
    let e = h.reload("[[orgs]]\nname = \"x\"\ncolour = 1\n").await;
    assert!(e.is_err_and(|e| e.contains("colour")));
}
