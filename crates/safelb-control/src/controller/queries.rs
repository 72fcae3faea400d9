//! What the admin API and the CLI read (status, versions, events, diffs, incidents, metrics) and
//! the one operator action that is not a change: draining a backend.

use super::*;

impl Controller {
    pub async fn status(&self) -> Result<Status, StoreError> {
        let stable = self.inner.handle.snapshot();
        let id = stable.version;
        let running = match self.inner.store.call(move |s| s.version(id)).await {
            Ok(v) => v.map(|mut v| {
                v.source = None;
                v
            }),
            // Fleet mode with etcd away: what this instance serves, from its own memory.
            Err(e) if self.inner.fleet.is_some() => Some(VersionRecord {
                id,
                parent: None,
                author: String::new(),
                reason: format!("the history cannot be read ({e}); this is the version this instance serves"),
                created_ms: 0,
                hash: content_hash(&stable.config.source),
                origin: String::new(),
                skip_preflight: false,
                emergency: false,
                fate: Fate::Promoted,
                source: None,
            }),
            Err(e) => return Err(e),
        };
        let rollout = match self.fleet_rollout_in_progress() {
            Some(id) => self.rollout_view(id),
            None => self.running_rollout().and_then(|id| self.rollout(id)),
        };
        let now = safelb_proxy::clock::now_ms();
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
                        slow_start_percent: b.slow_start_percent(now, stable.config.pools[p.index].slow_start),
                        ejected_for_ms: b.ejected_for_ms(),
                    })
                    .collect(),
            })
            .collect();
        let alerts = self
            .inner
            .alert_states
            .lock()
            .expect("alert states lock")
            .iter()
            .filter_map(|(name, severity, state)| {
                let (state, since_ms) = match *state {
                    crate::alerts::State::Pending { since_ms } => ("pending", since_ms),
                    crate::alerts::State::Firing { since_ms } => ("firing", since_ms),
                    crate::alerts::State::Inactive => return None,
                };
                Some(AlertStatus {
                    name: name.clone(),
                    severity: severity.clone(),
                    state,
                    since_ms,
                })
            })
            .collect();
        Ok(Status {
            running,
            rollout,
            alerts,
            pools,
            fleet: self.inner.fleet.as_ref().map(|f| f.status()),
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
        if let Some(f) = &self.inner.fleet {
            let flag = |b: bool| if b { 1.0 } else { 0.0 };
            let gauges = [
                (
                    "safelb_fleet_etcd_reachable",
                    "1 while etcd answers this instance; 0: it serves its running version on its own.",
                    flag(f.reachable()),
                ),
                (
                    "safelb_fleet_etcd_last_contact_seconds",
                    "Seconds since etcd last answered this instance.",
                    (unix_ms() - f.last_contact_ms()).max(0) as f64 / 1000.0,
                ),
                (
                    "safelb_fleet_leader",
                    "1 while this instance leads the fleet.",
                    flag(f.is_leader()),
                ),
                (
                    "safelb_fleet_instances",
                    "Instances with a live heartbeat in etcd, as this instance last read them.",
                    crate::fleet::leader::live(&f.seen().instances, unix_ms()).len() as f64,
                ),
                (
                    "safelb_fleet_refused_version",
                    "The version from etcd this instance refused to serve (0: none).",
                    self.inner
                        .refused
                        .lock()
                        .expect("refused lock")
                        .as_ref()
                        .map_or(0.0, |(v, _)| *v as f64),
                ),
            ];
            for (name, help, value) in gauges {
                e.family(name, "gauge", help);
                e.sample(name, &[], value);
            }
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
