//! Persistence: request records and daily totals.
//!
//! A call is written twice: once as `pending` when it is admitted, before it
//! goes upstream, and once when it settles; each write is durable (in the
//! call journal) before the caller goes on. A crash in between leaves a
//! pending row, which the next start settles as `interrupted` with its
//! reservation counted (an upper bound), so a `kill -9` loses no call and
//! never hands out free tokens twice. SQLite is the embedded default (one
//! gateway per ledger); on PostgreSQL any number of replicas share one
//! ledger and one allowance ([`postgres`], docs/scaling.md).

use crate::alerts::Fired;
use crate::day::Day;
use crate::meter::{Decision, PoolKey, PoolState, Request, Settlement, Ticket, Usage};
use std::sync::Arc;

pub mod postgres;
pub mod sqlite;

pub use postgres::PgStore;
pub use sqlite::{count_captures, for_each_capture, CapturedRow, ExportFilter, SqliteStore};

/// What a store's asynchronous method returns.
pub type StoreFuture<'a, T> = futures_util::future::BoxFuture<'a, Result<T, StoreError>>;

/// The ledger, whichever database keeps it: the one interface the gateway,
/// the dashboard and the commands use. Two implementations: SQLite
/// ([`sqlite`], one gateway, embedded) and PostgreSQL (any number of
/// replicas sharing one allowance).
///
/// A call takes four steps through it: [`Store::reserve`] (the meter's
/// decision, holding what the call may use for free), [`Store::admit`]
/// (its pending row), [`Store::settle_meter`] (the whole-request rule) and
/// [`Store::settle`] (its final row, durable when the returned [`Durable`]
/// resolves). Everything else is a record kept in the background or a read.
pub trait Store: Send + Sync {
    /// Settle what a crash left pending, then load (or lease) what the meter
    /// needs for `today`. Called once, when a gateway starts; returns how
    /// many calls were settled as interrupted.
    fn start<'a>(&'a self, pools: &'a PoolNames, today: Day) -> StoreFuture<'a, usize>;
    /// The orgs and groups behind pool indexes, after a new configuration
    /// appended some (indexes never move: [`crate::config::Config::align_to`]);
    /// a pool new here gets what the ledger says it used `today`.
    fn name_pools<'a>(&'a self, pools: &'a PoolNames, today: Day) -> StoreFuture<'a, ()>;

    /// Decide a call and hold what it may use for free.
    fn reserve<'a>(&'a self, request: &'a Request) -> StoreFuture<'a, Decision>;
    /// Release a call's hold and settle it by the whole-request rule.
    fn settle_meter(&self, ticket: &Ticket, usage: &Usage) -> Settlement;
    /// A pool's free tokens as a new call here would see them.
    fn pool_state(&self, key: PoolKey, cap: u64) -> PoolState;

    /// Record an admitted call as pending; returns its id.
    fn admit(&self, a: Admitted) -> Result<i64, StoreError>;
    /// Record a refused call (no tokens, nothing reserved).
    fn refuse(&self, a: Admitted, status: u16) -> Result<(), StoreError>;
    /// Settle org `org`'s pending call `id` and add it to its day's totals.
    fn settle(&self, id: i64, org: &Arc<str>, ticket: &Ticket, s: Settled) -> Durable;

    /// Record a fired alert; `true` if this is its first record (each rule
    /// fires once a day, whichever gateway saw it first).
    /// (The answer borrows nothing: it may be awaited on a task of its own.)
    fn alert(&self, fired: Fired) -> StoreFuture<'static, bool>;
    /// Record how an alert's delivery ended (in the background).
    fn alert_delivered(
        &self,
        fired: &Fired,
        attempts: u32,
        delivered: bool,
    ) -> Result<(), StoreError>;
    /// Keep a captured call (in the background).
    fn capture(&self, capture: crate::capture::Capture) -> Result<(), StoreError>;
    /// Record a call forwarded unmetered (in the background).
    fn forwarded(&self, forwarded: Forwarded) -> Result<(), StoreError>;
    /// Delete `org`'s captured calls that started before `before_ms`.
    fn purge_captures<'a>(&'a self, org: &'a str, before_ms: i64) -> StoreFuture<'a, usize>;

