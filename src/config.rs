//! Configuration: raw TOML -> a validated [`Config`].
//!
//! Parse, then validate: the raw form mirrors the file (`deny_unknown_fields`,
//! so a misspelt key is an error that names it and its line), and one
//! function turns it into a `Config` whose every cross-reference (a project's
//! upstream, a group's name) has been checked. `${VAR}` in a string value is
//! taken from an [`Env`] that tests replace, so they never touch the process
//! environment.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::catalog::Catalog;

mod align;
mod load;

/// Where `${VAR}` values come from.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{0}")]
    Catalog(#[from] crate::catalog::CatalogError),
}

/// A value that must never reach a log line, an error or a response.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

// ---- validated form ---------------------------------------------------------

/// Which projects of an organization share their traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OrgSharing {
    /// No project shares: no free tokens.
    Disabled,
    /// Every project shares.
    #[default]
    All,
    /// Projects whose `sharing = true` share.
    Selected,
}

/// What a call does when its reservation does not fit in the free allowance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Forward it; it is billed at list price (what the provider does).
    #[default]
    Bill,
    /// Refuse it with 429 `insufficient_quota` / `free_tokens_exhausted`.
    Block,
    /// Send it to the model's downgrade target when that group has room.
    Downgrade,
    /// Lower the output cap so that the call fits.
    Clamp,
}

/// The privacy guard's action for a sharing project's call with findings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Guard {
    /// No scanning.
    #[default]
    Off,
    /// Refuse the call with a 400 naming the kinds found.
    Block,
    /// Send it to `reroute_to`, a project that does not share: billed, not shared.
    Reroute,
    /// Replace each finding with a typed placeholder before it leaves.
    Redact,
}

/// What `downgrade` does when the target's group has no room either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    #[default]
    Block,
    Bill,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub server: Server,
    pub store: StoreUrl,
    pub upstreams: BTreeMap<String, Upstream>,
    pub orgs: Vec<Org>,
    /// The built-in catalog with `[program]` applied.
    pub catalog: Catalog,
    pub alerts: Alerts,
}

/// Alert rules, evaluated per org and group; each fires at most once a day.
#[derive(Clone, Debug)]
pub struct Alerts {
    /// Where alerts are posted (JSON with a Slack-compatible `text`); a
    /// secret, since webhook URLs carry their own credentials.
    pub webhook: Option<Secret>,
    /// Shares of the free allowance used that fire an alert, ascending.
    pub used_percent: Vec<u8>,
    /// Fire when today's pace would use the allowance up before 00:00 UTC.
    pub projected_exhaustion: bool,
    /// Fire when a group's billed cost today goes above this (pico-dollars).
    pub billed_cost_above_pico: Option<u64>,
    /// Fire on the day's first call a project's `block` policy refused.
    pub first_refusal: bool,
    /// Delivery attempts after the first, with backoff doubling from 0.5 s.
    pub retries: u32,
}

pub const DEFAULT_ALERT_PERCENTS: [u8; 4] = [50, 80, 95, 100];
pub const DEFAULT_CAPTURE_RETENTION_DAYS: u32 = 30;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub listen: SocketAddr,
    /// Guards the admin routes; `None` leaves them closed to everyone.
    pub admin_token: Option<Secret>,
    /// The SHA-256 of a platform admin token kept in the ledger (made by
    /// `serve --demo` or `serve` with only `OPENAI_API_KEY`), besides
    /// `admin_token`.
    pub admin_token_hash: Option<[u8; 32]>,
    /// Request bodies above this are refused with 413.
    pub max_body_bytes: usize,
    /// A whole (not streamed) upstream answer above this is not read: the
    /// client gets 502.
    pub max_answer_bytes: usize,
    /// The longest an upstream call may take, streaming included.
    pub upstream_timeout: Duration,
    /// `/metrics` without the admin token (default: the token is needed).
    pub public_metrics: bool,
    /// A request's head (request line and headers) must arrive within this.
    pub header_read_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
    Postgres(PostgresUrl),
}

