//! Batches in SQLite: a row each (OpenAI's object as JSON) and their lines,
//! written by the writer and read on the read connection.

use rusqlite::params;

use super::{as_u64, SqliteStore, StoreError};
use crate::store::{BatchLine, BatchRow};

fn line(r: &rusqlite::Row<'_>) -> rusqlite::Result<BatchLine> {
    Ok(BatchLine {
        line: r.get(0)?,
        custom_id: r.get(1)?,
        body: r.get(2)?,
        state: r.get(3)?,
        result: r.get(4)?,
        claimed_ms: r.get(5)?,
    })
}

impl SqliteStore {
    pub fn batch_save(&self, b: BatchRow) -> Result<(), StoreError> {
        self.run(Box::new(move |tx| {
            tx.execute(
                "INSERT INTO batches (id, org, project, created_at, status, object)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET status = excluded.status, object = excluded.object",
                params![b.id, b.org, b.project, b.created_at, b.status, b.object],
            )
        }))
        .map(drop)
    }

    pub fn batches(
        &self,
        org: Option<&str>,
        project: Option<&str>,
    ) -> Result<Vec<BatchRow>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT id, org, project, created_at, status, object FROM batches
                 WHERE (?1 IS NULL OR org = ?1) AND (?2 IS NULL OR project = ?2)
                 ORDER BY created_at, rowid",
            )?
            .query_map(params![org, project], |r| {
                Ok(BatchRow {
                    id: r.get(0)?,
                    org: r.get(1)?,
                    project: r.get(2)?,
                    created_at: r.get(3)?,
                    status: r.get(4)?,
                    object: r.get(5)?,
                })
            })?
            .collect()
        })
    }

    pub fn batch_lines_add(&self, id: String, lines: Vec<BatchLine>) -> Result<(), StoreError> {
        self.run(Box::new(move |tx| {
            let mut insert = tx.prepare_cached(
                "INSERT INTO batch_lines (batch_id, line, custom_id, body, state, result)
                 VALUES (?1, ?2, ?3, ?4, 'pending', '')",
            )?;
            for l in &lines {
                insert.execute(params![id, l.line, l.custom_id, l.body])?;
            }
            Ok(lines.len())
        }))
        .map(drop)
    }

    pub fn batch_take(
        &self,
        id: String,
        n: i64,
        now_ms: i64,
    ) -> Result<Vec<BatchLine>, StoreError> {
        let taken = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = taken.clone();
        self.run(Box::new(move |tx| {
            let lines: Vec<BatchLine> = tx
                .prepare_cached(
                    "UPDATE batch_lines SET state = 'running', claimed_ms = ?3
                     WHERE batch_id = ?1 AND line IN (
                        SELECT line FROM batch_lines WHERE batch_id = ?1 AND state = 'pending'
                        ORDER BY line LIMIT ?2)
                     RETURNING line, custom_id, body, state, result, claimed_ms",
                )?
                .query_map(params![id, n, now_ms], line)?
                .collect::<Result<_, _>>()?;
            let count = lines.len();
            if let Ok(mut out) = out.lock() {
                *out = lines;
            }
            Ok(count)
        }))?;
        let mut lines = taken
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        lines.sort_by_key(|l| l.line);
        Ok(lines)
    }

    pub fn batch_line_set(
        &self,
        id: String,
        line: i64,
        state: String,
        result: String,
    ) -> Result<(), StoreError> {
        self.run(Box::new(move |tx| {
            tx.execute(
                "UPDATE batch_lines SET state = ?3, result = ?4 WHERE batch_id = ?1 AND line = ?2",
                params![id, line, state, result],
            )
        }))
        .map(drop)
    }

    pub fn batch_lines(&self, id: &str, from: i64, n: i64) -> Result<Vec<BatchLine>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT line, custom_id, body, state, result, claimed_ms FROM batch_lines
                 WHERE batch_id = ?1 AND line >= ?2 ORDER BY line LIMIT ?3",
            )?
            .query_map(params![id, from, n], line)?
            .collect()
        })
    }

    pub fn batch_counts(&self, id: &str) -> Result<Vec<(String, u64)>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT state, COUNT(*) FROM batch_lines WHERE batch_id = ?1 GROUP BY state",
            )?
            .query_map(params![id], |r| Ok((r.get(0)?, as_u64(r.get(1)?))))?
            .collect()
        })
    }
}
