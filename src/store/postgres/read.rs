//! The reads behind the usage API, the dashboard, the alerts and the
//! commands: the same answers as SQLite's ([`crate::store::sqlite`]).

use tokio_postgres::Client;

use crate::alerts::Fired;
use crate::day::Day;
use crate::store::{DailyTotal, Forwarded, Record, StoreError, UsageRow};

fn u(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

pub(super) async fn daily_range(
    client: &Client,
    from: Day,
    to: Day,
) -> Result<Vec<DailyTotal>, StoreError> {
    let rows = client
        .query(
            "SELECT day, org, grp, free_tokens, billed_tokens, cost_pico, requests FROM daily
             WHERE day >= $1 AND day <= $2 AND (requests > 0 OR free_tokens > 0)
             ORDER BY day, org, grp",
            &[&(from.0 as i32), &(to.0 as i32)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| DailyTotal {
            day: Day(i64::from(r.get::<_, i32>(0))),
            org: r.get(1),
            group: r.get(2),
            free_tokens: u(r.get(3)),
            billed_tokens: u(r.get(4)),
            cost_pico: u(r.get(5)),
            requests: u(r.get(6)),
        })
        .collect())
}

pub(super) async fn alerts(client: &Client, day: Day) -> Result<Vec<Fired>, StoreError> {
    let rows = client
        .query(
            "SELECT org, grp, rule, fired_ms, text, cap, used, billed_cost_pico, exhausted_at_ms
             FROM alerts WHERE day = $1 ORDER BY fired_ms, org, grp, rule",
            &[&(day.0 as i32)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Fired {
            day,
            org: r.get(0),
            group: r.get(1),
            rule: r.get(2),
            fired_ms: r.get(3),
            text: r.get(4),
            cap: u(r.get(5)),
            used: u(r.get(6)),
            billed_cost_pico: u(r.get(7)),
            exhausted_at_ms: r.get(8),
        })
        .collect())
}

pub(super) async fn alert_delivery(
    client: &Client,
    day: Day,
    org: &str,
    group: &str,
    rule: &str,
) -> Result<Option<(u32, bool)>, StoreError> {
    let row = client
        .query_opt(
            "SELECT attempts, delivered FROM alerts WHERE org = $1 AND day = $2 AND grp = $3 AND rule = $4",
            &[&org, &(day.0 as i32), &group, &rule],
        )
        .await?;
    Ok(row.map(|r| (u32::try_from(r.get::<_, i32>(0)).unwrap_or(0), r.get(1))))
}

pub(super) async fn recent(
    client: &Client,
    limit: u64,
    org: Option<&str>,
) -> Result<Vec<Record>, StoreError> {
    let rows = client
        .query(
            "SELECT id, org, project, requested_model, served_model, grp, decision, state, input_tokens,
                    cached_tokens, output_tokens, free, cost_pico, status, estimated, started_ms,
                    key_id, latency_ms
             FROM requests WHERE $2::TEXT IS NULL OR org = $2
             ORDER BY started_ms DESC, id DESC LIMIT $1",
            &[&i64::try_from(limit).unwrap_or(i64::MAX), &org],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Record {
            id: r.get(0),
            org: r.get(1),
            project: r.get(2),
            requested_model: r.get(3),
            served_model: r.get(4),
            group: r.get(5),
            decision: r.get(6),
            state: r.get(7),
            input: u(r.get(8)),
            cached: u(r.get(9)),
            output: u(r.get(10)),
            free: r.get(11),
            cost_pico: u(r.get(12)),
            status: u16::try_from(r.get::<_, i32>(13)).unwrap_or(0),
            estimated: r.get(14),
            started_ms: r.get(15),
            key_id: r.get(16),
            latency_ms: u(r.get(17)),
        })
        .collect())
}

pub(super) async fn recent_forwarded(
    client: &Client,
    limit: u64,
    org: Option<&str>,
) -> Result<Vec<Forwarded>, StoreError> {
    let rows = client
        .query(
            "SELECT started_ms, org, project, key_id, method, path, status, latency_ms
             FROM forwarded WHERE $2::TEXT IS NULL OR org = $2
             ORDER BY started_ms DESC, id DESC LIMIT $1",
            &[&i64::try_from(limit).unwrap_or(i64::MAX), &org],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Forwarded {
            started_ms: r.get(0),
            org: r.get::<_, String>(1).into(),
            project: r.get::<_, String>(2).into(),
            key_id: r.get::<_, String>(3).into(),
            method: match r.get::<_, &str>(4) {
                "POST" => "POST",
                "DELETE" => "DELETE",
                _ => "GET",
            },
            path: r.get(5),
            status: u16::try_from(r.get::<_, i32>(6)).unwrap_or(0),
            latency_ms: u(r.get(7)),
        })
        .collect())
}

