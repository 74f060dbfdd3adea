//! What the `serve` and `simulate` commands start: the gateway from a
//! configuration, the demo (gateway, simulated upstream, demo org and key in
//! one process), or the simulated upstream alone; and `batch` ([`batch`]).

pub mod batch;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::config::{Config, ConfigError, Env, ProcessEnv};
use crate::gateway::auth::new_key;
use crate::gateway::{self, Gateway, SystemClock};
use crate::simulator::{self, SimConfig, Simulator};

/// The configuration `serve` runs with when given no file: one org and one
/// project in front of `base_url`. Its client key and admin token are made
/// on the ledger's first start and kept there, hashed ([`first_keys`]).
pub fn single_project_config(base_url: &str, api_key: &str, store: &str, listen: &str) -> String {
    let api_key = format!("api_key = \"{api_key}\"\n");
    format!(
        "[server]\nlisten = \"{listen}\"\n\n[store]\nurl = \"sqlite://{store}\"\n\n[upstreams.main]\nbase_url = \"{base_url}\"\n{api_key}\n[[orgs]]\nname = \"default\"\ntier = 5\nsharing = \"all\"\n\n[[orgs.projects]]\nname = \"default\"\non_exhausted = \"block\"\n"
    )
}

/// A client key and an admin token made for a new ledger.
pub struct FirstKeys {
    pub client: String,
    pub admin: String,
}

/// Who made the first keys, in the record of changes.
const FIRST_KEYS_ACTOR: &str = "tokenwarden serve (first start)";

/// On a ledger that has none yet: make the platform's admin token and a
/// client key of project `default`, keep them hashed in the ledger (as
/// changes), and return them to be printed this once. `None` when the
/// ledger has them already: they still work.
pub async fn first_keys(
    gateway: &Gateway,
    client_prefix: &str,
) -> anyhow::Result<Option<FirstKeys>> {
    use crate::changes::Change;
    let made = gateway
        .changes_of(None)
        .await
        .iter()
        .any(|c| matches!(c.change, Change::PlatformToken { .. }));
    if made {
        return Ok(None);
    }
    let admin = new_key("tw-admin-");
    let now_s = gateway.clock.now_ms().div_euclid(1000);
    let (client, key) = crate::gateway::auth::make_key(client_prefix, "first key", now_s, None);
    let change = |org: &'static str, change| async move {
        gateway
            .change(org, FIRST_KEYS_ACTOR, change)
            .await
            .map_err(|e| anyhow::anyhow!("could not keep the first keys in the ledger: {e:?}"))
    };
    change(
        "default",
        Change::KeyCreated {
            project_id: "default".into(),
            key,
        },
    )
    .await?;
    change(
        "",
        Change::PlatformToken {
            hash: crate::gateway::auth::hex_hash(&admin),
        },
    )
    .await?;
    Ok(Some(FirstKeys { client, admin }))
}

/// What `serve` prints of the keys: new ones, or how to make new ones.
fn print_keys(addr: SocketAddr, ledger: &str, keys: Option<&FirstKeys>) {
    match keys {
        Some(keys) => {
            println!("  API key:  {}   (shown once; kept hashed in {ledger}; give it to your OpenAI SDK as its api_key)", keys.client);
            println!("  dashboard: http://{addr}/dashboard");
            println!("  admin token: {}   (shown once; signs in to the dashboard; the usage API, the admin API and /metrics take it too)", keys.admin);
        }
        None => {
            println!("  API key and admin token: those printed when {ledger} was made (kept hashed in it; they still work)");
            println!("  dashboard: http://{addr}/dashboard");
            println!("  another API key: curl -X POST http://{addr}/v1/organization/projects/default/service_accounts -H 'Authorization: Bearer ADMIN_TOKEN' -H 'Content-Type: application/json' -d '{{\"name\": \"my key\"}}'   (lost the admin token? remove {ledger} to start over)");
        }
    }
}

