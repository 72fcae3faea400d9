//! The controller: every change to what serves traffic goes through here, one at a time.
//!
//! `apply` validates a candidate, records it as a new version and starts its rollout (see
//! `rollout.rs`); `rollback` aborts a running rollout or swaps back to a known-good version at
//! once; `recover` decides at start which version to serve. Mutating calls are serialized by one
//! async mutex, so two changes can never interleave; reads go straight to the store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use safelb_config::ValidConfig;
use safelb_proxy::ProxyHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::diff::unified;
use crate::event::Event;
use crate::impact::{preview, Impact};
use crate::preflight::{self, PreflightReport};
use crate::rollout::{Phase, RolloutStatus, RolloutTask, WindowView};
use crate::store::{content_hash, now_ms, EventRecord, Fate, NewVersion, StoreError, VersionRecord, VersionStore};
use crate::StoreHandle;

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
    cancel: CancellationToken,
    abort_reason: Arc<Mutex<Option<String>>>,
    done: tokio::sync::watch::Receiver<bool>,
    status: Arc<Mutex<RolloutStatus>>,
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

struct Inner {
    handle: ProxyHandle,
    store: StoreHandle,
    serial: tokio::sync::Mutex<()>,
    current: Mutex<Option<Current>>,
    rollouts: Mutex<BTreeMap<u64, Arc<Mutex<RolloutStatus>>>>,
    /// Finished rollouts by outcome, for metrics.
    verdicts: Mutex<BTreeMap<&'static str, u64>>,
    /// Rollbacks (automatic or manual) so far, the time of the last one and what it was.
    rollbacks: Mutex<(u64, Option<i64>, String)>,
    /// Alert rules and their state, as the monitor last saw them.
    alert_states: Mutex<Vec<(String, String, crate::alerts::State)>>,
}

/// Decides the version to serve at start: the store's running version if there is one (a
/// rollout interrupted by a crash is recorded as rolled back), else the config file, recorded
/// as the first version.
pub fn recover(store: &mut dyn VersionStore, file_name: &str, file_source: &str) -> Result<Startup, String> {
    for v in store.versions(10_000).map_err(|e| e.to_string())? {
        if v.fate == Fate::Pending {
            store.set_fate(v.id, Fate::RolledBack).map_err(|e| e.to_string())?;
            store
                .append_event(Event::RolloutInterrupted { version: v.id }.record())
                .map_err(|e| e.to_string())?;
        }
    }
    let (version, source) = match store.running().map_err(|e| e.to_string())? {
        Some(id) => {
            let v = store
                .version(id)
                .map_err(|e| e.to_string())?
                .ok_or(format!("running version {id} is missing"))?;
            (id, v.source.unwrap_or_default())
        }
        None => {
            let id = store
                .append_version(NewVersion {
                    parent: None,
                    author: "safelb".into(),
                    reason: format!("first start with {file_name}"),
                    source: file_source.to_owned(),
                    origin: "startup".into(),
                    skip_preflight: false,
                    emergency: false,
                    fate: Fate::KnownGood,
                })
                .map_err(|e| e.to_string())?;
            store.set_running(id).map_err(|e| e.to_string())?;
            (id, file_source.to_owned())
        }
    };
    let config = safelb_config::check(&format!("version {version}"), &source)
        .into_result()
        .map_err(|d| format!("running version {version} no longer passes check:\n{}", d.render()))?;
    store
        .append_event(Event::VersionStarted { version }.record())
        .map_err(|e| e.to_string())?;
    Ok(Startup {
        config,
        version,
        file_differs: content_hash(&source) != content_hash(file_source),
    })
}

