//! Alerts, received by a real local HTTP receiver: once per rule per day,
//! retried when the receiver fails at first, and a receiver that never
//! answers does not hold up requests.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use tokenwarden::gateway::Clock;

use crate::harness::{spawn, start, Harness};

const APP: &str = "tw-alerts-app-00000000001";

#[derive(Default)]
struct Receiver {
    /// Answer 500 to this many posts first.
    fail_first: AtomicU32,
    posts: AtomicU32,
    alerts: Mutex<Vec<Value>>,
}

async fn hook(State(r): State<Arc<Receiver>>, Json(body): Json<Value>) -> StatusCode {
    r.posts.fetch_add(1, Ordering::SeqCst);
    let failing = r
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    if let Ok(mut alerts) = r.alerts.lock() {
        alerts.push(body);
    }
    StatusCode::NO_CONTENT
}

fn config(webhook: &str) -> String {
    format!(
        "[alerts]\nwebhook_url = \"{webhook}\"\nused_percent = [50, 80]\nprojected_exhaustion = false\nbilled_cost_above = \"0.000001\"\nretries = 4\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{APP}\"]\n\n[program.groups.flagship]\ndaily_tokens = 1000\n"
    )
}

async fn call(h: &Harness, output: u64) {
    let body = json!({"model": "gpt-4o", "max_tokens": output,
        "messages": [{"role": "user", "content": "Hello!"}]});
    let r = h
        .post("/chat/completions", APP)
        .header("x-sim-output-tokens", output.to_string())
        .json(&body)
        .send()
        .await
        .map(|r| r.status().as_u16());
    assert_eq!(r.unwrap_or(0), 200);
}

