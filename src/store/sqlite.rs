//! The SQLite store: one file, WAL, versioned migrations.
//!
//! Writes go through one write connection (SQLite has one writer anyway),
//! on a thread of its own that commits whatever has queued up in one
//! transaction (group commit). A call's rows do not wait for it: each is
//! appended to the call journal first ([`journal`]), which is what makes it
//! durable, and the first store opened on the ledger replays what a crash
//! left there. Reads use their own connection and wait for the writes queued
//! before them. `synchronous = NORMAL` in WAL mode makes each commit survive
//! the process dying (`kill -9`), as the journal's appends do, which is what
//! the ledger promises.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OptionalExtension};

use super::{Admitted, DailyTotal, Record, Settled, StoreError, UsageRow};

mod api;
mod batches;
mod files;
mod journal;
mod write;

use crate::alerts::Fired;
use crate::day::Day;
use write::{Job, Reply, Writer};

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
    // 2: alerts, once per org, group, rule and day.
    "CREATE TABLE alerts (
        day INTEGER NOT NULL,
        org TEXT NOT NULL,
        grp TEXT NOT NULL,
        rule TEXT NOT NULL,
        fired_ms INTEGER NOT NULL,
        text TEXT NOT NULL,
        cap INTEGER NOT NULL,
        used INTEGER NOT NULL,
        billed_cost_pico INTEGER NOT NULL,
        exhausted_at_ms INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        delivered INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (day, org, grp, rule)
    );",
    // 3: whether a call's traffic was shared; captured shared traffic.
    "ALTER TABLE requests ADD COLUMN shared INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE captures (
        id INTEGER PRIMARY KEY,
        started_ms INTEGER NOT NULL,
        org TEXT NOT NULL,
        project TEXT NOT NULL,
        model TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        streamed INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX captures_org_time ON captures(org, started_ms);",
    // 4: the usage report reads calls by time; no query read (day, org), and
    // keeping that index cost each call's insert 2,000 instructions of text
    // comparisons, a ninth of the writer's SQLite work (callgrind).
    "DROP INDEX requests_day_org;
    CREATE INDEX requests_started ON requests(started_ms);",
    // 5: calls a project's `forward` rules let past the meter.
    "CREATE TABLE forwarded (
        id INTEGER PRIMARY KEY,
        started_ms INTEGER NOT NULL,
        org TEXT NOT NULL,
        project TEXT NOT NULL,
        key_id TEXT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        status INTEGER NOT NULL,
        latency_ms INTEGER NOT NULL
    );
    CREATE INDEX forwarded_started ON forwarded(started_ms);",
    // 6: changes made at runtime (orgs' settings, projects, keys).
    "CREATE TABLE changes (
        id INTEGER PRIMARY KEY,
        at_ms INTEGER NOT NULL,
        org TEXT NOT NULL,
        actor TEXT NOT NULL,
        body TEXT NOT NULL
    );",
    // 7: the Files API's files (for batches), in parts.
    "CREATE TABLE files (
        id TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        project TEXT NOT NULL,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        complete INTEGER NOT NULL
    );
    CREATE INDEX files_project ON files(org, project, created_at);
    CREATE TABLE file_parts (
        file_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (file_id, seq)
    );",
    // 8: batches and their lines.
    "CREATE TABLE batches (
        id TEXT PRIMARY KEY,
        org TEXT NOT NULL,
        project TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        status TEXT NOT NULL,
        object TEXT NOT NULL
    );
    CREATE INDEX batches_project ON batches(org, project, created_at);
    CREATE TABLE batch_lines (
        batch_id TEXT NOT NULL,
        line INTEGER NOT NULL,
        custom_id TEXT NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL,
        result TEXT NOT NULL,
        claimed_ms INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (batch_id, line)
    );
    CREATE INDEX batch_lines_state ON batch_lines(batch_id, state, line);",
];

/// Which captured calls an export reads.
#[derive(Clone, Debug, Default)]
pub struct ExportFilter {
    pub org: String,
    pub project: Option<String>,
    /// Unix ms, inclusive.
    pub since_ms: Option<i64>,
    /// Unix ms, exclusive.
    pub until_ms: Option<i64>,
}

impl ExportFilter {
    fn sql(&self, select: &str) -> String {
        format!(
            "SELECT {select} FROM captures WHERE org = ?1 AND (?2 IS NULL OR project = ?2)
             AND started_ms >= COALESCE(?3, -9223372036854775808) AND started_ms < COALESCE(?4, 9223372036854775807)"
        )
    }
}

