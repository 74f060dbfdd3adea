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

fn project_mut<'a>(org: &'a mut Org, id: &str) -> Result<&'a mut Project, String> {
    org.projects
        .iter_mut()
        .find(|p| *p.id == *id && !p.retired)
        .ok_or_else(|| {
            format!(
                "No project with id '{}' in org {}.",
                crate::excerpt(id, 64),
                org.name
            )
        })
}

/// Each project's `shares`, from the org's setting and its own flag.
fn share(org: &mut Org) {
    for p in &mut org.projects {
        p.shares = match org.sharing {
            OrgSharing::Disabled => false,
            OrgSharing::All => true,
            OrgSharing::Selected => p.selected,
        };
    }
}

impl Change {
    /// Apply to org `org` of `config`; an error (for people) when it does
    /// not apply, and `config` is then as it was.
    pub fn apply(&self, config: &mut Config, org: &str) -> Result<(), String> {
        if let Change::PlatformToken { hash } = self {
            config.server.admin_token_hash = Some(
                crate::gateway::auth::parse_hash(hash).ok_or("a token's hash is 64 hex digits")?,
            );
            return Ok(());
        }
        let at = config
            .orgs
            .iter()
            .position(|o| *o.name == *org && !o.retired)
            .ok_or_else(|| format!("No org named {}.", crate::excerpt(org, 64)))?;
        let mut changed = config.orgs[at].clone();
        self.apply_to(&mut changed, config)?;
        config.orgs[at] = changed;
        Ok(())
    }

    /// Apply to `o`, an org of `config` (read for its upstreams and catalog).
    fn apply_to(&self, o: &mut Org, config: &Config) -> Result<(), String> {
        let catalog = &config.catalog;
        match self {
            Change::DataSharing {
                sharing,
                project_ids,
            } => {
                for id in project_ids {
                    project_mut(o, id)?;
                }
                o.sharing = *sharing;
                if *sharing == OrgSharing::Selected {
                    for p in &mut o.projects {
                        p.selected = project_ids.iter().any(|id| **id == *p.id);
                    }
                }
                share(o);
            }
            Change::Project {
                project_id,
                name,
                on_exhausted,
                downgrade_fallback,
                privacy_guard,
                reroute_to,
            } => {
                let target = match reroute_to {
                    Some(t) => Some(
                        o.projects
                            .iter()
                            .position(|p| *p.id == **t && p.active())
                            .ok_or_else(|| {
                                format!(
                                    "reroute_to: no project with id '{}'.",
                                    crate::excerpt(t, 64)
                                )
                            })?,
                    ),
                    None => None,
                };
                let p = project_mut(o, project_id)?;
                if p.archived_at.is_some() {
                    return Err("An archived project cannot be changed.".into());
                }
                if let Some(name) = name {
                    p.name = name.as_str().into();
                }
                p.on_exhausted = on_exhausted.unwrap_or(p.on_exhausted);
                p.downgrade_fallback = downgrade_fallback.unwrap_or(p.downgrade_fallback);
                p.privacy_guard = privacy_guard.unwrap_or(p.privacy_guard);
                if target.is_some() {
                    p.reroute_to = target;
                }
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
                let p = project_mut(o, project_id)?;
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
                if !config.upstreams.contains_key(upstream) {
                    return Err(format!("No upstream named {upstream}."));
                }
                let id: Arc<str> = project_id.as_str().into();
                let mut p = Project::retired(&id);
                p.name = name.as_str().into();
                p.retired = false;
                p.upstream = upstream.clone();
                p.on_exhausted = Policy::Bill;
                p.created_at = *created_at;
                o.projects.push(p);
                share(o);
            }
            Change::ProjectArchived {
                project_id,
                archived_at,
            } => {
                let p = project_mut(o, project_id)?;
                p.archived_at.get_or_insert(*archived_at);
            }
            Change::KeyCreated { project_id, key } => {
                let p = project_mut(o, project_id)?;
                if p.archived_at.is_some() {
                    return Err("An archived project gets no new keys.".into());
                }
                p.runtime_keys.push(key.clone());
            }
            Change::KeyDeleted { project_id, key_id } => {
                let p = project_mut(o, project_id)?;
                let before = p.runtime_keys.len();
                p.runtime_keys.retain(|k| *k.id != **key_id);
                if p.runtime_keys.len() == before {
                    if !configured_ids(&p.keys).any(|id| id == *key_id) {
                        return Err(format!(
                            "No API key with id '{}' in project {}.",
                            crate::excerpt(key_id, 64),
                            p.id
                        ));
                    }
                    p.deleted_keys.push(key_id.as_str().into());
                }
            }
            Change::PlatformToken { .. } => {}
            Change::AdminKeyCreated { key } => o.runtime_admin_keys.push(key.clone()),
            Change::AdminKeyDeleted { key_id } => {
                let before = o.runtime_admin_keys.len();
                o.runtime_admin_keys.retain(|k| *k.id != **key_id);
                if o.runtime_admin_keys.len() == before {
                    if !configured_ids(&o.admin_keys).any(|id| id == *key_id) {
                        return Err(format!(
                            "No admin key with id '{}'.",
                            crate::excerpt(key_id, 64)
                        ));
                    }
                    o.deleted_admin_keys.push(key_id.as_str().into());
                }
            }
        }
        check_reroutes(o)
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

/// A reroute target must not share (as the file's check says).
fn check_reroutes(org: &Org) -> Result<(), String> {
    for p in org.projects.iter().filter(|p| p.active()) {
        let target = p.reroute_to.and_then(|t| org.projects.get(t));
        if let Some(t) = target.filter(|t| t.shares) {
            return Err(format!(
                "Project {} is the reroute target of project {} and must not share its traffic.",
                t.id, p.id
            ));
        }
        if p.privacy_guard == Guard::Reroute && target.is_none() {
            return Err(format!(
                "Project {}: privacy_guard \"reroute\" needs reroute_to.",
                p.id
            ));
        }
    }
    Ok(())
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
