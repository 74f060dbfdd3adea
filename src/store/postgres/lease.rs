//! The meter of a replica: free tokens leased from PostgreSQL in chunks.
//!
//! PostgreSQL keeps, per pool (org, group, day), the free tokens settled
//! calls used and the tokens leased to replicas, and grants a lease only
//! while `used + leased + grant <= cap`: together the replicas can never
//! hand out more than the cap. Each replica runs the same [`Ledger`] as a
//! single gateway does, with its lease as the cap: a call that fits in
//! what the replica holds is decided in memory, without a round trip. One
//! that does not fit asks for more (what it needs plus a chunk, bounded by
//! what is left); only when PostgreSQL has no more does the project's
//! policy decide. Unused lease goes back once a pool turns scarce or idle,
//! so what one replica holds is not missing for long at another.
//!
//! Locally, a pool's `lease` counts everything granted and not given back,
//! the tokens its settled calls used included: the [`Ledger`]'s `used` are
//! those, so `lease - used - reserved` is what a new call may take.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::meter::{Decision, Ledger, PoolKey, PoolState, Request, Settlement, Ticket, Usage};
use crate::FastMap;

/// A pool as this replica holds it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Held {
    /// Granted and not given back (see the module's notes).
    pub(super) lease: u64,
    /// Free tokens used in the pool, all replicas, as last heard from PostgreSQL.
    pub(super) used_everywhere: u64,
    /// Tokens leased to all replicas, as last heard.
    pub(super) leased_everywhere: u64,
    /// Free tokens calls settled here used (out of `lease`).
    pub(super) consumed: u64,
    /// Free tokens settled here whose records PostgreSQL has not yet
    /// confirmed (so not yet in `used_everywhere`).
    pub(super) unflushed: u64,
    /// The last lease asked for fell short: what is left is scarce, so
    /// none is kept unused.
    pub(super) scarce: bool,
    pub(super) last_call: Instant,
}

impl Held {
    fn new() -> Self {
        Held {
            lease: 0,
            used_everywhere: 0,
            leased_everywhere: 0,
            consumed: 0,
            unflushed: 0,
            scarce: false,
            last_call: Instant::now(),
        }
    }
}

#[derive(Default)]
struct State {
    ledger: Ledger,
    held: FastMap<PoolKey, Held>,
    /// The latest day a call asked about (the gateway's clock, not this
    /// machine's): leases of earlier days go back.
    today: Option<crate::day::Day>,
}

/// The replica's meter: a [`Ledger`] over what it leased.
#[derive(Default)]
pub(super) struct Leases {
    state: Mutex<State>,
}

/// What to ask PostgreSQL for before a call can be decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Want {
    pub(super) pool: PoolKey,
    pub(super) cap: u64,
    /// Tokens to add to the lease.
    pub(super) tokens: u64,
}

/// A pool with this many calls' worth of lease left needs no round trip;
/// a grant adds this much beyond what a call needs, bounded by a share of
/// what is left, so that each replica asks rarely and none takes it all.
const CHUNK_SHARE_OF_LEFT: u64 = 8;
/// A pool unused for this long gives its unreserved lease back.
pub(super) const IDLE: Duration = Duration::from_secs(2);

impl Leases {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The request with each pool's cap replaced by this replica's lease.
    fn local(state: &State, request: &Request) -> Request {
        let lease = |key: PoolKey| state.held.get(&key).map_or(0, |h| h.lease);
        let mut local = *request;
        if let Some(pool) = request.pool {
            local.cap = lease(pool);
        }
        if let Some(d) = &mut local.downgrade {
            d.cap = lease(d.pool);
        }
        local
    }

    /// Decide `request` in memory if it fits in what this replica holds
    /// (or needs no free tokens); else what to lease first.
    pub(super) fn try_admit(&self, request: &Request) -> Result<Decision, Vec<Want>> {
        let mut state = self.state();
        let Some(pool) = request.pool else {
            return Ok(state.ledger.admit(request));
        };
        if state.today.is_none_or(|t| pool.day > t) {
            state.today = Some(pool.day);
        }
        let now = Instant::now();
        let wanted = request.prompt.saturating_add(request.output_cap);
        let left = |state: &State, key: PoolKey| {
            let lease = state.held.get(&key).map_or(0, |h| h.lease);
            state.ledger.state(key, lease).left()
        };
        if left(&state, pool) >= wanted {
            if let Some(h) = state.held.get_mut(&pool) {
                h.last_call = now;
            }
            let local = Self::local(&state, request);
            let decision = state.ledger.admit(&local);
            return Ok(Self::global(&state, decision, request));
        }
        let mut wants = vec![Want {
            pool,
            cap: request.cap,
            tokens: wanted - left(&state, pool),
        }];
        if let Some(d) = request.downgrade {
            let need = d.prompt.saturating_add(d.output_cap);
            let have = left(&state, d.pool);
            if have < need {
                wants.push(Want {
                    pool: d.pool,
                    cap: d.cap,
                    tokens: need - have,
                });
            }
        }
        Err(wants)
    }

