//! [`Event`]: everything the control plane records, one typed value per occurrence.
//!
//! An event is the single source of its log line, its stored row (kind, version, message and the
//! event itself as JSON data), its count in `safelb_events_total` and its line in a rollout's
//! progress and a postmortem's timeline: renaming a kind or a field is a compile error, not a
//! silently degraded postmortem. Kinds are `<Noun><PastVerb>`.

use std::collections::BTreeMap;
use std::sync::Mutex;

use safelb_proxy::hedge::CanaryTotals;
use safelb_proxy::metrics::DataPlaneEvent;
use safelb_proxy::shadow::ShadowReport;
use serde::{Deserialize, Serialize};

use crate::judge::WindowView;
use crate::store::NewEvent;

/// Fields absent from rows written by older versions read as their defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Event {
    // Versions and changes.
    VersionStarted {
        #[serde(default)]
        version: u64,
    },
    RolloutInterrupted {
        #[serde(default)]
        version: u64,
    },
    ChangeRefused {
        #[serde(default)]
        author: String,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        freeze: String,
        #[serde(default)]
        until: String,
    },
    ChangeRejected {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        author: String,
        #[serde(default)]
        why: String,
        #[serde(default)]
        diagnostics: Option<serde_json::Value>,
    },
    ChangeSubmitted {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        author: String,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        origin: String,
        #[serde(default)]
        skip_preflight: bool,
        #[serde(default)]
        skip_shadow: bool,
        #[serde(default)]
        emergency: bool,
    },
    RollbackApplied {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        from: u64,
        #[serde(default)]
        target: u64,
        #[serde(default)]
        author: String,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        took_ms: u64,
    },
    // A rollout's steps.
    PreflightSkipped {
        #[serde(default)]
        version: u64,
    },
    PreflightFailed {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        problems: Vec<String>,
    },
    PreflightPassed {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        summary: String,
        #[serde(default)]
        shift_percent: f64,
        #[serde(default)]
        pools: Vec<(String, usize, usize)>,
    },
    ShadowSkipped {
        #[serde(default)]
        version: u64,
    },
    ShadowStarted {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        share: f64,
        #[serde(default)]
        duration_ms: u64,
    },
    ShadowFailed {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        why: String,
        #[serde(default)]
        report: ShadowReport,
    },
    ShadowPassed {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        report: ShadowReport,
    },
    CanaryStepStarted {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        step: usize,
        #[serde(default)]
        steps: usize,
        #[serde(default)]
        percent: u8,
    },
    CanaryStepLowTraffic {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        step: usize,
        #[serde(default)]
        requests: u64,
        #[serde(default)]
        elapsed_ms: u64,
        #[serde(default)]
        min_requests: u64,
    },
    CanaryStepPassed {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        step: usize,
        #[serde(default)]
        steps: usize,
        #[serde(default)]
        percent: u8,
        #[serde(default)]
        candidate: WindowView,
    },
    RolloutAborted {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        percent: u8,
        #[serde(default)]
        reason: String,
        #[serde(default)]
        rescues: CanaryTotals,
    },
    RolloutRolledBack {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        reason: String,
        /// Where the canary was (percent, step); `None` when it never took a share of traffic.
        #[serde(default)]
        at: Option<(u8, usize)>,
        #[serde(default)]
        candidate: Option<WindowView>,
        #[serde(default)]
        stable: Option<WindowView>,
        #[serde(default)]
        elapsed_ms: u64,
        #[serde(default)]
        rescues: CanaryTotals,
    },
    RolloutPromoted {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        elapsed_ms: u64,
        #[serde(default)]
        rescues: CanaryTotals,
    },
    // Backends and pools (operators, and what the data plane saw).
    BackendDrained {
        #[serde(default)]
        backend: String,
        #[serde(default)]
        author: String,
    },
    BackendUndrained {
        #[serde(default)]
        backend: String,
        #[serde(default)]
        author: String,
    },
    BackendFailedHealthCheck {
        #[serde(default)]
        backend: String,
        #[serde(default)]
        reason: String,
    },
    BackendPassedHealthCheck {
        #[serde(default)]
        backend: String,
    },
    BackendEjected {
        #[serde(default)]
        backend: String,
        #[serde(default)]
        pool: String,
        #[serde(default)]
        cause: String,
        #[serde(default)]
        for_ms: u64,
    },
    PoolPanicEntered {
        #[serde(default)]
        pool: String,
        #[serde(default)]
        available: usize,
        #[serde(default)]
        total: usize,
    },
    PoolPanicLeft {
        #[serde(default)]
        pool: String,
        #[serde(default)]
        available: usize,
        #[serde(default)]
        total: usize,
    },
    // The fleet (fleet mode on etcd).
    LeaderElected {
        #[serde(default)]
        instance: String,
    },
    FleetStageStarted {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        stage: usize,
        #[serde(default)]
        stages: usize,
        #[serde(default)]
        instances: Vec<String>,
    },
    InstanceCanaryPassed {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        elapsed_ms: u64,
    },
    FleetRolloutPromoted {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        instances: Vec<String>,
        #[serde(default)]
        elapsed_ms: u64,
    },
    FleetRolloutRolledBack {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        reason: String,
        /// The instances that had served the candidate.
        #[serde(default)]
        instances: Vec<String>,
        #[serde(default)]
        elapsed_ms: u64,
    },
    VersionRefused {
        #[serde(default)]
        version: u64,
        #[serde(default)]
        why: String,
    },
    EtcdReconnected {
        #[serde(default)]
        after_ms: i64,
    },
    // Alerts and incidents.
    AlertPending {
        #[serde(default)]
        alert: String,
        #[serde(default)]
        value: String,
    },
    AlertCleared {
        #[serde(default)]
        alert: String,
        #[serde(default)]
        value: String,
    },
    AlertFired {
        #[serde(default)]
        alert: String,
        #[serde(default)]
        severity: String,
        #[serde(default)]
        rule: String,
        #[serde(default)]
        value: String,
    },
    AlertResolved {
        #[serde(default)]
        alert: String,
        #[serde(default)]
        after_ms: i64,
        #[serde(default)]
        value: String,
    },
    IncidentOpened {
        #[serde(default)]
        incident: u64,
        #[serde(default)]
        title: String,
    },
    IncidentResolved {
        #[serde(default)]
        incident: u64,
    },
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::VersionStarted { .. } => "VersionStarted",
            Event::RolloutInterrupted { .. } => "RolloutInterrupted",
            Event::ChangeRefused { .. } => "ChangeRefused",
            Event::ChangeRejected { .. } => "ChangeRejected",
            Event::ChangeSubmitted { .. } => "ChangeSubmitted",
            Event::RollbackApplied { .. } => "RollbackApplied",
            Event::PreflightSkipped { .. } => "PreflightSkipped",
            Event::PreflightFailed { .. } => "PreflightFailed",
            Event::PreflightPassed { .. } => "PreflightPassed",
            Event::ShadowSkipped { .. } => "ShadowSkipped",
            Event::ShadowStarted { .. } => "ShadowStarted",
            Event::ShadowFailed { .. } => "ShadowFailed",
            Event::ShadowPassed { .. } => "ShadowPassed",
            Event::CanaryStepStarted { .. } => "CanaryStepStarted",
            Event::CanaryStepLowTraffic { .. } => "CanaryStepLowTraffic",
            Event::CanaryStepPassed { .. } => "CanaryStepPassed",
            Event::RolloutAborted { .. } => "RolloutAborted",
            Event::RolloutRolledBack { .. } => "RolloutRolledBack",
            Event::RolloutPromoted { .. } => "RolloutPromoted",
            Event::BackendDrained { .. } => "BackendDrained",
            Event::BackendUndrained { .. } => "BackendUndrained",
            Event::BackendFailedHealthCheck { .. } => "BackendFailedHealthCheck",
            Event::BackendPassedHealthCheck { .. } => "BackendPassedHealthCheck",
            Event::BackendEjected { .. } => "BackendEjected",
            Event::PoolPanicEntered { .. } => "PoolPanicEntered",
            Event::PoolPanicLeft { .. } => "PoolPanicLeft",
            Event::LeaderElected { .. } => "LeaderElected",
            Event::FleetStageStarted { .. } => "FleetStageStarted",
            Event::InstanceCanaryPassed { .. } => "InstanceCanaryPassed",
            Event::FleetRolloutPromoted { .. } => "FleetRolloutPromoted",
            Event::FleetRolloutRolledBack { .. } => "FleetRolloutRolledBack",
            Event::VersionRefused { .. } => "VersionRefused",
            Event::EtcdReconnected { .. } => "EtcdReconnected",
            Event::AlertPending { .. } => "AlertPending",
            Event::AlertCleared { .. } => "AlertCleared",
            Event::AlertFired { .. } => "AlertFired",
            Event::AlertResolved { .. } => "AlertResolved",
            Event::IncidentOpened { .. } => "IncidentOpened",
            Event::IncidentResolved { .. } => "IncidentResolved",
        }
    }

    /// The config version the event concerns, if one.
    pub fn version(&self) -> Option<u64> {
        match self {
            Event::VersionStarted { version }
            | Event::RolloutInterrupted { version }
            | Event::ChangeRejected { version, .. }
            | Event::ChangeSubmitted { version, .. }
            | Event::RollbackApplied { version, .. }
            | Event::PreflightSkipped { version }
            | Event::PreflightFailed { version, .. }
            | Event::PreflightPassed { version, .. }
            | Event::ShadowSkipped { version }
            | Event::ShadowStarted { version, .. }
            | Event::ShadowFailed { version, .. }
            | Event::ShadowPassed { version, .. }
            | Event::CanaryStepStarted { version, .. }
            | Event::CanaryStepLowTraffic { version, .. }
            | Event::CanaryStepPassed { version, .. }
            | Event::RolloutAborted { version, .. }
            | Event::RolloutRolledBack { version, .. }
            | Event::RolloutPromoted { version, .. }
            | Event::FleetStageStarted { version, .. }
            | Event::InstanceCanaryPassed { version, .. }
            | Event::FleetRolloutPromoted { version, .. }
            | Event::FleetRolloutRolledBack { version, .. }
            | Event::VersionRefused { version, .. } => Some(*version),
            _ => None,
        }
    }

    /// The line for people: the log, a rollout's progress, the timeline.
    pub fn message(&self) -> String {
        let secs = |ms: u64| ms as f64 / 1000.0;
        match self {
            Event::VersionStarted { version } => format!("safelb started serving version {version}"),
            Event::RolloutInterrupted { version } => {
                format!("rollout of version {version} was interrupted by a restart; the running version serves")
            }
            Event::ChangeRefused { author, freeze, until, .. } => {
                format!("change by {author} refused: freeze `{freeze}` until {until}")
            }
            Event::ChangeRejected { version, author, why, .. } => {
                format!("version {version} by {author} rejected: {why}")
            }
            Event::ChangeSubmitted {
                version,
                author,
                reason,
                skip_preflight,
                skip_shadow,
                ..
            } => format!(
                "version {version} submitted by {author}: {reason}{}{}",
                if *skip_preflight { " (preflight SKIPPED)" } else { "" },
                if *skip_shadow { " (shadow SKIPPED)" } else { "" }
            ),
            Event::RollbackApplied {
                version,
                from,
                target,
                author,
                reason,
                ..
            } => format!(
                "manual rollback by {author} from version {from} to the content of version {target} (as version {version}): {reason}"
            ),
            Event::PreflightSkipped { version } => format!("preflight skipped for version {version} (--skip-preflight)"),
            Event::PreflightFailed { problems, .. } => format!("preflight failed: {}", problems.join("; ")),
            Event::PreflightPassed {
                summary, shift_percent, ..
            } => format!("preflight passed: {summary}; {shift_percent:.1}% of recent traffic moves"),
            Event::ShadowSkipped { version } => format!("shadow stage skipped for version {version} (--skip-shadow)"),
            Event::ShadowStarted {
                version,
                share,
                duration_ms,
            } => format!(
                "shadow: {:.0}% of safe requests (GET, HEAD) copied to version {version} for {:.1}s; no client is served by it",
                share * 100.0,
                secs(*duration_ms)
            ),
            Event::ShadowFailed { version, why, .. } => {
                format!("shadow stage failed, no client was served by version {version}: {why}")
            }
            Event::ShadowPassed { report, .. } => format!(
                "shadow passed: {} comparisons on {} route(s), none worse than stable ({} copies dropped over the concurrency bound)",
                report.compared,
                report.routes.len(),
                report.dropped
            ),
            Event::CanaryStepStarted {
                version,
                step,
                steps,
                percent,
            } => format!("step {step}/{steps}: {percent}% of requests on version {version}"),
            Event::CanaryStepLowTraffic {
                step,
                requests,
                elapsed_ms,
                min_requests,
                ..
            } => format!(
                "step {step}: only {requests} requests in {:.0}s, below min_requests {min_requests}; no errors, going on",
                secs(*elapsed_ms)
            ),
            Event::CanaryStepPassed {
                step, steps, percent, ..
            } => format!("step {step}/{steps} passed at {percent}%"),
            Event::RolloutAborted {
                version,
                percent,
                reason,
                rescues,
            } => format!(
                "rollout of version {version} aborted at {percent}%: {reason}; {}",
                describe_rescues(rescues)
            ),
            Event::RolloutRolledBack {
                version,
                reason,
                at: Some((percent, _)),
                elapsed_ms,
                rescues,
                ..
            } => format!(
                "version {version} rolled back at {percent}% after {:.1}s: {reason}; {}",
                secs(*elapsed_ms),
                describe_rescues(rescues)
            ),
            Event::RolloutRolledBack { reason, .. } => reason.clone(),
            Event::RolloutPromoted {
                version,
                elapsed_ms,
                rescues,
            } => format!(
                "version {version} promoted after {:.1}s: now running and known-good; {}",
                secs(*elapsed_ms),
                describe_rescues(rescues)
            ),
            Event::BackendDrained { backend, author } => format!("backend {backend} drained by {author}"),
            Event::BackendUndrained { backend, author } => format!("backend {backend} undrained by {author}"),
            Event::BackendFailedHealthCheck { backend, reason } => {
                format!("backend {backend} failed its health check ({reason}): no new requests")
            }
            Event::BackendPassedHealthCheck { backend } => format!("backend {backend} passed its health check"),
            Event::BackendEjected {
                backend,
                pool,
                cause,
                for_ms,
            } => format!(
                "backend {backend} of pool {pool} ejected for {:.0}s after consecutive failures ({cause})",
                secs(*for_ms)
            ),
            Event::PoolPanicEntered { pool, available, total } => {
                format!("pool {pool} entered panic mode: {available} of {total} backends available")
            }
            Event::PoolPanicLeft { pool, available, total } => {
                format!("pool {pool} left panic mode: {available} of {total} backends available")
            }
            Event::LeaderElected { instance } => format!("instance {instance} is the fleet's leader"),
            Event::FleetStageStarted {
                version,
                stage,
                stages,
                instances,
            } => format!(
                "fleet stage {stage}/{stages}: version {version} starts its canary on {}",
                instances.join(", ")
            ),
            Event::InstanceCanaryPassed { version, elapsed_ms } => format!(
                "version {version} passed its canary on this instance after {:.1}s; it serves it while the fleet's rollout goes on",
                secs(*elapsed_ms)
            ),
            Event::FleetRolloutPromoted {
                version,
                instances,
                elapsed_ms,
            } => format!(
                "version {version} promoted fleet-wide after {:.1}s ({} instances): now running and known-good",
                secs(*elapsed_ms),
                instances.len()
            ),
            Event::FleetRolloutRolledBack {
                version,
                reason,
                instances,
                elapsed_ms,
            } => format!(
                "version {version} rolled back fleet-wide after {:.1}s: {reason}; it had reached {}",
                secs(*elapsed_ms),
                if instances.is_empty() {
                    "no instance".to_string()
                } else {
                    instances.join(", ")
                }
            ),
            Event::VersionRefused { version, why } => {
                format!("version {version} from etcd refused; the running version keeps serving: {why}")
            }
            Event::EtcdReconnected { after_ms } => {
                format!("etcd reachable again after {:.1}s; catching up", *after_ms as f64 / 1000.0)
            }
            Event::AlertPending { alert, value } => format!("alert {alert} pending: {value}"),
            Event::AlertCleared { alert, value } => format!("alert {alert} cleared before firing: {value}"),
            Event::AlertFired {
                alert, severity, value, ..
            } => format!("alert {alert} ({severity}) firing: {value}"),
            Event::AlertResolved { alert, after_ms, value } => {
                format!("alert {alert} resolved after {:.0}s: {value}", *after_ms as f64 / 1000.0)
            }
            Event::IncidentOpened { incident, title } => format!("incident #{incident} opened: {title}"),
            Event::IncidentResolved { incident } => format!("incident #{incident} resolved"),
        }
    }

    /// The stored row: kind, version, message, and the event itself as data.
    pub fn record(&self) -> NewEvent {
        EVENTS.count(self.kind());
        NewEvent {
            kind: self.kind(),
            version: self.version(),
            message: self.message(),
            data: serde_json::to_value(self).unwrap_or_default(),
        }
    }
}

