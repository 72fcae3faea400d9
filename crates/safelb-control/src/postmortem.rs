//! The postmortem safelb writes itself: the facts of an incident gathered from the event log,
//! the version store and the counters when it resolves, and the Markdown document made from them.
//!
//! Every section is filled from records; a fact safelb does not have is written as unknown with
//! the reason, never left blank.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use safelb_proxy::hedge::CanaryTotals;
use safelb_proxy::metrics::Metrics;
use serde_json::{json, Value};

use crate::alerts::Series;
use crate::diff::unified;
use crate::event::Event;
use crate::impact::preview;
use crate::store::{EventRecord, IncidentRecord};
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

fn ts(ms: i64) -> String {
    safelb_proxy::clock::rfc3339_ms(ms)
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
        Event::RolloutRolledBack { .. } | Event::RolloutAborted { .. } | Event::RollbackApplied { .. }
    )
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
) -> Value {
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
    let mut trigger = Value::Null;
    if let Some(ev) = &trigger_event {
        if let Some(version) = ev.version {
            let (v, parent) = store
                .call(move |s| {
                    let v = s.version(version)?;
                    let parent = match v.as_ref().and_then(|v| v.parent) {
                        Some(p) => s.version(p)?,
                        None => None,
                    };
                    Ok((v, parent))
                })
                .await
                .unwrap_or((None, None));
            if let Some(v) = v {
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
                            (Some(b), Some(a)) => {
                                serde_json::to_value(preview(&controller.handle().samples().collect(), &b, &a))
                                    .unwrap_or(Value::Null)
                            }
                            _ => Value::Null,
                        };
                        (diff, routing)
                    }
                    None => (String::new(), Value::Null),
                };
                trigger = json!({
                    "event": ev.kind, "time_ms": ev.time_ms, "version": v.id, "parent": v.parent, "author": v.author,
                    "reason": v.reason, "origin": v.origin, "skip_preflight": v.skip_preflight, "emergency": v.emergency,
                    "fate": v.fate, "diff": diff, "routing": routing,
                });
            }
        }
    }
    // The impact window starts at the trigger (if recent) or a minute before the opening.
    let start_ms = trigger_event.as_ref().map_or(opened_ms - 60_000, |e| e.time_ms);
    let (failed, clients, first_fail, last_fail) = controller
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
            affected.push(json!({ "route": if route.is_empty() { "(no route)" } else { route }, "pool": pool, "requests": dr, "failed": de }));
        }
    }
    // Error budget: only with an SLO (a burn_rate alert); measured against 30 days at the
    // request rate of the last hour.
    let slo = controller
        .handle()
        .snapshot()
        .config
        .alerts
        .iter()
        .find_map(|a| match a.kind {
            safelb_config::AlertKind::BurnRate { slo } => Some(slo),
            _ => None,
        });
    let budget = slo.map(|slo| {
        let hour = global.window(std::time::Duration::from_secs(3600));
        let per_second = if hour.covered.is_zero() { 0.0 } else { hour.requests as f64 / hour.covered.as_secs_f64() };
        let month = per_second * 30.0 * 86_400.0;
        let allowed = month * (1.0 - slo);
        json!({ "slo": slo, "allowed_failures_30d": allowed.round(), "burned_percent": if allowed > 0.0 { failed as f64 * 100.0 / allowed } else { 0.0 } })
    });
    let detection = typed
        .iter()
        .find(|(e, t)| {
            e.time_ms >= start_ms && matches!(t, Some(Event::AlertFired { .. } | Event::RolloutRolledBack { .. }))
        })
        .map(
            |(e, _)| json!({ "signal": e.message, "kind": e.kind, "time_ms": e.time_ms, "after_ms": e.time_ms - start_ms }),
        );
    let mitigation = typed
        .iter()
        .find(|(e, t)| e.time_ms >= start_ms && t.as_ref().is_some_and(is_mitigation))
        .map(|(e, t)| {
            let how = if matches!(t, Some(Event::RollbackApplied { .. })) {
                "manual rollback"
            } else {
                "automatic rollback"
            };
            json!({ "how": how, "message": e.message, "time_ms": e.time_ms, "after_ms": e.time_ms - start_ms })
        });
    let timeline: Vec<Value> = events
        .iter()
        .filter(|e| e.time_ms >= start_ms.min(opened_ms) - 1000)
        .map(|e| json!({ "time_ms": e.time_ms, "kind": e.kind, "message": e.message }))
        .collect();
    // What the stable version answered for candidates during the incident: failures avoided.
    let mut protected = CanaryTotals::default();
    for (_, t) in typed
        .iter()
        .filter(|(e, _)| e.time_ms >= start_ms.min(opened_ms) - 1000)
    {
        let rescues = match t {
            Some(Event::RolloutRolledBack { rescues, .. })
            | Some(Event::RolloutAborted { rescues, .. })
            | Some(Event::RolloutPromoted { rescues, .. }) => rescues,
            _ => continue,
        };
        protected.hedges += rescues.hedges;
        protected.fallbacks += rescues.fallbacks;
        protected.rescued += rescues.rescued;
        protected.rescue_refused += rescues.rescue_refused;
    }
    let mut report = json!({
        "incident": id,
        "opened_ms": opened_ms,
        "resolved_ms": resolved_ms,
        "start_ms": start_ms,
        "first_failure_ms": first_fail,
        "last_failure_ms": last_fail,
        "impact": {
            "requests": requests, "failed": failed,
            "error_rate": if requests > 0 { failed as f64 / requests as f64 } else { 0.0 },
            "distinct_clients": clients, "affected": affected, "budget": budget,
            "candidate_requests_answered_by_stable": {
                "hedged": protected.hedges, "fell_back": protected.fallbacks, "rescued": protected.rescued, "refused": protected.rescue_refused,
            },
        },
        "alerts": alerts,
        "trigger": trigger,
        "detection": detection,
        "mitigation": mitigation,
        "timeline": timeline,
        "history_error": history_error,
    });
    report["lessons"] = json!(lessons(&report));
    report
}

