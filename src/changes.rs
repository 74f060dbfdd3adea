//! Changes made at runtime: an org's data sharing, a project's policies and
//! models, projects and keys made or removed through the admin API.
//!
//! The configuration file is the starting state; each change is kept in the
//! ledger (who made it, when) and applied on top of it, in order, so what
//! was changed at runtime wins over the file, survives a restart and a
//! reload, and reaches every replica that reads the same ledger. A change
//! that no longer applies (its project gone from the file) is skipped.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Fallback, Guard, Org, OrgSharing, Policy, Project, RuntimeKey};
use crate::store::ChangeRow;

/// Whether a project's model list allows or denies (OpenAI's
/// `model_permissions` modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelMode {
    AllowList,
    DenyList,
}

/// One change, as kept in the ledger (JSON, tagged by `kind`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// OpenAI's data-sharing setting: no project, every project, or those listed.
    DataSharing {
        sharing: OrgSharing,
        #[serde(default)]
        project_ids: Vec<String>,
    },
    /// A project's name and policies; what is `None` stays.
    Project {
        project_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        on_exhausted: Option<Policy>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downgrade_fallback: Option<Fallback>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        privacy_guard: Option<Guard>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reroute_to: Option<String>,
    },
    /// The models a project may call; `mode: None` lifts the limit.
    ModelPermissions {
        project_id: String,
        mode: Option<ModelMode>,
        #[serde(default)]
        model_ids: Vec<String>,
    },
    ProjectCreated {
        project_id: String,
        name: String,
        upstream: String,
        created_at: i64,
    },
    ProjectArchived {
        project_id: String,
        archived_at: i64,
    },
    KeyCreated {
        project_id: String,
        key: RuntimeKey,
    },
    KeyDeleted {
        project_id: String,
        key_id: String,
    },
    AdminKeyCreated {
        key: RuntimeKey,
    },
    AdminKeyDeleted {
        key_id: String,
    },
    /// The platform's admin token, kept as its SHA-256 (hex), for a gateway
    /// whose configuration has none (`serve --demo`); for no org.
    PlatformToken {
        hash: String,
    },
}

/// A change kept in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recorded {
    pub id: i64,
    pub at_ms: i64,
    pub org: String,
    pub actor: String,
    pub change: Change,
}

impl Recorded {
    /// Read back from the ledger; `None` for a change this version cannot read.
    pub fn from_row(row: ChangeRow) -> Option<Recorded> {
        let change = serde_json::from_str(&row.body).ok()?;
        Some(Recorded {
            id: row.id,
            at_ms: row.at_ms,
            org: row.org,
            actor: row.actor,
            change,
        })
    }
}

/// At most this many projects an org makes through the API, keys a
/// project gets, admin keys an org gets: a tenant cannot grow the running
/// configuration (rebuilt at each change) without bound.
pub const MAX_PROJECTS: usize = 1000;
pub const MAX_KEYS: usize = 1000;
pub const MAX_ADMIN_KEYS: usize = 100;

fn position(org: &Org, id: &str) -> Result<usize, String> {
    org.projects
        .iter()
        .position(|p| *p.id == *id && !p.retired)
        .ok_or_else(|| {
            format!(
                "No project with id '{}' in org {}.",
                crate::excerpt(id, 64),
                org.name
            )
        })
}

/// What the reroute rule reads of a project.
#[derive(Clone, Copy)]
struct Facts {
    shares: bool,
    active: bool,
    guard: Guard,
    reroute_to: Option<usize>,
}

fn facts(org: &Org) -> Vec<Facts> {
    org.projects
        .iter()
        .map(|p| Facts {
            shares: p.shares,
            active: p.active(),
            guard: p.privacy_guard,
            reroute_to: p.reroute_to,
        })
        .collect()
}

/// The file's rule, on the projects as a change would leave them: a reroute
/// target is an active project that does not share.
fn check_reroutes(org: &Org, facts: &[Facts]) -> Result<(), String> {
    for (p, f) in org.projects.iter().zip(facts).filter(|(_, f)| f.active) {
        let target = f
            .reroute_to
            .and_then(|t| Some((org.projects.get(t)?, facts.get(t)?)));
        if let Some((t, _)) = target.filter(|(_, tf)| tf.shares || !tf.active) {
            return Err(format!(
                "Project {} is the reroute target of project {}: it must be active and must not share its traffic.",
                t.id, p.id
            ));
        }
        if f.guard == Guard::Reroute && target.is_none() {
            return Err(format!(
                "Project {}: privacy_guard \"reroute\" needs reroute_to.",
                p.id
            ));
        }
    }
    Ok(())
}

