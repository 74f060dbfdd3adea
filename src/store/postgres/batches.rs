//! Batches in PostgreSQL: a row each (OpenAI's object as JSON) and their
//! lines, keyed by org. A line is claimed with `FOR UPDATE SKIP LOCKED` (in
//! a CTE, which runs once: a subquery in `IN` may run again per row), so
//! replicas sharing the ledger never run the same line.

use tokio_postgres::{Client, Row};

use crate::store::{BatchLine, BatchRow, StoreError};

fn line(r: &Row) -> BatchLine {
    BatchLine {
        line: r.get(0),
        custom_id: r.get(1),
        body: r.get(2),
        state: r.get(3),
        result: r.get(4),
        claimed_ms: r.get(5),
    }
}

pub(super) async fn save(client: &Client, b: &BatchRow) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO batches (org, id, project, created_at, status, object)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (org, id) DO UPDATE SET status = EXCLUDED.status, object = EXCLUDED.object",
            &[&b.org, &b.id, &b.project, &b.created_at, &b.status, &b.object],
        )
        .await?;
    Ok(())
}

pub(super) async fn list(
    client: &Client,
    org: Option<&str>,
    project: Option<&str>,
) -> Result<Vec<BatchRow>, StoreError> {
    let rows = client
        .query(
            "SELECT id, org, project, created_at, status, object FROM batches
             WHERE ($1::TEXT IS NULL OR org = $1) AND ($2::TEXT IS NULL OR project = $2)
             ORDER BY created_at, made",
            &[&org, &project],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| BatchRow {
            id: r.get(0),
            org: r.get(1),
            project: r.get(2),
            created_at: r.get(3),
            status: r.get(4),
            object: r.get(5),
        })
        .collect())
}

pub(super) async fn add(
    client: &mut Client,
    org: &str,
    id: &str,
    lines: &[BatchLine],
) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    let insert = tx
        .prepare(
            "INSERT INTO batch_lines (org, batch_id, line, custom_id, body, state, result)
             VALUES ($1, $2, $3, $4, $5, 'pending', '')",
        )
        .await?;
    for l in lines {
        tx.execute(&insert, &[&org, &id, &l.line, &l.custom_id, &l.body])
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub(super) async fn take(
    client: &Client,
    org: &str,
    id: &str,
    n: i64,
    now_ms: i64,
) -> Result<Vec<BatchLine>, StoreError> {
    let rows = client
        .query(
            "WITH picked AS (
                SELECT line FROM batch_lines WHERE org = $1 AND batch_id = $2 AND state = 'pending'
                ORDER BY line LIMIT $3 FOR UPDATE SKIP LOCKED)
             UPDATE batch_lines b SET state = 'running', claimed_ms = $4
             FROM picked WHERE b.org = $1 AND b.batch_id = $2 AND b.line = picked.line
             RETURNING b.line, b.custom_id, b.body, b.state, b.result, b.claimed_ms",
            &[&org, &id, &n, &now_ms],
        )
        .await?;
    let mut lines: Vec<BatchLine> = rows.iter().map(line).collect();
    lines.sort_by_key(|l| l.line);
    Ok(lines)
}

pub(super) async fn set(
    client: &Client,
    org: &str,
    id: &str,
    n: i64,
    state: &str,
    result: &str,
) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE batch_lines SET state = $4, result = $5 WHERE org = $1 AND batch_id = $2 AND line = $3",
            &[&org, &id, &n, &state, &result],
        )
        .await?;
    Ok(())
}

pub(super) async fn lines(
    client: &Client,
    org: &str,
    id: &str,
    from: i64,
    n: i64,
) -> Result<Vec<BatchLine>, StoreError> {
    let rows = client
        .query(
            "SELECT line, custom_id, body, state, result, claimed_ms FROM batch_lines
             WHERE org = $1 AND batch_id = $2 AND line >= $3 ORDER BY line LIMIT $4",
            &[&org, &id, &from, &n],
        )
        .await?;
    Ok(rows.iter().map(line).collect())
}

pub(super) async fn counts(
    client: &Client,
    org: &str,
    id: &str,
) -> Result<Vec<(String, u64)>, StoreError> {
    let rows = client
        .query(
            "SELECT state, COUNT(*) FROM batch_lines WHERE org = $1 AND batch_id = $2 GROUP BY state",
            &[&org, &id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), u64::try_from(r.get::<_, i64>(1)).unwrap_or(0)))
        .collect())
}
