//! Loading a configuration: the raw TOML form (every table with
//! `deny_unknown_fields`, env-expandable values with their spans), then one
//! pass that expands `${VAR}`, checks every value and reference, and builds
//! the [`Config`].

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{
    Alerts, BatchSpend, Config, ConfigError, Env, Fallback, Guard, Org, OrgSharing, Policy,
    Project, Secret, Server, StoreUrl, Upstream, DEFAULT_ALERT_PERCENTS, DEFAULT_BATCH_CONCURRENCY,
    DEFAULT_BATCH_RESERVE_PERCENT, DEFAULT_CAPTURE_RETENTION_DAYS, DEFAULT_LISTEN,
    DEFAULT_MAX_ANSWER_BYTES, DEFAULT_MAX_BODY_BYTES, DEFAULT_STORE,
    DEFAULT_UPSTREAM_BATCH_CONCURRENCY, DEFAULT_UPSTREAM_TIMEOUT_SECS,
};
use crate::catalog::load::OverlayModel;
use crate::catalog::{Catalog, Group};
use crate::day::Day;
use crate::gateway::path::ForwardRule;

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
    #[serde(default)]
    alerts: RawAlerts,
    #[serde(default)]
    catalog: RawCatalogOverlay,
}

/// `[catalog]`: models added to or changed in the built-in catalog, from
/// a file (`file`, its `[models.NAME]` tables) and then `[catalog.models.NAME]`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCatalogOverlay {
    file: Option<Text>,
    #[serde(default)]
    models: BTreeMap<String, OverlayModel>,
}

/// A catalog overlay file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverlayFile {
    #[serde(default)]
    models: BTreeMap<String, OverlayModel>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    webhook_url: Option<Text>,
    used_percent: Option<Vec<u8>>,
    projected_exhaustion: Option<bool>,
    first_refusal: Option<bool>,
    billed_cost_above: Option<Text>,
    retries: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Text>,
    admin_token: Option<Text>,
    max_body_bytes: Option<u64>,
    max_answer_bytes: Option<u64>,
    upstream_timeout_secs: Option<u64>,
    public_metrics: Option<bool>,
    header_read_timeout_secs: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawStore {
    url: Option<Text>,
    ca_file: Option<Text>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    base_url: Text,
    api_key: Option<Text>,
    organization: Option<Text>,
    project: Option<Text>,
    ca_file: Option<Text>,
    batch_concurrency: Option<u16>,
    admin_key: Option<Text>,
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
    capture: bool,
    capture_retention_days: Option<u32>,
    /// Overrides of the global `[alerts]` for this org.
    alerts: Option<RawAlerts>,
    #[serde(default)]
    projects: Vec<RawProject>,
    #[serde(default)]
    admin_keys: Vec<Text>,
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
    privacy_guard: Guard,
    reroute_to: Option<String>,
    #[serde(default)]
    keys: Vec<Text>,
    #[serde(default)]
    forward: Vec<String>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    batch_spend: BatchSpend,
    batch_reserve_percent: Option<u8>,
    batch_concurrency: Option<u16>,
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

/// Apply the configuration's catalog overlay: the file's models, then the
/// inline ones (which win).
fn overlay(
    l: &Loader<'_>,
    raw: &RawCatalogOverlay,
    catalog: &mut Catalog,
) -> Result<(), ConfigError> {
    if let Some(file) = &raw.file {
        let path = l.resolve(&l.expand("catalog.file", file)?);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            l.error(
                "catalog.file",
                Some(file.span()),
                format!("{}: {e}", path.display()),
            )
        })?;
        let models: RawOverlayFile = toml::from_str(&text).map_err(|e| {
            l.error(
                "catalog.file",
                Some(file.span()),
                format!("{}: {e}", path.display()),
            )
        })?;
        for (name, model) in &models.models {
            catalog.overlay(name, model).map_err(|(key, message)| {
                let key = if key.is_empty() {
                    String::new()
                } else {
                    format!(".{key}")
                };
                l.error(
                    "catalog.file",
                    Some(file.span()),
                    format!("{}: models.{name}{key}: {message}", path.display()),
                )
            })?;
        }
    }
    for (name, model) in &raw.models {
        catalog.overlay(name, model).map_err(|(key, message)| {
            let key = if key.is_empty() {
                String::new()
            } else {
                format!(".{key}")
            };
            l.error(format!("catalog.models.{name}{key}"), None, message)
        })?;
    }
    Ok(())
}