/// Whether a project shares, under the org's setting and its own flag.
fn shares(sharing: OrgSharing, selected: bool) -> bool {
    match sharing {
        OrgSharing::Disabled => false,
        OrgSharing::All => true,
        OrgSharing::Selected => selected,
    }
}

impl Change {
    /// Apply to org `org` of `config`; an error (for people) when it does
    /// not apply, and then nothing was changed: every check comes before
    /// the first change.
    pub fn apply(&self, config: &mut Config, org: &str) -> Result<(), String> {
        if let Change::PlatformToken { hash } = self {
            config.server.admin_token_hash = Some(
                crate::gateway::auth::parse_hash(hash).ok_or("a token's hash is 64 hex digits")?,
            );
            return Ok(());
        }
        let Config {
            orgs,
            catalog,
            upstreams,
            ..
        } = config;
        let o = orgs
            .iter_mut()
            .find(|o| *o.name == *org && !o.retired)
            .ok_or_else(|| format!("No org named {}.", crate::excerpt(org, 64)))?;
        match self {
            Change::DataSharing {
                sharing,
                project_ids,
            } => {
                let mut chosen = Vec::with_capacity(project_ids.len());
                for id in project_ids {
                    chosen.push(position(o, id)?);
                }
                let selected = |i: usize, now: bool| {
                    if *sharing == OrgSharing::Selected {
                        chosen.contains(&i)
                    } else {
                        now
                    }
                };
                let mut next = facts(o);
                for (i, f) in next.iter_mut().enumerate() {
                    f.shares = shares(*sharing, selected(i, o.projects[i].selected));
                }
                check_reroutes(o, &next)?;
                o.sharing = *sharing;
                for (i, p) in o.projects.iter_mut().enumerate() {
                    p.selected = selected(i, p.selected);
                    p.shares = shares(*sharing, p.selected);
                }
            }
            Change::Project {
                project_id,
                name,
                on_exhausted,
                downgrade_fallback,
                privacy_guard,
                reroute_to,
            } => {
                let at = position(o, project_id)?;
                if o.projects[at].archived_at.is_some() {
                    return Err("An archived project cannot be changed.".into());
                }
                let target = match reroute_to {
                    Some(t) => Some(position(o, t).map_err(|e| format!("reroute_to: {e}"))?),
                    None => None,
                };
                let mut next = facts(o);
                next[at].guard = privacy_guard.unwrap_or(next[at].guard);
                next[at].reroute_to = target.or(next[at].reroute_to);
                check_reroutes(o, &next)?;
                let p = &mut o.projects[at];
                if let Some(name) = name {
                    p.name = name.as_str().into();
                }
                p.on_exhausted = on_exhausted.unwrap_or(p.on_exhausted);
                p.downgrade_fallback = downgrade_fallback.unwrap_or(p.downgrade_fallback);
                p.privacy_guard = next[at].guard;
                p.reroute_to = next[at].reroute_to;
            }
            Change::ModelPermissions {
                project_id,
                mode,
                model_ids,
            } => {
                if let Some(bad) = model_ids.iter().find(|m| !catalog.matches_any(m)) {
                    return Err(format!(
                        "'{}' matches no model of the catalog.",
                        crate::excerpt(bad, 64)
                    ));
                }
                let at = position(o, project_id)?;
                let p = &mut o.projects[at];
                p.models = if mode.is_some() {
                    model_ids.clone()
                } else {
                    Vec::new()
                };
                p.models_denied = *mode == Some(ModelMode::DenyList);
            }
            Change::ProjectCreated {
                project_id,
                name,
                upstream,
                created_at,
            } => {
                if o.projects.iter().any(|p| *p.id == **project_id) {
                    return Err(format!("A project with id '{project_id}' exists."));
                }
                if o.projects.iter().filter(|p| p.created_at > 0).count() >= MAX_PROJECTS {
                    return Err(format!("An org makes at most {MAX_PROJECTS} projects."));
                }
                if !upstreams.contains_key(upstream) {
                    return Err(format!("No upstream named {upstream}."));
                }
                let id: Arc<str> = project_id.as_str().into();
                let mut p = Project::retired(&id);
                p.name = name.as_str().into();
                p.retired = false;
                p.upstream = upstream.clone();
                p.on_exhausted = Policy::Bill;
                p.created_at = *created_at;
                p.shares = shares(o.sharing, false);
                o.projects.push(p);
            }
            Change::ProjectArchived {
                project_id,
                archived_at,
            } => {
                let at = position(o, project_id)?;
                let mut next = facts(o);
                next[at].active = false;
                check_reroutes(o, &next)?;
                o.projects[at].archived_at.get_or_insert(*archived_at);
            }
            Change::KeyCreated { project_id, key } => {
                let at = position(o, project_id)?;
                let p = &mut o.projects[at];
                if p.archived_at.is_some() {
                    return Err("An archived project gets no new keys.".into());
                }
                if p.runtime_keys.len() >= MAX_KEYS {
                    return Err(format!("A project gets at most {MAX_KEYS} keys."));
                }
                Arc::make_mut(&mut p.runtime_keys).push(key.clone());
            }
            Change::KeyDeleted { project_id, key_id } => {
                let at = position(o, project_id)?;
                let p = &mut o.projects[at];
                if p.runtime_keys.iter().any(|k| *k.id == **key_id) {
                    Arc::make_mut(&mut p.runtime_keys).retain(|k| *k.id != **key_id);
                } else if configured_ids(&p.keys).any(|id| id == *key_id)
                    && !p.deleted_keys.iter().any(|d| **d == **key_id)
                {
                    p.deleted_keys.push(key_id.as_str().into());
                } else {
                    return Err(format!(
                        "No API key with id '{}' in project {}.",
                        crate::excerpt(key_id, 64),
                        p.id
                    ));
                }
            }
            Change::AdminKeyCreated { key } => {
                if o.runtime_admin_keys.len() >= MAX_ADMIN_KEYS {
                    return Err(format!("An org gets at most {MAX_ADMIN_KEYS} admin keys."));
                }
                o.runtime_admin_keys.push(key.clone());
            }
            Change::AdminKeyDeleted { key_id } => {
                if o.runtime_admin_keys.iter().any(|k| *k.id == **key_id) {
                    o.runtime_admin_keys.retain(|k| *k.id != **key_id);
                } else if configured_ids(&o.admin_keys).any(|id| id == *key_id)
                    && !o.deleted_admin_keys.iter().any(|d| **d == **key_id)
                {
                    o.deleted_admin_keys.push(key_id.as_str().into());
                } else {
                    return Err(format!(
                        "No admin key with id '{}'.",
                        crate::excerpt(key_id, 64)
                    ));
                }
            }
            Change::PlatformToken { .. } => {}
        }
        Ok(())
    }
}

