//! The replica's writer: one task that commits whatever has queued up,
//! each org's rows in one transaction of its own (no transaction spans two
//! orgs), its statements pipelined, so a batch costs about one round trip
//! however many calls it holds. A batch that fails is tried again, with a
//! growing pause, until PostgreSQL is back: nothing queued is dropped, and
//! a call whose answer waits for its record gets it once it is written.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::types::ToSql;

use super::lease::Leases;
use crate::alerts::Fired;
use crate::meter::PoolKey;
use crate::store::{Admitted, Forwarded, Settled, StoreError};

/// A row on its way to PostgreSQL.
pub(super) enum Job {
    Admit(i64, Admitted),
    Refuse(i64, Admitted, u16),
    Settle {
        id: i64,
        org: Arc<str>,
        /// The pool whose lease the call's free tokens came from.
        pool: Option<(PoolKey, Arc<str>)>,
        settled: Settled,
        done: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Unused lease given back.
    Return {
        pool: PoolKey,
        org: Arc<str>,
        group: Arc<str>,
        tokens: u64,
    },
    Alert(Fired, oneshot::Sender<Result<bool, StoreError>>),
    AlertDelivered(Fired, u32, bool),
    Capture(i64, crate::capture::Capture),
    Forward(i64, Forwarded),
    /// Answered once everything queued before it is committed (a read
    /// that must see this replica's own writes).
    Sync(oneshot::Sender<()>),
}

impl Job {
    fn org(&self) -> &str {
        match self {
            Job::Admit(_, a) | Job::Refuse(_, a, _) => &a.org,
            Job::Settle { org, .. } | Job::Return { org, .. } => org,
            Job::Alert(f, _) | Job::AlertDelivered(f, _, _) => &f.org,
            Job::Capture(_, c) => &c.org,
            Job::Forward(_, f) => &f.org,
            Job::Sync(_) => "",
        }
    }
}

/// What the writer needs besides its queue.
pub(super) struct Context {
    pub(super) pool: deadpool_postgres::Pool,
    pub(super) replica: Arc<str>,
    pub(super) leases: Arc<Leases>,
    /// Counts commits: the dashboard's cue.
    pub(super) committed: Arc<watch::Sender<u64>>,
    /// Whether the last batch failed (new calls are refused meanwhile).
    pub(super) failing: Arc<std::sync::atomic::AtomicBool>,
}

/// The most jobs one batch takes.
const BATCH: usize = 1024;

/// How long a call's pending row waits in memory before it is written: a
/// call that settles sooner (most whole answers) is written once, settled,
/// in one statement. A replica that dies leaves no row for a call younger
/// than this; its reservation is within the lease the others forfeit.
pub(super) const DEFER_PENDING: Duration = Duration::from_secs(1);

/// Pending rows held back ([`DEFER_PENDING`]), oldest first.
#[derive(Default)]
struct Deferred {
    order: std::collections::VecDeque<(tokio::time::Instant, i64)>,
    rows: crate::FastMap<i64, Admitted>,
}

impl Deferred {
    /// Take `job` in: an admission is held back; a settlement brings its
    /// admission back with it (written together, once).
    fn take(&mut self, job: Job, batch: &mut Vec<Job>) {
        match job {
            Job::Admit(id, a) => {
                self.order.push_back((tokio::time::Instant::now(), id));
                self.rows.insert(id, a);
            }
            Job::Settle { id, .. } => {
                if let Some(a) = self.rows.remove(&id) {
                    batch.push(Job::Admit(id, a));
                }
                batch.push(job);
            }
            other => batch.push(other),
        }
    }

    /// Move the admissions held for [`DEFER_PENDING`] into `batch`.
    fn due(&mut self, batch: &mut Vec<Job>) {
        let now = tokio::time::Instant::now();
        while let Some(&(since, id)) = self.order.front() {
            if now.duration_since(since) < DEFER_PENDING {
                break;
            }
            self.order.pop_front();
            if let Some(a) = self.rows.remove(&id) {
                batch.push(Job::Admit(id, a));
            }
        }
    }

    /// Move every admission held back into `batch` (the writer is closing).
    fn due_all(&mut self, batch: &mut Vec<Job>) {
        for (_, id) in self.order.drain(..) {
            if let Some(a) = self.rows.remove(&id) {
                batch.push(Job::Admit(id, a));
            }
        }
    }

