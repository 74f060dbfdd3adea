//! Applying a change: every rule is checked on the org as the change would
//! leave it, then the org is changed in place.

use std::sync::Arc;

use super::{configured_ids, Change, ModelMode};
use crate::config::{Config, Guard, Org, OrgSharing, Policy, Project};

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
