//! The gateway: one place builds the router and its layers, and a server
//! takes a listener and a shutdown future.
//!
//! Routes, and what guards them:
//! - public: `GET /healthz` (the only route without a key);
//! - client key ([`auth`]): `POST /v1/chat/completions`, `/v1/responses`,
//!   `/v1/completions`, `/v1/embeddings` (metered, [`routes`]),
//!   `GET /v1/models`, and any other `/v1/*` path (forwarded unmetered);
//! - admin token ([`auth::require_admin`]): `GET /v1/organization/usage/completions`
//!   and `GET /v1/organization/costs` ([`usage`]).
//!
//! A metered call walks: authenticate -> read the body (bounded) -> count it
//! -> ask the meter -> write it as pending -> forward ([`upstream`]) -> tap
//! the usage out of the body or stream ([`stream`]) -> settle ([`call`]).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::routing::{any, get};
use axum::serve::ListenerExt;
use axum::Router;

use crate::config::Config;
use crate::day::Day;
use crate::meter::{Ledger, PoolKey};
use crate::store::{SqliteStore, StoreError};
use crate::tokens::request::Endpoint;

pub mod auth;
pub mod call;
pub mod error;
pub mod routes;
pub mod stream;
pub mod upstream;
pub mod usage;

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
    pub config: Config,
    /// Client key hashes -> (org, project).
    pub keys: auth::KeyTable,
    /// Free tokens used and reserved, per org, group and day.
    pub ledger: Mutex<Ledger>,
    pub store: SqliteStore,
    /// One connection pool for every upstream.
    pub client: reqwest::Client,
    pub clock: Arc<dyn Clock>,
}

impl Gateway {
    /// Build the gateway: recover calls a crash left pending, then load
    /// today's totals into the meter, so a restart forgets nothing.
    pub fn new(
        config: Config,
        store: SqliteStore,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Gateway>, StoreError> {
        let recovered = store.recover()?;
        if recovered > 0 {
            tracing::warn!(
                recovered,
                "settled calls left pending by a crash as interrupted"
            );
        }
        let keys = auth::KeyTable::new(&config);
        let client = upstream::client(&config)
            .map_err(|e| StoreError::from_message(format!("http client: {e}")))?;
        // o200k_base serves every model of the program: load it now, not on
        // the first call. cl100k_base (gpt-4, gpt-3.5, embeddings) loads on
        // its first use, so a gateway that never sees one saves its ~38 MB.
        crate::tokens::Encoding::O200kBase.warm_up();
        let gateway = Arc::new(Gateway {
            keys,
            ledger: Mutex::new(Ledger::new()),
            store,
            client,
            clock,
            config,
        });
        gateway.restore(gateway.today())?;
        Ok(gateway)
    }

    pub fn today(&self) -> Day {
        Day::from_unix(self.clock.now_ms().div_euclid(1000))
    }

    /// Load `day`'s free tokens used from the store into the meter.
    fn restore(&self, day: Day) -> Result<(), StoreError> {
        let org_index: HashMap<&str, usize> = self
            .config
            .orgs
            .iter()
            .enumerate()
            .map(|(i, o)| (o.name.as_str(), i))
            .collect();
        let totals = self.store.daily(day)?;
        let mut ledger = self
            .ledger
            .lock()
            .map_err(|_| StoreError::from_message("meter lock poisoned".into()))?;
        for total in totals {
            let org = org_index.get(total.org.as_str());
            let group = self
                .config
                .catalog
                .groups
                .iter()
                .position(|g| g.name == total.group);
            if let (Some(&org), Some(group)) = (org, group) {
                ledger.restore(PoolKey { org, group, day }, total.free_tokens);
            }
        }
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
    let v1 = Router::new()
        .route(
            "/chat/completions",
            routes::metered_route(Endpoint::ChatCompletions),
        )
        .route("/responses", routes::metered_route(Endpoint::Responses))
        .route("/completions", routes::metered_route(Endpoint::Completions))
        .route("/embeddings", routes::metered_route(Endpoint::Embeddings))
        .route("/models", get(routes::models))
        .fallback(any(routes::passthrough))
        // Every /v1 route needs a client key; it runs before the handlers
        // and puts the caller in the request's extensions.
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            auth::require_key,
        ));
    // The usage API answers to the admin token, not a client key.
    let admin = Router::new()
        .route("/organization/usage/completions", get(usage::completions))
        .route("/organization/costs", get(usage::costs))
        .layer(axum::middleware::from_fn_with_state(
            gateway.clone(),
            auth::require_admin,
        ));
    let v1 = admin.merge(v1);
    Router::new()
        .nest("/v1", v1)
        .route("/healthz", get(routes::healthz))
        .fallback(routes::not_found)
        .with_state(gateway)
}

/// Serve `app` on `listener` until `shutdown` resolves. Accepted sockets get
/// `TCP_NODELAY`: without it small streamed events wait for Nagle's timer.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
