//! The dashboard's live part as HTML: numbers, bars and the 30-day chart
//! (SVG) rendered on the server, so the page reads with scripts off; the
//! live events send the same render again.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::super::auth::Admin;
use super::super::Gateway;
use crate::alerts::{clock_time, projected_exhaustion};
use crate::catalog::format_usd;
use crate::day::Day;
use crate::store::{DailyTotal, Record, UsageRow};

/// HTML-escaped text.
pub(super) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// 1234567 -> "1,234,567".
pub(super) fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Dollars for people; the exact figure is in `title`. To the cent from
/// $10 ("$12.35"); below, to the micro-dollar without trailing zeros, so
/// that small overage shows ("$0.003075", "$1.50"); an amount under half a
/// micro-dollar is "<$0.000001".
fn dollars(pico: u64) -> String {
    const PICO_PER_DOLLAR: u128 = 1_000_000_000_000;
    let pico = u128::from(pico);
    if pico >= 10 * PICO_PER_DOLLAR {
        let cents = (pico + 5_000_000_000) / 10_000_000_000;
        return format!("${}.{:02}", cents / 100, cents % 100);
    }
    let micro = (pico + 500_000) / 1_000_000;
    if micro == 0 && pico > 0 {
        return "<$0.000001".into();
    }
    let fraction = format!("{:06}", micro % 1_000_000);
    let trimmed = fraction.trim_end_matches('0');
    let shown = if trimmed.len() < 2 {
        &fraction[..2]
    } else {
        trimmed
    };
    format!("${}.{shown}", micro / 1_000_000)
}

/// The list price a token of group `g` costs org `org` today: its calls'
/// tokens (input, cached input, output) at their models' list prices, over
/// their count; the price of the group's first model before any call.
fn list_price(config: &crate::config::Config, by_model: &[UsageRow], org: &str, g: usize) -> u64 {
    let catalog = &config.catalog;
    let (mut pico, mut tokens) = (0u128, 0u128);
    for r in by_model.iter().filter(|r| r.org == org) {
        let Some(model) = r.model.as_deref().and_then(|m| catalog.lookup(m).ok()) else {
            continue;
        };
        if model.group_index() != Some(g) {
            continue;
        }
        let p = model.prices();
        let uncached = r.input_tokens.saturating_sub(r.input_cached_tokens);
        pico += u128::from(uncached) * u128::from(p.input)
            + u128::from(r.input_cached_tokens) * u128::from(p.cached_input)
            + u128::from(r.output_tokens) * u128::from(p.output);
        tokens += u128::from(r.input_tokens) + u128::from(r.output_tokens);
    }
    if tokens == 0 {
        return catalog
            .models
            .iter()
            .find(|m| m.group == Some(g))
            .map_or(0, |m| m.prices.input);
    }
    u64::try_from(pico / tokens).unwrap_or(u64::MAX)
}

/// A number with its exact value in `data-value`, for programs and tests.
fn number(metric: &str, org: &str, group: &str, value: u64) -> String {
    format!(
        "<span class=\"num\" data-metric=\"{metric}\" data-org=\"{}\" data-group=\"{}\" data-value=\"{value}\">{}</span>",
        esc(org),
        esc(group),
        grouped(value)
    )
}

fn money(metric: &str, org: &str, group: &str, pico: u64) -> String {
    format!(
        "<span class=\"num\" data-metric=\"{metric}\" data-org=\"{}\" data-group=\"{}\" data-value=\"{pico}\" title=\"{}\">{}</span>",
        esc(org),
        esc(group),
        format_usd(u128::from(pico)),
        dollars(pico)
    )
}