/// A captured call as read back for export.
pub struct CapturedRow {
    pub id: i64,
    pub started_ms: i64,
    pub org: String,
    pub project: String,
    pub model: String,
    pub endpoint: String,
    pub streamed: bool,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Still compressed.
    pub body: Vec<u8>,
}

/// How many captured calls `filter` selects, read from the file at `path`.
pub fn count_captures(path: &Path, filter: &ExportFilter) -> Result<u64, StoreError> {
    let conn = read_only(path)?;
    let n: i64 = conn.query_row(
        &filter.sql("COUNT(*)"),
        params![filter.org, filter.project, filter.since_ms, filter.until_ms],
        |r| r.get(0),
    )?;
    Ok(as_u64(n))
}

/// Hand every captured call `filter` selects to `f`, oldest first, one row
/// in memory at a time.
pub fn for_each_capture(
    path: &Path,
    filter: &ExportFilter,
    mut f: impl FnMut(CapturedRow) -> std::io::Result<()>,
) -> Result<u64, StoreError> {
    let conn = read_only(path)?;
    let mut statement = conn.prepare(&(filter.sql(
        "id, started_ms, org, project, model, endpoint, streamed, input_tokens, output_tokens, body",
    ) + " ORDER BY started_ms, id"))?;
    let mut rows = statement.query(params![
        filter.org,
        filter.project,
        filter.since_ms,
        filter.until_ms
    ])?;
    let mut n = 0;
    while let Some(r) = rows.next()? {
        let row = CapturedRow {
            id: r.get(0)?,
            started_ms: r.get(1)?,
            org: r.get(2)?,
            project: r.get(3)?,
            model: r.get(4)?,
            endpoint: r.get(5)?,
            streamed: r.get(6)?,
            input_tokens: num(r, 7)?,
            output_tokens: num(r, 8)?,
            body: r.get(9)?,
        };
        f(row).map_err(|e| StoreError(format!("writing the export: {e}")))?;
        n += 1;
    }
    Ok(n)
}

/// A connection that only reads (an export beside a running gateway).
fn read_only(path: &Path) -> Result<Connection, StoreError> {
    if !path.exists() {
        return Err(StoreError(format!("{}: no such ledger", path.display())));
    }
    let conn = Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    add_functions(&conn)?;
    let version: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |r| r.get(0),
        )
        .unwrap_or(0);
    if version < 3 {
        return Err(StoreError(format!(
            "{}: this ledger has no captures (schema version {version}); start tokenwarden serve on it once",
            path.display()
        )));
    }
    Ok(conn)
}

#[derive(Clone)]
pub struct SqliteStore {
    /// The writer, its thread and journal, and the checkpoints: one per
    /// ledger in a process, shared by every store opened on it.
    shared: Arc<Shared>,
    /// The read connection (WAL lets it read while the writer writes).
    conn: Arc<Mutex<Connection>>,
    /// The meter of the gateway that owns the ledger ([`api`]).
    meter: Arc<Mutex<crate::meter::Ledger>>,
}

struct Shared {
    writer: Arc<Writer>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Stops the checkpoint thread when the last store handle is dropped.
    _checkpoints: Checkpoints,
    /// Counts the writer's commits: the dashboard's cue to refresh.
    commits: tokio::sync::watch::Receiver<u64>,
    /// The ledger's owner lock (see [`journal`]), released last.
    owner: Option<std::fs::File>,
}

