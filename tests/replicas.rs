//! Gateway replicas sharing one PostgreSQL ledger and one exact allowance:
//! a race of streams spread over three replicas, `kill -9` of one under
//! load, and PostgreSQL itself stopped and restarted under load. Always on
//! PostgreSQL (a server the tests start), whatever `TOKENWARDEN_TEST_STORE`
//! says; the rest of the suite runs on both stores from tests/it.

#[allow(dead_code)]
#[path = "it/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "it/pg.rs"]
mod pg;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tokenwarden::catalog::Catalog;
use tokenwarden::config::Config;
use tokenwarden::gateway::{self, Gateway, ManualClock};
use tokenwarden::simulator::{self, SimConfig, Simulator};

use harness::{serve_process, spawn, temp_dir, NOON_MS, UPSTREAM_KEY};

const KEY: &str = "tw-replica-test-key-00001";
const ADMIN: &str = "admin-token-replicas-0001";

/// One org, one project under `block`, the mini group's cap `cap`, in front
/// of the simulator at `sim`, on the ledger at `url`.
fn config_text(sim: std::net::SocketAddr, url: &str, cap: u64) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_token = \"{ADMIN}\"\n\n[store]\nurl = \"{url}\"\n\n\
[upstreams.sim]\nbase_url = \"http://{sim}/v1\"\napi_key = \"${{UPSTREAM_KEY}}\"\n\n\
[[orgs]]\nname = \"acme\"\n\n[[orgs.projects]]\nname = \"web\"\non_exhausted = \"block\"\nkeys = [\"{KEY}\"]\n\n\
[program.groups.mini]\ndaily_tokens = {cap}\n"
    )
}

fn env() -> HashMap<String, String> {
    HashMap::from([("UPSTREAM_KEY".to_owned(), UPSTREAM_KEY.to_owned())])
}

/// The simulated upstream on its own port: it, its address, its stop switch.
async fn simulator_with(
    config: SimConfig,
) -> (
    Arc<Simulator>,
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
) {
    let sim = Simulator::new(Catalog::builtin().unwrap_or_else(|e| panic!("{e}")), config);
    let (addr, stop) = spawn(simulator::router(sim.clone())).await;
    (sim, addr, stop)
}

