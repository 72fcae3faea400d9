//! Backend state that outlives config versions: health, ejection, load, idle connections.
//!
//! Health belongs to the backend *address*, not to a snapshot: the [`Registry`] hands the same
//! `Arc<BackendState>` to every snapshot that names the address, so a swap keeps what is known
//! about a backend (a weight change does not forget that it is down).
//!
//! Everything read on the request path is an atomic; the only lock is the per-backend idle
//! connection list, held for a push or a pop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use safelb_config::Outlier;

use crate::upstream::IdleConn;

/// Milliseconds since the process started; cheap, monotonic, fits an atomic.
pub fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

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
    /// Idle connections of hyper's client (requests with a body).
    pub(crate) idle: Mutex<Vec<IdleConn>>,
    /// Idle connections for bodiless requests, exchanged on the request's task (`h1/`).
    pub(crate) inline_idle: Mutex<Vec<(crate::h1::Conn, std::time::Instant)>>,
    /// The one multiplexed connection of pools that speak HTTP/2 to this backend.
    pub(crate) h2: Mutex<Option<hyper::client::conn::http2::SendRequest<crate::body::RequestBody>>>,
    pub(crate) draining: AtomicBool,
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
            idle: Mutex::new(Vec::new()),
            inline_idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            draining: AtomicBool::new(false),
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

    pub(crate) fn observe_latency(&self, latency: Duration) {
        let sample = latency.as_micros() as f64;
        let now = now_ms();
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
        self.consecutive_failures.store(0, Relaxed);
        self.ejections_total.fetch_add(1, Relaxed);
        Some(Duration::from_millis(ms))
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) > now_ms
    }

    /// A drained backend gets no new request; requests in flight finish.
    pub fn set_draining(&self, draining: bool) {
        self.draining.store(draining, Relaxed);
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

/// The long-lived map from address to backend state that snapshots attach to.
#[derive(Default)]
pub struct Registry {
    backends: Mutex<HashMap<SocketAddr, Arc<BackendState>>>,
}

impl Registry {
    pub fn get_or_insert(&self, addr: SocketAddr) -> Arc<BackendState> {
        let mut map = self
            .backends
            .lock()
            .expect("registry lock is never poisoned: no panics under it");
        map.entry(addr)
            .or_insert_with(|| Arc::new(BackendState::new(addr)))
            .clone()
    }

    pub fn get(&self, addr: &SocketAddr) -> Option<Arc<BackendState>> {
        self.backends
            .lock()
            .expect("registry lock is never poisoned")
            .get(addr)
            .cloned()
    }

    /// Forgets addresses no live snapshot names any more.
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.backends
            .lock()
            .expect("registry lock is never poisoned")
            .retain(|a, _| keep(a));
    }

    pub fn all(&self) -> Vec<Arc<BackendState>> {
        let mut v: Vec<_> = self
            .backends
            .lock()
            .expect("registry lock is never poisoned")
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|b| b.addr);
        v
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
    fn peak_ewma_takes_slow_samples_at_once() {
        let b = BackendState::new("127.0.0.1:1".parse().unwrap());
        b.observe_latency(Duration::from_millis(50));
        assert_eq!(b.ewma_micros(), 50_000.0);
        b.observe_latency(Duration::from_millis(1));
        assert!(b.ewma_micros() > 1_000.0, "a fast sample is blended, not taken whole");
    }
}
