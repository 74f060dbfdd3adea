//! Reconciliation with the upstream's own books: OpenAI's Usage API
//! (`GET /v1/organization/usage/completions`, 1-day buckets grouped by
//! project and model, every page) and Costs API (`GET
//! /v1/organization/costs`, by project), read with an upstream's
//! `admin_key`, matched to the ledger per upstream project and model: the
//! tokens, requests and cost each side counted, and whether they differ
//! beyond a tolerance.
//!
//! A ledger call is the upstream project's its tokenwarden project sends
//! (`[upstreams.NAME] project`, the `OpenAI-Project` header; none when the
//! upstream sets none: then only the upstream's calls without a project
//! header match, so set it for an exact match).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, Upstream};
use crate::day::Day;
use crate::store::Store;

/// The largest report page read (OpenAI's are a few kilobytes).
const MAX_PAGE_BYTES: usize = 8 * 1024 * 1024;
/// Pages followed at most.
const MAX_PAGES: usize = 100;

/// What one side counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub requests: u64,
}

/// One upstream project and model, both sides.
#[derive(Clone, Debug, Serialize)]
pub struct UsageLine {
    pub upstream: String,
    pub project: Option<String>,
    pub model: String,
    pub tokenwarden: Counts,
    pub openai: Counts,
    pub differs: bool,
}

/// One upstream project's cost, both sides, in dollars.
#[derive(Clone, Debug, Serialize)]
pub struct CostLine {
    pub upstream: String,
    pub project: Option<String>,
    pub tokenwarden_usd: String,
    pub openai_usd: String,
    pub differs: bool,
}

/// A day's reconciliation.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub day: Day,
    pub tolerance_percent: u32,
    /// Upstreams with an `admin_key`, whose books were read.
    pub upstreams: Vec<String>,
    pub usage: Vec<UsageLine>,
    pub costs: Vec<CostLine>,
    pub differs: bool,
}

/// Whether `a` and `b` differ by more than `percent` of the larger (and,
/// for money, by more than `floor` too).
fn beyond(a: u64, b: u64, percent: u32, floor: u64) -> bool {
    let diff = a.abs_diff(b);
    diff > floor && u128::from(diff) * 100 > u128::from(a.max(b)) * u128::from(percent)
}

type Key = (String, Option<String>, String);

