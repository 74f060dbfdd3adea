//! Configuration: raw TOML -> a validated [`Config`].
//!
//! Parse, then validate: the raw form mirrors the file (`deny_unknown_fields`,
//! so a misspelt key is an error that names it and its line), and one
//! function turns it into a `Config` whose every cross-reference (a project's
//! upstream, a group's name) has been checked. `${VAR}` in a string value is
//! taken from an [`Env`] that tests replace, so they never touch the process
//! environment.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::catalog::{Catalog, Group};
use crate::day::Day;

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

// ---- raw form ---------------------------------------------------------------

type Text = Spanned<String>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    store: RawStore,
    #[serde(default)]
    upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    orgs: Vec<RawOrg>,
    #[serde(default)]
    program: RawProgram,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Text>,
    admin_token: Option<Text>,
    max_body_bytes: Option<u64>,
    upstream_timeout_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<Text>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    base_url: Text,
    api_key: Option<Text>,
    organization: Option<Text>,
    project: Option<Text>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOrg {
    name: String,
    #[serde(default = "default_tier")]
    tier: u8,
    #[serde(default)]
    sharing: OrgSharing,
    #[serde(default)]
    enterprise: bool,
    #[serde(default)]
    zero_data_retention: bool,
    #[serde(default)]
    projects: Vec<RawProject>,
}

fn default_tier() -> u8 {
    5
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    name: String,
    #[serde(default = "default_true")]
    sharing: bool,
    upstream: Option<String>,
    #[serde(default)]
    on_exhausted: Policy,
    #[serde(default)]
    downgrade_fallback: Fallback,
    #[serde(default)]
    keys: Vec<Text>,
}

fn default_true() -> bool {
    true
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProgram {
    starts: Option<String>,
    ends: Option<String>,
    #[serde(default)]
    groups: BTreeMap<String, RawGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    daily_tokens: Option<u64>,
    daily_tokens_tiers_1_2: Option<u64>,
    #[serde(default)]
    models: Vec<String>,
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

/// What `downgrade` does when the target's group has no room either.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    #[default]
    Block,
    Bill,
}

#[derive(Debug)]
pub struct Config {
    pub server: Server,
    pub store: StoreUrl,
    pub upstreams: BTreeMap<String, Upstream>,
    pub orgs: Vec<Org>,
    /// The built-in catalog with `[program]` applied.
    pub catalog: Catalog,
}

#[derive(Debug)]
pub struct Server {
    pub listen: SocketAddr,
    /// Guards the admin routes; `None` leaves them closed to everyone.
    pub admin_token: Option<Secret>,
    /// Request bodies above this are refused with 413.
    pub max_body_bytes: usize,
    /// The longest an upstream call may take, streaming included.
    pub upstream_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreUrl {
    Sqlite(PathBuf),
}

#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    /// Without a trailing slash; paths such as `/chat/completions` follow it.
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub organization: Option<String>,
    pub project: Option<String>,
}

#[derive(Debug)]
pub struct Org {
    pub name: String,
    /// The provider's usage tier (1-5); tiers 1-2 get smaller caps.
    pub tier: u8,
    pub sharing: OrgSharing,
    /// Enterprise and zero-data-retention organizations are not eligible.
    pub eligible: bool,
    pub projects: Vec<Project>,
}

#[derive(Debug)]
pub struct Project {
    pub name: String,
    /// Whether this project's traffic is shared (and so gets free tokens).
    pub shares: bool,
    pub upstream: String,
    pub on_exhausted: Policy,
    pub downgrade_fallback: Fallback,
    pub keys: Vec<Secret>,
}

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_STORE: &str = "sqlite://tokenwarden.db";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 8 * 1024 * 1024;
pub const DEFAULT_UPSTREAM_TIMEOUT_SECS: u64 = 600;

/// The line (1-based) of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

struct Loader<'a> {
    text: &'a str,
    env: &'a dyn Env,
}

