//! Start a simulated upstream and a gateway in-process, on port 0, with a
//! clock the test controls; stop both when the harness is dropped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokenwarden::catalog::Catalog;
use tokenwarden::config::Config;
use tokenwarden::day::Day;
use tokenwarden::gateway::{self, Gateway, ManualClock};
use tokenwarden::simulator::{self, KeyStats, SimConfig, Simulator};
use tokenwarden::store::{SqliteStore, Store};
use tokio::sync::oneshot;

/// The key the gateway uses upstream (the simulator's stats are kept under it).
pub const UPSTREAM_KEY: &str = "sk-upstream-secret-do-not-leak";
/// 2026-11-24 12:00:00 UTC.
pub const NOON_MS: i64 = 1_795_521_600_000;

pub struct Harness {
    /// The gateway's base URL, ending in /v1.
    pub base: String,
    pub sim: Arc<Simulator>,
    pub gateway: Arc<Gateway>,
    pub clock: Arc<ManualClock>,
    pub dir: PathBuf,
    pub client: reqwest::Client,
    /// The configuration's text, to build a second gateway on the same ledger.
    config_text: String,
    /// Its `[server]` and `[upstreams]` part, which [`Harness::reload`] keeps.
    head: String,
    stops: Vec<oneshot::Sender<()>>,
}

/// A plain HTTP client for tests (rustls needs its provider chosen first).
pub fn http_client() -> reqwest::Client {
    tokenwarden::gateway::upstream::install_crypto_provider();
    reqwest::Client::new()
}

/// Sign in to the dashboard at `root` (the gateway's address, without
/// `/v1`) with `token`: a client that follows no redirect, and the
/// session's cookie.
pub async fn dashboard_session(root: &str, token: &str) -> (reqwest::Client, String) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let signed = client
        .post(format!("{root}/dashboard/login"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={token}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let cookie = signed
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("no session"))
        .to_owned();
    (client, cookie)
}

/// The dashboard's page at `root`, signed in with the admin token `admin`.
pub async fn dashboard_page(root: &str, admin: &str) -> String {
    let (client, cookie) = dashboard_session(root, admin).await;
    client
        .get(format!("{root}/dashboard"))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default()
}

/// Run `tests/sdk/SCRIPT` with the Python of the SDK venv that
/// `scripts/test` installs (or `TOKENWARDEN_SDK_PYTHON`), off the runtime's
/// workers; its standard output. A failing script fails the test with both
/// outputs.
pub async fn python(script: &str, args: &[&str]) -> String {
    let python = std::env::var_os("TOKENWARDEN_SDK_PYTHON")
        .map_or_else(|| repo("target/sdk/venv/bin/python"), PathBuf::from);
    assert!(
        python.exists(),
        "{} is missing: run scripts/test, which installs the SDKs",
        python.display()
    );
    script_output(python, repo(&format!("tests/sdk/{script}")), args).await
}

/// Run `tests/sdk/node/{script}` with the Node SDK, as [`python`] does.
pub async fn node(script: &str, args: &[&str]) -> String {
    assert!(
        repo("tests/sdk/node/node_modules/openai").exists(),
        "tests/sdk/node/node_modules is missing: run scripts/test, which installs the Node SDK"
    );
    script_output(
        PathBuf::from("node"),
        repo(&format!("tests/sdk/node/{script}")),
        args,
    )
    .await
}

