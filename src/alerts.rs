//! Alerts: a warning before a call gets billed.
//!
//! Rules are evaluated per org and group after every settled call: shares of
//! the free allowance used (50, 80, 95 and 100 percent by default), today's
//! pace using the allowance up before 00:00 UTC, and billed cost today above
//! an amount. Each rule fires at most once per org, group and day; what fired
//! is written to the store, so a restart does not fire it again.
//!
//! Evaluating is a few comparisons under a lock, on the settling path;
//! delivery is not. A fired alert is logged, counted, shown on the dashboard
//! and queued; a task of its own posts it to the webhook, retrying with
//! backoff, so a slow or dead receiver never delays a request.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::catalog::format_usd;
use crate::config::{Alerts, Secret};
use crate::day::Day;
use crate::FastMap;

/// An alert that fired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Fired {
    pub day: Day,
    pub fired_ms: i64,
    pub org: String,
    /// The program group, or `none` for models outside the program.
    pub group: String,
    /// `free_used_80`, `projected_exhaustion` or `billed_cost`.
    pub rule: String,
    /// A sentence for people (the webhook's Slack-compatible `text`).
    pub text: String,
    pub cap: u64,
    pub used: u64,
    pub billed_cost_pico: u64,
    /// When today's pace uses the allowance up (Unix ms), if it does.
    pub exhausted_at_ms: Option<i64>,
}

/// One pool as the rules see it, just after a call settled.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub org: &'a str,
    pub group: &'a str,
    pub day: Day,
    pub now_ms: i64,
    /// Today's cap; 0 when the org gets no free tokens in this group.
    pub cap: u64,
    /// Free tokens of settled calls.
    pub used: u64,
    /// The group's billed cost today.
    pub billed_cost_pico: u64,
    /// The call that led here was refused (free tokens spent, policy `block`).
    pub refused: bool,
}

/// When today's pace (free tokens used since 00:00 UTC) uses up `cap`, if
/// before the next reset. `None` with no use yet, or in the day's first
/// minute (too little to call it a pace).
pub fn projected_exhaustion(used: u64, cap: u64, day: Day, now_ms: i64) -> Option<i64> {
    let start_ms = day.start_unix() * 1000;
    let end_ms = start_ms + 86_400_000;
    let elapsed = now_ms - start_ms;
    if cap == 0 || used == 0 || elapsed < 60_000 {
        return None;
    }
    if used >= cap {
        return Some(now_ms);
    }
    let more_ms = u128::from(cap - used) * elapsed as u128 / u128::from(used);
    let at = now_ms.saturating_add(i64::try_from(more_ms).unwrap_or(i64::MAX));
    (at < end_ms).then_some(at)
}

/// The billed tokens of a group by 00:00 UTC if today's pace goes on:
/// today's tokens (free `used` and `billed`) grown at today's rate to the
/// end of the day, less the `cap`. `None` in the day's first minute or
/// before any use.
pub fn projected_overage(used: u64, billed: u64, cap: u64, day: Day, now_ms: i64) -> Option<u64> {
    let start_ms = day.start_unix() * 1000;
    let elapsed = u128::try_from(now_ms - start_ms).ok()?;
    let so_far = u128::from(used) + u128::from(billed);
    if so_far == 0 || elapsed < 60_000 {
        return None;
    }
    let by_midnight = so_far * 86_400_000 / elapsed.min(86_400_000);
    Some(u64::try_from(by_midnight.saturating_sub(u128::from(cap))).unwrap_or(u64::MAX))
}

