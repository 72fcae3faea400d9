//! The monitor: once a second it records what the data plane saw, samples the counters,
//! evaluates every `[[alert]]`, sends notifications, and opens and resolves incidents.
//!
//! An incident opens when an alert fires or a rollback happens, and resolves at the first tick
//! with no alert firing. At resolution its facts are gathered (see `postmortem.rs`), stored with
//! the incident, and the postmortem is written to `<store>/postmortems/incident-N.md`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use safelb_config::{AlertKind, AlertRule};
use tokio_util::sync::CancellationToken;

use crate::alerts::{condition, step, Sample, Series, State, Transition};
use crate::clock::unix_ms;
use crate::event::Event;
use crate::notify::{Notice, Notifier};
use crate::postmortem::{self, RouteCounts};
use crate::Controller;

pub const TICK: Duration = Duration::from_secs(1);
/// Per-route counters are kept this long, every `ROUTE_EVERY`, to attribute an incident.
const ROUTE_KEEP: usize = 120;
const ROUTE_EVERY: u32 = 5;

type Scope = (Option<String>, Option<String>);

struct Open {
    id: u64,
    opened_ms: i64,
    alerts: BTreeSet<String>,
}

pub struct Monitor {
    controller: Controller,
    notifier: Notifier,
    postmortems: Option<PathBuf>,
    series: HashMap<Scope, Series>,
    routes: std::collections::VecDeque<(i64, RouteCounts)>,
    states: BTreeMap<String, (State, AlertRule)>,
    open: Option<Open>,
    rollbacks_seen: u64,
    ticks: u32,
    /// For the live feed's stats frames.
    counters: crate::live::Counters,
}

impl Monitor {
    pub fn new(controller: Controller, postmortems: Option<PathBuf>) -> Monitor {
        let rollbacks_seen = controller.rollbacks().0;
        Monitor {
            controller,
            notifier: Notifier::start(),
            postmortems,
            series: HashMap::new(),
            routes: Default::default(),
            states: BTreeMap::new(),
            open: None,
            rollbacks_seen,
            ticks: 0,
            counters: Default::default(),
        }
    }

