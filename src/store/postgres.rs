//! The PostgreSQL store: any number of gateway replicas share one ledger
//! and one exact allowance.
//!
//! - **Admission** is in memory, on free tokens each replica leases from
//!   PostgreSQL in chunks ([`lease`]); the leases together never pass a
//!   pool's cap.
//! - **Records** go through one writer task per replica ([`write`]): a
//!   call's pending row is written if it has not settled within a second
//!   (most calls are written once, settled), its settlement when it ends;
//!   an answer waits for its settlement's commit.
//! - **Replicas** register at start and keep a heartbeat. One whose
//!   heartbeat stops (killed, cut off) is recovered by any other, or by its
//!   own restart, within [`STALE`] and a sweep: its pending calls settle as
//!   `interrupted` with their reservations counted, and the rest of what it
//!   leased is forfeited for the day (counted as used, never handed out
//!   again: a call of its may have gone upstream before its row was
//!   written).
//! - **PostgreSQL unreachable**: a call needing a lease, or any call while
//!   the writer's last batch failed, is refused with a 503; calls in
//!   flight finish, and their records are written once PostgreSQL is back.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use crate::alerts::Fired;
use crate::config::PostgresUrl;
use crate::day::Day;
use crate::meter::{Decision, PoolKey, PoolState, Request, Settlement, Ticket, Usage};
use crate::store::{
    Admitted, BatchLine, BatchRow, ChangeRow, DailyTotal, Durable, FileMeta, Forwarded, PoolNames,
    Record, Settled, Store, StoreError, StoreFuture, UsageRow,
};

mod batches;
mod files;
mod lease;
mod read;
mod recover;
pub mod schema;
mod write;

use lease::{Leases, Want};
use write::Job;

/// A replica whose heartbeat is older than this is taken for dead.
pub const STALE: Duration = Duration::from_secs(10);
/// How often a replica beats, sweeps for dead ones and gives back lease.
const BEAT: Duration = Duration::from_secs(1);
/// How long an answer waits for its record while PostgreSQL is away; past
/// it the answer goes out and the record is written when PostgreSQL is back.
const RECORD_WAIT: Duration = Duration::from_secs(30);

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::from_message(redacted(&e))
    }
}

/// A driver error as text, without the connection's parameters.
pub fn redacted(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("postgres: {} ({})", db.message(), db.code().code()),
        None => format!("postgres: {e}"),
    }
}

pub(crate) fn pool_error(e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => e.into(),
        other => StoreError::from_message(format!("postgres: {other}")),
    }
}

/// `USER@HOST:PORT/DB` of a URL, for logs and messages (no password).
pub fn shown(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_default();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        config.get_user().unwrap_or(""),
        config.get_dbname().unwrap_or("")
    )
}

/// A replica's ledger on PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: deadpool_postgres::Pool,
    /// This replica's id (random, new at each start).
    replica: Arc<str>,
    leases: Arc<Leases>,
    /// The orgs and groups behind pool indexes (appended to by reloads).
    names: arc_swap::ArcSwapOption<PoolNames>,
    queue: mpsc::UnboundedSender<Job>,
    /// The next id of a row this replica writes: its replica number in the
    /// high 32 bits, a count in the low ones.
    next_id: AtomicI64,
    commits: watch::Receiver<u64>,
    /// Changes on each of this replica's commits and every heartbeat (other
    /// replicas' calls change the ledger too): the dashboard's cue.
    committed: Arc<watch::Sender<u64>>,
    /// The writer's last batch failed: PostgreSQL is away.
    failing: Arc<AtomicBool>,
    /// Set when another replica took this one for dead.
    declared_dead: AtomicBool,
    /// Held while a lease is asked for.
    leasing: tokio::sync::Mutex<()>,
    shown: String,
}

