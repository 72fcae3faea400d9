//! The controller: every change to what serves traffic goes through here, one at a time.
//!
//! `apply` validates a candidate, records it as a new version and starts its rollout (see
//! `rollout.rs`); `rollback` aborts a running rollout or swaps back to a known-good version at
//! once; `recover` decides at start which version to serve. Mutating calls are serialized by one
//! async mutex, so two changes can never interleave; reads go straight to the store.
//!
//! This file holds the controller's state and the types of its answers; `change.rs` the
//! changes (apply, rollback, plan), `recover.rs` the start-up decision, `queries.rs` the reads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use safelb_config::ValidConfig;
use safelb_proxy::ProxyHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::clock::unix_ms;
use crate::diff::unified;
use crate::event::Event;
use crate::impact::{preview, Impact};
use crate::preflight::{self, PreflightReport};
use crate::rollout::{Phase, RolloutStatus, RolloutTask};
use crate::store::{content_hash, EventRecord, Fate, NewVersion, StoreError, VersionRecord, VersionStore};
use crate::StoreHandle;

mod change;
mod fleet;
mod queries;
mod recover;

pub use recover::{recover, RecoverError};

/// A change submitted by an operator (or SIGHUP, or start-up).
#[derive(Clone, Debug, Default)]
pub struct ApplyRequest {
    pub source: String,
    /// Named in diagnostics.
    pub file_name: String,
    pub author: String,
    pub reason: String,
    pub origin: String,
    pub skip_preflight: bool,
    /// Skip the shadow stage (recorded as an event, like a skipped preflight).
    pub skip_shadow: bool,
    pub confirm: bool,
    pub emergency: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Accepted {
    pub version: u64,
    pub rollout: u64,
}

/// Why an apply did not start a rollout. Each maps to one HTTP status in the admin API.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("rollout of version {0} is still running: wait for it, or abort it with `safelb rollback`")]
    Busy(u64),
    #[error("change freeze `{reason}` is in force until {until}: changes are refused unless marked --emergency")]
    Frozen { reason: String, until: String },
    #[error("version {version} is not a valid config:\n{rendered}")]
    Invalid {
        version: u64,
        rendered: String,
        diagnostics: serde_json::Value,
    },
    #[error("version {version} cannot replace the running one: {message}")]
    NotSwappable { version: u64, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone, Debug, Serialize)]