    /// Runs until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut interval = tokio::time::interval(TICK);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = interval.tick() => self.tick().await,
            }
        }
    }

    async fn event(&self, event: Event) {
        self.controller.store().record(&event).await;
    }

    pub async fn tick(&mut self) {
        let now = unix_ms();
        self.ticks += 1;
        for e in self.controller.handle().metrics().drain_events() {
            self.event(Event::from(e)).await;
        }
        let frame = self.counters.frame(self.controller.handle(), now);
        self.controller.store().live().frame(frame);
        let stable = self.controller.handle().snapshot();
        let rules = stable.config.alerts.clone();
        let targets = stable.config.notify.clone();
        self.sample(now, &rules, &stable);
        // In a fleet, alerts and incidents are the leader's: one evaluation, one notification,
        // one incident for the fleet, not one per instance.
        let (rollbacks, last_rollback_ms, rollback_note) = self.controller.rollbacks();
        if self.controller.fleet().is_some_and(|f| !f.is_leader()) {
            // Seen, so that an instance elected later does not open incidents for them.
            self.rollbacks_seen = rollbacks;
            return;
        }
        if rollbacks > self.rollbacks_seen {
            self.rollbacks_seen = rollbacks;
            self.open_incident(now, format!("Rollback: {rollback_note}")).await;
        }
        let rollback_age = last_rollback_ms.map(|t| Duration::from_millis((now - t).max(0) as u64));
        let no_healthy: Vec<String> = stable
            .pools
            .iter()
            .filter(|p| p.available() == 0)
            .map(|p| p.name.to_string())
            .collect();

        let mut firing = Vec::new();
        for rule in &rules {
            let scope = (rule.route.clone(), rule.pool.clone());
            let empty = Series::default();
            let series = self.series.get(&scope).unwrap_or(&empty);
            let scoped_no_healthy: Vec<String> = no_healthy
                .iter()
                .filter(|p| rule.pool.as_ref().is_none_or(|x| x == *p))
                .cloned()
                .collect();
            let (active, text) = condition(rule, series, &scoped_no_healthy, rollback_age);
            let state = self.states.get(&rule.name).map_or(State::Inactive, |(s, _)| *s);
            let (next, transition) = step(state, active, rule.for_, now);
            self.states.insert(rule.name.clone(), (next, rule.clone()));
            self.transition(rule, transition, &text, now, &targets).await;
            if matches!(next, State::Firing { .. }) {
                firing.push(rule.name.clone());
            }
        }
        // Rules removed by a config change resolve.
        let gone: Vec<String> = self
            .states
            .keys()
            .filter(|n| !rules.iter().any(|r| &r.name == *n))
            .cloned()
            .collect();
        for name in gone {
            if let Some((State::Firing { since_ms }, rule)) = self.states.remove(&name) {
                self.transition(
                    &rule,
                    Transition::Resolved { fired_ms: since_ms },
                    "the rule was removed",
                    now,
                    &targets,
                )
                .await;
            }
        }
        self.controller.set_alert_states(
            self.states
                .iter()
                .map(|(n, (s, r))| (n.clone(), r.severity.clone(), *s))
                .collect(),
        );

        if let Some(open) = &self.open {
            if firing.is_empty() && now - open.opened_ms >= TICK.as_millis() as i64 {
                self.resolve(now).await;
            }
        }
    }

    fn sample(&mut self, now: i64, rules: &[AlertRule], stable: &safelb_proxy::Snapshot) {
        let metrics = self.controller.handle().metrics();
        let mut scopes: BTreeMap<Scope, bool> = BTreeMap::from([((None, None), false)]);
        for r in rules {
            *scopes.entry((r.route.clone(), r.pool.clone())).or_default() |=
                matches!(r.kind, AlertKind::LatencyP99 { .. });
        }
        for (scope, latency) in scopes {
            let (requests, errors) = metrics.totals(scope.0.as_deref(), scope.1.as_deref());
            // Latency is kept per pool: a route-scoped rule reads its route's pool.
            let pool = scope.1.clone().or_else(|| {
                scope.0.as_ref().and_then(|route| {
                    stable
                        .config
                        .routes
                        .iter()
                        .find(|r| &r.name == route)
                        .and_then(|r| r.pool())
                        .map(|p| stable.config.pools[p].name.clone())
                })
            });
            let latency = latency.then(|| metrics.latency(pool.as_deref()));
            self.series.entry(scope).or_default().push(Sample {
                ms: now,
                requests,
                errors,
                latency,
            });
        }
        if self.ticks % ROUTE_EVERY == 1 {
            if self.routes.len() >= ROUTE_KEEP {
                self.routes.pop_front();
            }
            self.routes.push_back((now, postmortem::route_counts(metrics)));
        }
    }

    async fn transition(
        &mut self,
        rule: &AlertRule,
        t: Transition,
        text: &str,
        now: i64,
        targets: &[safelb_config::Notify],
    ) {
        let name = &rule.name;
        match t {
            Transition::None => {}
            Transition::BecamePending => {
                self.event(Event::AlertPending {
                    alert: name.clone(),
                    value: text.to_owned(),
                })
                .await;
            }
            Transition::Cleared => {
                self.event(Event::AlertCleared {
                    alert: name.clone(),
                    value: text.to_owned(),
                })
                .await;
            }
            Transition::Fired => {
                self.event(Event::AlertFired {
                    alert: name.clone(),
                    severity: rule.severity.clone(),
                    rule: rule.kind.name().to_owned(),
                    value: text.to_owned(),
                })
                .await;
                self.notifier.send(targets, notice(rule, true, text, now, None));
                if self.open.is_none() {
                    self.open_incident(now, format!("{name}: {text}")).await;
                }
                if let Some(open) = &mut self.open {
                    open.alerts.insert(name.clone());
                }
            }
            Transition::Resolved { fired_ms } => {
                self.event(Event::AlertResolved {
                    alert: name.clone(),
                    after_ms: now - fired_ms,
                    value: text.to_owned(),
                })
                .await;
                self.notifier
                    .send(targets, notice(rule, false, text, fired_ms, Some(now)));
            }
        }
    }

    async fn open_incident(&mut self, now: i64, title: String) {
        if self.open.is_some() {
            return;
        }
        let t = title.clone();
        match self.controller.store().call(move |s| s.open_incident(now, &t)).await {
            Ok(id) => {
                self.event(Event::IncidentOpened {
                    incident: id,
                    title: title.clone(),
                })
                .await;
                self.open = Some(Open {
                    id,
                    opened_ms: now,
                    alerts: BTreeSet::new(),
                });
            }
            Err(e) => tracing::error!(error = %e, "opening an incident failed"),
        }
    }

    async fn resolve(&mut self, now: i64) {
        let Some(open) = self.open.take() else { return };
        let global = self.series.get(&(None, None));
        let empty = Series::default();
        let report = postmortem::gather(
            &self.controller,
            open.id,
            open.opened_ms,
            now,
            global.unwrap_or(&empty),
            &self.routes,
            open.alerts.iter().cloned().collect(),
        )
        .await;
        let id = open.id;
        let stored = serde_json::to_value(&report).expect("a report serializes");
        if let Err(e) = self
            .controller
            .store()
            .call(move |s| s.resolve_incident(id, now, &stored))
            .await
        {
            tracing::error!(error = %e, "recording the incident's resolution failed");
            return;
        }
        // Announced once its report is stored: whoever reacts to the event finds the postmortem.
        self.event(Event::IncidentResolved { incident: id }).await;
        if let Some(dir) = &self.postmortems {
            match self.controller.incident(id).await {
                Ok(Some(incident)) => {
                    let path = dir.join(format!("incident-{id}.md"));
                    let (dir, file, text) = (dir.clone(), path.clone(), postmortem::markdown(&incident));
                    // A file write blocks (a slow or full disk): on the blocking pool.
                    let written = tokio::task::spawn_blocking(move || {
                        std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&file, text))
                    })
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                    match written {
                        Ok(()) => tracing::info!(incident = id, path = %path.display(), "postmortem written"),
                        Err(e) => tracing::error!(error = %e, path = %path.display(), "writing the postmortem failed"),
                    }
                }
                other => tracing::error!(?other, "reading the resolved incident failed"),
            }
        }
        tracing::info!(incident = id, "incident resolved");
    }
}

