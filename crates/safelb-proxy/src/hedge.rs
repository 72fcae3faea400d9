//! Hedging: a replayable request that has no response head after a delay is also sent
//! elsewhere, and the first head wins. This module owns the two numbers that govern it, both
//! read on the request path with relaxed atomics: the delay (from the stable version's observed
//! response-head latency of the pool) and the budget (hedges as a share of requests).
//!
//! It does not send anything; `proxy/forward.rs` races the attempts.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use safelb_config::HedgeAfter;

use crate::stats::{Stats, StatsSnapshot};

/// The floor of an automatic hedge delay: below it a hedge would fire on ordinary jitter.
pub const MIN_AUTO_DELAY: Duration = Duration::from_millis(100);
/// The automatic delay before the pool has enough observations of its own.
const COLD_DELAY: Duration = Duration::from_millis(250);
/// Observations a window needs before it moves the automatic delay.
const MIN_WINDOW: u64 = 20;
/// How often the automatic delay is recomputed.
const RECOMPUTE_MS: u64 = 1_000;

/// Response-head latency of one pool's stable traffic, long-lived by pool name so that a config
/// change keeps what was learnt, and the automatic hedge delay derived from it.
#[derive(Debug)]
pub struct HeadLatency {
    stats: Stats,
    delay_micros: AtomicU64,
    next_update_ms: AtomicU64,
    window_start: Mutex<StatsSnapshot>,
}

impl Default for HeadLatency {
    fn default() -> Self {
        HeadLatency {
            stats: Stats::default(),
            delay_micros: AtomicU64::new(COLD_DELAY.as_micros() as u64),
            next_update_ms: AtomicU64::new(0),
            window_start: Mutex::new(StatsSnapshot::default()),
        }
    }
}

impl HeadLatency {
    /// A stable request got its response head after `latency`.
    #[inline]
    pub fn record(&self, latency: Duration) {
        self.stats.record(false, latency);
    }

    /// The hedge delay for `after` at `now` ([`crate::clock::now_ms`]), never above `ceiling`
    /// (the response timeout).
    #[inline]
    pub fn delay(&self, after: HedgeAfter, ceiling: Duration, now: u64) -> Duration {
        let d = match after {
            HedgeAfter::Fixed(d) => d,
            HedgeAfter::Auto => {
                if now >= self.next_update_ms.load(Relaxed) {
                    self.recompute(now);
                }
                Duration::from_micros(self.delay_micros.load(Relaxed))
            }
        };
        d.min(ceiling)
    }

    /// 3 x p99 of the window since the last update, at least [`MIN_AUTO_DELAY`]. A window with
    /// too few observations keeps growing instead.
    #[cold]
    fn recompute(&self, now: u64) {
        // One request recomputes; the others keep the current value.
        let Ok(mut start) = self.window_start.try_lock() else {
            return;
        };
        self.next_update_ms.store(now + RECOMPUTE_MS, Relaxed);
        let current = self.stats.read();
        let window = current.since(&start);
        if window.requests < MIN_WINDOW {
            return;
        }
        if let Some(p99) = window.p99() {
            let delay = (p99 * 3).max(MIN_AUTO_DELAY);
            self.delay_micros.store(delay.as_micros() as u64, Relaxed);
        }
        *start = current;
    }
}

/// Hedges allowed as a share of requests: a token bucket in thousandths of a hedge. Every
/// request adds `permille`, a hedge takes 1000, and the bucket holds at most [`BURST`] hedges,
/// so over any stretch hedges stay under `budget x requests + BURST`.
#[derive(Debug)]
pub struct HedgeBudget {
    permille: u64,
    tokens: AtomicU64,
}

/// Hedges the budget allows at once, whatever the request rate: a quiet pool can still hedge.
pub const BURST: u64 = 10;
const ONE: u64 = 1000;

impl HedgeBudget {
    pub fn new(permille: u32) -> HedgeBudget {
        HedgeBudget {
            permille: permille as u64,
            tokens: AtomicU64::new(BURST * ONE),
        }
    }

