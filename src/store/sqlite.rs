//! The SQLite store: one file, WAL, versioned migrations.
//!
//! Writes go to one writer thread that owns the write connection (SQLite has
//! one writer anyway) and commits whatever has queued up in one transaction
//! (group commit): under load, many calls share a commit instead of queueing
//! for one each. A caller that must know its row is durable waits for the
//! commit's answer; a stream settling in the background does not. Reads use
//! their own connection. `synchronous = NORMAL` in WAL mode makes each commit
//! survive the process dying (`kill -9`), which is what the ledger promises.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use super::{Admitted, DailyTotal, Record, Settled, StoreError};
use crate::day::Day;

/// Migrations, applied in order once each; never edit one that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: request records and daily totals.
    "CREATE TABLE requests (
        id INTEGER PRIMARY KEY,
        started_ms INTEGER NOT NULL,
        day INTEGER NOT NULL,
        org TEXT NOT NULL,
        project TEXT NOT NULL,
        key_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        requested_model TEXT NOT NULL,
        served_model TEXT NOT NULL,
        grp TEXT,
        decision TEXT NOT NULL,
        reserved INTEGER NOT NULL,
        free_lane INTEGER NOT NULL,
        streamed INTEGER NOT NULL,
        state TEXT NOT NULL,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        reasoning_tokens INTEGER NOT NULL DEFAULT 0,
        free INTEGER NOT NULL DEFAULT 0,
        cost_pico INTEGER NOT NULL DEFAULT 0,
        status INTEGER NOT NULL DEFAULT 0,
        latency_ms INTEGER NOT NULL DEFAULT 0,
        estimated INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX requests_day_org ON requests(day, org);
    CREATE INDEX requests_state ON requests(state) WHERE state = 'pending';
    CREATE TABLE daily (
        day INTEGER NOT NULL,
        org TEXT NOT NULL,
        grp TEXT NOT NULL,
        free_tokens INTEGER NOT NULL DEFAULT 0,
        billed_tokens INTEGER NOT NULL DEFAULT 0,
        cost_pico INTEGER NOT NULL DEFAULT 0,
        requests INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (day, org, grp)
    );",
];

/// A write for the writer thread, with where to send its result.
enum Job {
    Admit(Admitted, Reply<i64>),
    Settle(i64, Settled, Reply<()>),
    Refuse(Admitted, u16, Reply<()>),
    Recover(Reply<usize>),
}

/// Where a job's result goes: an async caller, a blocking caller, or nobody.
enum Reply<T> {
    Async(tokio::sync::oneshot::Sender<Result<T, String>>),
    Blocking(std::sync::mpsc::SyncSender<Result<T, String>>),
    None,
}

impl<T> Reply<T> {
    fn send(self, result: Result<T, String>) {
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(result);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(result);
            }
            Reply::None => {}
        }
    }
}

#[derive(Clone)]
pub struct SqliteStore {
    /// To the writer thread; it stops when the last store handle is dropped.
    jobs: std::sync::mpsc::Sender<Job>,
    /// The read connection (WAL lets it read while the writer writes).
    conn: Arc<Mutex<Connection>>,
    /// Stops the checkpoint thread when the last store handle is dropped.
    _checkpoints: Arc<Checkpoints>,
}

/// Moves WAL checkpoints off the writer: SQLite's automatic checkpoint runs
/// inside the commit that crosses 1,000 pages, and every call queued behind
/// that commit waits for it. A thread of its own checkpoints (passively,
/// never blocking the writer) every quarter second instead.
struct Checkpoints {
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Checkpoints {
    fn start(path: &Path) -> Result<Self, StoreError> {
        let conn = connect(path)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("tokenwarden-checkpoint".into())
            .spawn(move || {
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(std::time::Duration::from_millis(250));
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    {
                        tracing::warn!(error = %e, "WAL checkpoint failed");
                    }
                }
            })
            .map_err(|e| StoreError(format!("store checkpoint thread: {e}")))?;
        Ok(Checkpoints { stop })
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn as_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

impl SqliteStore {
    /// Open (creating if needed) and migrate the database at `path`, and
    /// start its writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError(format!("{}: {e}", dir.display())))?;
        }
        let mut writer = connect(path)?;
        migrate(&mut writer)?;
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        let reader = connect(path)?;
        let (jobs, queue) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("tokenwarden-store".into())
            .spawn(move || write_loop(writer, queue))
            .map_err(|e| StoreError(format!("store writer thread: {e}")))?;
        Ok(SqliteStore {
            jobs,
            conn: Arc::new(Mutex::new(reader)),
            _checkpoints: Arc::new(Checkpoints::start(path)?),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| StoreError("connection lock poisoned".into()))?;
        Ok(f(&mut conn)?)
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.jobs
            .send(job)
            .map_err(|_| StoreError("the store writer has stopped".into()))
    }

    async fn ask<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(job(Reply::Async(tx)))?;
        rx.await
            .map_err(|_| StoreError("the store writer has stopped".into()))?
            .map_err(StoreError)
    }