impl Change {
    /// What the change did, for people (the dashboard's history); never a
    /// key's value (only hashes are kept).
    pub fn describe(&self) -> String {
        match self {
            Change::DataSharing {
                sharing,
                project_ids,
            } if *sharing == OrgSharing::Selected => {
                format!(
                    "data sharing: selected projects ({})",
                    project_ids.join(", ")
                )
            }
            Change::DataSharing { sharing, .. } => format!("data sharing: {}", word(sharing)),
            Change::Project {
                project_id,
                name,
                on_exhausted,
                downgrade_fallback,
                privacy_guard,
                reroute_to,
            } => {
                let mut parts = Vec::new();
                if let Some(n) = name {
                    parts.push(format!("name {n:?}"));
                }
                for (key, value) in [
                    ("on_exhausted", on_exhausted.as_ref().map(word)),
                    ("downgrade_fallback", downgrade_fallback.as_ref().map(word)),
                    ("privacy_guard", privacy_guard.as_ref().map(word)),
                    ("reroute_to", reroute_to.clone()),
                ] {
                    if let Some(value) = value {
                        parts.push(format!("{key} {value}"));
                    }
                }
                format!("project {project_id}: {}", parts.join(", "))
            }
            Change::ModelPermissions {
                project_id,
                mode: None,
                ..
            } => format!("project {project_id}: every model allowed"),
            Change::ModelPermissions {
                project_id,
                mode: Some(mode),
                model_ids,
            } => format!(
                "project {project_id}: models {} [{}]",
                word(mode),
                model_ids.join(", ")
            ),
            Change::ProjectCreated {
                project_id, name, ..
            } => format!("project {project_id} made ({name})"),
            Change::ProjectArchived { project_id, .. } => format!("project {project_id} archived"),
            Change::KeyCreated { project_id, key } => {
                format!("project {project_id}: key {} made ({})", key.id, key.name)
            }
            Change::KeyDeleted { project_id, key_id } => {
                format!("project {project_id}: key {key_id} deleted")
            }
            Change::AdminKeyCreated { key } => format!("admin key {} made ({})", key.id, key.name),
            Change::AdminKeyDeleted { key_id } => format!("admin key {key_id} deleted"),
            Change::PlatformToken { .. } => "the platform's admin token kept".into(),
        }
    }
}

