//! The gateway: one place builds the router and its layers, and a server
//! takes a listener and a shutdown future. The server's [`App`] sends a
//! metered call (a `POST` to one of the four metered paths) straight to its
//! handler and everything else through the router.
//!
//! Routes, and what guards them:
//! - public: `GET /healthz` (the only route without a key);
//! - client key ([`auth`]): `POST /v1/chat/completions`, `/v1/responses`,
//!   `/v1/completions`, `/v1/embeddings` (metered, [`routes`]),
//!   `GET /v1/models`, and any other `/v1/*` path (a 404 unless the
//!   project's `forward` rules allow it: then forwarded unmetered, and
//!   recorded); only a path's plain spelling is routed ([`path`]);
//! - admin credential ([`auth::require_admin`]: the platform's admin token,
//!   every org, or an org admin key, its org only):
//!   `GET /v1/organization/usage/completions` and `GET /v1/organization/costs`
//!   ([`usage`]); `GET /metrics` ([`metrics`]) takes the platform's token only
//!   (public with `[server] public_metrics = true`);
//! - dashboard session (a cookie set by signing in with an admin credential,
//!   scoped as it is): `GET /dashboard` and its live events ([`dashboard`]).
//!
//! A metered call walks: authenticate -> read the body (bounded) -> count it
//! -> ask the meter -> write it as pending -> forward ([`upstream`]) -> tap
//! the usage out of the body or stream ([`stream`]) -> settle ([`call`]).

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::IntoResponse;
use axum::routing::{any, get};
use axum::Router;

use crate::config::Config;
use crate::day::Day;
use crate::meter::PoolKey;
use crate::store::{PoolNames, Store, StoreError};
use crate::tokens::request::Endpoint;

pub mod admin;
pub mod auth;
pub mod batches;
pub mod call;
pub mod dashboard;
pub mod error;
pub mod files;
mod live;
pub mod metrics;
pub mod path;
mod repoll;
pub mod routes;
mod scan;
pub mod stream;
pub mod upstream;
pub mod usage;

pub use live::{ChangeError, Live};

/// How often captured calls past their retention are purged.
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Time, replaceable in tests (the day rolling over at 00:00 UTC).
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }
}

/// A clock that tests set and move.
#[derive(Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(ms: i64) -> Self {
        ManualClock(AtomicI64::new(ms))
    }
    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// Everything a request needs, shared by all of them.
pub struct Gateway {
    /// The running configuration ([`Gateway::live`]): replaced whole by a
    /// reload, read by each call once.
    live: arc_swap::ArcSwap<Live>,
    /// The file's configuration and the changes made at runtime, held while
    /// a new configuration is built from them and swapped in.
    runtime: tokio::sync::Mutex<live::Runtime>,
    /// The ledger, and the meter's free tokens used and reserved per org,
    /// group and day (SQLite or PostgreSQL: [`crate::store`]).
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub metrics: metrics::Metrics,
    /// Which alerts fired today.
    pub alerts: crate::alerts::Engine,
    /// Posts fired alerts to the webhook, when one is configured.
    delivery: Option<crate::alerts::Delivery>,
    /// Signed-in dashboard sessions.
    pub sessions: dashboard::Sessions,
    /// The dashboard's live part, shared by its viewers.
    pub dashboard_cache: dashboard::Cache,
    /// The batch runner's state ([`batches::run`]).
    pub batches: batches::run::Runner,
    /// Turns for CPU-heavy work on the blocking pool ([`Gateway::off_workers`]):
    /// as many as the machine has cores, so large bodies queue rather than
    /// start a thread (and hold a body in memory) each.
    heavy_turns: tokio::sync::Semaphore,
    /// The last reconciliation with the upstreams' books, for the dashboard.
    pub reconciled: std::sync::Mutex<Option<Reconciled>>,
}

