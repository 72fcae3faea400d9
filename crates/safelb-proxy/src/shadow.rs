//! The shadow stage: before a candidate serves a single client, copies of live safe requests
//! (GET and HEAD without a body) that the stable version serves also go through the candidate's
//! routing to the candidate's backends, marked `X-Safelb-Shadow: 1`. Their answers are read,
//! discarded and compared per route with what the stable version answered for the same request.
//!
//! Shadow work never touches a client's response: the copy is sent from a task of its own after
//! the stable response head exists, and it is bounded (a share of requests, a number in flight;
//! requests over the bound are dropped and counted). It never counts in client metrics, the
//! access log or a backend's outlier state. With too little live traffic the control plane
//! replays recent traffic samples through both versions ([`Shadow::replay`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Request};
use http_body_util::BodyExt;
use safelb_config::{Protocol, ShadowPolicy};
use serde::{Deserialize, Serialize};

use crate::h1;
use crate::snapshot::Snapshot;
use crate::upstream;

/// The header that marks a shadow copy, so backends (and their logs) can tell it apart.
pub const SHADOW_HEADER: &str = "x-safelb-shadow";

/// A candidate answer slower than this multiple of stable's (and [`SLOW_MARGIN`] more) is slow.
const SLOW_FACTOR: u32 = 10;
const SLOW_MARGIN: Duration = Duration::from_secs(1);
/// How long a replayed sample waits for stable's answer (the pool's response timeout if shorter).
const STABLE_REPLAY_LIMIT: Duration = Duration::from_secs(5);
/// Shadow response bodies are read up to this much, then the connection is dropped.
const MAX_BODY: usize = 1 << 20;

/// One shadow stage in progress: the candidate and what its copies found.
pub struct Shadow {
    pub candidate: Arc<Snapshot>,
    share_permille: u32,
    max_in_flight: u32,
    in_flight: AtomicU32,
    dropped: AtomicU64,
    routes: Mutex<BTreeMap<String, RouteShadow>>,
}

/// What one route's shadow copies found, against stable's answers to the same requests.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RouteShadow {
    pub compared: u64,
    /// A 5xx, an error or no answer from the candidate where stable answered below 500.
    pub failed: u64,
    /// A 404 (no route) from the candidate where stable found a route.
    pub not_found: u64,
    /// Answered, but much slower than stable (see `SLOW_FACTOR`).
    pub slow: u64,
    /// A redirect or fixed answer, from a new route no route test exercises, where stable
    /// answered 2xx.
    pub answered: u64,
    /// (stable status, candidate status) pairs that differ in class, with counts; 0 is "no answer".
    pub mismatches: BTreeMap<String, u64>,
}

impl RouteShadow {
    pub fn bad(&self) -> u64 {
        self.failed + self.not_found + self.slow + self.answered
    }
}

/// Everything the stage found, for the verdict and the events.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShadowReport {
    pub routes: BTreeMap<String, RouteShadow>,
    pub compared: u64,
    /// Copies not sent because the stage was at its concurrency bound.
    pub dropped: u64,
    pub in_flight: u32,
}

/// How the candidate answered a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Status(u16),
    /// The route answered itself (redirect, fixed answer); `suspect` as in
    /// `RouteActions::suspect`.
    Answered {
        status: u16,
        suspect: bool,
    },
    /// No route in the candidate (answered 404 to a client).
    NoRoute,
    /// Connect error, protocol error, no backend to send to, or no head within the bound.
    Failed,
}

impl Shadow {
    pub fn new(candidate: Arc<Snapshot>, policy: &ShadowPolicy) -> Shadow {
        Shadow {
            candidate,
            share_permille: (policy.share * 1000.0).round() as u32,
            max_in_flight: policy.concurrency,
            in_flight: AtomicU32::new(0),
            dropped: AtomicU64::new(0),
            routes: Mutex::new(BTreeMap::new()),
        }
    }

    /// Should this stable request be copied? Takes a slot when it should.
    pub(crate) fn sample(&self) -> bool {
        if fastrand::u32(..1000) >= self.share_permille {
            return false;
        }
        if self.in_flight.fetch_add(1, Relaxed) >= self.max_in_flight {
            self.in_flight.fetch_sub(1, Relaxed);
            self.dropped.fetch_add(1, Relaxed);
            self.candidate.metrics.shadow.dropped.fetch_add(1, Relaxed);
            return false;
        }
        true
    }

    pub fn report(&self) -> ShadowReport {
        let routes = self.routes.lock().expect("shadow lock is never poisoned").clone();
        ShadowReport {
            compared: routes.values().map(|r| r.compared).sum(),
            routes,
            dropped: self.dropped.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
        }
    }

    /// Sends the copy of a request the stable version answered with `stable_status` after
    /// `stable_latency`, and records the comparison. Holds the slot `sample` took.
    pub(crate) async fn compare_live(
        self: Arc<Self>,
        stable: Arc<Snapshot>,
        parts: http::request::Parts,
        listener: Arc<str>,
        client: SocketAddr,
        stable_status: u16,
        stable_latency: Duration,
    ) {
        let _slot = Slot(&self.in_flight);
        let stable_route = route_name(&stable, &listener, &parts);
        let (outcome, latency) = exchange(&self.candidate, &listener, &parts, client, bound(stable_latency)).await;
        self.record(
            stable_route,
            Outcome::Status(stable_status),
            stable_latency,
            outcome,
            latency,
        );
    }