/// The ids of configured keys.
pub fn configured_ids(keys: &[crate::config::Secret]) -> impl Iterator<Item = String> + '_ {
    keys.iter()
        .map(|k| crate::gateway::auth::key_id(&crate::gateway::auth::hash(k.expose())))
}

/// `base` with `changes` applied in order (a change that no longer applies
/// is skipped, and logged).
pub fn replay(base: &Config, changes: &[Recorded]) -> Config {
    let mut config = base.clone();
    for recorded in changes {
        if let Err(e) = recorded.change.apply(&mut config, &recorded.org) {
            tracing::debug!(
                change = recorded.id,
                "a change made at runtime no longer applies: {e}"
            );
        }
    }
    config
}

/// Where the configuration running on `changes` differs from `file`, one
/// line each (for `check-config`): what was changed at runtime wins.
pub fn differences(file: &Config, changes: &[Recorded]) -> Vec<String> {
    let running = replay(file, changes);
    let mut out = Vec::new();
    if running.server.admin_token_hash.is_some() {
        out.push("the platform's admin token: one kept in the ledger (made by serve), besides [server] admin_token".into());
    }
    for (was, now) in file.orgs.iter().zip(&running.orgs) {
        let org = &now.name;
        if was.sharing != now.sharing
            || (now.sharing == OrgSharing::Selected
                && was
                    .projects
                    .iter()
                    .zip(&now.projects)
                    .any(|(a, b)| a.selected != b.selected))
        {
            let selected: Vec<&str> = now
                .projects
                .iter()
                .filter(|p| p.active() && p.selected)
                .map(|p| &*p.id)
                .collect();
            let list = if now.sharing == OrgSharing::Selected {
                format!(" ({})", selected.join(", "))
            } else {
                String::new()
            };
            out.push(format!(
                "org {org}: data sharing is {}{list} (the file says {})",
                word(&now.sharing),
                word(&was.sharing)
            ));
        }
        for p in &now.projects[was.projects.len().min(now.projects.len())..] {
            out.push(format!(
                "org {org}: project {} ({}) was made at runtime",
                p.id, p.name
            ));
        }
        for (a, b) in was.projects.iter().zip(&now.projects) {
            let at = format!("org {org} project {}", b.id);
            if a.name != b.name {
                out.push(format!(
                    "{at}: name is {:?} (the file says {:?})",
                    &*b.name, &*a.name
                ));
            }
            for (key, x, y) in [
                ("on_exhausted", word(&a.on_exhausted), word(&b.on_exhausted)),
                (
                    "downgrade_fallback",
                    word(&a.downgrade_fallback),
                    word(&b.downgrade_fallback),
                ),
                (
                    "privacy_guard",
                    word(&a.privacy_guard),
                    word(&b.privacy_guard),
                ),
            ] {
                if x != y {
                    out.push(format!("{at}: {key} is {y} (the file says {x})"));
                }
            }
            if (a.models.as_slice(), a.models_denied) != (b.models.as_slice(), b.models_denied) {
                let mode = if b.models_denied {
                    "denies"
                } else {
                    "allows only"
                };
                out.push(format!(
                    "{at}: models: {mode} [{}] (the file says [{}])",
                    b.models.join(", "),
                    a.models.join(", ")
                ));
            }
            if b.archived_at.is_some() {
                out.push(format!("{at}: archived"));
            }
            if !b.runtime_keys.is_empty() || !b.deleted_keys.is_empty() {
                out.push(format!(
                    "{at}: {} key(s) made at runtime, {} configured key(s) deleted",
                    b.runtime_keys.len(),
                    b.deleted_keys.len()
                ));
            }
        }
        if !now.runtime_admin_keys.is_empty() || !now.deleted_admin_keys.is_empty() {
            out.push(format!(
                "org {org}: {} admin key(s) made at runtime, {} configured admin key(s) deleted",
                now.runtime_admin_keys.len(),
                now.deleted_admin_keys.len()
            ));
        }
    }
    out
}

/// A setting's name as the file spells it.
fn word<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[upstreams.main]
base_url = "http://127.0.0.1:9/v1"

[[orgs]]
name = "acme"
sharing = "selected"

[[orgs.projects]]
name = "web"
privacy_guard = "reroute"
reroute_to = "vault"
keys = ["tw-changes-web-key-000001"]