fn notice(rule: &AlertRule, firing: bool, text: &str, starts_ms: i64, ends_ms: Option<i64>) -> Notice {
    let ts = safelb_proxy::clock::rfc3339_ms;
    let mut labels = rule.labels.clone();
    labels.push(("kind".into(), rule.kind.name().into()));
    if let Some(p) = &rule.pool {
        labels.push(("pool".into(), p.clone()));
    }
    if let Some(r) = &rule.route {
        labels.push(("route".into(), r.clone()));
    }
    Notice {
        alert: rule.name.clone(),
        firing,
        severity: rule.severity.clone(),
        labels,
        summary: text.to_string(),
        starts_at: ts(starts_ms),
        ends_at: ends_ms.map(ts),
    }
}

#[cfg(test)]
mod tests {
    //! The monitor on a paused clock: real counters, a real store, one tick per virtual second.

    use std::sync::Arc;

    use safelb_proxy::{ProxyHandle, Role};

    use super::*;
    use crate::testing::{self, config, RUNNING};

    const ALERT: &str = "[[alert]]\nname = \"Errors\"\nkind = \"error_rate\"\nroute = \"r\"\nthreshold = 0.2\nwindow = \"5s\"\nfor = \"3s\"\n";

    /// Kinds and times of the events stored so far, oldest first.
    async fn events(controller: &Controller) -> Vec<(String, i64)> {
        let rows = controller.store().call(|s| s.events(0, 1000)).await.unwrap();
        rows.into_iter().map(|e| (e.kind, e.time_ms)).collect()
    }

