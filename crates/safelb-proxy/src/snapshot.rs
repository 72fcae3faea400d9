//! The routing snapshot: one config version compiled for the data plane.
//!
//! A snapshot is immutable once built except for counters (retry budget, panic flag); it is
//! published behind one `ArcSwap` by [`crate::ProxyHandle`], and a request holds the `Arc` it
//! loaded for its whole life, so a swap never changes the rules under a request in flight.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use http::{Method, Uri};
use safelb_config::routing::RequestView;
use safelb_config::{HashKey, HedgeAfter, PanicPolicy, Pool, ValidConfig};
use tokio_util::sync::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use crate::actions::RouteActions;
use crate::backend::BackendState;
use crate::balance::{Balancer, Candidates};
use crate::clock::now_ms;
use crate::error::ErrorKind;
use crate::headers::Fields;
use crate::hedge::{CanaryCounters, HeadLatency, HedgeBudget, HedgeCounters};
use crate::metrics::{ClassCounters, Histogram, Metrics, UpstreamCounters};
use crate::registry::Registry;
use crate::upstream::Conns;

pub struct Snapshot {
    pub version: u64,
    pub config: ValidConfig,
    pub pools: Vec<PoolRuntime>,
    /// Route names, shared with access-log lines without copying.
    pub route_names: Vec<Arc<str>>,
    /// Each route's actions, compiled (in route order).
    pub actions: Vec<RouteActions>,
    /// What this version served: the canary verdict reads it.
    pub stats: crate::stats::Stats,
    /// Per route, the response counters for each backend of its pool, then one for answers
    /// given without a backend (resolved here so requests never look labels up).
    pub route_counters: Vec<Vec<Arc<ClassCounters>>>,
    /// Responses to requests no route matched.
    pub no_route: Arc<ClassCounters>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when this version is rolled back: requests still waiting on it for a response
    /// head are rescued at once (see `proxy/candidate.rs`).
    pub retired: CancellationToken,
    /// What the stable version did for this version's requests while it was a candidate.
    pub canary: CanaryCounters,
}

impl Snapshot {
    pub(crate) fn build(config: ValidConfig, version: u64, registry: &Registry, metrics: &Arc<Metrics>) -> Snapshot {
        let pools: Vec<PoolRuntime> = config
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| PoolRuntime::new(i, p, registry, metrics))
            .collect();
        let route_names: Vec<Arc<str>> = config.routes.iter().map(|r| Arc::from(r.name.as_str())).collect();
        let none: Arc<str> = Arc::from("");
        let route_counters = config
            .routes
            .iter()
            .zip(&route_names)
            .map(|(r, name)| match r.pool() {
                Some(p) => {
                    let pool = &pools[p];
                    let mut v: Vec<_> = pool
                        .backends
                        .iter()
                        .map(|b| metrics.requests(name, &pool.name, &b.label))
                        .collect();
                    v.push(metrics.requests(name, &pool.name, &none));
                    v
                }
                None => vec![metrics.requests(name, &none, &none)],
            })
            .collect();
        let mut actions: Vec<RouteActions> = config
            .routes
            .iter()
            .zip(&route_names)
            .map(|(r, name)| RouteActions::new(r, &registry.limiters, metrics.route_actions(name)))
            .collect();
        for test in &config.tests {
            if let Some(i) = test.route(&config.route_table) {
                actions[i].tested = config.routes[i].pool().is_none();
            }
        }
        let no_route = metrics.requests(&none, &none, &none);
        Snapshot {
            version,
            config,
            pools,
            route_names,
            actions,
            stats: Default::default(),
            route_counters,
            no_route,
            metrics: metrics.clone(),
            retired: CancellationToken::new(),
            canary: CanaryCounters::default(),
        }
    }

    /// Counts what the stable version did for this version's requests, here and in the totals.
    pub(crate) fn count_canary(&self, counter: fn(&CanaryCounters) -> &AtomicU64) {
        counter(&self.canary).fetch_add(1, Relaxed);
        counter(&self.metrics.canary).fetch_add(1, Relaxed);
    }

    pub fn pool_config(&self, pool: &PoolRuntime) -> &Pool {
        &self.config.pools[pool.index]
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("version", &self.version)
            .field("pools", &self.pools.len())
            .finish()
    }
}