impl From<DataPlaneEvent> for Event {
    fn from(e: DataPlaneEvent) -> Event {
        match e {
            DataPlaneEvent::BackendDown { backend, reason } => Event::BackendFailedHealthCheck { backend, reason },
            DataPlaneEvent::BackendUp { backend } => Event::BackendPassedHealthCheck { backend },
            DataPlaneEvent::BackendEjected {
                backend,
                pool,
                cause,
                for_ms,
            } => Event::BackendEjected {
                backend,
                pool,
                cause: cause.to_string(),
                for_ms,
            },
            DataPlaneEvent::PoolPanic {
                pool,
                entered,
                available,
                total,
            } => {
                if entered {
                    Event::PoolPanicEntered { pool, available, total }
                } else {
                    Event::PoolPanicLeft { pool, available, total }
                }
            }
        }
    }
}

/// "the stable version answered N candidate requests: ..." for rollout events.
pub fn describe_rescues(r: &CanaryTotals) -> String {
    if r.hedges + r.fallbacks + r.rescued + r.rescue_refused == 0 {
        return "no candidate request needed the stable version".into();
    }
    format!(
        "the stable version answered {} candidate request(s): {} hedged after the hedge delay, {} after a candidate failure, {} rescued at the rollback; {} not replayable answered 503",
        r.hedges + r.fallbacks + r.rescued,
        r.hedges,
        r.fallbacks,
        r.rescued,
        r.rescue_refused
    )
}

