//! The running configuration, replaced whole while calls go on.
//!
//! Every call takes the [`Live`] of the moment it arrives and keeps it to
//! its end: its org, project, key and upstream are those it was admitted
//! under, whatever is changed meanwhile. A reload (`SIGHUP`) or a change
//! through the admin API builds a new one beside it and swaps it in; the
//! old one goes when the last call holding it ends.

use std::sync::Arc;

use super::{auth::KeyTable, upstream, Gateway};
use crate::config::Config;
use crate::store::PoolNames;

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
        let keys = KeyTable::new(&config);
        let client = upstream::client(&config).map_err(|e| format!("http client: {e}"))?;
        Ok(Live {
            config,
            keys,
            client,
        })
    }
}

impl Gateway {
    /// The configuration of this moment.
    pub fn live(&self) -> Arc<Live> {
        self.live.load_full()
    }

    /// Run on `config` from now on: orgs, projects, keys, upstreams, the
    /// program and alerts. `[server]` and `[store]` stay as they started
    /// (they need a restart; a warning says so when they differ). Calls in
    /// flight finish on the configuration they started with.
    pub async fn reload(&self, mut config: Config) -> Result<(), String> {
        let _one_at_a_time = self.reloading.lock().await;
        let running = self.live();
        if config.server != running.config.server || config.store != running.config.store {
            tracing::warn!("[server] and [store] changes take effect at the next restart");
        }
        config.server = running.config.server.clone();
        config.store = running.config.store.clone();
        config.align_to(&running.config);
        let live = Live::new(config)?;
        self.store
            .name_pools(&PoolNames::of(&live.config), self.today())
            .await
            .map_err(|e| e.to_string())?;
        self.live.store(Arc::new(live));
        Ok(())
    }
}