impl Inner {
    fn new(
        pool: deadpool_postgres::Pool,
        replica: Arc<str>,
        leases: Arc<Leases>,
        queue: mpsc::UnboundedSender<Job>,
        commits: watch::Receiver<u64>,
        committed: watch::Sender<u64>,
        url: &PostgresUrl,
    ) -> Self {
        Inner {
            pool,
            replica,
            leases,
            names: arc_swap::ArcSwapOption::empty(),
            queue,
            next_id: AtomicI64::new(0),
            commits,
            committed: Arc::new(committed),
            failing: Arc::default(),
            declared_dead: AtomicBool::new(false),
            leasing: tokio::sync::Mutex::new(()),
            shown: url.shown.clone(),
        }
    }
}

impl PgStore {
    /// Connect, migrate the schema (under an advisory lock), and register
    /// this replica.
    pub async fn open(url: &PostgresUrl) -> Result<PgStore, StoreError> {
        let pool = connect(url)?;
        let mut client = pool.get().await.map_err(pool_error)?;
        schema::migrate(&mut client).await?;
        let number: i64 = client
            .query_one("SELECT nextval('replica_numbers')", &[])
            .await?
            .get(0);
        let replica: Arc<str> = format!(
            "r{number}-{}",
            crate::gateway::auth::new_key("")[..8].to_owned()
        )
        .into();
        let now = crate::store::now_ms();
        client
            .execute(
                "INSERT INTO replicas (id, started_ms, seen_ms) VALUES ($1, $2, $2)",
                &[&&*replica, &now],
            )
            .await?;
        drop(client);
        let leases = Arc::new(Leases::default());
        let (queue, jobs) = mpsc::unbounded_channel();
        let (committed, commits) = watch::channel(0u64);
        let inner = Inner::new(pool, replica, leases, queue, commits, committed, url);
        tokio::spawn(write::run(
            jobs,
            write::Context {
                pool: inner.pool.clone(),
                replica: inner.replica.clone(),
                leases: inner.leases.clone(),
                committed: inner.committed.clone(),
                failing: inner.failing.clone(),
            },
        ));
        inner
            .next_id
            .store((number & 0x7fff_ffff) << 32, Ordering::Relaxed);
        Ok(PgStore {
            inner: Arc::new(inner),
        })
    }

    /// A store that only reads (the commands): no replica registered, no
    /// writer, nothing migrated; a database of another schema is an error.
    pub async fn open_reader(url: &PostgresUrl) -> Result<PgStore, StoreError> {
        let pool = connect(url)?;
        let client = pool.get().await.map_err(pool_error)?;
        let version = schema::version(&client).await?;
        if version != schema::latest() {
            return Err(StoreError::from_message(format!(
                "{} is at schema version {version}, this tokenwarden reads version {} (start `serve` on it to migrate)",
                url.shown,
                schema::latest()
            )));
        }
        drop(client);
        // No writer: the queue's receiver is dropped, so a write is an error.
        let (queue, _) = mpsc::unbounded_channel();
        let (committed, commits) = watch::channel(0u64);
        Ok(PgStore {
            inner: Arc::new(Inner::new(
                pool,
                "reader".into(),
                Arc::default(),
                queue,
                commits,
                committed,
                url,
            )),
        })
    }

    /// How many captured calls `filter` selects (the export).
    pub async fn count_export(
        &self,
        filter: &crate::store::ExportFilter,
    ) -> Result<u64, StoreError> {
        read::count_export(&*self.client().await?, filter).await
    }

    /// Hand every captured call `filter` selects to `f`, oldest first (the export).
    pub async fn for_each_export(
        &self,
        filter: &crate::store::ExportFilter,
        f: impl FnMut(crate::store::CapturedRow) -> std::io::Result<()>,
    ) -> Result<u64, StoreError> {
        read::for_each_export(&*self.client().await?, filter, f).await
    }

    /// The schema version of the database at `url` (for `check-config`).
    pub async fn schema_version(url: &PostgresUrl) -> Result<i64, StoreError> {
        let pool = connect(url)?;
        let client = pool.get().await.map_err(pool_error)?;
        schema::version(&client).await
    }

    /// Where the store is, for messages (no password).
    pub fn shown(&self) -> &str {
        &self.inner.shown
    }

    /// This replica's id.
    pub fn replica(&self) -> &str {
        &self.inner.replica
    }