/// The rules that hold for `view`, as (rule, text), whether or not they fired before.
pub fn holding(rules: &Alerts, view: &View<'_>) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if view.cap > 0 {
        for &percent in &rules.used_percent {
            if u128::from(view.used) * 100 >= u128::from(view.cap) * u128::from(percent) {
                out.push((
                    format!("free_used_{percent}"),
                    format!(
                        "{}: {percent}% of today's free {} tokens are used ({} of {}; {} left until 00:00 UTC).",
                        view.org,
                        view.group,
                        view.used,
                        view.cap,
                        view.cap.saturating_sub(view.used)
                    ),
                ));
            }
        }
        if rules.projected_exhaustion && view.used < view.cap {
            if let Some(at) = projected_exhaustion(view.used, view.cap, view.day, view.now_ms) {
                out.push((
                    "projected_exhaustion".to_owned(),
                    format!(
                        "{}: at today's pace the free {} tokens run out at {} UTC, before the reset ({} of {} used).",
                        view.org,
                        view.group,
                        clock_time(at),
                        view.used,
                        view.cap
                    ),
                ));
            }
        }
    }
    if rules.first_refusal && view.refused {
        out.push((
            "first_refusal".to_owned(),
            format!(
                "{}: a call was refused today in the {} group: the free tokens are spent ({} of {}) and its project's policy is block; more are refused until 00:00 UTC.",
                view.org, view.group, view.used, view.cap
            ),
        ));
    }
    if let Some(limit) = rules.billed_cost_above_pico {
        if view.billed_cost_pico > limit {
            out.push((
                "billed_cost".to_owned(),
                format!(
                    "{}: billed cost today in the {} group is {}, above {}.",
                    view.org,
                    view.group,
                    format_usd(u128::from(view.billed_cost_pico)),
                    format_usd(u128::from(limit))
                ),
            ));
        }
    }
    out
}

/// "HH:MM" of a Unix time in milliseconds, UTC.
pub fn clock_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}", secs / 3600, secs % 3600 / 60)
}

#[derive(Default)]
struct State {
    day: Option<Day>,
    /// (org, group, rule) fired today.
    fired: HashSet<(String, String, String)>,
    /// Today's alerts, oldest first (for the dashboard).
    today: Vec<Fired>,
    /// org -> group -> billed cost today (looked up by `&str`: a call
    /// allocates nothing here once its group has been seen).
    billed: FastMap<String, FastMap<String, u64>>,
}

impl State {
    fn roll(&mut self, day: Day) {
        if self.day != Some(day) {
            *self = State {
                day: Some(day),
                ..State::default()
            };
        }
    }
}

/// Which alerts fired today, and the billed cost they watch.
#[derive(Default)]
pub struct Engine {
    state: Mutex<State>,
}

impl Engine {
    /// Take what the store knows of `day`: alerts already fired and billed cost.
    pub fn restore(&self, day: Day, fired: Vec<Fired>, billed: Vec<(String, String, u64)>) {
        if let Ok(mut state) = self.state.lock() {
            state.roll(day);
            for f in fired {
                state
                    .fired
                    .insert((f.org.clone(), f.group.clone(), f.rule.clone()));
                state.today.push(f);
            }
            for (org, group, cost) in billed {
                let sum = state
                    .billed
                    .entry(org)
                    .or_default()
                    .entry(group)
                    .or_default();
                *sum = sum.saturating_add(cost);
            }
        }
    }

    /// Add a settled call's billed cost; returns the group's total today.
    pub fn add_billed(&self, day: Day, org: &str, group: &str, cost_pico: u64) -> u64 {
        let Ok(mut state) = self.state.lock() else {
            return 0;
        };
        state.roll(day);
        let groups = match state.billed.get_mut(org) {
            Some(groups) => groups,
            None => state.billed.entry(org.to_owned()).or_default(),
        };
        let total = match groups.get_mut(group) {
            Some(total) => total,
            None => groups.entry(group.to_owned()).or_default(),
        };
        *total = total.saturating_add(cost_pico);
        *total
    }