    /// When the oldest admission held back is due.
    fn next(&self) -> Option<tokio::time::Instant> {
        self.order.front().map(|&(since, _)| since + DEFER_PENDING)
    }
}

/// Run the writer until every sender is gone and the queue is empty.
pub(super) async fn run(mut queue: mpsc::UnboundedReceiver<Job>, cx: Context) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut deferred = Deferred::default();
    let mut received = Vec::with_capacity(BATCH);
    loop {
        if batch.is_empty() {
            let wait = queue.recv_many(&mut received, BATCH);
            let n = match deferred.next() {
                Some(due) => tokio::time::timeout_at(due, wait).await.unwrap_or(1),
                None => wait.await,
            };
            if n == 0 {
                // Every sender is gone: what is held back is written now.
                deferred.due_all(&mut batch);
                if batch.is_empty() {
                    return;
                }
            }
        }
        while received.len() < BATCH {
            match queue.try_recv() {
                Ok(job) => received.push(job),
                Err(_) => break,
            }
        }
        for job in received.drain(..) {
            deferred.take(job, &mut batch);
        }
        deferred.due(&mut batch);
        if batch.is_empty() {
            continue;
        }
        let mut pause = Duration::from_millis(50);
        loop {
            match write_batch(&cx, &mut batch).await {
                Ok(()) => {
                    cx.failing
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                    cx.committed.send_modify(|n| *n += 1);
                    break;
                }
                Err(e) => {
                    if !cx.failing.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::error!(error = %e, jobs = batch.len(), "could not write to PostgreSQL; retrying until it is back");
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// Write `batch`, one transaction per org, and answer its waiters; the
/// batch is emptied only when every org's transaction committed (an org's
/// jobs that committed are not written twice: they leave the batch).
async fn write_batch(cx: &Context, batch: &mut Vec<Job>) -> Result<(), StoreError> {
    let (syncs, jobs): (Vec<Job>, Vec<Job>) = std::mem::take(batch)
        .into_iter()
        .partition(|j| matches!(j, Job::Sync(_)));
    *batch = jobs;
    if !batch.is_empty() {
        let written = write_orgs(cx, batch).await;
        if let Err(e) = written {
            batch.extend(syncs);
            return Err(e);
        }
    }
    for sync in syncs {
        if let Job::Sync(done) = sync {
            let _ = done.send(());
        }
    }
    Ok(())
}

/// The org-by-org part of [`write_batch`].
async fn write_orgs(cx: &Context, batch: &mut Vec<Job>) -> Result<(), StoreError> {
    let client = cx.pool.get().await.map_err(super::pool_error)?;
    while !batch.is_empty() {
        let org = batch[0].org().to_owned();
        let (mine, rest): (Vec<Job>, Vec<Job>) = std::mem::take(batch)
            .into_iter()
            .partition(|j| j.org() == org);
        *batch = rest;
        match write_org(&client, cx, &mine).await {
            Ok(mut answers) => {
                // A call written once, settled: its insert told the pool's totals.
                let inserted: crate::FastMap<i64, (u64, u64)> = mine
                    .iter()
                    .zip(&answers)
                    .filter_map(|(job, answer)| match (job, answer) {
                        (Job::Admit(id, _), Answer::Pool(Some(totals))) => Some((*id, *totals)),
                        _ => None,
                    })
                    .collect();
                for (job, answer) in mine.iter().zip(answers.iter_mut()) {
                    if let (Job::Settle { id, .. }, Answer::Pool(None)) = (job, &answer) {
                        if let Some(totals) = inserted.get(id) {
                            *answer = Answer::Pool(Some(*totals));
                        }
                    }
                }
                for (job, answer) in mine.into_iter().zip(answers) {
                    finish(job, answer, &cx.leases);
                }
            }
            // PostgreSQL answered, refusing something: each job alone, so
            // that one bad row cannot hold the others back.
            Err(Failure::Refused(_)) => {
                let mut left = mine.into_iter();
                while let Some(job) = left.next() {
                    match write_org(&client, cx, std::slice::from_ref(&job)).await {
                        Ok(mut answers) => {
                            finish(job, answers.pop().unwrap_or(Answer::None), &cx.leases)
                        }
                        Err(Failure::Refused(e)) => refused(job, &e),
                        Err(Failure::Unreachable(e)) => {
                            // This job and the ones after it wait for the next try.
                            let back: Vec<Job> = std::iter::once(job).chain(left).collect();
                            batch.splice(0..0, back);
                            return Err(e);
                        }
                    }
                }
            }
            Err(Failure::Unreachable(e)) => {
                batch.splice(0..0, mine);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Why a transaction did not commit.
enum Failure {
    /// PostgreSQL refused a statement (a constraint, a bad value).
    Refused(StoreError),
    /// The connection failed: try again later.
    Unreachable(StoreError),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.as_db_error().is_some() && !e.is_closed() {
            Failure::Refused(e.into())
        } else {
            Failure::Unreachable(e.into())
        }
    }
}

/// What a statement answered, for the job's waiter.
enum Answer {
    None,
    /// An alert's insert: whether it was the first.
    First(bool),
    /// A settlement: the pool's used and leased totals now.
    Pool(Option<(u64, u64)>),
}

fn finish(job: Job, answer: Answer, leases: &Leases) {
    match (job, answer) {
        (
            Job::Settle {
                done,
                pool,
                settled,
                ..
            },
            Answer::Pool(totals),
        ) => {
            if let Some((key, _)) = pool {
                if let Some((used, leased)) = totals {
                    leases.heard(key, used, leased);
                }
                if settled.free {
                    leases.flushed(key, settled.input.saturating_add(settled.output));
                }
            }
            let _ = done.send(Ok(()));
        }
        (Job::Alert(_, reply), Answer::First(first)) => {
            let _ = reply.send(Ok(first));
        }
        _ => {}
    }
}

/// A job PostgreSQL refused even alone: logged, its waiter told, dropped.
fn refused(job: Job, e: &StoreError) {
    tracing::error!(error = %e, "PostgreSQL refused a ledger write; it is dropped");
    match job {
        Job::Settle { done, .. } => {
            let _ = done.send(Err(StoreError::from_message(e.to_string())));
        }
        Job::Alert(_, reply) => {
            let _ = reply.send(Err(StoreError::from_message(e.to_string())));
        }
        _ => {}
    }
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// `column + excluded.column`, saturating at `i64::MAX`.
fn add(column: &str) -> String {
    format!("LEAST(daily.{column}::NUMERIC + EXCLUDED.{column}, 9223372036854775807)::BIGINT")
}

/// The tail that adds a call written by the statement's `s` to its day's
/// totals and takes its free tokens out of this replica's lease: `$3`
/// org, `$4` replica, `$5` free tokens, `$6` billed tokens, `$7` cost.
fn totals_tail() -> String {
    format!(
        ", l AS (
            UPDATE leases SET held = held - $5::BIGINT
            WHERE $5::BIGINT > 0 AND org = $3 AND replica = $4 AND (day, grp) IN (SELECT day, grp FROM s)
        )
        INSERT INTO daily (org, day, grp, free_tokens, billed_tokens, cost_pico, requests, leased)
        SELECT $3, day, grp, $5::BIGINT, $6::BIGINT, $7::BIGINT, 1, 0 FROM s
        ON CONFLICT (org, day, grp) DO UPDATE SET
            free_tokens = {free}, billed_tokens = {billed}, cost_pico = {cost}, requests = {requests},
            leased = daily.leased - EXCLUDED.free_tokens
        RETURNING free_tokens + forfeited, leased",
        free = add("free_tokens"),
        billed = add("billed_tokens"),
        cost = add("cost_pico"),
        requests = add("requests"),
    )
}

const COLUMNS: &str = "org, id, replica, started_ms, day, project, key_id, endpoint, requested_model, \
    served_model, grp, decision, reserved, free_lane, streamed, shared, state, status, \
    input_tokens, cached_tokens, output_tokens, reasoning_tokens, free, cost_pico, latency_ms, estimated";

/// Insert a row ($3 org, $1 id, $2 state, $4 replica, then the rest) and
/// add it to its day's totals when it is a settled call.
static INSERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH s AS (
            INSERT INTO requests ({COLUMNS})
            VALUES ($3, $1, $4, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $2, $21,
                    $22, $23, $24, $25, $26, $7, $27, $28)
            ON CONFLICT (org, id) DO NOTHING
            RETURNING day, COALESCE(grp, '') AS grp, state
        ), s2 AS (SELECT day, grp FROM s WHERE state <> 'pending')
        {}",
        totals_tail().replace("FROM s", "FROM s2")
    )
});

/// Settle a pending call ($1 id, $2 unused) and add it to its day's totals.
static SETTLE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH s AS (
            UPDATE requests SET state = 'settled', served_model = COALESCE($8, served_model),
                input_tokens = $9, cached_tokens = $10, output_tokens = $11, reasoning_tokens = $12,
                free = $13, cost_pico = $7, status = $14, latency_ms = $15, estimated = $16
            WHERE org = $3 AND id = $1 AND state = $2
            RETURNING day, COALESCE(grp, '') AS grp
        ){}",
        totals_tail()
    )
});

/// One org's jobs in one transaction, every statement sent before the
/// first answer comes back.
async fn write_org(
    client: &deadpool_postgres::Client,
    cx: &Context,
    jobs: &[Job],
) -> Result<Vec<Answer>, Failure> {
    let insert = client.prepare_cached(&INSERT).await?;
    let settle = client.prepare_cached(&SETTLE).await?;
    let give_back = client
        .prepare_cached(
            "WITH l AS (
                UPDATE leases SET held = held - $4
                WHERE org = $1 AND day = $2 AND grp = $3 AND replica = $5 RETURNING 1
             )
             UPDATE daily SET leased = leased - $4
             WHERE org = $1 AND day = $2 AND grp = $3 AND EXISTS (SELECT 1 FROM l)",
        )
        .await?;
    let alert = client
        .prepare_cached(
            "INSERT INTO alerts (org, day, grp, rule, fired_ms, text, cap, used, billed_cost_pico, exhausted_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (org, day, grp, rule) DO NOTHING RETURNING 1",
        )
        .await?;
    let delivered = client
        .prepare_cached(
            "UPDATE alerts SET attempts = $5, delivered = $6
             WHERE org = $1 AND day = $2 AND grp = $3 AND rule = $4",
        )
        .await?;
    let capture = client
        .prepare_cached(
            "INSERT INTO captures (org, id, started_ms, project, model, endpoint, streamed, input_tokens, output_tokens, body)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
        )
        .await?;
    let forward = client
        .prepare_cached(
            "INSERT INTO forwarded (org, id, started_ms, project, key_id, method, path, status, latency_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
        )
        .await?;

    // Calls admitted and settled in this batch are written once, settled.
    let settled_here: crate::FastMap<i64, &Settled> = jobs
        .iter()
        .filter_map(|j| match j {
            Job::Settle { id, settled, .. } => Some((*id, settled)),
            _ => None,
        })
        .filter(|(id, _)| {
            jobs.iter()
                .any(|j| matches!(j, Job::Admit(a, _) if a == id))
        })
        .collect();

    let replica: &str = &cx.replica;
    // Simple queries, sent as they are polled: in order, before and after the rest.
    let begin = client.batch_execute("BEGIN");
    let mut statements = Vec::with_capacity(jobs.len());
    for job in jobs {
        let statement: futures_util::future::BoxFuture<'_, Result<Answer, tokio_postgres::Error>> =
            match job {
                Job::Admit(id, a) => {
                    let (state, s) = match settled_here.get(id) {
                        Some(s) => ("settled", (*s).clone()),
                        None => ("pending", Settled::default()),
                    };
                    let row = RowParams::new(*id, state, replica, a, a.decision, s);
                    let insert = insert.clone();
                    Box::pin(async move {
                        let rows = client.query(&insert, &row.refs()).await?;
                        Ok(Answer::Pool(totals(&rows)))
                    })
                }
                Job::Refuse(id, a, status) => {
                    let s = Settled {
                        status: *status,
                        ..Settled::default()
                    };
                    let row = RowParams::new(*id, "settled", replica, a, "refused", s);
                    let insert = insert.clone();
                    Box::pin(async move {
                        client.query(&insert, &row.refs()).await?;
                        Ok(Answer::None)
                    })
                }
                Job::Settle { id, .. } if settled_here.contains_key(id) => {
                    Box::pin(async { Ok(Answer::Pool(None)) })
                }
                Job::Settle {
                    id, org, settled, ..
                } => {
                    let p = SettleParams::new(*id, org, replica, settled);
                    let settle = settle.clone();
                    Box::pin(async move {
                        let rows = client.query(&settle, &p.refs()).await?;
                        Ok(Answer::Pool(totals(&rows)))
                    })
                }
                Job::Return {
                    pool,
                    org,
                    group,
                    tokens,
                } => {
                    let (day, tokens) = (pool.day.0 as i32, i64_of(*tokens));
                    let give_back = give_back.clone();
                    Box::pin(async move {
                        client
                            .execute(&give_back, &[&&**org, &day, &&**group, &tokens, &replica])
                            .await?;
                        Ok(Answer::None)
                    })
                }
                Job::Alert(f, _) => {
                    let alert = alert.clone();
                    Box::pin(async move {
                        let rows = client
                            .query(
                                &alert,
                                &[
                                    &f.org,
                                    &(f.day.0 as i32),
                                    &f.group,
                                    &f.rule,
                                    &f.fired_ms,
                                    &f.text,
                                    &i64_of(f.cap),
                                    &i64_of(f.used),
                                    &i64_of(f.billed_cost_pico),
                                    &f.exhausted_at_ms,
                                ],
                            )
                            .await?;
                        Ok(Answer::First(!rows.is_empty()))
                    })
                }
                Job::AlertDelivered(f, attempts, ok) => {
                    let delivered = delivered.clone();
                    let attempts = i32::try_from(*attempts).unwrap_or(i32::MAX);
                    Box::pin(async move {
                        client
                            .execute(
                                &delivered,
                                &[&f.org, &(f.day.0 as i32), &f.group, &f.rule, &attempts, ok],
                            )
                            .await?;
                        Ok(Answer::None)
                    })
                }
                Job::Capture(id, c) => {
                    let capture = capture.clone();
                    Box::pin(async move {
                        client
                            .execute(
                                &capture,
                                &[
                                    &c.org,
                                    id,
                                    &c.started_ms,
                                    &c.project,
                                    &c.model,
                                    &c.endpoint,
                                    &c.streamed,
                                    &i64_of(c.input_tokens),
                                    &i64_of(c.output_tokens),
                                    &c.body,
                                ],
                            )
                            .await?;
                        Ok(Answer::None)
                    })
                }
                Job::Sync(_) => Box::pin(async { Ok(Answer::None) }),
                Job::Forward(id, f) => {
                    let forward = forward.clone();
                    Box::pin(async move {
                        client
                            .execute(
                                &forward,
                                &[
                                    &&*f.org,
                                    id,
                                    &f.started_ms,
                                    &&*f.project,
                                    &&*f.key_id,
                                    &f.method,
                                    &f.path,
                                    &i32::from(f.status),
                                    &i64_of(f.latency_ms),
                                ],
                            )
                            .await?;
                        Ok(Answer::None)
                    })
                }
            };
        statements.push(statement);
    }
    // A lone statement (one call's row, most batches one call at a time) is
    // a transaction of its own: no BEGIN and COMMIT to send and wait for.
    let lone = jobs
        .iter()
        .filter(|j| match j {
            Job::Settle { id, .. } => !settled_here.contains_key(id),
            Job::Sync(_) => false,
            _ => true,
        })
        .count()
        == 1;
    if lone {
        return futures_util::future::join_all(statements)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(Failure::from);
    }
    let commit = client.batch_execute("COMMIT");
    let (began, answers, committed) =
        futures_util::future::join3(begin, futures_util::future::join_all(statements), commit)
            .await;
    let answers = match (began, answers.into_iter().collect::<Result<Vec<_>, _>>()) {
        (Ok(_), Ok(answers)) => answers,
        (Err(e), _) | (_, Err(e)) => {
            // The transaction is aborted; end it so the connection is clean.
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(Failure::from(e));
        }
    };
    committed?;
    Ok(answers)
}

/// A pool's (used, leased) from a statement's `RETURNING`.
fn totals(rows: &[tokio_postgres::Row]) -> Option<(u64, u64)> {
    let row = rows.first()?;
    Some((u64_of(row.get(0)), u64_of(row.get(1))))
}

/// The parameters of [`INSERT`], owned so the statement can borrow them.
struct RowParams {
    id: i64,
    state: &'static str,
    org: String,
    replica: String,
    free: i64,
    billed: i64,
    cost: i64,
    started_ms: i64,
    day: i32,
    project: String,
    key_id: String,
    endpoint: &'static str,
    requested: String,
    served: String,
    group: Option<String>,
    decision: &'static str,
    reserved: i64,
    free_lane: bool,
    streamed: bool,
    shared: bool,
    status: i32,
    input: i64,
    cached: i64,
    output: i64,
    reasoning: i64,
    is_free: bool,
    latency: i64,
    estimated: bool,
}

impl RowParams {
    fn new(
        id: i64,
        state: &'static str,
        replica: &str,
        a: &Admitted,
        decision: &'static str,
        s: Settled,
    ) -> Self {
        let total = i64_of(s.input.saturating_add(s.output));
        let settled = state == "settled";
        RowParams {
            id,
            state,
            org: a.org.to_string(),
            replica: replica.to_owned(),
            free: if settled && s.free { total } else { 0 },
            billed: if settled && !s.free { total } else { 0 },
            cost: i64_of(s.cost_pico),
            started_ms: a.started_ms,
            day: a.day.0 as i32,
            project: a.project.to_string(),
            key_id: a.key_id.to_string(),
            endpoint: a.endpoint,
            requested: a.requested_model.to_string(),
            served: s
                .served_model
                .clone()
                .unwrap_or_else(|| a.served_model.to_string()),
            group: a.group.as_deref().map(str::to_owned),
            decision,
            reserved: i64_of(a.reserved),
            free_lane: a.free_lane,
            streamed: a.streamed,
            shared: a.shared,
            status: i32::from(s.status),
            input: i64_of(s.input),
            cached: i64_of(s.cached),
            output: i64_of(s.output),
            reasoning: i64_of(s.reasoning),
            is_free: s.free,
            latency: i64_of(s.latency_ms),
            estimated: s.estimated,
        }
    }

