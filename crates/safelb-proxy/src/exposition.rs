//! The Prometheus text exposition (format 0.0.4) of the data plane's metrics.
//!
//! Written by hand rather than through a metrics crate: the hot path records into our own
//! pre-resolved atomics (see `metrics.rs`), and this module only reads them at scrape time.
//! Output passes `promtool check metrics` (a test runs it on a real scrape).

use std::fmt::Write as _;

use crate::clock::now_ms;
use crate::handle::ProxyHandle;
use crate::metrics::{CLASSES, DURATION_BUCKETS};
use crate::role::Role;

/// Writes families of the text format: HELP and TYPE once, then samples.
pub struct Exposition {
    out: String,
    /// A label every sample carries first (fleet mode: `instance`), already rendered.
    constant: Option<String>,
}

impl Default for Exposition {
    fn default() -> Self {
        Exposition {
            out: String::with_capacity(16 * 1024),
            constant: None,
        }
    }
}

impl Exposition {
    /// An exposition whose every sample carries `name="value"`.
    pub fn labelled(name: &str, value: &str) -> Exposition {
        Exposition {
            constant: Some(format!("{name}=\"{}\"", escape(value))),
            ..Exposition::default()
        }
    }

    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() || self.constant.is_some() {
            self.out.push('{');
            if let Some(c) = &self.constant {
                self.out.push_str(c);
            }
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 || self.constant.is_some() {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", number(value));
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// A per-listener family: name, type, help, and how to read it from a listener's counters.
type ListenerFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&crate::metrics::ListenerCounters) -> f64,
);

/// Appends every data-plane family to `e`.
pub fn render(handle: &ProxyHandle, e: &mut Exposition) {
    let m = handle.metrics();
    e.family(
        "safelb_tunnels_open",
        "gauge",
        "Upgraded connections (WebSocket tunnels) open now.",
    );
    e.sample("safelb_tunnels_open", &[], handle.tunnels().open() as f64);
    e.family(
        "safelb_requests_total",
        "counter",
        "Responses sent to clients by route, pool, backend (empty when safelb answered itself), status class and config version role.",
    );
    {
        let map = m.requests.read().expect("metrics lock");
        let mut keys: Vec<_> = map.keys().collect();
        keys.sort();
        for key in keys {
            let c = &map[key];
            for role in [Role::Stable, Role::Candidate] {
                for (i, class) in CLASSES.iter().enumerate() {
                    let n = c.get(role, i);
                    if n > 0 {
                        e.sample(
                            "safelb_requests_total",
                            &[
                                ("route", &key.0),
                                ("pool", &key.1),
                                ("backend", &key.2),
                                ("status_class", class),
                                ("role", role.as_str()),
                            ],
                            n as f64,
                        );
                    }
                }
            }
        }
    }
    e.family(
        "safelb_request_duration_seconds",
        "histogram",
        "Time from request head to the end of the response, by pool and role.",
    );
    {
        let map = m.durations.read().expect("metrics lock");
        let mut pools: Vec<_> = map.keys().collect();
        pools.sort();
        for pool in pools {
            for role in [Role::Stable, Role::Candidate] {
                let (buckets, count, sum) = map[pool][role as usize].read();
                if count == 0 {
                    continue;
                }
                let mut cumulative = 0;
                for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
                    cumulative += buckets[i];
                    let le = number(*bound);
                    e.sample(
                        "safelb_request_duration_seconds_bucket",
                        &[("pool", pool), ("role", role.as_str()), ("le", &le)],
                        cumulative as f64,
                    );
                }
                e.sample(
                    "safelb_request_duration_seconds_bucket",
                    &[("pool", pool), ("role", role.as_str()), ("le", "+Inf")],
                    count as f64,
                );
                e.sample(
                    "safelb_request_duration_seconds_sum",
                    &[("pool", pool), ("role", role.as_str())],
                    sum,
                );
                e.sample(
                    "safelb_request_duration_seconds_count",
                    &[("pool", pool), ("role", role.as_str())],
                    count as f64,
                );
            }
        }
    }
    e.family(
        "safelb_requests_in_flight",
        "gauge",
        "Requests whose response has not finished.",
    );
    e.sample(
        "safelb_requests_in_flight",
        &[],
        m.in_flight.load(std::sync::atomic::Ordering::Relaxed) as f64,
    );