/// A reconciliation the gateway ran ([`Gateway::reconcile`]).
#[derive(Clone, Debug)]
pub struct Reconciled {
    pub at_ms: i64,
    pub day: Day,
    /// The report, or why there is none (an upstream that did not answer).
    pub report: Result<crate::reconcile::Report, String>,
}

/// How often the gateway reconciles yesterday with the upstreams' books
/// (once a day would do; hourly catches a late-settling report).
const RECONCILE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

impl Gateway {
    /// Build the gateway: recover calls a crash left pending, then load
    /// today's totals into the meter, so a restart forgets nothing.
    pub async fn new(
        config: Config,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Gateway>, StoreError> {
        Gateway::with_runner(config, store, clock, batches::run::Runner::default()).await
    }

    /// A gateway whose batch runner is `runner` (`tokenwarden batch` runs
    /// one batch: [`batches::run::Runner::for_one_batch`]).
    pub async fn with_runner(
        config: Config,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        runner: batches::run::Runner,
    ) -> Result<Arc<Gateway>, StoreError> {
        let today = Day::from_unix(clock.now_ms().div_euclid(1000));
        let recovered = store.start(&PoolNames::of(&config), today).await?;
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "settled calls left pending by a crash as interrupted"
            );
        }
        // o200k_base serves every model of the program: load it now, not on
        // the first call. cl100k_base (gpt-4, gpt-3.5, embeddings) loads on
        // its first use, so a gateway that never sees one saves its memory.
        crate::tokens::Encoding::O200kBase.warm_up();
        // The privacy guard's patterns and phone metadata likewise, where a
        // project uses the guard.
        let guarded = config
            .orgs
            .iter()
            .flat_map(|o| &o.projects)
            .any(|p| p.privacy_guard != crate::config::Guard::Off);
        if guarded {
            crate::guard::warm_up();
        }
        let delivery = match tokio::runtime::Handle::try_current() {
            Ok(_) => {
                let store = store.clone();
                let webhook = upstream::webhook_client(&config)
                    .map_err(|e| StoreError::from_message(format!("http client: {e}")))?;
                Some(crate::alerts::Delivery::start(
                    webhook,
                    Arc::new(move |fired, attempts, delivered| {
                        if let Err(e) = store.alert_delivered(fired, attempts, delivered) {
                            tracing::error!(error = %e, "could not record an alert's delivery");
                        }
                    }),
                ))
            }
            Err(_) => {
                if config.orgs.iter().any(|o| o.alerts.webhook.is_some()) {
                    tracing::error!("no async runtime: alerts will not be posted to the webhook");
                }
                None
            }
        };
        let changes: Vec<crate::changes::Recorded> = store
            .changes(0)
            .await?
            .into_iter()
            .filter_map(crate::changes::Recorded::from_row)
            .collect();
        let seen = changes.last().map_or(0, |c| c.id);
        store.changes_applied(seen).await?;
        let live = Live::new(crate::changes::replay(&config, &changes))
            .map_err(StoreError::from_message)?;
        let gateway = Arc::new(Gateway {
            live: arc_swap::ArcSwap::from_pointee(live),
            runtime: tokio::sync::Mutex::new(live::Runtime {
                base: config,
                changes,
                seen,
            }),
            store,
            clock,
            metrics: metrics::Metrics::default(),
            alerts: crate::alerts::Engine::default(),
            delivery,
            sessions: dashboard::Sessions::default(),
            dashboard_cache: dashboard::Cache::default(),
            batches: runner,
            reconciled: std::sync::Mutex::new(None),
            heavy_turns: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            ),
        });
        gateway.restore_alerts(today).await?;
        gateway.purge_captures().await;
        let runtime = tokio::runtime::Handle::try_current();
        if let (Ok(runtime), true) = (&runtime, gateway.store.shared()) {
            // Changes other replicas made, read as they come; the task ends
            // with the gateway.
            let weak = Arc::downgrade(&gateway);
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(live::CHANGES_EVERY).await;
                    let Some(gateway) = weak.upgrade() else {
                        return;
                    };
                    if let Err(e) = gateway.follow_changes().await {
                        tracing::warn!(error = %e, "could not read the changes made at runtime");
                    }
                }
            });
        }
        if let Ok(runtime) = runtime {
            runtime.spawn(batches::run::run(Arc::downgrade(&gateway)));
            // The retention purge runs by itself (for the orgs that capture
            // at the time); the task ends with the gateway.
            let weak = Arc::downgrade(&gateway);
            runtime.spawn(async move {
                loop {
                    tokio::time::sleep(PURGE_EVERY).await;
                    let Some(gateway) = weak.upgrade() else {
                        return;
                    };
                    gateway.purge_captures().await;
                }
            });
        }
        Ok(gateway)
    }

    /// Run `work` (reading a large body or answer) on the blocking pool, as
    /// many at once as there are cores, so that it never holds an async
    /// worker other connections need. `None` if it could not run.
    pub(crate) async fn off_workers<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let _turn = self.heavy_turns.acquire().await.ok()?;
        tokio::task::spawn_blocking(work).await.ok()
    }

    /// Delete captured calls past their org's retention; returns how many.
    pub async fn purge_captures(&self) -> usize {
        let now_ms = self.clock.now_ms();
        let mut purged = 0;
        let live = self.live();
        for org in &live.config.orgs {
            // Orgs that stopped capturing are purged on the same schedule.
            let before = now_ms - i64::from(org.capture_retention_days) * 86_400_000;
            match self.store.purge_captures(&org.name, before).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(org = %org.name, purged = n, "captured calls past their retention purged");
                    purged += n;
                }
                Err(e) => {
                    tracing::error!(error = %e, org = %org.name, "could not purge captured calls")
                }
            }
        }
        purged
    }

    /// Whether org `org` gets free tokens today: eligible, sharing, and the
    /// program running.
    pub fn org_gets_free_tokens(&self, config: &Config, org: usize) -> bool {
        let day = self.today();
        let catalog = &config.catalog;
        let running =
            catalog.program_starts <= day && catalog.program_ends.is_none_or(|ends| day <= ends);
        config.orgs.get(org).is_some_and(|o| {
            o.eligible && o.sharing != crate::config::OrgSharing::Disabled && running
        })
    }

    /// Today's state of org `org`'s pool in group `group` (cap 0 when the org
    /// gets no free tokens).
    pub fn pool_state(&self, config: &Config, org: usize, group: usize) -> crate::meter::PoolState {
        let day = self.today();
        let cap = match (config.orgs.get(org), config.catalog.groups.get(group)) {
            (Some(o), Some(g)) if self.org_gets_free_tokens(config, org) => {
                g.daily_tokens_for_tier(o.tier)
            }
            _ => 0,
        };
        self.store.pool_state(PoolKey { org, group, day }, cap)
    }

    /// Reconcile yesterday with the upstreams' books every
    /// [`RECONCILE_EVERY`], where an upstream has an admin key (`serve`
    /// does; a command that only runs a batch does not); the task ends with
    /// the gateway.
    pub fn reconcile_hourly(self: &Arc<Self>) {
        let has_key = self
            .live()
            .config
            .upstreams
            .values()
            .any(|u| u.admin_key.is_some());
        if !has_key {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(gateway) = weak.upgrade() else {
                    return;
                };
                let yesterday = Day(gateway.today().0 - 1);
                gateway.reconcile(yesterday).await;
                drop(gateway);
                tokio::time::sleep(RECONCILE_EVERY).await;
            }
        });
    }

    /// Reconcile `day` with the upstreams' books and keep the result for
    /// the dashboard (a failure is logged and kept too).
    pub async fn reconcile(&self, day: Day) {
        let live = self.live();
        let report = crate::reconcile::reconcile(&live.config, &*self.store, day, 1)
            .await
            .map_err(|e| format!("{e:#}"));
        match &report {
            Ok(r) if r.differs => {
                tracing::warn!(%day, "the ledger and the upstream's books differ (tokenwarden reconcile shows how)")
            }
            Ok(_) => tracing::info!(%day, "the ledger and the upstream's books agree"),
            Err(e) => {
                tracing::warn!(%day, error = %e, "could not reconcile with the upstream's books")
            }
        }
        if let Ok(mut last) = self.reconciled.lock() {
            *last = Some(Reconciled {
                at_ms: self.clock.now_ms(),
                day,
                report,
            });
        }
    }

    /// After a call settled (or was `refused`): add its billed cost and
    /// fire the alerts that now hold for its org and group. Never waits on
    /// delivery.
    pub fn check_alerts(
        self: &Arc<Self>,
        config: &Config,
        org: usize,
        group: Option<usize>,
        cost_pico: u64,
        refused: bool,
    ) {
        let day = self.today();
        let Some(org_config) = config.orgs.get(org) else {
            return;
        };
        let org_name = &*org_config.name;
        let rules = &org_config.alerts;
        let group_name = group
            .and_then(|g| config.catalog.groups.get(g))
            .map_or("none", |g| &*g.name);
        let billed = self.alerts.add_billed(day, org_name, group_name, cost_pico);
        let state = group.map(|g| self.pool_state(config, org, g));
        let view = crate::alerts::View {
            org: org_name,
            group: group_name,
            day,
            now_ms: self.clock.now_ms(),
            cap: state.map_or(0, |s| s.cap),
            used: state.map_or(0, |s| s.used),
            billed_cost_pico: billed,
            refused,
        };
        for fired in self.alerts.evaluate(rules, &view) {
            let mut record = self.store.alert(fired.clone());
            match futures_util::FutureExt::now_or_never(&mut record) {
                Some(first) => self.announce(org, fired, first),
                // A store across the network: announced once it answers.
                None => {
                    let gateway = self.clone();
                    tokio::spawn(async move {
                        let first = record.await;
                        gateway.announce(org, fired, first);
                    });
                }
            }
        }
    }

    /// Log, count and post a fired alert, if this gateway recorded it first
    /// (replicas sharing a ledger fire each alert once).
    fn announce(&self, org: usize, fired: crate::alerts::Fired, first: Result<bool, StoreError>) {
        match first {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(error = %e, "could not record an alert");
                return;
            }
        }
        tracing::warn!(rule = %fired.rule, org = %fired.org, group = %fired.group, "{}", fired.text);
        self.metrics.alert(&fired.org, &fired.group, &fired.rule);
        let webhook = self
            .live()
            .config
            .orgs
            .get(org)
            .and_then(|o| Some((o.alerts.webhook.clone()?, o.alerts.retries)));
        if let (Some(delivery), Some((webhook, retries))) = (&self.delivery, webhook) {
            delivery.send(fired, webhook, retries);
        }
    }

    pub fn today(&self) -> Day {
        Day::from_unix(self.clock.now_ms().div_euclid(1000))
    }

    /// Load which alerts fired on `day` and each group's billed cost, so a
    /// restart fires none of them again.
    async fn restore_alerts(&self, day: Day) -> Result<(), StoreError> {
        let billed = self
            .store
            .daily(day)
            .await?
            .into_iter()
            .map(|t| {
                let group = if t.group.is_empty() {
                    "none".to_owned()
                } else {
                    t.group
                };
                (t.org, group, t.cost_pico)
            })
            .collect();
        self.alerts
            .restore(day, self.store.alerts(day).await?, billed);
        Ok(())
    }

    /// Seconds from now to the next 00:00 UTC.
    pub fn seconds_to_reset(&self) -> u64 {
        let now_ms = self.clock.now_ms();
        let next = (Day::from_unix(now_ms.div_euclid(1000)).0 + 1) * 86_400_000;
        u64::try_from((next - now_ms + 999) / 1000).unwrap_or(0)
    }
}