impl Loader<'_> {
    fn error(
        &self,
        path: impl Into<String>,
        span: Option<std::ops::Range<usize>>,
        message: impl Into<String>,
    ) -> ConfigError {
        let path = path.into();
        let path = match span {
            Some(span) => format!("{path} (line {})", line_of(self.text, span.start)),
            None => path,
        };
        ConfigError::Invalid {
            path,
            message: message.into(),
        }
    }

    /// `${VAR}` replaced from the environment; a missing variable is an error.
    fn expand(&self, path: &str, value: &Text) -> Result<String, ConfigError> {
        let raw = value.get_ref();
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw.as_str();
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                return Err(self.error(path, Some(value.span()), "unclosed ${ in value"));
            };
            let name = &after[..end];
            let valid =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(self.error(
                    path,
                    Some(value.span()),
                    format!("${{{name}}} is not an environment variable name"),
                ));
            }
            match self.env.var(name) {
                Some(v) => out.push_str(&v),
                None => {
                    return Err(self.error(
                        path,
                        Some(value.span()),
                        format!("environment variable {name} is not set"),
                    ))
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

impl Config {
    /// Parse and validate a configuration file's text.
    pub fn from_toml(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: "config".into(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let loader = Loader { text, env };
        Self::validate(raw, &loader)
    }

    /// Read, parse and validate a configuration file.
    pub fn load(path: &std::path::Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text, env).map_err(|e| match e {
            ConfigError::Invalid { path: key, message } => ConfigError::Invalid {
                path: format!("{}: {key}", path.display()),
                message,
            },
            other => other,
        })
    }

    fn validate(raw: RawConfig, l: &Loader<'_>) -> Result<Config, ConfigError> {
        let listen_text = match &raw.server.listen {
            Some(v) => l.expand("server.listen", v)?,
            None => DEFAULT_LISTEN.to_owned(),
        };
        let listen = listen_text.parse().map_err(|_| {
            l.error(
                "server.listen",
                raw.server.listen.as_ref().map(Spanned::span),
                format!("{listen_text:?} is not an address like 127.0.0.1:8080"),
            )
        })?;
        let admin_token = match &raw.server.admin_token {
            Some(v) => {
                let token = l.expand("server.admin_token", v)?;
                if token.len() < 16 {
                    return Err(l.error(
                        "server.admin_token",
                        Some(v.span()),
                        "must be at least 16 characters",
                    ));
                }
                Some(Secret::new(token))
            }
            None => None,
        };
        let server = Server {
            listen,
            admin_token,
            max_body_bytes: raw.server.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES) as usize,
            upstream_timeout: Duration::from_secs(
                raw.server
                    .upstream_timeout_secs
                    .unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_SECS),
            ),
        };

        let store_text = match &raw.store.url {
            Some(v) => l.expand("store.url", v)?,
            None => DEFAULT_STORE.to_owned(),
        };
        let store = match store_text.strip_prefix("sqlite://") {
            Some(path) if !path.is_empty() => StoreUrl::Sqlite(PathBuf::from(path)),
            _ => {
                return Err(l.error(
                    "store.url",
                    raw.store.url.as_ref().map(Spanned::span),
                    format!("{store_text:?} is not a store URL (sqlite://PATH)"),
                ))
            }
        };

        let mut upstreams = BTreeMap::new();
        for (name, u) in &raw.upstreams {
            let path = format!("upstreams.{name}");
            let base_url = l.expand(&format!("{path}.base_url"), &u.base_url)?;
            if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                return Err(l.error(
                    format!("{path}.base_url"),
                    Some(u.base_url.span()),
                    "must start with http:// or https://",
                ));
            }
            let optional = |key: &str, v: &Option<Text>| -> Result<Option<String>, ConfigError> {
                v.as_ref()
                    .map(|v| l.expand(&format!("{path}.{key}"), v))
                    .transpose()
            };
            upstreams.insert(
                name.clone(),
                Upstream {
                    name: name.clone(),
                    base_url: base_url.trim_end_matches('/').to_owned(),
                    api_key: optional("api_key", &u.api_key)?.map(Secret::new),
                    organization: optional("organization", &u.organization)?,
                    project: optional("project", &u.project)?,
                },
            );
        }

        let mut orgs = Vec::new();
        let mut org_names = HashSet::new();
        let mut all_keys = HashSet::new();
        for (i, o) in raw.orgs.iter().enumerate() {
            let path = format!("orgs[{i}]");
            if o.name.is_empty() || !org_names.insert(o.name.clone()) {
                return Err(l.error(
                    format!("{path}.name"),
                    None,
                    format!("{:?} is empty or names another org too", o.name),
                ));
            }
            if !(1..=5).contains(&o.tier) {
                return Err(l.error(
                    format!("{path}.tier"),
                    None,
                    format!("{} is not a usage tier (1-5)", o.tier),
                ));
            }
            let mut projects = Vec::new();
            let mut project_names = HashSet::new();
            for (j, p) in o.projects.iter().enumerate() {
                let path = format!("{path}.projects[{j}]");
                if p.name.is_empty() || !project_names.insert(p.name.clone()) {
                    return Err(l.error(
                        format!("{path}.name"),
                        None,
                        format!(
                            "{:?} is empty or names another project of {} too",
                            p.name, o.name
                        ),
                    ));
                }
                let upstream = match &p.upstream {
                    Some(name) if upstreams.contains_key(name) => name.clone(),
                    Some(name) => {
                        return Err(l.error(
                            format!("{path}.upstream"),
                            None,
                            format!("{name:?} names no [upstreams.{name}] section"),
                        ))
                    }
                    None if upstreams.len() == 1 => {
                        upstreams.keys().next().cloned().unwrap_or_default()
                    }
                    None => {
                        return Err(l.error(
                            format!("{path}.upstream"),
                            None,
                            "is required when there is not exactly one upstream",
                        ))
                    }
                };
                let mut keys = Vec::new();
                for (k, key) in p.keys.iter().enumerate() {
                    let value = l.expand(&format!("{path}.keys[{k}]"), key)?;
                    if value.len() < 16 {
                        return Err(l.error(
                            format!("{path}.keys[{k}]"),
                            Some(key.span()),
                            "a client key must be at least 16 characters",
                        ));
                    }
                    if !all_keys.insert(value.clone()) {
                        return Err(l.error(
                            format!("{path}.keys[{k}]"),
                            Some(key.span()),
                            "this key is given to another project too",
                        ));
                    }
                    keys.push(Secret::new(value));
                }
                projects.push(Project {
                    name: p.name.clone(),
                    shares: match o.sharing {
                        OrgSharing::Disabled => false,
                        OrgSharing::All => true,
                        OrgSharing::Selected => p.sharing,
                    },
                    upstream,
                    on_exhausted: p.on_exhausted,
                    downgrade_fallback: p.downgrade_fallback,
                    keys,
                });
            }
            orgs.push(Org {
                name: o.name.clone(),
                tier: o.tier,
                sharing: o.sharing,
                eligible: !o.enterprise && !o.zero_data_retention,
                projects,
            });
        }

        let mut catalog = Catalog::builtin()?;
        let day = |key: &str, value: &str| {
            Day::parse(value).ok_or_else(|| {
                l.error(
                    format!("program.{key}"),
                    None,
                    format!("{value:?} is not a YYYY-MM-DD date"),
                )
            })
        };
        if let Some(starts) = &raw.program.starts {
            catalog.program_starts = day("starts", starts)?;
        }
        if let Some(ends) = &raw.program.ends {
            catalog.program_ends = Some(day("ends", ends)?);
        }
        for (name, g) in &raw.program.groups {
            let path = format!("program.groups.{name}");
            let existing = catalog.groups.iter().position(|group| &group.name == name);
            let index = match existing {
                Some(index) => index,
                None => {
                    let Some(daily) = g.daily_tokens else {
                        return Err(l.error(
                            format!("{path}.daily_tokens"),
                            None,
                            "a new group needs daily_tokens",
                        ));
                    };
                    catalog.groups.push(Group {
                        name: name.clone(),
                        daily_tokens: daily,
                        daily_tokens_tiers_1_2: daily,
                    });
                    catalog.groups.len() - 1
                }
            };
            if let Some(group) = catalog.groups.get_mut(index) {
                if let Some(daily) = g.daily_tokens {
                    group.daily_tokens = daily;
                    // One number sets both caps unless the tiers 1-2 cap is given too.
                    group.daily_tokens_tiers_1_2 = g.daily_tokens_tiers_1_2.unwrap_or(daily);
                } else if let Some(low) = g.daily_tokens_tiers_1_2 {
                    group.daily_tokens_tiers_1_2 = low;
                }
            }
            for (k, model) in g.models.iter().enumerate() {
                if !catalog.assign_group(model, index) {
                    return Err(l.error(
                        format!("{path}.models[{k}]"),
                        None,
                        format!("{model:?} matches no model of the catalog"),
                    ));
                }
            }
        }

        Ok(Config {
            server,
            store,
            upstreams,
            orgs,
            catalog,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn secrets_never_appear_in_errors() {
        let text = GOOD.replace("tw-acme-private-000000001", "${ACME_KEY}");
        let e = load(&text).err().unwrap_or_default();
        assert!(e.contains("another project"), "{e}");
        assert!(!e.contains("tw-acme-key-000000000001"), "{e}");
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
    }
}