    let listeners: Vec<(std::sync::Arc<str>, std::sync::Arc<crate::metrics::ListenerCounters>)> = m
        .listeners
        .read()
        .expect("metrics lock is never poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let families: [ListenerFamily; 2] = [
        (
            "safelb_connections_open",
            "gauge",
            "Client connections open, by listener (bounded by limits.max_connections).",
            |c| c.open.load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
        (
            "safelb_connections_refused_total",
            "counter",
            "Client connections answered 503 and closed because the listener was at limits.max_connections.",
            |c| c.refused.load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
    ];
    for (family, kind, help, value) in families {
        e.family(family, kind, help);
        for (name, c) in &listeners {
            e.sample(family, &[("listener", name)], value(c));
        }
    }

    e.family(
        "safelb_upstream_retries_total",
        "counter",
        "Requests sent to another backend after a connect failure, by pool.",
    );
    for (pool, n) in sorted(&m.retries.read().expect("metrics lock")) {
        e.sample(
            "safelb_upstream_retries_total",
            &[("pool", &pool)],
            n.load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
    }
    e.family(
        "safelb_route_actions_total",
        "counter",
        "Requests by route and what the route did with them (proxied, redirect, respond, rate_limited).",
    );
    for (route, counters) in sorted(&m.route_actions.read().expect("metrics lock")) {
        for (action, n) in counters.get() {
            e.sample(
                "safelb_route_actions_total",
                &[("route", &route), ("action", action)],
                n as f64,
            );
        }
    }
    e.family(
        "safelb_hedges_total",
        "counter",
        "Second attempts of replayable requests sent to another backend of the pool after the hedge delay, by outcome (won: answered first; lost: the first backend answered first or both failed; denied: over the hedge budget, not sent).",
    );
    for (pool, h) in m.hedging_counters() {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let (sent, won, denied) = (load(&h.hedges), load(&h.hedges_won), load(&h.hedges_denied));
        for (outcome, n) in [("won", won), ("lost", sent.saturating_sub(won)), ("denied", denied)] {
            e.sample(
                "safelb_hedges_total",
                &[("pool", &pool), ("outcome", outcome)],
                n as f64,
            );
        }
    }
    e.family(
        "safelb_canary_rescues_total",
        "counter",
        "Candidate requests the stable version answered, by why (hedge: no response head within the hedge delay; fallback: the candidate failed; rollback: waiting when the candidate was rolled back; refused: waiting at rollback but not replayable, answered 503).",
    );
    let c = m.canary.read();
    for (kind, n) in [
        ("hedge", c.hedges),
        ("fallback", c.fallbacks),
        ("rollback", c.rescued),
        ("refused", c.rescue_refused),
    ] {
        e.sample("safelb_canary_rescues_total", &[("kind", kind)], n as f64);
    }
    e.family(
        "safelb_shadow_requests_total",
        "counter",
        "Shadow-stage copies of stable requests sent through a candidate, by outcome (same: no worse than stable's answer; worse: failed, not found or much slower; dropped: over the stage's concurrency bound, not sent).",
    );
    for (outcome, n) in [
        ("same", &m.shadow.same),
        ("worse", &m.shadow.worse),
        ("dropped", &m.shadow.dropped),
    ] {
        e.sample(
            "safelb_shadow_requests_total",
            &[("outcome", outcome)],
            n.load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
    }
    let upstream = m.upstream.read().expect("metrics lock");
    let mut keys: Vec<_> = upstream.keys().collect();
    keys.sort();
    e.family(
        "safelb_upstream_connect_errors_total",
        "counter",
        "Failed or timed-out connects to a backend.",
    );
    for k in &keys {
        let n = upstream[*k].connect_errors.load(std::sync::atomic::Ordering::Relaxed);
        e.sample(
            "safelb_upstream_connect_errors_total",
            &[("pool", &k.0), ("backend", &k.1)],
            n as f64,
        );
    }
    e.family(
        "safelb_upstream_timeouts_total",
        "counter",
        "Requests whose backend sent no response head within response_timeout.",
    );
    for k in &keys {
        let n = upstream[*k].timeouts.load(std::sync::atomic::Ordering::Relaxed);
        e.sample(
            "safelb_upstream_timeouts_total",
            &[("pool", &k.0), ("backend", &k.1)],
            n as f64,
        );
    }
    drop(upstream);

    let routing = handle.routing();
    let now = now_ms();
    e.family(
        "safelb_backend_up",
        "gauge",
        "1 when a backend of the running version may receive requests (health check passed, not ejected, not drained).",
    );
    for p in &routing.stable.pools {
        for b in &p.backends {
            e.sample(
                "safelb_backend_up",
                &[("pool", &p.name), ("backend", &b.label)],
                if b.is_available(now) { 1.0 } else { 0.0 },
            );
        }
    }
    e.family(
        "safelb_backend_ejections_total",
        "counter",
        "Passive outlier ejections of a backend since start.",
    );
    for b in handle.backends() {
        e.sample(
            "safelb_backend_ejections_total",
            &[("backend", &b.label)],
            b.ejections_total.load(std::sync::atomic::Ordering::Relaxed) as f64,
        );
    }
    e.family(
        "safelb_pool_panic",
        "gauge",
        "1 while a pool of the running version is under its panic threshold.",
    );
    for p in &routing.stable.pools {
        e.sample(
            "safelb_pool_panic",
            &[("pool", &p.name)],
            if p.in_panic() { 1.0 } else { 0.0 },
        );
    }
    e.family(
        "safelb_config_version",
        "gauge",
        "The config version serving each role (candidate only during a rollout).",
    );
    e.sample(
        "safelb_config_version",
        &[("role", "stable")],
        routing.stable.version as f64,
    );
    if let Some(c) = &routing.canary {
        e.sample(
            "safelb_config_version",
            &[("role", "candidate")],
            c.candidate.version as f64,
        );
    }
    e.family(
        "safelb_canary_percent",
        "gauge",
        "Percent of requests sent to the candidate version (0 without a rollout).",
    );
    e.sample(
        "safelb_canary_percent",
        &[],
        routing.canary.as_ref().map_or(0.0, |c| c.percent as f64),
    );
}

fn sorted<V>(map: &std::collections::HashMap<std::sync::Arc<str>, V>) -> Vec<(String, &V)> {
    let mut v: Vec<_> = map.iter().map(|(k, v)| (k.to_string(), v)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_escaped_and_numbers_plain() {
        let mut e = Exposition::default();
        e.family("x_total", "counter", "An example.");
        e.sample("x_total", &[("a", "q\"uo\\te\nnl")], 3.0);
        e.sample("x_total", &[], 0.25);
        assert_eq!(
            e.finish(),
            "# HELP x_total An example.\n# TYPE x_total counter\nx_total{a=\"q\\\"uo\\\\te\\nnl\"} 3\nx_total 0.25\n"
        );
    }
}