async fn script_output(program: PathBuf, script: PathBuf, args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&program)
            .arg(&script)
            .args(&args)
            .output()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap_or_else(|e| panic!("{e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    stdout
}

/// A path in the repository (fixtures, test scripts, target/).
pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A fresh directory for one test's files.
pub fn temp_dir(label: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("tokenwarden-it-{}-{label}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    dir
}

/// Serve `app` on a fresh port; returns the address and a stop switch.
pub async fn spawn(app: impl Into<gateway::App>) -> (std::net::SocketAddr, oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (stop, stopped) = oneshot::channel::<()>();
    let app: gateway::App = app.into();
    tokio::spawn(gateway::serve(listener, app, async {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// Spawn `tokenwarden` as `command` sets it up (`serve` and its
/// arguments, environment, stderr), and wait for the address it prints.
pub fn serve_process(command: &mut std::process::Command) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn: {e}"));
    let stdout = child.stdout.take().unwrap_or_else(|| panic!("no stdout"));
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{e}"));
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .map(str::to_owned);
    (
        child,
        base.unwrap_or_else(|| panic!("no address in {line:?}")),
    )
}

/// The ledger of a test in `dir`: a SQLite file there, or (with
/// `TOKENWARDEN_TEST_STORE=postgres`) a database of its own on the tests'
/// PostgreSQL server, as a new replica.
pub async fn open_store(dir: &std::path::Path) -> Arc<dyn Store> {
    if crate::pg::selected() {
        let url = crate::pg::server().database(dir);
        let store = tokenwarden::config::StoreUrl::Postgres(tokenwarden::config::PostgresUrl {
            shown: url.clone(),
            url: tokenwarden::config::Secret::new(url),
            extra_roots: Vec::new(),
        });
        return tokenwarden::store::open(&store, true)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
    Arc::new(SqliteStore::open(&dir.join("ledger.db")).unwrap_or_else(|e| panic!("{e}")))
}

/// The `[store]` URL of the ledger in `dir`, for a command's configuration.
pub fn store_url(dir: &std::path::Path) -> String {
    if crate::pg::selected() {
        crate::pg::server().database(dir)
    } else {
        format!("sqlite://{}", dir.join("ledger.db").display())
    }
}

/// What a copy of the ledger in `dir` holds, part by part: SQLite's files
/// (the database, its WAL, the call journal), or PostgreSQL's dump.
pub fn ledger_copy(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    if crate::pg::selected() {
        return vec![("pg_dump".to_owned(), crate::pg::server().dump(dir))];
    }
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ledger.db"))
        .map(|e| {
            (
                e.path().display().to_string(),
                std::fs::read(e.path()).unwrap_or_default(),
            )
        })
        .collect()
}

/// The configuration of a test: `{upstream}` is replaced by the simulator's
/// URL; orgs, projects and program settings are the test's.
pub async fn start(label: &str, config: &str) -> Harness {
    start_with(label, config, SimConfig::default()).await
}

/// A harness whose upstream calls time out after `seconds`.
pub async fn start_timeout(label: &str, config: &str, seconds: u64) -> Harness {
    start_inner(
        label,
        config,
        SimConfig::default(),
        &format!("upstream_timeout_secs = {seconds}\n"),
    )
    .await
}

/// A harness with extra `[server]` lines (an admin token, say).
pub async fn start_with_server(label: &str, config: &str, server: &str) -> Harness {
    start_inner(label, config, SimConfig::default(), server).await
}

pub async fn start_with(label: &str, config: &str, sim_config: SimConfig) -> Harness {
    start_inner(label, config, sim_config, "max_body_bytes = 1048576\n").await
}

pub async fn start_inner(
    label: &str,
    config: &str,
    sim_config: SimConfig,
    server: &str,
) -> Harness {
    start_upstream(label, config, sim_config, server, "").await
}

/// A harness with extra `[server]` and `[upstreams.sim]` lines.
pub async fn start_upstream(
    label: &str,
    config: &str,
    sim_config: SimConfig,
    server: &str,
    upstream: &str,
) -> Harness {
    let dir = temp_dir(label);
    let sim = Simulator::new(
        Catalog::builtin().unwrap_or_else(|e| panic!("{e}")),
        sim_config,
    );
    let (sim_addr, sim_stop) = spawn(simulator::router(sim.clone())).await;
    let head = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[upstreams.sim]\nbase_url = \"http://{sim_addr}/v1\"\napi_key = \"${{UPSTREAM_KEY}}\"\n{upstream}\n"
    );
    let text = format!("{head}{config}");
    let config =
        Config::from_toml(&text, &upstream_env()).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let store = open_store(&dir).await;
    let clock = Arc::new(ManualClock::new(NOON_MS));
    let gw = Gateway::new(config, store, clock.clone())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (addr, gw_stop) = spawn(gateway::app(gw.clone())).await;
    Harness {
        base: format!("http://{addr}/v1"),
        sim,
        gateway: gw,
        clock,
        dir,
        client: crate::harness::http_client(),
        config_text: text,
        head,
        stops: vec![sim_stop, gw_stop],
    }
}

fn upstream_env() -> HashMap<String, String> {
    HashMap::from([("UPSTREAM_KEY".to_owned(), UPSTREAM_KEY.to_owned())])
}

impl Harness {
    /// A second gateway on the same ledger, as after a restart.
    pub async fn restart(&self) -> Arc<Gateway> {
        let config =
            Config::from_toml(&self.config_text, &upstream_env()).unwrap_or_else(|e| panic!("{e}"));
        Gateway::new(config, open_store(&self.dir).await, self.clock.clone())
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A configuration file for the commands (`check-config`, `usage`):
    /// this gateway's, on its ledger.
    pub fn config_file(&self) -> PathBuf {
        let file = self.dir.join("tokenwarden.toml");
        let text = format!(
            "{}\n[store]\nurl = \"{}\"\n",
            self.config_text,
            store_url(&self.dir)
        );
        std::fs::write(&file, text).unwrap_or_else(|e| panic!("{e}"));
        file
    }

    /// Run on `config` (orgs, program, alerts) from now on, as a reload does.
    pub async fn reload(&self, config: &str) -> Result<(), String> {
        let text = format!("{}{config}", self.head);
        let config = Config::from_toml(&text, &upstream_env()).map_err(|e| e.to_string())?;
        self.gateway.reload(config).await
    }

    pub fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .bearer_auth(key)
    }

    /// What the simulator served to the gateway.
    pub fn served(&self) -> KeyStats {
        self.sim
            .stats()
            .get(UPSTREAM_KEY)
            .copied()
            .unwrap_or_default()
    }

    pub fn today(&self) -> Day {
        self.gateway.today()
    }

    /// Free tokens used today by `org` in `group`, per the store.
    pub async fn free_used(&self, org: &str, group: &str) -> u64 {
        self.daily(org, group).await.map_or(0, |t| t.free_tokens)
    }

    pub async fn daily(&self, org: &str, group: &str) -> Option<tokenwarden::store::DailyTotal> {
        let totals = self
            .gateway
            .store
            .daily(self.today())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        totals
            .into_iter()
            .find(|t| t.org == org && t.group == group)
    }

    /// Wait until background settlements (streams) have reached the store.
    pub async fn settled(&self) {
        for _ in 0..200 {
            if self
                .gateway
                .store
                .count_requests("pending")
                .await
                .unwrap_or(1)
                == 0
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("calls still pending after 2 s");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