fn duration(secs: u64) -> String {
    format!(
        "{}h {:02}m {:02}s",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// Today's per-row usage of one org, merged over the free and billed lanes.
#[derive(Default)]
pub(super) struct Line {
    pub(super) requests: u64,
    pub(super) input: u64,
    pub(super) output: u64,
    pub(super) free: u64,
    pub(super) billed: u64,
    pub(super) cost: u64,
    pub(super) refused: u64,
    pub(super) errors: u64,
}

pub(super) fn lines(
    rows: &[UsageRow],
    org: &str,
    key: impl Fn(&UsageRow) -> Option<String>,
) -> BTreeMap<String, Line> {
    let mut out: BTreeMap<String, Line> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.org == org) {
        let line = out.entry(key(r).unwrap_or_default()).or_default();
        // Saturating: a ledger can hold absurd numbers an older version
        // took from a misbehaving upstream.
        let tokens = r.input_tokens.saturating_add(r.output_tokens);
        line.requests = line.requests.saturating_add(r.num_model_requests);
        line.input = line.input.saturating_add(r.input_tokens);
        line.output = line.output.saturating_add(r.output_tokens);
        if r.lane.as_deref() == Some("free") {
            line.free = line.free.saturating_add(tokens);
        } else {
            line.billed = line.billed.saturating_add(tokens);
        }
        line.cost = line.cost.saturating_add(r.cost_pico);
        line.refused = line.refused.saturating_add(r.refused);
        line.errors = line.errors.saturating_add(r.errors);
    }
    out
}

pub(super) fn table(out: &mut String, caption: &str, first: &str, lines: &BTreeMap<String, Line>) {
    let _ = write!(
        out,
        "<div class=\"scroll\"><table><caption>{}</caption><thead><tr><th scope=\"col\">{}</th>\
<th scope=\"col\">Requests</th><th scope=\"col\">Input</th><th scope=\"col\">Output</th>\
<th scope=\"col\">Free tokens</th><th scope=\"col\">Billed tokens</th><th scope=\"col\">Cost</th>\
<th scope=\"col\">Refused</th><th scope=\"col\">Errors</th></tr></thead><tbody>",
        esc(caption),
        esc(first)
    );
    if lines.is_empty() {
        out.push_str("<tr><td colspan=\"9\" class=\"empty\">No calls.</td></tr>");
    }
    for (name, l) in lines {
        let _ = write!(
            out,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td title=\"{}\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(name),
            grouped(l.requests),
            grouped(l.input),
            grouped(l.output),
            grouped(l.free),
            grouped(l.billed),
            format_usd(u128::from(l.cost)),
            dollars(l.cost),
            grouped(l.refused),
            grouped(l.errors)
        );
    }
    out.push_str("</tbody></table></div>");
}

/// A bar of `value` out of `max`, as SVG (no inline styles: the page's CSP forbids them).
fn bar(value: u64, max: u64, reserved: u64) -> String {
    let width = |n: u64| {
        if max == 0 {
            0
        } else {
            (u128::from(n.min(max)) * 1000 / u128::from(max)) as u64
        }
    };
    let used = width(value);
    let held = width(value.saturating_add(reserved)).saturating_sub(used);
    format!(
        "<svg class=\"bar\" viewBox=\"0 0 1000 20\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{} percent used\">\
<rect class=\"bar-bg\" width=\"1000\" height=\"20\"/><rect class=\"bar-used\" width=\"{used}\" height=\"20\"/>\
<rect class=\"bar-held\" x=\"{used}\" width=\"{held}\" height=\"20\"/></svg>",
        used / 10
    )
}

/// The last 30 days of one org: free and billed tokens stacked, cost as a line.
fn chart(days: &[DailyTotal], org: &str, today: Day) -> String {
    let first = Day(today.0 - 29);
    let mut per_day = vec![(0u64, 0u64, 0u64); 30];
    for d in days
        .iter()
        .filter(|d| d.org == org && d.day >= first && d.day <= today)
    {
        let slot = &mut per_day[(d.day.0 - first.0) as usize];
        slot.0 = slot.0.saturating_add(d.free_tokens);
        slot.1 = slot.1.saturating_add(d.billed_tokens);
        slot.2 = slot.2.saturating_add(d.cost_pico);
    }
    let max_tokens = per_day
        .iter()
        .map(|d| d.0.saturating_add(d.1))
        .max()
        .unwrap_or(0)
        .max(1);
    // A bar's height: `value` of `max` in `h`, in u128 so no product overflows.
    let scale = |value: u64, max: u64, h: u64| {
        u64::try_from(u128::from(value) * u128::from(h) / u128::from(max.max(1))).unwrap_or(h)
    };
    let max_cost = per_day.iter().map(|d| d.2).max().unwrap_or(0).max(1);
    // The plot is `w` by `h`, `left` in from the tokens' axis; the cost's
    // axis is on its right, the days below it.
    let (w, h, slot, left, top) = (600u64, 160u64, 20u64, 64u64, 24u64);
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {} {}\" role=\"img\" aria-label=\"Free and billed tokens and cost, last 30 days\">",
        left + w + 72,
        top + h + 24
    );
    for (i, share) in [0u64, 1, 2].into_iter().enumerate() {
        // Gridlines and ticks at 0, half and the most.
        let y = top + h - h * share / 2;
        let tokens =
            u64::try_from(u128::from(max_tokens) * u128::from(share) / 2).unwrap_or(max_tokens);
        let cost = u64::try_from(u128::from(max_cost) * u128::from(share) / 2).unwrap_or(max_cost);
        let _ = write!(
            svg,
            "<line class=\"c-grid\" x1=\"{left}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\"/>\
<text class=\"c-label end\" x=\"{}\" y=\"{}\" data-axis=\"tokens\">{}</text>\
<text class=\"c-label\" x=\"{}\" y=\"{}\" data-axis=\"cost\">{}</text>",
            left + w,
            left - 6,
            y + 4,
            short(tokens),
            left + w + 6,
            y + 4,
            if i == 0 {
                "$0".to_owned()
            } else {
                dollars(cost)
            }
        );
    }
    let _ = write!(
        svg,
        "<line class=\"c-axis\" x1=\"{left}\" x2=\"{left}\" y1=\"{top}\" y2=\"{}\"/>\
<line class=\"c-axis\" x1=\"{left}\" x2=\"{}\" y1=\"{}\" y2=\"{}\"/>\
<text class=\"c-label end\" x=\"{}\" y=\"{}\">tokens</text><text class=\"c-label\" x=\"{}\" y=\"{}\">cost</text>\
<g transform=\"translate({left},{top})\">",
        top + h,
        left + w,
        top + h,
        top + h,
        left - 6,
        top - 12,
        left + w + 6,
        top - 12,
    );
    let mut cost_points = Vec::new();
    for (i, (free, billed, cost)) in per_day.iter().enumerate() {
        let x = i as u64 * slot;
        let free_h = scale(*free, max_tokens, h);
        let billed_h = scale(*billed, max_tokens, h).min(h - free_h);
        let day = Day(first.0 + i as i64);
        let _ = write!(
            svg,
            "<g><title>{day}: {} free, {} billed, {}</title>\
<rect class=\"c-free\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{free_h}\"/>\
<rect class=\"c-billed\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{billed_h}\"/></g>",
            grouped(*free),
            grouped(*billed),
            dollars(*cost),
            x + 2,
            h - free_h,
            slot - 4,
            x + 2,
            h - free_h - billed_h,
            slot - 4
        );
        cost_points.push(format!(
            "{},{}",
            x + slot / 2,
            h - scale(*cost, max_cost, h)
        ));
    }
    let middle = Day(first.0 + 15);
    let _ = write!(
        svg,
        "<polyline class=\"c-cost\" points=\"{}\"/></g>\
<text x=\"{left}\" y=\"{}\" class=\"c-label\">{first}</text>\
<text x=\"{}\" y=\"{}\" class=\"c-label mid\">{middle}</text>\
<text x=\"{}\" y=\"{}\" class=\"c-label end\">{today}</text></svg>",
        cost_points.join(" "),
        top + h + 18,
        left + 15 * slot + slot / 2,
        top + h + 18,
        left + w,
        top + h + 18
    );
    svg
}

