//! The meter: free tokens per organization, program group and UTC day;
//! reserve before a call, settle after it. Pure logic, no I/O and no clock:
//! the caller passes the day, and the store persists what settles.
//!
//! **Reserve.** A call's reservation is its exact prompt count plus its output
//! cap. If it fits in what is free (the cap, less what settled calls used,
//! less what calls in flight reserved), the call runs in the free lane and its
//! reservation is held until it settles. If not, the project's policy decides:
//! bill it, refuse it, send it to the model's downgrade target (when that
//! group has room), or lower its output cap until it fits.
//!
//! **Settle.** By the whole-request rule: the whole call is free if its
//! reported tokens fit in what is free (not counting its own reservation, which
//! is released), else the whole call is billed. What other calls in flight
//! reserved is never handed out, so a free-lane call whose usage stays within
//! its reservation always settles free: under `block`, `clamp` and
//! `downgrade` the free tokens used never exceed the cap, whatever the
//! concurrency.

use crate::config::{Fallback, Policy};
use crate::day::Day;
use crate::FastMap;

/// One daily pool: an organization's program group on one UTC day.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Index of the organization in the configuration.
    pub org: usize,
    /// Index of the group in the catalog.
    pub group: usize,
    pub day: Day,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pool {
    /// Free tokens of settled calls.
    used: u64,
    /// Tokens held by free-lane calls in flight.
    reserved: u64,
}

/// A pool's state, for headers, the usage table and the dashboard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolState {
    pub cap: u64,
    pub used: u64,
    pub reserved: u64,
}

impl PoolState {
    /// What a new call could still reserve.
    pub fn left(&self) -> u64 {
        self.cap
            .saturating_sub(self.used)
            .saturating_sub(self.reserved)
    }
}

/// A call asking to run.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// The pool of the call's group, or `None` when the call cannot be free
    /// (model outside the program, project not sharing, org not eligible,
    /// program not running that day).
    pub pool: Option<PoolKey>,
    /// The pool's daily cap for the org's tier.
    pub cap: u64,
    pub prompt: u64,
    pub output_cap: u64,
    pub policy: Policy,
    pub fallback: Fallback,
    /// Where `downgrade` would send the call, if the model has a target.
    pub downgrade: Option<Downgrade>,
}

/// The downgrade target's side of a call.
#[derive(Clone, Copy, Debug)]
pub struct Downgrade {
    pub pool: PoolKey,
    pub cap: u64,
    /// The prompt counted in the target's encoding.
    pub prompt: u64,
    /// The output cap, limited to the target's largest output.
    pub output_cap: u64,
}

/// What a call holds until it settles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The pool whose free tokens the call may use.
    pub pool: Option<PoolKey>,
    /// The cap of that pool.
    pub cap: u64,
    /// Tokens held in the pool (0 for a billed-lane call).
    pub reserved: u64,
}

/// The meter's answer to a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Runs as asked, within the free allowance.
    Free(Ticket),
    /// Runs as asked, billed at list price (unless it settles smaller and fits).
    Billed(Ticket),
    /// Runs with this lower output cap, within the free allowance.
    Clamped { ticket: Ticket, output_cap: u64 },
    /// Runs on the model's downgrade target, within that group's allowance.
    Downgraded(Ticket),
    /// Refused: `left` tokens are free in the call's pool.
    Refused { pool: PoolKey, cap: u64, left: u64 },
}

/// What a call used, as upstream reports it (or as estimated when it did not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// All input tokens, cached ones included.
    pub input: u64,
    /// Cached input tokens (part of `input`).
    pub cached: u64,
    /// All output tokens, reasoning ones included.
    pub output: u64,
    /// Reasoning tokens (part of `output`).
    pub reasoning: u64,
}

/// The most tokens of one kind a call may report (2^40, a million times
/// the largest context window): more is an upstream's error, and settling
/// treats the usage as missing.
pub const MAX_CALL_TOKENS: u64 = 1 << 40;

impl Usage {
    pub fn total(&self) -> u64 {
        self.input.saturating_add(self.output)
    }

    /// Whether every number is within [`MAX_CALL_TOKENS`].
    pub fn is_sane(&self) -> bool {
        [self.input, self.cached, self.output, self.reasoning]
            .iter()
            .all(|&n| n <= MAX_CALL_TOKENS)
    }
}

