//! The usage API in OpenAI's shape, for programs written against OpenAI's
//! Usage API: `GET /v1/organization/usage/completions` and
//! `GET /v1/organization/costs`, behind the admin token.
//!
//! Parameters as OpenAI's: `start_time` (required, Unix seconds),
//! `end_time`, `bucket_width` (`1m`, `1h`, `1d`), `group_by` (repeatable:
//! `project_id`, `api_key_id`, `model`, `batch`; and ours, `lane`, which
//! splits free from billed, and `sharing`, which splits shared from private
//! traffic),
//! `limit` (buckets per page) and `page` (the cursor a page's `next_page`
//! gives). Ours too: `org`, to keep to one organization. Every result also
//! names its `org`, grouped by lane its `lane`, and by sharing its `sharing`.
//! An org admin key sees its own org's rows only, whatever the query says.

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::Extension;
use axum::Json;
use serde_json::{json, Value};

use super::auth::Admin;
use super::error::ApiError;
use super::Gateway;
use crate::store::UsageRow;

fn bad(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.into(),
        param: Some(param.to_owned()),
        code: Some("invalid_value"),
    }
}

/// `%XX` and `+` decoded; invalid escapes are kept as they are.
pub(crate) fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Query {
    start: i64,
    end: i64,
    width: i64,
    group_by: Vec<&'static str>,
    limit: i64,
    page: i64,
    org: Option<String>,
}

fn parse(raw: Option<&str>, now_s: i64, allowed: &[&'static str]) -> Result<Query, ApiError> {
    let mut start = None;
    let mut end = None;
    let mut width_name = "1d".to_owned();
    let mut group_by = Vec::new();
    let mut limit = None;
    let mut page = 0;
    let mut org = None;
    for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, value) = (decode(key), decode(value));
        let int = |param: &str| {
            value.parse::<i64>().map_err(|_| {
                bad(
                    format!(
                        "'{param}' must be an integer, got {:?}.",
                        crate::excerpt(&value, 64)
                    ),
                    param,
                )
            })
        };
        match key.as_str() {
            "start_time" => start = Some(int("start_time")?),
            "end_time" => end = Some(int("end_time")?),
            "bucket_width" => width_name = value.clone(),
            "limit" => limit = Some(int("limit")?),
            "page" => page = int("page")?,
            "org" => org = Some(value.clone()),
            "group_by" | "group_by[]" => {
                for name in value.split(',') {
                    match allowed.iter().find(|a| **a == name) {
                        Some(a) => group_by.push(*a),
                        None => {
                            return Err(bad(
                                format!(
                                    "Invalid value for 'group_by': {:?}. Supported values are: {}.",
                                    crate::excerpt(name, 64),
                                    allowed.join(", ")
                                ),
                                "group_by",
                            ))
                        }
                    }
                }
            }
            // Filters OpenAI accepts that tokenwarden has no use for yet are ignored.
            _ => {}
        }
    }
    let start = start.ok_or_else(|| ApiError::InvalidRequest {
        message: "Missing required parameter: 'start_time'.".into(),
        param: Some("start_time".into()),
        code: Some("missing_required_parameter"),
    })?;
    let end = end.unwrap_or(now_s + 1);
    if end <= start {
        return Err(bad("'end_time' must be after 'start_time'.", "end_time"));
    }
    let (width, default_limit, max_limit) = match width_name.as_str() {
        "1m" => (60, 60, 1440),
        "1h" => (3600, 24, 168),
        "1d" => (86_400, 7, 31),
        other => {
            return Err(bad(
                format!(
                    "Invalid value for 'bucket_width': {:?}. Supported values are: 1m, 1h, 1d.",
                    crate::excerpt(other, 64)
                ),
                "bucket_width",
            ))
        }
    };
    let limit = limit.unwrap_or(default_limit);
    if !(1..=max_limit).contains(&limit) {
        return Err(bad(
            format!("'limit' must be between 1 and {max_limit} for bucket_width {width_name}."),
            "limit",
        ));
    }
    if page < 0 {
        return Err(bad("'page' is not a cursor this API gave.", "page"));
    }
    Ok(Query {
        start,
        end,
        width,
        group_by,
        limit,
        page,
        org,
    })
}

