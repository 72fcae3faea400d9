//! Request metrics that outlive config versions, recorded with one relaxed atomic add.
//!
//! Counters are keyed by their labels in long-lived maps (a config change must not reset a
//! Prometheus counter); each snapshot resolves the handles it needs when it is built, so the
//! request path never hashes labels or takes a lock. Rendering is in `exposition.rs`.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::failures::FailedClients;
use crate::hedge::{CanaryCounters, HeadLatency, HedgeCounters, ShadowCounters};
use crate::role::Role;

/// Upper bounds of the request-duration histogram, in seconds: the same layout as the canary's
/// windows (`stats.rs`), so an alert's p99 and a rollout's p99 agree on the same traffic.
pub const DURATION_BUCKETS: [f64; crate::stats::BOUNDS_MS.len()] = {
    let mut out = [0.0; crate::stats::BOUNDS_MS.len()];
    let mut i = 0;
    while i < out.len() {
        out[i] = crate::stats::BOUNDS_MS[i] as f64 / 1000.0;
        i += 1;
    }
    out
};

pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Responses by status class, for each side of a canary split.
#[derive(Default, Debug)]
pub struct ClassCounters {
    counts: [[AtomicU64; 5]; 2],
}

impl ClassCounters {
    #[inline]
    pub fn inc(&self, status: u16, role: Role) {
        let class = ((status / 100).clamp(1, 5) - 1) as usize;
        self.counts[role as usize][class].fetch_add(1, Relaxed);
    }

    pub fn get(&self, role: Role, class: usize) -> u64 {
        self.counts[role as usize][class].load(Relaxed)
    }

    /// (all responses, 5xx responses), both roles.
    pub fn totals(&self) -> (u64, u64) {
        let mut all = 0;
        let mut errors = 0;
        for role in &self.counts {
            for (c, n) in role.iter().enumerate() {
                let n = n.load(Relaxed);
                all += n;
                if c == 4 {
                    errors += n;
                }
            }
        }
        (all, errors)
    }
}

#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; DURATION_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: Default::default(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    #[inline]
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS.partition_point(|&b| b < secs);
        if i < self.buckets.len() {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    /// Non-cumulative bucket counts (the last one is above every bound), count, sum in seconds.
    pub fn read(&self) -> (Vec<u64>, u64, f64) {
        let mut b: Vec<u64> = self.buckets.iter().map(|x| x.load(Relaxed)).collect();
        let count = self.count.load(Relaxed);
        let inside: u64 = b.iter().sum();
        b.push(count.saturating_sub(inside));
        (b, count, self.sum_micros.load(Relaxed) as f64 / 1e6)
    }
}

#[derive(Default, Debug)]
pub struct UpstreamCounters {
    pub connect_errors: AtomicU64,
    pub timeouts: AtomicU64,
}

/// Something the data plane saw that belongs in the event log. Queued here (a rare path) and
/// drained by the control plane, which the data plane never calls.
#[derive(Clone, Debug, PartialEq)]
pub enum DataPlaneEvent {
    BackendDown {
        backend: String,
        reason: String,
    },
    BackendUp {
        backend: String,
    },
    BackendEjected {
        backend: String,
        pool: String,
        cause: &'static str,
        for_ms: u64,
    },
    PoolPanic {
        pool: String,
        entered: bool,
        available: usize,
        total: usize,
    },
}

const EVENTS_KEPT: usize = 10_000;

/// `pool`, `backend`.
pub type PoolBackend = (Arc<str>, Arc<str>);

/// `route`, `pool`, `backend` ("" when none applies, e.g. a 404 or a 503 with no backend).
pub type RequestKey = (Arc<str>, Arc<str>, Arc<str>);

/// Requests a route answered, by what it did with them.
#[derive(Debug, Default)]
pub struct ActionCounters {
    pub proxied: AtomicU64,
    pub redirect: AtomicU64,
    pub respond: AtomicU64,
    pub rate_limited: AtomicU64,
}