    #[inline]
    pub fn on_request(&self) {
        if self.tokens.load(Relaxed) < BURST * ONE {
            self.tokens.fetch_add(self.permille, Relaxed);
        }
    }

    /// Takes one hedge from the budget, if there is one.
    pub fn try_take(&self) -> bool {
        self.tokens
            .fetch_update(Relaxed, Relaxed, |t| t.checked_sub(ONE))
            .is_ok()
    }
}

/// What hedging did for a pool (long-lived by pool name), for metrics.
#[derive(Debug, Default)]
pub struct HedgeCounters {
    /// Second attempts sent to another backend of the pool.
    pub hedges: AtomicU64,
    /// ... of which answered first.
    pub hedges_won: AtomicU64,
    /// Hedges the budget refused.
    pub hedges_denied: AtomicU64,
}

/// What the stable version did for a candidate's requests: one set per candidate snapshot
/// (read by its rollout) and one long-lived total (for metrics).
#[derive(Debug, Default)]
pub struct CanaryCounters {
    /// Candidate requests also sent to the stable version after the candidate's hedge delay.
    pub hedges: AtomicU64,
    /// Failed candidate requests answered by the stable version.
    pub fallbacks: AtomicU64,
    /// Requests waiting on a rolled-back candidate: sent to the stable version.
    pub rescued: AtomicU64,
    /// ... and those that could not be sent again (not replayable), answered at once.
    pub rescue_refused: AtomicU64,
}

impl CanaryCounters {
    pub fn read(&self) -> CanaryTotals {
        CanaryTotals {
            hedges: self.hedges.load(Relaxed),
            fallbacks: self.fallbacks.load(Relaxed),
            rescued: self.rescued.load(Relaxed),
            rescue_refused: self.rescue_refused.load(Relaxed),
        }
    }
}

/// What shadow stages compared since start (long-lived, for metrics).
#[derive(Debug, Default)]
pub struct ShadowCounters {
    /// Copies whose answer was no worse than stable's.
    pub same: AtomicU64,
    /// Copies worse than stable's answer (failed, not found, much slower).
    pub worse: AtomicU64,
    /// Copies not sent: the stage was at its concurrency bound.
    pub dropped: AtomicU64,
}

/// [`CanaryCounters`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CanaryTotals {
    pub hedges: u64,
    pub fallbacks: u64,
    pub rescued: u64,
    pub rescue_refused: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::now_ms;

    #[test]
    fn budget_is_a_share_of_requests_plus_a_burst() {
        let b = HedgeBudget::new(100);
        let mut granted = 0;
        for _ in 0..1_000 {
            b.on_request();
            if b.try_take() {
                granted += 1;
            }
        }
        assert!(granted <= 100 + BURST, "granted {granted}");
        assert!(granted >= 100, "granted {granted}");
        let none = HedgeBudget::new(0);
        let granted = (0..100).filter(|_| none.try_take()).count() as u64;
        assert_eq!(granted, BURST);
    }

    #[test]
    fn auto_delay_follows_p99_with_a_floor_and_a_ceiling() {
        let h = HeadLatency::default();
        let cap = Duration::from_secs(15);
        assert_eq!(h.delay(HedgeAfter::Auto, cap, now_ms()), COLD_DELAY);
        for _ in 0..100 {
            h.record(Duration::from_millis(1));
        }
        h.next_update_ms.store(0, Relaxed);
        assert_eq!(h.delay(HedgeAfter::Auto, cap, now_ms()), MIN_AUTO_DELAY);
        for _ in 0..100 {
            h.record(Duration::from_millis(180));
        }
        h.next_update_ms.store(0, Relaxed);
        // p99 falls in the 200 ms bucket: 3 x 200 ms.
        assert_eq!(h.delay(HedgeAfter::Auto, cap, now_ms()), Duration::from_millis(600));
        assert_eq!(
            h.delay(HedgeAfter::Auto, Duration::from_millis(300), now_ms()),
            Duration::from_millis(300)
        );
        assert_eq!(
            h.delay(HedgeAfter::Fixed(Duration::from_millis(50)), cap, now_ms()),
            Duration::from_millis(50)
        );
    }
}