/// A pool as the data plane uses it.
#[derive(Debug)]
pub struct PoolRuntime {
    pub index: usize,
    pub name: Arc<str>,
    pub backends: Vec<Arc<BackendState>>,
    /// The connections of each backend, in the order of `backends`.
    pub(crate) conns: Vec<Arc<Conns>>,
    pub weights: Vec<u32>,
    pub balancer: Balancer,
    pub retry_budget: RetryBudget,
    in_panic: AtomicBool,
    panic_threshold: u8,
    panic_policy: PanicPolicy,
    max_ejected_percent: u8,
    /// `slow_start` in milliseconds; 0 when the pool has none.
    slow_start_ms: u64,
    /// `max_in_flight` per backend (0: no limit).
    max_in_flight: u32,
    /// Request durations of this pool, by role.
    pub durations: Arc<[Histogram; 2]>,
    /// Per backend, in `backends` order.
    pub upstream: Vec<Arc<UpstreamCounters>>,
    pub retries: Arc<AtomicU64>,
    /// `None` when the pool has `hedge = false`.
    pub hedge: Option<PoolHedge>,
    /// Response-head latency of the pool's stable traffic (long-lived by name): hedge delays.
    pub head_latency: Arc<HeadLatency>,
    pub hedging: Arc<HedgeCounters>,
    metrics: Arc<Metrics>,
}

/// A pool's hedging policy and its budget.
#[derive(Debug)]
pub struct PoolHedge {
    pub after: HedgeAfter,
    pub budget: HedgeBudget,
}

impl PoolRuntime {
    fn new(index: usize, pool: &Pool, registry: &Registry, metrics: &Arc<Metrics>) -> PoolRuntime {
        let (backends, conns): (Vec<_>, Vec<_>) = pool.backends.iter().map(|b| registry.get_or_insert(b.addr)).unzip();
        let weights: Vec<u32> = pool.backends.iter().map(|b| b.weight).collect();
        let name: Arc<str> = Arc::from(pool.name.as_str());
        PoolRuntime {
            index,
            durations: metrics.durations(&name),
            upstream: backends.iter().map(|b| metrics.upstream(&name, &b.label)).collect(),
            retries: metrics.retries(&name),
            hedge: pool.hedge.map(|h| PoolHedge {
                after: h.after,
                budget: HedgeBudget::new(h.budget_permille),
            }),
            head_latency: metrics.head_latency(&name),
            hedging: metrics.hedging(&name),
            metrics: metrics.clone(),
            name,
            balancer: Balancer::new(pool.balance, &backends, &weights),
            backends,
            conns,
            weights,
            retry_budget: RetryBudget::new(pool.retry.budget_percent, pool.retry.min_per_second),
            in_panic: AtomicBool::new(false),
            panic_threshold: pool.panic_threshold,
            panic_policy: pool.panic_policy,
            max_ejected_percent: pool.outlier.max_ejected_percent,
            slow_start_ms: pool.slow_start.map_or(0, |d| d.as_millis() as u64),
            max_in_flight: pool.max_in_flight.unwrap_or(0),
        }
    }