impl ActionCounters {
    pub fn get(&self) -> [(&'static str, u64); 4] {
        [
            ("proxied", self.proxied.load(Relaxed)),
            ("redirect", self.redirect.load(Relaxed)),
            ("respond", self.respond.load(Relaxed)),
            ("rate_limited", self.rate_limited.load(Relaxed)),
        ]
    }
}

#[derive(Default)]
pub struct Metrics {
    pub(crate) requests: RwLock<HashMap<RequestKey, Arc<ClassCounters>>>,
    pub(crate) durations: RwLock<HashMap<Arc<str>, Arc<[Histogram; 2]>>>,
    pub(crate) upstream: RwLock<HashMap<PoolBackend, Arc<UpstreamCounters>>>,
    pub(crate) retries: RwLock<HashMap<Arc<str>, Arc<AtomicU64>>>,
    pub(crate) head_latency: RwLock<HashMap<Arc<str>, Arc<HeadLatency>>>,
    pub(crate) hedging: RwLock<HashMap<Arc<str>, Arc<HedgeCounters>>>,
    pub(crate) route_actions: RwLock<HashMap<Arc<str>, Arc<ActionCounters>>>,
    pub(crate) listeners: RwLock<HashMap<Arc<str>, Arc<ListenerCounters>>>,
    pub in_flight: AtomicI64,
    /// Every candidate's hedges, fallbacks and rescues since start.
    pub canary: CanaryCounters,
    /// Every shadow stage's comparisons since start.
    pub shadow: ShadowCounters,
    failed_clients: FailedClients,
    events: Mutex<VecDeque<DataPlaneEvent>>,
}

fn get_or_insert<K: std::hash::Hash + Eq + Clone, V: Default>(map: &RwLock<HashMap<K, Arc<V>>>, key: &K) -> Arc<V> {
    if let Some(v) = map.read().expect("metrics lock is never poisoned").get(key) {
        return v.clone();
    }
    map.write()
        .expect("metrics lock is never poisoned")
        .entry(key.clone())
        .or_default()
        .clone()
}

/// A listener's client connections: open now (what `limits.max_connections` bounds), and
/// refused at the limit since start.
#[derive(Default)]
pub struct ListenerCounters {
    pub open: std::sync::atomic::AtomicUsize,
    pub refused: AtomicU64,
}

impl Metrics {
    pub fn listener(&self, name: &Arc<str>) -> Arc<ListenerCounters> {
        get_or_insert(&self.listeners, name)
    }

    pub fn requests(&self, route: &Arc<str>, pool: &Arc<str>, backend: &Arc<str>) -> Arc<ClassCounters> {
        get_or_insert(&self.requests, &(route.clone(), pool.clone(), backend.clone()))
    }

    pub fn durations(&self, pool: &Arc<str>) -> Arc<[Histogram; 2]> {
        if let Some(v) = self.durations.read().expect("metrics lock").get(pool) {
            return v.clone();
        }
        self.durations
            .write()
            .expect("metrics lock")
            .entry(pool.clone())
            .or_insert_with(|| Arc::new([Histogram::default(), Histogram::default()]))
            .clone()
    }

    pub fn upstream(&self, pool: &Arc<str>, backend: &Arc<str>) -> Arc<UpstreamCounters> {
        get_or_insert(&self.upstream, &(pool.clone(), backend.clone()))
    }

    /// What a route did with its requests, by action (long-lived by route name).
    pub fn route_actions(&self, route: &Arc<str>) -> Arc<ActionCounters> {
        get_or_insert(&self.route_actions, route)
    }

    pub fn retries(&self, pool: &Arc<str>) -> Arc<AtomicU64> {
        get_or_insert(&self.retries, pool)
    }

    pub fn head_latency(&self, pool: &Arc<str>) -> Arc<HeadLatency> {
        get_or_insert(&self.head_latency, pool)
    }

    pub fn hedging(&self, pool: &Arc<str>) -> Arc<HedgeCounters> {
        get_or_insert(&self.hedging, pool)
    }