    /// Decide `request` by what this replica holds now (after leasing).
    pub(super) fn admit(&self, request: &Request) -> Decision {
        let mut state = self.state();
        let now = Instant::now();
        for key in request
            .pool
            .into_iter()
            .chain(request.downgrade.map(|d| d.pool))
        {
            if let Some(h) = state.held.get_mut(&key) {
                h.last_call = now;
            }
        }
        let local = Self::local(&state, request);
        let decision = state.ledger.admit(&local);
        Self::global(&state, decision, request)
    }

    /// A decision with the pool's real cap in its ticket and refusal, and
    /// what is left as this replica sees it.
    fn global(state: &State, decision: Decision, request: &Request) -> Decision {
        let cap_of = |key: PoolKey| {
            if Some(key) == request.pool {
                request.cap
            } else {
                request.downgrade.map_or(0, |d| d.cap)
            }
        };
        let ticket = |t: Ticket| Ticket {
            cap: t.pool.map_or(0, cap_of),
            ..t
        };
        match decision {
            Decision::Free(t) => Decision::Free(ticket(t)),
            Decision::Billed(t) => Decision::Billed(ticket(t)),
            Decision::Downgraded(t) => Decision::Downgraded(ticket(t)),
            Decision::Clamped {
                ticket: t,
                output_cap,
            } => Decision::Clamped {
                ticket: ticket(t),
                output_cap,
            },
            Decision::Refused { pool, .. } => Decision::Refused {
                pool,
                cap: cap_of(pool),
                left: Self::view(state, pool, cap_of(pool)).left(),
            },
        }
    }

    /// How many tokens to ask for, for a call that needs `tokens` more:
    /// those and a chunk, a share of what is left everywhere.
    pub(super) fn ask(&self, want: &Want) -> u64 {
        let state = self.state();
        let left_everywhere = state.held.get(&want.pool).map_or(want.cap, |h| {
            want.cap
                .saturating_sub(h.used_everywhere)
                .saturating_sub(h.leased_everywhere)
        });
        want.tokens
            .saturating_add(left_everywhere / CHUNK_SHARE_OF_LEFT)
            .min(want.cap)
    }

    /// Add a grant PostgreSQL made, with the pool's totals as it answered.
    pub(super) fn granted(&self, want: &Want, granted: u64, used: u64, leased: u64) {
        let mut state = self.state();
        let h = state.held.entry(want.pool).or_insert_with(Held::new);
        h.lease = h.lease.saturating_add(granted);
        h.used_everywhere = used;
        h.leased_everywhere = leased;
        h.scarce = granted < want.tokens;
    }

    /// Release a call's reservation and settle it (the whole-request rule
    /// within this replica's lease).
    pub(super) fn settle(&self, ticket: &Ticket, usage: &Usage) -> Settlement {
        let mut state = self.state();
        let State { ledger, held, .. } = &mut *state;
        let held = ticket.pool.and_then(|key| held.get_mut(&key));
        let lease = held.as_ref().map_or(0, |h| h.lease);
        let settlement = ledger.settle(
            &Ticket {
                cap: lease,
                ..*ticket
            },
            usage,
        );
        if let (Some(h), true) = (held, settlement.free) {
            h.consumed = h.consumed.saturating_add(usage.total());
            h.unflushed = h.unflushed.saturating_add(usage.total());
        }
        settlement
    }

    /// PostgreSQL confirmed the record of a call that used `tokens` free.
    pub(super) fn flushed(&self, key: PoolKey, tokens: u64) {
        if let Some(h) = self.state().held.get_mut(&key) {
            h.unflushed = h.unflushed.saturating_sub(tokens);
        }
    }

    /// A pool as a call here sees it: the cap, and what is left here and
    /// unleased everywhere.
    fn view(state: &State, key: PoolKey, cap: u64) -> PoolState {
        let Some(h) = state.held.get(&key) else {
            return PoolState {
                cap,
                used: 0,
                reserved: 0,
            };
        };
        let unleased = cap
            .saturating_sub(h.used_everywhere)
            .saturating_sub(h.leased_everywhere);
        let left = spare(&state.ledger, key, h)
            .saturating_add(unleased)
            .min(cap);
        let used = h.used_everywhere.saturating_add(h.unflushed).min(cap);
        PoolState {
            cap,
            used,
            // Everything neither used nor free to a call here: reserved by
            // calls in flight, or held by other replicas.
            reserved: cap.saturating_sub(used).saturating_sub(left),
        }
    }

