//! Positions that outlive a configuration.
//!
//! Orgs, projects and groups are named by their position (the meter's pool
//! keys, the metrics' counters, a call in flight). A configuration that
//! replaces a running one (a reload, a change through the admin API) is
//! aligned to it first: every org, project and group the running one had
//! keeps its position, one that is gone keeps a retired placeholder there,
//! and new ones follow. So a position means the same name for the life of
//! the process.

use std::sync::Arc;

use super::{Alerts, Config, Fallback, Guard, Org, OrgSharing, Policy, Project};
use crate::catalog::{Catalog, Group};

/// `items` reordered so that each of `previous` keeps its position (a
/// `retired` placeholder where it is gone), new ones after them; and the
/// new position of each item as it was given.
fn align<T>(
    items: Vec<T>,
    previous: &[Arc<str>],
    name: impl Fn(&T) -> &str,
    retired: impl Fn(&Arc<str>) -> T,
) -> (Vec<T>, Vec<usize>) {
    let mut slots: Vec<Option<T>> = previous.iter().map(|_| None).collect();
    let mut moved = Vec::with_capacity(items.len());
    for item in items {
        match previous.iter().position(|p| **p == *name(&item)) {
            Some(at) if slots[at].is_none() => {
                slots[at] = Some(item);
                moved.push(at);
            }
            _ => {
                moved.push(slots.len());
                slots.push(Some(item));
            }
        }
    }
    let aligned = slots
        .into_iter()
        .zip(previous.iter().map(Some).chain(std::iter::repeat(None)))
        .filter_map(|(slot, was)| slot.or_else(|| was.map(&retired)))
        .collect();
    (aligned, moved)
}

impl Org {
    /// The placeholder of an org no longer configured.
    fn retired(name: &Arc<str>, alerts: &Alerts) -> Org {
        Org {
            name: name.clone(),
            tier: 1,
            sharing: OrgSharing::Disabled,
            eligible: false,
            capture: false,
            capture_retention_days: super::DEFAULT_CAPTURE_RETENTION_DAYS,
            alerts: alerts.clone(),
            projects: Vec::new(),
            admin_keys: Vec::new(),
            runtime_admin_keys: Vec::new(),
            deleted_admin_keys: Vec::new(),
            retired: true,
        }
    }
}

impl Project {
    /// The placeholder of a project no longer configured: no keys, so no
    /// call reaches it.
    pub(crate) fn retired(name: &Arc<str>) -> Project {
        Project {
            id: name.clone(),
            name: name.clone(),
            selected: false,
            created_at: 0,
            archived_at: None,
            runtime_keys: Arc::default(),
            deleted_keys: Vec::new(),
            models_denied: false,
            shares: false,
            upstream: String::new(),
            on_exhausted: Policy::Block,
            downgrade_fallback: Fallback::Block,
            keys: Vec::new(),
            privacy_guard: Guard::Off,
            reroute_to: None,
            forward: Vec::new(),
            models: Vec::new(),
            retired: true,
            batch_spend: super::BatchSpend::Free,
            batch_reserve_percent: super::DEFAULT_BATCH_RESERVE_PERCENT,
            batch_concurrency: super::DEFAULT_BATCH_CONCURRENCY,
        }
    }
}

impl Config {
    /// Give every org, project and group of `previous` its position there.
    pub fn align_to(&mut self, previous: &Config) {
        let names: Vec<Arc<str>> = previous.orgs.iter().map(|o| o.name.clone()).collect();
        let alerts = self.alerts.clone();
        let orgs = std::mem::take(&mut self.orgs);
        let (mut orgs, _) = align(orgs, &names, |o| &o.name, |n| Org::retired(n, &alerts));
        for (org, was) in orgs.iter_mut().zip(&previous.orgs) {
            let ids: Vec<Arc<str>> = was.projects.iter().map(|p| p.id.clone()).collect();
            let projects = std::mem::take(&mut org.projects);
            let (mut projects, moved) = align(projects, &ids, |p| &p.id, Project::retired);
            for project in &mut projects {
                project.reroute_to = project.reroute_to.and_then(|i| moved.get(i).copied());
            }
            org.projects = projects;
        }
        self.orgs = orgs;
        let groups: Vec<Arc<str>> = previous
            .catalog
            .groups
            .iter()
            .map(|g| g.name.clone())
            .collect();
        self.catalog.align_groups(&groups);
    }
}

impl Catalog {
    /// Give each group of `previous` its position; a group that is gone
    /// keeps a placeholder with no allowance and no models.
    pub fn align_groups(&mut self, previous: &[Arc<str>]) {
        let groups = std::mem::take(&mut self.groups);
        let (groups, moved) = align(
            groups,
            previous,
            |g| &g.name,
            |n| Group {
                name: n.clone(),
                daily_tokens: 0,
                daily_tokens_tiers_1_2: 0,
            },
        );
        self.groups = groups;
        for model in &mut self.models {
            model.group = model.group.and_then(|g| moved.get(g).copied());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<Arc<str>> {
        list.iter().map(|&n| Arc::from(n)).collect()
    }

    #[test]
    fn old_names_keep_their_places_and_new_ones_follow() {
        let items = vec!["d", "b", "a"];
        let (aligned, moved) = align(
            items,
            &names(&["a", "b", "c"]),
            |s| s,
            |n| {
                // A placeholder is marked so that the test can tell it.
                if &**n == "c" {
                    "c (retired)"
                } else {
                    "?"
                }
            },
        );
        assert_eq!(aligned, ["a", "b", "c (retired)", "d"]);
        assert_eq!(moved, [3, 1, 0], "d, b and a as they were given");
        let (aligned, moved) = align(vec!["x"], &[], |s| s, |_| "?");
        assert_eq!((aligned, moved), (vec!["x"], vec![0]));
    }
}
