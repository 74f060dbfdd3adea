//! `tokenwarden reconcile`: the ledger against the upstream's own Usage and
//! Costs APIs (the simulator serves them from what it answered), offline.

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;

use serde_json::{json, Value};
use tokenwarden::config::Config;
use tokenwarden::gateway::{self, Gateway, ManualClock};
use tokenwarden::simulator::{self, SimConfig, Simulator};

const KEY: &str = "tw-reconcile-key-00000001";

fn reconcile(config: &std::path::Path, day: &str) -> (i32, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["reconcile", "--json", "--day", day, "--config"])
        .arg(config)
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_books_agree_and_a_call_past_the_gateway_is_found() {
    let dir = crate::harness::temp_dir("reconcile");
    let clock = Arc::new(ManualClock::new(crate::harness::NOON_MS));
    let sim = Simulator::with_clock(crate::catalog(), SimConfig::default(), clock.clone());
    let (sim_addr, _sim_stop) = crate::harness::spawn(simulator::router(sim.clone())).await;
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"reconcile-admin-token-01\"\n\n[store]\nurl = \"{}\"\n\n[upstreams.sim]\nbase_url = \"http://{sim_addr}/v1\"\napi_key = \"sk-upstream\"\nproject = \"proj_app\"\nadmin_key = \"sk-admin-reconcile\"\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{KEY}\"]\n",
        crate::harness::store_url(&dir)
    );
    let file = dir.join("tokenwarden.toml");
    std::fs::write(&file, &text).unwrap_or_else(|e| panic!("{e}"));
    let config =
        Config::load(&file, &HashMap::<String, String>::new()).unwrap_or_else(|e| panic!("{e}"));
    let gw = Gateway::new(
        config,
        crate::harness::open_store(&dir).await,
        clock.clone(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (addr, _stop) = crate::harness::spawn(gateway::app(gw.clone())).await;
    let client = crate::harness::http_client();
    // Free calls of both groups, and billed ones of a model outside the program.
    for (model, n) in [("gpt-4o", 2), ("gpt-4o-mini", 3), ("gpt-3.5-turbo", 2)] {
        for _ in 0..n {
            let r = client
                .post(format!("http://{addr}/v1/chat/completions"))
                .bearer_auth(KEY)
                .json(&json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello!"}]}))
                .send()
                .await
                .map_or(0, |r| r.status().as_u16());
            assert_eq!(r, 200, "{model}");
        }
    }
    for _ in 0..100 {
        if gw.store.recent(20).await.unwrap_or_default().len() == 7 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    gw.store.flush().await.unwrap_or_else(|e| panic!("{e}"));
    let day = gw.today().to_string();

    let (code, report) = tokio::task::spawn_blocking({
        let (file, day) = (file.clone(), day.clone());
        move || reconcile(&file, &day)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["differs"], false);
    let usage = report["usage"].as_array().cloned().unwrap_or_default();
    assert_eq!(usage.len(), 3, "{report:#}");
    let mini = usage
        .iter()
        .find(|l| l["model"] == "gpt-4o-mini-2024-07-18")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(mini["project"], "proj_app");
    assert_eq!(mini["tokenwarden"]["requests"], 3);
    assert_eq!(mini["tokenwarden"], mini["openai"]);
    let cost = &report["costs"][0];
    assert_ne!(cost["tokenwarden_usd"], "$0.000000000000", "{report:#}");
    assert_eq!(cost["differs"], false, "{report:#}");

    // A call that went to the upstream past the gateway: OpenAI counted it,
    // the ledger did not.
    let r = client
        .post(format!("http://{sim_addr}/v1/chat/completions"))
        .bearer_auth("sk-upstream")
        .header("OpenAI-Project", "proj_app")
        .json(&json!({"model": "gpt-4o-mini", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello!"}]}))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    assert_eq!(r, 200);
    let (code, report) = tokio::task::spawn_blocking({
        let (file, day) = (file.clone(), day.clone());
        move || reconcile(&file, &day)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(code, 1, "{report:#}");
    let mini = report["usage"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["model"] == "gpt-4o-mini-2024-07-18")
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (
            mini["tokenwarden"]["requests"].as_u64(),
            mini["openai"]["requests"].as_u64()
        ),
        (Some(3), Some(4))
    );
    assert_eq!(mini["differs"], true);

    // The gateway reconciles too, and its dashboard shows the last result.
    gw.reconcile(gw.today()).await;
    let page =
        crate::harness::dashboard_page(&format!("http://{addr}"), "reconcile-admin-token-01").await;
    assert!(
        page.contains("data-metric=\"reconciled\" data-value=\"differs\""),
        "no reconciliation on the dashboard"
    );
    assert!(page.contains(&format!("tokenwarden reconcile --day {day}")));
}