    fn time_of(events: &[(String, i64)], kind: &str) -> i64 {
        events
            .iter()
            .find(|(k, _)| k == kind)
            .unwrap_or_else(|| panic!("no {kind} in {events:?}"))
            .1
    }

    #[tokio::test(start_paused = true)]
    async fn an_alert_goes_pending_firing_resolved_and_its_incident_opens_and_resolves() {
        let (store, dir) = testing::store("monitor");
        let handle = ProxyHandle::new(config(&format!("{RUNNING}{ALERT}")), 1);
        let controller = Controller::new(handle.clone(), store);
        let postmortems = dir.0.join("postmortems");
        let mut monitor = Monitor::new(controller.clone(), Some(postmortems.clone()));
        let counters = handle
            .metrics()
            .requests(&Arc::from("r"), &Arc::from("p"), &Arc::from("127.0.0.1:9"));
        let second = |status: u16| {
            for _ in 0..20 {
                counters.inc(status, Role::Stable);
            }
        };
        // Eight seconds of errors, then healthy traffic until the 5 s window forgets them.
        for s in 0..20 {
            second(if s < 8 { 502 } else { 200 });
            monitor.tick().await;
            tokio::time::advance(TICK).await;
        }
        let seen = events(&controller).await;
        let kinds: Vec<&str> = seen
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| k.starts_with("Alert") || k.starts_with("Incident"))
            .collect();
        assert_eq!(
            kinds,
            [
                "AlertPending",
                "AlertFired",
                "IncidentOpened",
                "AlertResolved",
                "IncidentResolved"
            ],
            "{seen:?}"
        );
        let pending = time_of(&seen, "AlertPending");
        let fired = time_of(&seen, "AlertFired");
        assert!(
            (2_950..=3_100).contains(&(fired - pending)),
            "`for = 3s` fired {} ms after pending",
            fired - pending
        );
        assert!(time_of(&seen, "AlertResolved") > fired);

        let incidents = controller.incidents(10).await.unwrap();
        assert_eq!(incidents.len(), 1, "{incidents:?}");
        let incident = &incidents[0];
        assert!(incident.title.starts_with("Errors:"), "{}", incident.title);
        let resolved = incident.resolved_ms.expect("the incident resolved");
        assert!(resolved > incident.opened_ms);
        let written = std::fs::read_to_string(postmortems.join(format!("incident-{}.md", incident.id)))
            .expect("the postmortem was written");
        assert!(written.contains("Errors"), "{written}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_alert_that_clears_before_its_for_never_fires() {
        let (store, _dir) = testing::store("monitor");
        let handle = ProxyHandle::new(config(&format!("{RUNNING}{ALERT}")), 1);
        let controller = Controller::new(handle.clone(), store);
        let mut monitor = Monitor::new(controller.clone(), None);
        let counters = handle
            .metrics()
            .requests(&Arc::from("r"), &Arc::from("p"), &Arc::from("127.0.0.1:9"));
        // Two seconds of errors (less than `for`), then enough good traffic to dilute them.
        for s in 0..12 {
            for _ in 0..if s < 2 { 20 } else { 200 } {
                counters.inc(if s < 2 { 502 } else { 200 }, Role::Stable);
            }
            monitor.tick().await;
            tokio::time::advance(TICK).await;
        }
        let seen = events(&controller).await;
        let kinds: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
        assert!(kinds.contains(&"AlertPending"), "{seen:?}");
        assert!(kinds.contains(&"AlertCleared"), "{seen:?}");
        assert!(!kinds.contains(&"AlertFired"), "{seen:?}");
        assert_eq!(controller.incidents(10).await.unwrap().len(), 0);
    }
}
