//! The simulator's account of what it answered, as OpenAI's Usage and
//! Costs APIs report it (`GET /v1/organization/usage/completions`, `GET
//! /v1/organization/costs`): per UTC day, project (the `OpenAI-Project`
//! header a call came with) and served model, its tokens and requests; and
//! what the program would bill: each group's daily allowance spent first,
//! call by call in the order they completed, a call that does not fit in
//! what is left billed whole at list price (the whole-request rule). So a
//! reconciliation against the gateway's ledger runs offline.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{bearer, Simulator};
use crate::day::Day;
use crate::gateway::error::ApiError;

/// What one day, project and model came to.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    pub input: u64,
    pub cached: u64,
    pub output: u64,
    pub requests: u64,
    /// Billed at list price, pico-dollars.
    pub cost_pico: u64,
}

/// The simulator's books: (day, project, model) -> tally, and each day's
/// free tokens spent per group.
#[derive(Default)]
pub struct Books {
    tallies: BTreeMap<(i64, Option<String>, String), Tally>,
    spent: HashMap<(i64, String), u64>,
    /// The days counted, oldest first.
    days: std::collections::BTreeSet<i64>,
}

/// Days kept at most (the oldest go first).
const MAX_DAYS: usize = 62;

impl Simulator {
    /// Count a call that completed: `input` and `output` tokens of
    /// `model` (as served) for `project`, billed as the program bills.
    pub(super) fn tally(&self, project: Option<&str>, model: &str, input: u64, output: u64) {
        let day = Day::from_unix(self.clock.now_ms().div_euclid(1000)).0;
        let found = self.catalog.lookup(model).ok();
        let tokens = input.saturating_add(output);
        let Ok(mut books) = self.books.lock() else {
            return;
        };
        let free = match found.as_ref().and_then(|m| m.group()) {
            Some(group) => {
                let spent = books
                    .spent
                    .entry((day, group.name.to_string()))
                    .or_default();
                let fits = spent.saturating_add(tokens) <= group.daily_tokens;
                if fits {
                    *spent += tokens;
                }
                fits
            }
            None => false,
        };
        let cost = match (free, found) {
            (false, Some(m)) => {
                let p = m.prices();
                u128::from(input) * u128::from(p.input) + u128::from(output) * u128::from(p.output)
            }
            _ => 0,
        };
        let tally = books
            .tallies
            .entry((day, project.map(str::to_owned), model.to_owned()))
            .or_default();
        tally.input = tally.input.saturating_add(input);
        tally.output = tally.output.saturating_add(output);
        tally.requests += 1;
        tally.cost_pico = tally
            .cost_pico
            .saturating_add(u64::try_from(cost).unwrap_or(u64::MAX));
        if books.days.insert(day) && books.days.len() > MAX_DAYS {
            if let Some(oldest) = books.days.pop_first() {
                books.tallies.retain(|k, _| k.0 != oldest);
                books.spent.retain(|k, _| k.0 != oldest);
            }
        }
    }
}

/// The query both reports read: `start_time` (required), `end_time`,
/// `bucket_width` (`1d`), `group_by[]` of `project_id` and `model`,
/// `limit` (1-31, default 7) and `page`.
struct Asked {
    start_day: i64,
    end_day: i64,
    by_project: bool,
    by_model: bool,
    limit: i64,
    page: i64,
}

fn bad(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param.to_owned()),
        code: None,
    }
}