/// The usage report: as SQLite's `usage_rows`, sums saturating.
pub(super) async fn usage_rows(
    client: &Client,
    start_ms: i64,
    end_ms: i64,
    width_ms: i64,
    group_by: &[&str],
) -> Result<Vec<UsageRow>, StoreError> {
    let column = |name: &str| match name {
        "project_id" => Some("project"),
        "api_key_id" => Some("key_id"),
        "model" => Some("requested_model"),
        "lane" => Some("CASE WHEN free THEN 'free' ELSE 'billed' END"),
        "sharing" => Some("CASE WHEN shared THEN 'shared' ELSE 'private' END"),
        "batch" => Some("CASE WHEN left(key_id, 6) = 'batch_' THEN 'true' ELSE 'false' END"),
        _ => None,
    };
    let mut select = Vec::new();
    for name in [
        "project_id",
        "api_key_id",
        "model",
        "lane",
        "sharing",
        "batch",
    ] {
        let expr = if name == "model" && group_by.contains(&"served_model") {
            "served_model"
        } else if group_by.contains(&name) {
            column(name).unwrap_or("NULL::TEXT")
        } else {
            "NULL::TEXT"
        };
        select.push(format!("{expr} AS {name}"));
    }
    let sum = |c: &str| format!("LEAST(SUM({c}), 9223372036854775807)::BIGINT");
    let sql = format!(
        "SELECT (started_ms - $1) / $3 AS bucket, {}, org,
                {}, {}, {}, COUNT(*) FILTER (WHERE decision <> 'refused'), {},
                COUNT(*) FILTER (WHERE decision = 'refused'),
                COUNT(*) FILTER (WHERE decision <> 'refused' AND (status < 200 OR status >= 300))
         FROM requests
         WHERE started_ms >= $1 AND started_ms < $2 AND state <> 'pending'
         GROUP BY bucket, org, project_id, api_key_id, model, lane, sharing, batch
         ORDER BY bucket, org, project_id, api_key_id, model, lane, sharing, batch",
        select.join(", "),
        sum("input_tokens"),
        sum("cached_tokens"),
        sum("output_tokens"),
        sum("cost_pico"),
    );
    let rows = client.query(&sql, &[&start_ms, &end_ms, &width_ms]).await?;
    Ok(rows
        .iter()
        .map(|r| UsageRow {
            bucket: r.get(0),
            project_id: r.get(1),
            api_key_id: r.get(2),
            model: r.get(3),
            lane: r.get(4),
            sharing: r.get(5),
            batch: r.get(6),
            org: r.get(7),
            input_tokens: u(r.get(8)),
            input_cached_tokens: u(r.get(9)),
            output_tokens: u(r.get(10)),
            num_model_requests: u(r.get(11)),
            cost_pico: u(r.get(12)),
            refused: u(r.get(13)),
            errors: u(r.get(14)),
        })
        .collect())
}

/// Rows of `table` whose `column` is `value` (`table` and `column` are the
/// callers' constants, never a client's input).
pub(super) async fn count(
    client: &Client,
    table: &'static str,
    column: &'static str,
    value: &str,
) -> Result<u64, StoreError> {
    let row = client
        .query_one(
            &format!("SELECT COUNT(*) FROM {table} WHERE {column} = $1"),
            &[&value],
        )
        .await?;
    Ok(u(row.get(0)))
}

/// The captures `filter` selects (`$1` org, `$2` project or NULL, `$3` and
/// `$4` the time bounds or NULL).
fn export_sql(select: &str) -> String {
    format!(
        "SELECT {select} FROM captures WHERE org = $1 AND ($2::TEXT IS NULL OR project = $2)
         AND started_ms >= COALESCE($3::BIGINT, -9223372036854775808) AND started_ms < COALESCE($4::BIGINT, 9223372036854775807)"
    )
}

/// How many captured calls `filter` selects.
pub(super) async fn count_export(
    client: &Client,
    filter: &crate::store::ExportFilter,
) -> Result<u64, StoreError> {
    let row = client
        .query_one(
            &export_sql("COUNT(*)"),
            &[
                &filter.org,
                &filter.project,
                &filter.since_ms,
                &filter.until_ms,
            ],
        )
        .await?;
    Ok(u(row.get(0)))
}

/// Hand every captured call `filter` selects to `f`, oldest first, rows
/// streamed from the server (not all in memory).
pub(super) async fn for_each_export(
    client: &Client,
    filter: &crate::store::ExportFilter,
    mut f: impl FnMut(crate::store::CapturedRow) -> std::io::Result<()>,
) -> Result<u64, StoreError> {
    use futures_util::StreamExt;
    let sql = export_sql(
        "id, started_ms, org, project, model, endpoint, streamed, input_tokens, output_tokens, body",
    ) + " ORDER BY started_ms, id";
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [
        &filter.org,
        &filter.project,
        &filter.since_ms,
        &filter.until_ms,
    ];
    let rows = client.query_raw(&sql, params).await?;
    let mut rows = std::pin::pin!(rows);
    let mut n = 0;
    while let Some(r) = rows.next().await {
        let r = r?;
        f(crate::store::CapturedRow {
            id: r.get(0),
            started_ms: r.get(1),
            org: r.get(2),
            project: r.get(3),
            model: r.get(4),
            endpoint: r.get(5),
            streamed: r.get(6),
            input_tokens: u(r.get(7)),
            output_tokens: u(r.get(8)),
            body: r.get(9),
        })
        .map_err(|e| StoreError::from_message(format!("writing the export: {e}")))?;
        n += 1;
    }
    Ok(n)
}