    /// Keep a change made at runtime (the admin API, the dashboard) and
    /// return its id: ids ascend in the order changes are kept, on every
    /// replica.
    fn record_change(&self, change: ChangeRow) -> StoreFuture<'_, i64>;
    /// The changes made at runtime with an id above `after`, oldest first.
    fn changes(&self, after: i64) -> StoreFuture<'_, Vec<ChangeRow>>;
    /// Whether other gateways share this ledger (PostgreSQL): their
    /// changes made at runtime are then read as they come.
    fn shared(&self) -> bool;
    /// This gateway runs on every change up to `id` (replicas tell each
    /// other; nothing to do for SQLite's one gateway).
    fn changes_applied(&self, id: i64) -> StoreFuture<'_, ()>;
    /// How many other live replicas do not run on change `id` yet.
    fn replicas_behind(&self, id: i64) -> StoreFuture<'_, u64>;

    /// Begin a file (the Files API's): its row, not listed until complete.
    fn file_begin(&self, meta: FileMeta) -> StoreFuture<'_, ()>;
    /// Append part `seq` (from 0, at most [`FILE_PART`] bytes) of a file
    /// being written.
    fn file_part(
        &self,
        org: String,
        id: String,
        seq: i64,
        data: bytes::Bytes,
    ) -> StoreFuture<'_, ()>;
    /// A file is complete: its purpose and size.
    fn file_end(&self, org: String, id: String, purpose: String, bytes: u64)
        -> StoreFuture<'_, ()>;
    /// The complete files of org `org`'s project `project`, oldest first.
    fn files(&self, org: String, project: String) -> StoreFuture<'_, Vec<FileMeta>>;
    /// Parts `from..from + n` of a file, in order.
    fn file_parts(
        &self,
        org: String,
        id: String,
        from: i64,
        n: i64,
    ) -> StoreFuture<'_, Vec<bytes::Bytes>>;
    /// Delete a file and its parts; whether it was there.
    fn file_delete(&self, org: String, id: String) -> StoreFuture<'_, bool>;
    /// The files begun before `before_s` (Unix seconds) and never complete
    /// (an upload a stop cut): (org, id).
    fn files_abandoned(&self, before_s: i64) -> StoreFuture<'_, Vec<(String, String)>>;

    /// Keep a batch's row (made or changed).
    fn batch_save(&self, batch: BatchRow) -> StoreFuture<'_, ()>;
    /// The batches of a project (every batch: `None`), oldest first.
    fn batches(
        &self,
        org: Option<String>,
        project: Option<String>,
    ) -> StoreFuture<'_, Vec<BatchRow>>;
    /// Add a batch's input lines (state `pending`).
    fn batch_lines_add(
        &self,
        org: String,
        id: String,
        lines: Vec<BatchLine>,
    ) -> StoreFuture<'_, ()>;
    /// Claim up to `n` pending lines of a batch, first lines first: they are
    /// `running` when this returns, and no other claim gets them.
    fn batch_take(
        &self,
        org: String,
        id: String,
        n: i64,
        now_ms: i64,
    ) -> StoreFuture<'_, Vec<BatchLine>>;
    /// Set a line's state and result (its output or error line, JSON).
    fn batch_line_set(
        &self,
        org: String,
        id: String,
        line: i64,
        state: String,
        result: String,
    ) -> StoreFuture<'_, ()>;
    /// Lines `from..` of a batch in order, at most `n`.
    fn batch_lines(
        &self,
        org: String,
        id: String,
        from: i64,
        n: i64,
    ) -> StoreFuture<'_, Vec<BatchLine>>;
    /// How many lines of a batch are in each state.
    fn batch_counts(&self, org: String, id: String) -> StoreFuture<'_, Vec<(String, u64)>>;

