//! What is known about a backend address, outliving config versions: health, ejection, load.
//!
//! Health belongs to the backend *address*, not to a snapshot: the
//! [`Registry`](crate::registry::Registry) hands the same `Arc<BackendState>` to every snapshot
//! that names the address, so a swap keeps what is known about a backend (a weight change does
//! not forget that it is down).
//!
//! Atomics only: the request path reads and updates it without a lock. Its connections are
//! elsewhere ([`crate::upstream::Conns`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use safelb_config::Outlier;

use crate::clock::now_ms;

/// What the active health check last concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Active {
    /// No check has finished yet (or the pool has none): usable.
    Unknown = 0,
    Up = 1,
    Down = 2,
}

/// Why a backend is not taking requests, for status output and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    Available,
    FailedHealthCheck,
    Ejected { remaining: Duration },
}

pub struct BackendState {
    pub addr: SocketAddr,
    /// `addr` rendered once, for logs and headers.
    pub label: Arc<str>,
    active: AtomicU8,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    consecutive_failures: AtomicU32,
    in_flight: AtomicU32,
    /// Peak-EWMA of response latency in microseconds, as f64 bits.
    ewma_micros: AtomicU64,
    ewma_stamp_ms: AtomicU64,
    pub(crate) draining: AtomicBool,
    /// When the backend last (re)joined: new to a pool, back from failed checks, an ejection
    /// or draining. Pools with `slow_start` ramp its share up from then. 0: never.
    ramp_from_ms: AtomicU64,
    /// Ejections since start, for metrics.
    pub ejections_total: AtomicU64,
}

/// Decay time of the latency EWMA: old samples weigh e^-1 after this long.
const EWMA_DECAY_MS: f64 = 5_000.0;
/// Latency assumed for a backend with no sample yet: below any real loopback round trip, so an
/// untried backend wins its first comparisons and gets measured instead of starved.
const EWMA_DEFAULT_MICROS: f64 = 100.0;

impl BackendState {
    pub fn new(addr: SocketAddr) -> BackendState {
        BackendState {
            addr,
            label: Arc::from(addr.to_string()),
            active: AtomicU8::new(Active::Unknown as u8),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            in_flight: AtomicU32::new(0),
            ewma_micros: AtomicU64::new(EWMA_DEFAULT_MICROS.to_bits()),
            ewma_stamp_ms: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            ramp_from_ms: AtomicU64::new(0),
            ejections_total: AtomicU64::new(0),
        }
    }

    /// May this backend receive a new request now?
    #[inline]
    pub fn is_available(&self, now_ms: u64) -> bool {
        self.active.load(Relaxed) != Active::Down as u8
            && self.ejected_until_ms.load(Relaxed) <= now_ms
            && !self.draining.load(Relaxed)
    }

    pub fn availability(&self) -> Availability {
        let now = now_ms();
        let until = self.ejected_until_ms.load(Relaxed);
        if self.active() == Active::Down {
            Availability::FailedHealthCheck
        } else if until > now {
            Availability::Ejected {
                remaining: Duration::from_millis(until - now),
            }
        } else {
            Availability::Available
        }
    }

    /// How long an ejected backend stays out, in milliseconds (`None` when it is not ejected).
    pub fn ejected_for_ms(&self) -> Option<u64> {
        match self.availability() {
            Availability::Ejected { remaining } => Some(remaining.as_millis() as u64),
            _ => None,
        }
    }

    pub fn active(&self) -> Active {
        match self.active.load(Relaxed) {
            1 => Active::Up,
            2 => Active::Down,
            _ => Active::Unknown,
        }
    }

    /// Records the active checker's verdict; returns the previous one.
    pub(crate) fn set_active(&self, state: Active) -> Active {
        match self.active.swap(state as u8, Relaxed) {
            1 => Active::Up,
            2 => Active::Down,
            _ => Active::Unknown,
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    pub(crate) fn start_request(&self) {
        self.in_flight.fetch_add(1, Relaxed);
    }

    pub(crate) fn end_request(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    /// The current latency estimate in microseconds, decayed toward the default while idle.
    pub fn ewma_micros(&self) -> f64 {
        f64::from_bits(self.ewma_micros.load(Relaxed))
    }

    /// Blends in one latency sample, taken at `now` ([`now_ms`]).
    pub(crate) fn observe_latency(&self, latency: Duration, now: u64) {
        let sample = latency.as_micros() as f64;
        let last = self.ewma_stamp_ms.swap(now, Relaxed);
        let old = self.ewma_micros();
        // Peak-EWMA: a slower sample is taken at once, a faster one is blended in over time,
        // so a backend that turns slow loses traffic immediately and wins it back gradually.
        let next = if sample > old {
            sample
        } else {
            let w = (-((now.saturating_sub(last)) as f64) / EWMA_DECAY_MS).exp();
            old * w + sample * (1.0 - w)
        };
        self.ewma_micros.store(next.to_bits(), Relaxed);
    }

    /// A request to this backend succeeded (any status below 500).
    pub(crate) fn record_success(&self) {
        if self.consecutive_failures.load(Relaxed) != 0 {
            self.consecutive_failures.store(0, Relaxed);
        }
    }

    /// A connect error, timeout or 5xx. Returns the ejection time if this failure ejected the
    /// backend. `pool_ejected_share` tells whether the pool can afford one more ejection.
    pub(crate) fn record_failure(&self, outlier: &Outlier, may_eject: impl FnOnce() -> bool) -> Option<Duration> {
        let failures = self.consecutive_failures.fetch_add(1, Relaxed) + 1;
        if outlier.consecutive_failures == 0 || failures < outlier.consecutive_failures {
            return None;
        }
        let now = now_ms();
        if self.ejected_until_ms.load(Relaxed) > now || !may_eject() {
            return None;
        }
        // Back off exponentially for a backend that keeps failing; forget old ejections once
        // it has stayed in for a whole `max_ejection`.
        let previous_end = self.ejected_until_ms.load(Relaxed);
        let max_ms = outlier.max_ejection.as_millis() as u64;
        if previous_end > 0 && now.saturating_sub(previous_end) > max_ms {
            self.ejections.store(0, Relaxed);
        }
        let n = self.ejections.fetch_add(1, Relaxed).min(16);
        let ms = (outlier.base_ejection.as_millis() as u64)
            .saturating_mul(1 << n)
            .min(max_ms.max(1));
        self.ejected_until_ms.store(now + ms, Relaxed);
        // Back in when the ejection ends, and ramping from then.
        self.ramp_from_ms.store(now + ms, Relaxed);
        self.consecutive_failures.store(0, Relaxed);
        self.ejections_total.fetch_add(1, Relaxed);
        Some(Duration::from_millis(ms))
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) > now_ms
    }

    /// A drained backend gets no new request; requests in flight finish. Undrained, it ramps
    /// up in pools with `slow_start`.
    pub fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Relaxed) && !draining {
            self.start_ramp();
        }
    }