/// The last reconciliation with the upstreams' books (the platform's
/// admin only: the books are the upstream organization's).
fn reconciliation(out: &mut String, gateway: &Gateway) {
    let last = gateway.reconciled.lock().ok().and_then(|l| l.clone());
    let Some(last) = last else {
        return;
    };
    let _ = write!(
        out,
        "<section class=\"reconciled\"><h2>Reconciliation with the upstreams' books</h2><p class=\"meta\">{} (UTC), checked at {} UTC: ",
        last.day,
        clock_time(last.at_ms)
    );
    match &last.report {
        Err(e) => {
            let _ = write!(out, "<span class=\"error\" data-metric=\"reconciled\" data-value=\"error\">not done: {}</span></p>", esc(e));
        }
        Ok(r) => {
            let differing = r.usage.iter().filter(|l| l.differs).count()
                + r.costs.iter().filter(|c| c.differs).count();
            let (value, text) = if r.differs {
                (
                    "differs",
                    format!("{differing} line(s) differ beyond {}%", r.tolerance_percent),
                )
            } else {
                (
                    "agrees",
                    format!(
                        "the ledger agrees with {} within {}%",
                        r.upstreams.join(", "),
                        r.tolerance_percent
                    ),
                )
            };
            let _ = write!(
                out,
                "<span data-metric=\"reconciled\" data-value=\"{value}\">{}</span> (<code>tokenwarden reconcile --day {}</code> shows every line).</p>",
                esc(&text),
                last.day
            );
        }
    }
    out.push_str("</section>");
}