pub struct RollbackDone {
    /// The new version recorded for the rollback (absent when a rollout was aborted instead).
    pub version: Option<u64>,
    /// The version whose content now serves.
    pub target: u64,
    /// The rollout that was aborted, if one was running.
    pub aborted_rollout: Option<u64>,
    pub took_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("no known-good version before version {0} to roll back to; name one with --to")]
    NoTarget(u64),
    #[error("version {0} does not exist")]
    UnknownVersion(u64),
    #[error("version {0} can no longer be served: {1}")]
    Unservable(u64, String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    pub valid: bool,
    pub diagnostics: serde_json::Value,
    pub rendered: String,
    pub running_version: u64,
    pub diff: String,
    pub impact: Option<Impact>,
    pub preflight: Option<PreflightReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub running: Option<VersionRecord>,
    pub rollout: Option<RolloutStatus>,
    pub pools: Vec<PoolStatus>,
    /// Alert rules pending or firing, as the monitor last saw them.
    pub alerts: Vec<AlertStatus>,
    /// Fleet mode: the instances, the leader, etcd.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AlertStatus {
    pub name: String,
    pub severity: String,
    /// `pending` or `firing`.
    pub state: &'static str,
    pub since_ms: i64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PoolStatus {
    pub name: String,
    pub in_panic: bool,
    pub backends: Vec<BackendStatus>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BackendStatus {
    pub addr: String,
    pub available: bool,
    pub state: String,
    pub in_flight: u32,
    pub draining: bool,
    /// The share of its weight a backend ramping up under `slow_start` takes now, in percent.
    pub slow_start_percent: Option<u8>,
    pub ejected_for_ms: Option<u64>,
}

/// What to serve at start.
pub struct Startup {
    pub config: ValidConfig,
    pub version: u64,
    /// The config file differs from the running version and should be submitted.
    pub file_differs: bool,
}

struct Current {
    id: u64,
    abort: Abort,
    done: tokio::sync::watch::Receiver<bool>,
    status: Arc<Mutex<RolloutStatus>>,
}

/// Stops the rollout in progress: the reason its verdict will give, then the cancellation its
/// task watches.
#[derive(Clone)]
struct Abort {
    cancel: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Abort {
    fn now(&self, why: String) {
        *self.reason.lock().expect("reason lock") = Some(why);
        self.cancel.cancel();
    }
}

impl Current {
    /// Still deciding? A rollout whose final phase is published (fate recorded) is over, even
    /// while its task does its last bookkeeping: a client that saw it end may apply again.
    fn running(&self) -> bool {
        !*self.done.borrow() && !self.status.lock().expect("status lock").phase.is_final()
    }
}

#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

/// Rollouts whose progress stays in memory; older ones are in the store's events. A process
/// that applies a change a minute for months must not grow by one rollout each time.
const ROLLOUTS_KEPT: usize = 100;

impl Inner {
    fn remember_rollout(&self, id: u64, status: Arc<Mutex<RolloutStatus>>) {
        let mut map = self.rollouts.lock().expect("rollouts lock");
        map.insert(id, status);
        while map.len() > ROLLOUTS_KEPT {
            map.pop_first();
        }
    }
}

struct Inner {
    handle: ProxyHandle,
    store: StoreHandle,
    serial: tokio::sync::Mutex<()>,
    current: Mutex<Option<Current>>,
    /// The newest [`ROLLOUTS_KEPT`] rollouts since start, by version (`GET /rollouts/ID`).
    rollouts: Mutex<BTreeMap<u64, Arc<Mutex<RolloutStatus>>>>,
    /// Finished rollouts by outcome, for metrics.
    verdicts: Mutex<BTreeMap<&'static str, u64>>,
    /// Rollbacks (automatic or manual) so far, the time of the last one and what it was.
    rollbacks: Mutex<(u64, Option<i64>, String)>,
    /// Alert rules and their state, as the monitor last saw them.
    alert_states: Mutex<Vec<(String, String, crate::alerts::State)>>,
    /// Fleet mode: the link to etcd.
    fleet: Option<Arc<crate::fleet::Fleet>>,
    /// This instance's listener addresses (`--bind`), put into every config it checks.
    binds: Vec<(String, std::net::SocketAddr)>,
    /// Fleet mode: the version from etcd this instance refused to serve, and why.
    refused: Mutex<Option<(u64, String)>>,
}

impl Controller {
    pub fn new(handle: ProxyHandle, store: StoreHandle) -> Controller {
        Controller::placed(handle, store, None, Vec::new())
    }

    /// An instance with listeners of its own (`binds`), and in fleet mode a member of `fleet`:
    /// its history is then the cluster's in etcd.
    pub fn placed(
        handle: ProxyHandle,
        store: StoreHandle,
        fleet: Option<Arc<crate::fleet::Fleet>>,
        binds: Vec<(String, std::net::SocketAddr)>,
    ) -> Controller {
        Controller {
            inner: Arc::new(Inner {
                handle,
                store,
                serial: tokio::sync::Mutex::new(()),
                current: Mutex::new(None),
                rollouts: Mutex::new(BTreeMap::new()),
                verdicts: Mutex::new(BTreeMap::new()),
                rollbacks: Mutex::new((0, None, String::new())),
                alert_states: Mutex::new(Vec::new()),
                fleet,
                binds,
                refused: Mutex::new(None),
            }),
        }
    }

    pub fn fleet(&self) -> Option<&Arc<crate::fleet::Fleet>> {
        self.inner.fleet.as_ref()
    }

    /// `safelb_config::check`, with this instance's `--bind` addresses in the listeners.
    pub fn check(&self, file_name: &str, source: &str) -> safelb_config::Checked {
        check_placed(file_name, source, &self.inner.binds)
    }

    pub fn handle(&self) -> &ProxyHandle {
        &self.inner.handle
    }

    pub fn store(&self) -> &StoreHandle {
        &self.inner.store
    }

    fn running_rollout(&self) -> Option<u64> {
        let current = self.inner.current.lock().expect("current lock");
        current.as_ref().filter(|c| c.running()).map(|c| c.id)
    }

    async fn event(&self, event: Event) {
        self.inner.store.record(&event).await;
    }
}

/// `safelb_config::check`, with the listeners moved to `binds` (an instance's `--bind`).
pub fn check_placed(file_name: &str, source: &str, binds: &[(String, std::net::SocketAddr)]) -> safelb_config::Checked {
    let mut checked = safelb_config::check(file_name, source);
    if let Some(c) = checked.config.as_mut() {
        c.bind_overrides(binds);
    }
    checked
}

fn note_rollback(rollbacks: &Mutex<(u64, Option<i64>, String)>, what: String) {
    let mut r = rollbacks.lock().expect("rollbacks lock");
    r.0 += 1;
    r.1 = Some(unix_ms());
    r.2 = what;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_newest_rollouts_stay_in_memory() {
        let running = crate::testing::config("[listener.public]\nbind = \"127.0.0.1:1\"\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [\"127.0.0.1:9\"]\n");
        let policy = running.rollout.clone();
        let (store, _dir) = crate::testing::store("kept");
        let controller = Controller::new(ProxyHandle::new(running, 1), store);
        for id in 1..=(ROLLOUTS_KEPT as u64 + 50) {
            let status = RolloutStatus::new(id, 1, &policy, false, false);
            controller.inner.remember_rollout(id, Arc::new(Mutex::new(status)));
        }
        assert_eq!(controller.inner.rollouts.lock().unwrap().len(), ROLLOUTS_KEPT);
        assert!(controller.rollout(50).is_none(), "the oldest are forgotten");
        assert_eq!(controller.rollout(150).map(|r| r.id), Some(150));
    }

    /// A client that saw a rollout end may apply the next change at once: the end is published
    /// only after the fate is recorded, and a finished rollout never answers `Busy`.
    #[tokio::test]
    async fn the_next_apply_is_accepted_as_soon_as_a_rollout_is_seen_to_end() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = |backend: &str| {
            format!("[listener.public]\nbind = \"127.0.0.1:1\"\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [\"{backend}\"]\n")
        };
        let running = safelb_config::check("t.toml", &config("127.0.0.1:9"))
            .into_result()
            .unwrap();
        let (store, _dir) = crate::testing::store("controller");
        let controller = Controller::new(ProxyHandle::new(running, 1), store.clone());
        // The listener is dropped: its port refuses connections, so preflight rejects fast.
        let bad = config(&closed.to_string());
        for round in 0..5 {
            let accepted = controller
                .apply(ApplyRequest {
                    source: bad.clone(),
                    file_name: "bad.toml".into(),
                    author: "test".into(),
                    reason: format!("round {round}"),
                    origin: "apply".into(),
                    ..ApplyRequest::default()
                })
                .await
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
            loop {
                let status = controller.rollout(accepted.rollout).expect("the rollout");
                if status.phase.is_final() {
                    let v = accepted.version;
                    let fate = store.call(move |s| s.version(v)).await.unwrap().unwrap().fate;
                    assert_eq!(fate, Fate::Rejected, "the fate is recorded before the end is shown");
                    break;
                }
                tokio::task::yield_now().await;
            }
        }
    }
}
