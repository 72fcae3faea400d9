//! The postmortem safelb writes itself. [`gather`] collects the facts of an incident from the
//! event log, the version store and the counters when it resolves, into a typed [`Report`]
//! (stored with the incident as JSON); [`lessons()`] draws the action items from it; and
//! [`markdown::markdown`] renders the document.
//!
//! Every section is filled from records; a fact safelb does not have is written as unknown with
//! the reason, never left blank.

mod lessons;
mod markdown;

pub use lessons::lessons;
pub use markdown::markdown;

use std::collections::{BTreeMap, VecDeque};

use safelb_proxy::hedge::CanaryTotals;
use safelb_proxy::metrics::Metrics;
use serde::{Deserialize, Serialize};

use crate::alerts::Series;
use crate::diff::unified;
use crate::event::Event;
use crate::impact::{preview, Impact as RoutingImpact};
use crate::store::{EventRecord, Fate};
use crate::Controller;

/// Responses and 5xx by (route, pool), cumulative.
pub type RouteCounts = BTreeMap<(String, String), (u64, u64)>;

/// Looking back this far from the incident's opening for the change that caused it.
const TRIGGER_LOOKBACK_MS: i64 = 10 * 60 * 1000;

pub fn route_counts(metrics: &Metrics) -> RouteCounts {
    let mut out = RouteCounts::new();
    for ((route, pool, _), c) in metrics.request_counters() {
        let e = out.entry((route.to_string(), pool.to_string())).or_default();
        let (all, errors) = c.totals();
        e.0 += all;
        e.1 += errors;
    }
    out
}

/// A change that may have caused what followed.
fn is_change(e: &Event) -> bool {
    matches!(
        e,
        Event::ChangeSubmitted { .. } | Event::RollbackApplied { .. } | Event::VersionStarted { .. }
    )
}

/// What ended the harm: a rollback, automatic or by hand.
fn is_mitigation(e: &Event) -> bool {
    matches!(
        e,
        Event::RolloutRolledBack { .. }
            | Event::RolloutAborted { .. }
            | Event::RollbackApplied { .. }
            | Event::FleetRolloutRolledBack { .. }
    )
}

/// The facts of one incident: what the postmortem is written from.
///
/// Stored with the incident as JSON; rows written by older versions read with defaults for
/// what they lack.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    pub incident: u64,
    pub opened_ms: i64,
    pub resolved_ms: i64,
    /// Where the impact window starts: the suspected trigger, or a minute before the opening.
    pub start_ms: i64,
    pub first_failure_ms: Option<u64>,
    pub last_failure_ms: Option<u64>,
    pub impact: Harm,
    /// The alerts that fired during the incident.
    pub alerts: Vec<String>,
    /// The last change before the incident opened, if one was recorded.
    pub trigger: Option<Trigger>,
    pub detection: Option<Detection>,
    pub mitigation: Option<Mitigation>,
    pub timeline: Vec<TimelineEntry>,
    /// Set when the event history could not be read: the trigger is then unknown, not absent.
    pub history_error: Option<String>,
    pub lessons: Vec<String>,
    /// Fleet mode: the instances named in the incident's events (where things happened, and
    /// those a fleet-wide rollback says the candidate reached).
    pub instances: Vec<String>,
}

/// What the incident cost clients.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Harm {
    pub requests: u64,
    pub failed: u64,
    pub error_rate: f64,
    pub distinct_clients: u64,
    pub affected: Vec<Affected>,
    /// Only with an SLO (a `burn_rate` alert).
    pub budget: Option<Budget>,
    pub candidate_requests_answered_by_stable: Protected,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Affected {
    pub route: String,
    pub pool: String,
    pub requests: u64,
    pub failed: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Budget {
    pub slo: f64,
    pub allowed_failures_30d: f64,
    pub burned_percent: f64,
}

/// Candidate requests the stable version answered instead.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Protected {
    pub hedged: u64,
    pub fell_back: u64,
    pub rescued: u64,
    /// Not replayable: answered 503 at the rollback.
    pub refused: u64,
}

