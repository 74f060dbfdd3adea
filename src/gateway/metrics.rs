//! `GET /metrics`: Prometheus' text format, for operators.
//!
//! Counters are kept in memory from the process start (Prometheus expects
//! counters to reset with the process); gauges (free tokens left, reserved)
//! are read from the meter at scrape time. Label sets stay bounded: org,
//! project, group, model (the catalog's), kind, lane and status; never a key
//! or a request id. Tokens and money are integers here as everywhere; only
//! the rendered dollar figure is a float, because Prometheus' values are.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::Gateway;

/// Upper bounds of the latency histograms' buckets, in microseconds.
const BUCKETS_US: [u64; 16] = [
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    10_000_000,
    30_000_000,
    120_000_000,
];

#[derive(Clone, Debug, Default)]
struct Histogram {
    /// Observations per bucket (not cumulative; made so when rendered), the
    /// last slot for those above every bound.
    counts: [u64; BUCKETS_US.len() + 1],
    sum_us: u64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let slot = BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(BUCKETS_US.len());
        self.counts[slot] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }
}

/// Tokens of one (org, project, model, group): input (uncached), cached
/// input and output, each in the free and the billed lane.
#[derive(Clone, Debug, Default)]
struct Tokens {
    /// `[lane][kind]`: lane 0 free, 1 billed; kind 0 input, 1 cached, 2 output.
    tokens: [[u64; 3]; 2],
    cost_pico: u64,
}

#[derive(Default)]
struct Inner {
    /// (org, project, model, group) -> tokens. The group is part of the
    /// key because one catalog model can be in a group and outside it: a
    /// fine-tuned `ft:gpt-4o-mini:...` is labelled `gpt-4o-mini` but is
    /// outside the program, and a series must keep one label set (keyed by
    /// model alone, its `group` label flipped with each call's).
    tokens: BTreeMap<(usize, usize, String, Option<usize>), Tokens>,
    /// (org, project, status) -> requests.
    requests: BTreeMap<(usize, usize, u16), u64>,
    /// (org, project, kind, action) -> findings of the privacy guard.
    findings: BTreeMap<(usize, usize, &'static str, &'static str), u64>,
    /// (org, group, rule) -> alerts fired.
    alerts: BTreeMap<(String, String, String), u64>,
    total: Histogram,
    upstream: Histogram,
    overhead: Histogram,
}

/// A settled call, as the metrics see it.
pub struct Observed<'a> {
    pub org: usize,
    pub project: usize,
    pub model: &'a str,
    pub group: Option<usize>,
    pub free: bool,
    pub input: u64,
    pub cached: u64,
    pub output: u64,
    pub cost_pico: u64,
    /// From the request's arrival to its settlement.
    pub total: Duration,
    /// The part of `total` spent waiting on upstream (`None` if it never went).
    pub upstream: Option<Duration>,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
    /// Admitted calls not yet settled.
    in_flight: AtomicI64,
}

impl Metrics {
    pub fn call_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn call_settled(&self, o: &Observed<'_>) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let entry = inner
            .tokens
            .entry((o.org, o.project, o.model.to_owned(), o.group))
            .or_default();
        let lane = usize::from(!o.free);
        let cached = o.cached.min(o.input);
        for (sum, n) in entry.tokens[lane]
            .iter_mut()
            .zip([o.input - cached, cached, o.output])
        {
            *sum = sum.saturating_add(n);
        }
        entry.cost_pico = entry.cost_pico.saturating_add(o.cost_pico);
        inner.total.observe(o.total);
        if let Some(upstream) = o.upstream {
            inner.upstream.observe(upstream);
            inner.overhead.observe(o.total.saturating_sub(upstream));
        }
    }

    pub fn request(&self, org: usize, project: usize, status: u16) {
        if let Ok(mut inner) = self.inner.lock() {
            *inner.requests.entry((org, project, status)).or_default() += 1;
        }
    }