/// A replica in this process: a gateway on its own port.
struct Replica {
    gateway: Arc<Gateway>,
    root: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn replica(text: &str, clock: Arc<ManualClock>) -> Replica {
    let config = Config::from_toml(text, &env()).unwrap_or_else(|e| panic!("{e}"));
    let store = tokenwarden::store::open(&config.store, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let gateway = Gateway::new(config, store, clock)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (addr, stop) = spawn(gateway::app(gateway.clone())).await;
    Replica {
        gateway,
        root: format!("http://{addr}"),
        _stop: stop,
    }
}

/// A streamed call of `max_tokens`; its status and whether the client got
/// the whole stream (its `[DONE]`).
async fn stream_call(client: &reqwest::Client, root: &str, max_tokens: u64) -> (u16, bool) {
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": "Hello!"}]});
    let Ok(r) = client
        .post(format!("{root}/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
    else {
        return (0, false);
    };
    let status = r.status().as_u16();
    let mut stream = r.bytes_stream();
    let mut text = Vec::new();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => text.extend_from_slice(&c),
            Err(_) => return (status, false),
        }
    }
    (status, text.windows(12).any(|w| w == b"data: [DONE]"))
}

/// A replica's usage API for the test's day.
async fn usage(client: &reqwest::Client, root: &str) -> Value {
    let start = NOON_MS / 1000 - 12 * 3600;
    client
        .get(format!(
            "{root}/v1/organization/usage/completions?start_time={start}&group_by=model&group_by=lane"
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .json()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Wait until no call is pending in the ledger.
async fn settled(gateway: &Gateway) {
    for _ in 0..500 {
        if gateway.store.count_requests("pending").await.unwrap_or(1) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("calls still pending after 10 s");
}

/// The day's free tokens counted against the cap (used and forfeited),
/// and what is still leased, read from PostgreSQL.
async fn pool_row(url: &str) -> (i64, i64, i64) {
    let row = pg::connect(url)
        .await
        .query_one(
            "SELECT COALESCE(SUM(free_tokens), 0)::BIGINT, COALESCE(SUM(forfeited), 0)::BIGINT, COALESCE(SUM(leased), 0)::BIGINT
             FROM daily WHERE org = 'acme' AND grp = 'mini'",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (row.get(0), row.get(1), row.get(2))
}

/// Replicas registered beyond the two alive, and rows left by replicas no
/// longer registered: 0 once a dead replica is recovered.
async fn orphans(url: &str) -> i64 {
    let row = pg::connect(url)
        .await
        .query_one(
            "SELECT (SELECT COUNT(*) FROM replicas) - 2
                  + (SELECT COUNT(*) FROM leases WHERE replica NOT IN (SELECT id FROM replicas))
                  + (SELECT COUNT(*) FROM requests WHERE state = 'pending' AND replica NOT IN (SELECT id FROM replicas))",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_and_300_streams_never_pass_the_cap() {
    const CAP: u64 = 30_000;
    let (sim, sim_addr, _sim_stop) = simulator_with(SimConfig {
        token_delay: Duration::from_millis(1),
        output_tokens: 200,
        ..SimConfig::default()
    })
    .await;
    let url = pg::server().database(&temp_dir("replicas-race"));
    let text = config_text(sim_addr, &url, CAP);
    let clock = Arc::new(ManualClock::new(NOON_MS));
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(replica(&text, clock.clone()).await);
    }
    let client = harness::http_client();
    let mut calls = Vec::new();
    for i in 0..300 {
        let (client, root) = (client.clone(), replicas[i % 3].root.clone());
        // 9 prompt tokens and up to 200 out: 300 calls want twice the cap.
        calls.push(tokio::spawn(async move {
            stream_call(&client, &root, 200).await
        }));
    }
    let (mut ok, mut refused) = (0u64, 0u64);
    for call in calls {
        match call.await.unwrap_or_else(|e| panic!("{e}")) {
            (200, true) => ok += 1,
            (429, _) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ok + refused, 300);
    for r in &replicas {
        settled(&r.gateway).await;
    }
    // The witness: what the upstream served never passes the cap, and at
    // least 90% of the cap is used.
    let served = sim.stats().get(UPSTREAM_KEY).copied().unwrap_or_default();
    assert!(
        served.total_tokens <= CAP,
        "upstream served {} free tokens",
        served.total_tokens
    );
    assert!(
        served.total_tokens >= CAP * 9 / 10,
        "only {} of {CAP} used",
        served.total_tokens
    );
    assert_eq!(served.total_tokens, ok * 209);
    let (free, forfeited, _) = pool_row(&url).await;
    assert_eq!(u64::try_from(free).unwrap_or(0), served.total_tokens);
    assert_eq!(forfeited, 0);
    // Every replica's usage API tells the same.
    let first = usage(&client, &replicas[0].root).await;
    assert!(
        first
            .to_string()
            .contains(&format!("\"output_tokens\":{}", ok * 200)),
        "{first}"
    );
    for r in &replicas[1..] {
        assert_eq!(usage(&client, &r.root).await, first);
    }
    // So do their gauges, once every replica has reported (a heartbeat)
    // that it has nothing in flight.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let first = gauges(&client, &replicas[0].root).await;
    assert!(
        first.contains(&format!(
            "tokenwarden_free_tokens_used{{org=\"acme\",group=\"mini\"}} {}",
            served.total_tokens
        )) && first.contains(&format!(
            "tokenwarden_free_tokens_left{{org=\"acme\",group=\"mini\"}} {}",
            CAP - served.total_tokens
        )),
        "{first:?}"
    );
    for r in &replicas[1..] {
        assert_eq!(gauges(&client, &r.root).await, first);
    }
    eprintln!(
        "replica race: {ok} served, {refused} refused, {} of {CAP} free tokens used",
        served.total_tokens
    );
}

/// A replica's free-token gauges of the mini group.
async fn gauges(client: &reqwest::Client, root: &str) -> Vec<String> {
    let text = client
        .get(format!("{root}/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    text.lines()
        .filter(|l| l.starts_with("tokenwarden_free_tokens_") && l.contains("group=\"mini\""))
        .map(str::to_owned)
        .collect()
}

/// A process killed (`kill -9`) when dropped, so that a failing test
/// leaves none behind.
struct Process(std::process::Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tokenwarden serve` as a process on `config`.
fn serve(config: &std::path::Path) -> (Process, String) {
    let (child, base) = serve_process(
        Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(["serve", "--config"])
            .arg(config)
            .env("UPSTREAM_KEY", UPSTREAM_KEY)
            .env("TOKENWARDEN_LOG", "warn")
            .stderr(Stdio::null()),
    );
    (Process(child), base)
}

/// Calls from `workers` clients spread over `roots` until `stop`; each
/// returns how many whole answers it got.
fn load(
    roots: &[String],
    workers: usize,
    answered: &Arc<AtomicU64>,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    let client = harness::http_client();
    (0..workers)
        .map(|w| {
            let (client, root) = (client.clone(), roots[w % roots.len()].clone());
            let (answered, stop) = (answered.clone(), stop.clone());
            tokio::spawn(async move {
                let mut ok = 0;
                while !stop.load(Ordering::Relaxed) {
                    match stream_call(&client, &root, 16).await {
                        (200, true) => {
                            ok += 1;
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        // Refused (the cap, or the store away), or cut by the kill.
                        (0 | 200 | 429 | 503, _) => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        other => panic!("{other:?}"),
                    }
                }
                ok
            })
        })
        .collect()
}

async fn wait_for(counter: &AtomicU64, n: u64) {
    let started = Instant::now();
    while counter.load(Ordering::Relaxed) < n {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{} calls answered in 60 s, not {n}",
            counter.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_replica_loses_no_answered_call_and_hands_out_nothing_twice() {
    const CAP: u64 = 4_000;
    let (sim, sim_addr, _sim_stop) = simulator_with(SimConfig {
        ttft: Duration::from_millis(5),
        token_delay: Duration::from_millis(2),
        output_tokens: 16,
    })
    .await;
    let dir = temp_dir("replicas-crash");
    let url = pg::server().database(&dir);
    let config = dir.join("tokenwarden.toml");
    std::fs::write(&config, config_text(sim_addr, &url, CAP)).unwrap_or_else(|e| panic!("{e}"));
    let (doomed, doomed_root) = serve(&config);
    let (_other, other_root) = serve(&config);
    let roots = [doomed_root, other_root];
    let roots: Vec<String> = roots
        .iter()
        .map(|b| b.trim_end_matches("/v1").to_owned())
        .collect();

    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers = load(&roots, 16, &answered, &stop);
    wait_for(&answered, 40).await;
    drop(doomed);
    // The other replica goes on; the doomed one comes back.
    let (_again, _) = serve(&config);
    wait_for(&answered, 80).await;
    stop.store(true, Ordering::Relaxed);
    let mut whole = 0;
    for w in workers {
        whole += w.await.unwrap_or(0);
    }

    // Within STALE and a sweep, the dead replica is recovered: its row
    // gone, its pending calls settled, its leases forfeited.
    let started = Instant::now();
    while orphans(&url).await > 0 {
        assert!(
            started.elapsed() < tokenwarden::store::postgres::STALE + Duration::from_secs(20),
            "the dead replica was not recovered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let reader = tokenwarden::store::open(
        &Config::from_toml(&config_text(sim_addr, &url, CAP), &env())
            .unwrap_or_else(|e| panic!("{e}"))
            .store,
        false,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    while reader.count_requests("pending").await.unwrap_or(1) > 0 {
        assert!(
            started.elapsed() < tokenwarden::store::postgres::STALE + Duration::from_secs(20),
            "calls still pending"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settled = reader.count_requests("settled").await.unwrap_or(0);
    let interrupted = reader.count_requests("interrupted").await.unwrap_or(0);
    // A client gets a stream's end only once its record is durable.
    assert!(
        settled >= whole,
        "{whole} answered but only {settled} settled ({interrupted} interrupted)"
    );
    let served = sim.stats().get(UPSTREAM_KEY).copied().unwrap_or_default();
    let (free, forfeited, leased) = pool_row(&url).await;
    assert!(
        served.total_tokens <= CAP,
        "upstream served {} free tokens",
        served.total_tokens
    );
    assert!(
        u64::try_from(free + forfeited + leased).unwrap_or(u64::MAX) <= CAP,
        "{free} used + {forfeited} forfeited + {leased} leased"
    );
    assert!(
        forfeited > 0 || interrupted > 0,
        "nothing of the dead replica's was counted"
    );
    eprintln!("replica crash: {whole} answered, {settled} settled, {interrupted} interrupted; {free} free, {forfeited} forfeited of {CAP}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_restarted_under_load_loses_no_answered_call() {
    let (_, sim_addr, _sim_stop) = simulator_with(SimConfig {
        ttft: Duration::from_millis(5),
        token_delay: Duration::from_millis(2),
        output_tokens: 16,
    })
    .await;
    let server = pg::own_server("restart");
    let url = server.database(&temp_dir("replicas-pg-restart"));
    let text = config_text(sim_addr, &url, 10_000_000);
    let clock = Arc::new(ManualClock::new(NOON_MS));
    let replicas = [
        replica(&text, clock.clone()).await,
        replica(&text, clock).await,
    ];
    let roots: Vec<String> = replicas.iter().map(|r| r.root.clone()).collect();

    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers = load(&roots, 8, &answered, &stop);
    wait_for(&answered, 30).await;
    // Stopped (fast shutdown) under load, and back a second later.
    let server = tokio::task::spawn_blocking(move || {
        server.stop();
        std::thread::sleep(Duration::from_secs(1));
        server.start();
        server
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let after = answered.load(Ordering::Relaxed);
    wait_for(&answered, after + 30).await;
    stop.store(true, Ordering::Relaxed);
    let mut whole = 0;
    for w in workers {
        whole += w
            .await
            .unwrap_or_else(|e| panic!("a client task failed: {e}"));
    }
    for r in &replicas {
        settled(&r.gateway).await;
    }
    let settled_rows = replicas[0]
        .gateway
        .store
        .count_requests("settled")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        settled_rows >= whole,
        "{whole} answered but {settled_rows} settled"
    );
    // Both replicas still serve.
    let client = harness::http_client();
    for r in &replicas {
        assert_eq!(stream_call(&client, &r.root, 16).await, (200, true));
    }
    eprintln!("postgres restart: {whole} answered, {settled_rows} settled");
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_fire_each_alert_once() {
    let posts: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let receiver = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(posts): axum::extract::State<
                    Arc<std::sync::Mutex<Vec<String>>>,
                >,
                 axum::Json(body): axum::Json<Value>| async move {
                    if let Ok(mut posts) = posts.lock() {
                        posts.push(body["alert"]["rule"].as_str().unwrap_or("?").to_owned());
                    }
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(posts.clone());
    let (hook, _hook_stop) = spawn(receiver).await;
    let (_, sim_addr, _sim_stop) = simulator_with(SimConfig {
        token_delay: Duration::from_millis(1),
        output_tokens: 200,
        ..SimConfig::default()
    })
    .await;
    let url = pg::server().database(&temp_dir("replicas-alerts"));
    let text = format!(
        "{}\n[alerts]\nwebhook_url = \"http://{hook}/hook\"\nused_percent = [50]\nprojected_exhaustion = false\n",
        config_text(sim_addr, &url, 10_000)
    );
    let clock = Arc::new(ManualClock::new(NOON_MS));
    let replicas = [
        replica(&text, clock.clone()).await,
        replica(&text, clock).await,
    ];
    let client = harness::http_client();
    // 40 calls of 209 tokens, 8 at a time over both replicas: past half the
    // cap at both, at about the same time.
    for round in 0..5 {
        let calls: Vec<_> = (0..8)
            .map(|i| {
                let (client, root) = (client.clone(), replicas[(round + i) % 2].root.clone());
                tokio::spawn(async move { stream_call(&client, &root, 200).await })
            })
            .collect();
        for call in calls {
            assert_eq!(call.await.unwrap_or_else(|e| panic!("{e}")), (200, true));
        }
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fired = posts.lock().map(|p| p.clone()).unwrap_or_default();
    assert_eq!(
        fired,
        ["free_used_50"],
        "each replica saw the pool past 50%; one posts it"
    );
    let recorded = replicas[1]
        .gateway
        .store
        .alerts(replicas[1].gateway.today())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recorded.len(), 1, "{recorded:?}");
}

/// `check-config` connects and tells the schema version; `usage` and
/// `export` read a PostgreSQL ledger as they read SQLite's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_commands_read_a_postgres_ledger() {
    let (_, sim_addr, _sim_stop) = simulator_with(SimConfig::default()).await;
    let dir = temp_dir("replicas-commands");
    let url = pg::server().database(&dir);
    let text = config_text(sim_addr, &url, 10_000);
    let config = dir.join("tokenwarden.toml");
    std::fs::write(&config, &text).unwrap_or_else(|e| panic!("{e}"));
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
            .args(args)
            .arg("--config")
            .arg(&config)
            .env("UPSTREAM_KEY", UPSTREAM_KEY)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), stdout, stderr)
    };
    // Before any `serve`: no schema yet.
    let (ok, _, stderr) = run(&["usage"]);
    assert!(!ok && stderr.contains("schema version 0"), "{stderr}");
    let (ok, stdout, stderr) = run(&["check-config"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("schema version 0"), "{stdout}");
    // A replica migrates it and serves one call (the real clock: `usage`
    // reads today).
    let config_value = Config::from_toml(&text, &env()).unwrap_or_else(|e| panic!("{e}"));
    let store = tokenwarden::store::open(&config_value.store, true)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let gateway = Gateway::new(config_value, store, Arc::new(gateway::SystemClock))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (addr, _stop) = spawn(gateway::app(gateway.clone())).await;
    let client = harness::http_client();
    assert_eq!(
        stream_call(&client, &format!("http://{addr}"), 16).await,
        (200, true)
    );
    settled(&gateway).await;
    let _ = gateway.store.recent(1).await;
    let (ok, stdout, stderr) = run(&["check-config"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains(&format!(
            "at schema version {v} (this tokenwarden writes {v})",
            v = tokenwarden::store::postgres::schema::latest()
        )) && !stdout.contains("postgres://"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = run(&["usage", "--json"]);
    assert!(ok, "{stderr}");
    let usage: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let mini = usage["usage"]
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["org"] == "acme" && r["group"] == "mini")
        })
        .cloned()
        .unwrap_or_else(|| panic!("{usage}"));
    assert_eq!(mini["free_used"], 25, "{mini}");
    let (ok, _, stderr) = run(&["export", "--org", "acme"]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("0 calls written"), "{stderr}");
}

/// The documented behaviour while PostgreSQL is unreachable: a call that
/// needs a lease cannot be admitted exactly, so it is refused with a 503
/// and `Retry-After: 1`, and never reaches the upstream; once PostgreSQL
/// is back, calls are admitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_needs_a_lease_while_postgres_is_away_is_a_503() {
    let (sim, sim_addr, _sim_stop) = simulator_with(SimConfig::default()).await;
    let server = pg::own_server("away");
    let url = server.database(&temp_dir("replicas-pg-away"));
    let clock = Arc::new(ManualClock::new(NOON_MS));
    let r = replica(&config_text(sim_addr, &url, 10_000), clock.clone()).await;
    let client = harness::http_client();
    assert_eq!(stream_call(&client, &r.root, 16).await, (200, true));
    let server = tokio::task::spawn_blocking(move || {
        server.stop();
        server
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // A new day: the replica holds no lease of it.
    clock.set(NOON_MS + 86_400_000);
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 16,
                      "messages": [{"role": "user", "content": "Hello!"}]});
    let refused = client
        .post(format!("{}/v1/chat/completions", r.root))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(
        refused
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let error: Value = refused.json().await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(error["error"]["type"], "server_error", "{error}");
    let served = sim.stats().get(UPSTREAM_KEY).copied().unwrap_or_default();
    assert_eq!(served.requests, 1, "the refused call went upstream");
    // Back: the next call leases and is served.
    let server = tokio::task::spawn_blocking(move || {
        server.start();
        server
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stream_call(&client, &r.root, 16).await, (200, true));
    drop(server);
}

/// A key made or deleted through one replica's admin API is made or deleted
/// for the next call at every replica; a data-sharing change too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_made_or_deleted_at_one_replica_is_so_at_the_next_call_everywhere() {
    let (_, sim_addr, _sim_stop) = simulator_with(SimConfig::default()).await;
    let dir = temp_dir("replicas-keys");
    let url = pg::server().database(&dir);
    let text = config_text(sim_addr, &url, 100_000);
    let clock = Arc::new(ManualClock::new(NOON_MS));
    let a = replica(&text, clock.clone()).await;
    let b = replica(&text, clock.clone()).await;
    let c = replica(&text, clock).await;
    let client = harness::http_client();
    let chat = |root: String, key: String| {
        let client = client.clone();
        async move {
            client
                .post(format!("{root}/v1/chat/completions"))
                .bearer_auth(key)
                .json(&json!({"model": "gpt-4o-mini", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .map_or((0, 0), |r| {
                    let limit = r
                        .headers()
                        .get("x-free-tokens-limit")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(u64::MAX);
                    (r.status().as_u16(), limit)
                })
        }
    };
    for round in 0..3 {
        let made: Value = client
            .post(format!(
                "{}/v1/organization/projects/web/service_accounts",
                a.root
            ))
            .bearer_auth(ADMIN)
            .json(&json!({"name": format!("ci-{round}")}))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .json()
            .await
            .unwrap_or_default();
        let key = made["api_key"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let id = made["api_key"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(key.starts_with("tw-"), "{made}");
        // At once, at the other replicas.
        for r in [&b, &c, &a] {
            assert_eq!(
                chat(r.root.clone(), key.clone()).await.0,
                200,
                "round {round}"
            );
        }
        let deleted = client
            .delete(format!(
                "{}/v1/organization/projects/web/api_keys/{id}",
                b.root
            ))
            .bearer_auth(ADMIN)
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        assert_eq!(deleted, 200);
        for r in [&a, &c, &b] {
            assert_eq!(
                chat(r.root.clone(), key.clone()).await.0,
                401,
                "round {round}"
            );
        }
    }
    // Opting out at one replica: no replica gives free tokens to the next call.
    let opted = client
        .post(format!("{}/v1/organization/data_sharing", c.root))
        .bearer_auth(ADMIN)
        .json(&json!({"sharing": "disabled"}))
        .send()
        .await
        .map_or(0, |r| r.status().as_u16());
    assert_eq!(opted, 200);
    for r in [&a, &b, &c] {
        assert_eq!(chat(r.root.clone(), KEY.to_owned()).await, (200, 0));
    }
}
