//! The live feed the dashboard reads: every recorded event as it happens, and once a second a
//! stats [`Frame`] (what each route and backend served in that second). The last 15 minutes of
//! frames are kept in memory, so a page that opens can draw its charts at once; no database is
//! needed to look back that far.
//!
//! Sending never waits: a subscriber that falls behind loses messages (it is told how many) and
//! the control plane goes on.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use safelb_proxy::metrics::p99_seconds;
use safelb_proxy::ProxyHandle;
use serde::Serialize;
use tokio::sync::broadcast;

/// Frames kept: 15 minutes at one a second.
pub const KEEP: usize = 15 * 60;
/// Of those, the newest keep their per-route, per-pool and per-backend detail (for sparklines);
/// older ones keep only the totals, so a config with many backends does not hold 15 minutes of
/// each in memory.
pub const DETAILED: usize = 2 * 60;
/// Messages a slow subscriber may lag behind before it loses some.
const QUEUE: usize = 1024;

/// One message of the feed.
#[derive(Clone, Debug)]
pub enum Live {
    /// A recorded event, as stored (`kind`, `message`, `version`, `time_ms`, `data`).
    Event(Arc<serde_json::Value>),
    Stats(Arc<Frame>),
}

/// What the data plane served in one second.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Frame {
    pub time_ms: i64,
    /// The version serving stable traffic.
    pub version: u64,
    pub requests: u64,
    /// Answers with a 5xx status.
    pub errors: u64,
    /// p99 of response time over the second, in milliseconds (none without requests).
    pub p99_ms: Option<f64>,
    pub routes: Vec<RouteFrame>,
    /// p99 of response time per pool over the second (latency is kept per pool).
    pub pools: Vec<PoolFrame>,
    pub backends: Vec<BackendFrame>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PoolFrame {
    pub pool: String,
    pub p99_ms: Option<f64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct RouteFrame {
    pub route: String,
    pub requests: u64,
    pub errors: u64,
    /// By action: proxied, redirect, respond, rate_limited.
    pub actions: BTreeMap<&'static str, u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct BackendFrame {
    pub pool: String,
    pub addr: String,
    /// `Available`, `FailedHealthCheck` or `Ejected { .. }`, as `safelb status` shows it.
    pub state: String,
    pub draining: bool,
    pub slow_start_percent: Option<u8>,
    /// How long an ejected backend stays out.
    pub ejected_for_ms: Option<u64>,
    pub in_flight: u32,
    pub requests: u64,
    pub errors: u64,
}

pub struct LiveFeed {
    tx: broadcast::Sender<Live>,
    frames: Mutex<VecDeque<Arc<Frame>>>,
}

impl Default for LiveFeed {
    fn default() -> Self {
        LiveFeed {
            tx: broadcast::channel(QUEUE).0,
            frames: Mutex::new(VecDeque::with_capacity(KEEP)),
        }
    }
}

impl LiveFeed {
    pub fn subscribe(&self) -> broadcast::Receiver<Live> {
        self.tx.subscribe()
    }

    pub fn event(&self, row: serde_json::Value) {
        let _ = self.tx.send(Live::Event(Arc::new(row)));
    }

    pub fn frame(&self, frame: Frame) {
        let frame = Arc::new(frame);
        {
            let mut frames = self.frames.lock().expect("frames lock is never poisoned");
            if frames.len() >= KEEP {
                frames.pop_front();
            }
            frames.push_back(frame.clone());
            if frames.len() > DETAILED {
                let i = frames.len() - 1 - DETAILED;
                if !frames[i].backends.is_empty() || !frames[i].routes.is_empty() {
                    let old = &frames[i];
                    frames[i] = Arc::new(Frame {
                        time_ms: old.time_ms,
                        version: old.version,
                        requests: old.requests,
                        errors: old.errors,
                        p99_ms: old.p99_ms,
                        ..Frame::default()
                    });
                }
            }
        }
        let _ = self.tx.send(Live::Stats(frame));
    }

    /// The frames kept, oldest first.
    pub fn history(&self) -> Vec<Arc<Frame>> {
        self.frames
            .lock()
            .expect("frames lock is never poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

/// Cumulative counters at one tick, to turn the next tick's into one second's worth.
#[derive(Default)]
pub struct Counters {
    routes: BTreeMap<String, (u64, u64, [u64; 4])>,
    backends: BTreeMap<(String, String), (u64, u64)>,
    latency: Vec<u64>,
    pool_latency: BTreeMap<String, Vec<u64>>,
}

/// `now - before`, bucket by bucket (`before` may be shorter: a new series).
fn delta(now: &[u64], before: &[u64]) -> Vec<u64> {
    now.iter()
        .zip(before.iter().chain(std::iter::repeat(&0)))
        .map(|(n, b)| n.saturating_sub(*b))
        .collect()
}

impl Counters {
    /// The frame since the previous call (the first one counts from zero).
    pub fn frame(&mut self, handle: &ProxyHandle, time_ms: i64) -> Frame {
        let metrics = handle.metrics();
        let mut routes: BTreeMap<String, (u64, u64, [u64; 4])> = BTreeMap::new();
        let mut backends: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        for ((route, pool, backend), c) in metrics.request_counters() {
            let (all, errors) = c.totals();
            let r = routes.entry(route.to_string()).or_default();
            r.0 += all;
            r.1 += errors;
            if !backend.is_empty() {
                let b = backends.entry((pool.to_string(), backend.to_string())).or_default();
                b.0 += all;
                b.1 += errors;
            }
        }
        for (route, counters) in metrics.route_actions_counters() {
            let r = routes.entry(route.to_string()).or_default();
            for (slot, (_, n)) in r.2.iter_mut().zip(counters.get()) {
                *slot = n;
            }
        }
        let latency = metrics.latency(None);
        let stable = handle.snapshot();
        let now_ms = safelb_proxy::clock::now_ms();
        let mut frame = Frame {
            time_ms,
            version: stable.version,
            p99_ms: p99_seconds(&delta(&latency, &self.latency)).map(|s| s * 1000.0),
            ..Frame::default()
        };
        for (route, (all, errors, actions)) in &routes {
            let (a0, e0, act0) = self.routes.get(route).cloned().unwrap_or_default();
            let (requests, errors) = (all.saturating_sub(a0), errors.saturating_sub(e0));
            frame.requests += requests;
            frame.errors += errors;
            if route.is_empty() {
                continue;
            }
            let names = ["proxied", "redirect", "respond", "rate_limited"];
            frame.routes.push(RouteFrame {
                route: route.clone(),
                requests,
                errors,
                actions: names
                    .iter()
                    .zip(actions.iter().zip(act0))
                    .map(|(name, (now, before))| (*name, now.saturating_sub(before)))
                    .collect(),
            });
        }
        let mut pool_latency = BTreeMap::new();
        for pool in &stable.pools {
            let now = metrics.latency(Some(&pool.name));
            let before = self.pool_latency.get(&*pool.name).cloned().unwrap_or_default();
            frame.pools.push(PoolFrame {
                pool: pool.name.to_string(),
                p99_ms: p99_seconds(&delta(&now, &before)).map(|s| s * 1000.0),
            });
            pool_latency.insert(pool.name.to_string(), now);
        }
        for pool in &stable.pools {
            let slow_start = stable.config.pools[pool.index].slow_start;
            for b in &pool.backends {
                let key = (pool.name.to_string(), b.label.to_string());
                let (all, errors) = backends.get(&key).copied().unwrap_or_default();
                let (a0, e0) = self.backends.get(&key).copied().unwrap_or_default();
                frame.backends.push(BackendFrame {
                    pool: key.0.clone(),
                    addr: key.1.clone(),
                    state: format!("{:?}", b.availability()),
                    draining: b.is_draining(),
                    slow_start_percent: b.slow_start_percent(now_ms, slow_start),
                    ejected_for_ms: b.ejected_for_ms(),
                    in_flight: b.in_flight(),
                    requests: all.saturating_sub(a0),
                    errors: errors.saturating_sub(e0),
                });
            }
        }
        self.routes = routes;
        self.backends = backends;
        self.latency = latency;
        self.pool_latency = pool_latency;
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{config, RUNNING};
    use safelb_proxy::Role;

    #[tokio::test]
    async fn a_frame_counts_one_seconds_worth_per_route_and_backend() {
        let handle = ProxyHandle::new(config(RUNNING), 1);
        let counters = handle
            .metrics()
            .requests(&Arc::from("r"), &Arc::from("p"), &Arc::from("127.0.0.1:9"));
        let mut c = Counters::default();
        for _ in 0..7 {
            counters.inc(200, Role::Stable);
        }
        counters.inc(502, Role::Stable);
        let first = c.frame(&handle, 1_000);
        assert_eq!((first.requests, first.errors), (8, 1));
        assert_eq!(first.routes.len(), 1);
        assert_eq!((first.routes[0].requests, first.routes[0].errors), (8, 1));
        assert_eq!(first.backends.len(), 1);
        assert_eq!(first.backends[0].requests, 8);
        counters.inc(200, Role::Stable);
        let second = c.frame(&handle, 2_000);
        assert_eq!(
            (second.requests, second.errors),
            (1, 0),
            "only the new second's requests"
        );

        let feed = LiveFeed::default();
        let mut rx = feed.subscribe();
        let sent = KEEP.max(QUEUE) + 5;
        for i in 0..sent {
            feed.frame(Frame {
                time_ms: i as i64,
                requests: 1,
                backends: vec![BackendFrame::default()],
                ..Frame::default()
            });
        }
        let kept = feed.history();
        assert_eq!(kept.len(), KEEP, "15 minutes of frames, no more");
        assert_eq!(kept[0].time_ms, (sent - KEEP) as i64);
        let detailed = kept.iter().filter(|f| !f.backends.is_empty()).count();
        assert_eq!(detailed, DETAILED, "only the newest frames keep their detail");
        assert!(kept[KEEP - DETAILED..].iter().all(|f| !f.backends.is_empty()));
        assert!(kept.iter().all(|f| f.requests == 1), "every frame keeps its totals");
        assert!(
            matches!(rx.try_recv(), Err(broadcast::error::TryRecvError::Lagged(_))),
            "a subscriber that fell behind is told, and nothing waited for it"
        );
    }
}
