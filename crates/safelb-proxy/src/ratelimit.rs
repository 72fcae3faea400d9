//! Per-route rate limits: the generic cell rate algorithm (GCRA) on one atomic word per key.
//!
//! A key's cell holds its *theoretical arrival time* (TAT): when its bucket would be full again.
//! A request is allowed when the TAT is at most `burst - 1` emission intervals ahead of now, and
//! then moves the TAT one interval later. That is a token bucket of `burst` tokens refilled at
//! `rate`, kept as one number, so a compare-and-swap updates it without a lock.
//!
//! Keys other than `route` hash into a fixed table of cells: two keys that share a cell share a
//! bucket, which can only make a limit stricter, never looser; with 4,096 cells an innocent
//! client shares with an abusive one at about one chance in 4,096 per abusive client.
//!
//! Limiters are long-lived by route name and rule (see [`RateLimiters`]), so a config swap that
//! leaves a route's `rate_limit` unchanged keeps its counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use safelb_config::{RateKey, RateLimit};

use crate::clock::now_micros;

/// Cells of a per-client or per-header limiter.
const CELLS: usize = 4096;

#[derive(Debug)]
pub struct Limiter {
    /// Microseconds between two requests at the rate.
    interval_us: u64,
    /// How far ahead of now a TAT may be and still allow a request: `(burst - 1)` intervals.
    tolerance_us: u64,
    pub key: RateKey,
    cells: Box<[AtomicU64]>,
}

impl Limiter {
    pub fn new(rule: &RateLimit) -> Limiter {
        let interval_us = ((1_000_000.0 / rule.per_second).round() as u64).max(1);
        let cells = if rule.key == RateKey::Route { 1 } else { CELLS };
        Limiter {
            interval_us,
            tolerance_us: interval_us.saturating_mul(u64::from(rule.burst.saturating_sub(1))),
            key: rule.key.clone(),
            cells: (0..cells).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Takes a token for the key whose hash is `hash`; `Err(wait)` when there is none, with how
    /// long until there will be.
    pub fn check(&self, hash: u64) -> Result<(), Duration> {
        self.check_at(hash, now_micros())
    }

    fn check_at(&self, hash: u64, now: u64) -> Result<(), Duration> {
        let cell = &self.cells[(hash as usize) % self.cells.len()];
        let mut tat = cell.load(Relaxed);
        loop {
            let start = tat.max(now);
            if start - now > self.tolerance_us {
                return Err(Duration::from_micros(start - now - self.tolerance_us));
            }
            match cell.compare_exchange_weak(tat, start + self.interval_us, Relaxed, Relaxed) {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }
}

/// The long-lived limiters, by route name and rule: a snapshot takes the one its route had.
#[derive(Default)]
pub struct RateLimiters {
    by_route: Mutex<HashMap<String, (RateLimit, Arc<Limiter>)>>,
}

impl RateLimiters {
    /// The limiter of `route` under `rule`: the existing one if the rule is the same (its
    /// counters carry over), else a new one.
    pub fn get(&self, route: &str, rule: &RateLimit) -> Arc<Limiter> {
        let mut map = self.by_route.lock().expect("limiter lock is never poisoned");
        match map.get(route) {
            Some((kept, limiter)) if kept == rule => limiter.clone(),
            _ => {
                let limiter = Arc::new(Limiter::new(rule));
                map.insert(route.to_owned(), (rule.clone(), limiter.clone()));
                limiter
            }
        }
    }

    /// Forgets routes no live snapshot limits any more.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.by_route
            .lock()
            .expect("limiter lock is never poisoned")
            .retain(|route, _| keep(route));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(per_second: f64, burst: u32, key: RateKey) -> RateLimit {
        RateLimit { per_second, burst, key }
    }

    #[test]
    fn a_burst_then_the_rate() {
        let l = Limiter::new(&rule(10.0, 5, RateKey::Client));
        let t0 = 1_000_000;
        let allowed = (0..20).filter(|_| l.check_at(7, t0).is_ok()).count();
        assert_eq!(allowed, 5, "the burst at one instant");
        let wait = l.check_at(7, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100), "one interval until the next token");
        // Another key has its own bucket.
        assert!(l.check_at(8, t0).is_ok());
        // One second later: ten more tokens, but never more than the burst.
        let later = (0..20).filter(|_| l.check_at(7, t0 + 1_000_000).is_ok()).count();
        assert_eq!(later, 5);
        // At exactly the rate, every request passes.
        let l = Limiter::new(&rule(10.0, 1, RateKey::Route));
        assert!((0..50).all(|i| l.check_at(0, t0 + i * 100_000).is_ok()));
    }

    #[test]
    fn an_unchanged_rule_keeps_its_counters_across_snapshots() {
        let limiters = RateLimiters::default();
        let r = rule(1.0, 2, RateKey::Route);
        let a = limiters.get("api", &r);
        assert!(a.check(0).is_ok() && a.check(0).is_ok());
        assert!(a.check(0).is_err());
        let same = limiters.get("api", &r);
        assert!(Arc::ptr_eq(&a, &same));
        assert!(same.check(0).is_err(), "the bucket is still empty after the swap");
        let changed = limiters.get("api", &rule(2.0, 2, RateKey::Route));
        assert!(!Arc::ptr_eq(&a, &changed));
        assert!(changed.check(0).is_ok(), "a new rule starts full");
    }
}