fn rules(r: &Receiver) -> Vec<String> {
    let mut rules: Vec<String> = r
        .alerts
        .lock()
        .map(|a| {
            a.iter()
                .map(|v| v["alert"]["rule"].as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default();
    rules.sort();
    rules
}

async fn wait_for(r: &Receiver, n: usize) {
    for _ in 0..300 {
        if rules(r).len() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("only {:?} arrived", rules(r));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_fires_once_a_day_and_failed_posts_are_retried() {
    let receiver = Arc::new(Receiver::default());
    receiver.fail_first.store(2, Ordering::SeqCst);
    let (addr, _stop) = spawn(
        Router::new()
            .route("/hook", post(hook))
            .with_state(receiver.clone()),
    )
    .await;
    let h = start("alerts", &config(&format!("http://{addr}/hook"))).await;

    call(&h, 600).await; // ~611 of 1000: 50%
    wait_for(&receiver, 1).await;
    assert_eq!(rules(&receiver), ["free_used_50"]);
    call(&h, 200).await; // ~822: 80%
    call(&h, 16).await; // nothing new
    wait_for(&receiver, 2).await;
    call(&h, 600).await; // past the cap: billed, so the cost rule
    wait_for(&receiver, 3).await;
    call(&h, 600).await; // billed again: nothing new
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        rules(&receiver),
        ["billed_cost", "free_used_50", "free_used_80"]
    );

    // The first alert was refused twice, then delivered.
    let day = h.today();
    let store = &h.gateway.store;
    let first = store
        .alert_delivery(day, "acme", "flagship", "free_used_50")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first, Some((3, true)));
    assert_eq!(receiver.posts.load(Ordering::SeqCst), 5);

    // The payload: Slack's text, and the structured fields.
    let alerts = receiver
        .alerts
        .lock()
        .map(|a| a.clone())
        .unwrap_or_default();
    let fifty = alerts
        .iter()
        .find(|a| a["alert"]["rule"] == "free_used_50")
        .cloned()
        .unwrap_or_default();
    assert!(
        fifty["text"].as_str().unwrap_or("").contains("50%"),
        "{fifty}"
    );
    assert_eq!(fifty["alert"]["org"], "acme");
    assert_eq!(fifty["alert"]["group"], "flagship");
    assert_eq!(fifty["alert"]["free_tokens_limit"], 1000);
    assert_eq!(fifty["alert"]["day"], day.to_string());

    // A restart remembers what fired today: nothing fires again.
    let again = h.restart().await;
    assert_eq!(again.alerts.today(day).len(), 3);
    let live = again.live();
    let flagship = live
        .config
        .catalog
        .groups
        .iter()
        .position(|g| &*g.name == "flagship");
    again.check_alerts(&live.config, 0, flagship, 1_000_000_000, false);
    assert_eq!(store.alerts(day).await.map(|a| a.len()).unwrap_or(0), 3);

    // The next day starts afresh.
    h.clock.set(h.clock.now_ms() + 86_400_000);
    call(&h, 600).await;
    wait_for(&receiver, 4).await;
    assert_eq!(
        store.alerts(h.today()).await.map(|a| a.len()).unwrap_or(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_never_answers_does_not_hold_up_requests() {
    // Accepts connections and never answers them.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let accepted = Arc::new(AtomicU32::new(0));
    let count = accepted.clone();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            sockets.push(socket);
        }
    });
    let h = start("alerts-dead", &config(&format!("http://{addr}/hook"))).await;
    for output in [600, 200, 600, 600] {
        call(&h, output).await;
    }
    // Every call has answered; the alerts are still waiting on the receiver.
    for _ in 0..100 {
        if accepted.load(Ordering::SeqCst) >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(accepted.load(Ordering::SeqCst) >= 3);
    let day = h.today();
    for rule in ["free_used_50", "free_used_80", "billed_cost"] {
        let delivery = h
            .gateway
            .store
            .alert_delivery(day, "acme", "flagship", rule)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            delivery,
            Some((0, false)),
            "{rule}: recorded, not yet delivered"
        );
    }
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_can_have_its_own_rules_and_webhook() {
    let global = Arc::new(Receiver::default());
    let tenant = Arc::new(Receiver::default());
    let (global_addr, _g) = spawn(
        Router::new()
            .route("/hook", post(hook))
            .with_state(global.clone()),
    )
    .await;
    let (tenant_addr, _t) = spawn(
        Router::new()
            .route("/hook", post(hook))
            .with_state(tenant.clone()),
    )
    .await;
    const TENANT: &str = "tw-alerts-tenant-00000001";
    let config = format!(
        "{}\n[[orgs]]\nname = \"tenant\"\nalerts = {{ used_percent = [80], webhook_url = \"http://{tenant_addr}/hook\" }}\n\n[[orgs.projects]]\nname = \"app\"\nkeys = [\"{TENANT}\"]\n",
        config(&format!("http://{global_addr}/hook"))
    );
    let h = start("alerts-per-org", &config).await;
    let call_as = |key: &'static str, output: u64| {
        let body = json!({"model": "gpt-4o", "max_tokens": output,
            "messages": [{"role": "user", "content": "Hello!"}]});
        h.post("/chat/completions", key)
            .header("x-sim-output-tokens", output.to_string())
            .json(&body)
            .send()
    };
    for key in [APP, TENANT] {
        let r = call_as(key, 600).await.map(|r| r.status().as_u16());
        assert_eq!(r.unwrap_or(0), 200);
    }
    // At ~611 of 1000: the global rules fire at 50%; the tenant's only at 80%.
    wait_for(&global, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rules(&global), ["free_used_50"]);
    assert!(rules(&tenant).is_empty());
    let r = call_as(TENANT, 200).await.map(|r| r.status().as_u16());
    assert_eq!(r.unwrap_or(0), 200);
    wait_for(&tenant, 1).await;
    assert_eq!(rules(&tenant), ["free_used_80"]);
    let to_tenant = tenant
        .alerts
        .lock()
        .map(|a| a[0].clone())
        .unwrap_or_default();
    assert_eq!(to_tenant["alert"]["org"], "tenant");
    assert_eq!(
        rules(&global),
        ["free_used_50"],
        "the tenant's alert went to the global hook"
    );
}

/// The first call a `block` project has refused today fires an alert, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_refusal_of_the_day_fires_once() {
    const BLOCKED: &str = "tw-alerts-blocked-0000001";
    let receiver = Arc::new(Receiver::default());
    let (addr, _stop) = spawn(
        Router::new()
            .route("/hook", post(hook))
            .with_state(receiver.clone()),
    )
    .await;
    let config = format!(
        "[alerts]\nwebhook_url = \"http://{addr}/hook\"\nused_percent = []\nprojected_exhaustion = false\n\n[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"app\"\non_exhausted = \"block\"\nkeys = [\"{BLOCKED}\"]\n\n[program.groups.flagship]\ndaily_tokens = 100\n"
    );
    let h = start("alerts-refusal", &config).await;
    let send = || async {
        h.post("/chat/completions", BLOCKED)
            .json(&json!({"model": "gpt-4o", "max_tokens": 80, "messages": [{"role": "user", "content": "Hello!"}]}))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16())
    };
    assert_eq!(send().await, 200);
    assert!(rules(&receiver).is_empty(), "nothing refused yet");
    assert_eq!(send().await, 429);
    assert_eq!(send().await, 429);
    wait_for(&receiver, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rules(&receiver), ["first_refusal"]);
    let text = receiver
        .alerts
        .lock()
        .map(|a| a[0]["text"].as_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    assert!(
        text.contains("refused") && text.contains("flagship"),
        "{text}"
    );
}
