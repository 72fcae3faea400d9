//! The validated, immutable configuration model.
//!
//! Values here are already checked: addresses are `SocketAddr`, durations `Duration`, names
//! resolve. A [`ValidConfig`] can only be obtained from [`crate::parse`], so holding one is proof
//! that every rule passed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::routing::RouteTable;

mod routes;

pub use routes::*;

/// A configuration that passed every check. Cheap to clone (shared inside).
#[derive(Clone, Debug)]
pub struct ValidConfig {
    inner: Arc<Config>,
}

impl ValidConfig {
    pub(crate) fn new(config: Config) -> Self {
        ValidConfig {
            inner: Arc::new(config),
        }
    }

    pub fn config(&self) -> &Config {
        &self.inner
    }
}

impl std::ops::Deref for ValidConfig {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.inner
    }
}

#[derive(Debug)]
pub struct Config {
    /// The source text it was built from (kept for history and diffs).
    pub source: String,
    pub listeners: BTreeMap<String, Listener>,
    pub admin: Option<Admin>,
    pub limits: Limits,
    pub access_log: AccessLog,
    pub routes: Vec<Route>,
    /// Pools in declaration order; `Route::pool` indexes into this.
    pub pools: Vec<Pool>,
    pub tests: Vec<RouteTest>,
    /// How changes to this config are rolled out (the *running* version's policy judges a candidate).
    pub rollout: Rollout,
    pub change_freezes: Vec<ChangeFreeze>,
    pub alerts: Vec<AlertRule>,
    pub notify: Vec<Notify>,
    /// The compiled route table, built once at validation.
    pub route_table: RouteTable,
}

impl Config {
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    /// TLS termination; `None` is plain HTTP (HTTP/1.1 and h2c).
    pub tls: Option<Vec<TlsCert>>,
}

impl ValidConfig {
    /// Puts the listeners named in `binds` on other addresses: one config for many instances
    /// on one machine (`serve --bind NAME=ADDR`). Names that are not listeners are ignored here;
    /// `serve` refuses them at start. For a config fresh from [`crate::check`] (not yet shared).
    pub fn bind_overrides(&mut self, binds: &[(String, SocketAddr)]) {
        if binds.is_empty() {
            return;
        }
        let config = Arc::get_mut(&mut self.inner).expect("a config fresh from check is not shared yet");
        for (name, addr) in binds {
            if let Some(l) = config.listeners.get_mut(name) {
                l.bind = *addr;
            }
        }
    }
}

/// One certificate of a TLS listener. The first one is the default for clients that send no
/// SNI or a name no certificate lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCert {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// SNI names this certificate answers (lower case); each must be covered by the certificate.
    pub names: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admin {
    pub bind: SocketAddr,
    /// One token (named `admin`, role `operate`).
    pub token_file: Option<PathBuf>,
    /// Named tokens with a role each, one `NAME ROLE SECRET` per line (read at start).
    pub tokens_file: Option<PathBuf>,
    /// The admin API over HTTPS.
    pub tls: Option<Vec<TlsCert>>,
    /// Allows a non-loopback bind without TLS (a network of its own protects it).
    pub insecure: bool,
}

/// Limits that protect the proxy from clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A request head must arrive completely within this time (slowloris): else 408 and close.
    pub header_timeout: Duration,
    /// An idle keep-alive client connection is closed after this time.
    pub keepalive_timeout: Duration,
    /// Largest request head accepted (request line + headers): else 431.
    pub max_header_bytes: usize,
    /// Largest request body accepted: else 413.
    pub max_body_bytes: u64,
    /// On SIGTERM, in-flight requests get this long to finish.
    pub drain_timeout: Duration,
    /// A request with an `Idempotency-Key` and a body up to this size is buffered so it can be
    /// sent twice (fallback, hedge, rescue); a larger one is streamed and never sent twice.
    pub replay_body_bytes: u64,
    /// Open client connections per listener; past it a new connection is answered 503 at once
    /// and closed, so a flood of connections cannot exhaust file descriptors or memory.
    pub max_connections: usize,
    /// An upgraded connection (WebSocket) with no byte either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
    /// A client that takes no byte of its response for this long is disconnected (a slow or
    /// stalled reader must not hold a connection and a backend forever).
    pub send_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            max_header_bytes: 32 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            drain_timeout: Duration::from_secs(30),
            replay_body_bytes: 64 * 1024,
            max_connections: 10_000,
            tunnel_idle_timeout: Duration::from_secs(300),
            send_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLog {
    pub enabled: bool,
    /// `None` writes to standard output.
    pub path: Option<PathBuf>,
}