impl Controller {
    pub fn new(handle: ProxyHandle, store: StoreHandle) -> Controller {
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
            }),
        }
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

    /// Validates and records a candidate, then starts its rollout in the background.
    pub async fn apply(&self, req: ApplyRequest) -> Result<Accepted, ApplyError> {
        let _serial = self.inner.serial.lock().await;
        if let Some(id) = self.running_rollout() {
            return Err(ApplyError::Busy(id));
        }
        let stable = self.inner.handle.snapshot();
        if !req.emergency {
            let now = now_ms() / 1000;
            if let Some(f) = stable.config.change_freezes.iter().find(|f| f.covers(now)) {
                let until = safelb_proxy::access_log::rfc3339(f.end, 0);
                self.event(Event::ChangeRefused {
                    author: req.author.clone(),
                    reason: req.reason.clone(),
                    freeze: f.reason.clone(),
                    until: until.clone(),
                })
                .await;
                return Err(ApplyError::Frozen {
                    reason: f.reason.clone(),
                    until,
                });
            }
        }
        let checked = safelb_config::check(&req.file_name, &req.source);
        let valid = checked.config.is_some();
        let parent = Some(stable.version);
        let record = NewVersion {
            parent,
            author: req.author.clone(),
            reason: req.reason.clone(),
            source: req.source.clone(),
            origin: req.origin.clone(),
            skip_preflight: req.skip_preflight,
            emergency: req.emergency,
            fate: if valid { Fate::Pending } else { Fate::Rejected },
        };
        let version = self.inner.store.call(move |s| s.append_version(record)).await?;
        let Some(candidate) = checked.config else {
            let rendered = checked.diagnostics.render();
            let diagnostics = serde_json::to_value(checked.diagnostics.located()).unwrap_or_default();
            self.event(Event::ChangeRejected {
                version,
                author: req.author.clone(),
                why: "it does not pass check".into(),
                diagnostics: Some(diagnostics.clone()),
            })
            .await;
            return Err(ApplyError::Invalid {
                version,
                rendered,
                diagnostics,
            });
        };
        if stable.config.listeners != candidate.listeners || stable.config.access_log != candidate.access_log {
            let message = "it changes listeners or the access log, which need a restart".to_string();
            self.inner
                .store
                .call(move |s| s.set_fate(version, Fate::Rejected))
                .await?;
            self.event(Event::ChangeRejected {
                version,
                author: req.author.clone(),
                why: message.clone(),
                diagnostics: None,
            })
            .await;
            return Err(ApplyError::NotSwappable { version, message });
        }
        self.event(Event::ChangeSubmitted {
            version,
            author: req.author.clone(),
            reason: req.reason.clone(),
            origin: req.origin.clone(),
            skip_preflight: req.skip_preflight,
            skip_shadow: req.skip_shadow,
            emergency: req.emergency,
        })
        .await;

        let policy = &stable.config.rollout;
        let status = Arc::new(Mutex::new(RolloutStatus {
            id: version,
            from_version: stable.version,
            phase: Phase::Preflight,
            steps: policy.canary_steps.clone(),
            step: 0,
            percent: 0,
            step_bake_ms: policy.step_bake.as_millis() as u64,
            skip_preflight: req.skip_preflight,
            skip_shadow: req.skip_shadow,
            shadow: None,
            candidate: WindowView::default(),
            stable: WindowView::default(),
            verdict: None,
            preflight: None,
            started_ms: now_ms(),
            finished_ms: None,
            progress: Vec::new(),
        }));
        let cancel = CancellationToken::new();
        let abort_reason = Arc::new(Mutex::new(None));
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let task = RolloutTask {
            handle: self.inner.handle.clone(),
            store: self.inner.store.clone(),
            candidate,
            running: stable.config.clone(),
            status: status.clone(),
            cancel: cancel.clone(),
            abort_reason: abort_reason.clone(),
            confirm: req.confirm,
        };
        self.inner
            .rollouts
            .lock()
            .expect("rollouts lock")
            .insert(version, status.clone());
        *self.inner.current.lock().expect("current lock") = Some(Current {
            id: version,
            cancel,
            abort_reason,
            done: done_rx,
            status,
        });
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let phase = task.run().await;
            tracing::info!(version, ?phase, "rollout finished");
            let name = match phase {
                Phase::Promoted => "promoted",
                Phase::Rejected => "rejected",
                _ => "rolled_back",
            };
            *inner.verdicts.lock().expect("verdicts lock").entry(name).or_default() += 1;
            if phase == Phase::RolledBack {
                note_rollback(&inner.rollbacks, format!("rollout of version {version} rolled back"));
            }
            let _ = done_tx.send(true);
        });
        Ok(Accepted {
            version,
            rollout: version,
        })
    }

    /// Aborts the running rollout, or puts a known-good version back for all traffic at once.
    pub async fn rollback(&self, to: Option<u64>, author: &str, reason: &str) -> Result<RollbackDone, RollbackError> {
        let started = std::time::Instant::now();
        let _serial = self.inner.serial.lock().await;
        let running_rollout = {
            let current = self.inner.current.lock().expect("current lock");
            current
                .as_ref()
                .filter(|c| c.running())
                .map(|c| (c.id, c.cancel.clone(), c.abort_reason.clone(), c.done.clone()))
        };
        if let Some((id, cancel, why, mut done)) = running_rollout {
            *why.lock().expect("reason lock") = Some(format!("{reason} (by {author})"));
            cancel.cancel();
            while !*done.borrow() {
                if done.changed().await.is_err() {
                    break;
                }
            }
            let target = self.inner.handle.snapshot().version;
            return Ok(RollbackDone {
                version: None,
                target,
                aborted_rollout: Some(id),
                took_ms: started.elapsed().as_millis() as u64,
            });
        }
        let running = self.inner.handle.snapshot().version;
        let target = match to {
            Some(t) => t,
            None => self
                .inner
                .store
                .call(move |s| s.known_good_before(running))
                .await?
                .ok_or(RollbackError::NoTarget(running))?,
        };
        let record = self
            .inner
            .store
            .call(move |s| s.version(target))
            .await?
            .ok_or(RollbackError::UnknownVersion(target))?;
        let source = record.source.unwrap_or_default();
        let config = safelb_config::check(&format!("version {target}"), &source)
            .into_result()
            .map_err(|d| RollbackError::Unservable(target, d.render()))?;
        let new = NewVersion {
            parent: Some(running),
            author: author.to_owned(),
            reason: reason.to_owned(),
            source,
            origin: "rollback".into(),
            skip_preflight: false,
            emergency: false,
            fate: Fate::Pending,
        };
        let version = self.inner.store.call(move |s| s.append_version(new)).await?;
        // Store first, then traffic: the history says what serves before it serves.
        self.inner
            .store
            .call(move |s| {
                s.set_fate(version, Fate::Promoted)?;
                s.set_running(version)
            })
            .await?;
        if let Err(e) = self.inner.handle.roll_back_to(config, version) {
            self.inner
                .store
                .call(move |s| {
                    s.set_fate(version, Fate::Rejected)?;
                    s.set_running(running)
                })
                .await?;
            return Err(RollbackError::Unservable(target, e.to_string()));
        }
        let took = started.elapsed();
        note_rollback(
            &self.inner.rollbacks,
            format!("manual rollback by {author} to the content of version {target}"),
        );
        self.event(Event::RollbackApplied {
            version,
            from: running,
            target,
            author: author.to_owned(),
            reason: reason.to_owned(),
            took_ms: took.as_millis() as u64,
        })
        .await;
        Ok(RollbackDone {
            version: Some(version),
            target,
            aborted_rollout: None,
            took_ms: took.as_millis() as u64,
        })
    }

    /// What applying `source` would do, without changing anything.
    pub async fn plan(&self, file_name: &str, source: &str, confirm: bool) -> PlanReport {
        let stable = self.inner.handle.snapshot();
        let checked = safelb_config::check(file_name, source);
        let diff = unified(
            &stable.config.source,
            source,
            &format!("version {} (running)", stable.version),
            file_name,
        );
        let diagnostics = serde_json::to_value(checked.diagnostics.located()).unwrap_or_default();
        let rendered = if checked.diagnostics.is_empty() {
            String::new()
        } else {
            checked.diagnostics.render()
        };
        let (impact, preflight) = match &checked.config {
            Some(candidate) => {
                let samples = self.inner.handle.samples().collect();
                let impact = preview(&samples, &stable.config, candidate);
                let report = preflight::run(candidate, &stable.config, &stable.config.rollout, &samples, confirm).await;
                (Some(impact), Some(report))
            }
            None => (None, None),
        };
        PlanReport {
            valid: checked.config.is_some(),
            diagnostics,
            rendered,
            running_version: stable.version,
            diff,
            impact,
            preflight,
        }
    }

    pub async fn status(&self) -> Result<Status, StoreError> {
        let stable = self.inner.handle.snapshot();
        let id = stable.version;
        let running = self.inner.store.call(move |s| s.version(id)).await?.map(|mut v| {
            v.source = None;
            v
        });
        let rollout = self.running_rollout().and_then(|id| self.rollout(id));
        let now = safelb_proxy::backend::now_ms();
        let pools = stable
            .pools
            .iter()
            .map(|p| PoolStatus {
                name: p.name.to_string(),
                in_panic: p.in_panic(),
                backends: p
                    .backends
                    .iter()
                    .map(|b| BackendStatus {
                        addr: b.addr.to_string(),
                        available: b.is_available(now),
                        state: format!("{:?}", b.availability()),
                        in_flight: b.in_flight(),
                        draining: b.is_draining(),
                    })
                    .collect(),
            })
            .collect();
        Ok(Status {
            running,
            rollout,
            pools,
        })
    }

    pub fn rollout(&self, id: u64) -> Option<RolloutStatus> {
        let map = self.inner.rollouts.lock().expect("rollouts lock");
        map.get(&id).map(|s| s.lock().expect("status lock").clone())
    }

    pub async fn versions(&self, limit: usize) -> Result<Vec<VersionRecord>, StoreError> {
        self.inner.store.call(move |s| s.versions(limit)).await
    }

    pub async fn version(&self, id: u64) -> Result<Option<VersionRecord>, StoreError> {
        self.inner.store.call(move |s| s.version(id)).await
    }

    pub async fn events(&self, after: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.store.call(move |s| s.events(after, limit)).await
    }

    /// The unified diff between two stored versions, or `None` if one is missing.
    pub async fn diff(&self, from: u64, to: u64) -> Result<Option<String>, StoreError> {
        let (a, b) = self
            .inner
            .store
            .call(move |s| Ok((s.version(from)?, s.version(to)?)))
            .await?;
        Ok(match (a, b) {
            (Some(a), Some(b)) => Some(unified(
                a.source.as_deref().unwrap_or(""),
                b.source.as_deref().unwrap_or(""),
                &format!("version {from}"),
                &format!("version {to}"),
            )),
            _ => None,
        })
    }

    /// (rollbacks so far, time of the last one, what it was).
    pub fn rollbacks(&self) -> (u64, Option<i64>, String) {
        self.inner.rollbacks.lock().expect("rollbacks lock").clone()
    }

    pub fn set_alert_states(&self, states: Vec<(String, String, crate::alerts::State)>) {
        *self.inner.alert_states.lock().expect("alert states lock") = states;
    }

    pub async fn incidents(&self, limit: usize) -> Result<Vec<crate::store::IncidentRecord>, StoreError> {
        self.inner.store.call(move |s| s.incidents(limit)).await
    }

    pub async fn incident(&self, id: u64) -> Result<Option<crate::store::IncidentRecord>, StoreError> {
        self.inner.store.call(move |s| s.incident(id)).await
    }

    /// Appends the control plane's metric families.
    pub fn render_metrics(&self, e: &mut safelb_proxy::exposition::Exposition) {
        e.family(
            "safelb_rollouts_total",
            "counter",
            "Finished rollouts by verdict (promoted, rejected, rolled_back).",
        );
        let verdicts = self.inner.verdicts.lock().expect("verdicts lock").clone();
        for v in ["promoted", "rejected", "rolled_back"] {
            e.sample(
                "safelb_rollouts_total",
                &[("verdict", v)],
                verdicts.get(v).copied().unwrap_or(0) as f64,
            );
        }
        let step = self.running_rollout().and_then(|id| self.rollout(id));
        e.family("safelb_rollout_in_progress", "gauge", "1 while a rollout runs.");
        e.sample(
            "safelb_rollout_in_progress",
            &[],
            if step.is_some() { 1.0 } else { 0.0 },
        );
        e.family(
            "safelb_rollout_step",
            "gauge",
            "The 1-based canary step of the rollout in progress (0 without one).",
        );
        e.sample(
            "safelb_rollout_step",
            &[],
            step.map_or(0.0, |s| {
                if s.phase == Phase::Canary {
                    s.step as f64 + 1.0
                } else {
                    0.0
                }
            }),
        );
        e.family(
            "safelb_events_total",
            "counter",
            "Control-plane events recorded since start, by kind (see the event log for each).",
        );
        for (kind, n) in crate::event::EVENTS.read() {
            e.sample("safelb_events_total", &[("kind", kind)], n as f64);
        }
    }

    /// Stops new requests to a backend (requests in flight finish), or lets them in again.
    pub async fn set_draining(&self, addr: std::net::SocketAddr, draining: bool, author: &str) -> bool {
        let Some(backend) = self.inner.handle.backend(&addr) else {
            return false;
        };
        backend.set_draining(draining);
        let (backend, author) = (addr.to_string(), author.to_owned());
        self.event(if draining {
            Event::BackendDrained { backend, author }
        } else {
            Event::BackendUndrained { backend, author }
        })
        .await;
        true
    }
}

fn note_rollback(rollbacks: &Mutex<(u64, Option<i64>, String)>, what: String) {
    let mut r = rollbacks.lock().expect("rollbacks lock");
    r.0 += 1;
    r.1 = Some(now_ms());
    r.2 = what;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteStore;

    /// A client that saw a rollout end may apply the next change at once: the end is published
    /// only after the fate is recorded, and a finished rollout never answers `Busy`.
    #[tokio::test]
    async fn the_next_apply_is_accepted_as_soon_as_a_rollout_is_seen_to_end() {
        let dir = std::env::temp_dir().join(format!("safelb-controller-test-{}", std::process::id()));
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
        let store = StoreHandle::new(SqliteStore::open(&dir).unwrap());
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
        let _ = std::fs::remove_dir_all(&dir);
    }
}