    /// Whether new calls may be admitted: not while PostgreSQL is away
    /// (the writer's last batch failed), nor once another replica took this
    /// one for dead (its calls would be nobody's to recover: restart it).
    fn usable(&self) -> Result<(), StoreError> {
        if self.inner.failing.load(Ordering::Relaxed) {
            return Err(StoreError::from_message("PostgreSQL is unreachable".into()));
        }
        if self.inner.declared_dead.load(Ordering::Relaxed) {
            return Err(StoreError::from_message(
                "this replica was taken for dead by the others; restart it".into(),
            ));
        }
        Ok(())
    }

    fn id(&self) -> i64 {
        self.inner.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.inner
            .queue
            .send(job)
            .map_err(|_| StoreError::from_message("the PostgreSQL writer has stopped".into()))
    }

    /// A connection of the pool, at once (files and batches: not the
    /// writer's rows, so no wait for its queue).
    async fn pooled(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.inner.pool.get().await.map_err(pool_error)
    }

    /// A connection to read with, once what this replica queued before is
    /// committed (it reads its own writes, as SQLite's reads do).
    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let (done, committed) = oneshot::channel();
        if self.send(Job::Sync(done)).is_ok() {
            // Waited for only while PostgreSQL answers: a read of a store
            // that is away fails on its own below.
            let _ = tokio::time::timeout(Duration::from_secs(5), committed).await;
        }
        self.inner.pool.get().await.map_err(pool_error)
    }

    /// Lease what `wants` asks for, each in one statement: the grant is
    /// bounded by what is left of the pool's cap, in the same row update
    /// that records it.
    async fn lease(&self, wants: &[Want]) -> Result<(), StoreError> {
        let names = self.inner.names.load_full();
        let Some(names) = names.as_deref() else {
            return Err(StoreError::from_message("the store was not started".into()));
        };
        let client = self.inner.pool.get().await.map_err(pool_error)?;
        let statement = client
            .prepare_cached(
                "WITH g AS (
                    INSERT INTO daily (org, day, grp, leased, last_grant)
                    VALUES ($1, $2, $3, LEAST($4::BIGINT, $5::BIGINT), LEAST($4::BIGINT, $5::BIGINT))
                    ON CONFLICT (org, day, grp) DO UPDATE SET
                        last_grant = LEAST($4::BIGINT, GREATEST($5::BIGINT - daily.free_tokens - daily.forfeited - daily.leased, 0)),
                        leased = daily.leased + LEAST($4::BIGINT, GREATEST($5::BIGINT - daily.free_tokens - daily.forfeited - daily.leased, 0))
                    RETURNING last_grant, free_tokens + forfeited AS used, leased
                 ), l AS (
                    INSERT INTO leases (org, day, grp, replica, held)
                    SELECT $1, $2, $3, $6, last_grant FROM g WHERE last_grant > 0
                    ON CONFLICT (org, day, grp, replica) DO UPDATE SET held = leases.held + EXCLUDED.held
                 )
                 SELECT last_grant, used, leased FROM g",
            )
            .await?;
        for want in wants {
            let (Some(org), Some(group)) = (
                names.orgs.get(want.pool.org),
                names.groups.get(want.pool.group),
            ) else {
                continue;
            };
            let ask = self.inner.leases.ask(want);
            let row = client
                .query_one(
                    &statement,
                    &[
                        &&**org,
                        &(want.pool.day.0 as i32),
                        &&**group,
                        &write_i64(ask),
                        &write_i64(want.cap),
                        &&*self.inner.replica,
                    ],
                )
                .await?;
            let (granted, used, leased): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
            self.inner.leases.granted(
                want,
                u64::try_from(granted).unwrap_or(0),
                u64::try_from(used).unwrap_or(0),
                u64::try_from(leased).unwrap_or(0),
            );
        }
        Ok(())
    }

    /// Beat, give back unused lease, and recover dead replicas, every [`BEAT`].
    fn keep(&self) {
        let weak = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(BEAT).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let store = PgStore { inner };
                if let Err(e) = store.beat().await {
                    tracing::warn!(error = %e, "PostgreSQL heartbeat failed");
                }
            }
        });
    }

    async fn beat(&self) -> Result<(), StoreError> {
        if let Some(names) = self.inner.names.load_full().as_deref() {
            for (pool, tokens) in self.inner.leases.to_return() {
                let (Some(org), Some(group)) =
                    (names.orgs.get(pool.org), names.groups.get(pool.group))
                else {
                    continue;
                };
                self.send(Job::Return {
                    pool,
                    org: org.clone(),
                    group: group.clone(),
                    tokens,
                })?;
            }
        }
        let client = self.inner.pool.get().await.map_err(pool_error)?;
        if let Some(names) = self.inner.names.load_full().as_deref() {
            let report = client
                .prepare_cached(
                    "UPDATE leases SET reserved = $5
                     WHERE org = $1 AND day = $2 AND grp = $3 AND replica = $4 AND reserved <> $5",
                )
                .await?;
            for (pool, reserved) in self.inner.leases.reservations() {
                let (Some(org), Some(group)) =
                    (names.orgs.get(pool.org), names.groups.get(pool.group))
                else {
                    continue;
                };
                client
                    .execute(
                        &report,
                        &[
                            &&**org,
                            &(pool.day.0 as i32),
                            &&**group,
                            &&*self.inner.replica,
                            &write_i64(reserved),
                        ],
                    )
                    .await?;
            }
        }
        let alive = client
            .execute(
                "UPDATE replicas SET seen_ms = $2 WHERE id = $1",
                &[&&*self.inner.replica, &crate::store::now_ms()],
            )
            .await?;
        if alive == 0 && !self.inner.declared_dead.swap(true, Ordering::Relaxed) {
            tracing::error!(replica = %self.inner.replica, "another replica took this one for dead (no heartbeat for {}s) and counted its leases; it refuses new calls until restarted", STALE.as_secs());
            self.inner.leases.forget();
        }
        drop(client);
        recover::sweep(&self.inner.pool, &self.inner.replica).await?;
        self.inner.committed.send_modify(|n| *n += 1);
        Ok(())
    }
}