    pub fn findings(
        &self,
        org: usize,
        project: usize,
        kinds: &[&'static str],
        action: &'static str,
    ) {
        if let Ok(mut inner) = self.inner.lock() {
            for kind in kinds {
                *inner
                    .findings
                    .entry((org, project, kind, action))
                    .or_default() += 1;
            }
        }
    }

    pub fn alert(&self, org: &str, group: &str, rule: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            *inner
                .alerts
                .entry((org.to_owned(), group.to_owned(), rule.to_owned()))
                .or_default() += 1;
        }
    }

    /// Findings so far per kind, summed over projects (for the dashboard).
    pub fn findings_by_kind(&self, org: usize) -> BTreeMap<&'static str, u64> {
        let mut out = BTreeMap::new();
        if let Ok(inner) = self.inner.lock() {
            for ((o, _, kind, _), n) in &inner.findings {
                if *o == org {
                    *out.entry(*kind).or_default() += n;
                }
            }
        }
        out
    }
}

/// A label value in the text format: backslash, quote and newline escaped.
fn label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    let mut cumulative = 0;
    for (bound, count) in BUCKETS_US.iter().zip(h.counts) {
        cumulative += count;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1e6
        );
    }
    cumulative += h.counts[BUCKETS_US.len()];
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let _ = writeln!(out, "{name}_sum {}", h.sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {cumulative}");
}

