//! [`ProxyHandle`]: the only door from the control plane into the data plane.
//!
//! It owns the one `ArcSwap<Routing>` that requests load: the stable snapshot and, during a
//! rollout, the candidate with its share of traffic. It also owns the backend registry that
//! snapshots attach to, the health checkers and the recent-traffic samples. Every change builds
//! its snapshots off the request path and publishes them with a single atomic store; requests
//! already running keep the snapshot they started with.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use safelb_config::{Listener, ValidConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use xxhash_rust::xxh3::xxh3_64;

use crate::backend::{Active, BackendState};
use crate::health::{desired_checks, HealthCheckers};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::role::Role;
use crate::samples::Samples;
use crate::shadow::Shadow;
use crate::snapshot::Snapshot;

/// Why a config cannot replace the running one without a restart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwapError {
    #[error("listeners cannot change while running (running: {running}; new: {new}): restart safelb to change them")]
    ListenersChanged { running: String, new: String },
    #[error("[access_log] cannot change while running: restart safelb to change it")]
    AccessLogChanged,
    #[error("no canary is running")]
    NoCanary,
}

/// One probe result taken outside the checkers (preflight).
#[derive(Clone, Debug)]
pub struct Probed {
    pub addr: SocketAddr,
    pub passed: bool,
    /// Why it failed, for the health event.
    pub detail: String,
}

/// What requests read: the stable snapshot, an optional canary, and an optional shadow stage
/// (copies of stable requests through a candidate that serves no client).
pub struct Routing {
    pub stable: Arc<Snapshot>,
    pub canary: Option<Canary>,
    pub shadow: Option<Arc<Shadow>>,
}

#[derive(Clone)]
pub struct Canary {
    pub candidate: Arc<Snapshot>,
    /// Percent of requests sent to the candidate (0..=100).
    pub percent: u8,
    /// Split by client address instead of per request.
    pub sticky: bool,
}

impl Routing {
    /// The snapshot for one request, and which side of the split it is.
    #[inline]
    pub fn pick(&self, client: SocketAddr) -> (&Arc<Snapshot>, Role) {
        match &self.canary {
            Some(c) if c.percent > 0 => {
                let roll = if c.sticky {
                    let h = match client.ip() {
                        IpAddr::V4(ip) => xxh3_64(&ip.octets()),
                        IpAddr::V6(ip) => xxh3_64(&ip.octets()),
                    };
                    (h % 100) as u8
                } else {
                    fastrand::u8(..100)
                };
                if roll < c.percent {
                    (&c.candidate, Role::Candidate)
                } else {
                    (&self.stable, Role::Stable)
                }
            }
            _ => (&self.stable, Role::Stable),
        }
    }
}

#[derive(Clone)]
pub struct ProxyHandle {
    inner: Arc<Inner>,
}

struct Inner {
    current: ArcSwap<Routing>,
    registry: Registry,
    checkers: HealthCheckers,
    samples: Samples,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
    tunnels: Tunnels,
}

/// The upgraded connections (WebSocket tunnels) of this proxy. They outlive the HTTP connection
/// that started them, so shutdown finds them here: it waits for them like for requests in
/// flight, then closes the rest.
#[derive(Default)]
pub struct Tunnels {
    tracker: TaskTracker,
    close: CancellationToken,
}

impl Tunnels {
    /// Runs a tunnel; `run` gets the token that is cancelled when tunnels must close.
    pub fn spawn<F>(&self, run: impl FnOnce(CancellationToken) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(run(self.close.clone()));
    }

    pub fn open(&self) -> usize {
        self.tracker.len()
    }