fn write_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A pool of connections to `url`, TLS by rustls when the URL asks for it
/// (`sslmode=require`), trusting the platform's roots and `ca_file`'s.
fn connect(url: &PostgresUrl) -> Result<deadpool_postgres::Pool, StoreError> {
    let config: tokio_postgres::Config = url.url.expose().parse()?;
    crate::gateway::upstream::install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(
        url.extra_roots.iter().cloned(),
        provider.clone(),
    )
    .map_err(|e| StoreError::from_message(format!("postgres TLS: {e}")))?;
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::from_message(format!("postgres TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres_rustls::MakeRustlsConnect::new(tls),
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    deadpool_postgres::Pool::builder(manager)
        .max_size(8)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| StoreError::from_message(format!("postgres pool: {e}")))
}

impl Store for PgStore {
    fn start<'a>(&'a self, pools: &'a PoolNames, today: Day) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let recovered = recover::sweep(&self.inner.pool, &self.inner.replica).await?;
            self.name_pools(pools, today).await?;
            self.keep();
            Ok(recovered)
        })
    }

    fn name_pools<'a>(&'a self, pools: &'a PoolNames, today: Day) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.inner.names.store(Some(Arc::new(pools.clone())));
            // What every pool has used today, as the gauges and headers show.
            let client = self.client().await?;
            for row in client
                .query(
                    "SELECT org, grp, free_tokens + forfeited, leased FROM daily WHERE day = $1",
                    &[&(today.0 as i32)],
                )
                .await?
            {
                let (org, grp, used, leased): (String, String, i64, i64) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                if let Some(key) = pools.key(&org, &grp, today) {
                    self.inner.leases.heard(
                        key,
                        u64::try_from(used).unwrap_or(0),
                        u64::try_from(leased).unwrap_or(0),
                    );
                }
            }
            Ok(())
        })
    }

    fn reserve<'a>(&'a self, request: &'a Request) -> StoreFuture<'a, Decision> {
        Box::pin(async move {
            self.usable()?;
            if let Ok(decision) = self.inner.leases.try_admit(request) {
                return Ok(decision);
            }
            // One lease request at a time: calls that arrive together wait
            // for the first one's grant rather than each lease a chunk.
            let _turn = self.inner.leasing.lock().await;
            match self.inner.leases.try_admit(request) {
                Ok(decision) => Ok(decision),
                Err(wants) => {
                    self.lease(&wants).await?;
                    Ok(self.inner.leases.admit(request))
                }
            }
        })
    }

    fn settle_meter(&self, ticket: &Ticket, usage: &Usage) -> Settlement {
        self.inner.leases.settle(ticket, usage)
    }

    fn pool_state(&self, key: PoolKey, cap: u64) -> PoolState {
        self.inner.leases.pool_state(key, cap)
    }

    fn admit(&self, a: Admitted) -> Result<i64, StoreError> {
        self.usable()?;
        let id = self.id();
        self.send(Job::Admit(id, a))?;
        Ok(id)
    }

    fn refuse(&self, a: Admitted, status: u16) -> Result<(), StoreError> {
        let id = self.id();
        self.send(Job::Refuse(id, a, status))
    }

    fn settle(&self, id: i64, org: &Arc<str>, ticket: &Ticket, settled: Settled) -> Durable {
        let names = self.inner.names.load();
        let pool = ticket
            .pool
            .and_then(|p| Some((p, names.as_ref()?.groups.get(p.group)?.clone())));
        let (done, wait) = oneshot::channel();
        match self.send(Job::Settle {
            id,
            org: org.clone(),
            pool,
            settled,
            done,
        }) {
            Ok(()) => Durable::pending(wait, RECORD_WAIT),
            Err(e) => Durable::done(Err(e)),
        }
    }

    fn alert(&self, fired: Fired) -> StoreFuture<'static, bool> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Job::Alert(fired, reply));
        Box::pin(async move {
            sent?;
            answer
                .await
                .map_err(|_| StoreError::from_message("the PostgreSQL writer has stopped".into()))?
        })
    }

    fn alert_delivered(
        &self,
        fired: &Fired,
        attempts: u32,
        delivered: bool,
    ) -> Result<(), StoreError> {
        self.send(Job::AlertDelivered(fired.clone(), attempts, delivered))
    }

    fn capture(&self, capture: crate::capture::Capture) -> Result<(), StoreError> {
        let id = self.id();
        self.send(Job::Capture(id, capture))
    }

    fn forwarded(&self, forwarded: Forwarded) -> Result<(), StoreError> {
        let id = self.id();
        self.send(Job::Forward(id, forwarded))
    }

    fn record_change(&self, change: ChangeRow) -> StoreFuture<'_, i64> {
        Box::pin(async move {
            let mut client = self.inner.pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await?;
            // One writer at a time, so that ids commit in the order they
            // ascend: a replica reading past the last id it saw misses none.
            tx.batch_execute("LOCK TABLE changes IN EXCLUSIVE MODE")
                .await?;
            let row = tx
                .query_one(
                    "INSERT INTO changes (at_ms, org, actor, body) VALUES ($1, $2, $3, $4) RETURNING id",
                    &[&change.at_ms, &change.org, &change.actor, &change.body],
                )
                .await?;
            tx.commit().await?;
            Ok(row.get(0))
        })
    }

    fn changes(&self, after: i64) -> StoreFuture<'_, Vec<ChangeRow>> {
        Box::pin(async move {
            let client = self.inner.pool.get().await.map_err(pool_error)?;
            let rows = client
                .query(
                    "SELECT id, at_ms, org, actor, body FROM changes WHERE id > $1 ORDER BY id",
                    &[&after],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| ChangeRow {
                    id: r.get(0),
                    at_ms: r.get(1),
                    org: r.get(2),
                    actor: r.get(3),
                    body: r.get(4),
                })
                .collect())
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn changes_applied(&self, id: i64) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let client = self.inner.pool.get().await.map_err(pool_error)?;
            client
                .execute(
                    "UPDATE replicas SET changes = GREATEST(changes, $2) WHERE id = $1",
                    &[&&*self.inner.replica, &id],
                )
                .await?;
            Ok(())
        })
    }

    fn replicas_behind(&self, id: i64) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let client = self.inner.pool.get().await.map_err(pool_error)?;
            let live_since = crate::store::now_ms() - STALE.as_millis() as i64;
            let row = client
                .query_one(
                    "SELECT COUNT(*) FROM replicas WHERE id <> $1 AND changes < $2 AND seen_ms >= $3",
                    &[&&*self.inner.replica, &id, &live_since],
                )
                .await?;
            Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
        })
    }

    fn file_begin(&self, meta: FileMeta) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            files::begin(&*self.inner.pool.get().await.map_err(pool_error)?, &meta).await
        })
    }

    fn file_part(
        &self,
        org: String,
        id: String,
        seq: i64,
        data: bytes::Bytes,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            files::part(
                &*self.inner.pool.get().await.map_err(pool_error)?,
                &org,
                &id,
                seq,
                &data,
            )
            .await
        })
    }

    fn file_end(
        &self,
        org: String,
        id: String,
        purpose: String,
        bytes: u64,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            files::end(
                &*self.inner.pool.get().await.map_err(pool_error)?,
                &org,
                &id,
                &purpose,
                bytes,
            )
            .await
        })
    }

    fn files(&self, org: String, project: String) -> StoreFuture<'_, Vec<FileMeta>> {
        Box::pin(async move {
            files::list(
                &*self.inner.pool.get().await.map_err(pool_error)?,
                &org,
                &project,
            )
            .await
        })
    }

    fn file_parts(
        &self,
        org: String,
        id: String,
        from: i64,
        n: i64,
    ) -> StoreFuture<'_, Vec<bytes::Bytes>> {
        Box::pin(async move {
            files::parts(
                &*self.inner.pool.get().await.map_err(pool_error)?,
                &org,
                &id,
                from,
                n,
            )
            .await
        })
    }

    fn file_delete(&self, org: String, id: String) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let mut client = self.inner.pool.get().await.map_err(pool_error)?;
            files::delete(&mut client, &org, &id).await
        })
    }

    fn files_abandoned(&self, before_s: i64) -> StoreFuture<'_, Vec<(String, String)>> {
        Box::pin(async move { files::abandoned(&*self.pooled().await?, before_s).await })
    }

    fn batch_save(&self, batch: BatchRow) -> StoreFuture<'_, ()> {
        Box::pin(async move { batches::save(&*self.pooled().await?, &batch).await })
    }

    fn batches(
        &self,
        org: Option<String>,
        project: Option<String>,
    ) -> StoreFuture<'_, Vec<BatchRow>> {
        Box::pin(async move {
            batches::list(&*self.pooled().await?, org.as_deref(), project.as_deref()).await
        })
    }

    fn batch_lines_add(
        &self,
        org: String,
        id: String,
        lines: Vec<BatchLine>,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut client = self.pooled().await?;
            batches::add(&mut client, &org, &id, &lines).await
        })
    }

    fn batch_take(
        &self,
        org: String,
        id: String,
        n: i64,
        now_ms: i64,
    ) -> StoreFuture<'_, Vec<BatchLine>> {
        Box::pin(async move { batches::take(&*self.pooled().await?, &org, &id, n, now_ms).await })
    }

    fn batch_line_set(
        &self,
        org: String,
        id: String,
        line: i64,
        state: String,
        result: String,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            batches::set(&*self.pooled().await?, &org, &id, line, &state, &result).await
        })
    }

    fn batch_lines(
        &self,
        org: String,
        id: String,
        from: i64,
        n: i64,
    ) -> StoreFuture<'_, Vec<BatchLine>> {
        Box::pin(async move { batches::lines(&*self.pooled().await?, &org, &id, from, n).await })
    }

    fn batch_counts(&self, org: String, id: String) -> StoreFuture<'_, Vec<(String, u64)>> {
        Box::pin(async move { batches::counts(&*self.pooled().await?, &org, &id).await })
    }

    fn purge_captures<'a>(&'a self, org: &'a str, before_ms: i64) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let client = self.client().await?;
            let n = client
                .execute(
                    "DELETE FROM captures WHERE org = $1 AND started_ms < $2",
                    &[&org, &before_ms],
                )
                .await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    fn daily(&self, day: Day) -> StoreFuture<'_, Vec<DailyTotal>> {
        Box::pin(async move { read::daily_range(&*self.client().await?, day, day).await })
    }

    fn daily_range(&self, from: Day, to: Day) -> StoreFuture<'_, Vec<DailyTotal>> {
        Box::pin(async move { read::daily_range(&*self.client().await?, from, to).await })
    }

    fn alerts(&self, day: Day) -> StoreFuture<'_, Vec<Fired>> {
        Box::pin(async move { read::alerts(&*self.client().await?, day).await })
    }

    fn alert_delivery<'a>(
        &'a self,
        day: Day,
        org: &'a str,
        group: &'a str,
        rule: &'a str,
    ) -> StoreFuture<'a, Option<(u32, bool)>> {
        Box::pin(async move {
            read::alert_delivery(&*self.client().await?, day, org, group, rule).await
        })
    }

    fn recent_for<'a>(&'a self, limit: u64, org: Option<&'a str>) -> StoreFuture<'a, Vec<Record>> {
        Box::pin(async move { read::recent(&*self.client().await?, limit, org).await })
    }

    fn recent_forwarded_for<'a>(
        &'a self,
        limit: u64,
        org: Option<&'a str>,
    ) -> StoreFuture<'a, Vec<Forwarded>> {
        Box::pin(async move { read::recent_forwarded(&*self.client().await?, limit, org).await })
    }

    fn usage_rows<'a>(
        &'a self,
        start_ms: i64,
        end_ms: i64,
        width_ms: i64,
        group_by: &'a [&'a str],
    ) -> StoreFuture<'a, Vec<UsageRow>> {
        Box::pin(async move {
            read::usage_rows(&*self.client().await?, start_ms, end_ms, width_ms, group_by).await
        })
    }

    fn count_requests<'a>(&'a self, state: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(
            async move { read::count(&*self.client().await?, "requests", "state", state).await },
        )
    }

    fn count_captures<'a>(&'a self, org: &'a str) -> StoreFuture<'a, u64> {
        Box::pin(async move { read::count(&*self.client().await?, "captures", "org", org).await })
    }

    fn commits(&self) -> watch::Receiver<u64> {
        self.inner.commits.clone()
    }

    fn pools_everywhere<'a>(
        &'a self,
        day: Day,
    ) -> StoreFuture<'a, Option<Vec<crate::store::PoolRow>>> {
        Box::pin(async move {
            let names = self.inner.names.load_full();
            let Some(names) = names.as_deref() else {
                return Ok(None);
            };
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT d.org, d.grp, d.free_tokens + d.forfeited,
                            COALESCE((SELECT SUM(l.reserved) FROM leases l
                                      WHERE l.org = d.org AND l.day = d.day AND l.grp = d.grp
                                        AND l.replica <> $2), 0)::BIGINT
                     FROM daily d WHERE d.day = $1",
                    &[&(day.0 as i32), &&*self.inner.replica],
                )
                .await?;
            Ok(Some(
                rows.iter()
                    .filter_map(|r| {
                        let key = names.key(r.get(0), r.get(1), day)?;
                        let elsewhere = u64::try_from(r.get::<_, i64>(3)).unwrap_or(0);
                        Some(crate::store::PoolRow {
                            key,
                            used: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                            reserved: elsewhere
                                .saturating_add(self.inner.leases.reserved_here(key)),
                        })
                    })
                    .collect(),
            ))
        })
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let (done, committed) = oneshot::channel();
            self.send(Job::Sync(done))?;
            tokio::time::timeout(RECORD_WAIT, committed)
                .await
                .map_err(|_| {
                    StoreError::from_message(
                        "PostgreSQL did not take the last records in time".into(),
                    )
                })?
                .map_err(|_| StoreError::from_message("the PostgreSQL writer has stopped".into()))
        })
    }
}
