//! [`ProxyHandle`]: the only door from the control plane into the data plane.
//!
//! It owns the one `ArcSwap<Snapshot>` that requests load, the backend registry that snapshots
//! attach to, and the health checkers. Installing a config builds a snapshot off the request
//! path and publishes it with a single atomic store; requests already running keep the
//! snapshot they started with.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use safelb_config::{Listener, ValidConfig};
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendState, Registry};
use crate::health::{desired_checks, HealthCheckers};
use crate::snapshot::Snapshot;

/// Why a config cannot replace the running one without a restart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwapError {
    #[error("listeners cannot change while running (running: {running}; new: {new}): restart safelb to change them")]
    ListenersChanged { running: String, new: String },
    #[error("[access_log] cannot change while running: restart safelb to change it")]
    AccessLogChanged,
}

#[derive(Clone)]
pub struct ProxyHandle {
    inner: Arc<Inner>,
}

struct Inner {
    current: ArcSwap<Snapshot>,
    registry: Registry,
    checkers: HealthCheckers,
    cancel: CancellationToken,
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
        let snapshot = Arc::new(Snapshot::build(config, version, &registry));
        let handle = ProxyHandle {
            inner: Arc::new(Inner {
                current: ArcSwap::from(snapshot.clone()),
                registry,
                checkers: HealthCheckers::default(),
                cancel: CancellationToken::new(),
            }),
        };
        handle.reconcile(&snapshot);
        handle
    }

    /// The snapshot new requests use now.
    #[inline]
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.current.load_full()
    }

    /// Replaces the running snapshot. Refuses changes that cannot take effect without a restart,
    /// naming them; on refusal nothing changes.
    pub fn swap(&self, config: ValidConfig, version: u64) -> Result<Arc<Snapshot>, SwapError> {
        let running = self.snapshot();
        check_swappable(&running.config, &config)?;
        let next = Arc::new(Snapshot::build(config, version, &self.inner.registry));
        self.inner.current.store(next.clone());
        self.reconcile(&next);
        tracing::info!(
            from = running.version,
            to = version,
            "config version now serving"
        );
        Ok(next)
    }

    fn reconcile(&self, live: &Snapshot) {
        let pools = live
            .pools
            .iter()
            .map(|p| (&live.config.pools[p.index], p.backends.as_slice()));
        self.inner
            .checkers
            .reconcile(desired_checks(pools), &self.inner.cancel);
        let names: std::collections::HashSet<SocketAddr> = live
            .pools
            .iter()
            .flat_map(|p| p.backends.iter().map(|b| b.addr))
            .collect();
        // Snapshots still held by in-flight requests keep their own Arcs; the registry only
        // stops handing out state for addresses no current config names.
        self.inner.registry.retain(|a| names.contains(a));
    }

    /// Every backend the running config names, with its live state.
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

    /// Stops the health checkers (the handle itself stays usable for reads).
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