/// The change suspected of causing the incident.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Trigger {
    /// The event's kind (`ChangeSubmitted`, `RollbackApplied`, `VersionStarted`).
    pub event: String,
    pub time_ms: i64,
    pub version: u64,
    pub parent: Option<u64>,
    pub author: String,
    pub reason: String,
    pub origin: String,
    pub skip_preflight: bool,
    pub emergency: bool,
    pub fate: Fate,
    /// Unified diff against the parent; empty without a parent.
    pub diff: String,
    /// What it did to routing; `None` when either version no longer passes check.
    pub routing: Option<RoutingImpact>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Detection {
    pub signal: String,
    pub kind: String,
    pub time_ms: i64,
    /// After the start of the impact window.
    pub after_ms: i64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fix {
    #[default]
    #[serde(rename = "automatic rollback")]
    AutomaticRollback,
    #[serde(rename = "manual rollback")]
    ManualRollback,
}

impl Fix {
    pub fn as_str(self) -> &'static str {
        match self {
            Fix::AutomaticRollback => "automatic rollback",
            Fix::ManualRollback => "manual rollback",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Mitigation {
    pub how: Fix,
    pub message: String,
    pub time_ms: i64,
    pub after_ms: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TimelineEntry {
    pub time_ms: i64,
    pub kind: String,
    pub message: String,
}

impl Report {
    /// The report stored with an incident (an unresolved one has none yet: all unknown).
    pub fn from_stored(value: &serde_json::Value) -> Report {
        serde_json::from_value(value.clone()).unwrap_or_default()
    }
}

/// The facts of an incident, as stored with it.
pub async fn gather(
    controller: &Controller,
    id: u64,
    opened_ms: i64,
    resolved_ms: i64,
    global: &Series,
    routes: &VecDeque<(i64, RouteCounts)>,
    alerts: Vec<String>,
) -> Report {
    let store = controller.store();
    // A history that cannot be read is said to be so, not shown as an empty one.
    let (events, history_error) = match store
        .call(move |s| s.events_between(opened_ms - TRIGGER_LOOKBACK_MS, resolved_ms))
        .await
    {
        Ok(events) => (events, None),
        Err(e) => {
            tracing::error!(error = %e, incident = id, "reading the event history for a postmortem failed");
            (Vec::new(), Some(e.to_string()))
        }
    };
    let typed: Vec<(&EventRecord, Option<Event>)> = events.iter().map(|e| (e, e.event())).collect();

    // The suspected trigger: the last change before the incident opened.
    let trigger_event = typed
        .iter()
        .rev()
        .find(|(e, t)| e.time_ms <= opened_ms && t.as_ref().is_some_and(is_change))
        .map(|(e, _)| (*e).clone());
    let trigger = match &trigger_event {
        Some(ev) => trigger(controller, ev).await,
        None => None,
    };
    // The impact window starts at the trigger (if recent) or a minute before the opening.
    let start_ms = trigger_event.as_ref().map_or(opened_ms - 60_000, |e| e.time_ms);
    let (failed, clients, first_failure_ms, last_failure_ms) = controller
        .handle()
        .metrics()
        .failures_between(start_ms.max(0) as u64, resolved_ms.max(0) as u64);
    let at = |ms: i64| global.at_or_before(ms).map_or((0, 0), |s| (s.requests, s.errors));
    // Requests from the once-a-second counters; failures exactly, from the failure record.
    let (requests, failed) = (at(resolved_ms).0.saturating_sub(at(start_ms).0), failed as u64);
    let before = routes
        .iter()
        .rev()
        .find(|(t, _)| *t <= start_ms)
        .or(routes.front())
        .map(|(_, c)| c.clone())
        .unwrap_or_default();
    let after = route_counts(controller.handle().metrics());
    let mut affected = Vec::new();
    for ((route, pool), (all, errors)) in &after {
        let (a0, e0) = before.get(&(route.clone(), pool.clone())).copied().unwrap_or((0, 0));
        let (dr, de) = (all.saturating_sub(a0), errors.saturating_sub(e0));
        if de > 0 {
            affected.push(Affected {
                route: if route.is_empty() {
                    "(no route)".into()
                } else {
                    route.clone()
                },
                pool: pool.clone(),
                requests: dr,
                failed: de,
            });
        }
    }
    let detection = typed
        .iter()
        .find(|(e, t)| {
            e.time_ms >= start_ms
                && matches!(
                    t,
                    Some(
                        Event::AlertFired { .. }
                            | Event::RolloutRolledBack { .. }
                            | Event::FleetRolloutRolledBack { .. }
                    )
                )
        })
        .map(|(e, _)| Detection {
            signal: e.message.clone(),
            kind: e.kind.clone(),
            time_ms: e.time_ms,
            after_ms: e.time_ms - start_ms,
        });
    let mitigation = typed
        .iter()
        .find(|(e, t)| e.time_ms >= start_ms && t.as_ref().is_some_and(is_mitigation))
        .map(|(e, t)| Mitigation {
            how: if matches!(t, Some(Event::RollbackApplied { .. })) {
                Fix::ManualRollback
            } else {
                Fix::AutomaticRollback
            },
            message: e.message.clone(),
            time_ms: e.time_ms,
            after_ms: e.time_ms - start_ms,
        });
    let since = start_ms.min(opened_ms) - 1000;
    let mut timeline: Vec<TimelineEntry> = events
        .iter()
        .filter(|e| e.time_ms >= since)
        .map(|e| TimelineEntry {
            time_ms: e.time_ms,
            kind: e.kind.clone(),
            message: e.message.clone(),
        })
        .collect();
    // The resolution itself is recorded once this report is stored; the timeline ends with it.
    let resolved = Event::IncidentResolved { incident: id }.record();
    timeline.push(TimelineEntry {
        time_ms: resolved_ms,
        kind: resolved.kind.to_string(),
        message: resolved.message,
    });
    // What the stable version answered for candidates during the incident: failures avoided.
    let mut protected = Protected::default();
    for (_, t) in typed.iter().filter(|(e, _)| e.time_ms >= since) {
        let rescues: &CanaryTotals = match t {
            Some(Event::RolloutRolledBack { rescues, .. })
            | Some(Event::RolloutAborted { rescues, .. })
            | Some(Event::RolloutPromoted { rescues, .. }) => rescues,
            _ => continue,
        };
        protected.hedged += rescues.hedges;
        protected.fell_back += rescues.fallbacks;
        protected.rescued += rescues.rescued;
        protected.refused += rescues.rescue_refused;
    }
    let mut report = Report {
        incident: id,
        opened_ms,
        resolved_ms,
        start_ms,
        first_failure_ms,
        last_failure_ms,
        impact: Harm {
            requests,
            failed,
            error_rate: if requests > 0 {
                failed as f64 / requests as f64
            } else {
                0.0
            },
            distinct_clients: clients as u64,
            affected,
            budget: budget(controller, global, failed),
            candidate_requests_answered_by_stable: protected,
        },
        alerts,
        trigger,
        detection,
        mitigation,
        timeline,
        history_error,
        lessons: Vec::new(),
        instances: instances_named(&typed, start_ms.min(opened_ms) - 1000),
    };
    report.lessons = lessons(&report);
    report
}

/// The instances events since `since` name, in name order.
fn instances_named(typed: &[(&EventRecord, Option<Event>)], since: i64) -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    for (e, t) in typed.iter().filter(|(e, _)| e.time_ms >= since) {
        if let Some(name) = e.data["instance"].as_str() {
            names.insert(name.to_string());
        }
        if let Some(Event::FleetRolloutRolledBack { instances, .. }) = t {
            names.extend(instances.iter().cloned());
        }
    }
    names.into_iter().collect()
}

/// The version an event names, with its diff against its parent and its effect on routing.
async fn trigger(controller: &Controller, ev: &EventRecord) -> Option<Trigger> {
    let version = ev.version?;
    let found = controller
        .store()
        .call(move |s| {
            let v = s.version(version)?;
            let parent = match v.as_ref().and_then(|v| v.parent) {
                Some(p) => s.version(p)?,
                None => None,
            };
            Ok((v, parent))
        })
        .await;
    let (v, parent) = match found {
        Ok((Some(v), parent)) => (v, parent),
        Ok((None, _)) => return None,
        Err(e) => {
            tracing::error!(error = %e, version, "reading the trigger's version for a postmortem failed");
            return None;
        }
    };
    let source = v.source.clone().unwrap_or_default();
    let (diff, routing) = match &parent {
        Some(p) => {
            let before = p.source.clone().unwrap_or_default();
            let diff = unified(
                &before,
                &source,
                &format!("version {}", p.id),
                &format!("version {}", v.id),
            );
            let routing = match (
                safelb_config::check("before", &before).config,
                safelb_config::check("after", &source).config,
            ) {
                (Some(b), Some(a)) => Some(preview(&controller.handle().samples().collect(), &b, &a)),
                _ => None,
            };
            (diff, routing)
        }
        None => (String::new(), None),
    };
    Some(Trigger {
        event: ev.kind.clone(),
        time_ms: ev.time_ms,
        version: v.id,
        parent: v.parent,
        author: v.author,
        reason: v.reason,
        origin: v.origin,
        skip_preflight: v.skip_preflight,
        emergency: v.emergency,
        fate: v.fate,
        diff,
        routing,
    })
}

/// The error budget burned: only with an SLO (a `burn_rate` alert), against 30 days at the
/// request rate of the last hour.
fn budget(controller: &Controller, global: &Series, failed: u64) -> Option<Budget> {
    let slo = controller
        .handle()
        .snapshot()
        .config
        .alerts
        .iter()
        .find_map(|a| match a.kind {
            safelb_config::AlertKind::BurnRate { slo } => Some(slo),
            _ => None,
        })?;
    let hour = global.window(std::time::Duration::from_secs(3600));
    let per_second = if hour.covered.is_zero() {
        0.0
    } else {
        hour.requests as f64 / hour.covered.as_secs_f64()
    };
    let allowed = per_second * 30.0 * 86_400.0 * (1.0 - slo);
    Some(Budget {
        slo,
        allowed_failures_30d: allowed.round(),
        burned_percent: if allowed > 0.0 {
            failed as f64 * 100.0 / allowed
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::IncidentRecord;

    fn incident(report: &Report) -> IncidentRecord {
        IncidentRecord {
            id: 7,
            opened_ms: 1_795_000_000_000,
            resolved_ms: Some(1_795_000_030_000),
            title: "Errors: 40% of requests failed".into(),
            report: serde_json::to_value(report).unwrap(),
        }
    }

    fn skipped_preflight() -> Report {
        let mut r = Report {
            incident: 7,
            opened_ms: 1_795_000_000_000,
            resolved_ms: 1_795_000_030_000,
            start_ms: 1_794_999_990_000,
            impact: Harm {
                requests: 1000,
                failed: 40,
                error_rate: 0.04,
                distinct_clients: 3,
                ..Harm::default()
            },
            trigger: Some(Trigger {
                event: "ChangeSubmitted".into(),
                version: 4,
                parent: Some(3),
                author: "ana".into(),
                reason: "move web".into(),
                skip_preflight: true,
                fate: Fate::RolledBack,
                diff: "-a\n+b\n".into(),
                ..Trigger::default()
            }),
            mitigation: Some(Mitigation {
                how: Fix::AutomaticRollback,
                message: "rolled back to version 3".into(),
                after_ms: 2500,
                ..Mitigation::default()
            }),
            ..Report::default()
        };
        r.lessons = lessons(&r);
        r
    }

    #[test]
    fn a_skipped_preflight_is_the_first_lesson_and_the_document_names_it() {
        let r = skipped_preflight();
        assert!(
            r.lessons[0].contains("--skip-preflight by ana for version 4"),
            "{:?}",
            r.lessons
        );
        assert!(r
            .lessons
            .iter()
            .any(|l| l.contains("rolled it back automatically after 2.5s")));
        let md = markdown(&incident(&r));
        assert!(
            md.contains("config version 4 by ana (\"move web\"), applied with preflight skipped"),
            "{md}"
        );
        assert!(md.contains("| preflight | SKIPPED (--skip-preflight) |"), "{md}");
        assert!(md.contains("| fate | rolled_back |"), "{md}");
        assert!(md.contains("automatic rollback ("), "{md}");
        assert!(md.contains("40 failed of 1000 requests (4.00%)"), "{md}");
    }

    #[test]
    fn an_unreadable_history_is_unknown_not_no_change() {
        let mut r = Report {
            history_error: Some("version store: disk I/O error".into()),
            ..Report::default()
        };
        r.lessons = lessons(&r);
        assert!(r.lessons.iter().any(|l| l.contains("could not be read")));
        assert!(!r.lessons.iter().any(|l| l.contains("No configuration change preceded")));
        let md = markdown(&incident(&r));
        assert!(md.contains("unknown: the event history could not be read"), "{md}");
    }

    #[test]
    fn the_stored_shape_reads_back_including_rows_from_older_versions() {
        let r = skipped_preflight();
        assert_eq!(Report::from_stored(&serde_json::to_value(&r).unwrap()), r);
        // A row written before hedging existed, with JSON nulls where facts were unknown.
        let old = serde_json::json!({
            "incident": 2, "opened_ms": 5, "resolved_ms": 9,
            "impact": { "requests": 10, "failed": 1, "error_rate": 0.1, "distinct_clients": 1, "affected": [], "budget": null },
            "trigger": null, "detection": null,
            "mitigation": { "how": "manual rollback", "message": "by hand", "time_ms": 7, "after_ms": 2 },
            "timeline": [{ "time_ms": 6, "kind": "RollbackApplied", "message": "by hand" }],
            "lessons": ["x"],
        });
        let read = Report::from_stored(&old);
        assert_eq!(read.incident, 2);
        assert_eq!(read.mitigation.map(|m| m.how), Some(Fix::ManualRollback));
        assert_eq!(read.impact.candidate_requests_answered_by_stable, Protected::default());
        assert_eq!(read.timeline.len(), 1);
        assert_eq!(Report::from_stored(&serde_json::Value::Null), Report::default());
    }
}
