//! The rules of changes, the replay and the list of differences.

use super::apply::MAX_KEYS;
use super::*;
use crate::config::{Guard, OrgSharing, Policy};

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
