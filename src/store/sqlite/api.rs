//! The [`Store`] interface on SQLite: one gateway owns the ledger, so the
//! meter is the process's own ([`Ledger`] behind a lock), loaded from the
//! day's totals at start; every other method is the store's own, reads and
//! purges on the blocking pool.

use super::SqliteStore;
use crate::alerts::Fired;
use crate::day::Day;
use crate::meter::{Decision, Ledger, PoolKey, PoolState, Request, Settlement, Ticket, Usage};
use crate::store::{
    Admitted, BatchLine, BatchRow, ChangeRow, DailyTotal, Durable, FileMeta, Forwarded, PoolNames,
    Record, Settled, Store, StoreError, StoreFuture, UsageRow,
};

/// The meter's lock, poisoned or not: the ledger holds only counters, each
/// update of which completes before anything can panic.
fn meter(store: &SqliteStore) -> std::sync::MutexGuard<'_, Ledger> {
    store
        .meter
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A future that is ready at once.
fn ready<'a, T: Send + 'a>(result: Result<T, StoreError>) -> StoreFuture<'a, T> {
    Box::pin(std::future::ready(result))
}

/// A read (or a purge) on the blocking pool: it waits for the writer's
/// queue and then for SQLite, which must not hold an async worker (the
/// dashboard's reads scan the day's calls). Inline outside a runtime.
fn off_worker<'a, T: Send + 'static>(
    store: &SqliteStore,
    read: impl FnOnce(&SqliteStore) -> Result<T, StoreError> + Send + 'static,
) -> StoreFuture<'a, T> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return ready(read(store));
    };
    let store = store.clone();
    let task = runtime.spawn_blocking(move || read(&store));
    Box::pin(async move {
        task.await
            .map_err(|e| StoreError::from_message(format!("a ledger read failed: {e}")))?
    })
}

impl Store for SqliteStore {
    fn start<'a>(&'a self, pools: &'a PoolNames, today: Day) -> StoreFuture<'a, usize> {
        ready((|| {
            let recovered = self.recover()?;
            let totals = SqliteStore::daily(self, today)?;
            let mut ledger = meter(self);
            for total in totals {
                if let Some(key) = pools.key(&total.org, &total.group, today) {
                    ledger.restore(key, total.free_tokens);
                }
            }
            Ok(recovered)
        })())
    }

    fn name_pools<'a>(&'a self, pools: &'a PoolNames, today: Day) -> StoreFuture<'a, ()> {
        ready((|| {
            let totals = SqliteStore::daily(self, today)?;
            let mut ledger = meter(self);
            for total in totals {
                if let Some(key) = pools.key(&total.org, &total.group, today) {
                    ledger.restore_new(key, total.free_tokens);
                }
            }
            Ok(())
        })())
    }

    fn reserve<'a>(&'a self, request: &'a Request) -> StoreFuture<'a, Decision> {
        ready(Ok(meter(self).admit(request)))
    }

    fn settle_meter(&self, ticket: &Ticket, usage: &Usage) -> Settlement {
        meter(self).settle(ticket, usage)
    }

    fn pool_state(&self, key: PoolKey, cap: u64) -> PoolState {
        meter(self).state(key, cap)
    }

    fn admit(&self, a: Admitted) -> Result<i64, StoreError> {
        SqliteStore::admit(self, a)
    }

    fn refuse(&self, a: Admitted, status: u16) -> Result<(), StoreError> {
        SqliteStore::refuse(self, a, status)
    }

    fn settle(&self, id: i64, _org: &std::sync::Arc<str>, _ticket: &Ticket, s: Settled) -> Durable {
        // The journal's append is what makes it durable: done on return.
        Durable::done(SqliteStore::settle(self, id, s))
    }