[[orgs.projects]]
name = "vault"
sharing = false
"#;

    fn file() -> Config {
        Config::from_toml(FILE, &std::collections::HashMap::new()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn key(n: usize) -> RuntimeKey {
        RuntimeKey {
            id: format!("{n:012x}").into(),
            name: format!("k{n}"),
            hash: format!("{n:064x}"),
            redacted: "tw-...".into(),
            created_at: 1,
            service_account: None,
        }
    }

    fn recorded(id: i64, change: Change) -> Recorded {
        Recorded {
            id,
            at_ms: id * 1000,
            org: "acme".into(),
            actor: "test".into(),
            change,
        }
    }

    #[test]
    fn a_reroute_target_never_comes_to_share_nor_goes() {
        let mut config = file();
        let before = format!("{config:?}");
        for change in [
            Change::DataSharing {
                sharing: OrgSharing::All,
                project_ids: Vec::new(),
            },
            Change::DataSharing {
                sharing: OrgSharing::Selected,
                project_ids: vec!["web".into(), "vault".into()],
            },
            Change::ProjectArchived {
                project_id: "vault".into(),
                archived_at: 5,
            },
            Change::Project {
                project_id: "web".into(),
                name: None,
                on_exhausted: Some(Policy::Block),
                downgrade_fallback: None,
                privacy_guard: None,
                reroute_to: Some("web".into()),
            },
        ] {
            let e = change.apply(&mut config, "acme").err().unwrap_or_default();
            assert!(e.contains("reroute target"), "{change:?}: {e}");
        }
        assert_eq!(
            format!("{config:?}"),
            before,
            "a refused change changed nothing"
        );
        // Once web no longer reroutes, vault may share.
        let guard_off = Change::Project {
            project_id: "web".into(),
            name: None,
            on_exhausted: None,
            downgrade_fallback: None,
            privacy_guard: Some(Guard::Off),
            reroute_to: None,
        };
        assert!(guard_off.apply(&mut config, "acme").is_ok());
        let vault_too = Change::DataSharing {
            sharing: OrgSharing::Selected,
            project_ids: vec!["web".into(), "vault".into()],
        };
        // web still names vault as its reroute target (for x-tokenwarden-private).
        assert!(vault_too.apply(&mut config, "acme").is_err());
    }

    #[test]
    fn keys_are_bounded_and_deleted_once() {
        let mut config = file();
        for n in 0..MAX_KEYS {
            let change = Change::KeyCreated {
                project_id: "web".into(),
                key: key(n),
            };
            assert!(change.apply(&mut config, "acme").is_ok());
        }
        let one_more = Change::KeyCreated {
            project_id: "web".into(),
            key: key(MAX_KEYS),
        };
        assert!(one_more.apply(&mut config, "acme").is_err());
        let configured = configured_ids(&config.orgs[0].projects[0].keys)
            .next()
            .unwrap_or_default();
        let delete = |id: &str| Change::KeyDeleted {
            project_id: "web".into(),
            key_id: id.into(),
        };
        assert!(delete(&configured).apply(&mut config, "acme").is_ok());
        assert!(
            delete(&configured).apply(&mut config, "acme").is_err(),
            "deleted once"
        );
        assert!(delete("000000000007").apply(&mut config, "acme").is_ok());
        assert_eq!(config.orgs[0].projects[0].runtime_keys.len(), MAX_KEYS - 1);
    }

    #[test]
    fn a_replay_skips_what_no_longer_applies_and_differences_are_named() {
        let changes = vec![
            recorded(
                1,
                Change::ProjectCreated {
                    project_id: "proj_x".into(),
                    name: "X".into(),
                    upstream: "main".into(),
                    created_at: 7,
                },
            ),
            recorded(
                2,
                Change::Project {
                    project_id: "gone".into(),
                    name: Some("Y".into()),
                    on_exhausted: None,
                    downgrade_fallback: None,
                    privacy_guard: None,
                    reroute_to: None,
                },
            ),
            recorded(
                3,
                Change::DataSharing {
                    sharing: OrgSharing::Selected,
                    project_ids: vec!["proj_x".into()],
                },
            ),
        ];
        let running = replay(&file(), &changes);
        let acme = &running.orgs[0];
        assert_eq!(acme.projects.len(), 3);
        assert!(acme.projects[2].shares && !acme.projects[0].shares);
        let lines = differences(&file(), &changes);
        assert_eq!(
            lines,
            [
                "org acme: data sharing is selected (proj_x) (the file says selected)",
                "org acme: project proj_x (X) was made at runtime"
            ]
        );
        for c in &changes {
            let row = ChangeRow {
                id: c.id,
                at_ms: c.at_ms,
                org: c.org.clone(),
                actor: c.actor.clone(),
                body: serde_json::to_string(&c.change).unwrap_or_default(),
            };
            assert_eq!(
                Recorded::from_row(row).as_ref(),
                Some(c),
                "the ledger's JSON reads back"
            );
        }
    }
}