/// A count for an axis: 950, 12k, 1.5M.
fn short(n: u64) -> String {
    match n {
        0..=999 => n.to_string(),
        1_000..=999_999 => format!("{}k", (n + 500) / 1000),
        _ => {
            let tenths = (n + 50_000) / 100_000;
            if tenths.is_multiple_of(10) {
                format!("{}M", tenths / 10)
            } else {
                format!("{}.{}M", tenths / 10, tenths % 10)
            }
        }
    }
}

/// What the live part shows from the ledger, read before it is rendered.
pub struct LiveData {
    by_project: Vec<UsageRow>,
    by_key: Vec<UsageRow>,
    by_model: Vec<UsageRow>,
    by_sharing: Vec<UsageRow>,
    daily: Vec<DailyTotal>,
    history: Vec<DailyTotal>,
    recent: Vec<Record>,
    /// Captured calls kept, per org (0 for an org that does not capture).
    captured: Vec<u64>,
    forwarded: Vec<crate::store::Forwarded>,
    batches: Vec<super::batches::Shown>,
}

/// Read what the live part shows `admin` (a part that cannot be read shows
/// empty). The day's tables hold every org; [`render_live`] shows only the
/// admin's.
pub async fn live_data(gateway: &Gateway, admin: &Admin) -> LiveData {
    let only = match admin {
        Admin::Platform => None,
        Admin::Org(org) => Some(&**org),
    };
    let today = gateway.today();
    let start_ms = today.start_unix() * 1000;
    let end_ms = start_ms + 86_400_000;
    let store = &gateway.store;
    let usage = |group_by: &'static [&'static str]| async move {
        store
            .usage_rows(start_ms, end_ms, 86_400_000, group_by)
            .await
            .unwrap_or_default()
    };
    let live = gateway.live();
    let mut captured = Vec::with_capacity(live.config.orgs.len());
    for org in &live.config.orgs {
        captured.push(if org.capture && admin.sees(&org.name) {
            store.count_captures(&org.name).await.unwrap_or(0)
        } else {
            0
        });
    }
    let seen: Vec<String> = live
        .config
        .orgs
        .iter()
        .filter(|o| !o.retired && admin.sees(&o.name))
        .map(|o| o.name.to_string())
        .collect();
    LiveData {
        by_project: usage(&["project_id", "lane"]).await,
        by_key: usage(&["api_key_id", "lane"]).await,
        by_model: usage(&["model", "lane"]).await,
        by_sharing: usage(&["sharing"]).await,
        daily: store.daily(today).await.unwrap_or_default(),
        history: store
            .daily_range(Day(today.0 - 29), today)
            .await
            .unwrap_or_default(),
        recent: store.recent_for(20, only).await.unwrap_or_default(),
        captured,
        forwarded: store
            .recent_forwarded_for(20, only)
            .await
            .unwrap_or_default(),
        batches: super::batches::read(gateway, &seen).await,
    }
}