fn lessons(r: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let t = &r["trigger"];
    if t["skip_preflight"] == json!(true) {
        out.push(format!(
            "Preflight was skipped with --skip-preflight by {} for version {} (\"{}\"). Action: allow --skip-preflight only with a second approver, and fix whatever made skipping it tempting.",
            t["author"].as_str().unwrap_or("unknown"),
            t["version"],
            t["reason"].as_str().unwrap_or("")
        ));
    }
    if let Some(e) = r["history_error"].as_str() {
        out.push(format!("The event history could not be read ({e}), so whether a change caused this is unknown: check the store (`safelb history`) before concluding anything."));
    } else if t.is_null() {
        out.push("No configuration change preceded the incident: look at the backends and their dependencies, not at safelb's config.".into());
    }
    match r["mitigation"]["how"].as_str() {
        Some("automatic rollback") => out.push(format!(
            "The canary caught the change and safelb rolled it back automatically after {:.1}s. Action: keep the first canary step small so that such a change reaches few requests.",
            r["mitigation"]["after_ms"].as_i64().unwrap_or(0) as f64 / 1000.0
        )),
        Some("manual rollback") => out.push(format!(
            "Mitigation needed a manual rollback after {:.1}s. Action: add an alert or a canary limit that would have rolled this change back by itself.",
            r["mitigation"]["after_ms"].as_i64().unwrap_or(0) as f64 / 1000.0
        )),
        _ => out.push("The incident ended without a rollback. Action: confirm what ended it and whether a rollback would have ended it sooner.".into()),
    }
    if r["alerts"].as_array().is_none_or(|a| a.is_empty()) {
        out.push("No [[alert]] fired; detection relied on the canary verdict. Action: add an error_rate alert so problems outside rollouts are caught too.".into());
    }
    if let Some(after) = r["detection"]["after_ms"].as_i64().filter(|a| *a > 60_000) {
        out.push(format!(
            "Detection took {:.0}s. Action: shorten the alert's `window` or `for`.",
            after as f64 / 1000.0
        ));
    }
    if r["impact"]["budget"].is_null() {
        out.push(
            "No SLO is configured, so the error budget burned is unknown. Action: add a burn_rate alert with `slo`."
                .into(),
        );
    }
    if r["impact"]["failed"].as_u64() == Some(0) {
        out.push("No client request failed: failed candidate requests were answered by the stable version. Keep that protection: it covers bodiless idempotent requests only.".into());
    }
    out
}