/// How a call settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settlement {
    /// The whole call was free.
    pub free: bool,
    /// The call used more than it reserved (a count was off); the truth is recorded.
    pub over_reservation: Option<u64>,
}

/// Every pool's state. The gateway keeps one behind a lock; each method is a
/// few hash operations.
#[derive(Debug, Default)]
pub struct Ledger {
    pools: FastMap<PoolKey, Pool>,
    /// The latest day a call asked about: when it moves on, earlier days'
    /// pools (their totals live in the store) are dropped, so the ledger does
    /// not grow day after day.
    today: Option<Day>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set a pool's used free tokens from the store (at start-up).
    pub fn restore(&mut self, key: PoolKey, used: u64) {
        self.pools.entry(key).or_default().used = used;
    }

    /// [`Ledger::restore`] a pool this meter has not seen yet.
    pub fn restore_new(&mut self, key: PoolKey, used: u64) {
        self.pools.entry(key).or_insert_with(|| Pool {
            used,
            ..Pool::default()
        });
    }

    pub fn state(&self, key: PoolKey, cap: u64) -> PoolState {
        let pool = self.pools.get(&key).copied().unwrap_or_default();
        PoolState {
            cap,
            used: pool.used,
            reserved: pool.reserved,
        }
    }

    /// Reserve `tokens` in `key` if they fit under `cap`.
    fn try_reserve(&mut self, key: PoolKey, cap: u64, tokens: u64) -> Option<Ticket> {
        let pool = self.pools.entry(key).or_default();
        let left = cap.saturating_sub(pool.used).saturating_sub(pool.reserved);
        if tokens > left {
            return None;
        }
        pool.reserved += tokens;
        Some(Ticket {
            pool: Some(key),
            cap,
            reserved: tokens,
        })
    }

    /// Decide a call, reserving what it may use for free.
    pub fn admit(&mut self, request: &Request) -> Decision {
        if let Some(day) = request
            .pool
            .map(|k| k.day)
            .filter(|&d| self.today.is_none_or(|t| d > t))
        {
            self.today = Some(day);
            self.prune(day);
        }
        let Some(key) = request.pool else {
            return Decision::Billed(Ticket {
                pool: None,
                cap: 0,
                reserved: 0,
            });
        };
        let wanted = request.prompt.saturating_add(request.output_cap);
        if let Some(ticket) = self.try_reserve(key, request.cap, wanted) {
            return Decision::Free(ticket);
        }
        let billed = Decision::Billed(Ticket {
            pool: Some(key),
            cap: request.cap,
            reserved: 0,
        });
        let left = self.state(key, request.cap).left();
        let refused = Decision::Refused {
            pool: key,
            cap: request.cap,
            left,
        };
        match request.policy {
            Policy::Bill => billed,
            Policy::Block => refused,
            Policy::Clamp => {
                // At least one output token must fit beside the prompt.
                if left > request.prompt {
                    match self.try_reserve(key, request.cap, left) {
                        Some(ticket) => Decision::Clamped {
                            ticket,
                            output_cap: left - request.prompt,
                        },
                        None => refused,
                    }
                } else {
                    refused
                }
            }
            Policy::Downgrade => {
                let target = request.downgrade.and_then(|d| {
                    self.try_reserve(d.pool, d.cap, d.prompt.saturating_add(d.output_cap))
                });
                match (target, request.fallback) {
                    (Some(ticket), _) => Decision::Downgraded(ticket),
                    (None, Fallback::Bill) => billed,
                    (None, Fallback::Block) => refused,
                }
            }
        }
    }

    /// Settle a call with what it used: release its reservation, then the
    /// whole call is free if it fits in what is left, else billed.
    pub fn settle(&mut self, ticket: &Ticket, usage: &Usage) -> Settlement {
        let total = usage.total();
        let over_reservation =
            (ticket.reserved > 0 && total > ticket.reserved).then(|| total - ticket.reserved);
        let Some(key) = ticket.pool else {
            return Settlement {
                free: false,
                over_reservation: None,
            };
        };
        let pool = self.pools.entry(key).or_default();
        pool.reserved = pool.reserved.saturating_sub(ticket.reserved);
        let left = ticket
            .cap
            .saturating_sub(pool.used)
            .saturating_sub(pool.reserved);
        let free = total <= left;
        if free {
            pool.used += total;
        }
        Settlement {
            free,
            over_reservation,
        }
    }