/// The page's live part as `admin` sees it (every org, or its own):
/// everything the server-sent events replace.
pub fn render_live(gateway: &Gateway, data: &LiveData, admin: &Admin) -> String {
    let live = gateway.live();
    let config = &live.config;
    let now_ms = gateway.clock.now_ms();
    let today = gateway.today();
    let reset = gateway.seconds_to_reset();
    let LiveData {
        by_project,
        by_key,
        by_model,
        by_sharing,
        daily,
        history,
        recent,
        captured,
        forwarded: forwarded_rows,
        batches,
    } = data;
    let mut alerts = gateway.alerts.today(today);
    alerts.retain(|a| admin.sees(&a.org));
    // Retired orgs (gone from the configuration) are not shown.
    let shown: Vec<(usize, &crate::config::Org)> = config
        .orgs
        .iter()
        .enumerate()
        .filter(|(_, org)| !org.retired && admin.sees(&org.name))
        .collect();

    let mut out = String::with_capacity(32 * 1024);
    let _ = write!(
        out,
        "<p class=\"when\">{today}, {} UTC. Allowances reset at 00:00 UTC, in \
<span data-reset-at=\"{}\">{}</span>.</p>",
        clock_time(now_ms),
        now_ms + reset as i64 * 1000,
        duration(reset)
    );
    if shown.is_empty() {
        out.push_str("<p>No organizations are configured.</p>");
    }
    for &(o, org) in &shown {
        let name = &*org.name;
        let eligible = gateway.org_gets_free_tokens(config, o);
        let _ = write!(
            out,
            "<section class=\"org\" data-org=\"{}\"><h2>{}</h2><p class=\"meta\">tier {} · sharing {} · {}</p>",
            esc(name),
            esc(name),
            org.tier,
            match org.sharing {
                crate::config::OrgSharing::All => "all",
                crate::config::OrgSharing::Selected => "selected",
                crate::config::OrgSharing::Disabled => "disabled",
            },
            if eligible {
                "gets free tokens today"
            } else {
                "no free tokens (not eligible, not sharing, or the program is not running)"
            }
        );
        // Shared against private tokens today, as each call was recorded.
        let projects = lines(by_project, name, |r| r.project_id.clone());
        let sharing = lines(by_sharing, name, |r| r.sharing.clone());
        let tokens_of = |kind: &str| {
            sharing
                .get(kind)
                .map_or(0, |l| l.input.saturating_add(l.output))
        };
        let (shared, private) = (tokens_of("shared"), tokens_of("private"));
        let _ = write!(
            out,
            "<p class=\"meta\">Shared tokens today: {} · private: {}</p>",
            number("shared-tokens", name, "", shared),
            number("private-tokens", name, "", private)
        );
        if org.capture {
            let kept = captured.get(o).copied().unwrap_or(0);
            let _ = write!(
                out,
                "<p class=\"meta\">Captured calls kept: {} (retention {} days; <code>tokenwarden export --org {}</code>)</p>",
                number("captured", name, "", kept),
                org.capture_retention_days,
                esc(name)
            );
        }
        out.push_str("<div class=\"groups\">");
        for (g, group) in config.catalog.groups.iter().enumerate() {
            let state = gateway.pool_state(config, o, g);
            let total = daily
                .iter()
                .find(|d| d.org == name && *d.group == *group.name);
            let billed = total.map_or(0, |t| t.billed_tokens);
            let cost = total.map_or(0, |t| t.cost_pico);
            let gname = &*group.name;
            let overage =
                crate::alerts::projected_overage(state.used, billed, state.cap, today, now_ms)
                    .map(|tokens| tokens.saturating_mul(list_price(config, by_model, name, g)));
            let projection = match projected_exhaustion(state.used, state.cap, today, now_ms) {
                _ if state.cap == 0 => "no allowance".to_owned(),
                _ if state.used >= state.cap => "used up".to_owned(),
                Some(at) => format!("at {} UTC", clock_time(at)),
                None if state.used == 0 => "no use yet".to_owned(),
                None => "not before the reset".to_owned(),
            };
            let _ = write!(
                out,
                "<article class=\"group\" data-org=\"{}\" data-group=\"{}\"><h3>{}</h3>{}\
<dl><div><dt>Free used</dt><dd>{} of {}</dd></div>\
<div><dt>Free left</dt><dd>{}</dd></div>\
<div><dt>Reserved in flight</dt><dd>{}</dd></div>\
<div><dt>Runs out</dt><dd data-metric=\"projection\" data-org=\"{}\" data-group=\"{}\">{}</dd></div>\
<div><dt>Billed tokens today</dt><dd>{}</dd></div>\
<div><dt>Cost today</dt><dd>{}</dd></div>\
<div><dt title=\"Billed by 00:00 UTC at today's pace, at the list prices of today's models\">Overage by 00:00 (est.)</dt><dd>{}</dd></div></dl></article>",
                esc(name),
                esc(gname),
                esc(gname),
                bar(state.used, state.cap, state.reserved),
                number("free-used", name, gname, state.used),
                number("free-cap", name, gname, state.cap),
                number("free-left", name, gname, state.left()),
                number("reserved", name, gname, state.reserved),
                esc(name),
                esc(gname),
                esc(&projection),
                number("billed-tokens", name, gname, billed),
                money("cost", name, gname, cost),
                overage.map_or_else(
                    || "no use yet".to_owned(),
                    |pico| money("overage-estimate", name, gname, pico)
                ),
            );
        }
        out.push_str("</div>");
        let outside = daily.iter().find(|d| d.org == name && d.group.is_empty());
        if let Some(t) = outside {
            let _ = write!(
                out,
                "<p class=\"meta\">Models outside the program today: {} tokens, {}</p>",
                number("billed-tokens", name, "none", t.billed_tokens),
                money("cost", name, "none", t.cost_pico)
            );
        }
        table(&mut out, "Today by project", "Project", &projects);
        // Keys made through the admin API show their names (never values).
        let key_names: BTreeMap<&str, &str> = org
            .projects
            .iter()
            .flat_map(|p| p.runtime_keys.iter())
            .map(|k| (&*k.id, k.name.as_str()))
            .collect();
        table(
            &mut out,
            "Today by key",
            "Key",
            &lines(by_key, name, |r| {
                let id = r.api_key_id.clone()?;
                Some(match key_names.get(id.as_str()) {
                    Some(key) => format!("{id} ({key})"),
                    None => id,
                })
            }),
        );
        table(
            &mut out,
            "Today by model",
            "Model",
            &lines(by_model, name, |r| r.model.clone()),
        );
        let findings = gateway.metrics.findings_by_kind(o);
        if !findings.is_empty() {
            out.push_str("<p class=\"meta\">Privacy guard findings since start: ");
            let parts: Vec<String> = findings
                .iter()
                .map(|(kind, n)| format!("{} {}", esc(kind), number("findings", name, kind, *n)))
                .collect();
            out.push_str(&parts.join(" · "));
            out.push_str("</p>");
        }
        let free_left = |s: &super::batches::Shown| {
            let group = s
                .batch
                .model
                .as_deref()
                .and_then(|m| config.catalog.lookup(m).ok())
                .and_then(|m| m.group_index());
            group.map_or(0, |g| {
                let state = gateway.pool_state(config, o, g);
                let reserve = s
                    .reserve_percent
                    .map_or(0, |r| state.cap / 100 * u64::from(r));
                state.left().saturating_sub(reserve)
            })
        };
        super::batches::render(&mut out, name, batches, by_key, free_left);
        let _ = write!(
            out,
            "<figure><figcaption>Last 30 days: <span class=\"key c-free\">free tokens</span> \
<span class=\"key c-billed\">billed tokens</span> <span class=\"key c-cost\">cost</span></figcaption>{}</figure></section>",
            chart(history, name, today)
        );
    }

    if matches!(admin, Admin::Platform) {
        reconciliation(&mut out, gateway);
    }
    out.push_str("<section><h2>Alerts today</h2>");
    if alerts.is_empty() {
        out.push_str(
            "<p class=\"empty\" data-metric=\"alerts\" data-value=\"0\">None fired today.</p>",
        );
    } else {
        let _ = write!(
            out,
            "<ul class=\"alerts\" data-metric=\"alerts\" data-value=\"{}\">",
            alerts.len()
        );
        for a in &alerts {
            let _ = write!(
                out,
                "<li data-rule=\"{}\"><time>{}</time> {}</li>",
                esc(&a.rule),
                clock_time(a.fired_ms),
                esc(&a.text)
            );
        }
        out.push_str("</ul>");
    }
    out.push_str("</section>");

    out.push_str(
        "<section><h2>Latest requests</h2><div class=\"scroll\"><table class=\"recent\"><thead><tr>\
<th scope=\"col\">#</th><th scope=\"col\">Time</th><th scope=\"col\">Org</th><th scope=\"col\">Project</th>\
<th scope=\"col\">Key id</th><th scope=\"col\">Model</th><th scope=\"col\">Decision</th><th scope=\"col\">Status</th>\
<th scope=\"col\">Input</th><th scope=\"col\">Output</th><th scope=\"col\">Lane</th><th scope=\"col\">Cost</th>\
<th scope=\"col\">Latency</th></tr></thead><tbody>",
    );
    if recent.is_empty() {
        out.push_str("<tr><td colspan=\"13\" class=\"empty\">No calls yet.</td></tr>");
    }
    for r in recent.iter().filter(|r| admin.sees(&r.org)) {
        let model = if r.served_model == r.requested_model {
            esc(&r.served_model)
        } else {
            format!("{} → {}", esc(&r.requested_model), esc(&r.served_model))
        };
        let lane = match (r.state.as_str(), r.free) {
            ("pending", _) => "in flight",
            (_, true) => "free",
            _ if r.decision == "refused" => "-",
            _ => "billed",
        };
        let _ = write!(
            out,
            "<tr data-id=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{model}</td><td>{}</td><td>{}</td>\
<td>{}</td><td>{}{}</td><td>{lane}</td><td>{}</td><td>{} ms</td></tr>",
            r.id,
            r.id,
            clock_time(r.started_ms),
            esc(&r.org),
            esc(&r.project),
            esc(&r.key_id),
            esc(&r.decision),
            if r.state == "pending" { "-".to_owned() } else { r.status.to_string() },
            grouped(r.input),
            grouped(r.output),
            if r.estimated { " (est.)" } else { "" },
            dollars(r.cost_pico),
            r.latency_ms
        );
    }
    out.push_str("</tbody></table></div></section>");
    forwarded(&mut out, &shown, forwarded_rows, admin);
    out
}

