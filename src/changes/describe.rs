//! Changes for people: the dashboard's history, and `check-config`'s list
//! of where the running configuration differs from the file.

use serde::Serialize;

use super::{replay, Change, Recorded};
use crate::config::{Config, OrgSharing};

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