    /// The totals of `day`, every org and group.
    fn daily(&self, day: Day) -> StoreFuture<'_, Vec<DailyTotal>>;
    /// Daily totals of days `from..=to`, oldest first.
    fn daily_range(&self, from: Day, to: Day) -> StoreFuture<'_, Vec<DailyTotal>>;
    /// The alerts fired on `day`, oldest first.
    fn alerts(&self, day: Day) -> StoreFuture<'_, Vec<Fired>>;
    /// (attempts, delivered) of an alert, if it was recorded.
    fn alert_delivery<'a>(
        &'a self,
        day: Day,
        org: &'a str,
        group: &'a str,
        rule: &'a str,
    ) -> StoreFuture<'a, Option<(u32, bool)>>;
    /// The latest `limit` calls (of `org` only, if given), newest first
    /// (metadata only).
    fn recent_for<'a>(&'a self, limit: u64, org: Option<&'a str>) -> StoreFuture<'a, Vec<Record>>;
    /// The latest `limit` calls of every org, newest first.
    fn recent(&self, limit: u64) -> StoreFuture<'_, Vec<Record>> {
        self.recent_for(limit, None)
    }
    /// The latest forwarded calls (of `org` only, if given), newest first.
    fn recent_forwarded_for<'a>(
        &'a self,
        limit: u64,
        org: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<Forwarded>>;
    /// The latest forwarded calls of every org, newest first.
    fn recent_forwarded(&self, limit: u64) -> StoreFuture<'_, Vec<Forwarded>> {
        self.recent_forwarded_for(limit, None)
    }
    /// Usage between `start_ms` and `end_ms`, one row per bucket and group:
    /// the bucket is `(started_ms - start_ms) / width_ms`; `group_by` names
    /// columns among project_id, api_key_id, model (or served_model: the model that
    /// answered, in the `model` column), lane and sharing.
    fn usage_rows<'a>(
        &'a self,
        start_ms: i64,
        end_ms: i64,
        width_ms: i64,
        group_by: &'a [&'a str],
    ) -> StoreFuture<'a, Vec<UsageRow>>;
    /// Calls in a state (`pending`, `settled`, `interrupted`).
    fn count_requests<'a>(&'a self, state: &'a str) -> StoreFuture<'a, u64>;
    /// Captured calls kept for `org`.
    fn count_captures<'a>(&'a self, org: &'a str) -> StoreFuture<'a, u64>;
    /// A receiver that changes whenever the ledger does (the dashboard's
    /// cue to refresh).
    fn commits(&self) -> tokio::sync::watch::Receiver<u64>;
    /// Write everything queued (a gateway shutting down calls this last).
    fn flush(&self) -> StoreFuture<'_, ()>;
    /// The pools of `day` as every replica sees them (PostgreSQL): free
    /// tokens used, forfeited ones included, and reserved by calls in
    /// flight at every replica (others' as of their last heartbeat);
    /// `None` where the gateway's own meter is the whole truth (SQLite).
    fn pools_everywhere<'a>(&'a self, day: Day) -> StoreFuture<'a, Option<Vec<PoolRow>>>;
}

/// A batch as the ledger keeps it: what it is found by, and OpenAI's batch
/// object (JSON).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRow {
    pub org: String,
    /// `batch_` and 24 characters.
    pub id: String,
    pub project: String,
    /// Unix seconds.
    pub created_at: i64,
    pub status: String,
    pub object: String,
}

/// One input line of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchLine {
    /// From 1, as the input file numbers it.
    pub line: i64,
    pub custom_id: String,
    /// The request's body, JSON.
    pub body: String,
    /// `pending`, `running`, `done` (an output line), `failed` (an error
    /// line), `cancelled` or `expired`.
    pub state: String,
    /// The output or error line, JSON; empty until it ran.
    pub result: String,
    /// When it was last claimed to run (Unix ms; 0: never).
    pub claimed_ms: i64,
}

/// A file's parts are at most this large (the Files API reads and writes
/// a part at a time, so a file's size does not set the memory it takes).
pub const FILE_PART: usize = 1024 * 1024;

/// A file kept in the ledger.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileMeta {
    /// `file-` and 24 characters.
    pub id: String,
    pub org: String,
    /// The project's id: only its keys see the file.
    pub project: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
}