    fn alert(&self, fired: Fired) -> StoreFuture<'static, bool> {
        // One gateway per ledger: its own engine already fires each rule once.
        ready(self.alert_nowait(fired).map(|()| true))
    }

    fn alert_delivered(
        &self,
        fired: &Fired,
        attempts: u32,
        delivered: bool,
    ) -> Result<(), StoreError> {
        self.alert_delivered_nowait(fired, attempts, delivered)
    }

    fn capture(&self, capture: crate::capture::Capture) -> Result<(), StoreError> {
        self.capture_nowait(capture)
    }

    fn forwarded(&self, forwarded: Forwarded) -> Result<(), StoreError> {
        self.forward_nowait(forwarded)
    }

    fn purge_captures<'a>(&'a self, org: &'a str, before_ms: i64) -> StoreFuture<'a, usize> {
        let org = org.to_owned();
        off_worker(self, move |s| {
            SqliteStore::purge_captures(s, &org, before_ms)
        })
    }

    fn record_change(&self, change: ChangeRow) -> StoreFuture<'_, i64> {
        off_worker(self, move |s| SqliteStore::record_change(s, change))
    }

    fn changes(&self, after: i64) -> StoreFuture<'_, Vec<ChangeRow>> {
        off_worker(self, move |s| SqliteStore::changes(s, after))
    }

    fn shared(&self) -> bool {
        false
    }

    fn changes_applied(&self, _id: i64) -> StoreFuture<'_, ()> {
        ready(Ok(()))
    }

    fn replicas_behind(&self, _id: i64) -> StoreFuture<'_, u64> {
        ready(Ok(0))
    }

    fn file_begin(&self, meta: FileMeta) -> StoreFuture<'_, ()> {
        off_worker(self, move |s| SqliteStore::file_begin(s, meta))
    }

    fn file_part(
        &self,
        _org: String,
        id: String,
        seq: i64,
        data: bytes::Bytes,
    ) -> StoreFuture<'_, ()> {
        off_worker(self, move |s| SqliteStore::file_part(s, id, seq, data))
    }

    fn file_end(
        &self,
        org: String,
        id: String,
        purpose: String,
        bytes: u64,
    ) -> StoreFuture<'_, ()> {
        off_worker(self, move |s| {
            SqliteStore::file_end(s, org, id, purpose, bytes)
        })
    }

    fn files(&self, org: String, project: String) -> StoreFuture<'_, Vec<FileMeta>> {
        off_worker(self, move |s| SqliteStore::files(s, &org, &project))
    }

    fn file_parts(
        &self,
        org: String,
        id: String,
        from: i64,
        n: i64,
    ) -> StoreFuture<'_, Vec<bytes::Bytes>> {
        off_worker(self, move |s| {
            SqliteStore::file_parts(s, &org, &id, from, n)
        })
    }

    fn file_delete(&self, org: String, id: String) -> StoreFuture<'_, bool> {
        off_worker(self, move |s| SqliteStore::file_delete(s, org, id))
    }

    fn files_abandoned(&self, before_s: i64) -> StoreFuture<'_, Vec<(String, String)>> {
        off_worker(self, move |s| SqliteStore::files_abandoned(s, before_s))
    }

    fn batch_save(&self, batch: BatchRow) -> StoreFuture<'_, ()> {
        off_worker(self, move |s| SqliteStore::batch_save(s, batch))
    }

    fn batches(
        &self,
        org: Option<String>,
        project: Option<String>,
    ) -> StoreFuture<'_, Vec<BatchRow>> {
        off_worker(self, move |s| {
            SqliteStore::batches(s, org.as_deref(), project.as_deref())
        })
    }

    fn batch_lines_add(
        &self,
        _org: String,
        id: String,
        lines: Vec<BatchLine>,
    ) -> StoreFuture<'_, ()> {
        off_worker(self, move |s| SqliteStore::batch_lines_add(s, id, lines))
    }

    fn batch_take(
        &self,
        _org: String,
        id: String,
        n: i64,
        now_ms: i64,
    ) -> StoreFuture<'_, Vec<BatchLine>> {
        off_worker(self, move |s| SqliteStore::batch_take(s, id, n, now_ms))
    }

    fn batch_line_set(
        &self,
        _org: String,
        id: String,
        line: i64,
        state: String,
        result: String,
    ) -> StoreFuture<'_, ()> {
        off_worker(self, move |s| {
            SqliteStore::batch_line_set(s, id, line, state, result)
        })
    }

    fn batch_lines(
        &self,
        _org: String,
        id: String,
        from: i64,
        n: i64,
    ) -> StoreFuture<'_, Vec<BatchLine>> {
        off_worker(self, move |s| SqliteStore::batch_lines(s, &id, from, n))
    }

    fn batch_counts(&self, _org: String, id: String) -> StoreFuture<'_, Vec<(String, u64)>> {
        off_worker(self, move |s| SqliteStore::batch_counts(s, &id))
    }

    fn daily(&self, day: Day) -> StoreFuture<'_, Vec<DailyTotal>> {
        off_worker(self, move |s| SqliteStore::daily(s, day))
    }

    fn daily_range(&self, from: Day, to: Day) -> StoreFuture<'_, Vec<DailyTotal>> {
        off_worker(self, move |s| SqliteStore::daily_range(s, from, to))
    }

    fn alerts(&self, day: Day) -> StoreFuture<'_, Vec<Fired>> {
        off_worker(self, move |s| SqliteStore::alerts(s, day))
    }

    fn alert_delivery<'a>(
        &'a self,
        day: Day,
        org: &'a str,
        group: &'a str,
        rule: &'a str,
    ) -> StoreFuture<'a, Option<(u32, bool)>> {
        let (org, group, rule) = (org.to_owned(), group.to_owned(), rule.to_owned());
        off_worker(self, move |s| {
            SqliteStore::alert_delivery(s, day, &org, &group, &rule)
        })
    }

    fn recent_for<'a>(&'a self, limit: u64, org: Option<&'a str>) -> StoreFuture<'a, Vec<Record>> {
        let org = org.map(str::to_owned);
        off_worker(self, move |s| SqliteStore::recent(s, limit, org.as_deref()))
    }

    fn recent_forwarded_for<'a>(
        &'a self,
        limit: u64,
        org: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<Forwarded>> {
        let org = org.map(str::to_owned);
        off_worker(self, move |s| {
            SqliteStore::recent_forwarded(s, limit, org.as_deref())
        })
    }

    fn usage_rows<'a>(
        &'a self,
        start_ms: i64,
        end_ms: i64,
        width_ms: i64,
        group_by: &'a [&'a str],
    ) -> StoreFuture<'a, Vec<UsageRow>> {
        let group_by: Vec<String> = group_by.iter().map(|g| (*g).to_owned()).collect();
        off_worker(self, move |s| {
            let group_by: Vec<&str> = group_by.iter().map(String::as_str).collect();
            SqliteStore::usage_rows(s, start_ms, end_ms, width_ms, &group_by)
        })
    }

    fn count_requests<'a>(&'a self, state: &'a str) -> StoreFuture<'a, u64> {
        let state = state.to_owned();
        off_worker(self, move |s| SqliteStore::count_requests(s, &state))
    }

    fn count_captures<'a>(&'a self, org: &'a str) -> StoreFuture<'a, u64> {
        let org = org.to_owned();
        off_worker(self, move |s| SqliteStore::count_captures(s, &org))
    }

    fn commits(&self) -> tokio::sync::watch::Receiver<u64> {
        SqliteStore::commits(self)
    }

    fn pools_everywhere<'a>(
        &'a self,
        _day: Day,
    ) -> StoreFuture<'a, Option<Vec<crate::store::PoolRow>>> {
        ready(Ok(None))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        // Queued writes are in the call journal or committed when the last
        // handle on the ledger is dropped; wait for them here all the same.
        off_worker(self, |s| {
            SqliteStore::count_requests(s, "pending").map(drop)
        })
    }
}
