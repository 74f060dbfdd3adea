//! The Files API's files in SQLite: a row each, and their parts (at most
//! [`crate::store::FILE_PART`] bytes each), written by the writer and read on
//! the read connection.

use rusqlite::params;

use super::write::Job;
use super::{as_i64, as_u64, SqliteStore, StoreError};
use crate::store::FileMeta;

impl SqliteStore {
    pub(super) fn run(&self, statements: super::write::RunFn) -> Result<usize, StoreError> {
        self.ask_blocking(|reply| Job::Run(statements, reply))
    }

    pub fn file_begin(&self, m: FileMeta) -> Result<(), StoreError> {
        self.run(Box::new(move |tx| {
            tx.execute(
                "INSERT INTO files (id, org, project, purpose, filename, bytes, created_at, complete)
                 VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, 0)",
                params![m.id, m.org, m.project, m.purpose, m.filename, m.created_at],
            )
        }))
        .map(drop)
    }

    pub fn file_part(&self, id: String, seq: i64, data: bytes::Bytes) -> Result<(), StoreError> {
        self.run(Box::new(move |tx| {
            tx.execute(
                "INSERT INTO file_parts (file_id, seq, data) VALUES (?1, ?2, ?3)",
                params![id, seq, &data[..]],
            )
        }))
        .map(drop)
    }

    pub fn file_end(
        &self,
        org: String,
        id: String,
        purpose: String,
        bytes: u64,
    ) -> Result<(), StoreError> {
        self.run(Box::new(move |tx| {
            tx.execute(
                "UPDATE files SET complete = 1, purpose = ?3, bytes = ?4 WHERE org = ?1 AND id = ?2",
                params![org, id, purpose, as_i64(bytes)],
            )
        }))
        .map(drop)
    }

    pub fn files(&self, org: &str, project: &str) -> Result<Vec<FileMeta>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT id, org, project, purpose, filename, bytes, created_at FROM files
                 WHERE org = ?1 AND project = ?2 AND complete = 1 ORDER BY created_at, rowid",
            )?
            .query_map(params![org, project], |r| {
                Ok(FileMeta {
                    id: r.get(0)?,
                    org: r.get(1)?,
                    project: r.get(2)?,
                    purpose: r.get(3)?,
                    filename: r.get(4)?,
                    bytes: as_u64(r.get(5)?),
                    created_at: r.get(6)?,
                })
            })?
            .collect()
        })
    }

    pub fn files_abandoned(&self, before_s: i64) -> Result<Vec<(String, String)>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached("SELECT org, id FROM files WHERE NOT complete AND created_at < ?1")?
                .query_map(params![before_s], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
    }

    pub fn file_parts(
        &self,
        org: &str,
        id: &str,
        from: i64,
        n: i64,
    ) -> Result<Vec<bytes::Bytes>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT p.data FROM file_parts p JOIN files f ON f.id = p.file_id
                 WHERE f.org = ?1 AND p.file_id = ?2 AND p.seq >= ?3 ORDER BY p.seq LIMIT ?4",
            )?
            .query_map(params![org, id, from, n], |r| {
                Ok(bytes::Bytes::from(r.get::<_, Vec<u8>>(0)?))
            })?
            .collect()
        })
    }

    pub fn file_delete(&self, org: String, id: String) -> Result<bool, StoreError> {
        self.run(Box::new(move |tx| {
            let n = tx.execute(
                "DELETE FROM files WHERE org = ?1 AND id = ?2",
                params![org, id],
            )?;
            if n > 0 {
                tx.execute("DELETE FROM file_parts WHERE file_id = ?1", params![id])?;
            }
            Ok(n)
        }))
        .map(|n| n > 0)
    }
}