/// Reconcile `day` for every upstream of `config` with an `admin_key`.
pub async fn reconcile(
    config: &Config,
    store: &dyn Store,
    day: Day,
    tolerance_percent: u32,
) -> anyhow::Result<Report> {
    let upstreams: Vec<&Upstream> = config
        .upstreams
        .values()
        .filter(|u| u.admin_key.is_some())
        .collect();
    if upstreams.is_empty() {
        anyhow::bail!("no upstream has an admin_key: set [upstreams.NAME] admin_key to an admin key of its organization");
    }
    let (ledger, ledger_cost) = ledger(config, store, day).await?;
    let client = crate::gateway::upstream::webhook_client(config)?;
    let mut openai: BTreeMap<Key, Counts> = BTreeMap::new();
    let mut openai_cost: BTreeMap<(String, Option<String>), f64> = BTreeMap::new();
    for u in &upstreams {
        for bucket in pages(
            &client,
            u,
            "/organization/usage/completions",
            day,
            "&group_by[]=project_id&group_by[]=model",
        )
        .await?
        {
            for r in results(&bucket) {
                let project = r["project_id"].as_str().map(str::to_owned);
                if u.project.is_some() && project != u.project {
                    continue;
                }
                let model = r["model"].as_str().unwrap_or_default().to_owned();
                let c = openai.entry((u.name.clone(), project, model)).or_default();
                c.input_tokens += r["input_tokens"].as_u64().unwrap_or(0);
                c.output_tokens += r["output_tokens"].as_u64().unwrap_or(0);
                c.requests += r["num_model_requests"].as_u64().unwrap_or(0);
            }
        }
        for bucket in pages(
            &client,
            u,
            "/organization/costs",
            day,
            "&group_by[]=project_id",
        )
        .await?
        {
            for r in results(&bucket) {
                let project = r["project_id"].as_str().map(str::to_owned);
                if u.project.is_some() && project != u.project {
                    continue;
                }
                *openai_cost.entry((u.name.clone(), project)).or_default() +=
                    r["amount"]["value"].as_f64().unwrap_or(0.0);
            }
        }
    }
    let mut usage = Vec::new();
    let keys: std::collections::BTreeSet<&Key> = ledger.keys().chain(openai.keys()).collect();
    for key in keys {
        let (t, o) = (
            ledger.get(key).copied().unwrap_or_default(),
            openai.get(key).copied().unwrap_or_default(),
        );
        let differs = beyond(t.input_tokens, o.input_tokens, tolerance_percent, 0)
            || beyond(t.output_tokens, o.output_tokens, tolerance_percent, 0)
            || beyond(t.requests, o.requests, tolerance_percent, 0);
        usage.push(UsageLine {
            upstream: key.0.clone(),
            project: key.1.clone(),
            model: key.2.clone(),
            tokenwarden: t,
            openai: o,
            differs,
        });
    }
    let mut costs = Vec::new();
    let cost_keys: std::collections::BTreeSet<&(String, Option<String>)> =
        ledger_cost.keys().chain(openai_cost.keys()).collect();
    for key in cost_keys {
        let t = ledger_cost.get(key).copied().unwrap_or(0);
        // OpenAI's dollars as pico-dollars (a float from the API; a cent is the floor).
        let o = (openai_cost.get(key).copied().unwrap_or(0.0).max(0.0) * 1e12).round() as u64;
        costs.push(CostLine {
            upstream: key.0.clone(),
            project: key.1.clone(),
            tokenwarden_usd: crate::catalog::format_usd(u128::from(t)),
            openai_usd: crate::catalog::format_usd(u128::from(o)),
            differs: beyond(t, o, tolerance_percent, 10_000_000_000),
        });
    }
    let differs = usage.iter().any(|l| l.differs) || costs.iter().any(|c| c.differs);
    Ok(Report {
        day,
        tolerance_percent,
        upstreams: upstreams.iter().map(|u| u.name.clone()).collect(),
        usage,
        costs,
        differs,
    })
}

/// The ledger's day, per upstream, upstream project and served model; and
/// its billed cost per upstream and upstream project.
async fn ledger(
    config: &Config,
    store: &dyn Store,
    day: Day,
) -> anyhow::Result<(
    BTreeMap<Key, Counts>,
    BTreeMap<(String, Option<String>), u64>,
)> {
    let start = day.start_unix() * 1000;
    let rows = store
        .usage_rows(
            start,
            start + 86_400_000,
            86_400_000,
            &["project_id", "served_model"],
        )
        .await?;
    let mut usage: BTreeMap<Key, Counts> = BTreeMap::new();
    let mut cost: BTreeMap<(String, Option<String>), u64> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.num_model_requests > 0) {
        let upstream = config
            .orgs
            .iter()
            .filter(|o| *o.name == *r.org)
            .flat_map(|o| &o.projects)
            .find(|p| Some(&*p.id) == r.project_id.as_deref())
            .and_then(|p| config.upstreams.get(&p.upstream));
        let Some(upstream) = upstream.filter(|u| u.admin_key.is_some()) else {
            continue;
        };
        let key = (
            upstream.name.clone(),
            upstream.project.clone(),
            r.model.clone().unwrap_or_default(),
        );
        let c = usage.entry(key).or_default();
        c.input_tokens += r.input_tokens;
        c.output_tokens += r.output_tokens;
        c.requests += r.num_model_requests;
        *cost
            .entry((upstream.name.clone(), upstream.project.clone()))
            .or_default() += r.cost_pico;
    }
    Ok((usage, cost))
}

fn results(bucket: &Value) -> impl Iterator<Item = &Value> {
    bucket["results"].as_array().into_iter().flatten()
}