    /// Waits up to `limit` for the tunnels to end by themselves, then closes the others (both
    /// sides shut down); returns how many had to be closed.
    pub async fn drain(&self, limit: std::time::Duration) -> usize {
        self.tracker.close();
        if tokio::time::timeout(limit, self.tracker.wait()).await.is_ok() {
            return 0;
        }
        let left = self.tracker.len();
        self.close.cancel();
        // Each closing tunnel shuts its sockets down within a second.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.tracker.wait()).await;
        left
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl ProxyHandle {
    /// Builds the first snapshot and starts its health checks. Call inside a tokio runtime.
    pub fn new(config: ValidConfig, version: u64) -> ProxyHandle {
        let registry = Registry::default();
        let metrics = Arc::new(Metrics::default());
        let stable = Arc::new(Snapshot::build(config, version, &registry, &metrics));
        let handle = ProxyHandle {
            inner: Arc::new(Inner {
                current: ArcSwap::from_pointee(Routing {
                    stable,
                    canary: None,
                    shadow: None,
                }),
                registry,
                checkers: HealthCheckers::default(),
                samples: Samples::default(),
                metrics,
                cancel: CancellationToken::new(),
                tunnels: Tunnels::default(),
            }),
        };
        handle.reconcile();
        handle
    }

    /// The routing new requests use now.
    #[inline]
    pub fn routing(&self) -> arc_swap::Guard<Arc<Routing>> {
        self.inner.current.load()
    }

    /// The stable snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.current.load().stable.clone()
    }

    /// The candidate snapshot and its share, during a rollout.
    pub fn canary(&self) -> Option<Canary> {
        self.inner.current.load().canary.clone()
    }

    /// Replaces the stable snapshot for all traffic, ending any canary. Refuses changes that
    /// cannot take effect without a restart, naming them; on refusal nothing changes. Requests in
    /// flight finish on the version they started with.
    pub fn swap(&self, config: ValidConfig, version: u64) -> Result<Arc<Snapshot>, SwapError> {
        self.replace_stable(config, version, false)
    }

    /// A rollback: `swap`, and the versions it replaced are retired, so requests still waiting
    /// on them for a response head are rescued at once (replayable ones are sent again through
    /// the version put back, the others answered 503).
    pub fn roll_back_to(&self, config: ValidConfig, version: u64) -> Result<Arc<Snapshot>, SwapError> {
        self.replace_stable(config, version, true)
    }

    fn replace_stable(&self, config: ValidConfig, version: u64, retire: bool) -> Result<Arc<Snapshot>, SwapError> {
        let running = self.snapshot();
        check_swappable(&running.config, &config)?;
        let next = Arc::new(Snapshot::build(
            config,
            version,
            &self.inner.registry,
            &self.inner.metrics,
        ));
        ramp_new_backends(&running, &next);
        let replaced = self.routing();
        self.inner.current.store(Arc::new(Routing {
            stable: next.clone(),
            canary: None,
            shadow: None,
        }));
        if retire {
            // After the store: a rescued request must find the version put back in place.
            replaced.stable.retired.cancel();
            if let Some(c) = &replaced.canary {
                c.candidate.retired.cancel();
            }
        }
        self.reconcile();
        tracing::info!(
            from = running.version,
            to = version,
            "config version now serving all traffic"
        );
        Ok(next)
    }

    /// Builds a candidate snapshot next to the stable one, with 0% of traffic. Its backends get
    /// health checks from now on. `probed` holds preflight's results (address, passed, detail):
    /// they are real verdicts and are applied before the candidate can route (see
    /// [`ProxyHandle::apply_probes`]).
    pub fn begin_canary(
        &self,
        config: ValidConfig,
        version: u64,
        sticky: bool,
        probed: &[Probed],
    ) -> Result<Arc<Snapshot>, SwapError> {
        let current = self.routing();
        check_swappable(&current.stable.config, &config)?;
        // The candidate that was shadowed is the one that now gets traffic (same counters).
        let shadowed = current
            .shadow
            .as_ref()
            .filter(|s| s.candidate.version == version)
            .map(|s| s.candidate.clone());
        let candidate = match shadowed {
            Some(c) => c,
            None => self.build_candidate(config, version, probed),
        };
        let canary = Canary {
            candidate: candidate.clone(),
            percent: 0,
            sticky,
        };
        self.inner.current.store(Arc::new(Routing {
            stable: current.stable.clone(),
            canary: Some(canary),
            shadow: None,
        }));
        self.reconcile();
        Ok(candidate)
    }

    /// Starts the shadow stage: the candidate is built (preflight's verdicts applied first) and
    /// a share of live safe stable requests is copied to it; no client is served by it.
    pub fn begin_shadow(
        &self,
        config: ValidConfig,
        version: u64,
        probed: &[Probed],
        policy: &safelb_config::ShadowPolicy,
    ) -> Result<Arc<Shadow>, SwapError> {
        let current = self.routing();
        check_swappable(&current.stable.config, &config)?;
        let candidate = self.build_candidate(config, version, probed);
        let shadow = Arc::new(Shadow::new(candidate, policy));
        self.inner.current.store(Arc::new(Routing {
            stable: current.stable.clone(),
            canary: None,
            shadow: Some(shadow.clone()),
        }));
        self.reconcile();
        Ok(shadow)
    }

    /// A candidate's snapshot, preflight's verdicts applied first so that it never routes to a
    /// backend preflight found down.
    fn build_candidate(&self, config: ValidConfig, version: u64, probed: &[Probed]) -> Arc<Snapshot> {
        self.apply_probes(probed, &config);
        let candidate = Arc::new(Snapshot::build(
            config,
            version,
            &self.inner.registry,
            &self.inner.metrics,
        ));
        let stable = self.snapshot();
        ramp_new_backends(&stable, &candidate);
        candidate.mark_suspects(&stable);
        candidate
    }

    /// Ends a shadow stage without a canary (the candidate was rejected or the change aborted).
    pub fn end_shadow(&self) {
        let current = self.routing();
        if current.shadow.is_some() {
            self.inner.current.store(Arc::new(Routing {
                stable: current.stable.clone(),
                canary: current.canary.clone(),
                shadow: None,
            }));
            self.reconcile();
        }
    }

    /// Sets the candidate's share of requests.
    pub fn set_canary_percent(&self, percent: u8) -> Result<(), SwapError> {
        let current = self.routing();
        let mut canary = current.canary.clone().ok_or(SwapError::NoCanary)?;
        canary.percent = percent.min(100);
        self.inner.current.store(Arc::new(Routing {
            stable: current.stable.clone(),
            canary: Some(canary),
            shadow: None,
        }));
        Ok(())
    }

    /// The candidate becomes the stable version for all traffic.
    pub fn promote_canary(&self) -> Result<Arc<Snapshot>, SwapError> {
        let current = self.routing();
        let canary = current.canary.clone().ok_or(SwapError::NoCanary)?;
        self.inner.current.store(Arc::new(Routing {
            stable: canary.candidate.clone(),
            canary: None,
            shadow: None,
        }));
        self.reconcile();
        Ok(canary.candidate)
    }

    /// Candidate traffic goes to zero at once; the stable version serves everything, and
    /// requests still waiting on the candidate for a response head are rescued (replayable
    /// ones go to the stable version, the others are answered at once).
    pub fn abort_canary(&self) {
        let current = self.routing();
        if let Some(canary) = &current.canary {
            self.inner.current.store(Arc::new(Routing {
                stable: current.stable.clone(),
                canary: None,
                shadow: None,
            }));
            // After the store: a rescued request must find the stable version in place.
            canary.candidate.retired.cancel();
            self.reconcile();
        }
    }

    /// Applies probe results taken outside the checkers (preflight) for a candidate `config`.
    /// A failed probe marks the backend down at once, if a checker will watch it (the running
    /// version or the candidate checks it) and so can bring it back; a backend no pool checks is
    /// left to passive detection and hedging, since nothing would ever lift its verdict. A passed
    /// probe makes a backend up only where no checker has a verdict of its own (one never seen
    /// before, or one no pool checks), so a backend a checker holds down still needs its
    /// `healthy` streak to come back.
    pub fn apply_probes(&self, probed: &[Probed], config: &ValidConfig) {
        let checked = self.inner.checkers.checked();
        let will_check = |addr: &SocketAddr| {
            checked.contains(addr)
                || config
                    .pools
                    .iter()
                    .any(|p| p.health.is_some() && p.backends.iter().any(|b| b.addr == *addr))
        };
        for p in probed {
            let (backend, _) = self.inner.registry.get_or_insert(p.addr);
            let current = backend.active();
            if !p.passed {
                if will_check(&p.addr) {
                    crate::health::transition(&backend, Active::Down, Some(&p.detail), &self.inner.metrics);
                }
            } else if current == Active::Unknown || !checked.contains(&p.addr) {
                crate::health::transition(&backend, Active::Up, None, &self.inner.metrics);
            }
        }
    }

    /// Waits until every actively checked backend of the running version has its first verdict
    /// (at most the longest check timeout, plus a little): the checkers probe at once when they
    /// start, and a cold start that waits for them routes no request to a backend that would
    /// fail its first check. Backends of pools without a check stay usable (unknown) and are
    /// not waited for.
    pub async fn first_verdicts(&self) {
        let snapshot = self.snapshot();
        let pools = snapshot
            .pools
            .iter()
            .map(|p| (&snapshot.config.pools[p.index], p.backends.as_slice()));
        let wanted = desired_checks(pools);
        let longest = wanted.values().map(|(c, _)| c.timeout).max().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + longest + std::time::Duration::from_millis(250);
        let backends: Vec<Arc<BackendState>> = wanted.values().map(|(_, b)| b.clone()).collect();
        while tokio::time::Instant::now() < deadline {
            if backends.iter().all(|b| b.active() != Active::Unknown) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    fn reconcile(&self) {
        let routing = self.routing();
        let live: Vec<&Snapshot> = std::iter::once(&*routing.stable)
            .chain(routing.canary.as_ref().map(|c| &*c.candidate))
            .chain(routing.shadow.as_ref().map(|s| &*s.candidate))
            .collect();
        let pools = live.iter().flat_map(|s| {
            s.pools
                .iter()
                .map(move |p| (&s.config.pools[p.index], p.backends.as_slice()))
        });
        self.inner
            .checkers
            .reconcile(desired_checks(pools), &self.inner.cancel, &self.inner.metrics);
        let names: HashSet<SocketAddr> = live
            .iter()
            .flat_map(|s| s.pools.iter().flat_map(|p| p.backends.iter().map(|b| b.addr)))
            .collect();
        // Snapshots still held by in-flight requests keep their own Arcs; the registry only
        // stops handing out state for addresses no live config names.
        self.inner.registry.retain(|a| names.contains(a));
        let limited: HashSet<&str> = live
            .iter()
            .flat_map(|s| {
                s.config
                    .routes
                    .iter()
                    .filter(|r| r.rate_limit.is_some())
                    .map(|r| r.name.as_str())
            })
            .collect();
        self.inner.registry.limiters.retain(|route| limited.contains(route));
    }

    /// Every backend a live config names, with its state.
    pub fn backends(&self) -> Vec<Arc<BackendState>> {
        self.inner.registry.all()
    }

    pub fn backend(&self, addr: &SocketAddr) -> Option<Arc<BackendState>> {
        self.inner.registry.get(addr)
    }

    /// Addresses whose active health check is running.
    pub fn checked_backends(&self) -> Vec<SocketAddr> {
        self.inner.checkers.checked()
    }

    /// Recent requests (method, host, path), for impact previews.
    pub fn samples(&self) -> &Samples {
        &self.inner.samples
    }

    /// Request metrics (long-lived, keyed by labels).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Stops the health checkers (the handle itself stays usable for reads).
    /// The upgraded connections (WebSocket tunnels).
    pub fn tunnels(&self) -> &Tunnels {
        &self.inner.tunnels
    }

    pub fn shutdown(&self) {
        self.inner.cancel.cancel();
    }
}

fn check_swappable(running: &ValidConfig, next: &ValidConfig) -> Result<(), SwapError> {
    if running.listeners != next.listeners {
        return Err(SwapError::ListenersChanged {
            running: describe(&running.listeners),
            new: describe(&next.listeners),
        });
    }
    if running.access_log != next.access_log {
        return Err(SwapError::AccessLogChanged);
    }
    Ok(())
}

fn describe(listeners: &BTreeMap<String, Listener>) -> String {
    listeners
        .values()
        .map(|l| format!("{}={}", l.name, l.bind))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Backends that `next` adds to a pool with `slow_start` ramp up from now (a pool new as a whole
/// ramps all its backends alike, which changes no share).
fn ramp_new_backends(running: &Snapshot, next: &Snapshot) {
    for pool in &next.pools {
        if next.config.pools[pool.index].slow_start.is_none() {
            continue;
        }
        let before = running.pools.iter().find(|p| p.name == pool.name);
        for b in &pool.backends {
            if before.is_none_or(|p| !p.backends.iter().any(|x| x.addr == b.addr)) {
                b.start_ramp();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(health: &str) -> ValidConfig {
        let source = format!(
            "[listener.public]\nbind = \"127.0.0.1:1\"\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [\"127.0.0.1:9\", \"127.0.0.1:10\"]\n{health}\n"
        );
        safelb_config::check("t.toml", &source).into_result().expect("valid")
    }

    fn probed(addr: &str, passed: bool) -> Probed {
        Probed {
            addr: addr.parse().unwrap(),
            passed,
            detail: "test".into(),
        }
    }

    /// A failed preflight probe is a verdict only where a checker will watch the backend; a
    /// passed one brings up a backend that no checker holds a verdict for.
    #[tokio::test]
    async fn preflight_verdicts_stick_only_where_a_checker_can_lift_them() {
        let handle = ProxyHandle::new(config(""), 1);
        let unchecked = config("");
        handle.apply_probes(
            &[probed("127.0.0.1:9", false), probed("127.0.0.1:10", true)],
            &unchecked,
        );
        let state = |a: &str| handle.backend(&a.parse().unwrap()).unwrap().active();
        assert_eq!(
            state("127.0.0.1:9"),
            Active::Unknown,
            "nothing would ever bring it back"
        );
        assert_eq!(state("127.0.0.1:10"), Active::Up);
        let checked = config("health = { path = \"/healthz\", interval = \"1h\" }");
        handle.apply_probes(&[probed("127.0.0.1:9", false)], &checked);
        assert_eq!(
            state("127.0.0.1:9"),
            Active::Down,
            "its checker will decide when it is back"
        );
    }
}