/// The page's buckets, each with the rows that fall in it, as `result(row)` objects.
async fn page(
    gateway: &Gateway,
    admin: &Admin,
    q: &Query,
    result: impl Fn(&UsageRow) -> Value,
) -> Result<Value, ApiError> {
    let total = (q.end - q.start + q.width - 1) / q.width;
    let first = q.page.min(total);
    let last = (first + q.limit).min(total);
    let page_start = q.start + first * q.width;
    let page_end = (q.start + last * q.width).min(q.end);
    let rows = gateway
        .store
        .usage_rows(
            page_start * 1000,
            page_end * 1000,
            q.width * 1000,
            &q.group_by,
        )
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "usage query failed");
            ApiError::Internal
        })?;
    let data: Vec<Value> = (0..last - first)
        .map(|b| {
            let start_time = page_start + b * q.width;
            let results: Vec<Value> = rows
                .iter()
                .filter(|r| {
                    // Only refused calls: nothing OpenAI's report would count.
                    r.bucket == b
                        && r.num_model_requests > 0
                        && admin.sees(&r.org)
                        && q.org.as_deref().is_none_or(|o| o == r.org)
                })
                .map(&result)
                .collect();
            json!({"object": "bucket", "start_time": start_time, "end_time": (start_time + q.width).min(q.end), "results": results})
        })
        .collect();
    let has_more = last < total;
    Ok(json!({
        "object": "page",
        "data": data,
        "has_more": has_more,
        "next_page": if has_more { Value::String(last.to_string()) } else { Value::Null },
    }))
}

/// `GET /v1/organization/usage/completions`.
pub async fn completions(
    State(gateway): State<Arc<Gateway>>,
    Extension(admin): Extension<Admin>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let now_s = gateway.clock.now_ms().div_euclid(1000);
    let q = parse(
        raw.as_deref(),
        now_s,
        &[
            "project_id",
            "api_key_id",
            "model",
            "lane",
            "sharing",
            "batch",
        ],
    )?;
    let body = page(&gateway, &admin, &q, |r| {
        json!({
            "object": "organization.usage.completions.result",
            "input_tokens": r.input_tokens,
            "output_tokens": r.output_tokens,
            "input_cached_tokens": r.input_cached_tokens,
            "input_audio_tokens": 0,
            "output_audio_tokens": 0,
            "num_model_requests": r.num_model_requests,
            "project_id": r.project_id,
            "user_id": null,
            "api_key_id": r.api_key_id,
            "model": r.model,
            "batch": r.batch.as_deref().map(|b| b == "true"),
            "org": r.org,
            "lane": r.lane,
            "sharing": r.sharing,
        })
    })
    .await?;
    Ok(Json(body))
}

/// `GET /v1/organization/costs`: billed cost at list price (free calls cost nothing).
pub async fn costs(
    State(gateway): State<Arc<Gateway>>,
    Extension(admin): Extension<Admin>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let now_s = gateway.clock.now_ms().div_euclid(1000);
    let q = parse(raw.as_deref(), now_s, &["project_id", "line_item", "lane"])?;
    // OpenAI's line_item is the kind of charge; here it is the lane.
    let group_by: Vec<&'static str> = q
        .group_by
        .iter()
        .map(|g| if *g == "line_item" { "lane" } else { g })
        .collect();
    let q = Query { group_by, ..q };
    let body = page(&gateway, &admin, &q, |r| {
        json!({
            "object": "organization.costs.result",
            // OpenAI's amount is a JSON number of dollars; the exact integer is beside it.
            "amount": {"value": r.cost_pico as f64 / 1e12, "currency": "usd"},
            "amount_pico": r.cost_pico,
            "line_item": r.lane,
            "project_id": r.project_id,
            "org": r.org,
        })
    })
    .await?;
    Ok(Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_queries() {
        assert_eq!(decode("group_by%5B%5D"), "group_by[]");
        assert_eq!(decode("a+b%2Cc"), "a b,c");
        assert_eq!(decode("50%"), "50%");
    }
}
