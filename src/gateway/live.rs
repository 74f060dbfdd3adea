//! The running configuration, replaced whole while calls go on.
//!
//! Every call takes the [`Live`] of the moment it arrives and keeps it to
//! its end: its org, project, key and upstream are those it was admitted
//! under, whatever is changed meanwhile. The running configuration is the
//! file's with the changes made at runtime applied in order
//! ([`crate::changes`]); a reload (`SIGHUP`, a new file), a change through
//! the admin API, or a change another replica made (read from the ledger
//! each second) builds a new one beside it and swaps it in. The old one
//! goes when the last call holding it ends.

use std::sync::Arc;

use super::{auth::KeyTable, upstream, Gateway};
use crate::changes::{replay, Change, Recorded};
use crate::config::Config;
use crate::store::{ChangeRow, PoolNames};

/// How often a gateway reads the changes other replicas made.
pub const CHANGES_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// How long a change waits for every other replica to run on it before it
/// answers all the same (a replica silent this long is taken for dead and
/// refuses calls: [`crate::store::postgres::STALE`]).
const CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(12);

/// One configuration, with what is built from it.
pub struct Live {
    pub config: Config,
    /// Client and admin key hashes -> who holds them.
    pub keys: KeyTable,
    /// The upstreams' connection pools.
    pub client: upstream::Client,
}

impl Live {
    pub fn new(config: Config) -> Result<Live, String> {
        Live::after(config, None)
    }

    /// A new configuration after `previous`: its upstreams' connection
    /// pools are kept when the upstreams and orgs are the same (a key made,
    /// a policy changed), so a change drops no other tenant's connections.
    fn after(config: Config, previous: Option<&Live>) -> Result<Live, String> {
        let keys = KeyTable::new(&config);
        let client = match previous {
            Some(p)
                if p.config.upstreams == config.upstreams
                    && p.config.orgs.len() == config.orgs.len() =>
            {
                p.client.clone()
            }
            _ => upstream::client(&config).map_err(|e| format!("http client: {e}"))?,
        };
        Ok(Live {
            config,
            keys,
            client,
        })
    }
}

/// What the running configuration is built from.
pub(super) struct Runtime {
    /// The file's configuration, as last loaded.
    pub(super) base: Config,
    /// The changes made at runtime, in the ledger's order.
    pub(super) changes: Vec<Recorded>,
    /// The id of the last change read from the ledger.
    pub(super) seen: i64,
}

/// Why a change was not made.
#[derive(Debug)]
pub enum ChangeError {
    /// It does not apply (a project that is not there, a bad value): for the caller.
    Invalid(String),
    /// The ledger could not keep it.
    Store(crate::store::StoreError),
}

impl Gateway {
    /// The configuration of this moment.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Run on `config` (a new file) from now on, with the changes made at
    /// runtime on top: orgs, projects, keys, upstreams, the program and
    /// alerts. `[server]` and `[store]` stay as they started (they need a
    /// restart; a warning says so when they differ). Calls in flight
    /// finish on the configuration they started with.
    pub async fn reload(&self, config: Config) -> Result<(), String> {
        let mut runtime = self.runtime.lock().await;
        if config.server != runtime.base.server || config.store != runtime.base.store {
            tracing::warn!("[server] and [store] changes take effect at the next restart");
        }
        runtime.base = config;
        self.rebuild(&runtime).await
    }

