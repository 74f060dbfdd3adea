//! Changes made at runtime: an org's data sharing, a project's policies and
//! models, projects and keys made or removed through the admin API.
//!
//! The configuration file is the starting state; each change is kept in the
//! ledger (who made it, when) and applied on top of it, in order, so what
//! was changed at runtime wins over the file, survives a restart and a
//! reload, and reaches every replica that reads the same ledger. A change
//! that no longer applies (its project gone from the file) is skipped.

use serde::{Deserialize, Serialize};

use crate::config::{Config, Fallback, Guard, OrgSharing, Policy, RuntimeKey};
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

mod apply;
mod describe;
#[cfg(test)]
mod tests;

pub use apply::{MAX_ADMIN_KEYS, MAX_KEYS, MAX_PROJECTS};
pub use describe::differences;

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