    pub(super) fn pool_state(&self, key: PoolKey, cap: u64) -> PoolState {
        Self::view(&self.state(), key, cap)
    }

    /// Record a pool's totals as PostgreSQL last reported them.
    pub(super) fn heard(&self, key: PoolKey, used: u64, leased: u64) {
        let mut state = self.state();
        let h = state.held.entry(key).or_insert_with(Held::new);
        h.used_everywhere = used;
        h.leased_everywhere = leased;
    }

    /// Unreserved lease to give back now, per pool: all of it for a scarce,
    /// idle or past pool, none otherwise. Taken out of the local lease at
    /// once (so no call here can use it while it goes back).
    pub(super) fn to_return(&self) -> Vec<(PoolKey, u64)> {
        let mut state = self.state();
        let State {
            ledger,
            held,
            today,
        } = &mut *state;
        let Some(today) = *today else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (key, h) in held.iter_mut() {
            let spare = spare(ledger, *key, h);
            let idle = h.last_call.elapsed() >= IDLE;
            if spare > 0 && (h.scarce || idle || key.day < today) {
                h.lease -= spare;
                out.push((*key, spare));
            }
        }
        // A past day's pool with nothing in flight is done with.
        held.retain(|key, _| key.day >= today || ledger.state(*key, 0).reserved > 0);
        out
    }

    /// What this replica's calls in flight hold, per pool it leased from
    /// (reported with each heartbeat, for gauges every replica agrees on).
    pub(super) fn reservations(&self) -> Vec<(PoolKey, u64)> {
        let state = self.state();
        state
            .held
            .keys()
            .map(|key| (*key, state.ledger.state(*key, 0).reserved))
            .collect()
    }

    /// What this replica's calls in flight hold in `key` now.
    pub(super) fn reserved_here(&self, key: PoolKey) -> u64 {
        self.state().ledger.state(key, 0).reserved
    }

    /// Forget every lease (this replica was declared dead: what it held
    /// was counted by the others).
    pub(super) fn forget(&self) {
        let mut state = self.state();
        for h in state.held.values_mut() {
            h.lease = 0;
        }
    }
}

/// What a pool's lease still has for new calls here: neither used by
/// settled calls nor reserved by calls in flight (kept apart from the
/// [`Ledger`]'s own count, which it forgets when the day moves on).
fn spare(ledger: &Ledger, key: PoolKey, h: &Held) -> u64 {
    h.lease
        .saturating_sub(h.consumed)
        .saturating_sub(ledger.state(key, 0).reserved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Fallback, Policy};
    use crate::day::Day;

    const KEY: PoolKey = PoolKey {
        org: 0,
        group: 0,
        day: Day(20_000),
    };

    fn request(prompt: u64, output_cap: u64, policy: Policy) -> Request {
        Request {
            pool: Some(KEY),
            cap: 1_000,
            prompt,
            output_cap,
            policy,
            fallback: Fallback::Block,
            downgrade: None,
        }
    }

    #[test]
    fn a_call_leases_then_runs_in_memory() {
        let leases = Leases::default();
        let r = request(9, 16, Policy::Bill);
        let wants = leases.try_admit(&r).err().unwrap_or_default();
        assert_eq!(wants.len(), 1);
        let ask = leases.ask(&wants[0]);
        assert_eq!(ask, 25 + 1_000 / CHUNK_SHARE_OF_LEFT);
        leases.granted(&wants[0], ask, 0, ask);
        let Decision::Free(ticket) = leases.admit(&r) else {
            panic!("expected free")
        };
        assert_eq!(ticket.cap, 1_000);
        let usage = Usage {
            input: 9,
            output: 16,
            ..Usage::default()
        };
        assert!(leases.settle(&ticket, &usage).free);
        // Used at once (the alerts see it), before PostgreSQL confirms.
        assert_eq!(leases.pool_state(KEY, 1_000).used, 25);
        leases.heard(KEY, 25, ask - 25);
        leases.flushed(KEY, 25);
        assert_eq!(leases.pool_state(KEY, 1_000).used, 25);
        assert_eq!(leases.pool_state(KEY, 1_000).left(), 975);
        // The next call fits in what is leased: no round trip.
        assert!(leases.try_admit(&r).is_ok());
    }
}