/// Commits what is queued and waits for the writer's thread to end when the
/// last store handle on a ledger is dropped, so that the ledger can be
/// opened again at once.
impl Drop for Shared {
    fn drop(&mut self) {
        self.writer.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The ledgers open in this process, by canonical path.
static OPEN: Mutex<Vec<(std::path::PathBuf, std::sync::Weak<Shared>)>> = Mutex::new(Vec::new());

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

/// A count or an amount read back. Always an integer in a ledger this
/// version writes; in one an older version wrote, a daily sum could have
/// overflowed into a REAL (an upstream that reported absurd usage): that
/// reads as the nearest integer in range, so such a ledger still opens.
fn num(r: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(match r.get_ref(i)? {
        ValueRef::Integer(n) => as_u64(n),
        // `as` saturates: NaN and negatives are 0, huge values u64::MAX.
        ValueRef::Real(f) => f as u64,
        ValueRef::Null | ValueRef::Text(_) | ValueRef::Blob(_) => 0,
    })
}

/// `ssum(x)`: SQL's `SUM` of the ledger's counts and amounts, saturating at
/// `i64::MAX` where `SUM` fails with "integer overflow" (and reading a REAL
/// an older version left as [`num`] does).
struct SaturatingSum;

impl rusqlite::functions::Aggregate<i64, i64> for SaturatingSum {
    fn init(&self, _: &mut rusqlite::functions::Context<'_>) -> rusqlite::Result<i64> {
        Ok(0)
    }

    fn step(
        &self,
        ctx: &mut rusqlite::functions::Context<'_>,
        sum: &mut i64,
    ) -> rusqlite::Result<()> {
        let n = match ctx.get_raw(0) {
            ValueRef::Integer(n) => n.max(0),
            ValueRef::Real(f) => f as i64,
            ValueRef::Null | ValueRef::Text(_) | ValueRef::Blob(_) => 0,
        };
        *sum = sum.saturating_add(n.max(0));
        Ok(())
    }

    fn finalize(
        &self,
        _: &mut rusqlite::functions::Context<'_>,
        sum: Option<i64>,
    ) -> rusqlite::Result<i64> {
        Ok(sum.unwrap_or(0))
    }
}

/// Add `ssum` to a connection that reads the ledger.
fn add_functions(conn: &Connection) -> rusqlite::Result<()> {
    conn.create_aggregate_function(
        "ssum",
        1,
        rusqlite::functions::FunctionFlags::SQLITE_UTF8
            | rusqlite::functions::FunctionFlags::SQLITE_DETERMINISTIC,
        SaturatingSum,
    )
}

fn connect(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    add_functions(&conn)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // SQLite's default page cache is 2 MB per connection. The writer appends
    // near the end of the tables and their indexes, the checkpointer copies
    // pages through the OS, and a reader's scans are of today's rows: 512 KB
    // each keeps the hot pages and the gateway's memory small.
    conn.pragma_update(None, "cache_size", -512)?;
    Ok(conn)
}

impl SqliteStore {
    /// Open (creating if needed) and migrate the database at `path`, and
    /// set up its writer. The first store opened on a ledger while no other
    /// process has it owns it: it replays the call journal a crash left and
    /// then writes. Later stores in the same process share its writer. A
    /// store opened while another process owns the ledger reads only.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError(format!("{}: {e}", dir.display())))?;
        }
        let mut writer = connect(path)?;
        migrate(&mut writer)?;
        let canonical = path
            .canonicalize()
            .map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        let mut open = OPEN
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        open.retain(|(_, shared)| shared.strong_count() > 0);
        if let Some(shared) = open
            .iter()
            .find(|(p, _)| *p == canonical)
            .and_then(|(_, shared)| shared.upgrade())
        {
            return Ok(SqliteStore {
                shared,
                conn: Arc::new(Mutex::new(writer)),
                meter: Arc::default(),
            });
        }
        let owner = journal::lock(path)
            .map_err(|e| StoreError(format!("{}: the ledger's lock: {e}", path.display())))?;
        let journal = match owner {
            Some(_) => {
                let (records, unreadable) = journal::read(path).map_err(|e| {
                    StoreError(format!("{}: the call journal: {e}", path.display()))
                })?;
                if unreadable > 0 {
                    tracing::warn!(
                        lines = unreadable,
                        "the call journal had lines cut short by a crash; they were never acknowledged"
                    );
                }
                if !records.is_empty() {
                    tracing::info!(records = records.len(), "replaying the call journal");
                    write::replay(&mut writer, records)?;
                }
                Some(journal::Journal::open_empty(path).map_err(|e| {
                    StoreError(format!("{}: the call journal: {e}", path.display()))
                })?)
            }
            None => None,
        };
        let next_id: i64 =
            writer.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM requests", [], |r| {
                r.get(0)
            })?;
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        let reader = connect(path)?;
        let (committed, commits) = tokio::sync::watch::channel(0u64);
        let (writer, thread) = Writer::start(writer, journal, next_id, committed)
            .map_err(|e| StoreError(format!("store writer thread: {e}")))?;
        let shared = Arc::new(Shared {
            writer,
            thread: Some(thread),
            _checkpoints: Checkpoints::start(path)?,
            commits,
            owner,
        });
        open.push((canonical, Arc::downgrade(&shared)));
        Ok(SqliteStore {
            shared,
            conn: Arc::new(Mutex::new(reader)),
            meter: Arc::default(),
        })
    }

    /// Run `f` on the read connection, once the writes queued before it are
    /// committed.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        self.shared.writer.sync();
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| StoreError("connection lock poisoned".into()))?;
        Ok(f(&mut conn)?)
    }

    /// Whether this process owns the ledger (and so may write to it).
    pub fn owns(&self) -> bool {
        self.shared.owner.is_some()
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        self.shared.writer.submit(job).map_err(StoreError)
    }

    fn ask_blocking<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.submit(job(Reply(tx)))?;
        rx.recv()
            .map_err(|_| StoreError("the store writer has stopped".into()))?
            .map_err(StoreError)
    }

    /// Record an admitted call as pending, durably (in the journal: see
    /// [`journal`]); returns its id.
    pub fn admit(&self, a: Admitted) -> Result<i64, StoreError> {
        let id = self.shared.writer.next_id();
        self.shared
            .writer
            .journal(Job::Admit(id, a))
            .map_err(StoreError)?;
        Ok(id)
    }

    /// Record a refused call (no tokens, nothing reserved), durably.
    pub fn refuse(&self, a: Admitted, status: u16) -> Result<(), StoreError> {
        let id = self.shared.writer.next_id();
        self.shared
            .writer
            .journal(Job::Refuse(id, a, status))
            .map_err(StoreError)
    }

    /// Settle a pending call and add it to its day's totals, durably.
    pub fn settle(&self, id: i64, s: Settled) -> Result<(), StoreError> {
        self.shared
            .writer
            .journal(Job::Settle(id, s))
            .map_err(StoreError)
    }

    /// Settle every call left pending by a crash as `interrupted`: a free-lane
    /// call's reservation counts as free tokens used (an upper bound, so the
    /// allowance is never handed out twice). Returns how many there were.
    /// Record a fired alert (ignored if the same rule already fired that day).
    pub fn alert_nowait(&self, fired: Fired) -> Result<(), StoreError> {
        self.submit(Job::Alert(fired))
    }

    /// Record how an alert's delivery ended.
    pub fn alert_delivered_nowait(
        &self,
        fired: &Fired,
        attempts: u32,
        delivered: bool,
    ) -> Result<(), StoreError> {
        self.submit(Job::AlertDelivered(fired.clone(), attempts, delivered))
    }

    /// Keep a captured call (in the background).
    pub fn capture_nowait(&self, capture: crate::capture::Capture) -> Result<(), StoreError> {
        self.submit(Job::Capture(capture))
    }

    /// Record a call forwarded unmetered (in the background, as alerts and
    /// captures are: it holds no tokens, so it is not in the call journal).
    pub fn forward_nowait(&self, forwarded: crate::store::Forwarded) -> Result<(), StoreError> {
        self.submit(Job::Forward(forwarded))
    }

    /// The latest forwarded calls, newest first (the dashboard, the tests).
    pub fn recent_forwarded(
        &self,
        limit: u64,
        org: Option<&str>,
    ) -> Result<Vec<crate::store::Forwarded>, StoreError> {
        self.with(|conn| {
            let mut statement = conn.prepare_cached(
                "SELECT started_ms, org, project, key_id, method, path, status, latency_ms
                 FROM forwarded WHERE ?2 IS NULL OR org = ?2 ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = statement.query_map(params![as_i64(limit), org], |r| {
                let method: String = r.get(4)?;
                Ok(crate::store::Forwarded {
                    started_ms: r.get(0)?,
                    org: r.get::<_, String>(1)?.into(),
                    project: r.get::<_, String>(2)?.into(),
                    key_id: r.get::<_, String>(3)?.into(),
                    method: match method.as_str() {
                        "POST" => "POST",
                        "DELETE" => "DELETE",
                        _ => "GET",
                    },
                    path: r.get(5)?,
                    status: r.get(6)?,
                    latency_ms: num(r, 7)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Delete `org`'s captured calls that started before `before_ms`.
    pub fn purge_captures(&self, org: &str, before_ms: i64) -> Result<usize, StoreError> {
        self.ask_blocking(|reply| Job::Purge(org.to_owned(), before_ms, reply))
    }

    /// Keep a change made at runtime; returns its id.
    pub fn record_change(&self, change: crate::store::ChangeRow) -> Result<i64, StoreError> {
        self.ask_blocking(|reply| Job::Change(change, reply))
    }

    /// Changes made at runtime with an id above `after`, oldest first.
    pub fn changes(&self, after: i64) -> Result<Vec<crate::store::ChangeRow>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT id, at_ms, org, actor, body FROM changes WHERE id > ?1 ORDER BY id",
            )?
            .query_map(params![after], |r| {
                Ok(crate::store::ChangeRow {
                    id: r.get(0)?,
                    at_ms: r.get(1)?,
                    org: r.get(2)?,
                    actor: r.get(3)?,
                    body: r.get(4)?,
                })
            })?
            .collect()
        })
    }

    /// Captured calls kept, per org (for the tests and the dashboard).
    pub fn count_captures(&self, org: &str) -> Result<u64, StoreError> {
        self.with(|conn| {
            conn.query_row(
                "SELECT COUNT(*) FROM captures WHERE org = ?1",
                params![org],
                |r| r.get::<_, i64>(0),
            )
            .map(as_u64)
        })
    }

    /// A receiver that changes after every commit of the writer.
    pub fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.commits.clone()
    }

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
                    free_tokens: num(r, 2)?,
                    billed_tokens: num(r, 3)?,
                    cost_pico: num(r, 4)?,
                    requests: num(r, 5)?,
                })
            })?
            .collect()
        })
    }

    /// The latest `limit` calls, newest first (metadata only; no content is stored).
    /// Daily totals of days `from..=to`, oldest first.
    pub fn daily_range(&self, from: Day, to: Day) -> Result<Vec<DailyTotal>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT day, org, grp, free_tokens, billed_tokens, cost_pico, requests FROM daily
                 WHERE day >= ?1 AND day <= ?2 ORDER BY day, org, grp",
            )?
            .query_map(params![from.0, to.0], |r| {
                Ok(DailyTotal {
                    day: Day(r.get(0)?),
                    org: r.get(1)?,
                    group: r.get(2)?,
                    free_tokens: num(r, 3)?,
                    billed_tokens: num(r, 4)?,
                    cost_pico: num(r, 5)?,
                    requests: num(r, 6)?,
                })
            })?
            .collect()
        })
    }

    /// The alerts fired on `day`, oldest first.
    pub fn alerts(&self, day: Day) -> Result<Vec<Fired>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT org, grp, rule, fired_ms, text, cap, used, billed_cost_pico, exhausted_at_ms
                 FROM alerts WHERE day = ?1 ORDER BY fired_ms, rowid",
            )?
            .query_map(params![day.0], |r| {
                Ok(Fired {
                    day,
                    org: r.get(0)?,
                    group: r.get(1)?,
                    rule: r.get(2)?,
                    fired_ms: r.get(3)?,
                    text: r.get(4)?,
                    cap: num(r, 5)?,
                    used: num(r, 6)?,
                    billed_cost_pico: num(r, 7)?,
                    exhausted_at_ms: r.get(8)?,
                })
            })?
            .collect()
        })
    }

    /// (attempts, delivered) of an alert, if it was recorded.
    pub fn alert_delivery(
        &self,
        day: Day,
        org: &str,
        group: &str,
        rule: &str,
    ) -> Result<Option<(u32, bool)>, StoreError> {
        self.with(|conn| {
            conn.query_row(
                "SELECT attempts, delivered FROM alerts WHERE day = ?1 AND org = ?2 AND grp = ?3 AND rule = ?4",
                params![day.0, org, group, rule],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
    }

    pub fn recent(&self, limit: u64, org: Option<&str>) -> Result<Vec<Record>, StoreError> {
        self.with(|conn| {
            conn.prepare_cached(
                "SELECT id, org, project, requested_model, served_model, grp, decision, state, input_tokens,
                        cached_tokens, output_tokens, free, cost_pico, status, estimated, started_ms,
                        key_id, latency_ms
                 FROM requests WHERE ?2 IS NULL OR org = ?2 ORDER BY id DESC LIMIT ?1",
            )?
            .query_map(params![as_i64(limit), org], |r| {
                Ok(Record {
                    id: r.get(0)?,
                    org: r.get(1)?,
                    project: r.get(2)?,
                    requested_model: r.get(3)?,
                    served_model: r.get(4)?,
                    group: r.get(5)?,
                    decision: r.get(6)?,
                    state: r.get(7)?,
                    input: num(r, 8)?,
                    cached: num(r, 9)?,
                    output: num(r, 10)?,
                    free: r.get(11)?,
                    cost_pico: num(r, 12)?,
                    status: r.get(13)?,
                    estimated: r.get(14)?,
                    started_ms: r.get(15)?,
                    key_id: r.get(16)?,
                    latency_ms: num(r, 17)?,
                })
            })?
            .collect()
        })
    }

    /// Usage between `start_ms` and `end_ms`, one row per bucket and group:
    /// the bucket is `(started_ms - start_ms) / width_ms`; `group_by` names
    /// columns among project, key_id, requested_model and lane.
    pub fn usage_rows(
        &self,
        start_ms: i64,
        end_ms: i64,
        width_ms: i64,
        group_by: &[&str],
    ) -> Result<Vec<UsageRow>, StoreError> {
        let sql = usage_sql(group_by);
        self.with(|conn| {
            conn.prepare(&sql)?
                .query_map(params![start_ms, end_ms, width_ms], |r| {
                    Ok(UsageRow {
                        bucket: r.get(0)?,
                        project_id: r.get(1)?,
                        api_key_id: r.get(2)?,
                        model: r.get(3)?,
                        lane: r.get(4)?,
                        sharing: r.get(5)?,
                        batch: r.get(6)?,
                        org: r.get(7)?,
                        input_tokens: num(r, 8)?,
                        input_cached_tokens: num(r, 9)?,
                        output_tokens: num(r, 10)?,
                        num_model_requests: num(r, 11)?,
                        cost_pico: num(r, 12)?,
                        refused: num(r, 13)?,
                        errors: num(r, 14)?,
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

/// The usage report's query (see [`SqliteStore::usage_rows`]): `?1` and
/// `?2` bound the calls' start, `?3` is a bucket's width.
fn usage_sql(group_by: &[&str]) -> String {
    let column = |name: &str| match name {
        "project_id" => Some("project"),
        "api_key_id" => Some("key_id"),
        "model" => Some("requested_model"),
        "lane" => Some("CASE WHEN free = 1 THEN 'free' ELSE 'billed' END"),
        "sharing" => Some("CASE WHEN shared = 1 THEN 'shared' ELSE 'private' END"),
        "batch" => Some("CASE WHEN substr(key_id, 1, 6) = 'batch_' THEN 'true' ELSE 'false' END"),
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
            column(name).unwrap_or("NULL")
        } else {
            "NULL"
        };
        select.push(format!("{expr} AS {name}"));
    }
    format!(
        "SELECT (started_ms - ?1) / ?3 AS bucket, {}, org,
                ssum(input_tokens), ssum(cached_tokens), ssum(output_tokens),
                SUM(decision != 'refused'), ssum(cost_pico), SUM(decision = 'refused'),
                SUM(decision != 'refused' AND (status < 200 OR status >= 300))
         FROM requests
         WHERE started_ms >= ?1 AND started_ms < ?2 AND state != 'pending'
         GROUP BY bucket, org, project_id, api_key_id, model, lane, sharing, batch
         ORDER BY bucket, org, project_id, api_key_id, model, lane, sharing, batch",
        select.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usage_report_reads_calls_by_time_through_an_index() {
        let (dir, path) = temp_ledger("usage-plan");
        drop(SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}")));
        let conn = connect(&path).unwrap_or_else(|e| panic!("{e}"));
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'requests' ORDER BY name")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(indexes, ["requests_started", "requests_state"]);
        for group_by in [&[][..], &["project_id", "model", "lane"][..]] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {}", usage_sql(group_by)))
                .and_then(|mut s| s.query_map([0, 1, 1], |r| r.get(3))?.collect())
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(
                plan.iter().any(|step| step
                    .contains("USING INDEX requests_started (started_ms>? AND started_ms<?)")),
                "{plan:?}"
            );
        }
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
    }

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
            shared: true,
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
            .admit(admitted("free", 100, true))
            .unwrap_or_else(|e| panic!("{e}"));
        let settled = Settled {
            input: 40,
            output: 20,
            free: true,
            status: 200,
            ..Settled::default()
        };
        store
            .settle(a, settled.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        // Settling twice changes nothing.
        store
            .settle(a, settled.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        let b = store
            .admit(admitted("billed", 0, false))
            .unwrap_or_else(|e| panic!("{e}"));
        store
            .settle(
                b,
                Settled {
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
            .admit(admitted("free", 70, true))
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

    fn temp_ledger(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("tw-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let path = dir.join("ledger.db");
        (dir, path)
    }

    #[test]
    fn a_journal_left_by_a_crash_is_replayed_once() {
        let (dir, path) = temp_ledger("replay");
        // What a process killed before its writer committed leaves behind:
        // the journal, and a ledger that has not seen those calls.
        drop(SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}")));
        let settled = Settled {
            input: 40,
            output: 20,
            free: true,
            status: 200,
            ..Settled::default()
        };
        let records = |j: &mut journal::Journal| {
            let a = admitted("free", 100, true);
            j.append(1, journal::Entry::Admit(1, &a))
                .unwrap_or_else(|e| panic!("{e}"));
            j.append(2, journal::Entry::Admit(2, &a))
                .unwrap_or_else(|e| panic!("{e}"));
            j.append(
                3,
                journal::Entry::Refuse(3, &admitted("refused", 0, false), 429),
            )
            .unwrap_or_else(|e| panic!("{e}"));
            j.append(4, journal::Entry::Settle(1, &settled))
                .unwrap_or_else(|e| panic!("{e}"));
        };
        let mut j = journal::Journal::open_empty(&path).unwrap_or_else(|e| panic!("{e}"));
        records(&mut j);
        drop(j);
        let check = |store: &SqliteStore| {
            assert_eq!(store.count_requests("settled").unwrap_or_default(), 2);
            assert_eq!(store.count_requests("interrupted").unwrap_or_default(), 1);
            let totals = store.daily(Day(20_000)).unwrap_or_else(|e| panic!("{e}"));
            let t = &totals[0];
            // 60 settled free tokens, and the interrupted call's 100 reserved.
            assert_eq!((t.free_tokens, t.requests), (160, 3));
        };
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.recover().unwrap_or_else(|e| panic!("{e}")), 1);
        check(&store);
        // New calls take ids after the replayed ones.
        let next = store
            .admit(admitted("free", 1, true))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(next, 4);
        store
            .settle(next, settled.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        drop(store);
        // The same records replayed again (as if the crash came after the
        // writer's commit) change nothing.
        let mut j = journal::Journal::open_empty(&path).unwrap_or_else(|e| panic!("{e}"));
        records(&mut j);
        drop(j);
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.recover().unwrap_or_else(|e| panic!("{e}")), 0);
        assert_eq!(store.count_requests("settled").unwrap_or_default(), 3);
        let totals = store.daily(Day(20_000)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((totals[0].free_tokens, totals[0].requests), (220, 4));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_ledger_another_process_owns_is_open_for_reading_only() {
        let (dir, path) = temp_ledger("owned");
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let id = store
            .admit(admitted("free", 5, true))
            .unwrap_or_else(|e| panic!("{e}"));
        drop(store);
        // Another process's lock (flock locks conflict between open files).
        let other = journal::lock(&path)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("not locked"));
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.count_requests("pending").unwrap_or_default(), 1);
        let refused = store.admit(admitted("free", 5, true));
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("another tokenwarden process")),
            "{refused:?}"
        );
        assert!(!store.owns());
        assert!(store.recover().is_err());
        assert!(store.settle(id, Settled::default()).is_err());
        drop(store);
        drop(other);
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.recover().unwrap_or_default(), 1);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn stores_opened_in_one_process_share_the_writer_and_read_its_writes() {
        let (dir, path) = temp_ledger("shared");
        let first = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let second = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let a = first
            .admit(admitted("free", 5, true))
            .unwrap_or_else(|e| panic!("{e}"));
        let b = second
            .admit(admitted("free", 5, true))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(b, a + 1);
        // Read at once, through either: the read waits for the commit.
        assert_eq!(second.count_requests("pending").unwrap_or_default(), 2);
        first
            .settle(a, Settled::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(second.count_requests("settled").unwrap_or_default(), 1);
        drop((first, second));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_call_settled_in_the_batch_of_its_admission_is_written_the_same() {
        let (dir, path) = temp_ledger("merged");
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let settled = Settled {
            served_model: Some("gpt-4o-2024-08-06".into()),
            input: 40,
            cached: 8,
            output: 20,
            reasoning: 3,
            free: false,
            cost_pico: 1234,
            status: 200,
            latency_ms: 7,
            estimated: true,
        };
        // Admitted and settled in one batch (no read in between)...
        let a = store
            .admit(admitted("billed", 0, false))
            .unwrap_or_else(|e| panic!("{e}"));
        store
            .settle(a, settled.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        // ...and in two (the read waits for the first commit).
        let b = store
            .admit(admitted("billed", 0, false))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.count_requests("pending").unwrap_or_default(), 1);
        store
            .settle(b, settled.clone())
            .unwrap_or_else(|e| panic!("{e}"));
        // Every column but the id.
        let rows: Vec<Vec<rusqlite::types::Value>> = store
            .with(|conn| {
                let mut statement = conn.prepare("SELECT * FROM requests ORDER BY id")?;
                let columns = statement.column_count();
                let rows = statement
                    .query_map([], |r| (1..columns).map(|i| r.get(i)).collect())?
                    .collect();
                rows
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], rows[1]);
        let record = &store.recent(1, None).unwrap_or_else(|e| panic!("{e}"))[0];
        assert_eq!((record.id, record.state.as_str()), (b, "settled"));
        assert_eq!(record.served_model, "gpt-4o-2024-08-06");
        assert!(a < b);
        let totals = store.daily(Day(20_000)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (
                totals[0].billed_tokens,
                totals[0].cost_pico,
                totals[0].requests
            ),
            (120, 2468, 2)
        );
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A batch's calls are summed per day, org and group before its daily
    /// upserts; the totals equal the calls one by one, and a later batch
    /// adds to them.
    #[test]
    fn a_batch_sums_its_daily_totals_per_org_and_group() {
        let (dir, path) = temp_ledger("daily-sums");
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let call = |org: &str, group: &str, free: bool, tokens: u64, cost: u64| {
            let mut a = admitted("free", 0, free);
            a.org = org.into();
            a.group = Some(group.into());
            let id = store.admit(a).unwrap_or_else(|e| panic!("{e}"));
            let s = Settled {
                input: tokens,
                free,
                cost_pico: cost,
                status: 200,
                ..Settled::default()
            };
            store.settle(id, s).unwrap_or_else(|e| panic!("{e}"));
        };
        let totals = || {
            let mut rows: Vec<(String, String, u64, u64, u64, u64)> = store
                .daily(Day(20_000))
                .unwrap_or_else(|e| panic!("{e}"))
                .into_iter()
                .map(|t| {
                    (
                        t.org,
                        t.group,
                        t.free_tokens,
                        t.billed_tokens,
                        t.cost_pico,
                        t.requests,
                    )
                })
                .collect();
            rows.sort();
            rows
        };
        // One batch: no read in between.
        call("acme", "flagship", true, 100, 0);
        call("acme", "flagship", false, 50, 10);
        call("acme", "mini", true, 30, 0);
        call("globex", "flagship", false, 7, 3);
        let mut refused = admitted("refused", 0, false);
        refused.org = "acme".into();
        store.refuse(refused, 429).unwrap_or_else(|e| panic!("{e}"));
        let s = |v: &str| v.to_owned();
        assert_eq!(
            totals(),
            vec![
                (s("acme"), s("flagship"), 100, 50, 10, 3),
                (s("acme"), s("mini"), 30, 0, 0, 1),
                (s("globex"), s("flagship"), 0, 7, 3, 1),
            ]
        );
        // The next batch adds to what is there.
        call("acme", "mini", true, 5, 0);
        assert_eq!(totals()[1], (s("acme"), s("mini"), 35, 0, 0, 2));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_keeps_the_journal_for_the_next_start() {
        let (dir, path) = temp_ledger("failed");
        drop(SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}")));
        let trigger = |sql: &str| {
            Connection::open(&path)
                .and_then(|c| c.execute_batch(sql))
                .unwrap_or_else(|e| panic!("{e}"));
        };
        trigger("CREATE TRIGGER refuse BEFORE INSERT ON requests BEGIN SELECT RAISE(ABORT, 'disk trouble'); END;");
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let id = store
            .admit(admitted("free", 9, true))
            .unwrap_or_else(|e| panic!("{e}"));
        store
            .settle(
                id,
                Settled {
                    input: 4,
                    output: 5,
                    free: true,
                    status: 200,
                    ..Settled::default()
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.count_requests("settled").unwrap_or(1), 0);
        drop(store);
        trigger("DROP TRIGGER refuse;");
        let store = SqliteStore::open(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(store.count_requests("settled").unwrap_or_default(), 1);
        let totals = store.daily(Day(20_000)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((totals[0].free_tokens, totals[0].requests), (9, 1));
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