fn or_unknown(v: &Value, why: &str) -> String {
    match v {
        Value::Null => format!("unknown ({why})"),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The postmortem document in Markdown.
pub fn markdown(incident: &IncidentRecord) -> String {
    let r = &incident.report;
    let mut md = String::new();
    let resolved = incident.resolved_ms;
    let _ = writeln!(md, "# Postmortem: incident #{} — {}\n", incident.id, incident.title);
    let _ = writeln!(md, "*Written by safelb from its event log, version store and counters. Edit freely; the facts below are measured.*\n");

    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(md, "- **Date:** {}", ts(incident.opened_ms));
    let duration = match (r["first_failure_ms"].as_i64(), r["last_failure_ms"].as_i64()) {
        (Some(a), Some(b)) => format!(
            "{:.0} s of failed requests ({} to {})",
            ((b - a) as f64 / 1000.0).max(1.0),
            ts(a),
            ts(b)
        ),
        _ => "no failed request was recorded".into(),
    };
    let open_for = resolved.map_or("unknown (not resolved yet)".into(), |e| {
        format!("{:.0} s", (e - incident.opened_ms) as f64 / 1000.0)
    });
    let _ = writeln!(md, "- **Duration:** {duration}; incident open for {open_for}");
    let t = &r["trigger"];
    let root = if let Some(e) = r["history_error"].as_str() {
        format!("unknown: the event history could not be read ({e})")
    } else if t.is_null() {
        "unknown (no configuration change in the 10 minutes before the incident)".to_string()
    } else {
        format!(
            "config version {} by {} (\"{}\"){}",
            t["version"],
            t["author"].as_str().unwrap_or("unknown"),
            t["reason"].as_str().unwrap_or(""),
            if t["skip_preflight"] == json!(true) {
                ", applied with preflight skipped"
            } else {
                ""
            }
        )
    };
    let _ = writeln!(md, "- **Root cause:** {root}");
    let imp = &r["impact"];
    let saved = &imp["candidate_requests_answered_by_stable"];
    let saved_total: u64 = ["hedged", "fell_back", "rescued"]
        .iter()
        .map(|k| saved[k].as_u64().unwrap_or(0))
        .sum();
    let _ = writeln!(
        md,
        "- **Impact:** {} failed of {} requests ({:.2}%), {} distinct client(s) affected{}",
        imp["failed"],
        imp["requests"],
        imp["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
        imp["distinct_clients"],
        if saved_total > 0 {
            format!(
                "; {saved_total} candidate request(s) answered by the stable version instead ({} hedged, {} rescued at the rollback)",
                saved["hedged"], saved["rescued"]
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        md,
        "- **Resolution:** {}\n",
        r["mitigation"]["message"]
            .as_str()
            .map_or("unknown (no rollback was recorded)".to_string(), str::to_string)
    );

    let _ = writeln!(md, "## Root cause analysis\n");
    if t.is_null() {
        let _ = writeln!(md, "No configuration change was recorded in the 10 minutes before the incident opened; the cause lies outside safelb's config (backends, network, clients).\n");
    } else {
        let _ = writeln!(md, "| fact | value |\n| --- | --- |");
        let _ = writeln!(
            md,
            "| version | {} (parent {}) |",
            t["version"],
            or_unknown(&t["parent"], "first version")
        );
        let _ = writeln!(md, "| author | {} |", t["author"].as_str().unwrap_or("unknown"));
        let _ = writeln!(md, "| reason | {} |", t["reason"].as_str().unwrap_or(""));
        let _ = writeln!(
            md,
            "| submitted | {} via {} |",
            ts(t["time_ms"].as_i64().unwrap_or(0)),
            t["origin"].as_str().unwrap_or("unknown")
        );
        let _ = writeln!(
            md,
            "| preflight | {} |",
            if t["skip_preflight"] == json!(true) {
                "SKIPPED (--skip-preflight)"
            } else {
                "ran"
            }
        );
        let _ = writeln!(md, "| fate | {} |\n", t["fate"].as_str().unwrap_or("unknown"));
        let diff = t["diff"].as_str().unwrap_or("");
        if diff.is_empty() {
            let _ = writeln!(md, "The diff is unknown (no parent version to compare with).\n");
        } else {
            let _ = writeln!(md, "The change:\n\n```diff\n{}```\n", diff);
        }
        match t["routing"]["moves"].as_array() {
            Some(moves) if !moves.is_empty() => {
                let _ = writeln!(
                    md,
                    "What it did to routing ({} recent requests replayed):\n",
                    t["routing"]["samples"]
                );
                for m in moves {
                    let _ = writeln!(
                        md,
                        "- {:.1}% of requests moved from `{}` to `{}`",
                        m["percent"].as_f64().unwrap_or(0.0),
                        m["from"].as_str().unwrap_or(""),
                        m["to"].as_str().unwrap_or("")
                    );
                }
                md.push('\n');
            }
            Some(_) => {
                let _ = writeln!(md, "It moved no request to another pool: it changed what the pools point at (backends, timeouts, policies).\n");
            }
            None => {
                let _ = writeln!(
                    md,
                    "Its effect on routing is unknown (one of the versions no longer passes check).\n"
                );
            }
        }
    }

    let _ = writeln!(md, "## Impact\n");
    let _ = writeln!(md, "| measure | value |\n| --- | --- |");
    let _ = writeln!(md, "| requests during the incident | {} |", imp["requests"]);
    let _ = writeln!(md, "| failed requests (5xx to clients) | {} |", imp["failed"]);
    let _ = writeln!(
        md,
        "| error rate | {:.2}% |",
        imp["error_rate"].as_f64().unwrap_or(0.0) * 100.0
    );
    let _ = writeln!(md, "| distinct clients with a failure | {} |", imp["distinct_clients"]);
    let saved = &imp["candidate_requests_answered_by_stable"];
    if saved.is_object() {
        let _ = writeln!(
            md,
            "| candidate requests answered by the stable version | {} hedged, {} after a candidate failure, {} rescued at the rollback ({} not replayable answered 503) |",
            saved["hedged"], saved["fell_back"], saved["rescued"], saved["refused"]
        );
    }
    let budget = &imp["budget"];
    let budget_text = if budget.is_null() {
        "unknown (no SLO configured: add a burn_rate alert with `slo`)".to_string()
    } else {
        format!(
            "{:.3}% of the 30-day budget of a {:.2}% SLO",
            budget["burned_percent"].as_f64().unwrap_or(0.0),
            budget["slo"].as_f64().unwrap_or(0.0) * 100.0
        )
    };
    let _ = writeln!(md, "| error budget burned | {budget_text} |\n");
    match imp["affected"].as_array() {
        Some(a) if !a.is_empty() => {
            let _ = writeln!(md, "| route | pool | requests | failed |\n| --- | --- | --- | --- |");
            for x in a {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} |",
                    x["route"].as_str().unwrap_or(""),
                    x["pool"].as_str().unwrap_or(""),
                    x["requests"],
                    x["failed"]
                );
            }
            md.push('\n');
        }
        _ => {
            let _ = writeln!(md, "No route served a failed request.\n");
        }
    }

    let _ = writeln!(md, "## Detection\n");
    match r["detection"].as_object() {
        Some(d) => {
            let _ = writeln!(
                md,
                "Detected by: {}.\n\nTime to detect: {:.1} s after the change or first error.\n",
                d["signal"].as_str().unwrap_or(""),
                d["after_ms"].as_i64().unwrap_or(0) as f64 / 1000.0
            );
        }
        None => {
            let _ = writeln!(md, "Unknown: neither an alert nor a canary verdict was recorded.\n");
        }
    }
    let _ = writeln!(md, "## Mitigation and resolution\n");
    match r["mitigation"].as_object() {
        Some(m) => {
            let _ = writeln!(
                md,
                "{} ({}): {}.\n\nTime to mitigate: {:.1} s.\n",
                m["how"].as_str().unwrap_or(""),
                ts(m["time_ms"].as_i64().unwrap_or(0)),
                m["message"].as_str().unwrap_or(""),
                m["after_ms"].as_i64().unwrap_or(0) as f64 / 1000.0
            );
        }
        None => {
            let _ = writeln!(
                md,
                "No rollback was recorded; the incident resolved when its alerts did.\n"
            );
        }
    }
    let _ = writeln!(
        md,
        "## Timeline (UTC)\n\n| time | event | what happened |\n| --- | --- | --- |"
    );
    for e in r["timeline"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            ts(e["time_ms"].as_i64().unwrap_or(0)),
            e["kind"].as_str().unwrap_or(""),
            e["message"].as_str().unwrap_or("").replace('|', "\\|")
        );
    }
    let _ = writeln!(md, "\n## Lessons learned and action items\n");
    for l in r["lessons"].as_array().into_iter().flatten() {
        let _ = writeln!(md, "- {}", l.as_str().unwrap_or(""));
    }
    md
}
