//! The writer and the SQL of every write: one batch of queued jobs per
//! transaction (group commit), each job answered after the commit.

use std::sync::{Arc, Condvar, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use super::{as_i64, Admitted, Settled};
use crate::alerts::Fired;
use crate::capture::Capture;
use crate::day::Day;

/// A write for the writer, with where to send its result.
pub(super) enum Job {
    Admit(Admitted, Reply<i64>),
    Settle(i64, Settled, Reply<()>),
    Refuse(Admitted, u16, Reply<()>),
    Recover(Reply<usize>),
    Alert(Fired),
    AlertDelivered(Fired, u32, bool),
    Capture(Capture),
    Purge(String, i64, Reply<usize>),
}

/// Where a job's result goes: an async caller, a blocking caller, or nobody.
pub(super) enum Reply<T> {
    Async(tokio::sync::oneshot::Sender<Result<T, String>>),
    Blocking(std::sync::mpsc::SyncSender<Result<T, String>>),
    None,
}

impl<T> Reply<T> {
    pub(super) fn send(self, result: Result<T, String>) {
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

/// The writer: one connection, a queue, and a thread that commits whatever
/// has queued up in one transaction (group commit), answering each job after
/// the commit. When few calls are open and nothing is queued or being
/// written, a caller writes its job itself, on its own thread, instead of
/// handing it to the writer thread and waiting to be woken: one call at a
/// time pays one insert and one commit (tens of microseconds in WAL mode) and
/// no thread hand-offs, while under load the thread's batches keep many calls
/// to one commit (single-job commits on the runtime's threads cost a quarter
/// of the throughput, measured). A job only goes inline when no earlier job
/// is pending, so jobs commit in the order given.
pub(super) struct Writer {
    conn: Mutex<Connection>,
    state: Mutex<Queue>,
    ready: Condvar,
    /// Counts commits: the dashboard's cue.
    committed: tokio::sync::watch::Sender<u64>,
}

#[derive(Default)]
struct Queue {
    jobs: Vec<Job>,
    /// The writer thread holds a batch it has not committed yet.
    busy: bool,
    /// The last store handle is gone: the thread ends.
    closed: bool,
}

/// Jobs in one transaction at most.
const BATCH: usize = 1024;

impl Writer {
    /// The writer and its thread; the thread ends when the writer is dropped
    /// (`close`).
    pub(super) fn start(
        conn: Connection,
        committed: tokio::sync::watch::Sender<u64>,
    ) -> std::io::Result<Arc<Writer>> {
        let writer = Arc::new(Writer {
            conn: Mutex::new(conn),
            state: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            committed,
        });
        let thread = writer.clone();
        std::thread::Builder::new()
            .name("tokenwarden-store".into())
            .spawn(move || thread.run())?;
        Ok(writer)
    }

    /// Queue `job`, or write it now when `inline` allows and nothing is pending.
    pub(super) fn submit(&self, job: Job, inline: bool) {
        let mut state = lock(&self.state);
        if inline && state.jobs.is_empty() && !state.busy {
            if let Ok(mut conn) = self.conn.try_lock() {
                drop(state);
                write_batch(&mut conn, vec![job]);
                drop(conn);
                self.committed.send_modify(|n| *n = n.wrapping_add(1));
                return;
            }
        }
        state.jobs.push(job);
        drop(state);
        self.ready.notify_one();
    }

    /// Stop the thread once the queue is empty.
    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_one();
    }

    fn run(&self) {
        loop {
            let batch: Vec<Job> = {
                let mut state = lock(&self.state);
                while state.jobs.is_empty() && !state.closed {
                    state = self
                        .ready
                        .wait(state)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if state.jobs.is_empty() {
                    return;
                }
                let n = state.jobs.len().min(BATCH);
                state.busy = true;
                state.jobs.drain(..n).collect()
            };
            let mut conn = lock(&self.conn);
            write_batch(&mut conn, batch);
            drop(conn);
            lock(&self.state).busy = false;
            self.committed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Apply a batch in one transaction, commit, then answer each job. If the
/// batch fails, each job is retried alone so that one bad write cannot fail
/// the others.
fn write_batch(conn: &mut Connection, batch: Vec<Job>) {
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
        Job::Purge(_, _, reply) => {
            reply.send(done.map(|d| if let Done::Count(n) = d { n } else { 0 }))
        }
        Job::Alert(..) | Job::AlertDelivered(..) | Job::Capture(..) => {}
    }
}

fn apply(tx: &rusqlite::Transaction<'_>, job: &Job) -> Result<Done, rusqlite::Error> {
    match job {
        Job::Admit(a, _) => admit(tx, a).map(Done::Row),
        Job::Settle(id, s, _) => settle(tx, *id, s).map(|()| Done::Unit),
        Job::Refuse(a, status, _) => refuse(tx, a, *status).map(|()| Done::Unit),
        Job::Recover(_) => recover(tx).map(Done::Count),
        Job::Alert(f) => alert(tx, f).map(|()| Done::Unit),
        Job::Capture(c) => tx
            .prepare_cached(
                "INSERT INTO captures (started_ms, org, project, model, endpoint, streamed, input_tokens, output_tokens, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                c.started_ms,
                c.org,
                c.project,
                c.model,
                c.endpoint,
                c.streamed,
                as_i64(c.input_tokens),
                as_i64(c.output_tokens),
                c.body
            ])
            .map(|_| Done::Unit),
        Job::Purge(org, before_ms, _) => tx
            .prepare_cached("DELETE FROM captures WHERE org = ?1 AND started_ms < ?2")?
            .execute(params![org, before_ms])
            .map(Done::Count),
        Job::AlertDelivered(f, attempts, delivered) => tx
            .prepare_cached(
                "UPDATE alerts SET attempts = ?5, delivered = ?6
                 WHERE day = ?1 AND org = ?2 AND grp = ?3 AND rule = ?4",
            )?
            .execute(params![
                f.day.0, f.org, f.group, f.rule, attempts, delivered
            ])
            .map(|_| Done::Unit),
    }
}

fn alert(tx: &rusqlite::Transaction<'_>, f: &Fired) -> Result<(), rusqlite::Error> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO alerts (day, org, grp, rule, fired_ms, text, cap, used, billed_cost_pico, exhausted_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        f.day.0,
        f.org,
        f.group,
        f.rule,
        f.fired_ms,
        f.text,
        as_i64(f.cap),
        as_i64(f.used),
        as_i64(f.billed_cost_pico),
        f.exhausted_at_ms
    ])?;
    Ok(())
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
            served_model, grp, decision, reserved, free_lane, streamed, state, status, shared)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
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
        a.shared,
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