/// The certificates of a PEM file (an upstream's `ca_file`), each checked
/// to be usable as a trusted root.
fn extra_roots(file: &str) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let pem = std::fs::read(file).map_err(|e| format!("cannot read {file:?}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{file:?} is not a PEM file of certificates: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{file:?} holds no PEM certificate"));
    }
    let mut store = rustls::RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        store.add(cert.clone()).map_err(|e| {
            format!(
                "certificate {} of {file:?} cannot be a trusted root: {e}",
                i + 1
            )
        })?;
    }
    Ok(certs)
}

/// The line (1-based) of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).map_or(0, |t| t.matches('\n').count()) + 1
}

struct Loader<'a> {
    text: &'a str,
    env: &'a dyn Env,
    /// The folder of the configuration file: relative paths are its.
    base: Option<&'a std::path::Path>,
}

impl Loader<'_> {
    /// A path the file names, resolved against the file's folder.
    fn resolve(&self, file: &str) -> PathBuf {
        match self.base {
            Some(base) if std::path::Path::new(file).is_relative() => base.join(file),
            _ => PathBuf::from(file),
        }
    }

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
    /// Relative paths in it (a `sqlite://` ledger, a `ca_file`) are the
    /// working directory's.
    pub fn from_toml(text: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        Self::from_toml_in(text, env, None)
    }

    fn from_toml_in(
        text: &str,
        env: &dyn Env,
        base: Option<&std::path::Path>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: "config".into(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let loader = Loader { text, env, base };
        Self::validate(raw, &loader)
    }

    /// Read, parse and validate a configuration file. Relative paths in it
    /// (a `sqlite://` ledger, a `ca_file`) are the file's folder's, whatever
    /// the working directory.
    pub fn load(path: &std::path::Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        Self::from_toml_in(&text, env, Some(base)).map_err(|e| match e {
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
            admin_token_hash: None,
            max_body_bytes: raw.server.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES) as usize,
            max_answer_bytes: raw
                .server
                .max_answer_bytes
                .unwrap_or(DEFAULT_MAX_ANSWER_BYTES)
                .try_into()
                .unwrap_or(usize::MAX),
            upstream_timeout: Duration::from_secs(
                raw.server
                    .upstream_timeout_secs
                    .unwrap_or(DEFAULT_UPSTREAM_TIMEOUT_SECS),
            ),
            public_metrics: raw.server.public_metrics.unwrap_or(false),
            header_read_timeout: Duration::from_secs(
                raw.server
                    .header_read_timeout_secs
                    .unwrap_or(crate::gateway::HEADER_READ_TIMEOUT.as_secs())
                    .max(1),
            ),
        };
        let alerts = Self::alerts(&raw.alerts, None, "alerts", l)?;

        let store_text = match &raw.store.url {
            Some(v) => l.expand("store.url", v)?,
            None => DEFAULT_STORE.to_owned(),
        };
        let store = Self::store(&raw.store, store_text, l)?;

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
            // What the upstream client can call: a host, no user, no query.
            let uri = base_url.parse::<axum::http::Uri>().ok();
            let usable = uri.as_ref().is_some_and(|uri| {
                uri.authority()
                    .is_some_and(|a| !a.host().is_empty() && !a.as_str().contains('@'))
                    && uri.query().is_none()
            });
            if !usable {
                return Err(l.error(
                    format!("{path}.base_url"),
                    Some(u.base_url.span()),
                    "must be a URL with a host and no user name or query",
                ));
            }
            let optional = |key: &str, v: &Option<Text>| -> Result<Option<String>, ConfigError> {
                v.as_ref()
                    .map(|v| l.expand(&format!("{path}.{key}"), v))
                    .transpose()
            };
            let extra_roots = match &u.ca_file {
                None => Vec::new(),
                Some(v) => {
                    let key = format!("{path}.ca_file");
                    let file = l.expand(&key, v)?;
                    if !base_url.starts_with("https://") {
                        return Err(l.error(key, Some(v.span()), "is for an https:// base_url"));
                    }
                    extra_roots(&l.resolve(&file).to_string_lossy())
                        .map_err(|e| l.error(key, Some(v.span()), e))?
                }
            };
            upstreams.insert(
                name.clone(),
                Upstream {
                    name: name.clone(),
                    base_url: base_url.trim_end_matches('/').to_owned(),
                    api_key: optional("api_key", &u.api_key)?.map(Secret::new),
                    organization: optional("organization", &u.organization)?,
                    project: optional("project", &u.project)?,
                    admin_key: optional("admin_key", &u.admin_key)?.map(Secret::new),
                    extra_roots,
                    batch_concurrency: match u.batch_concurrency {
                        Some(n) if !(1..=1024).contains(&n) => {
                            return Err(l.error(
                                format!("{path}.batch_concurrency"),
                                None,
                                format!("{n} is not from 1 to 1024"),
                            ))
                        }
                        Some(n) => n,
                        None => DEFAULT_UPSTREAM_BATCH_CONCURRENCY,
                    },
                },
            );
        }

        let mut orgs = Vec::new();
        let mut org_names = HashSet::new();
        // Client keys and admin credentials: each names one holder.
        let mut all_keys: HashSet<String> = server
            .admin_token
            .iter()
            .map(|t| t.expose().to_owned())
            .collect();
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
                let keys = unique_keys(l, &format!("{path}.keys"), &p.keys, &mut all_keys)?;
                let mut forward = Vec::new();
                for (k, rule) in p.forward.iter().enumerate() {
                    let rule = ForwardRule::parse(rule)
                        .map_err(|e| l.error(format!("{path}.forward[{k}]"), None, e))?;
                    forward.push(rule);
                }
                projects.push(Project {
                    id: p.name.as_str().into(),
                    name: p.name.as_str().into(),
                    selected: p.sharing,
                    created_at: 0,
                    archived_at: None,
                    runtime_keys: std::sync::Arc::default(),
                    deleted_keys: Vec::new(),
                    models_denied: false,
                    shares: match o.sharing {
                        OrgSharing::Disabled => false,
                        OrgSharing::All => true,
                        OrgSharing::Selected => p.sharing,
                    },
                    upstream,
                    on_exhausted: p.on_exhausted,
                    downgrade_fallback: p.downgrade_fallback,
                    keys,
                    privacy_guard: p.privacy_guard,
                    reroute_to: None,
                    forward,
                    models: p.models.clone(),
                    retired: false,
                    batch_spend: p.batch_spend,
                    batch_reserve_percent: match p.batch_reserve_percent {
                        Some(n) if n > 100 => {
                            return Err(l.error(
                                format!("{path}.batch_reserve_percent"),
                                None,
                                format!("{n} is not a percentage (0-100)"),
                            ))
                        }
                        Some(n) => n,
                        None => DEFAULT_BATCH_RESERVE_PERCENT,
                    },
                    batch_concurrency: match p.batch_concurrency {
                        Some(n) if !(1..=256).contains(&n) => {
                            return Err(l.error(
                                format!("{path}.batch_concurrency"),
                                None,
                                format!("{n} is not from 1 to 256"),
                            ))
                        }
                        Some(n) => n,
                        None => DEFAULT_BATCH_CONCURRENCY,
                    },
                });
            }
            // reroute_to names a project of the same org that does not share.
            for (j, p) in o.projects.iter().enumerate() {
                let path = format!("{path}.projects[{j}].reroute_to");
                let target = match &p.reroute_to {
                    Some(name) => match projects.iter().position(|q| *q.name == **name) {
                        Some(t) if !projects[t].shares && t != j => Some(t),
                        Some(_) => {
                            return Err(l.error(
                                path,
                                None,
                                format!("{name:?} shares its traffic; a reroute target must not"),
                            ))
                        }
                        None => {
                            return Err(l.error(
                                path,
                                None,
                                format!("{name:?} is not a project of org {}", o.name),
                            ))
                        }
                    },
                    None if p.privacy_guard == Guard::Reroute => {
                        return Err(l.error(
                            path,
                            None,
                            "privacy_guard = \"reroute\" needs reroute_to",
                        ))
                    }
                    None => None,
                };
                if let Some(project) = projects.get_mut(j) {
                    project.reroute_to = target;
                }
            }
            if o.capture && o.zero_data_retention {
                return Err(l.error(
                    format!("{path}.capture"),
                    None,
                    "a zero-data-retention org cannot capture its traffic",
                ));
            }
            let retention = o
                .capture_retention_days
                .unwrap_or(DEFAULT_CAPTURE_RETENTION_DAYS);
            if retention == 0 {
                return Err(l.error(
                    format!("{path}.capture_retention_days"),
                    None,
                    "must be at least 1 day",
                ));
            }
            let org_alerts = match &o.alerts {
                Some(raw) => Self::alerts(raw, Some(&alerts), &format!("{path}.alerts"), l)?,
                None => alerts.clone(),
            };
            orgs.push(Org {
                alerts: org_alerts,
                name: o.name.as_str().into(),
                tier: o.tier,
                sharing: o.sharing,
                eligible: !o.enterprise && !o.zero_data_retention,
                capture: o.capture,
                capture_retention_days: retention,
                projects,
                admin_keys: unique_keys(
                    l,
                    &format!("{path}.admin_keys"),
                    &o.admin_keys,
                    &mut all_keys,
                )?,
                runtime_admin_keys: Vec::new(),
                deleted_admin_keys: Vec::new(),
                retired: false,
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
            let existing = catalog
                .groups
                .iter()
                .position(|group| *group.name == **name);
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
                        name: name.as_str().into(),
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
        }
        // The overlay after the groups (a model may join a new one) and
        // before the groups' model lists (which may name its models).
        self::overlay(l, &raw.catalog, &mut catalog)?;
        for (name, g) in &raw.program.groups {
            let path = format!("program.groups.{name}");
            let Some(index) = catalog
                .groups
                .iter()
                .position(|group| *group.name == **name)
            else {
                continue;
            };
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

        for (i, o) in raw.orgs.iter().enumerate() {
            for (j, p) in o.projects.iter().enumerate() {
                for (k, model) in p.models.iter().enumerate() {
                    if !catalog.matches_any(model) {
                        return Err(l.error(
                            format!("orgs[{i}].projects[{j}].models[{k}]"),
                            None,
                            format!("{model:?} matches no model of the catalog"),
                        ));
                    }
                }
            }
        }

        Ok(Config {
            server,
            store,
            upstreams,
            orgs,
            catalog,
            alerts,
        })
    }

    /// Alert rules at `path` (`alerts`, or an org's `orgs[i].alerts`); a key
    /// left out takes `base`'s value (the global rules), else the default.
    /// `[store]`: `sqlite://PATH` or a PostgreSQL URL (never echoed: it
    /// holds a password).
    fn store(raw: &RawStore, text: String, l: &Loader<'_>) -> Result<StoreUrl, ConfigError> {
        let span = raw.url.as_ref().map(Spanned::span);
        if let Some(path) = text.strip_prefix("sqlite://") {
            if raw.ca_file.is_some() {
                return Err(l.error(
                    "store.ca_file",
                    raw.ca_file.as_ref().map(Spanned::span),
                    "is for a postgres:// store",
                ));
            }
            if !path.is_empty() {
                return Ok(StoreUrl::Sqlite(l.resolve(path)));
            }
        }
        if !(text.starts_with("postgres://") || text.starts_with("postgresql://")) {
            return Err(l.error(
                "store.url",
                span,
                "is not a store URL (sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DB)",
            ));
        }
        let parsed: tokio_postgres::Config = text.parse().map_err(|e| {
            l.error(
                "store.url",
                span,
                format!(
                    "is not a PostgreSQL URL: {}",
                    crate::store::postgres::redacted(&e)
                ),
            )
        })?;
        let extra_roots = match &raw.ca_file {
            None => Vec::new(),
            Some(v) => {
                let file = l.expand("store.ca_file", v)?;
                extra_roots(&l.resolve(&file).to_string_lossy())
                    .map_err(|e| l.error("store.ca_file", Some(v.span()), e))?
            }
        };
        Ok(StoreUrl::Postgres(crate::config::PostgresUrl {
            url: Secret::new(text),
            shown: crate::store::postgres::shown(&parsed),
            extra_roots,
        }))
    }

    fn alerts(
        raw: &RawAlerts,
        base: Option<&Alerts>,
        path: &str,
        l: &Loader<'_>,
    ) -> Result<Alerts, ConfigError> {
        let webhook = match &raw.webhook_url {
            Some(v) => {
                let key = format!("{path}.webhook_url");
                let url = l.expand(&key, v)?;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(l.error(
                        key,
                        Some(v.span()),
                        "must start with http:// or https://",
                    ));
                }
                Some(Secret::new(url))
            }
            None => base.and_then(|b| b.webhook.clone()),
        };
        let mut used_percent = match (&raw.used_percent, base) {
            (Some(p), _) => p.clone(),
            (None, Some(b)) => b.used_percent.clone(),
            (None, None) => DEFAULT_ALERT_PERCENTS.to_vec(),
        };
        if let Some(bad) = used_percent.iter().find(|p| !(1..=100).contains(*p)) {
            return Err(l.error(
                format!("{path}.used_percent"),
                None,
                format!("{bad} is not a percentage from 1 to 100"),
            ));
        }
        used_percent.sort_unstable();
        used_percent.dedup();
        let billed_cost_above_pico = match &raw.billed_cost_above {
            Some(v) => {
                let key = format!("{path}.billed_cost_above");
                let text = l.expand(&key, v)?;
                let dollars = text.trim().trim_start_matches('$');
                Some(crate::catalog::parse_decimal(dollars, 12).ok_or_else(|| {
                    l.error(
                        key,
                        Some(v.span()),
                        format!("{text:?} is not an amount in US dollars like \"25.00\""),
                    )
                })?)
            }
            None => base.and_then(|b| b.billed_cost_above_pico),
        };
        Ok(Alerts {
            webhook,
            used_percent,
            projected_exhaustion: raw
                .projected_exhaustion
                .or(base.map(|b| b.projected_exhaustion))
                .unwrap_or(true),
            billed_cost_above_pico,
            first_refusal: raw
                .first_refusal
                .or(base.map(|b| b.first_refusal))
                .unwrap_or(true),
            retries: raw.retries.or(base.map(|b| b.retries)).unwrap_or(5).min(20),
        })
    }
}

/// The keys at `path`, each at least 16 characters and held by no one else
/// (another project, another org's admins, the platform's admin token).
fn unique_keys(
    l: &Loader<'_>,
    path: &str,
    keys: &[Text],
    all_keys: &mut HashSet<String>,
) -> Result<Vec<Secret>, ConfigError> {
    let mut out = Vec::with_capacity(keys.len());
    for (k, key) in keys.iter().enumerate() {
        let value = l.expand(&format!("{path}[{k}]"), key)?;
        if value.len() < 16 {
            return Err(l.error(
                format!("{path}[{k}]"),
                Some(key.span()),
                "a key must be at least 16 characters",
            ));
        }
        if !all_keys.insert(value.clone()) {
            return Err(l.error(
                format!("{path}[{k}]"),
                Some(key.span()),
                "this key is given to another project or admin too",
            ));
        }
        out.push(Secret::new(value));
    }
    Ok(out)
}