/// The router: every route and its layer, in one place.
pub fn router(gateway: Arc<Gateway>) -> Router {
    // Full paths rather than a router nested at /v1: nesting rewrites each
    // request's URI (a new string per call).
    // The metered routes check the client key themselves (so does the
    // server's road past the router, `App`).
    let metered = Router::new()
        .route(
            "/v1/chat/completions",
            routes::metered_route(Endpoint::ChatCompletions),
        )
        .route("/v1/responses", routes::metered_route(Endpoint::Responses))
        .route(
            "/v1/responses/compact",
            axum::routing::post(
                |axum::extract::State(gateway): axum::extract::State<Arc<Gateway>>,
                 request: axum::extract::Request| {
                    routes::compact_call(gateway, request)
                },
            ),
        )
        .route(
            "/v1/completions",
            routes::metered_route(Endpoint::Completions),
        )
        .route(
            "/v1/embeddings",
            routes::metered_route(Endpoint::Embeddings),
        );
    let v1 = Router::new()
        .route("/v1/models", get(routes::models))
        // Deleting a fine-tuned model: the upstream organization's, so only
        // for a project alone on its upstream (routes::stored_object).
        .route(
            "/v1/models/{id}",
            get(routes::model).delete(routes::stored_object),
        )
        // What OpenAI keeps of a project's calls (routes::stored_object).
        .route(
            "/v1/responses/{id}",
            get(routes::stored_object).delete(routes::stored_object),
        )
        .route(
            "/v1/responses/{id}/cancel",
            axum::routing::post(routes::stored_object),
        )
        .route("/v1/responses/{id}/input_items", get(routes::stored_object))
        .route(
            "/v1/responses/input_tokens",
            axum::routing::post(routes::stored_object),
        )
        .route(
            "/v1/chat/completions/{id}",
            get(routes::stored_object)
                .post(routes::stored_object)
                .delete(routes::stored_object),
        )
        .route(
            "/v1/chat/completions/{id}/messages",
            get(routes::stored_object),
        )
        .merge(
            Router::new()
                .route(
                    "/v1/files",
                    get(files::list)
                        .post(files::upload)
                        .layer(axum::extract::DefaultBodyLimit::disable()),
                )
                .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
                .route("/v1/files/{id}/content", get(files::content))
                .route("/v1/batches", get(batches::list).post(batches::create))
                .route("/v1/batches/{id}", get(batches::retrieve))
                .route(
                    "/v1/batches/{id}/cancel",
                    axum::routing::post(batches::cancel),
                )
                .layer(axum::middleware::from_fn_with_state(
                    gateway.clone(),
                    files::forward_opened,
                )),
        )
        .route("/v1/{*rest}", any(routes::passthrough))
        // Every other /v1 route needs a client key too; this runs before
        // the handlers and puts the caller in the request's extensions.
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            auth::require_key,
        ));
    // The usage API answers to the admin token, not a client key.
    let admin = Router::new()
        .route(
            "/v1/organization/usage/completions",
            get(usage::completions),
        )
        .route("/v1/organization/costs", get(usage::costs))
        .merge(admin::routes())
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            auth::require_admin,
        ));
    let v1 = admin.merge(metered).merge(v1);
    // Metrics name orgs and projects: the admin token guards them unless
    // `[server] public_metrics = true`.
    let mut metrics = Router::new().route("/metrics", get(metrics::metrics));
    if !gateway.live().config.server.public_metrics {
        metrics = metrics
            .layer(axum::middleware::from_fn(auth::require_platform))
            .layer(axum::middleware::from_fn_with_state(
                gateway.clone(),
                auth::require_admin,
            ));
    }
    Router::new()
        .merge(v1)
        .merge(metrics)
        .merge(dashboard::routes())
        .route("/healthz", get(routes::healthz))
        .fallback(routes::not_found)
        .with_state(gateway)
}

