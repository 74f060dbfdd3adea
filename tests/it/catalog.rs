//! The configuration's catalog overlay: `[catalog.models.NAME]` and a
//! catalog file add models and change the built-in ones, without a rebuild.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{json, Value};
use tokenwarden::config::Config;
use tokenwarden::gateway::{self, Gateway, ManualClock};
use tokenwarden::simulator::{self, SimConfig, Simulator};

const KEY: &str = "tw-catalog-overlay-key-01";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlay_adds_a_model_and_changes_a_price() {
    let dir = crate::harness::temp_dir("catalog-overlay");
    std::fs::write(
        dir.join("overlay.toml"),
        "[models.\"chatgpt-4o-latest\"]\nencoding = \"o200k_base\"\ngroup = \"flagship\"\nmax_output = 16384\nprice = { input = \"5.00\", output = \"15.00\" }\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let text = |upstream: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[upstreams.sim]\nbase_url = \"{upstream}\"\napi_key = \"sk-upstream\"\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{KEY}\"]\n\n[program.groups.flagship]\ndaily_tokens = 0\n\n[catalog]\nfile = \"overlay.toml\"\n\n[catalog.models.\"gpt-oss-120b\"]\nencoding = \"o200k_base\"\ngroup = \"mini\"\nmax_output = 32768\nprice = {{ input = \"0.15\", output = \"0.60\" }}\n\n[catalog.models.\"gpt-4o\"]\nprice = {{ input = \"10.00\", output = \"40.00\" }}\n"
        )
    };
    let env: HashMap<String, String> = HashMap::new();
    // The file's path is the configuration's folder's.
    let config_file = dir.join("tokenwarden.toml");
    std::fs::write(&config_file, text("http://127.0.0.1:9/v1")).unwrap_or_else(|e| panic!("{e}"));
    let probe = Config::load(&config_file, &env).unwrap_or_else(|e| panic!("{e}"));
    // The upstream knows the same models (a platform's own, say).
    let sim = Simulator::new(probe.catalog.clone(), SimConfig::default());
    let (sim_addr, _sim_stop) = crate::harness::spawn(simulator::router(sim.clone())).await;
    std::fs::write(&config_file, text(&format!("http://{sim_addr}/v1")))
        .unwrap_or_else(|e| panic!("{e}"));
    let config = Config::load(&config_file, &env).unwrap_or_else(|e| panic!("{e}"));
    let gw = Gateway::new(
        config,
        crate::harness::open_store(&dir).await,
        Arc::new(ManualClock::new(crate::harness::NOON_MS)),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (addr, _stop) = crate::harness::spawn(gateway::app(gw.clone())).await;
    let client = crate::harness::http_client();
    let call = |model: &'static str| {
        client
            .post(format!("http://{addr}/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    for model in ["gpt-oss-120b", "gpt-4o", "chatgpt-4o-latest"] {
        let r = call(model).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status().as_u16(), 200, "{model}");
    }
    let listed: Value = client
        .get(format!("http://{addr}/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_default();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(
        ids.contains(&"gpt-oss-120b") && ids.contains(&"chatgpt-4o-latest"),
        "{ids:?}"
    );

    // Settled in the ledger as the overlay says.
    for _ in 0..100 {
        if gw.store.recent(10).await.unwrap_or_default().len() == 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let records = gw.store.recent(10).await.unwrap_or_default();
    let of = |model: &str| {
        records
            .iter()
            .find(|r| r.requested_model == model)
            .unwrap_or_else(|| panic!("no record of {model}: {records:?}"))
    };
    let oss = of("gpt-oss-120b");
    assert_eq!((oss.group.as_deref(), oss.free), (Some("mini"), true));
    // The flagship allowance is 0: gpt-4o is billed at the overlay's price.
    let gpt4o = of("gpt-4o");
    assert!(!gpt4o.free);
    assert_eq!(
        gpt4o.cost_pico,
        gpt4o.input * 10_000_000 + gpt4o.output * 40_000_000
    );
    let latest = of("chatgpt-4o-latest");
    assert_eq!(
        latest.cost_pico,
        latest.input * 5_000_000 + latest.output * 15_000_000
    );
}

#[test]
fn a_bad_overlay_names_its_key() {
    let env: HashMap<String, String> = HashMap::new();
    for (overlay, key) in [
        (
            "[catalog.models.\"new-model\"]\nmax_output = 5\n",
            "catalog.models.new-model",
        ),
        (
            "[catalog.models.\"gpt-4o\"]\ngroup = \"nope\"\n",
            "catalog.models.gpt-4o.group",
        ),
        (
            "[catalog.models.\"gpt-4o\"]\nprice = { input = \"x\" }\n",
            "catalog.models.gpt-4o.price",
        ),
        ("[catalog.models.\"gpt-4o\"]\nflavour = \"x\"\n", "line 12"),
    ] {
        let text = format!("[upstreams.sim]\nbase_url = \"http://127.0.0.1:9/v1\"\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{KEY}\"]\n\n{overlay}");
        let error = match Config::from_toml(&text, &env) {
            Ok(_) => panic!("{overlay}: accepted"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(key), "{overlay}: {error}");
    }
}