    fn ask_blocking<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(job(Reply::Blocking(tx)))?;
        rx.recv()
            .map_err(|_| StoreError("the store writer has stopped".into()))?
            .map_err(StoreError)
    }

    /// Record an admitted call as pending, durably; returns its id.
    pub async fn admit_async(&self, a: Admitted) -> Result<i64, StoreError> {
        self.ask(|reply| Job::Admit(a, reply)).await
    }

    /// The same, for callers outside the async runtime.
    pub fn admit(&self, a: &Admitted) -> Result<i64, StoreError> {
        self.ask_blocking(|reply| Job::Admit(a.clone(), reply))
    }

    /// Record a refused call (no tokens, nothing reserved), durably.
    pub async fn refuse_async(&self, a: Admitted, status: u16) -> Result<(), StoreError> {
        self.ask(|reply| Job::Refuse(a, status, reply)).await
    }

    /// Settle a pending call and add it to its day's totals, durably.
    pub async fn settle_async(&self, id: i64, s: Settled) -> Result<(), StoreError> {
        self.ask(|reply| Job::Settle(id, s, reply)).await
    }

    /// The same, for callers outside the async runtime.
    pub fn settle(&self, id: i64, s: &Settled) -> Result<(), StoreError> {
        self.ask_blocking(|reply| Job::Settle(id, s.clone(), reply))
    }

    /// Settle without waiting for the commit (a stream that ended, a client
    /// that hung up: nobody is waiting for an answer).
    pub fn settle_nowait(&self, id: i64, s: Settled) -> Result<(), StoreError> {
        self.submit(Job::Settle(id, s, Reply::None))
    }

    /// Settle every call left pending by a crash as `interrupted`: a free-lane
    /// call's reservation counts as free tokens used (an upper bound, so the
    /// allowance is never handed out twice). Returns how many there were.
    pub fn recover(&self) -> Result<usize, StoreError> {
        self.ask_blocking(Job::Recover)
    }
    /// The totals of `day`, every org and group.
    pub fn daily(&self, day: Day) -> Result<Vec<DailyTotal>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT org, grp, free_tokens, billed_tokens, cost_pico, requests FROM daily WHERE day = ?1 ORDER BY org, grp",
            )?
            .query_map(params![day.0], |r| {
                Ok(DailyTotal {
                    day,
                    org: r.get(0)?,
                    group: r.get(1)?,
                    free_tokens: as_u64(r.get(2)?),
                    billed_tokens: as_u64(r.get(3)?),
                    cost_pico: as_u64(r.get(4)?),
                    requests: as_u64(r.get(5)?),
                })
            })?
            .collect()
        })
    }

    /// The latest `limit` calls, newest first (metadata only; no content is stored).
    pub fn recent(&self, limit: u64) -> Result<Vec<Record>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT id, org, project, requested_model, served_model, grp, decision, state, input_tokens,
                        cached_tokens, output_tokens, free, cost_pico, status, estimated
                 FROM requests ORDER BY id DESC LIMIT ?1",
            )?
            .query_map(params![as_i64(limit)], |r| {
                Ok(Record {
                    id: r.get(0)?,
                    org: r.get(1)?,
                    project: r.get(2)?,
                    requested_model: r.get(3)?,
                    served_model: r.get(4)?,
                    group: r.get(5)?,
                    decision: r.get(6)?,
                    state: r.get(7)?,
                    input: as_u64(r.get(8)?),
                    cached: as_u64(r.get(9)?),
                    output: as_u64(r.get(10)?),
                    free: r.get(11)?,
                    cost_pico: as_u64(r.get(12)?),
                    status: r.get(13)?,
                    estimated: r.get(14)?,
                })
            })?
            .collect()
        })
    }

    /// Rows of `requests` in a state, for tests and audits.
    pub fn count_requests(&self, state: &str) -> Result<u64, StoreError> {
        self.with(|conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM requests WHERE state = ?1",
                params![state],
                |r| r.get::<_, i64>(0),
            )
            .map(as_u64)
        })
    }
}

