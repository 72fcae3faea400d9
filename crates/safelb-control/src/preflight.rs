//! Preflight: before a candidate serves a single request, every backend it names is probed
//! with its pool's health check, every pool must reach `min_healthy`, and the traffic it would
//! move is measured against `rollout.max_traffic_shift`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use safelb_config::{HealthCheck, Rollout, ValidConfig};
use safelb_proxy::health::{probe, probe_answers};
use safelb_proxy::samples::Sample;
use safelb_proxy::Probed;
use serde::Serialize;

use crate::impact::{preview, Impact};

#[derive(Clone, Debug, Serialize)]
pub struct PreflightReport {
    pub passed: bool,
    pub pools: Vec<PoolReport>,
    pub impact: Impact,
    /// Why it failed, one line each, with numbers.
    pub problems: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PoolReport {
    pub pool: String,
    pub min_healthy: usize,
    pub healthy: usize,
    pub backends: Vec<BackendReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendReport {
    pub addr: SocketAddr,
    pub healthy: bool,
    pub detail: String,
}

impl PreflightReport {
    /// Per pool, "n of m healthy": the truth even when the report passed with a backend down.
    pub fn summary(&self) -> String {
        self.pools
            .iter()
            .map(|p| format!("pool `{}` {} of {} healthy", p.pool, p.healthy, p.backends.len()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// (pool, healthy, total) for events.
    pub fn pool_counts(&self) -> Vec<(String, usize, usize)> {
        self.pools
            .iter()
            .map(|p| (p.pool.clone(), p.healthy, p.backends.len()))
            .collect()
    }

    /// Every probed backend's result, as verdicts for the data plane: preflight has just probed
    /// each one, so a backend never seen before starts from what preflight found.
    pub fn probed(&self) -> Vec<Probed> {
        let mut out: Vec<Probed> = Vec::new();
        for b in self.pools.iter().flat_map(|p| &p.backends) {
            if !out.iter().any(|p| p.addr == b.addr) {
                out.push(Probed {
                    addr: b.addr,
                    passed: b.healthy,
                    detail: format!("preflight: {}", b.detail),
                });
            }
        }
        out
    }
}

/// Runs every check; `confirm` accepts a traffic shift above the policy's limit.
pub async fn run(
    candidate: &ValidConfig,
    running: &ValidConfig,
    policy: &Rollout,
    samples: &[Sample],
    confirm: bool,
) -> PreflightReport {
    // One probe series per address, with the check of the first pool naming it; a pool without
    // a health check still has to answer HTTP (any status below 500) on `/`.
    let mut checks: BTreeMap<SocketAddr, Option<HealthCheck>> = BTreeMap::new();
    for pool in &candidate.pools {
        for b in &pool.backends {
            checks.entry(b.addr).or_insert_with(|| pool.health.clone());
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (addr, check) in checks {
        let timeout = policy.preflight_timeout;
        let probes = policy.preflight_probes;
        tasks.spawn(async move {
            let mut detail = format!("{probes} consecutive probes passed");
            let mut healthy = true;
            for i in 0..probes {
                let outcome = match &check {
                    Some(c) => {
                        probe(
                            addr,
                            &HealthCheck {
                                timeout: c.timeout.min(timeout),
                                ..c.clone()
                            },
                        )
                        .await
                    }
                    None => probe_answers(addr, "/", timeout).await,
                };
                if let Err(why) = outcome {
                    detail = format!("probe {} of {probes} failed: {why}", i + 1);
                    healthy = false;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            BackendReport { addr, healthy, detail }
        });
    }
    let mut results: HashMap<SocketAddr, BackendReport> = HashMap::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok(report) = r {
            results.insert(report.addr, report);
        }
    }

    let mut problems = Vec::new();
    let mut pools = Vec::new();
    for pool in &candidate.pools {
        let backends: Vec<BackendReport> = pool
            .backends
            .iter()
            .filter_map(|b| results.get(&b.addr).cloned())
            .collect();
        let healthy = backends.iter().filter(|b| b.healthy).count();
        if healthy < pool.min_healthy {
            let failing: Vec<String> = backends
                .iter()
                .filter(|b| !b.healthy)
                .map(|b| format!("{} ({})", b.addr, b.detail))
                .collect();
            problems.push(format!(
                "pool `{}`: {healthy} of {} backends healthy, min_healthy is {}; failing: {}",
                pool.name,
                backends.len(),
                pool.min_healthy,
                failing.join(", ")
            ));
        }
        pools.push(PoolReport {
            pool: pool.name.clone(),
            min_healthy: pool.min_healthy,
            healthy,
            backends,
        });
    }
    let impact = preview(samples, running, candidate);
    if impact.shift_percent > policy.max_traffic_shift && !confirm {
        problems.push(format!(
            "the change moves {:.1}% of recent traffic ({} of {} sampled requests; {} would get 404), above max_traffic_shift {:.1}%: re-run with --confirm if this is intended",
            impact.shift_percent, impact.moved, impact.samples, impact.newly_404, policy.max_traffic_shift
        ));
    }
    PreflightReport {
        passed: problems.is_empty(),
        pools,
        impact,
        problems,
    }
}