    /// Make `change` to org `org` on behalf of `actor`: checked against the
    /// running configuration, kept in the ledger, then run on. Returns the
    /// change as kept.
    pub async fn change(
        &self,
        org: &str,
        actor: &str,
        change: Change,
    ) -> Result<Recorded, ChangeError> {
        let mut runtime = self.runtime.lock().await;
        self.catch_up(&mut runtime)
            .await
            .map_err(ChangeError::Store)?;
        let mut config = replay(&runtime.base, &runtime.changes);
        change
            .apply(&mut config, org)
            .map_err(ChangeError::Invalid)?;
        let at_ms = self.clock.now_ms();
        let body = serde_json::to_string(&change)
            .map_err(|e| ChangeError::Invalid(format!("the change cannot be kept: {e}")))?;
        let id = self
            .store
            .record_change(ChangeRow {
                id: 0,
                at_ms,
                org: org.to_owned(),
                actor: actor.to_owned(),
                body,
            })
            .await
            .map_err(ChangeError::Store)?;
        // Another replica's changes may have landed just before this one.
        self.catch_up(&mut runtime)
            .await
            .map_err(ChangeError::Store)?;
        if runtime.seen < id {
            runtime.changes.push(Recorded {
                id,
                at_ms,
                org: org.to_owned(),
                actor: actor.to_owned(),
                change,
            });
            runtime.seen = id;
        }
        self.rebuild(&runtime).await.map_err(ChangeError::Invalid)?;
        let recorded = runtime
            .changes
            .iter()
            .find(|c| c.id == id)
            .cloned()
            .ok_or_else(|| ChangeError::Invalid("the change was kept but not read back".into()))?;
        let seen = runtime.seen;
        drop(runtime);
        self.store
            .changes_applied(seen)
            .await
            .map_err(ChangeError::Store)?;
        self.everywhere(id).await;
        Ok(recorded)
    }

    /// Wait until every other live replica runs on change `id` (at most
    /// [`CHANGE_WAIT`]), so that a key made or deleted here is made or
    /// deleted for the next call wherever it goes.
    async fn everywhere(&self, id: i64) {
        let deadline = tokio::time::Instant::now() + CHANGE_WAIT;
        loop {
            match self.store.replicas_behind(id).await {
                Ok(0) => return,
                Ok(behind) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(
                        change = id,
                        behind,
                        "answered before every replica ran on a change"
                    );
                    return;
                }
                Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                Err(e) => {
                    tracing::warn!(error = %e, change = id, "could not tell whether every replica runs on a change");
                    return;
                }
            }
        }
    }

    /// Read the changes other replicas made and run on them, if any.
    pub async fn follow_changes(&self) -> Result<(), crate::store::StoreError> {
        let mut runtime = self.runtime.lock().await;
        if self.catch_up(&mut runtime).await? {
            self.rebuild(&runtime)
                .await
                .map_err(crate::store::StoreError::from_message)?;
            let seen = runtime.seen;
            drop(runtime);
            self.store.changes_applied(seen).await?;
        }
        Ok(())
    }

    /// The changes made at runtime to org `org` (every org: `None`), oldest first.
    pub async fn changes_of(&self, org: Option<&str>) -> Vec<Recorded> {
        let runtime = self.runtime.lock().await;
        runtime
            .changes
            .iter()
            .filter(|c| org.is_none_or(|o| o == c.org))
            .cloned()
            .collect()
    }

    /// Read changes past the last seen; whether there were any.
    async fn catch_up(&self, runtime: &mut Runtime) -> Result<bool, crate::store::StoreError> {
        let rows = self.store.changes(runtime.seen).await?;
        let Some(last) = rows.last().map(|r| r.id) else {
            return Ok(false);
        };
        runtime
            .changes
            .extend(rows.into_iter().filter_map(Recorded::from_row));
        runtime.seen = last;
        Ok(true)
    }

    /// Build the configuration from `runtime` and swap it in.
    async fn rebuild(&self, runtime: &Runtime) -> Result<(), String> {
        let running = self.live();
        let mut config = replay(&runtime.base, &runtime.changes);
        // [server] stays as it started, but for a platform token kept in the ledger.
        let kept = config.server.admin_token_hash;
        config.server = running.config.server.clone();
        config.server.admin_token_hash = kept;
        config.store = running.config.store.clone();
        config.align_to(&running.config);
        let live = Live::after(config, Some(&running))?;
        self.store
            .name_pools(&PoolNames::of(&live.config), self.today())
            .await
            .map_err(|e| e.to_string())?;
        self.live.store(Arc::new(live));
        Ok(())
    }
}