/// A change made at runtime, as the ledger keeps it (see [`crate::changes`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeRow {
    /// Given by the store (0 before it is kept).
    pub id: i64,
    pub at_ms: i64,
    pub org: String,
    /// Who made it: "admin token", or an org admin key's id and name.
    pub actor: String,
    /// The change, JSON.
    pub body: String,
}

/// A pool as every replica sees it: see [`Store::pools_everywhere`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolRow {
    pub key: PoolKey,
    pub used: u64,
    pub reserved: u64,
}

/// Open the ledger at `url`: to serve from it (`serving`: SQLite's must
/// not be another process's; a PostgreSQL replica registers itself), or only
/// to read it (the commands).
pub async fn open(
    url: &crate::config::StoreUrl,
    serving: bool,
) -> Result<Arc<dyn Store>, StoreError> {
    match url {
        crate::config::StoreUrl::Sqlite(path) => {
            // A command that reads makes no empty ledger where none is.
            if !serving && !path.exists() {
                return Err(StoreError(format!(
                    "no ledger at {}: tokenwarden serve makes it (a relative sqlite:// path is the configuration file's folder's)",
                    path.display()
                )));
            }
            let store = SqliteStore::open(path)?;
            if serving && !store.owns() {
                return Err(StoreError(format!(
                    "the ledger {} is in use by another tokenwarden process (one gateway per SQLite ledger; it holds {}-calls.lock; several replicas need a postgres:// store)",
                    path.display(),
                    path.display()
                )));
            }
            Ok(Arc::new(store))
        }
        crate::config::StoreUrl::Postgres(pg) if serving => Ok(Arc::new(PgStore::open(pg).await?)),
        crate::config::StoreUrl::Postgres(pg) => Ok(Arc::new(PgStore::open_reader(pg).await?)),
    }
}

/// The names behind a [`PoolKey`]'s indexes: the configuration's orgs and
/// the catalog's groups, in order.
#[derive(Clone, Debug, Default)]
pub struct PoolNames {
    pub orgs: Vec<Arc<str>>,
    pub groups: Vec<Arc<str>>,
}

impl PoolNames {
    pub fn of(config: &crate::config::Config) -> Self {
        PoolNames {
            orgs: config.orgs.iter().map(|o| o.name.clone()).collect(),
            groups: config
                .catalog
                .groups
                .iter()
                .map(|g| g.name.clone())
                .collect(),
        }
    }

    /// The pool of org `org`, group `group` and `day`, by name.
    pub fn key(&self, org: &str, group: &str, day: Day) -> Option<PoolKey> {
        Some(PoolKey {
            org: self.orgs.iter().position(|o| &**o == org)?,
            group: self.groups.iter().position(|g| &**g == group)?,
            day,
        })
    }
}

/// A settled call's record on its way to the ledger: resolves when it is
/// durable (at once when it already is).
pub struct Durable(
    Option<(
        tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
        std::time::Duration,
    )>,
);

impl Durable {
    /// A record that is durable already (or that failed to be written).
    pub fn done(result: Result<(), StoreError>) -> Self {
        if let Err(e) = result {
            tracing::error!(error = %e, "could not record a settled call");
        }
        Durable(None)
    }

    /// A record that will be once `receiver` hears so; waited for at most
    /// `patience` (past it, the record is still written when it can be).
    pub fn pending(
        receiver: tokio::sync::oneshot::Receiver<Result<(), StoreError>>,
        patience: std::time::Duration,
    ) -> Self {
        Durable(Some((receiver, patience)))
    }

    /// Wait until the record is durable (or could not be written: logged).
    pub async fn wait(self) {
        let Some((receiver, patience)) = self.0 else {
            return;
        };
        match tokio::time::timeout(patience, receiver).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "could not record a settled call"),
            Ok(Err(_)) => tracing::error!("the store stopped before a settled call was recorded"),
            Err(_) => tracing::warn!("a settled call's record is still queued (the store is unreachable); answered without waiting longer"),
        }
    }
}

