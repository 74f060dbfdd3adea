//! Persistence: request records and daily totals.
//!
//! A call is written twice: once as `pending` when it is admitted, before it
//! goes upstream, and once when it settles; each write is durable (in the
//! call journal) before the caller goes on. A crash in between leaves a
//! pending row, which the next start settles as `interrupted` with its
//! reservation counted (an upper bound), so a `kill -9` loses no call and
//! never hands out free tokens twice. SQLite is the embedded default.

use crate::day::Day;
use std::sync::Arc;

pub mod sqlite;

pub use sqlite::{count_captures, for_each_capture, CapturedRow, ExportFilter, SqliteStore};

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
    pub input_tokens: u64,
    pub input_cached_tokens: u64,
    pub output_tokens: u64,
    pub num_model_requests: u64,
    pub cost_pico: u64,
}
