//! Active health checks: one task per backend address, started and stopped as snapshots come
//! and go, writing its verdict into the backend's shared state.
//!
//! A backend never seen before takes its verdict from its first probe (one that does not answer
//! is out at once); after that `unhealthy` consecutive failures take it out and `healthy`
//! consecutive successes bring it back. The verdict belongs to the address, not to the checker:
//! a checker restarted by a config change (new interval, path, thresholds) or stopped (the pool
//! no longer checks) leaves it as it was, so a change that only touches a health check cannot
//! make a backend known to be down routable. Probes are spread with ±10% jitter so that many
//! backends checked at the same interval do not probe in lockstep.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use safelb_config::{HealthCheck, HealthCheckKind};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::backend::{Active, BackendState};
use crate::metrics::{DataPlaneEvent, Metrics};

/// The running checkers, keyed by address.
#[derive(Default)]
pub(crate) struct HealthCheckers {
    running: Mutex<HashMap<SocketAddr, (HealthCheck, CancellationToken)>>,
}

impl HealthCheckers {
    /// Makes the running checkers match `desired`: starts new ones, stops those no longer
    /// wanted, restarts those whose check changed. Must run inside a tokio runtime.
    pub fn reconcile(
        &self,
        desired: HashMap<SocketAddr, (HealthCheck, Arc<BackendState>)>,
        parent: &CancellationToken,
        metrics: &Arc<Metrics>,
    ) {
        let mut running = self.running.lock().expect("checker map lock is never poisoned");
        running.retain(|addr, (check, token)| {
            let keep = desired.get(addr).is_some_and(|(want, _)| want == check);
            if !keep {
                token.cancel();
            }
            keep
        });
        for (addr, (check, backend)) in desired {
            if running.contains_key(&addr) {
                continue;
            }
            let token = parent.child_token();
            tokio::spawn(run(backend, check.clone(), token.clone(), metrics.clone()));
            running.insert(addr, (check, token));
        }
    }

    /// Addresses with a running checker.
    pub fn checked(&self) -> Vec<SocketAddr> {
        self.running
            .lock()
            .expect("checker map lock is never poisoned")
            .keys()
            .copied()
            .collect()
    }
}

async fn run(backend: Arc<BackendState>, check: HealthCheck, cancel: CancellationToken, metrics: Arc<Metrics>) {
    let mut successes = 0u32;
    let mut failures = 0u32;
    loop {
        let outcome = tokio::select! {
            _ = cancel.cancelled() => break,
            r = probe(backend.addr, &check) => r,
        };
        let current = backend.active();
        match outcome {
            Ok(()) => {
                successes += 1;
                failures = 0;
                if current == Active::Unknown || (current == Active::Down && successes >= check.healthy) {
                    transition(&backend, Active::Up, None, &metrics);
                }
            }
            Err(why) => {
                failures += 1;
                successes = 0;
                if current == Active::Unknown || (current == Active::Up && failures >= check.unhealthy) {
                    transition(&backend, Active::Down, Some(&why), &metrics);
                }
            }
        }
        let pause = check.interval.mul_f64(0.9 + fastrand::f64() * 0.2);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    // The verdict stays: a restarted checker continues from it, and an address no pool checks
    // any more keeps what was last known (preflight's probes refresh it on the next change).
}

pub(crate) fn transition(backend: &BackendState, to: Active, why: Option<&str>, metrics: &Metrics) {
    let from = backend.set_active(to);
    if from == to {
        return;
    }
    if from == Active::Down && to == Active::Up {
        backend.start_ramp();
    }
    let label = backend.label.to_string();
    metrics.push_event(match to {
        Active::Down => DataPlaneEvent::BackendDown {
            backend: label,
            reason: why.unwrap_or("").to_string(),
        },
        _ => DataPlaneEvent::BackendUp { backend: label },
    });
    match to {
        Active::Down => {
            tracing::warn!(backend = %backend.addr, ?from, reason = why.unwrap_or(""), "backend failed its health check: no new requests")
        }
        _ => tracing::info!(backend = %backend.addr, ?from, "backend passed its health check"),
    }
}

/// Does the backend answer HTTP at all? `GET path` with any status below 500 passing. Used by
/// preflight for pools without a health check: a TCP connect alone would pass a backend that
/// accepts connections and never answers, the failure that started all this.
pub async fn probe_answers(addr: SocketAddr, path: &str, timeout: std::time::Duration) -> Result<(), String> {
    let exchange = async {
        let status = http_status(addr, path).await?;
        if status < 500 {
            Ok(())
        } else {
            Err(format!("status {status}"))
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

/// One probe: `Ok` when the backend is healthy. Also used by preflight checks.
pub async fn probe(addr: SocketAddr, check: &HealthCheck) -> Result<(), String> {
    match tokio::time::timeout(check.timeout, probe_inner(addr, &check.kind)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

async fn probe_inner(addr: SocketAddr, kind: &HealthCheckKind) -> Result<(), String> {
    let path = match kind {
        HealthCheckKind::Tcp => {
            return TcpStream::connect(addr)
                .await
                .map(|_| ())
                .map_err(|e| format!("connect: {e}"))
        }
        HealthCheckKind::Http { path } => path,
    };
    match http_status(addr, path).await? {
        s if (200..300).contains(&s) => Ok(()),
        s => Err(format!("status {s}")),
    }
}

/// The status of `GET path` on a fresh connection.
async fn http_status(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // Ends with the exchange: the backend closes (Connection: close), or hyper closes the
    // connection once the probe's timeout drops the sender and its pending response.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::USER_AGENT, "safelb-health-check")
        .header(http::header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let resp = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    Ok(resp.status().as_u16())
}

/// The checks wanted for a set of pools: each address gets the check of the first pool that
/// names it and has one (health belongs to the address, so one check per address).
pub(crate) fn desired_checks<'a>(
    pools: impl Iterator<Item = (&'a safelb_config::Pool, &'a [Arc<BackendState>])>,
) -> HashMap<SocketAddr, (HealthCheck, Arc<BackendState>)> {
    let mut out = HashMap::new();
    for (pool, backends) in pools {
        let Some(check) = &pool.health else { continue };
        for b in backends {
            out.entry(b.addr).or_insert_with(|| (check.clone(), b.clone()));
        }
    }
    out
}