/// Events recorded since start, by kind (`safelb_events_total`); a kind appears once it occurred.
/// Events are rare (a few per change or alert), so a lock here costs nothing.
pub struct EventCounts(Mutex<BTreeMap<&'static str, u64>>);

pub static EVENTS: EventCounts = EventCounts(Mutex::new(BTreeMap::new()));

impl EventCounts {
    fn count(&self, kind: &'static str) {
        *self.0.lock().expect("event counts lock").entry(kind).or_default() += 1;
    }

    /// (kind, count) for every kind recorded so far.
    pub fn read(&self) -> Vec<(&'static str, u64)> {
        self.0
            .lock()
            .expect("event counts lock")
            .iter()
            .map(|(k, n)| (*k, *n))
            .collect()
    }
}

impl crate::store::EventRecord {
    /// The typed event of a stored row. Rows written by older versions lack fields their kind
    /// has now: the row's kind and version columns fill in, the rest read as defaults. `None` for
    /// a kind this version does not know.
    pub fn event(&self) -> Option<Event> {
        let mut data = match &self.data {
            serde_json::Value::Object(m) => m.clone(),
            _ => serde_json::Map::new(),
        };
        data.entry("kind")
            .or_insert_with(|| serde_json::Value::String(self.kind.clone()));
        if let Some(v) = self.version {
            data.entry("version").or_insert_with(|| v.into());
        }
        serde_json::from_value(serde_json::Value::Object(data)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_row_is_the_event_itself() {
        let events = [
            Event::VersionStarted { version: 3 },
            Event::ChangeSubmitted {
                version: 4,
                author: "ana".into(),
                reason: "more capacity".into(),
                origin: "apply".into(),
                skip_preflight: true,
                skip_shadow: false,
                emergency: false,
            },
            Event::RolloutRolledBack {
                version: 4,
                reason: "candidate error rate 100.0%".into(),
                at: Some((10, 1)),
                candidate: None,
                stable: None,
                elapsed_ms: 420,
                rescues: CanaryTotals {
                    hedges: 4,
                    rescued: 2,
                    ..CanaryTotals::default()
                },
            },
            Event::BackendEjected {
                backend: "127.0.0.1:9001".into(),
                pool: "web".into(),
                cause: "response_timeout".into(),
                for_ms: 10_000,
            },
        ];
        for e in &events {
            let row = e.record();
            assert_eq!(row.kind, e.kind());
            assert_eq!(row.data["kind"], e.kind(), "the data names its kind");
            assert!(
                EVENTS.read().iter().any(|(k, n)| *k == e.kind() && *n > 0),
                "{} is counted",
                e.kind()
            );
            assert_eq!(row.version, e.version());
        }
        assert_eq!(
            events[1].message(),
            "version 4 submitted by ana: more capacity (preflight SKIPPED)"
        );
        assert_eq!(
            events[2].message(),
            "version 4 rolled back at 10% after 0.4s: candidate error rate 100.0%; the stable version answered 6 candidate request(s): 4 hedged after the hedge delay, 0 after a candidate failure, 2 rescued at the rollback; 0 not replayable answered 503"
        );
        assert_eq!(events[2].record().data["rescues"]["rescued"], 2);
    }

    #[test]
    fn stored_rows_read_back_as_events_old_shapes_included() {
        let row = |kind: &str, version: Option<u64>, data: serde_json::Value| crate::store::EventRecord {
            id: 1,
            time_ms: 0,
            kind: kind.into(),
            version,
            message: String::new(),
            data,
        };
        let e = Event::RolloutPromoted {
            version: 7,
            elapsed_ms: 1200,
            rescues: CanaryTotals::default(),
        };
        let r = e.record();
        let back = row(r.kind, r.version, r.data).event().expect("a known kind");
        assert!(matches!(
            back,
            Event::RolloutPromoted {
                version: 7,
                elapsed_ms: 1200,
                ..
            }
        ));
        // A row from before events were typed: data without its kind, fields renamed or absent.
        let old = row(
            "RolloutRolledBack",
            Some(3),
            serde_json::json!({ "reason": "too many errors", "percent": 10, "step": 1 }),
        );
        match old.event() {
            Some(Event::RolloutRolledBack {
                version, reason, at, ..
            }) => {
                assert_eq!((version, reason.as_str(), at), (3, "too many errors", None));
            }
            other => panic!("{other:?}"),
        }
        assert!(row("SomethingNew", None, serde_json::json!({})).event().is_none());
    }
}