/// The writer thread: take every job that has queued up, apply them in one
/// transaction, commit, then answer each. If the batch fails, each job is
/// retried alone so that one bad write cannot fail the others.
fn write_loop(mut conn: Connection, queue: std::sync::mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < 1024 {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let together = (|| -> Result<Vec<Done>, rusqlite::Error> {
            let tx = conn.transaction()?;
            let done = batch
                .iter()
                .map(|job| apply(&tx, job))
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit()?;
            Ok(done)
        })();
        match together {
            Ok(done) => {
                for (job, done) in batch.into_iter().zip(done) {
                    answer(job, Ok(done));
                }
            }
            Err(_) => {
                for job in batch {
                    let alone = (|| -> Result<Done, rusqlite::Error> {
                        let tx = conn.transaction()?;
                        let done = apply(&tx, &job)?;
                        tx.commit()?;
                        Ok(done)
                    })();
                    if let Err(e) = &alone {
                        tracing::error!(error = %e, "a ledger write failed");
                    }
                    answer(job, alone.map_err(|e| e.to_string()));
                }
            }
        }
    }
}

/// What a job produced.
enum Done {
    Row(i64),
    Unit,
    Count(usize),
}

fn answer(job: Job, done: Result<Done, String>) {
    match job {
        Job::Admit(_, reply) => {
            reply.send(done.map(|d| if let Done::Row(id) = d { id } else { 0 }))
        }
        Job::Settle(_, _, reply) | Job::Refuse(_, _, reply) => reply.send(done.map(|_| ())),
        Job::Recover(reply) => reply.send(done.map(|d| if let Done::Count(n) = d { n } else { 0 })),
    }
}

fn apply(tx: &rusqlite::Transaction<'_>, job: &Job) -> Result<Done, rusqlite::Error> {
    match job {
        Job::Admit(a, _) => admit(tx, a).map(Done::Row),
        Job::Settle(id, s, _) => settle(tx, *id, s).map(|()| Done::Unit),
        Job::Refuse(a, status, _) => refuse(tx, a, *status).map(|()| Done::Unit),
        Job::Recover(_) => recover(tx).map(Done::Count),
    }
}

/// Insert a call's row; `decision`, `state` and `status` differ between an
/// admitted call and a refused one.
fn insert(
    tx: &rusqlite::Transaction<'_>,
    a: &Admitted,
    decision: &str,
    state: &str,
    status: u16,
) -> Result<i64, rusqlite::Error> {
    tx.prepare_cached(
        "INSERT INTO requests (started_ms, day, org, project, key_id, endpoint, requested_model,
            served_model, grp, decision, reserved, free_lane, streamed, state, status)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?
    .execute(params![
        a.started_ms,
        a.day.0,
        a.org,
        a.project,
        a.key_id,
        a.endpoint,
        a.requested_model,
        a.served_model,
        a.group,
        decision,
        as_i64(a.reserved),
        a.free_lane,
        a.streamed,
        state,
        status,
    ])?;
    Ok(tx.last_insert_rowid())
}

fn admit(tx: &rusqlite::Transaction<'_>, a: &Admitted) -> Result<i64, rusqlite::Error> {
    insert(tx, a, a.decision, "pending", 0)
}

/// A refused call: settled at once, nothing reserved or used.
fn refuse(
    tx: &rusqlite::Transaction<'_>,
    a: &Admitted,
    status: u16,
) -> Result<(), rusqlite::Error> {
    insert(tx, a, "refused", "settled", status)?;
    add_daily(
        tx,
        a.day,
        &a.org,
        a.group.as_deref().unwrap_or(""),
        0,
        0,
        0,
        1,
    )
}

