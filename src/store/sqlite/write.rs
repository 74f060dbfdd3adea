//! The writer and the SQL of every write: one batch of queued jobs per
//! transaction (group commit), off the callers' path.

use std::sync::{Arc, Condvar, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Statement};

use super::journal::{Entry, Journal};
use super::{as_i64, Admitted, Settled};
use crate::alerts::Fired;
use crate::capture::Capture;
use crate::day::Day;

/// A write for the writer, with where to send its result.
pub(super) enum Job {
    Admit(i64, Admitted),
    Settle(i64, Settled),
    Refuse(i64, Admitted, u16),
    Recover(Reply<usize>),
    Alert(Fired),
    AlertDelivered(Fired, u32, bool),
    Capture(Capture),
    Forward(crate::store::Forwarded),
    Purge(String, i64, Reply<usize>),
    Change(crate::store::ChangeRow, Reply<i64>),
    /// A write of its own (files, rare ones): its statements, and how many
    /// rows they changed.
    Run(RunFn, Reply<usize>),
}

/// The statements of a [`Job::Run`].
pub(super) type RunFn =
    Box<dyn Fn(&rusqlite::Transaction<'_>) -> Result<usize, rusqlite::Error> + Send>;

/// Where a job's result goes: a caller waiting for it.
pub(super) struct Reply<T>(pub(super) std::sync::mpsc::SyncSender<Result<T, String>>);

impl<T> Reply<T> {
    pub(super) fn send(self, result: Result<T, String>) {
        let _ = self.0.send(result);
    }
}

/// How long the writer gathers jobs before a commit, unless a reader or a
/// caller waiting for an answer is in a hurry. Durability does not wait for
/// it: the journal has each call before its caller goes on. 20 ms rather
/// than 5: at 1,000 calls/s the writer's thread then uses 1.1-1.2% of a core
/// instead of 2.2-2.5% (the p99 of the calls moved within the machine's noise).
const GATHER: std::time::Duration = std::time::Duration::from_millis(20);

/// How long the writer works on a batch before it lets the scheduler run
/// another thread waiting for its core. A commit of a hundred calls (one
/// call at a time, 20 ms) keeps the core for several hundred microseconds,
/// and a gateway worker woken onto that core waited behind it. One call at
/// a time, p99 was 613-778 µs without the yields and 353-388 with them
/// (gathering for 5 ms: 415-463 and 332-501).
const YIELD_AFTER: std::time::Duration = std::time::Duration::from_micros(50);

/// The writer: one connection, a queue, and a thread that commits whatever
/// has queued up in one transaction (group commit).
///
/// A call's rows (admitted, settled, refused) are appended to the journal
/// under the queue's lock, so the journal's order is the queue's, and the
/// caller goes on at once: no SQLite transaction, no hand-off to another
/// thread and no wait on the request's path (one call at a time used to pay
/// two commits, about 100 µs, measured). The thread wakes when the queue
/// stops being empty, gathers for [`GATHER`], commits the batch, and empties
/// a journal file once all its records are committed. In-process reads wait
/// for the jobs queued before them ([`Writer::sync`]), so the gateway reads
/// its own writes.
pub(super) struct Writer {
    conn: Mutex<Connection>,
    state: Mutex<Queue>,
    /// The thread waits here for work, and for a hurry while it gathers.
    ready: Condvar,
    /// Readers wait here for a commit.
    done: Condvar,
    /// Counts commits: the dashboard's cue.
    committed: tokio::sync::watch::Sender<u64>,
    /// The id the next call's row gets.
    next_id: std::sync::atomic::AtomicI64,
}

struct Queue {
    jobs: Vec<Job>,
    /// `None` when another process owns the ledger: calls cannot be written.
    journal: Option<Journal>,
    /// Jobs ever queued, and jobs committed (or failed): sequence numbers.
    queued: u64,
    committed: u64,
    /// The thread waits for the queue to stop being empty: wake it.
    idle: bool,
    /// Someone waits for a commit: do not gather.
    hurry: bool,
    /// The last store handle is gone: the thread commits what is left and ends.
    closed: bool,
    /// A write failed: the journal is never emptied, so that the next start
    /// replays what the ledger may lack.
    keep_journal: bool,
}

const NOT_OWNER: &str =
    "another tokenwarden process owns this ledger; it is open here for reading only";

/// Jobs in one transaction at most.
const BATCH: usize = 1024;

impl Writer {
    /// The writer and its thread; the thread ends when the writer is closed.
    pub(super) fn start(
        conn: Connection,
        journal: Option<Journal>,
        next_id: i64,
        committed: tokio::sync::watch::Sender<u64>,
    ) -> std::io::Result<(Arc<Writer>, std::thread::JoinHandle<()>)> {
        let writer = Arc::new(Writer {
            conn: Mutex::new(conn),
            state: Mutex::new(Queue {
                jobs: Vec::new(),
                journal,
                queued: 0,
                committed: 0,
                idle: false,
                hurry: false,
                closed: false,
                keep_journal: false,
            }),
            ready: Condvar::new(),
            done: Condvar::new(),
            committed,
            next_id: std::sync::atomic::AtomicI64::new(next_id),
        });
        let thread = writer.clone();
        let handle = std::thread::Builder::new()
            .name("tokenwarden-store".into())
            .spawn(move || thread.run())?;
        Ok((writer, handle))
    }

    /// Queue `job` (nothing to journal: alerts, captures, maintenance).
    pub(super) fn submit(&self, job: Job) -> Result<(), String> {
        let hurry = matches!(
            job,
            Job::Recover(_) | Job::Purge(..) | Job::Change(..) | Job::Run(..)
        );
        let mut state = lock(&self.state);
        if state.journal.is_none() {
            return Err(NOT_OWNER.into());
        }
        self.push(&mut state, job, hurry);
        Ok(())
    }

    /// Journal a call's row (`Admit`, `Refuse` or `Settle`), then queue it.
    /// Fails when the journal cannot be written (or another process owns the
    /// ledger): the caller must not go on as if the row were durable.
    pub(super) fn journal(&self, job: Job) -> Result<(), String> {
        let mut state = lock(&self.state);
        let seq = state.queued + 1;
        let journal = state.journal.as_mut().ok_or_else(|| NOT_OWNER.to_owned())?;
        let entry = match &job {
            Job::Admit(id, a) => Entry::Admit(*id, a),
            Job::Refuse(id, a, status) => Entry::Refuse(*id, a, *status),
            Job::Settle(id, s) => Entry::Settle(*id, s),
            _ => return Err("only a call's rows are journaled".into()),
        };
        journal
            .append(seq, entry)
            .map_err(|e| format!("the call journal: {e}"))?;
        self.push(&mut state, job, false);
        Ok(())
    }

    /// The next call's id.
    pub(super) fn next_id(&self) -> i64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn push(&self, state: &mut Queue, job: Job, hurry: bool) {
        state.jobs.push(job);
        state.queued += 1;
        state.hurry |= hurry;
        if state.idle || hurry {
            state.idle = false;
            self.ready.notify_one();
        }
    }

    /// Wait until every job queued before now is committed.
    pub(super) fn sync(&self) {
        let mut state = lock(&self.state);
        let target = state.queued;
        if state.committed >= target {
            return;
        }
        state.hurry = true;
        self.ready.notify_one();
        while state.committed < target {
            state = self
                .done
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Commit what is queued and stop the thread.
    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_one();
    }

    fn run(&self) {
        loop {
            let (batch, upto) = {
                let mut state = lock(&self.state);
                while state.jobs.is_empty() && !state.closed {
                    state.idle = true;
                    state = self
                        .ready
                        .wait(state)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                state.idle = false;
                if state.jobs.is_empty() {
                    if !state.keep_journal {
                        if let Some(journal) = state.journal.as_mut() {
                            journal.clear();
                        }
                    }
                    return;
                }
                if !state.hurry && !state.closed && state.jobs.len() < BATCH {
                    state = self
                        .ready
                        .wait_timeout(state, GATHER)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
                state.hurry = false;
                let n = state.jobs.len().min(BATCH);
                let upto = state.committed + n as u64;
                (state.jobs.drain(..n).collect::<Vec<Job>>(), upto)
            };
            let mut conn = lock(&self.conn);
            let written = write_batch(&mut conn, batch);
            drop(conn);
            let empty = {
                let mut state = lock(&self.state);
                state.committed = upto;
                self.done.notify_all();
                if !written && !state.keep_journal {
                    tracing::error!(
                        "the call journal is kept as it is until the next start, which replays it"
                    );
                    state.keep_journal = true;
                }
                if state.keep_journal {
                    None
                } else {
                    state.journal.as_mut().and_then(|j| j.after_commit(upto))
                }
            };
            if let Some(file) = empty {
                if let Err(e) = super::journal::empty(&file) {
                    tracing::warn!(error = %e, "could not empty a call journal file");
                }
            }
            self.committed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Apply the journal's records in one transaction (at open, before the
/// writer starts). Records already committed change nothing.
pub(super) fn replay(
    conn: &mut Connection,
    records: Vec<super::journal::Replayed>,
) -> Result<(), rusqlite::Error> {
    use super::journal::Replayed;
    let tx = conn.transaction()?;
    let mut daily = Daily::default();
    let mut rows = tx.prepare_cached(INSERT)?;
    for record in records {
        match record {
            Replayed::Admit(id, a) => {
                insert(&mut rows, id, &a, a.decision, "pending", 0, None)?;
            }
            Replayed::Refuse(id, a, status) => refuse(&mut rows, id, &a, status, &mut daily)?,
            Replayed::Settle(id, s) => settle(&tx, id, &s, &mut daily)?,
        }
    }
    drop(rows);
    daily.write(&tx)?;
    tx.commit()
}

/// Apply a batch in one transaction, commit, then answer each job. If the
/// batch fails, each job is retried alone so that one bad write cannot fail
/// the others. Returns whether every job was written.
fn write_batch(conn: &mut Connection, batch: Vec<Job>) -> bool {
    let together = (|| -> Result<Vec<Done>, rusqlite::Error> {
        let tx = conn.transaction()?;
        // A call admitted and settled within one batch (most whole answers,
        // under load) is written once, as settled: one insert instead of an
        // insert, a read and an update, and no pending index entry.
        let admitted: crate::FastSet<i64> = batch
            .iter()
            .filter_map(|job| match job {
                Job::Admit(id, _) => Some(*id),
                _ => None,
            })
            .collect();
        let mut settled: crate::FastMap<i64, &Settled> = crate::FastMap::default();
        for job in &batch {
            if let Job::Settle(id, s) = job {
                if admitted.contains(id) {
                    // The first settlement counts, as in `settle`.
                    settled.entry(*id).or_insert(s);
                }
            }
        }
        let mut daily = Daily::default();
        // Taken once for the batch: taking a cached statement hashes its
        // SQL, and giving it back resets it and files it again.
        let mut rows = tx.prepare_cached(INSERT)?;
        let mut turn = std::time::Instant::now();
        let done = batch
            .iter()
            .inspect(|_| {
                if turn.elapsed() >= YIELD_AFTER {
                    std::thread::yield_now();
                    turn = std::time::Instant::now();
                }
            })
            .map(|job| match job {
                Job::Admit(id, a) => match settled.get(id) {
                    Some(s) => {
                        insert_settled(&tx, &mut rows, *id, a, s, &mut daily).map(|()| Done::Unit)
                    }
                    None => apply(&tx, &mut rows, job, &mut daily),
                },
                Job::Settle(id, _) if settled.contains_key(id) => Ok(Done::Unit),
                _ => apply(&tx, &mut rows, job, &mut daily),
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop(rows);
        daily.write(&tx)?;
        tx.commit()?;
        Ok(done)
    })();
    match together {
        Ok(done) => {
            for (job, done) in batch.into_iter().zip(done) {
                answer(job, Ok(done));
            }
            true
        }
        Err(_) => {
            let mut all = true;
            for job in batch {
                let alone = (|| -> Result<Done, rusqlite::Error> {
                    let tx = conn.transaction()?;
                    let mut daily = Daily::default();
                    let mut rows = tx.prepare_cached(INSERT)?;
                    let done = apply(&tx, &mut rows, &job, &mut daily)?;
                    drop(rows);
                    daily.write(&tx)?;
                    tx.commit()?;
                    Ok(done)
                })();
                if let Err(e) = &alone {
                    tracing::error!(error = %e, "a ledger write failed");
                    all = false;
                }
                answer(job, alone.map_err(|e| e.to_string()));
            }
            all
        }
    }
}

/// What a job produced.
enum Done {
    Unit,
    Count(usize),
    Id(i64),
}

fn answer(job: Job, done: Result<Done, String>) {
    match job {
        Job::Recover(reply) => reply.send(done.map(|d| if let Done::Count(n) = d { n } else { 0 })),
        Job::Purge(_, _, reply) => {
            reply.send(done.map(|d| if let Done::Count(n) = d { n } else { 0 }))
        }
        Job::Change(_, reply) => reply.send(done.map(|d| if let Done::Id(n) = d { n } else { 0 })),
        Job::Run(_, reply) => reply.send(done.map(|d| if let Done::Count(n) = d { n } else { 0 })),
        Job::Admit(..)
        | Job::Settle(..)
        | Job::Refuse(..)
        | Job::Alert(..)
        | Job::AlertDelivered(..)
        | Job::Capture(..)
        | Job::Forward(..) => {}
    }
}

fn apply(
    tx: &rusqlite::Transaction<'_>,
    rows: &mut Statement<'_>,
    job: &Job,
    daily: &mut Daily,
) -> Result<Done, rusqlite::Error> {
    match job {
        Job::Admit(id, a) => {
            insert(rows, *id, a, a.decision, "pending", 0, None).map(|_| Done::Unit)
        }
        Job::Settle(id, s) => settle(tx, *id, s, daily).map(|()| Done::Unit),
        Job::Refuse(id, a, status) => refuse(rows, *id, a, *status, daily).map(|()| Done::Unit),
        Job::Recover(_) => recover(tx, daily).map(Done::Count),
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
        Job::Forward(f) => tx
            .prepare_cached(
                "INSERT INTO forwarded (started_ms, org, project, key_id, method, path, status, latency_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                f.started_ms,
                &*f.org,
                &*f.project,
                &*f.key_id,
                f.method,
                f.path,
                f.status,
                as_i64(f.latency_ms)
            ])
            .map(|_| Done::Unit),
        Job::Change(c, _) => tx
            .prepare_cached(
                "INSERT INTO changes (at_ms, org, actor, body) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![c.at_ms, c.org, c.actor, c.body])
            .map(|_| Done::Id(tx.last_insert_rowid())),
        Job::Run(statements, _) => statements(tx).map(Done::Count),
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

/// The statement that inserts a call's row ([`insert`] binds it).
const INSERT: &str = "INSERT OR IGNORE INTO requests (started_ms, day, org, project, key_id, endpoint, requested_model,
        served_model, grp, decision, reserved, free_lane, streamed, state, status, shared, id,
        input_tokens, cached_tokens, output_tokens, reasoning_tokens, free, cost_pico, latency_ms, estimated)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
        ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)";

/// Insert a call's row under its id with `rows`, the batch's [`INSERT`];
/// `decision`, `state` and `status` differ between an admitted call, a
/// refused one and one settled in the batch that admitted it (which brings
/// its usage; the others start at zero). Returns whether the row is new (a
/// replayed record may already be in the ledger).
fn insert(
    rows: &mut Statement<'_>,
    id: i64,
    a: &Admitted,
    decision: &str,
    state: &str,
    status: u16,
    settled: Option<&Settled>,
) -> Result<bool, rusqlite::Error> {
    let zero = Settled::default();
    let s = settled.unwrap_or(&zero);
    let n = rows.execute(params![
        a.started_ms,
        a.day.0,
        a.org,
        a.project,
        a.key_id,
        a.endpoint,
        a.requested_model,
        s.served_model.as_deref().unwrap_or(&a.served_model),
        a.group,
        decision,
        as_i64(a.reserved),
        a.free_lane,
        a.streamed,
        state,
        status,
        a.shared,
        id,
        as_i64(s.input),
        as_i64(s.cached),
        as_i64(s.output),
        as_i64(s.reasoning),
        s.free,
        as_i64(s.cost_pico),
        as_i64(s.latency_ms),
        s.estimated,
    ])?;
    Ok(n == 1)
}

/// A call admitted and settled in the same batch: its row as `settle` would
/// leave it, written once, and its day's totals.
fn insert_settled(
    tx: &rusqlite::Transaction<'_>,
    rows: &mut Statement<'_>,
    id: i64,
    a: &Admitted,
    s: &Settled,
    daily: &mut Daily,
) -> Result<(), rusqlite::Error> {
    if !insert(rows, id, a, a.decision, "settled", s.status, Some(s))? {
        // Replayed after its row was written: apply it as a settlement.
        return settle(tx, id, s, daily);
    }
    add_settled(daily, a.day, &a.org, a.group.as_deref(), s);
    Ok(())
}

/// Add a settled call to its day's totals.
fn add_settled(daily: &mut Daily, day: Day, org: &str, group: Option<&str>, s: &Settled) {
    let total = as_i64(s.input.saturating_add(s.output));
    let (free, billed) = if s.free { (total, 0) } else { (0, total) };
    daily.add(
        day,
        org,
        group.unwrap_or(""),
        [free, billed, as_i64(s.cost_pico), 1],
    );
}

/// A refused call: settled at once, nothing reserved or used.
fn refuse(
    rows: &mut Statement<'_>,
    id: i64,
    a: &Admitted,
    status: u16,
    daily: &mut Daily,
) -> Result<(), rusqlite::Error> {
    if insert(rows, id, a, "refused", "settled", status, None)? {
        daily.add(
            a.day,
            &a.org,
            a.group.as_deref().unwrap_or(""),
            [0, 0, 0, 1],
        );
    }
    Ok(())
}

/// Settle a pending call and add it to its day's totals; settling twice changes nothing.
fn settle(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    s: &Settled,
    daily: &mut Daily,
) -> Result<(), rusqlite::Error> {
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
    add_settled(daily, Day(day), &org, group.as_deref(), s);
    Ok(())
}

fn recover(tx: &rusqlite::Transaction<'_>, daily: &mut Daily) -> Result<usize, rusqlite::Error> {
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
        daily.add(
            Day(*day),
            org,
            group.as_deref().unwrap_or(""),
            [free_tokens, 0, 0, 1],
        );
    }
    Ok(pending.len())
}

/// What a transaction adds to the daily totals, per day, org and group
/// (free tokens, billed tokens, cost, requests), written once per key when
/// the transaction ends: one upsert per org and group a batch instead of one
/// per call (a third of the writer's work a call, measured with callgrind).
#[derive(Default)]
struct Daily(crate::FastMap<String, Vec<(i64, String, [i64; 4])>>);

impl Daily {
    /// Looked up by `&str`: a call allocates nothing here once its org,
    /// day and group are in the batch (an org has a few groups).
    fn add(&mut self, day: Day, org: &str, group: &str, add: [i64; 4]) {
        let rows = match self.0.get_mut(org) {
            Some(rows) => rows,
            None => self.0.entry(org.to_owned()).or_default(),
        };
        let i = match rows.iter().position(|(d, g, _)| *d == day.0 && g == group) {
            Some(i) => i,
            None => {
                rows.push((day.0, group.to_owned(), [0; 4]));
                rows.len() - 1
            }
        };
        let sums = &mut rows[i].2;
        for (sum, n) in sums.iter_mut().zip(add) {
            *sum = sum.saturating_add(n);
        }
    }

    /// Add the sums to the `daily` table, inside the transaction that made them.
    fn write(self, tx: &rusqlite::Transaction<'_>) -> Result<(), rusqlite::Error> {
        let mut upsert = tx.prepare_cached(&UPSERT_DAILY)?;
        for (org, rows) in self.0 {
            for (day, group, [free, billed, cost, requests]) in rows {
                upsert.execute(params![day, org, group, free, billed, cost, requests])?;
            }
        }
        Ok(())
    }
}

/// The daily totals' upsert. Each sum saturates at `i64::MAX` rather than
/// overflow (SQLite turns an overflowing integer sum into a REAL, which no
/// reader of an integer column takes); a REAL an older version left there
/// saturates too.
static UPSERT_DAILY: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let saturating = |column: &str| {
        format!(
            "CASE WHEN typeof({column}) = 'integer' AND {column} <= 9223372036854775807 - excluded.{column}
                 THEN {column} + excluded.{column} ELSE 9223372036854775807 END"
        )
    };
    format!(
        "INSERT INTO daily (day, org, grp, free_tokens, billed_tokens, cost_pico, requests)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (day, org, grp) DO UPDATE SET
                free_tokens = {free_tokens},
                billed_tokens = {billed_tokens},
                cost_pico = {cost_pico},
                requests = {requests}",
        free_tokens = saturating("free_tokens"),
        billed_tokens = saturating("billed_tokens"),
        cost_pico = saturating("cost_pico"),
        requests = saturating("requests"),
    )
});
