//! The dashboard's settings panel: each org's data sharing (as OpenAI's
//! settings page has it) and each project's policies, as plain HTML forms,
//! and the history of what was changed at runtime (when, by whom, what).
//! The forms post to `/dashboard/settings/*` with the session's cookie and
//! the page's `Origin`; a change takes the same road as the admin API's
//! ([`crate::gateway::Gateway::change`]).

use std::fmt::Write as _;

use super::render::esc;
use crate::changes::{Change, Recorded};
use crate::config::{Fallback, Guard, Org, OrgSharing, Policy};
use crate::gateway::auth::Admin;
use crate::gateway::Live;

/// The panel for every org `admin` sees, with each org's history.
pub fn render(live: &Live, admin: &Admin, changes: &[Recorded]) -> String {
    let mut out = String::with_capacity(8 * 1024);
    for org in live
        .config
        .orgs
        .iter()
        .filter(|o| !o.retired && admin.sees(&o.name))
    {
        org_panel(&mut out, org, changes);
    }
    out
}

fn radio(name: &str, value: &str, label: &str, checked: bool) -> String {
    format!(
        "<label><input type=\"radio\" name=\"{name}\" value=\"{value}\"{}> {}</label>",
        if checked { " checked" } else { "" },
        esc(label)
    )
}

fn select<T: PartialEq + Copy + serde::Serialize>(
    name: &str,
    label: &str,
    id: &str,
    now: T,
    choices: &[T],
) -> String {
    let mut out = format!(
        "<label for=\"{id}\">{}</label><select id=\"{id}\" name=\"{name}\">",
        esc(label)
    );
    for &choice in choices {
        let value = serde_json::to_value(choice)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = write!(
            out,
            "<option value=\"{value}\"{}>{value}</option>",
            if choice == now { " selected" } else { "" }
        );
    }
    out.push_str("</select>");
    out
}

fn org_panel(out: &mut String, org: &Org, changes: &[Recorded]) {
    let name = esc(&org.name);
    let _ = write!(
        out,
        "<section class=\"settings\" data-settings=\"{name}\"><h2>Settings: {name}</h2>\
<form method=\"post\" action=\"/dashboard/settings/sharing\" class=\"sharing\">\
<input type=\"hidden\" name=\"org\" value=\"{name}\"><fieldset><legend>Data sharing</legend>{}{}{}",
        radio(
            "sharing",
            "disabled",
            "Disabled",
            org.sharing == OrgSharing::Disabled
        ),
        radio(
            "sharing",
            "all",
            "Enabled for all projects",
            org.sharing == OrgSharing::All
        ),
        radio(
            "sharing",
            "selected",
            "Enabled for selected projects",
            org.sharing == OrgSharing::Selected
        ),
    );
    out.push_str("<div class=\"projects\">");
    for p in org.projects.iter().filter(|p| p.active()) {
        let _ = write!(
            out,
            "<label><input type=\"checkbox\" name=\"project\" value=\"{}\"{}> {}</label>",
            esc(&p.id),
            if org.sharing == OrgSharing::Selected && p.selected {
                " checked"
            } else {
                ""
            },
            esc(&p.name)
        );
    }
    out.push_str("</div></fieldset><button type=\"submit\">Save data sharing</button></form>");
    for p in org.projects.iter().filter(|p| p.active()) {
        let id = esc(&p.id);
        let dom = format!("{}-{}", org.name, p.id)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect::<String>();
        let _ = write!(
            out,
            "<form method=\"post\" action=\"/dashboard/settings/project\" class=\"project\" data-project=\"{id}\">\
<input type=\"hidden\" name=\"org\" value=\"{name}\"><input type=\"hidden\" name=\"project\" value=\"{id}\">\
<fieldset><legend>Project {}</legend>{}{}{}</fieldset><button type=\"submit\">Save {}</button></form>",
            esc(&p.name),
            select(
                "on_exhausted",
                "When free tokens run out",
                &format!("{dom}-on-exhausted"),
                p.on_exhausted,
                &[Policy::Bill, Policy::Block, Policy::Downgrade, Policy::Clamp]
            ),
            select(
                "downgrade_fallback",
                "When the downgrade has no room",
                &format!("{dom}-fallback"),
                p.downgrade_fallback,
                &[Fallback::Block, Fallback::Bill]
            ),
            select(
                "privacy_guard",
                "Privacy guard",
                &format!("{dom}-guard"),
                p.privacy_guard,
                &[Guard::Off, Guard::Block, Guard::Reroute, Guard::Redact]
            ),
            esc(&p.name)
        );
    }
    history(out, org, changes);
    out.push_str("</section>");
}

/// What was changed at runtime in `org`, newest first.
fn history(out: &mut String, org: &Org, changes: &[Recorded]) {
    let mine: Vec<&Recorded> = changes
        .iter()
        .rev()
        .filter(|c| *c.org == *org.name && !matches!(c.change, Change::PlatformToken { .. }))
        .take(50)
        .collect();
    let _ = write!(
        out,
        "<div class=\"scroll\"><table class=\"history\" data-metric=\"changes\" data-value=\"{}\"><caption>Changes made at runtime</caption>\
<thead><tr><th scope=\"col\">When (UTC)</th><th scope=\"col\">Who</th><th scope=\"col\">What</th></tr></thead><tbody>",
        mine.len()
    );
    if mine.is_empty() {
        out.push_str("<tr><td colspan=\"3\" class=\"empty\">None: the configuration file's settings.</td></tr>");
    }
    for c in mine {
        let _ = write!(
            out,
            "<tr><td>{} {}</td><td>{}</td><td>{}</td></tr>",
            crate::day::Day::from_unix(c.at_ms.div_euclid(1000)),
            crate::alerts::clock_time(c.at_ms),
            esc(&c.actor),
            esc(&c.change.describe())
        );
    }
    out.push_str("</tbody></table></div>");
}

/// The change a posted sharing form asks for.
pub fn sharing_change(form: &[(String, String)]) -> Result<Change, String> {
    let value = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let sharing = match value("sharing") {
        Some("disabled") => OrgSharing::Disabled,
        Some("all") => OrgSharing::All,
        Some("selected") => OrgSharing::Selected,
        _ => return Err("Choose how the organization shares its data.".into()),
    };
    let project_ids = if sharing == OrgSharing::Selected {
        form.iter()
            .filter(|(k, _)| k == "project")
            .map(|(_, v)| v.clone())
            .collect()
    } else {
        Vec::new()
    };
    Ok(Change::DataSharing {
        sharing,
        project_ids,
    })
}

/// The change a posted project form asks for.
pub fn project_change(form: &[(String, String)]) -> Result<Change, String> {
    let value = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    fn parse<T: serde::de::DeserializeOwned>(
        v: Option<&str>,
        name: &str,
    ) -> Result<Option<T>, String> {
        v.map(|v| {
            serde_json::from_value(serde_json::Value::String(v.to_owned())).map_err(|_| {
                format!(
                    "{name}: {:?} is not one of the choices.",
                    crate::excerpt(v, 32)
                )
            })
        })
        .transpose()
    }
    Ok(Change::Project {
        project_id: value("project").ok_or("Which project?")?.to_owned(),
        name: None,
        on_exhausted: parse(value("on_exhausted"), "on_exhausted")?,
        downgrade_fallback: parse(value("downgrade_fallback"), "downgrade_fallback")?,
        privacy_guard: parse(value("privacy_guard"), "privacy_guard")?,
        reroute_to: None,
    })
}