/// Settle a pending call and add it to its day's totals; settling twice changes nothing.
fn settle(tx: &rusqlite::Transaction<'_>, id: i64, s: &Settled) -> Result<(), rusqlite::Error> {
    let row: Option<(i64, String, Option<String>, String)> = tx
        .prepare_cached("SELECT day, org, grp, state FROM requests WHERE id = ?1")?
        .query_row(params![id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()?;
    let Some((day, org, group, state)) = row else {
        return Ok(());
    };
    if state != "pending" {
        return Ok(());
    }
    tx.prepare_cached(
        "UPDATE requests SET state = 'settled', served_model = COALESCE(?2, served_model),
            input_tokens = ?3, cached_tokens = ?4, output_tokens = ?5, reasoning_tokens = ?6,
            free = ?7, cost_pico = ?8, status = ?9, latency_ms = ?10, estimated = ?11
         WHERE id = ?1",
    )?
    .execute(params![
        id,
        s.served_model,
        as_i64(s.input),
        as_i64(s.cached),
        as_i64(s.output),
        as_i64(s.reasoning),
        s.free,
        as_i64(s.cost_pico),
        s.status,
        as_i64(s.latency_ms),
        s.estimated,
    ])?;
    let total = as_i64(s.input.saturating_add(s.output));
    let (free, billed) = if s.free { (total, 0) } else { (0, total) };
    add_daily(
        tx,
        Day(day),
        &org,
        group.as_deref().unwrap_or(""),
        free,
        billed,
        as_i64(s.cost_pico),
        1,
    )
}

fn recover(tx: &rusqlite::Transaction<'_>) -> Result<usize, rusqlite::Error> {
    let pending: Vec<(i64, i64, String, Option<String>, i64, bool)> = tx
        .prepare(
            "SELECT id, day, org, grp, reserved, free_lane FROM requests WHERE state = 'pending'",
        )?
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    for (id, day, org, group, reserved, free_lane) in &pending {
        let free_tokens = if *free_lane { *reserved } else { 0 };
        tx.execute(
            "UPDATE requests SET state = 'interrupted', estimated = 1, free = ?2, input_tokens = ?3 WHERE id = ?1",
            params![id, *free_lane, free_tokens],
        )?;
        add_daily(
            tx,
            Day(*day),
            org,
            group.as_deref().unwrap_or(""),
            free_tokens,
            0,
            0,
            1,
        )?;
    }
    Ok(pending.len())
}

#[allow(clippy::too_many_arguments)]
fn add_daily(
    tx: &rusqlite::Transaction<'_>,
    day: Day,
    org: &str,
    group: &str,
    free: i64,
    billed: i64,
    cost: i64,
    requests: i64,
) -> Result<(), rusqlite::Error> {
    tx.prepare_cached(
        "INSERT INTO daily (day, org, grp, free_tokens, billed_tokens, cost_pico, requests)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (day, org, grp) DO UPDATE SET
            free_tokens = free_tokens + excluded.free_tokens,
            billed_tokens = billed_tokens + excluded.billed_tokens,
            cost_pico = cost_pico + excluded.cost_pico,
            requests = requests + excluded.requests",
    )?
    .execute(params![day.0, org, group, free, billed, cost, requests])?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)")?;
    let applied: i64 = conn.query_row(
        "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
        [],
        |r| r.get(0),
    )?;
    if applied > MIGRATIONS.len() as i64 {
        return Err(StoreError(format!(
            "the database is at schema version {applied}, newer than this tokenwarden ({}); upgrade tokenwarden",
            MIGRATIONS.len()
        )));
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_ms) VALUES (?1, ?2)",
            params![i as i64 + 1, now_ms],
        )?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(decision: &'static str, reserved: u64, free_lane: bool) -> Admitted {
        Admitted {
            started_ms: 1,
            day: Day(20_000),
            org: "acme".into(),
            project: "web".into(),
            key_id: "k1".into(),
            endpoint: "/v1/chat/completions",
            requested_model: "gpt-4o".into(),
            served_model: "gpt-4o".into(),
            group: Some("flagship".into()),
            decision,
            reserved,
            free_lane,
            streamed: false,
        }
    }

    #[test]
    fn settles_survive_reopening_and_pending_calls_are_recovered() {
        let dir = std::env::temp_dir().join(format!(
            "tw-store-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("ledger.db");
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let a = store
            .admit(&admitted("free", 100, true))
            .unwrap_or_else(|e| panic!("{e}"));
        let settled = Settled {
            input: 40,
            output: 20,
            free: true,
            status: 200,
            ..Settled::default()
        };
        store.settle(a, &settled).unwrap_or_else(|e| panic!("{e}"));
        // Settling twice changes nothing.
        store.settle(a, &settled).unwrap_or_else(|e| panic!("{e}"));
        let b = store
            .admit(&admitted("billed", 0, false))
            .unwrap_or_else(|e| panic!("{e}"));
        store
            .settle(
                b,
                &Settled {
                    input: 10,
                    output: 5,
                    cost_pico: 999,
                    status: 200,
                    ..Settled::default()
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
        // Left pending, as by a crash.
        store
            .admit(&admitted("free", 70, true))
            .unwrap_or_else(|e| panic!("{e}"));
        drop(store);

        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.recover().unwrap_or_else(|e| panic!("{e}")), 1);
        assert_eq!(store.count_requests("interrupted").unwrap_or_default(), 1);
        let totals = store.daily(Day(20_000)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(totals.len(), 1);
        let t = &totals[0];
        assert_eq!(
            (t.free_tokens, t.billed_tokens, t.cost_pico, t.requests),
            (60 + 70, 15, 999, 3)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