/// The whole exposition.
/// The text of `/metrics`; `everywhere`: the pools as every replica sees
/// them (PostgreSQL), else the gateway's own meter is read.
pub fn render(gateway: &Gateway, everywhere: Option<&[crate::store::PoolRow]>) -> String {
    let live = gateway.live();
    let config = &live.config;
    let org_name = |o: usize| config.orgs.get(o).map_or("", |org| &*org.name);
    let project_name = |o: usize, p: usize| {
        config
            .orgs
            .get(o)
            .and_then(|org| org.projects.get(p))
            .map_or("", |p| &*p.id)
    };
    let group_name = |g: Option<usize>| {
        g.and_then(|g| config.catalog.groups.get(g))
            .map_or("none", |g| &*g.name)
    };
    let mut out = String::with_capacity(16 * 1024);
    let Ok(inner) = gateway.metrics.inner.lock() else {
        return out;
    };

    family(
        &mut out,
        "tokenwarden_tokens_total",
        "counter",
        "Tokens of settled calls by kind (input: uncached input; cached: cached input; output) and lane (free or billed).",
    );
    for ((o, p, model, group), t) in &inner.tokens {
        for (lane, lane_name) in ["free", "billed"].iter().enumerate() {
            for (kind, kind_name) in ["input", "cached", "output"].iter().enumerate() {
                let _ = writeln!(
                    out,
                    "tokenwarden_tokens_total{{org=\"{}\",project=\"{}\",group=\"{}\",model=\"{}\",kind=\"{kind_name}\",lane=\"{lane_name}\"}} {}",
                    label(org_name(*o)),
                    label(project_name(*o, *p)),
                    label(group_name(*group)),
                    label(model),
                    t.tokens[lane][kind]
                );
            }
        }
    }
    family(
        &mut out,
        "tokenwarden_cost_usd_total",
        "counter",
        "List-price cost of billed calls, in US dollars (kept as integer picodollars inside).",
    );
    for ((o, p, model, group), t) in &inner.tokens {
        let _ = writeln!(
            out,
            "tokenwarden_cost_usd_total{{org=\"{}\",project=\"{}\",group=\"{}\",model=\"{}\"}} {}",
            label(org_name(*o)),
            label(project_name(*o, *p)),
            label(group_name(*group)),
            label(model),
            t.cost_pico as f64 / 1e12
        );
    }
    family(
        &mut out,
        "tokenwarden_requests_total",
        "counter",
        "Metered requests by the HTTP status the client got.",
    );
    for ((o, p, status), n) in &inner.requests {
        let _ = writeln!(
            out,
            "tokenwarden_requests_total{{org=\"{}\",project=\"{}\",status=\"{status}\"}} {n}",
            label(org_name(*o)),
            label(project_name(*o, *p)),
        );
    }
    family(
        &mut out,
        "tokenwarden_privacy_guard_findings_total",
        "counter",
        "Calls in which the privacy guard found a kind of secret or personal data, by the action taken.",
    );
    for ((o, p, kind, action), n) in &inner.findings {
        let _ = writeln!(
            out,
            "tokenwarden_privacy_guard_findings_total{{org=\"{}\",project=\"{}\",kind=\"{kind}\",action=\"{action}\"}} {n}",
            label(org_name(*o)),
            label(project_name(*o, *p)),
        );
    }
    family(
        &mut out,
        "tokenwarden_alerts_total",
        "counter",
        "Alerts fired, by rule.",
    );
    for ((org, group, rule), n) in &inner.alerts {
        let _ = writeln!(
            out,
            "tokenwarden_alerts_total{{org=\"{}\",group=\"{}\",rule=\"{}\"}} {n}",
            label(org),
            label(group),
            label(rule)
        );
    }

    // Gauges of today's pools: where replicas share the ledger, its pool
    // rows and every replica's reservations (the same whichever replica
    // answers); else the meter, now.
    let pools: Vec<(usize, usize, crate::meter::PoolState)> = (0..config.orgs.len())
        .flat_map(|o| (0..config.catalog.groups.len()).map(move |g| (o, g)))
        .map(|(o, g)| {
            let own = gateway.pool_state(config, o, g);
            let Some(rows) = everywhere else {
                return (o, g, own);
            };
            let row = rows.iter().find(|r| r.key.org == o && r.key.group == g);
            let used = row.map_or(0, |r| r.used).min(own.cap);
            let state = crate::meter::PoolState {
                cap: own.cap,
                used,
                reserved: row.map_or(0, |r| r.reserved).min(own.cap - used),
            };
            (o, g, state)
        })
        .collect();
    for (name, help, pick) in [
        (
            "tokenwarden_free_tokens_limit",
            "Today's free-token cap per org and group.",
            (|s: &crate::meter::PoolState| s.cap) as fn(&crate::meter::PoolState) -> u64,
        ),
        (
            "tokenwarden_free_tokens_used",
            "Free tokens used today by settled calls.",
            |s| s.used,
        ),
        (
            "tokenwarden_free_tokens_reserved",
            "Free tokens reserved by calls in flight.",
            |s| s.reserved,
        ),
        (
            "tokenwarden_free_tokens_left",
            "Free tokens a new call could still reserve today.",
            |s| s.left(),
        ),
    ] {
        family(&mut out, name, "gauge", help);
        for (o, g, state) in &pools {
            let _ = writeln!(
                out,
                "{name}{{org=\"{}\",group=\"{}\"}} {}",
                label(org_name(*o)),
                label(group_name(Some(*g))),
                pick(state)
            );
        }
    }
    family(
        &mut out,
        "tokenwarden_calls_in_flight",
        "gauge",
        "Admitted calls not yet settled (each holds a reservation).",
    );
    let _ = writeln!(
        out,
        "tokenwarden_calls_in_flight {}",
        gateway.metrics.in_flight.load(Ordering::Relaxed).max(0)
    );
    family(
        &mut out,
        "tokenwarden_free_tokens_reset_seconds",
        "gauge",
        "Seconds to 00:00 UTC, when every allowance resets.",
    );
    let _ = writeln!(
        out,
        "tokenwarden_free_tokens_reset_seconds {}",
        gateway.seconds_to_reset()
    );

    histogram(
        &mut out,
        "tokenwarden_request_duration_seconds",
        "From a metered request's arrival to its settlement (a stream's end).",
        &inner.total,
    );
    histogram(
        &mut out,
        "tokenwarden_upstream_duration_seconds",
        "Time spent on the upstream call, from sending it to its last byte.",
        &inner.upstream,
    );
    histogram(
        &mut out,
        "tokenwarden_overhead_seconds",
        "The gateway's own share of a call: total duration less upstream time.",
        &inner.overhead,
    );
    out
}

/// `GET /metrics`.
pub async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    let everywhere = match gateway.store.pools_everywhere(gateway.today()).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "the pools could not be read; /metrics shows this replica's view");
            None
        }
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&gateway, everywhere.as_deref()),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_when_rendered() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(600));
        h.observe(Duration::from_secs(1000));
        let mut out = String::new();
        histogram(&mut out, "x", "help", &h);
        assert!(out.contains("x_bucket{le=\"0.00025\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.001\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"120\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_count 3\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