    /// The alerts that fire now for `view`: those that hold and have not fired today.
    pub fn evaluate(&self, rules: &Alerts, view: &View<'_>) -> Vec<Fired> {
        let holding = holding(rules, view);
        if holding.is_empty() {
            return Vec::new();
        }
        let Ok(mut state) = self.state.lock() else {
            return Vec::new();
        };
        state.roll(view.day);
        let mut out = Vec::new();
        for (rule, text) in holding {
            let key = (view.org.to_owned(), view.group.to_owned(), rule.clone());
            if state.fired.insert(key) {
                let fired = Fired {
                    day: view.day,
                    fired_ms: view.now_ms,
                    org: view.org.to_owned(),
                    group: view.group.to_owned(),
                    rule,
                    text,
                    cap: view.cap,
                    used: view.used,
                    billed_cost_pico: view.billed_cost_pico,
                    exhausted_at_ms: projected_exhaustion(
                        view.used,
                        view.cap,
                        view.day,
                        view.now_ms,
                    ),
                };
                state.today.push(fired.clone());
                out.push(fired);
            }
        }
        out
    }

    /// Today's alerts, newest first.
    pub fn today(&self, day: Day) -> Vec<Fired> {
        match self.state.lock() {
            Ok(state) if state.day == Some(day) => state.today.iter().rev().cloned().collect(),
            _ => Vec::new(),
        }
    }
}

/// The webhook's JSON body: Slack's `text` plus the structured fields.
pub fn payload(f: &Fired) -> serde_json::Value {
    serde_json::json!({
        "text": format!("tokenwarden: {}", f.text),
        "alert": {
            "rule": f.rule,
            "org": f.org,
            "group": f.group,
            "day": f.day.to_string(),
            "fired_at": f.fired_ms / 1000,
            "free_tokens_limit": f.cap,
            "free_tokens_used": f.used,
            "free_tokens_remaining": f.cap.saturating_sub(f.used),
            "billed_cost_usd": format_usd(u128::from(f.billed_cost_pico)).trim_start_matches('$'),
            "billed_cost_pico": f.billed_cost_pico,
            "projected_exhaustion_at": f.exhausted_at_ms.map(|ms| ms / 1000),
        }
    })
}

/// Hears how each alert's delivery ended: (alert, attempts, delivered).
pub type Outcome = Arc<dyn Fn(&Fired, u32, bool) + Send + Sync>;

/// The delivery side: a queue and the task that empties it.
pub struct Delivery {
    queue: tokio::sync::mpsc::Sender<(Fired, Secret, u32)>,
}

/// Alerts waiting for delivery beyond this are dropped (and logged): a dead
/// receiver must not grow memory without bound.
const QUEUE: usize = 1024;
/// Each attempt's time limit.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

impl Delivery {
    /// Start the task that posts alerts (on the current Tokio runtime).
    /// `done` hears of each alert's outcome.
    pub fn start(client: reqwest::Client, done: Outcome) -> Delivery {
        let (queue, mut rx) = tokio::sync::mpsc::channel::<(Fired, Secret, u32)>(QUEUE);
        tokio::spawn(async move {
            while let Some((fired, webhook, retries)) = rx.recv().await {
                // One task per alert: a receiver slow on one alert does not hold the next.
                let (client, done) = (client.clone(), done.clone());
                tokio::spawn(async move {
                    let (attempts, delivered) = post(&client, &webhook, &fired, retries).await;
                    done(&fired, attempts, delivered);
                });
            }
        });
        Delivery { queue }
    }

    /// Queue an alert for `webhook`, with up to `retries` further attempts; never waits.
    pub fn send(&self, fired: Fired, webhook: Secret, retries: u32) {
        if let Err(e) = self.queue.try_send((fired, webhook, retries)) {
            tracing::error!(error = %e, "alert queue full; an alert was not delivered");
        }
    }
}