/// A PostgreSQL ledger: `postgres://USER:PASSWORD@HOST:PORT/DB`, with
/// `sslmode` (`disable`, `prefer`, `require`) in its query, and roots
/// trusted besides the platform's (`[store] ca_file`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresUrl {
    /// The whole URL: it holds the password.
    pub url: Secret,
    /// `USER@HOST:PORT/DB`, for logs and messages.
    pub shown: String,
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    /// Without a trailing slash; paths such as `/chat/completions` follow it.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub organization: Option<String>,
    pub project: Option<String>,
    /// Roots trusted for this upstream besides the platform's (`ca_file`,
    /// a private CA's, say).
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// Batch lines of every project running against it at once.
    pub batch_concurrency: u16,
    /// An admin key of the upstream's organization (OpenAI's Usage and
    /// Costs APIs), for `tokenwarden reconcile`; a secret.
    pub admin_key: Option<Secret>,
}

#[derive(Clone, Debug)]
pub struct Org {
    pub name: std::sync::Arc<str>,
    /// The provider's usage tier (1-5); tiers 1-2 get smaller caps.
    pub tier: u8,
    pub sharing: OrgSharing,
    /// Enterprise and zero-data-retention organizations are not eligible.
    pub eligible: bool,
    /// Keep the shared traffic (request and completion) of sharing projects.
    pub capture: bool,
    /// Captured calls older than this are purged.
    pub capture_retention_days: u32,
    /// This org's alert rules: the global `[alerts]` with its overrides.
    pub alerts: Alerts,
    pub projects: Vec<Project>,
    /// Admin keys bound to this org: they see and change only this org.
    pub admin_keys: Vec<Secret>,
    /// Admin keys made through the API (kept as hashes).
    pub runtime_admin_keys: Vec<RuntimeKey>,
    /// Ids of configured admin keys deleted through the API.
    pub deleted_admin_keys: Vec<Arc<str>>,
    /// No longer configured: kept only so that its position keeps its name
    /// (see [`Config::align_to`]); no key reaches it.
    pub retired: bool,
}

impl Org {
    /// Whether a project's traffic is shared in the program: the project
    /// shares and the org is eligible (not enterprise, not zero retention).
    pub fn shared(&self, project: usize) -> bool {
        self.eligible && self.projects.get(project).is_some_and(|p| p.shares)
    }

    /// Whether a project's calls are captured.
    pub fn captures(&self, project: usize) -> bool {
        self.capture && self.shared(project)
    }
}

#[derive(Clone, Debug)]
pub struct Project {
    /// The id the admin API and the ledger name it by: its name, for a
    /// configured project; `proj_...` for one made through the API.
    pub id: Arc<str>,
    pub name: std::sync::Arc<str>,
    /// Its own `sharing` flag, read when the org shares "selected" projects.
    pub selected: bool,
    /// When it was made through the API (Unix seconds; 0 for a configured one).
    pub created_at: i64,
    /// When it was archived: its keys stop working.
    pub archived_at: Option<i64>,
    /// Keys made through the API (kept as hashes; shared between copies of
    /// the configuration until one changes them).
    pub runtime_keys: Arc<Vec<RuntimeKey>>,
    /// Ids of configured keys deleted through the API.
    pub deleted_keys: Vec<Arc<str>>,
    /// Whether `models` lists the only models allowed, or the ones denied.
    pub models_denied: bool,
    /// Whether this project's traffic is shared (and so gets free tokens).
    pub shares: bool,
    pub upstream: String,
    pub on_exhausted: Policy,
    pub downgrade_fallback: Fallback,
    pub keys: Vec<Secret>,
    /// What a secret or personal datum found in a sharing call does.
    pub privacy_guard: Guard,
    /// Index (in the same org) of the non-sharing project that `reroute` and
    /// the `x-tokenwarden-private` header send calls to.
    pub reroute_to: Option<usize>,
    /// Methods and upstream paths this project's keys may call unmetered
    /// (`forward`); empty by default: nothing but the metered routes and
    /// `GET /v1/models` goes past the gateway.
    pub forward: Vec<crate::gateway::path::ForwardRule>,
    /// The models this project's keys may call (names or `*` patterns);
    /// empty: every model of the catalog.
    pub models: Vec<String>,
    /// No longer configured (see [`Org::retired`]).
    pub retired: bool,
    /// How its batches spend: only free tokens beyond the reserve, or at once.
    pub batch_spend: BatchSpend,
    /// The share of the free allowance its batches leave to live calls.
    pub batch_reserve_percent: u8,
    /// Lines of its batches running at once.
    pub batch_concurrency: u16,
}