    fn refs(&self) -> [&(dyn ToSql + Sync); 28] {
        [
            &self.id,
            &self.state,
            &self.org,
            &self.replica,
            &self.free,
            &self.billed,
            &self.cost,
            &self.started_ms,
            &self.day,
            &self.project,
            &self.key_id,
            &self.endpoint,
            &self.requested,
            &self.served,
            &self.group,
            &self.decision,
            &self.reserved,
            &self.free_lane,
            &self.streamed,
            &self.shared,
            &self.status,
            &self.input,
            &self.cached,
            &self.output,
            &self.reasoning,
            &self.is_free,
            &self.latency,
            &self.estimated,
        ]
    }
}

/// The parameters of [`SETTLE`].
struct SettleParams {
    id: i64,
    org: String,
    replica: String,
    free: i64,
    billed: i64,
    cost: i64,
    served: Option<String>,
    input: i64,
    cached: i64,
    output: i64,
    reasoning: i64,
    is_free: bool,
    status: i32,
    latency: i64,
    estimated: bool,
}

impl SettleParams {
    fn new(id: i64, org: &Arc<str>, replica: &str, s: &Settled) -> Self {
        let total = i64_of(s.input.saturating_add(s.output));
        SettleParams {
            id,
            org: org.to_string(),
            replica: replica.to_owned(),
            free: if s.free { total } else { 0 },
            billed: if s.free { 0 } else { total },
            cost: i64_of(s.cost_pico),
            served: s.served_model.clone(),
            input: i64_of(s.input),
            cached: i64_of(s.cached),
            output: i64_of(s.output),
            reasoning: i64_of(s.reasoning),
            is_free: s.free,
            status: i32::from(s.status),
            latency: i64_of(s.latency_ms),
            estimated: s.estimated,
        }
    }

    fn refs(&self) -> [&(dyn ToSql + Sync); 16] {
        [
            &self.id,
            &"pending",
            &self.org,
            &self.replica,
            &self.free,
            &self.billed,
            &self.cost,
            &self.served,
            &self.input,
            &self.cached,
            &self.output,
            &self.reasoning,
            &self.is_free,
            &self.status,
            &self.latency,
            &self.estimated,
        ]
    }
}