    /// Chooses a backend for a request at `now` ([`now_ms`]), skipping those in `tried`.
    pub fn select(&self, hash: u64, tried: &[usize], now: u64) -> Result<usize, ErrorKind> {
        let usable = |i: usize| self.weights[i] > 0 && !tried.contains(&i);
        let max = self.max_in_flight;
        let room = |i: usize| max == 0 || self.backends[i].in_flight() < max;
        if self.panic_threshold > 0 {
            let total = self
                .backends
                .iter()
                .enumerate()
                .filter(|(i, _)| self.weights[*i] > 0)
                .count()
                .max(1);
            let available = self
                .backends
                .iter()
                .enumerate()
                .filter(|(i, b)| self.weights[*i] > 0 && b.is_available(now))
                .count();
            let panic = available * 100 < total * self.panic_threshold as usize;
            if self.in_panic.swap(panic, Relaxed) != panic {
                self.metrics.push_event(crate::metrics::DataPlaneEvent::PoolPanic {
                    pool: self.name.to_string(),
                    entered: panic,
                    available,
                    total,
                });
                if panic {
                    tracing::warn!(pool = %self.name, available, total, threshold = self.panic_threshold, policy = ?self.panic_policy, "pool entered panic mode");
                } else {
                    tracing::info!(pool = %self.name, available, total, "pool left panic mode");
                }
            }
            if panic {
                return match self.panic_policy {
                    PanicPolicy::FailClosed => Err(ErrorKind::PanicFailClosed),
                    PanicPolicy::FailOpen => self
                        .pick(hash, &|i| usable(i) && room(i))
                        .ok_or(ErrorKind::NoHealthyBackend),
                };
            }
        }
        let eligible = |i: usize| usable(i) && self.backends[i].is_available(now) && room(i);
        // Every available backend is full: the pool is at capacity, not down.
        let none_left = || {
            let full = max > 0 && (0..self.backends.len()).any(|i| usable(i) && self.backends[i].is_available(now));
            if full {
                ErrorKind::PoolAtCapacity
            } else {
                ErrorKind::NoHealthyBackend
            }
        };
        if self.slow_start_ms == 0 {
            return self.pick(hash, &eligible).ok_or_else(none_left);
        }
        // Slow start: a ramping backend is eligible for a request with the probability of its
        // ramp, drawn once per request and backend (so a policy that asks twice gets one
        // answer); the policy then shares the request among the others as it would if the
        // backend were down. When every backend is out by the draw, the draw is ignored.
        let draw = fastrand::u64(..);
        let ramped = |i: usize| {
            eligible(i) && {
                let ramp = self.backends[i].ramp(now, self.slow_start_ms);
                ramp >= 1.0 || unit(draw ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) < ramp
            }
        };
        self.pick(hash, &ramped)
            .or_else(|| self.pick(hash, &eligible))
            .ok_or_else(none_left)
    }

    fn pick(&self, hash: u64, eligible: &dyn Fn(usize) -> bool) -> Option<usize> {
        let c = Candidates {
            backends: &self.backends,
            weights: &self.weights,
            eligible,
        };
        self.balancer.pick(&c, hash)
    }

    /// Backends that may take a new request now (health, ejection, drain), whatever their weight.
    pub fn available(&self) -> usize {
        let now = now_ms();
        self.backends.iter().filter(|b| b.is_available(now)).count()
    }

    pub fn in_panic(&self) -> bool {
        self.in_panic.load(Relaxed)
    }

    /// May one more backend of this pool be ejected? At least one always may, so a pool of one
    /// answers a fast 503 instead of a slow timeout per request.
    pub fn may_eject(&self) -> bool {
        let now = now_ms();
        let ejected = self.backends.iter().filter(|b| b.is_ejected(now)).count();
        let cap = (self.backends.len() * self.max_ejected_percent as usize / 100).max(1);
        self.max_ejected_percent > 0 && ejected < cap
    }
}

/// A number in [0, 1) from 64 random bits, mixed (splitmix64's finalizer) so that nearby
/// inputs give unrelated outputs.
fn unit(x: u64) -> f64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as f64 / (u64::MAX as f64 + 1.0)
}

/// Retries allowed per second: `percent` of requests, and never fewer than `min_per_second`.
/// Keeps retries from doubling the load on a pool that is failing.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u32,
    min_per_second: u32,
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
}

impl RetryBudget {
    pub fn new(percent: u32, min_per_second: u32) -> Self {
        RetryBudget {
            percent,
            min_per_second,
            second: AtomicU64::new(0),
            requests: AtomicU32::new(0),
            retries: AtomicU32::new(0),
        }
    }