    /// Forget pools of days before `today` (their totals live in the store).
    pub fn prune(&mut self, today: Day) {
        self.pools
            .retain(|key, pool| key.day >= today || pool.reserved > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DAY: Day = Day(20_000);

    fn key(group: usize) -> PoolKey {
        PoolKey {
            org: 0,
            group,
            day: DAY,
        }
    }

    fn request(prompt: u64, output_cap: u64, policy: Policy) -> Request {
        Request {
            pool: Some(key(0)),
            cap: 1_000,
            prompt,
            output_cap,
            policy,
            fallback: Fallback::Block,
            downgrade: None,
        }
    }

    fn usage(input: u64, output: u64) -> Usage {
        Usage {
            input,
            output,
            ..Usage::default()
        }
    }

    #[test]
    fn whole_request_rule() {
        // 975 of 1,000 used: a 30-token call is billed in full, a 20-token one after it is free.
        let mut ledger = Ledger::new();
        ledger.restore(key(0), 975);
        let Decision::Billed(big) = ledger.admit(&request(20, 10, Policy::Bill)) else {
            panic!("expected billed")
        };
        assert!(!ledger.settle(&big, &usage(20, 10)).free);
        let Decision::Free(small) = ledger.admit(&request(10, 10, Policy::Bill)) else {
            panic!("expected free")
        };
        assert!(ledger.settle(&small, &usage(10, 10)).free);
        assert_eq!(ledger.state(key(0), 1_000).used, 995);
    }

    #[test]
    fn a_billed_call_that_settles_small_enough_is_free() {
        let mut ledger = Ledger::new();
        let Decision::Billed(t) = ledger.admit(&request(100, 5_000, Policy::Bill)) else {
            panic!("expected billed")
        };
        assert!(ledger.settle(&t, &usage(100, 50)).free);
    }

    #[test]
    fn policies() {
        let mut ledger = Ledger::new();
        ledger.restore(key(0), 900);
        assert_eq!(
            ledger.admit(&request(50, 100, Policy::Block)),
            Decision::Refused {
                pool: key(0),
                cap: 1_000,
                left: 100
            }
        );
        // clamp: 100 left, 50 of prompt, so 50 of output.
        let Decision::Clamped { ticket, output_cap } =
            ledger.admit(&request(50, 100, Policy::Clamp))
        else {
            panic!("expected clamped")
        };
        assert_eq!((output_cap, ticket.reserved), (50, 100));
        // Nothing left now: clamp refuses even a small prompt.
        assert!(matches!(
            ledger.admit(&request(1, 100, Policy::Clamp)),
            Decision::Refused { left: 0, .. }
        ));
        ledger.settle(&ticket, &usage(50, 20));
        assert_eq!(ledger.state(key(0), 1_000).left(), 30);
        // A prompt that fills what is left leaves no room for output: refused.
        assert!(matches!(
            ledger.admit(&request(30, 100, Policy::Clamp)),
            Decision::Refused { .. }
        ));

        let mut down = request(50, 100, Policy::Downgrade);
        down.downgrade = Some(Downgrade {
            pool: key(1),
            cap: 10_000,
            prompt: 50,
            output_cap: 100,
        });
        assert!(
            matches!(ledger.admit(&down), Decision::Downgraded(Ticket { pool: Some(p), reserved: 150, .. }) if p == key(1))
        );
        down.downgrade = Some(Downgrade {
            pool: key(1),
            cap: 100,
            prompt: 50,
            output_cap: 100,
        });
        assert!(matches!(ledger.admit(&down), Decision::Refused { .. }));
        down.fallback = Fallback::Bill;
        assert!(matches!(ledger.admit(&down), Decision::Billed(_)));
    }

    #[test]
    fn calls_outside_the_program_are_billed_and_touch_no_pool() {
        let mut ledger = Ledger::new();
        let mut r = request(10, 10, Policy::Block);
        r.pool = None;
        let Decision::Billed(t) = ledger.admit(&r) else {
            panic!("expected billed")
        };
        assert!(!ledger.settle(&t, &usage(10, 10)).free);
        assert_eq!(ledger.state(key(0), 1_000).used, 0);
    }

    #[test]
    fn a_new_day_drops_the_pools_of_past_days_but_not_calls_in_flight() {
        let mut ledger = Ledger::new();
        let yesterday = PoolKey {
            day: Day(DAY.0 - 1),
            ..key(0)
        };
        ledger.restore(yesterday, 500);
        let late = Request {
            pool: Some(yesterday),
            ..request(10, 10, Policy::Block)
        };
        let Decision::Free(in_flight) = ledger.admit(&late) else {
            panic!("expected free")
        };
        ledger.restore(
            PoolKey {
                day: Day(DAY.0 - 2),
                ..key(0)
            },
            7,
        );
        assert_eq!(ledger.pools.len(), 2);
        let Decision::Free(today) = ledger.admit(&request(10, 10, Policy::Block)) else {
            panic!("expected free")
        };
        // Two days ago is gone; yesterday stays while its call is in flight.
        assert_eq!(ledger.pools.len(), 2);
        assert!(ledger.settle(&in_flight, &usage(10, 10)).free);
        assert!(ledger.settle(&today, &usage(10, 10)).free);
        ledger.admit(&Request {
            pool: Some(PoolKey {
                day: Day(DAY.0 + 1),
                ..key(0)
            }),
            ..request(1, 1, Policy::Block)
        });
        assert_eq!(ledger.pools.len(), 1);
    }

    #[test]
    fn over_reservation_is_recorded_truthfully() {
        let mut ledger = Ledger::new();
        let Decision::Free(t) = ledger.admit(&request(10, 10, Policy::Block)) else {
            panic!("expected free")
        };
        let s = ledger.settle(&t, &usage(10, 25));
        assert_eq!(
            s,
            Settlement {
                free: true,
                over_reservation: Some(15)
            }
        );
        assert_eq!(ledger.state(key(0), 1_000).used, 35);
    }

    #[derive(Clone, Debug)]
    enum Step {
        Admit {
            prompt: u64,
            output_cap: u64,
            policy: u8,
        },
        Settle {
            which: usize,
            used_share: u8,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u64..400, 0u64..400, 0u8..4).prop_map(|(prompt, output_cap, policy)| Step::Admit {
                prompt,
                output_cap,
                policy
            }),
            (any::<usize>(), 0u8..=100)
                .prop_map(|(which, used_share)| Step::Settle { which, used_share }),
        ]
    }

    proptest! {
        /// Whatever the interleaving, with usage within reservations: free
        /// tokens never pass the cap, every free-lane call settles free, and
        /// when all calls have settled nothing stays reserved.
        #[test]
        fn never_more_free_than_the_cap(steps in prop::collection::vec(step(), 1..200)) {
            let cap = 1_000;
            let mut ledger = Ledger::new();
            let mut open: Vec<(Ticket, u64, u64, bool)> = Vec::new();
            let mut free_total = 0u64;
            for step in steps {
                match step {
                    Step::Admit { prompt, output_cap, policy } => {
                        let policy = [Policy::Bill, Policy::Block, Policy::Clamp, Policy::Downgrade][usize::from(policy)];
                        let r = Request { cap, ..request(prompt, output_cap, policy) };
                        match ledger.admit(&r) {
                            Decision::Free(t) | Decision::Downgraded(t) => open.push((t, prompt, output_cap, true)),
                            Decision::Clamped { ticket, output_cap } => open.push((ticket, prompt, output_cap, true)),
                            Decision::Billed(t) => open.push((t, prompt, output_cap, false)),
                            Decision::Refused { left, .. } => prop_assert!(left < prompt + output_cap),
                        }
                    }
                    Step::Settle { which, used_share } if !open.is_empty() => {
                        let (t, prompt, output_cap, free_lane) = open.swap_remove(which % open.len());
                        let output = output_cap * u64::from(used_share) / 100;
                        let s = ledger.settle(&t, &usage(prompt, output));
                        if free_lane {
                            prop_assert!(s.free, "a free-lane call within its reservation settled billed");
                        }
                        if s.free {
                            free_total += prompt + output;
                        }
                    }
                    Step::Settle { .. } => {}
                }
                let state = ledger.state(key(0), cap);
                prop_assert!(state.used + state.reserved <= cap);
                prop_assert_eq!(state.used, free_total);
            }
            for (t, prompt, _, _) in open.drain(..) {
                let s = ledger.settle(&t, &usage(prompt, 0));
                if s.free {
                    free_total += prompt;
                }
            }
            let state = ledger.state(key(0), cap);
            prop_assert_eq!(state.reserved, 0);
            prop_assert_eq!(state.used, free_total);
            prop_assert!(state.used <= cap);
        }
    }
}