/// The latest calls that projects' `forward` rules let past the meter:
/// what the operator opened, and who used it (shown once any project
/// forwards or such a call is in the ledger).
fn forwarded(
    out: &mut String,
    orgs: &[(usize, &crate::config::Org)],
    rows: &[crate::store::Forwarded],
    admin: &Admin,
) {
    let rows: Vec<&crate::store::Forwarded> = rows.iter().filter(|f| admin.sees(&f.org)).collect();
    let any_rule = orgs
        .iter()
        .any(|(_, o)| o.projects.iter().any(|p| !p.forward.is_empty()));
    if rows.is_empty() && !any_rule {
        return;
    }
    let _ = write!(
        out,
        "<section><h2>Forwarded past the meter</h2><div class=\"scroll\"><table class=\"forwarded\" data-metric=\"forwarded\" data-value=\"{}\"><thead><tr>\
<th scope=\"col\">Time</th><th scope=\"col\">Org</th><th scope=\"col\">Project</th><th scope=\"col\">Key id</th>\
<th scope=\"col\">Method</th><th scope=\"col\">Path</th><th scope=\"col\">Status</th><th scope=\"col\">Latency</th></tr></thead><tbody>",
        rows.len()
    );
    if rows.is_empty() {
        out.push_str("<tr><td colspan=\"8\" class=\"empty\">None yet.</td></tr>");
    }
    for f in rows {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>/v1{}</td><td>{}</td><td>{} ms</td></tr>",
            clock_time(f.started_ms),
            esc(&f.org),
            esc(&f.project),
            esc(&f.key_id),
            f.method,
            esc(&f.path),
            f.status,
            f.latency_ms
        );
    }
    out.push_str("</tbody></table></div></section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_numbers_grouped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(1_234_567), "1,234,567");
        assert_eq!(grouped(100), "100");
        assert_eq!(short(950), "950");
        assert_eq!(short(12_400), "12k");
        assert_eq!(short(1_000_000), "1M");
        assert_eq!(short(1_540_000), "1.5M");
        assert_eq!(dollars(12_345_678_901_234), "$12.35");
        assert_eq!(dollars(1_234_567_890_123), "$1.234568");
        assert_eq!(dollars(1_500_000_000_000), "$1.50");
        assert_eq!(dollars(3_075_000_000), "$0.003075");
        assert_eq!(dollars(0), "$0.00");
        assert_eq!(dollars(400_000), "<$0.000001");
    }
}