/// What the server serves: a router, and for a gateway the metered
/// routes' own road past it. A metered call (a `POST` to one of the four
/// paths) goes straight to [`routes::metered_call`], the function the
/// router's routes call too, without the router's matching, boxing and
/// body conversions (about 7% of a call's instructions, counted with
/// callgrind); every other request goes through the router.
#[derive(Clone)]
pub struct App {
    router: Router,
    gateway: Option<Arc<Gateway>>,
    /// The connection's peer, given to the router's requests as axum's
    /// `ConnectInfo` (the dashboard's sign-in throttle reads it).
    peer: Option<std::net::SocketAddr>,
}

/// The gateway's app: its router, and its road for metered calls.
pub fn app(gateway: Arc<Gateway>) -> App {
    App {
        router: router(gateway.clone()),
        gateway: Some(gateway),
        peer: None,
    }
}

impl From<Router> for App {
    fn from(router: Router) -> App {
        App {
            router,
            gateway: None,
            peer: None,
        }
    }
}

type AppFuture = std::pin::Pin<
    Box<dyn Future<Output = Result<axum::response::Response, std::convert::Infallible>> + Send>,
>;

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for App {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = AppFuture;

    fn call(&self, request: hyper::Request<hyper::body::Incoming>) -> AppFuture {
        if let Some(gateway) = &self.gateway {
            // Only a path's plain spelling is routed (see [`path`]): any
            // other is a 404 here, so it can neither reach a metered or
            // admin route past its checks nor be forwarded upstream.
            if !path::is_plain(request.uri().path()) {
                let error = routes::not_found_now(request.method(), request.uri());
                return Box::pin(async move { Ok(error.into_response()) });
            }
            if request.method() == axum::http::Method::POST {
                if let Some(endpoint) = routes::metered_endpoint(request.uri().path()) {
                    let request = request.map(axum::body::Body::new);
                    let gateway = gateway.clone();
                    return Box::pin(async move {
                        Ok(routes::metered_call(gateway, endpoint, request).await)
                    });
                }
            }
        }
        let mut request = request;
        if let Some(peer) = self.peer {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
        }
        let router = hyper_util::service::TowerToHyperService::new(self.router.clone());
        Box::pin(async move { router.call(request).await })
    }
}