/// Now, as Unix ms (for the store's own bookkeeping: heartbeats, migrations).
pub(crate) fn now_ms() -> i64 {
    crate::gateway::Clock::now_ms(&crate::gateway::SystemClock)
}

#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

impl StoreError {
    pub fn from_message(message: String) -> Self {
        StoreError(message)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// A call as admitted, before it goes upstream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub started_ms: i64,
    pub day: Day,
    // The names are shared with the configuration (and the key id with the
    // key table, the two models with each other): a call copies none.
    pub org: Arc<str>,
    pub project: Arc<str>,
    /// A short, non-secret id of the client key (a prefix of its hash).
    pub key_id: Arc<str>,
    pub endpoint: &'static str,
    pub requested_model: Arc<str>,
    pub served_model: Arc<str>,
    /// The program group, `None` for models outside the program.
    pub group: Option<Arc<str>>,
    /// `free`, `billed`, `clamped`, `downgraded` or `refused`.
    pub decision: &'static str,
    /// Tokens held in the free pool while the call runs.
    pub reserved: u64,
    /// Whether the reservation is in the free pool (so counts if the call is lost).
    pub free_lane: bool,
    pub streamed: bool,
    /// The call's traffic is shared in the program (a sharing project of an eligible org).
    pub shared: bool,
}

/// A call a project's `forward` rules let past the meter, as the ledger
/// keeps it: who, what (the path without its query) and how it ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Forwarded {
    pub started_ms: i64,
    pub org: Arc<str>,
    pub project: Arc<str>,
    pub key_id: Arc<str>,
    pub method: &'static str,
    pub path: String,
    /// The HTTP status the client got.
    pub status: u16,
    pub latency_ms: u64,
}

/// How a call ended (serialized as is in the call journal).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Settled {
    /// The model upstream says served the call.
    pub served_model: Option<String>,
    pub input: u64,
    pub cached: u64,
    pub output: u64,
    pub reasoning: u64,
    /// The whole call was free.
    pub free: bool,
    /// List price of a billed call, in pico-dollars (0 when free).
    pub cost_pico: u64,
    /// The HTTP status the client got (0 when the client hung up first).
    pub status: u16,
    pub latency_ms: u64,
    /// Usage was not reported by upstream and was estimated.
    pub estimated: bool,
}

/// One day's totals for one org and group (`group` empty: outside the program).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DailyTotal {
    pub day: Day,
    pub org: String,
    pub group: String,
    pub free_tokens: u64,
    pub billed_tokens: u64,
    pub cost_pico: u64,
    pub requests: u64,
}

/// A call as the ledger holds it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Record {
    pub id: i64,
    pub org: String,
    pub project: String,
    pub requested_model: String,
    pub served_model: String,
    pub group: Option<String>,
    pub decision: String,
    /// `pending`, `settled` or `interrupted`.
    pub state: String,
    pub input: u64,
    pub cached: u64,
    pub output: u64,
    pub free: bool,
    pub cost_pico: u64,
    pub status: u16,
    pub estimated: bool,
    pub started_ms: i64,
    pub key_id: String,
    pub latency_ms: u64,
}

/// One bucket's usage for one combination of the grouped columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageRow {
    /// Bucket index from the query's start.
    pub bucket: i64,
    pub org: String,
    pub project_id: Option<String>,
    pub api_key_id: Option<String>,
    pub model: Option<String>,
    /// `free` or `billed`, when grouped by lane.
    pub lane: Option<String>,
    /// `shared` or `private`, when grouped by sharing.
    pub sharing: Option<String>,
    /// `true` for a batch's calls (recorded with the batch's id as their
    /// key id), `false` for live calls, when grouped by batch.
    pub batch: Option<String>,
    pub input_tokens: u64,
    pub input_cached_tokens: u64,
    pub output_tokens: u64,
    /// Calls answered (not refused).
    pub num_model_requests: u64,
    pub cost_pico: u64,
    /// Calls refused before the upstream (free tokens spent, policy `block`).
    pub refused: u64,
    /// Answered calls whose status was not a success (an upstream's error,
    /// a cut stream, a timeout).
    pub errors: u64,
}