    /// The backend (re)joins now: pools with `slow_start` ramp its share up from here.
    pub(crate) fn start_ramp(&self) {
        self.ramp_from_ms.store(now_ms().max(1), Relaxed);
    }

    /// For status output: the backend's current share in percent while it ramps up under a
    /// pool's `slow_start`, `None` when it takes its full share.
    pub fn slow_start_percent(&self, now_ms: u64, slow_start: Option<Duration>) -> Option<u8> {
        let ramp = self.ramp(now_ms, slow_start?.as_millis() as u64);
        (ramp < 1.0).then(|| (ramp * 100.0).round() as u8)
    }

    /// The share of its weight the backend takes `slow_start` after it (re)joined: from 10%
    /// up to 100% linearly (1.0 when not ramping).
    pub fn ramp(&self, now_ms: u64, slow_start_ms: u64) -> f64 {
        let from = self.ramp_from_ms.load(Relaxed);
        if from == 0 || slow_start_ms == 0 || now_ms >= from + slow_start_ms {
            return 1.0;
        }
        let elapsed = now_ms.saturating_sub(from) as f64 / slow_start_ms as f64;
        (0.1 + 0.9 * elapsed).min(1.0)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Relaxed)
    }
}

impl std::fmt::Debug for BackendState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendState")
            .field("addr", &self.addr)
            .field("active", &self.active())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier(n: u32) -> Outlier {
        Outlier {
            consecutive_failures: n,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_with_backoff() {
        let b = BackendState::new("127.0.0.1:1".parse().unwrap());
        let o = outlier(3);
        assert_eq!(b.record_failure(&o, || true), None);
        b.record_success();
        assert_eq!(b.record_failure(&o, || true), None);
        assert_eq!(b.record_failure(&o, || true), None);
        assert_eq!(b.record_failure(&o, || true), Some(Duration::from_secs(10)));
        assert!(!b.is_available(now_ms()));
        // Pretend the ejection ended now; the next one doubles.
        b.ejected_until_ms.store(now_ms(), Relaxed);
        for _ in 0..2 {
            b.record_failure(&o, || true);
        }
        assert_eq!(b.record_failure(&o, || true), Some(Duration::from_secs(20)));
    }

    #[test]
    fn ejection_respects_the_pool_cap() {
        let b = BackendState::new("127.0.0.1:1".parse().unwrap());
        let o = outlier(1);
        assert_eq!(b.record_failure(&o, || false), None);
        assert!(b.is_available(now_ms()));
    }

    #[test]
    fn a_rejoining_backend_ramps_from_a_tenth_to_its_full_share() {
        let b = BackendState::new("127.0.0.1:1".parse().unwrap());
        assert_eq!(b.ramp(now_ms(), 10_000), 1.0, "never rejoined: full share");
        b.set_draining(true);
        b.set_draining(false);
        let from = now_ms().max(1);
        assert!((b.ramp(from, 10_000) - 0.1).abs() < 0.01);
        assert!((b.ramp(from + 5_000, 10_000) - 0.55).abs() < 0.01);
        assert_eq!(b.ramp(from + 10_000, 10_000), 1.0);
        // An ejection's ramp starts when the ejection ends.
        let o = outlier(1);
        let ejected_for = b.record_failure(&o, || true).unwrap().as_millis() as u64;
        let back = now_ms() + ejected_for;
        assert!((b.ramp(back, 10_000) - 0.1).abs() < 0.01);
    }

    #[test]
    fn peak_ewma_takes_slow_samples_at_once() {
        let b = BackendState::new("127.0.0.1:1".parse().unwrap());
        b.observe_latency(Duration::from_millis(50), now_ms());
        assert_eq!(b.ewma_micros(), 50_000.0);
        b.observe_latency(Duration::from_millis(1), now_ms());
        assert!(b.ewma_micros() > 1_000.0, "a fast sample is blended, not taken whole");
    }
}