/// How long a client may take to send a request's head (its request line
/// and headers): a client trickling bytes must not hold a connection open.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a shutdown waits for calls in flight (streams included) to end.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Serve `app` on `listener` until `shutdown` resolves, then let the calls
/// in flight finish (up to [`SHUTDOWN_GRACE`]). Accepted sockets get
/// `TCP_NODELAY` (without it small streamed events wait for Nagle's timer);
/// a request's head must arrive within [`HEADER_READ_TIMEOUT`] (bodies have
/// their own limit, in the routes).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: impl Into<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with_timeout(listener, app, shutdown, HEADER_READ_TIMEOUT).await
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// [`serve`], with the request head's time limit given.
pub async fn serve_with_timeout(
    listener: tokio::net::TcpListener,
    app: impl Into<App>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    header_timeout: std::time::Duration,
) -> std::io::Result<()> {
    let app = app.into();
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    // A timer always due within a quarter second. tokio wakes the worker
    // that waits on its I/O driver (a write to an eventfd) whenever a timer
    // is set that falls due before the driver's planned wake-up, or when no
    // timer is set at all. A call sets two (its next head's time limit and
    // its upstream's), both due later than this one; without it, a call
    // alone woke a worker for nothing (seen with `perf`).
    let _heartbeat = AbortOnDrop(tokio::spawn(async {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    }));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let service = App {
            peer: Some(peer),
            ..app.clone()
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
        let connection = graceful.watch(connection);
        let connection = async move {
            // A client that goes away mid-call is not an error of the gateway's.
            let _ = connection.await;
        };
        if cfg!(feature = "bench-plain-repoll") {
            // The A/B benchmark's plain build (benches/ab.sh).
            tokio::spawn(connection);
        } else {
            tokio::spawn(repoll::Repoll::new(connection));
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("calls still in flight after the shutdown grace period");
    }
    Ok(())
}