/// Each `SIGHUP`: read `file` again and run on it; a file `check-config`
/// would refuse is refused with its message, and the running configuration
/// stays.
async fn reload_on_hangup(gateway: std::sync::Weak<Gateway>, file: Option<std::path::PathBuf>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangups) = signal(SignalKind::hangup()) else {
            tracing::error!("SIGHUP cannot be listened for: reloads need a restart");
            return;
        };
        while hangups.recv().await.is_some() {
            let Some(gateway) = gateway.upgrade() else {
                return;
            };
            let Some(file) = &file else {
                tracing::warn!(
                    "SIGHUP: this gateway runs without a configuration file; nothing to reload"
                );
                continue;
            };
            match reload(&gateway, file).await {
                Ok(()) => tracing::info!(file = %file.display(), "configuration reloaded"),
                Err(e) => tracing::error!(
                    "SIGHUP: the configuration was not reloaded, the running one stays: {e}"
                ),
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (gateway, file);
}

/// Load `file` as `check-config` does and run on it.
async fn reload(gateway: &Gateway, file: &Path) -> anyhow::Result<()> {
    let config = Config::load(file, &ProcessEnv)?;
    for warning in config.forward_warnings() {
        tracing::warn!("{warning}");
    }
    gateway.reload(config).await.map_err(anyhow::Error::msg)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

/// Open the store, build the gateway and serve until a signal; `SIGHUP`
/// reloads the configuration from `file`. With `first_keys` (a client key's
/// prefix), a new ledger gets its first keys ([`first_keys`]), given to
/// `announce`.
pub async fn run_gateway(
    config: Config,
    file: Option<&Path>,
    first: Option<&str>,
    announce: impl FnOnce(SocketAddr, Option<FirstKeys>),
) -> anyhow::Result<()> {
    // The address first: a gateway that cannot listen makes no ledger.
    let listen = config.server.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let store = crate::store::open(&config.store, true).await?;
    let gateway = Gateway::new(config, store, Arc::new(SystemClock)).await?;
    gateway.reconcile_hourly();
    let reloads = tokio::spawn(reload_on_hangup(
        Arc::downgrade(&gateway),
        file.map(Path::to_path_buf),
    ));
    let keys = match first {
        Some(prefix) => first_keys(&gateway, prefix).await?,
        None => None,
    };
    announce(addr, keys);
    let header_timeout = gateway.live().config.server.header_read_timeout;
    let served = gateway::serve_with_timeout(
        listener,
        gateway::app(gateway.clone()),
        shutdown_signal(),
        header_timeout,
    )
    .await;
    reloads.abort();
    served?;
    // The last records (captures, alerts, forwarded calls) before the runtime stops.
    if let Err(e) = gateway.store.flush().await {
        tracing::error!(error = %e, "records still queued at shutdown were not written");
    }
    Ok(())
}

/// `tokenwarden serve`.
pub async fn serve(
    config_path: Option<&Path>,
    demo: bool,
    listen: Option<&str>,
) -> anyhow::Result<()> {
    let env = ProcessEnv;
    let listen = listen.unwrap_or(crate::config::DEFAULT_LISTEN);
    if demo {
        let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sim_addr = sim_listener.local_addr()?;
        let sim = Simulator::new(Catalog::builtin()?, SimConfig::default());
        tokio::spawn(gateway::serve(
            sim_listener,
            simulator::router(sim),
            std::future::pending(),
        ));
        let ledger = "tokenwarden-demo.db";
        let text = single_project_config(
            &format!("http://{sim_addr}/v1"),
            "sim-demo-upstream-key",
            ledger,
            listen,
        );
        let config = Config::from_toml(&text, &env)?;
        return run_gateway(config, None, Some("tw-demo-"), |addr, keys| {
            println!("tokenwarden demo: the gateway in front of its simulated upstream (http://{sim_addr}/v1)");
            println!("  base URL: http://{addr}/v1");
            print_keys(addr, ledger, keys.as_ref());
            let key = keys.as_ref().map_or("API_KEY", |k| k.client.as_str());
            println!("  try:      curl http://{addr}/v1/chat/completions -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' -d '{{\"model\": \"gpt-4o-mini\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'");
        })
        .await;
    }
    let default_file = Path::new("tokenwarden.toml");
    let file = match config_path {
        Some(path) => path,
        None if default_file.exists() => default_file,
        None if env.var("OPENAI_API_KEY").is_some() => {
            let ledger = "tokenwarden.db";
            let text = single_project_config(
                "https://api.openai.com/v1",
                "${OPENAI_API_KEY}",
                ledger,
                listen,
            );
            let config = Config::from_toml(&text, &env)?;
            return run_gateway(config, None, Some("tw-"), |addr, keys| {
                println!("tokenwarden: in front of the OpenAI API, one org and project");
                println!("  base URL: http://{addr}/v1");
                print_keys(addr, ledger, keys.as_ref());
            })
            .await;
        }
        None => {
            return Err(ConfigError::Invalid {
                path: "serve".into(),
                message: "no configuration: pass --config FILE, create tokenwarden.toml, set OPENAI_API_KEY, or try --demo".into(),
            }
            .into())
        }
    };
    let config = Config::load(file, &env)?;
    for warning in config.forward_warnings() {
        tracing::warn!("{warning}");
    }
    run_gateway(config, Some(file), None, |addr, _| {
        println!("tokenwarden: listening on http://{addr}/v1")
    })
    .await
}

/// `tokenwarden simulate`.
pub async fn simulate(listen: &str, config: SimConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let sim = Simulator::new(Catalog::builtin()?, config);
    println!("tokenwarden simulate: an OpenAI-compatible upstream on http://{addr}/v1 (stats: http://{addr}/stats)");
    gateway::serve(listener, simulator::router(sim), shutdown_signal()).await?;
    Ok(())
}

/// One row of `tokenwarden usage`: an org's group today.
#[derive(Debug, serde::Serialize)]
pub struct UsageRow {
    pub org: String,
    /// The program group; `none` for models outside the program.
    pub group: String,
    pub daily_cap: u64,
    pub free_used: u64,
    pub free_left: u64,
    pub billed_tokens: u64,
    /// List price of the billed calls, exact, in US dollars.
    pub cost_usd: String,
    pub requests: u64,
}

/// Today's shared and private tokens of one org.
#[derive(Debug, Default, serde::Serialize)]
pub struct SharingRow {
    pub org: String,
    /// Tokens of calls whose traffic was shared in the program.
    pub shared_tokens: u64,
    /// Tokens of calls that were not shared (non-sharing projects, ineligible orgs).
    pub private_tokens: u64,
}

/// Today's shared and private tokens per org, from the store.
pub async fn sharing_rows(
    config: &Config,
    store: &dyn crate::store::Store,
    today: crate::day::Day,
) -> anyhow::Result<Vec<SharingRow>> {
    let start = today.start_unix() * 1000;
    let rows = store
        .usage_rows(start, start + 86_400_000, 86_400_000, &["sharing"])
        .await?;
    Ok(config
        .orgs
        .iter()
        .map(|org| {
            let mut row = SharingRow {
                org: org.name.to_string(),
                ..SharingRow::default()
            };
            for r in rows.iter().filter(|r| *r.org == *org.name) {
                let tokens = r.input_tokens.saturating_add(r.output_tokens);
                if r.sharing.as_deref() == Some("shared") {
                    row.shared_tokens = row.shared_tokens.saturating_add(tokens);
                } else {
                    row.private_tokens = row.private_tokens.saturating_add(tokens);
                }
            }
            row
        })
        .collect())
}

/// Today's usage per org and group, from the store.
pub async fn usage_rows(
    config: &Config,
    store: &dyn crate::store::Store,
    today: crate::day::Day,
) -> anyhow::Result<Vec<UsageRow>> {
    let totals = store.daily(today).await?;
    let mut rows = Vec::new();
    for org in &config.orgs {
        let groups = config
            .catalog
            .groups
            .iter()
            .map(|g| (&*g.name, g.daily_tokens_for_tier(org.tier)));
        for (group, cap) in groups.chain(std::iter::once(("", 0))) {
            let total = totals
                .iter()
                .find(|t| *t.org == *org.name && t.group == group);
            if group.is_empty() && total.is_none() {
                continue;
            }
            let cap = if org.eligible && org.sharing != crate::config::OrgSharing::Disabled {
                cap
            } else {
                0
            };
            let free_used = total.map_or(0, |t| t.free_tokens);
            rows.push(UsageRow {
                org: org.name.to_string(),
                group: if group.is_empty() {
                    "none".into()
                } else {
                    group.to_owned()
                },
                daily_cap: cap,
                free_used,
                free_left: cap.saturating_sub(free_used),
                billed_tokens: total.map_or(0, |t| t.billed_tokens),
                cost_usd: crate::catalog::format_usd(u128::from(total.map_or(0, |t| t.cost_pico))),
                requests: total.map_or(0, |t| t.requests),
            });
        }
    }
    Ok(rows)
}

/// The rows as an aligned table.
pub fn usage_table(rows: &[UsageRow]) -> String {
    let mut out = format!(
        "{:<16} {:<10} {:>12} {:>12} {:>12} {:>14} {:>18} {:>9}\n",
        "org",
        "group",
        "daily cap",
        "free used",
        "free left",
        "billed tokens",
        "cost (USD)",
        "requests"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<16} {:<10} {:>12} {:>12} {:>12} {:>14} {:>18} {:>9}\n",
            r.org,
            r.group,
            r.daily_cap,
            r.free_used,
            r.free_left,
            r.billed_tokens,
            r.cost_usd,
            r.requests
        ));
    }
    out
}