impl Default for AccessLog {
    fn default() -> Self {
        AccessLog {
            enabled: true,
            path: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    Weighted,
    LeastRequest,
    P2cEwma,
    ConsistentHash,
}

impl Balance {
    pub const NAMES: [&'static str; 5] = [
        "round_robin",
        "weighted",
        "least_request",
        "p2c_ewma",
        "consistent_hash",
    ];

    pub fn from_name(name: &str) -> Option<Balance> {
        Some(match name {
            "round_robin" => Balance::RoundRobin,
            "weighted" => Balance::Weighted,
            "least_request" => Balance::LeastRequest,
            "p2c_ewma" => Balance::P2cEwma,
            "consistent_hash" => Balance::ConsistentHash,
            _ => return None,
        })
    }
}

/// What `consistent_hash` hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    ClientAddress,
    /// Lower-case header name.
    Header(String),
    Cookie(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanicPolicy {
    /// Route to every backend, healthy or not: some answers beat none.
    FailOpen,
    /// Answer 503: protect the few healthy backends from the whole load.
    FailClosed,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: SocketAddr,
    pub weight: u32,
}

/// How safelb speaks to a pool's backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 with a pool of keep-alive connections per backend.
    Http1,
    /// HTTP/2 (prior knowledge) with one multiplexed connection per backend; needed for gRPC.
    H2,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub protocol: Protocol,
    pub balance: Balance,
    pub hash_key: HashKey,
    pub backends: Vec<Backend>,
    pub min_healthy: usize,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub retry: Retry,
    /// Percent of backends that must be available; below it `panic_policy` applies. 0 = never.
    pub panic_threshold: u8,
    pub panic_policy: PanicPolicy,
    pub health: Option<HealthCheck>,
    pub outlier: Outlier,
    /// `None` is `hedge = false`.
    pub hedge: Option<Hedge>,
    /// A backend new to the pool, or back from ejection, failed checks or draining, ramps from
    /// a small share to its full one over this time. `None`: at once.
    pub slow_start: Option<Duration>,
    /// Requests in flight one backend may carry (circuit breaking); a full backend gets no new
    /// request, and a pool whose available backends are all full answers 503 at once. `None`:
    /// no limit.
    pub max_in_flight: Option<u32>,
}

/// When a replayable request still has no response head, also send it elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HedgeAfter {
    /// From the stable version's observed response-head latency of the pool: 3 x p99, at least
    /// 100 ms, at most the response timeout.
    Auto,
    Fixed(Duration),
}

/// `hedge = { after, budget }` of a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hedge {
    pub after: HedgeAfter,
    /// Hedges per thousand of the pool's requests (`budget = 0.1` is 100), plus a small burst.
    pub budget_permille: u32,
}

