//! Per-snapshot request counters: what the canary verdict compares.
//!
//! Each snapshot (config version) counts its own requests, errors and a latency histogram with
//! relaxed atomics. The judge reads a [`StatsSnapshot`] at the start and end of a window and
//! compares the deltas of the candidate with those of the stable version over the same window.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in milliseconds; the last bucket is unbounded.
pub const BOUNDS_MS: [u64; 28] = [
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 7_500,
    10_000, 15_000, 20_000, 30_000, 60_000,
];
const BUCKETS: usize = BOUNDS_MS.len() + 1;

#[derive(Debug)]
pub struct Stats {
    requests: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Stats {
    /// Records one finished request; `error` is an upstream-side failure (5xx, connect error,
    /// timeout, no healthy backend).
    pub fn record(&self, error: bool, latency: Duration) {
        self.requests.fetch_add(1, Relaxed);
        if error {
            self.errors.fetch_add(1, Relaxed);
        }
        let ms = latency.as_millis() as u64;
        let bucket = BOUNDS_MS.partition_point(|&b| b < ms);
        self.latency[bucket].fetch_add(1, Relaxed);
    }

    pub fn read(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Relaxed)),
        }
    }
}

/// Counters at one moment; subtract two to get a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub errors: u64,
    latency: [u64; BUCKETS],
}

impl Default for StatsSnapshot {
    fn default() -> Self {
        StatsSnapshot {
            requests: 0,
            errors: 0,
            latency: [0; BUCKETS],
        }
    }
}

impl StatsSnapshot {
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(earlier.latency[i])),
        }
    }

    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The upper bound of the bucket holding the 99th percentile (`None` without requests).
    pub fn p99(&self) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (total * 99).div_ceil(100);
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let ms = BOUNDS_MS.get(i).copied().unwrap_or(120_000);
                return Some(Duration::from_millis(ms));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_rates_and_p99() {
        let s = Stats::default();
        let start = s.read();
        for i in 0..100 {
            s.record(i < 3, Duration::from_millis(if i < 98 { 4 } else { 400 }));
        }
        let w = s.read().since(&start);
        assert_eq!((w.requests, w.errors), (100, 3));
        assert!((w.error_rate() - 0.03).abs() < 1e-9);
        assert_eq!(w.p99(), Some(Duration::from_millis(500)));
        assert_eq!(StatsSnapshot::default().p99(), None);
    }
}