fn asked(query: &[(String, String)]) -> Result<Asked, ApiError> {
    let get = |k: &str| query.iter().find(|(q, _)| q == k).map(|(_, v)| v.as_str());
    let number = |k: &str| -> Result<Option<i64>, ApiError> {
        get(k)
            .map(|v| {
                v.parse::<i64>()
                    .map_err(|_| bad(format!("'{k}' must be an integer."), k))
            })
            .transpose()
    };
    let start = number("start_time")?
        .ok_or_else(|| bad("Missing required parameter: 'start_time'.", "start_time"))?;
    let end = number("end_time")?;
    if get("bucket_width").is_some_and(|w| w != "1d") {
        return Err(bad(
            "The simulator reports 1d buckets only.",
            "bucket_width",
        ));
    }
    let groups: Vec<&str> = query
        .iter()
        .filter(|(k, _)| k == "group_by[]" || k == "group_by")
        .map(|(_, v)| v.as_str())
        .collect();
    let start_day = start.div_euclid(86_400);
    Ok(Asked {
        start_day,
        end_day: end.map_or(start_day + 1, |e| (e + 86_399).div_euclid(86_400)),
        by_project: groups.contains(&"project_id"),
        by_model: groups.contains(&"model"),
        limit: number("limit")?.unwrap_or(7).clamp(1, 31),
        page: get("page").and_then(|p| p.parse().ok()).unwrap_or(0).max(0),
    })
}

/// One report page: a bucket per day, its results made by `result` from
/// the day's tallies merged by the asked grouping.
fn report(
    sim: &Simulator,
    a: &Asked,
    result: impl Fn(Option<&str>, Option<&str>, &Tally) -> Value,
) -> Value {
    let first = a.start_day + a.page;
    let last = (first + a.limit).min(a.end_day);
    let books = sim.books.lock().ok();
    let mut data = Vec::new();
    for day in first..last {
        let mut merged: BTreeMap<(Option<String>, Option<String>), Tally> = BTreeMap::new();
        for ((d, project, model), t) in books.iter().flat_map(|b| b.tallies.iter()) {
            if *d != day {
                continue;
            }
            let key = (
                if a.by_project { project.clone() } else { None },
                if a.by_model {
                    Some(model.clone())
                } else {
                    None
                },
            );
            let m = merged.entry(key).or_default();
            m.input += t.input;
            m.cached += t.cached;
            m.output += t.output;
            m.requests += t.requests;
            m.cost_pico += t.cost_pico;
        }
        let results: Vec<Value> = merged
            .iter()
            .map(|((project, model), t)| result(project.as_deref(), model.as_deref(), t))
            .collect();
        data.push(json!({"object": "bucket", "start_time": day * 86_400, "end_time": (day + 1) * 86_400, "results": results}));
    }
    let has_more = last < a.end_day;
    json!({
        "object": "page",
        "data": data,
        "has_more": has_more,
        "next_page": if has_more { json!((a.page + a.limit).to_string()) } else { Value::Null },
    })
}

type Pairs = Query<Vec<(String, String)>>;

/// `GET /v1/organization/usage/completions`.
pub async fn completions(
    State(sim): State<Arc<Simulator>>,
    headers: HeaderMap,
    Query(query): Pairs,
) -> Response {
    let answer = bearer(&headers).and_then(|_| asked(&query)).map(|a| {
        report(&sim, &a, |project, model, t| {
            json!({
                "object": "organization.usage.completions.result",
                "input_tokens": t.input,
                "output_tokens": t.output,
                "input_cached_tokens": t.cached,
                "input_audio_tokens": 0,
                "output_audio_tokens": 0,
                "num_model_requests": t.requests,
                "project_id": project,
                "user_id": null,
                "api_key_id": null,
                "model": model,
                "batch": null,
            })
        })
    });
    match answer {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/organization/costs`.
pub async fn costs(
    State(sim): State<Arc<Simulator>>,
    headers: HeaderMap,
    Query(query): Pairs,
) -> Response {
    let answer = bearer(&headers).and_then(|_| asked(&query)).map(|mut a| {
        a.by_model = false;
        report(&sim, &a, |project, _, t| {
            // Dollars as a number, as OpenAI reports them.
            let dollars = t.cost_pico as f64 / 1e12;
            json!({
                "object": "organization.costs.result",
                "amount": {"value": dollars, "currency": "usd"},
                "line_item": null,
                "project_id": project,
            })
        })
    });
    match answer {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}