    /// Replays recent requests (method, host, path; GET and HEAD only) through both versions,
    /// at most `limit` of them and `concurrency` at a time: for a stage whose live traffic is
    /// too thin to judge. Both sides are shadow copies (safe methods only).
    pub async fn replay(self: &Arc<Self>, stable: Arc<Snapshot>, samples: Vec<crate::samples::Sample>, limit: usize) {
        let mut tasks = tokio::task::JoinSet::new();
        let client: SocketAddr = ([127, 0, 0, 1], 0).into();
        for s in samples
            .into_iter()
            .filter(|s| s.method == "GET" || s.method == "HEAD")
            .take(limit)
        {
            while tasks.len() >= self.max_in_flight as usize {
                tasks.join_next().await;
            }
            let Ok(mut request) = Request::builder()
                .method(s.method.as_str())
                .uri(s.path.as_str())
                .header(http::header::HOST, s.host.as_str())
                .body(())
            else {
                continue;
            };
            request.headers_mut().insert(
                crate::headers::X_REQUEST_ID.clone(),
                HeaderValue::from_static("shadow-replay"),
            );
            let parts = request.into_parts().0;
            let listener = s.listener;
            let (shadow, stable) = (self.clone(), stable.clone());
            self.in_flight.fetch_add(1, Relaxed);
            tasks.spawn(async move {
                let _slot = Slot(&shadow.in_flight);
                let stable_route = route_name(&stable, &listener, &parts);
                let (stable_outcome, stable_latency) =
                    exchange(&stable, &listener, &parts, client, STABLE_REPLAY_LIMIT).await;
                if stable_outcome == Outcome::Failed {
                    // Nothing to compare against.
                    return;
                }
                let (outcome, latency) =
                    exchange(&shadow.candidate, &listener, &parts, client, bound(stable_latency)).await;
                shadow.record(stable_route, stable_outcome, stable_latency, outcome, latency);
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    fn record(
        &self,
        stable_route: Option<String>,
        stable: Outcome,
        stable_latency: Duration,
        candidate: Outcome,
        latency: Duration,
    ) {
        let code = |o: Outcome| match o {
            Outcome::Status(s) | Outcome::Answered { status: s, .. } => s,
            Outcome::NoRoute => 404,
            Outcome::Failed => 0,
        };
        let (s, c) = (code(stable), code(candidate));
        let stable_ok = (1..500).contains(&s);
        let mut routes = self.routes.lock().expect("shadow lock is never poisoned");
        let r = routes
            .entry(stable_route.clone().unwrap_or_else(|| "(no route)".into()))
            .or_default();
        r.compared += 1;
        let bad = r.bad();
        if let Outcome::Answered { suspect, .. } = candidate {
            // A route answering itself where stable answered 2xx: new and untested, it is an
            // accident until a route test says otherwise.
            if suspect && s / 100 == 2 && c / 100 != 2 {
                r.answered += 1;
            }
        } else if stable_ok && (c == 0 || c >= 500) {
            r.failed += 1;
        } else if candidate == Outcome::NoRoute && stable_route.is_some() && s != 404 {
            r.not_found += 1;
        } else if c != 0 && latency > bound(stable_latency) {
            r.slow += 1;
        }
        let totals = &self.candidate.metrics.shadow;
        if r.bad() > bad {
            totals.worse.fetch_add(1, Relaxed);
        } else {
            totals.same.fetch_add(1, Relaxed);
        }
        if s / 100 != c / 100 {
            *r.mismatches
                .entry(format!(
                    "stable {s} / candidate {}",
                    if c == 0 { "no answer".to_string() } else { c.to_string() }
                ))
                .or_default() += 1;
        }
    }
}

/// How long a candidate copy may take before it counts as slow (and is given up).
fn bound(stable_latency: Duration) -> Duration {
    (stable_latency * SLOW_FACTOR).max(stable_latency + SLOW_MARGIN)
}

/// Gives back a shadow slot when the copy is done (or dropped).
struct Slot<'a>(&'a AtomicU32);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn route_name(snapshot: &Snapshot, listener: &str, parts: &http::request::Parts) -> Option<String> {
    snapshot
        .find_route(listener, &parts.method, &parts.uri, &parts.headers)
        .map(|r| snapshot.route_names[r].to_string())
}

/// One shadow exchange through `snapshot`: route, pick, connect, send, read the body to the end
/// (bounded) and drop it. No retry, no outlier accounting, no client metrics.
async fn exchange(
    snapshot: &Snapshot,
    listener: &str,
    parts: &http::request::Parts,
    client: SocketAddr,
    limit: Duration,
) -> (Outcome, Duration) {
    let started = Instant::now();
    let Some(route) = snapshot.find_route(listener, &parts.method, &parts.uri, &parts.headers) else {
        return (Outcome::NoRoute, started.elapsed());
    };
    let actions = &snapshot.actions[route];
    let pool = match &snapshot.config.routes[route].action {
        safelb_config::Action::Pool(p) => &snapshot.pools[*p],
        // Answered without a backend: what the client would get, at once.
        safelb_config::Action::Redirect(_) => {
            let status = actions.redirect_status().as_u16();
            let suspect = actions.suspect.load(Relaxed);
            return (Outcome::Answered { status, suspect }, started.elapsed());
        }
        safelb_config::Action::Respond(r) => {
            let suspect = actions.suspect.load(Relaxed);
            return (
                Outcome::Answered {
                    status: r.status,
                    suspect,
                },
                started.elapsed(),
            );
        }
    };
    let config = snapshot.pool_config(pool);
    if config.protocol != Protocol::Http1 {
        // h2 pools are not shadowed yet; a copy that cannot be sent proves nothing either way.
        return (Outcome::Status(200), started.elapsed());
    }
    let hash = if pool.balancer.needs_hash() {
        snapshot.request_hash(pool, &parts.headers, client)
    } else {
        0
    };
    let Ok(idx) = pool.select(hash, &[], crate::clock::ms_at(started)) else {
        return (Outcome::Failed, started.elapsed());
    };
    let conns = &pool.conns[idx];
    let mut headers = parts.headers.clone();
    headers.insert(SHADOW_HEADER, HeaderValue::from_static("1"));
    let head = h1::encode_head(&parts.method, &parts.uri, &headers);
    let method: Method = parts.method.clone();
    let attempt = async {
        let (mut sender, _) = conns
            .checkout(
                config.connect_timeout,
                Protocol::Http1,
                true,
                crate::clock::ms_at(started),
            )
            .await
            .ok()?;
        let response = sender.send_head(&head, &method).await.ok()?;
        Some((response, started.elapsed()))
    };
    let limit = limit.min(config.response_timeout);
    let Ok(Some((response, latency))) = tokio::time::timeout(limit, attempt).await else {
        return (Outcome::Failed, started.elapsed());
    };
    let status = response.status().as_u16();
    // Read and discard; a body read to its end puts the connection back in the pool.
    let upstream::UpstreamBody::Inline(mut body) = response.into_body() else {
        return (Outcome::Status(status), latency);
    };
    let mut read = 0usize;
    let drain = async {
        while let Some(Ok(frame)) = body.frame().await {
            read += frame.data_ref().map_or(0, |d| d.len());
            if read > MAX_BODY {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    (Outcome::Status(status), latency)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shadow() -> Shadow {
        let source = "[listener.public]\nbind = \"127.0.0.1:1\"\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [\"127.0.0.1:9\"]\n";
        let config = safelb_config::check("t.toml", source).into_result().expect("valid");
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let candidate = Arc::new(Snapshot::build(
            config,
            2,
            &crate::registry::Registry::default(),
            &metrics,
        ));
        Shadow::new(candidate, &ShadowPolicy::default())
    }

    #[test]
    fn copies_are_judged_against_what_stable_answered() {
        let s = shadow();
        let ms = Duration::from_millis;
        let route = || Some("r".to_string());
        s.record(route(), Outcome::Status(200), ms(2), Outcome::Status(200), ms(3));
        // A 5xx or no answer where stable was fine.
        s.record(route(), Outcome::Status(200), ms(2), Outcome::Status(503), ms(3));
        s.record(route(), Outcome::Status(404), ms(2), Outcome::Failed, ms(3));
        // Both failing is not the candidate's doing.
        s.record(route(), Outcome::Status(502), ms(2), Outcome::Status(502), ms(3));
        // No route where stable had one.
        s.record(route(), Outcome::Status(200), ms(2), Outcome::NoRoute, ms(3));
        // Much slower: over 10 x stable and 1 s more.
        s.record(route(), Outcome::Status(200), ms(2), Outcome::Status(200), ms(1_500));
        s.record(route(), Outcome::Status(200), ms(2), Outcome::Status(200), ms(900));
        let report = s.report();
        let r = &report.routes["r"];
        assert_eq!((r.compared, r.failed, r.not_found, r.slow), (7, 2, 1, 1));
        assert_eq!(r.mismatches["stable 200 / candidate 503"], 1);
        assert_eq!(r.mismatches["stable 404 / candidate no answer"], 1);
        let m = &s.candidate.metrics.shadow;
        assert_eq!((m.same.load(Relaxed), m.worse.load(Relaxed)), (3, 4));
    }

    #[test]
    fn sampling_stops_at_the_concurrency_bound_and_counts_what_it_drops() {
        let candidate = shadow().candidate;
        let policy = ShadowPolicy {
            share: 1.0,
            concurrency: 2,
            ..ShadowPolicy::default()
        };
        let s = Shadow::new(candidate, &policy);
        let taken = (0..5).filter(|_| s.sample()).count();
        assert_eq!(taken, 2);
        assert_eq!(s.report().dropped, 3);
        assert_eq!(s.report().in_flight, 2);
    }
}