/// Post with retries; returns (attempts, delivered). The URL is never logged.
async fn post(
    client: &reqwest::Client,
    webhook: &Secret,
    fired: &Fired,
    retries: u32,
) -> (u32, bool) {
    let body = payload(fired).to_string();
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=retries + 1 {
        let sent = client
            .post(webhook.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(ATTEMPT_TIMEOUT)
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => return (attempt, true),
            Ok(r) => {
                tracing::warn!(rule = %fired.rule, org = %fired.org, attempt, status = r.status().as_u16(), "alert webhook refused the alert");
            }
            Err(e) => {
                tracing::warn!(rule = %fired.rule, org = %fired.org, attempt, timeout = e.is_timeout(), "alert webhook unreachable");
            }
        }
        if attempt <= retries {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(60));
        }
    }
    tracing::error!(rule = %fired.rule, org = %fired.org, "alert not delivered after every retry");
    (retries + 1, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Day = Day(20_000);

    #[test]
    fn the_overage_at_todays_pace() {
        let noon = DAY.start_unix() * 1000 + 43_200_000;
        // Half the day, 600k used: 1.2M by midnight, 200k over a 1M cap.
        assert_eq!(
            projected_overage(600_000, 0, 1_000_000, DAY, noon),
            Some(200_000)
        );
        // Already over: 1M free and 100k billed by noon, 1.2M billed by midnight.
        assert_eq!(
            projected_overage(1_000_000, 100_000, 1_000_000, DAY, noon),
            Some(1_200_000)
        );
        assert_eq!(projected_overage(100_000, 0, 1_000_000, DAY, noon), Some(0));
        assert_eq!(projected_overage(0, 0, 1_000_000, DAY, noon), None);
        assert_eq!(
            projected_overage(5, 0, 10, DAY, DAY.start_unix() * 1000 + 30_000),
            None
        );
    }

    fn rules() -> Alerts {
        Alerts {
            webhook: None,
            used_percent: vec![50, 80, 95, 100],
            projected_exhaustion: true,
            billed_cost_above_pico: Some(1_000_000_000_000),
            first_refusal: true,
            retries: 0,
        }
    }

    fn view(used: u64, hour: i64, cost: u64) -> View<'static> {
        View {
            org: "acme",
            group: "mini",
            day: DAY,
            now_ms: (DAY.start_unix() + hour * 3600) * 1000,
            cap: 1000,
            used,
            billed_cost_pico: cost,
            refused: false,
        }
    }

    fn rule_names(v: Vec<(String, String)>) -> Vec<String> {
        v.into_iter().map(|(r, _)| r).collect()
    }

    #[test]
    fn thresholds_hold_at_their_share() {
        assert!(rule_names(holding(&rules(), &view(499, 23, 0))).is_empty());
        assert_eq!(
            rule_names(holding(&rules(), &view(500, 23, 0))),
            ["free_used_50"]
        );
        assert_eq!(
            rule_names(holding(&rules(), &view(1000, 23, 0))),
            [
                "free_used_50",
                "free_used_80",
                "free_used_95",
                "free_used_100"
            ]
        );
    }

    #[test]
    fn pace_projects_exhaustion_before_the_reset() {
        // 100 of 1000 by 01:00: the pace uses it all by 10:00.
        assert_eq!(
            rule_names(holding(&rules(), &view(100, 1, 0))),
            ["projected_exhaustion"]
        );
        assert_eq!(
            projected_exhaustion(100, 1000, DAY, (DAY.start_unix() + 3600) * 1000),
            Some((DAY.start_unix() + 10 * 3600) * 1000)
        );
        // 100 by 12:00: 1000 would take 120 hours.
        assert!(holding(&rules(), &view(100, 12, 0)).is_empty());
    }

    #[test]
    fn cost_above_the_amount() {
        assert!(holding(&rules(), &view(0, 12, 1_000_000_000_000)).is_empty());
        assert_eq!(
            rule_names(holding(&rules(), &view(0, 12, 1_000_000_000_001))),
            ["billed_cost"]
        );
    }

    #[test]
    fn each_rule_fires_once_a_day() {
        let engine = Engine::default();
        assert_eq!(engine.evaluate(&rules(), &view(500, 23, 0)).len(), 1);
        assert!(engine.evaluate(&rules(), &view(600, 23, 0)).is_empty());
        assert_eq!(engine.evaluate(&rules(), &view(800, 23, 0)).len(), 1);
        let mut next_day = view(500, 23, 0);
        next_day.day = Day(DAY.0 + 1);
        next_day.now_ms += 86_400_000;
        assert_eq!(engine.evaluate(&rules(), &next_day).len(), 1);
        assert_eq!(engine.today(Day(DAY.0 + 1)).len(), 1);
    }
}
