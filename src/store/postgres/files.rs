//! The Files API's files in PostgreSQL: a row each, keyed by org, and their
//! parts (at most [`crate::store::FILE_PART`] bytes each).

use tokio_postgres::Client;

use crate::store::{FileMeta, StoreError};

pub(super) async fn begin(client: &Client, m: &FileMeta) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO files (org, id, project, purpose, filename, bytes, created_at, complete)
             VALUES ($1, $2, $3, $4, $5, 0, $6, false)",
            &[
                &m.org,
                &m.id,
                &m.project,
                &m.purpose,
                &m.filename,
                &m.created_at,
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn part(
    client: &Client,
    org: &str,
    id: &str,
    seq: i64,
    data: &[u8],
) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO file_parts (org, file_id, seq, data) VALUES ($1, $2, $3, $4)",
            &[&org, &id, &seq, &data],
        )
        .await?;
    Ok(())
}

pub(super) async fn end(
    client: &Client,
    org: &str,
    id: &str,
    purpose: &str,
    bytes: u64,
) -> Result<(), StoreError> {
    client
        .execute(
            "UPDATE files SET complete = true, purpose = $3, bytes = $4 WHERE org = $1 AND id = $2",
            &[
                &org,
                &id,
                &purpose,
                &i64::try_from(bytes).unwrap_or(i64::MAX),
            ],
        )
        .await?;
    Ok(())
}

pub(super) async fn list(
    client: &Client,
    org: &str,
    project: &str,
) -> Result<Vec<FileMeta>, StoreError> {
    let rows = client
        .query(
            "SELECT id, org, project, purpose, filename, bytes, created_at FROM files
             WHERE org = $1 AND project = $2 AND complete ORDER BY created_at, made",
            &[&org, &project],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| FileMeta {
            id: r.get(0),
            org: r.get(1),
            project: r.get(2),
            purpose: r.get(3),
            filename: r.get(4),
            bytes: u64::try_from(r.get::<_, i64>(5)).unwrap_or(0),
            created_at: r.get(6),
        })
        .collect())
}

pub(super) async fn abandoned(
    client: &Client,
    before_s: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    let rows = client
        .query(
            "SELECT org, id FROM files WHERE NOT complete AND created_at < $1",
            &[&before_s],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

pub(super) async fn parts(
    client: &Client,
    org: &str,
    id: &str,
    from: i64,
    n: i64,
) -> Result<Vec<bytes::Bytes>, StoreError> {
    let rows = client
        .query(
            "SELECT data FROM file_parts WHERE org = $1 AND file_id = $2 AND seq >= $3 ORDER BY seq LIMIT $4",
            &[&org, &id, &from, &n],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| bytes::Bytes::from(r.get::<_, Vec<u8>>(0)))
        .collect())
}

pub(super) async fn delete(client: &mut Client, org: &str, id: &str) -> Result<bool, StoreError> {
    let tx = client.transaction().await?;
    let n = tx
        .execute("DELETE FROM files WHERE org = $1 AND id = $2", &[&org, &id])
        .await?;
    tx.execute(
        "DELETE FROM file_parts WHERE org = $1 AND file_id = $2",
        &[&org, &id],
    )
    .await?;
    tx.commit().await?;
    Ok(n > 0)
}