/// How a project's batches spend (`batch_spend`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchSpend {
    /// Only free tokens beyond `batch_reserve_percent`: a line that does not
    /// fit waits for 00:00 UTC.
    #[default]
    Free,
    /// At once: the project's policy, billed where free tokens run out.
    Bill,
}

pub const DEFAULT_BATCH_RESERVE_PERCENT: u8 = 10;
pub const DEFAULT_BATCH_CONCURRENCY: u16 = 8;
/// Batch lines running against one upstream at once (`[upstreams.NAME]
/// batch_concurrency`), whatever the projects'.
pub const DEFAULT_UPSTREAM_BATCH_CONCURRENCY: u16 = 32;

impl Project {
    /// Whether this project may call `model` (a name as the client sent it).
    pub fn allows(&self, model: &str) -> bool {
        let listed = self
            .models
            .iter()
            .any(|m| crate::catalog::glob_match(m, model));
        if self.models_denied {
            !listed
        } else {
            self.models.is_empty() || listed
        }
    }

    /// Whether its keys work: configured, not archived.
    pub fn active(&self) -> bool {
        !self.retired && self.archived_at.is_none()
    }
}

/// A key made through the admin API: only its hash is kept.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuntimeKey {
    /// The first 12 hex digits of its hash (as the ledger names keys).
    pub id: Arc<str>,
    pub name: String,
    /// SHA-256 of the key, hex.
    pub hash: String,
    /// The key with all but its ends hidden.
    pub redacted: String,
    /// Unix seconds.
    pub created_at: i64,
    /// The service account it belongs to (a project key), if any.
    #[serde(default)]
    pub service_account: Option<String>,
}

impl Config {
    /// A warning for each `forward` rule that opens a path spending money
    /// outside the meter or reaching objects every tenant of the upstream
    /// account shares.
    pub fn forward_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for org in &self.orgs {
            for project in &org.projects {
                for rule in &project.forward {
                    if let Some(risk) = rule.risk() {
                        let what = if risk.starts_with("a ") {
                            format!("{risk} (of objects the upstream account shares)")
                        } else {
                            format!("/v1/{risk}")
                        };
                        warnings.push(format!(
                            "org {} project {}: forward \"{rule}\" opens {what} to its keys unmetered, with the upstream's key: it can spend money past the meter or reach objects shared by every project on upstream '{}'",
                            org.name, project.name, project.upstream
                        ));
                    }
                }
            }
        }
        warnings
    }
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_STORE: &str = "sqlite://tokenwarden.db";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
pub const DEFAULT_MAX_ANSWER_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_UPSTREAM_TIMEOUT_SECS: u64 = 600;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::day::Day;

    fn env() -> HashMap<String, String> {
        HashMap::from([
            (
                "OPENAI_API_KEY".to_owned(),
                "sk-upstream-secret-0001".to_owned(),
            ),
            ("ACME_KEY".to_owned(), "tw-acme-key-000000000001".to_owned()),
        ])
    }

    const GOOD: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_token = "admin-token-0123456789"

[store]
url = "sqlite:///tmp/x.db"

[upstreams.openai]
base_url = "https://api.openai.com/v1/"
api_key = "${OPENAI_API_KEY}"

[[orgs]]
name = "acme"
tier = 2
sharing = "selected"

[[orgs.projects]]
name = "web"
sharing = true
on_exhausted = "block"
keys = ["${ACME_KEY}"]

[[orgs.projects]]
name = "private"
sharing = false
keys = ["tw-acme-private-000000001"]

[program]
ends = "2026-12-31"

[program.groups.flagship]
daily_tokens = 500000