/// Every bucket of a report on `day`, following `next_page`.
async fn pages(
    client: &reqwest::Client,
    upstream: &Upstream,
    path: &str,
    day: Day,
    grouping: &str,
) -> anyhow::Result<Vec<Value>> {
    let key = upstream
        .admin_key
        .as_ref()
        .map(|k| k.expose().to_owned())
        .unwrap_or_default();
    let start = day.start_unix();
    let mut buckets = Vec::new();
    let mut page: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut url = format!(
            "{}{path}?start_time={start}&end_time={}&bucket_width=1d&limit=1{grouping}",
            upstream.base_url,
            start + 86_400
        );
        if let Some(p) = &page {
            url.push_str("&page=");
            url.push_str(&url_encode(p));
        }
        let body = get(client, &url, &key)
            .await
            .map_err(|e| anyhow::anyhow!("upstream {}: GET {path}: {e}", upstream.name))?;
        buckets.extend(body["data"].as_array().into_iter().flatten().cloned());
        match body["next_page"].as_str() {
            Some(next) if body["has_more"] == true => page = Some(next.to_owned()),
            _ => return Ok(buckets),
        }
    }
    anyhow::bail!(
        "upstream {}: {path} has more than {MAX_PAGES} pages",
        upstream.name
    )
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One page, at most [`MAX_PAGE_BYTES`]; an error names the status and
/// OpenAI's message, never the key.
async fn get(client: &reqwest::Client, url: &str, key: &str) -> anyhow::Result<Value> {
    let mut response = tokio::time::timeout(
        Duration::from_secs(60),
        client.get(url).bearer_auth(key).send(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no answer in 60 s"))??;
    let status = response.status();
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        body.extend_from_slice(&chunk);
        if body.len() > MAX_PAGE_BYTES {
            anyhow::bail!("an answer larger than {MAX_PAGE_BYTES} bytes");
        }
    }
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if !status.is_success() {
        let message = value["error"]["message"].as_str().unwrap_or("no message");
        anyhow::bail!("{status}: {}", crate::excerpt(message, 300));
    }
    Ok(value)
}

/// The report as a table.
pub fn table(report: &Report) -> String {
    let mut out = format!(
        "reconcile {} (UTC) against {}, tolerance {}%\n\n{:<10} {:<20} {:<28} {:>26} {:>26}  {}\n",
        report.day,
        report.upstreams.join(", "),
        report.tolerance_percent,
        "upstream",
        "project",
        "model",
        "tokenwarden in/out/req",
        "upstream in/out/req",
        ""
    );
    let counts = |c: &Counts| format!("{}/{}/{}", c.input_tokens, c.output_tokens, c.requests);
    for l in &report.usage {
        out.push_str(&format!(
            "{:<10} {:<20} {:<28} {:>26} {:>26}  {}\n",
            l.upstream,
            l.project.as_deref().unwrap_or("-"),
            l.model,
            counts(&l.tokenwarden),
            counts(&l.openai),
            if l.differs { "DIFFERS" } else { "ok" }
        ));
    }
    out.push_str(&format!(
        "\n{:<10} {:<20} {:>20} {:>20}\n",
        "upstream", "project", "tokenwarden cost", "upstream cost"
    ));
    for c in &report.costs {
        out.push_str(&format!(
            "{:<10} {:<20} {:>20} {:>20}  {}\n",
            c.upstream,
            c.project.as_deref().unwrap_or("-"),
            c.tokenwarden_usd,
            c.openai_usd,
            if c.differs { "DIFFERS" } else { "ok" }
        ));
    }
    out.push_str(if report.differs {
        "\nthe books differ beyond the tolerance\n"
    } else {
        "\nthe books agree\n"
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_beyond_the_tolerance() {
        assert!(!beyond(100, 100, 0, 0));
        assert!(beyond(100, 101, 0, 0));
        assert!(!beyond(100, 101, 1, 0));
        assert!(beyond(100, 102, 1, 0));
        assert!(!beyond(5_000_000_000, 0, 1, 10_000_000_000), "under a cent");
        assert_eq!(url_encode("page_AAA=/+"), "page_AAA%3D%2F%2B");
    }
}
