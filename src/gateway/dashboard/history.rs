//! Any day's tables, and every table as CSV: the day picker below the live
//! part (`/dashboard?day=YYYY-MM-DD`) and `/dashboard/csv?day=&by=`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::render::{esc, lines, table, Line};
use crate::day::Day;
use crate::gateway::auth::Admin;
use crate::gateway::Gateway;
use crate::store::UsageRow;

/// What a table is grouped by: its query parameter, caption, first column,
/// the ledger's column, and the key of a row.
struct By {
    name: &'static str,
    caption: &'static str,
    first: &'static str,
    column: &'static str,
    key: fn(&UsageRow) -> Option<String>,
}

const TABLES: [By; 3] = [
    By {
        name: "project",
        caption: "By project",
        first: "Project",
        column: "project_id",
        key: |r| r.project_id.clone(),
    },
    By {
        name: "key",
        caption: "By key",
        first: "Key",
        column: "api_key_id",
        key: |r| r.api_key_id.clone(),
    },
    By {
        name: "model",
        caption: "By model",
        first: "Model",
        column: "model",
        key: |r| r.model.clone(),
    },
];

/// Day `day`'s rows grouped by `by` and lane (free against billed).
async fn rows(gateway: &Gateway, day: Day, by: &By) -> Vec<UsageRow> {
    let start_ms = day.start_unix() * 1000;
    gateway
        .store
        .usage_rows(
            start_ms,
            start_ms + 86_400_000,
            86_400_000,
            &[by.column, "lane"],
        )
        .await
        .unwrap_or_default()
}

/// The orgs `admin` sees, by name.
fn orgs(gateway: &Gateway, admin: &Admin) -> Vec<String> {
    gateway
        .live()
        .config
        .orgs
        .iter()
        .filter(|o| !o.retired && admin.sees(&o.name))
        .map(|o| o.name.to_string())
        .collect()
}

/// The section below the live part: a day picker, and when a day is asked
/// for (`day`), its tables per org with their CSV links.
pub async fn section(gateway: &Gateway, admin: &Admin, day: Option<Day>) -> String {
    let today = gateway.today();
    let shown = day.unwrap_or(today);
    let mut out = format!(
        "<section class=\"history\" id=\"day\"><h2>Any day</h2>\
<form method=\"get\" action=\"/dashboard#day\"><label>Day <input type=\"date\" name=\"day\" value=\"{shown}\" max=\"{today}\"></label> \
<button type=\"submit\">Show</button></form>"
    );
    let Some(day) = day else {
        let _ = write!(
            out,
            "<p class=\"meta\">Today's tables as CSV: {}</p></section>",
            csv_links(today)
        );
        return out;
    };
    let _ = write!(
        out,
        "<p class=\"meta\">{day} (UTC) as CSV: {}</p>",
        csv_links(day)
    );
    let orgs = orgs(gateway, admin);
    let mut by_table = Vec::new();
    for by in &TABLES {
        by_table.push(rows(gateway, day, by).await);
    }
    for org in &orgs {
        let _ = write!(out, "<h3>{}</h3>", esc(org));
        for (by, rows) in TABLES.iter().zip(&by_table) {
            table(&mut out, by.caption, by.first, &lines(rows, org, by.key));
        }
    }
    out.push_str("</section>");
    out
}

fn csv_links(day: Day) -> String {
    TABLES
        .iter()
        .map(|by| {
            format!(
                "<a href=\"/dashboard/csv?day={day}&amp;by={}\">{}</a>",
                by.name, by.first
            )
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

/// `GET /dashboard/csv?day=YYYY-MM-DD&by=project|key|model`: that day's
/// table for every org the session's admin sees, as CSV (RFC 4180, by the
/// `csv` crate), a row per org and project, key or model.
pub async fn csv(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let Some(admin) = super::signed_in(&gateway, &headers) else {
        return (StatusCode::UNAUTHORIZED, "sign in at /dashboard first\n").into_response();
    };
    let day = match query.get("day") {
        None => gateway.today(),
        Some(d) => match Day::parse(d) {
            Some(day) => day,
            None => return (StatusCode::BAD_REQUEST, "day: use YYYY-MM-DD\n").into_response(),
        },
    };
    let Some(by) = TABLES
        .iter()
        .find(|b| query.get("by").map_or("project", String::as_str) == b.name)
    else {
        return (StatusCode::BAD_REQUEST, "by: use project, key or model\n").into_response();
    };
    let rows = rows(&gateway, day, by).await;
    match write_csv(&orgs(&gateway, &admin), &rows, by) {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("attachment; filename=\"tokenwarden-{day}-{}.csv\"", by.name),
                ),
                (header::CACHE_CONTROL, "no-store".to_owned()),
            ],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "could not write a CSV");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// A text a spreadsheet would run as a formula (`=`, `+`, `-`, `@`, tab,
/// carriage return first) is written with a `'` before it (OWASP's advice
/// against CSV injection): names and ids come from tenants.
fn cell(text: &str) -> String {
    match text.chars().next() {
        Some('=' | '+' | '-' | '@' | '\t' | '\r') => format!("'{text}"),
        _ => text.to_owned(),
    }
}

fn write_csv(orgs: &[String], rows: &[UsageRow], by: &By) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "org",
        by.name,
        "requests",
        "input_tokens",
        "output_tokens",
        "free_tokens",
        "billed_tokens",
        "cost_usd",
        "refused",
        "errors",
    ])?;
    for org in orgs {
        let table: BTreeMap<String, Line> = lines(rows, org, by.key);
        for (name, l) in &table {
            w.write_record([
                cell(org),
                cell(name),
                l.requests.to_string(),
                l.input.to_string(),
                l.output.to_string(),
                l.free.to_string(),
                l.billed.to_string(),
                crate::catalog::format_usd(u128::from(l.cost))
                    .trim_start_matches('$')
                    .to_owned(),
                l.refused.to_string(),
                l.errors.to_string(),
            ])?;
        }
    }
    w.into_inner().map_err(|e| csv::Error::from(e.into_error()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_that_a_spreadsheet_would_run_are_quoted_as_text() {
        assert_eq!(cell("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(cell("-1"), "'-1");
        assert_eq!(cell("web"), "web");
        let rows = vec![UsageRow {
            bucket: 0,
            org: "acme".into(),
            project_id: Some("a,\"b\"".into()),
            api_key_id: None,
            model: None,
            lane: Some("free".into()),
            sharing: None,
            batch: None,
            input_tokens: 10,
            input_cached_tokens: 0,
            output_tokens: 5,
            num_model_requests: 1,
            cost_pico: 0,
            refused: 2,
            errors: 0,
        }];
        let text = write_csv(&["acme".into()], &rows, &TABLES[0]).unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&text),
            "org,project,requests,input_tokens,output_tokens,free_tokens,billed_tokens,cost_usd,refused,errors\n\
acme,\"a,\"\"b\"\"\",1,10,5,15,0,0.000000000000,2,0\n"
        );
    }
}