[program.groups.local]
daily_tokens = 42
models = ["o1-pro"]
"#;

    fn load(text: &str) -> Result<Config, String> {
        Config::from_toml(text, &env()).map_err(|e| e.to_string())
    }

    #[test]
    fn a_good_file() {
        let c = match load(GOOD) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(c.store, StoreUrl::Sqlite(PathBuf::from("/tmp/x.db")));
        assert_eq!(c.server.max_answer_bytes, 64 * 1024 * 1024, "the default");
        let up = &c.upstreams["openai"];
        assert_eq!(up.base_url, "https://api.openai.com/v1");
        assert_eq!(
            up.api_key.as_ref().map(Secret::expose),
            Some("sk-upstream-secret-0001")
        );
        assert!(
            !format!("{c:?}").contains("sk-upstream-secret"),
            "secrets leak through Debug"
        );
        let org = &c.orgs[0];
        assert_eq!((org.tier, org.eligible), (2, true));
        assert_eq!(org.projects[0].keys[0].expose(), "tw-acme-key-000000000001");
        assert_eq!(
            (org.projects[0].shares, org.projects[1].shares),
            (true, false)
        );
        assert_eq!(org.projects[0].on_exhausted, Policy::Block);
        assert_eq!(org.projects[1].on_exhausted, Policy::Bill);
        assert_eq!(org.projects[1].upstream, "openai");
        let flagship = c
            .catalog
            .group("flagship")
            .map(|g| (g.daily_tokens, g.daily_tokens_tiers_1_2));
        assert_eq!(flagship, Some((500_000, 500_000)));
        let o1_pro = c
            .catalog
            .lookup("o1-pro")
            .ok()
            .and_then(|m| m.group())
            .map(|g| g.name.clone());
        assert_eq!(o1_pro.as_deref(), Some("local"));
        assert_eq!(c.catalog.program_ends, Day::parse("2026-12-31"));
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let e = load(&GOOD.replace("tier = 2", "tier = 2\ncolour = \"red\""))
            .err()
            .unwrap_or_default();
        assert!(e.contains("colour") && e.contains("line 16"), "{e}");
        let e = load(&GOOD.replace("${OPENAI_API_KEY}", "${MISSING_VAR}"))
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("upstreams.openai.api_key (line 11)") && e.contains("MISSING_VAR"),
            "{e}"
        );
        let e = load(&GOOD.replace("on_exhausted = \"block\"", "on_exhausted = \"pray\""))
            .err()
            .unwrap_or_default();
        assert!(e.contains("pray") && e.contains("line 21"), "{e}");
        let e = load(&GOOD.replace(
            "sharing = false\n",
            "sharing = false\nupstream = \"azure\"\n",
        ))
        .err()
        .unwrap_or_default();
        assert!(
            e.contains("orgs[0].projects[1].upstream") && e.contains("azure"),
            "{e}"
        );
        let e = load(&GOOD.replace("tw-acme-private-000000001", "short"))
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("orgs[0].projects[1].keys[0]") && !e.contains("short\""),
            "{e}"
        );
        let e = load(&GOOD.replace("models = [\"o1-pro\"]", "models = [\"llama-9\"]"))
            .err()
            .unwrap_or_default();
        assert!(e.contains("program.groups.local.models[0]"), "{e}");
        let e = load(&GOOD.replace("sqlite:///tmp/x.db", "mysql://x"))
            .err()
            .unwrap_or_default();
        assert!(e.contains("store.url"), "{e}");
        for bad in [
            "https://user:pw@api.openai.com/v1",
            "https://api.openai.com/v1?x=1",
            "https:///v1",
            "https://api openai.com/v1",
        ] {
            let e = load(&GOOD.replace("https://api.openai.com/v1/", bad))
                .err()
                .unwrap_or_default();
            assert!(
                e.contains("upstreams.openai.base_url (line 10)") && e.contains("a host"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn an_upstream_ca_file_is_read_at_load_and_checked() {
        let tls = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tls");
        let with = |file: &str| {
            GOOD.replace(
                "api_key = \"${OPENAI_API_KEY}\"\n",
                &format!("api_key = \"${{OPENAI_API_KEY}}\"\nca_file = \"{file}\"\n"),
            )
        };
        let c = match load(&with(&format!("{tls}/ca.pem"))) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let der = std::fs::read(format!("{tls}/ca.der")).unwrap_or_default();
        let roots = &c.upstreams["openai"].extra_roots;
        assert_eq!(roots.len(), 1);
        assert_eq!(roots[0].as_ref(), der.as_slice());
        assert!(load(GOOD).is_ok_and(|c| c.upstreams["openai"].extra_roots.is_empty()));

        let missing = format!("{tls}/no-such.pem");
        let text = format!("{tls}/../README.md");
        let der_file = format!("{tls}/ca.der");
        for (file, says) in [
            (missing.as_str(), "cannot read"),
            (text.as_str(), "holds no PEM certificate"),
            (der_file.as_str(), "holds no PEM certificate"),
        ] {
            let e = load(&with(file)).err().unwrap_or_default();
            assert!(
                e.contains("upstreams.openai.ca_file (line 12)") && e.contains(says),
                "{file}: {e}"
            );
        }
        let e = load(
            &with(&format!("{tls}/ca.pem")).replace("https://api.openai.com", "http://127.0.0.1"),
        )
        .err()
        .unwrap_or_default();
        assert!(e.contains("is for an https:// base_url"), "{e}");
    }

    #[test]
    fn reroute_targets_must_be_projects_of_the_org_that_do_not_share() {
        let guarded = GOOD.replace(
            "on_exhausted = \"block\"\n",
            "on_exhausted = \"block\"\nprivacy_guard = \"reroute\"\n",
        );
        let e = load(&guarded).err().unwrap_or_default();
        assert!(
            e.contains("orgs[0].projects[0].reroute_to") && e.contains("needs reroute_to"),
            "{e}"
        );
        let to_private = guarded.replace(
            "privacy_guard = \"reroute\"\n",
            "privacy_guard = \"reroute\"\nreroute_to = \"private\"\n",
        );
        let c = load(&to_private).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (
                c.orgs[0].projects[0].privacy_guard,
                c.orgs[0].projects[0].reroute_to
            ),
            (Guard::Reroute, Some(1))
        );
        let to_itself = guarded.replace(
            "privacy_guard = \"reroute\"\n",
            "privacy_guard = \"reroute\"\nreroute_to = \"web\"\n",
        );
        assert!(load(&to_itself)
            .err()
            .unwrap_or_default()
            .contains("shares its traffic"));
        let to_nowhere = guarded.replace(
            "privacy_guard = \"reroute\"\n",
            "privacy_guard = \"reroute\"\nreroute_to = \"vault\"\n",
        );
        assert!(load(&to_nowhere)
            .err()
            .unwrap_or_default()
            .contains("is not a project of org acme"));
    }

    #[test]
    fn a_postgres_url_is_a_secret() {
        let url = "postgres://tw:pa55-word-123@db.internal:6432/ledger?sslmode=require";
        let c = load(&GOOD.replace("sqlite:///tmp/x.db", url)).unwrap_or_else(|e| panic!("{e}"));
        let StoreUrl::Postgres(pg) = &c.store else {
            panic!("{:?}", c.store)
        };
        assert_eq!(pg.shown, "tw@db.internal:6432/ledger");
        assert_eq!(pg.url.expose(), url);
        assert!(!format!("{c:?}").contains("pa55-word-123"));
        // A URL the driver cannot read: named, never echoed.
        let bad = "postgres://tw:pa55-word-123@db.internal:6432/ledger?sslmode=sometimes";
        let e = load(&GOOD.replace("sqlite:///tmp/x.db", bad))
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("store.url") && !e.contains("pa55-word-123"),
            "{e}"
        );
        // ca_file belongs to PostgreSQL.
        let e = load(&GOOD.replace(
            "url = \"sqlite:///tmp/x.db\"",
            "url = \"sqlite:///tmp/x.db\"\nca_file = \"/x.pem\"",
        ))
        .err()
        .unwrap_or_default();
        assert!(e.contains("store.ca_file"), "{e}");
    }

    #[test]
    fn model_lists_and_admin_keys_are_checked() {
        let text = GOOD.replace(
            "on_exhausted = \"block\"\n",
            "on_exhausted = \"block\"\nmodels = [\"gpt-4o-mini\", \"gpt-4.1-*\"]\n",
        );
        let c = load(&text).unwrap_or_else(|e| panic!("{e}"));
        let web = &c.orgs[0].projects[0];
        assert!(web.allows("gpt-4o-mini") && web.allows("gpt-4.1-nano"));
        assert!(!web.allows("gpt-4o") && c.orgs[0].projects[1].allows("gpt-4o"));
        let e = load(&text.replace("gpt-4.1-*", "gpt-9*"))
            .err()
            .unwrap_or_default();
        assert!(e.contains("orgs[0].projects[0].models[1]"), "{e}");
        let admins = |keys: &str| {
            GOOD.replace(
                "sharing = \"selected\"\n",
                &format!("sharing = \"selected\"\nadmin_keys = [{keys}]\n"),
            )
        };
        let c = load(&admins("\"tw-acme-admin-0000000001\"")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.orgs[0].admin_keys.len(), 1);
        for (keys, says) in [
            ("\"short\"", "at least 16"),
            ("\"admin-token-0123456789\"", "another project or admin"),
            ("\"tw-acme-private-000000001\"", "another project or admin"),
        ] {
            let e = load(&admins(keys)).err().unwrap_or_default();
            assert!(
                e.contains("orgs[0].admin_keys[0]") && e.contains(says),
                "{keys}: {e}"
            );
        }
    }

    #[test]
    fn secrets_never_appear_in_errors() {
        let text = GOOD.replace("tw-acme-private-000000001", "${ACME_KEY}");
        let e = load(&text).err().unwrap_or_default();
        assert!(e.contains("another project"), "{e}");
        assert!(!e.contains("tw-acme-key-000000000001"), "{e}");
    }

    #[test]
    fn alert_rules() {
        let c = load(&format!(
            "{GOOD}\n[alerts]\nwebhook_url = \"https://hooks.example/T0/${{ACME_KEY}}\"\nused_percent = [95, 50]\nbilled_cost_above = \"$12.5\"\n"
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.alerts.used_percent, [50, 95]);
        assert_eq!(c.alerts.billed_cost_above_pico, Some(12_500_000_000_000));
        assert!(c.alerts.projected_exhaustion);
        assert!(!format!("{:?}", c.alerts).contains("hooks.example"));
        let e = load(&format!("{GOOD}\n[alerts]\nused_percent = [0]\n"))
            .err()
            .unwrap_or_default();
        assert!(e.contains("alerts.used_percent"), "{e}");
        let e = load(&format!("{GOOD}\n[alerts]\nbilled_cost_above = \"ten\"\n"))
            .err()
            .unwrap_or_default();
        assert!(
            e.contains("alerts.billed_cost_above") && e.contains("line"),
            "{e}"
        );
        let e = load(&format!("{GOOD}\n[alerts]\nwebhook_url = \"ftp://x\"\n"))
            .err()
            .unwrap_or_default();
        assert!(e.contains("alerts.webhook_url"), "{e}");
        // An org's own rules override the global ones, key by key.
        let text = format!("{GOOD}\n[alerts]\nwebhook_url = \"https://hooks.example/all\"\nbilled_cost_above = \"5\"\n")
            .replace(
                "sharing = \"selected\"\n",
                "sharing = \"selected\"\nalerts = { used_percent = [90], webhook_url = \"https://hooks.example/acme\" }\n",
            );
        let c = load(&text).unwrap_or_else(|e| panic!("{e}"));
        let acme = &c.orgs[0].alerts;
        assert_eq!(acme.used_percent, [90]);
        assert_eq!(
            acme.webhook.as_ref().map(Secret::expose),
            Some("https://hooks.example/acme")
        );
        assert_eq!(acme.billed_cost_above_pico, Some(5_000_000_000_000));
        let e = load(&GOOD.replace(
            "sharing = \"selected\"\n",
            "sharing = \"selected\"\nalerts = { used_percent = [101] }\n",
        ))
        .err()
        .unwrap_or_default();
        assert!(e.contains("orgs[0].alerts.used_percent"), "{e}");
    }

    #[test]
    fn defaults() {
        let c = match load("") {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(c.server.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.server.admin_token.is_none());
        assert!(c.orgs.is_empty());
        assert_eq!(c.alerts.used_percent, DEFAULT_ALERT_PERCENTS);
        assert!(c.alerts.webhook.is_none() && !c.server.public_metrics);
    }
}