impl Default for Hedge {
    fn default() -> Self {
        Hedge {
            after: HedgeAfter::Auto,
            budget_permille: 100,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Extra attempts on another backend after a connect failure (idempotent requests only).
    pub attempts: u32,
    /// Retries allowed as a share of requests, per second, so a sick pool is not flooded.
    pub budget_percent: u32,
    /// Retries always allowed per second, whatever the request rate.
    pub min_per_second: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 1,
            budget_percent: 20,
            min_per_second: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HealthCheckKind {
    /// `GET path`, healthy on 2xx.
    Http { path: String },
    /// A TCP connect succeeds.
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that make a down backend healthy again.
    pub healthy: u32,
    /// Consecutive failures that make a healthy backend down.
    pub unhealthy: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outlier {
    /// Consecutive failures (connect error, timeout, 5xx) that eject a backend; 0 disables.
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this share of the pool is ejected at once.
    pub max_ejected_percent: u8,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

/// A `[[test]]`: a request and what the routing must do with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteTest {
    /// The listener the request arrives on; empty: routes with a `listener` condition do not
    /// match it.
    pub listener: String,
    /// `http` or `https`, from the request URL (a redirect keeps it unless it names one).
    pub scheme: String,
    pub method: String,
    pub host: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub expect: TestExpectation,
    /// The path (and query) the backend sees, after `rewrite`.
    pub expect_path: Option<String>,
    /// Header fields that must have these values: on the request the backend sees for a pool
    /// route, on the answer for a route that answers itself.
    pub expect_headers: Vec<(String, String)>,
}

impl RouteTest {
    /// The index of the route this test's request takes in `table`.
    pub fn route(&self, table: &RouteTable) -> Option<usize> {
        table.find(&crate::routing::RequestView {
            listener: &self.listener,
            method: &self.method,
            host: &self.host,
            path: &self.path,
            header: |name: &str| self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TestExpectation {
    Pool(String),
    Route(String),
    /// 404 (no route), or the status of a route that answers itself (`respond`, `redirect`).
    Status(u16),
    /// The `Location` of a redirect route.
    Redirect(String),
}

/// The change policy: how a candidate is tested and judged.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    /// Percent of requests on the candidate at each step, ascending, ending at 100.
    pub canary_steps: Vec<u8>,
    /// How long each step runs before it is judged.
    pub step_bake: Duration,
    /// Absolute ceiling of the candidate's error rate (0.0..1.0).
    pub max_error_rate: f64,
    /// Ceiling of candidate error rate / stable error rate.
    pub max_error_ratio: f64,
    /// Ceiling of the candidate's p99 latency, if set.
    pub max_p99: Option<Duration>,
    /// Requests the candidate must have served in a step before a verdict.
    pub min_requests: u64,
    /// Largest share (percent) of recent traffic a change may move to another pool or to 404
    /// without `--confirm`.
    pub max_traffic_shift: f64,
    /// Keep a client on the same side of the split (by client address).
    pub sticky: bool,
    /// Consecutive successful probes each candidate backend needs at preflight.
    pub preflight_probes: u32,
    pub preflight_timeout: Duration,
    /// A replayable candidate request with no response head after this long is also sent to
    /// the stable version (`None`: never).
    pub hedge_after: Option<HedgeAfter>,
    /// The shadow stage between preflight and canary (`None`: `shadow = false`).
    pub shadow: Option<ShadowPolicy>,
    /// Fleet mode: cumulative instance counts of the stages before the last, which takes the
    /// rest (`[1]`: one instance first, then all the others). Each instance of a stage runs the
    /// canary steps above.
    pub fleet_stages: Vec<u32>,
}

/// `[rollout] shadow = { duration, share, min_requests, concurrency }`: copies of live safe
/// requests (GET and HEAD without a body) go through the candidate too, their answers are
/// compared per route with stable's and discarded.
#[derive(Clone, Debug, PartialEq)]
pub struct ShadowPolicy {
    pub duration: Duration,
    /// Share of eligible stable requests copied (0..1).
    pub share: f64,
    /// Comparisons wanted; with less live traffic, recent traffic samples are replayed.
    pub min_requests: u64,
    /// Shadow requests in flight at most; more are dropped (and counted).
    pub concurrency: u32,
}

impl Default for ShadowPolicy {
    fn default() -> Self {
        ShadowPolicy {
            duration: Duration::from_secs(3),
            share: 0.25,
            min_requests: 20,
            concurrency: 16,
        }
    }
}

impl Default for Rollout {
    fn default() -> Self {
        Rollout {
            canary_steps: vec![5, 25, 100],
            step_bake: Duration::from_secs(10),
            max_error_rate: 0.02,
            max_error_ratio: 2.0,
            max_p99: None,
            min_requests: 20,
            max_traffic_shift: 50.0,
            sticky: false,
            preflight_probes: 3,
            preflight_timeout: Duration::from_secs(1),
            hedge_after: Some(HedgeAfter::Auto),
            shadow: Some(ShadowPolicy::default()),
            fleet_stages: vec![1],
        }
    }
}

/// A window during which changes are refused unless marked as an emergency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeFreeze {
    pub reason: String,
    /// Seconds since the Unix epoch (UTC).
    pub start: i64,
    pub end: i64,
}

impl ChangeFreeze {
    pub fn covers(&self, unix_secs: i64) -> bool {
        self.start <= unix_secs && unix_secs < self.end
    }
}

/// An `[[alert]]`: a condition on live traffic, evaluated every second.
#[derive(Clone, Debug, PartialEq)]
pub struct AlertRule {
    pub name: String,
    pub kind: AlertKind,
    /// Restricts the traffic looked at (error_rate, latency_p99, burn_rate) or the pools
    /// (no_healthy_backends).
    pub route: Option<String>,
    pub pool: Option<String>,
    /// Evaluation window of error_rate and latency_p99.
    pub window: Duration,
    /// How long the condition must hold before the alert fires (pending until then).
    pub for_: Duration,
    pub severity: String,
    pub labels: Vec<(String, String)>,
    /// Fewer requests in the window than this give no error_rate or latency verdict.
    pub min_requests: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AlertKind {
    /// Share of 5xx responses above `threshold` (0..1).
    ErrorRate { threshold: f64 },
    /// A pool of the running version has no backend that may take requests.
    NoHealthyBackends,
    /// The p99 request duration above `threshold`.
    LatencyP99 { threshold: Duration },
    /// Multi-window, multi-burn-rate alert against an availability SLO (the SRE workbook's
    /// 14.4x over 1h and 5m, 6x over 6h and 30m).
    BurnRate { slo: f64 },
    /// A rollout was rolled back within the last `hold`.
    Rollback { hold: Duration },
}

impl AlertKind {
    pub const NAMES: [&'static str; 5] = [
        "error_rate",
        "no_healthy_backends",
        "latency_p99",
        "burn_rate",
        "rollback",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            AlertKind::ErrorRate { .. } => "error_rate",
            AlertKind::NoHealthyBackends => "no_healthy_backends",
            AlertKind::LatencyP99 { .. } => "latency_p99",
            AlertKind::BurnRate { .. } => "burn_rate",
            AlertKind::Rollback { .. } => "rollback",
        }
    }
}

/// A `[[notify]]` target for alert notifications.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notify {
    pub kind: NotifyKind,
    /// `http://host:port[/path]`.
    pub url: String,
    pub timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotifyKind {
    /// Alertmanager's v2 API: `POST {url}/api/v2/alerts`.
    Alertmanager,
    /// A JSON body per notification, `POST {url}`.
    Webhook,
}