/// What `tokenwarden export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// OpenAI's chat fine-tuning format: `{"messages": [...]}`.
    Chat,
    /// Each captured call: its metadata, request and response.
    Raw,
}

#[derive(Debug, Default)]
pub struct ExportSummary {
    pub rows: u64,
    pub written: u64,
    /// Calls that are not a chat exchange (embeddings, completions), in `chat`.
    pub skipped: u64,
}

/// The process's peak resident memory (VmHWM), in bytes, where Linux tells.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Stream the captured calls `filter` selects to `out`, one JSON line each,
/// one row in memory at a time; progress (and, at the end, the peak memory)
/// goes to `progress`.
pub fn export(
    config: &Config,
    filter: &crate::store::ExportFilter,
    format: ExportFormat,
    out: impl std::io::Write,
    mut progress: impl std::io::Write,
) -> anyhow::Result<ExportSummary> {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut summary = ExportSummary::default();
    let started = std::time::Instant::now();
    let mut last_report = started;
    let total = std::cell::Cell::new(0);
    let mut write = |row: crate::store::CapturedRow| {
        summary.rows += 1;
        let pair = crate::capture::decompress(&row.body)?;
        let line = match format {
            ExportFormat::Chat => {
                crate::capture::to_chat(&row.endpoint, &pair["request"], &pair["response"])
            }
            ExportFormat::Raw => Some(serde_json::json!({
                "id": row.id,
                "created": row.started_ms / 1000,
                "org": row.org,
                "project": row.project,
                "model": row.model,
                "endpoint": row.endpoint,
                "streamed": row.streamed,
                "input_tokens": row.input_tokens,
                "output_tokens": row.output_tokens,
                "request": pair["request"],
                "response": pair["response"],
            })),
        };
        match line {
            Some(line) => {
                crate::capture::write_line(&mut out, &line)?;
                summary.written += 1;
            }
            None => summary.skipped += 1,
        }
        if last_report.elapsed() >= std::time::Duration::from_secs(1) {
            last_report = std::time::Instant::now();
            let _ = writeln!(
                progress,
                "export: {} of {} calls",
                summary.rows,
                total.get()
            );
        }
        Ok(())
    };
    match &config.store {
        crate::config::StoreUrl::Sqlite(path) => {
            total.set(crate::store::count_captures(path, filter)?);
            crate::store::for_each_capture(path, filter, &mut write)?;
        }
        crate::config::StoreUrl::Postgres(pg) => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let store = crate::store::PgStore::open_reader(pg).await?;
                total.set(store.count_export(filter).await?);
                store.for_each_export(filter, &mut write).await?;
                anyhow::Ok(())
            })?;
        }
    }
    std::io::Write::flush(&mut out)?;
    let peak = peak_rss_bytes().map_or_else(String::new, |b| {
        format!(", peak memory {:.1} MB", b as f64 / 1e6)
    });
    let _ = writeln!(
        progress,
        "export: {} calls written, {} skipped (not a chat exchange), in {:.1} s{peak}",
        summary.written,
        summary.skipped,
        started.elapsed().as_secs_f64()
    );
    Ok(summary)
}