    /// Every pool's hedging counters.
    /// Every route's action counters, by route name.
    pub fn route_actions_counters(&self) -> Vec<(Arc<str>, Arc<ActionCounters>)> {
        let map = self.route_actions.read().expect("metrics lock");
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn hedging_counters(&self) -> Vec<(Arc<str>, Arc<HedgeCounters>)> {
        let mut v: Vec<_> = self
            .hedging
            .read()
            .expect("metrics lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn push_event(&self, e: DataPlaneEvent) {
        let mut q = self.events.lock().expect("events lock");
        if q.len() >= EVENTS_KEPT {
            q.pop_front();
        }
        q.push_back(e);
    }

    pub fn drain_events(&self) -> Vec<DataPlaneEvent> {
        self.events.lock().expect("events lock").drain(..).collect()
    }

    /// Every request counter with its labels.
    pub fn request_counters(&self) -> Vec<(RequestKey, Arc<ClassCounters>)> {
        self.requests
            .read()
            .expect("metrics lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Remembers the client of a failed (5xx) request (no lock: see `failures.rs`).
    #[inline]
    pub fn record_failed_client(&self, ip: IpAddr) {
        self.failed_clients.record(crate::clock::unix_ms(), ip);
    }

    /// Failed (5xx) requests between two Unix times in milliseconds (inclusive): how many, from
    /// how many distinct clients, and the times of the first and the last.
    pub fn failures_between(&self, from_ms: u64, to_ms: u64) -> (usize, usize, Option<u64>, Option<u64>) {
        let s = self.failed_clients.between(from_ms, to_ms);
        (s.failed, s.clients, s.first_ms, s.last_ms)
    }

    /// (responses, 5xx responses) summed over routes matching `route` and pools matching `pool`
    /// (`None` matches all).
    pub fn totals(&self, route: Option<&str>, pool: Option<&str>) -> (u64, u64) {
        let map = self.requests.read().expect("metrics lock");
        map.iter()
            .filter(|((r, p, _), _)| route.is_none_or(|x| &**r == x) && pool.is_none_or(|x| &**p == x))
            .map(|(_, c)| c.totals())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }

    /// Cumulative duration buckets (non-cumulative counts per bucket) over pools matching `pool`.
    pub fn latency(&self, pool: Option<&str>) -> Vec<u64> {
        let map = self.durations.read().expect("metrics lock");
        let mut out = vec![0u64; DURATION_BUCKETS.len() + 1];
        for (p, h) in map.iter() {
            if pool.is_none_or(|x| &**p == x) {
                for role in h.iter() {
                    for (o, n) in out.iter_mut().zip(role.read().0) {
                        *o += n;
                    }
                }
            }
        }
        out
    }
}

/// The p99 (upper bound of its bucket, in seconds) of non-cumulative bucket counts;
/// `None` when there is no observation. Above the last bound it reports the last bound.
pub fn p99_seconds(buckets: &[u64]) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (total * 99).div_ceil(100);
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(
                DURATION_BUCKETS
                    .get(i)
                    .copied()
                    .unwrap_or(DURATION_BUCKETS[DURATION_BUCKETS.len() - 1]),
            );
        }
    }
    None
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_keep_their_identity_and_sum_by_scope() {
        let m = Metrics::default();
        let (r, p, b): (Arc<str>, Arc<str>, Arc<str>) = ("api".into(), "pool".into(), "127.0.0.1:1".into());
        m.requests(&r, &p, &b).inc(200, Role::Stable);
        m.requests(&r, &p, &b).inc(502, Role::Candidate);
        m.requests(&"web".into(), &"other".into(), &b).inc(503, Role::Stable);
        assert_eq!(m.totals(None, None), (3, 2));
        assert_eq!(m.totals(Some("api"), None), (2, 1));
        assert_eq!(m.totals(None, Some("other")), (1, 1));
        let h = m.durations(&p);
        for _ in 0..99 {
            h[0].observe(Duration::from_millis(2));
        }
        h[1].observe(Duration::from_secs(3));
        assert_eq!(p99_seconds(&m.latency(None)), Some(0.002));
        h[1].observe(Duration::from_secs(3));
        assert_eq!(p99_seconds(&m.latency(Some("pool"))), Some(3.0));
    }
}