    /// Starts a new second's counts when `now` ([`now_ms`]) is in another second.
    fn roll(&self, now: u64) {
        let now = now / 1000;
        if self.second.load(Relaxed) != now && self.second.swap(now, Relaxed) != now {
            self.requests.store(0, Relaxed);
            self.retries.store(0, Relaxed);
        }
    }

    /// Counts a request made at `now` ([`now_ms`]).
    pub fn on_request(&self, now: u64) {
        self.roll(now);
        self.requests.fetch_add(1, Relaxed);
    }

    /// Takes one retry from the budget if there is one left this second.
    pub fn try_retry(&self) -> bool {
        self.roll(now_ms());
        let allowed = (self.requests.load(Relaxed) as u64 * self.percent as u64 / 100).max(self.min_per_second as u64);
        let used = self.retries.fetch_add(1, Relaxed) as u64;
        if used < allowed {
            true
        } else {
            self.retries.fetch_sub(1, Relaxed);
            false
        }
    }
}

impl Snapshot {
    /// Marks, on a candidate, the routes whose own answers count as its errors: routes that
    /// answer themselves (redirect, respond), that no route test exercises, and that `stable`
    /// does not have in the same form. An accidental catch-all redirect is one; a deliberate
    /// maintenance page has a test, and an unchanged redirect is not news.
    pub fn mark_suspects(&self, stable: &Snapshot) {
        for (i, route) in self.config.routes.iter().enumerate() {
            let unchanged = stable.config.routes.iter().any(|r| r == route);
            let suspect = route.pool().is_none() && !self.actions[i].tested && !unchanged;
            self.actions[i].suspect.store(suspect, Relaxed);
        }
    }

    /// The route a request head matches, if any.
    pub(crate) fn find_route(
        &self,
        listener: &str,
        method: &Method,
        uri: &Uri,
        headers: &impl Fields,
    ) -> Option<usize> {
        let host = headers.first_str("host").unwrap_or("");
        self.find_route_at(listener, method, uri, host, headers)
    }

    /// [`Snapshot::find_route`] for a request whose `host` (its first `Host` value) is known.
    pub(crate) fn find_route_at(
        &self,
        listener: &str,
        method: &Method,
        uri: &Uri,
        host: &str,
        headers: &impl Fields,
    ) -> Option<usize> {
        let view = RequestView {
            listener,
            method: method.as_str(),
            host,
            path: uri.path(),
            header: |name: &str| headers.first_str(name),
        };
        self.config.route_table.find(&view)
    }

    /// The request's key for `consistent_hash` in `pool`: the pool's `hash_key`, else the
    /// client address.
    pub(crate) fn request_hash(&self, pool: &PoolRuntime, headers: &impl Fields, client: SocketAddr) -> u64 {
        let by_client = || match client.ip() {
            std::net::IpAddr::V4(ip) => xxh3_64(&ip.octets()),
            std::net::IpAddr::V6(ip) => xxh3_64(&ip.octets()),
        };
        match &self.pool_config(pool).hash_key {
            HashKey::ClientAddress => by_client(),
            HashKey::Header(name) => headers.first(name).map_or_else(by_client, xxh3_64),
            HashKey::Cookie(name) => {
                crate::headers::cookie(headers, name).map_or_else(by_client, |v| xxh3_64(v.as_bytes()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_budget_caps_retries_per_second() {
        let b = RetryBudget::new(20, 2);
        for _ in 0..100 {
            b.on_request(now_ms());
        }
        let granted = (0..100).filter(|_| b.try_retry()).count();
        // Within one second: 20% of 100 requests. (A second boundary in the middle only resets.)
        assert!((2..=20).contains(&granted), "granted {granted}");
        let b = RetryBudget::new(0, 3);
        b.on_request(now_ms());
        assert!((0..10).filter(|_| b.try_retry()).count() <= 3);
    }
}
