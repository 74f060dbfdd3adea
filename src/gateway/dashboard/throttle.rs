//! The sign-in throttle: a few tries per client address, then a lockout
//! that doubles with each repeat. It stands between the form and the admin
//! token, which otherwise could be guessed as fast as the network allows
//! (300 wrong tokens took 2.8 s).
//!
//! Every attempt counts when it arrives, before its token is read, so
//! parallel connections get no more tries than serial ones; a right token
//! clears the address's record. The address is the TCP peer's: behind a
//! reverse proxy every client shares the proxy's, so a lockout there holds
//! for everyone signing in through it (the admin token still works on the
//! API). `X-Forwarded-For` is not trusted, as any client can write it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;

/// Attempts allowed per address within [`WINDOW_MS`] before a lockout.
pub const MAX_ATTEMPTS: u32 = 5;
/// The window attempts are counted in.
const WINDOW_MS: i64 = 10 * 60 * 1000;
/// The first lockout; each further one doubles, up to [`MAX_LOCK_MS`].
const FIRST_LOCK_MS: i64 = 60 * 1000;
const MAX_LOCK_MS: i64 = 60 * 60 * 1000;
/// An address quiet this long is forgotten, lockout count included.
const FORGET_MS: i64 = 24 * 60 * 60 * 1000;
/// At most this many addresses are remembered (the least recent go first),
/// so a flood from many addresses costs bounded memory.
const MAX_ADDRESSES: usize = 4096;

/// One address's record.
#[derive(Clone, Copy, Debug, Default)]
struct Record {
    /// Attempts in the current window.
    attempts: u32,
    /// When the current window began.
    window_start_ms: i64,
    /// Locked out until then (0: not locked).
    locked_until_ms: i64,
    /// Lockouts so far: the next lasts `FIRST_LOCK_MS << lockouts`.
    lockouts: u32,
    /// The last attempt, to forget quiet addresses and evict the least recent.
    last_ms: i64,
}

#[derive(Default)]
pub struct Throttle(Mutex<HashMap<IpAddr, Record>>);

/// The key an address is throttled under: IPv6 by its /64, the block one
/// host is usually given (else each of its 2^64 addresses would get its
/// own tries); an IPv4-mapped address as the IPv4 one.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Throttle {
    /// Count an attempt from `ip`: `Ok` to go on and check its token, or
    /// `Err(seconds)` to refuse it until then.
    pub fn attempt(&self, ip: IpAddr, now_ms: i64) -> Result<(), u64> {
        let Ok(mut table) = self.0.lock() else {
            return Err(1);
        };
        let ip = key(ip);
        if !table.contains_key(&ip) && table.len() >= MAX_ADDRESSES {
            make_room(&mut table, now_ms);
        }
        let record = table.entry(ip).or_default();
        record.last_ms = now_ms;
        if record.locked_until_ms > now_ms {
            return Err(seconds(record.locked_until_ms - now_ms));
        }
        if now_ms - record.window_start_ms >= WINDOW_MS || record.locked_until_ms != 0 {
            // A new window (a lockout that ended starts one too).
            record.attempts = 0;
            record.window_start_ms = now_ms;
            record.locked_until_ms = 0;
        }
        record.attempts += 1;
        if record.attempts <= MAX_ATTEMPTS {
            return Ok(());
        }
        let lock = FIRST_LOCK_MS
            .saturating_mul(1 << record.lockouts.min(16))
            .min(MAX_LOCK_MS);
        record.lockouts = record.lockouts.saturating_add(1);
        record.locked_until_ms = now_ms + lock;
        tracing::warn!(address = %ip, seconds = lock / 1000, "admin token guesses locked out after repeated failures");
        Err(seconds(lock))
    }

    /// Seconds `ip` is still locked out for, if it is (nothing counted).
    pub fn locked(&self, ip: IpAddr, now_ms: i64) -> Option<u64> {
        let table = self.0.lock().ok()?;
        let record = table.get(&key(ip))?;
        (record.locked_until_ms > now_ms).then(|| seconds(record.locked_until_ms - now_ms))
    }

    /// A right token: the address starts afresh.
    pub fn succeeded(&self, ip: IpAddr) {
        if let Ok(mut table) = self.0.lock() {
            table.remove(&key(ip));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map_or(0, |t| t.len())
    }
}

/// Whole seconds, rounded up, for `Retry-After`.
fn seconds(ms: i64) -> u64 {
    u64::try_from((ms + 999) / 1000).unwrap_or(1).max(1)
}

/// Forget quiet addresses; if none is quiet, the least recent one.
fn make_room(table: &mut HashMap<IpAddr, Record>, now_ms: i64) {
    table.retain(|_, r| r.locked_until_ms > now_ms || now_ms - r.last_ms < FORGET_MS);
    if table.len() >= MAX_ADDRESSES {
        if let Some(oldest) = table.iter().min_by_key(|(_, r)| r.last_ms).map(|(k, _)| *k) {
            table.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
    }

    #[test]
    fn five_tries_then_a_lockout_that_doubles() {
        let t = Throttle::default();
        let a = ip("192.0.2.1");
        for _ in 0..MAX_ATTEMPTS {
            assert_eq!(t.attempt(a, 1_000), Ok(()));
        }
        assert_eq!(t.attempt(a, 1_000), Err(60));
        assert_eq!(t.attempt(a, 31_000), Err(30));
        // Another address is not affected.
        assert_eq!(t.attempt(ip("192.0.2.2"), 31_000), Ok(()));
        // The lockout ended: five tries again, then twice as long.
        for _ in 0..MAX_ATTEMPTS {
            assert_eq!(t.attempt(a, 61_000), Ok(()));
        }
        assert_eq!(t.attempt(a, 61_000), Err(120));
        // A right token clears the record.
        t.succeeded(a);
        assert_eq!(t.attempt(a, 62_000), Ok(()));
    }

    #[test]
    fn attempts_spread_over_windows_are_not_locked() {
        let t = Throttle::default();
        let a = ip("192.0.2.1");
        for i in 0..20 {
            assert_eq!(t.attempt(a, i * WINDOW_MS / 4), Ok(()), "{i}");
        }
    }

    #[test]
    fn an_ipv6_host_is_throttled_by_its_64_block() {
        let t = Throttle::default();
        for i in 0..MAX_ATTEMPTS {
            assert_eq!(t.attempt(ip(&format!("2001:db8::{i}")), 0), Ok(()));
        }
        assert!(t.attempt(ip("2001:db8::ffff:1"), 0).is_err());
        assert_eq!(t.attempt(ip("2001:db8:0:1::1"), 0), Ok(()));
        assert_eq!(key(ip("::ffff:192.0.2.1")), ip("192.0.2.1"));
    }

    #[test]
    fn the_table_is_bounded() {
        let t = Throttle::default();
        for i in 0..(MAX_ADDRESSES as u32 + 100) {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = t.attempt(a, i64::from(i));
        }
        assert!(t.len() <= MAX_ADDRESSES, "{}", t.len());
    }
}
