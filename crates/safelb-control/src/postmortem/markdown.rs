//! The postmortem document: a [`Report`] rendered as Markdown.

use std::fmt::Write as _;

use super::{Report, Trigger};
use crate::store::IncidentRecord;

fn ts(ms: i64) -> String {
    safelb_proxy::clock::rfc3339_ms(ms)
}

/// The postmortem of an incident, from the report stored with it.
pub fn markdown(incident: &IncidentRecord) -> String {
    let r = Report::from_stored(&incident.report);
    let mut md = String::new();
    let _ = writeln!(md, "# Postmortem: incident #{} — {}\n", incident.id, incident.title);
    let _ = writeln!(md, "*Written by safelb from its event log, version store and counters. Edit freely; the facts below are measured.*\n");
    summary(&mut md, incident, &r);
    root_cause(&mut md, r.trigger.as_ref());
    impact(&mut md, &r);
    response(&mut md, &r);
    let _ = writeln!(
        md,
        "## Timeline (UTC)\n\n| time | event | what happened |\n| --- | --- | --- |"
    );
    for e in &r.timeline {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            ts(e.time_ms),
            e.kind,
            e.message.replace('|', "\\|")
        );
    }
    let _ = writeln!(md, "\n## Lessons learned and action items\n");
    for l in &r.lessons {
        let _ = writeln!(md, "- {l}");
    }
    md
}

fn summary(md: &mut String, incident: &IncidentRecord, r: &Report) {
    let _ = writeln!(md, "## Summary\n");
    let _ = writeln!(md, "- **Date:** {}", ts(incident.opened_ms));
    let duration = match (r.first_failure_ms, r.last_failure_ms) {
        (Some(a), Some(b)) => format!(
            "{:.0} s of failed requests ({} to {})",
            (b.saturating_sub(a) as f64 / 1000.0).max(1.0),
            ts(a as i64),
            ts(b as i64)
        ),
        _ => "no failed request was recorded".into(),
    };
    let open_for = incident.resolved_ms.map_or("unknown (not resolved yet)".into(), |e| {
        format!("{:.0} s", (e - incident.opened_ms) as f64 / 1000.0)
    });
    let _ = writeln!(md, "- **Duration:** {duration}; incident open for {open_for}");
    let root = match (&r.history_error, &r.trigger) {
        (Some(e), _) => format!("unknown: the event history could not be read ({e})"),
        (None, None) => "unknown (no configuration change in the 10 minutes before the incident)".to_string(),
        (None, Some(t)) => format!(
            "config version {} by {} (\"{}\"){}",
            t.version,
            t.author,
            t.reason,
            if t.skip_preflight {
                ", applied with preflight skipped"
            } else {
                ""
            }
        ),
    };
    let _ = writeln!(md, "- **Root cause:** {root}");
    let imp = &r.impact;
    let saved = &imp.candidate_requests_answered_by_stable;
    let saved_total = saved.hedged + saved.fell_back + saved.rescued;
    let _ = writeln!(
        md,
        "- **Impact:** {} failed of {} requests ({:.2}%), {} distinct client(s) affected{}",
        imp.failed,
        imp.requests,
        imp.error_rate * 100.0,
        imp.distinct_clients,
        if saved_total > 0 {
            format!(
                "; {saved_total} candidate request(s) answered by the stable version instead ({} hedged, {} rescued at the rollback)",
                saved.hedged, saved.rescued
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        md,
        "- **Resolution:** {}\n",
        r.mitigation
            .as_ref()
            .map_or("unknown (no rollback was recorded)", |m| m.message.as_str())
    );
}

fn root_cause(md: &mut String, trigger: Option<&Trigger>) {
    let _ = writeln!(md, "## Root cause analysis\n");
    let Some(t) = trigger else {
        let _ = writeln!(md, "No configuration change was recorded in the 10 minutes before the incident opened; the cause lies outside safelb's config (backends, network, clients).\n");
        return;
    };
    let _ = writeln!(md, "| fact | value |\n| --- | --- |");
    let parent = t
        .parent
        .map_or("unknown (first version)".to_string(), |p| p.to_string());
    let _ = writeln!(md, "| version | {} (parent {parent}) |", t.version);
    let _ = writeln!(md, "| author | {} |", t.author);
    let _ = writeln!(md, "| reason | {} |", t.reason);
    let _ = writeln!(md, "| submitted | {} via {} |", ts(t.time_ms), t.origin);
    let preflight = if t.skip_preflight {
        "SKIPPED (--skip-preflight)"
    } else {
        "ran"
    };
    let _ = writeln!(md, "| preflight | {preflight} |");
    let _ = writeln!(md, "| fate | {} |\n", t.fate.as_str());
    if t.diff.is_empty() {
        let _ = writeln!(md, "The diff is unknown (no parent version to compare with).\n");
    } else {
        let _ = writeln!(md, "The change:\n\n```diff\n{}```\n", t.diff);
    }
    match &t.routing {
        Some(routing) if !routing.moves.is_empty() => {
            let _ = writeln!(
                md,
                "What it did to routing ({} recent requests replayed):\n",
                routing.samples
            );
            for m in &routing.moves {
                let _ = writeln!(
                    md,
                    "- {:.1}% of requests moved from `{}` to `{}`",
                    m.percent, m.from, m.to
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

fn impact(md: &mut String, r: &Report) {
    let imp = &r.impact;
    let _ = writeln!(md, "## Impact\n");
    let _ = writeln!(md, "| measure | value |\n| --- | --- |");
    let _ = writeln!(md, "| requests during the incident | {} |", imp.requests);
    let _ = writeln!(md, "| failed requests (5xx to clients) | {} |", imp.failed);
    let _ = writeln!(md, "| error rate | {:.2}% |", imp.error_rate * 100.0);
    let _ = writeln!(md, "| distinct clients with a failure | {} |", imp.distinct_clients);
    let saved = &imp.candidate_requests_answered_by_stable;
    let _ = writeln!(
        md,
        "| candidate requests answered by the stable version | {} hedged, {} after a candidate failure, {} rescued at the rollback ({} not replayable answered 503) |",
        saved.hedged, saved.fell_back, saved.rescued, saved.refused
    );
    let budget = match &imp.budget {
        None => "unknown (no SLO configured: add a burn_rate alert with `slo`)".to_string(),
        Some(b) => format!(
            "{:.3}% of the 30-day budget of a {:.2}% SLO",
            b.burned_percent,
            b.slo * 100.0
        ),
    };
    let _ = writeln!(md, "| error budget burned | {budget} |");
    if !r.instances.is_empty() {
        let _ = writeln!(md, "| instances involved | {} |", r.instances.join(", "));
    }
    md.push('\n');
    if imp.affected.is_empty() {
        let _ = writeln!(md, "No route served a failed request.\n");
        return;
    }
    let _ = writeln!(md, "| route | pool | requests | failed |\n| --- | --- | --- | --- |");
    for x in &imp.affected {
        let _ = writeln!(md, "| {} | {} | {} | {} |", x.route, x.pool, x.requests, x.failed);
    }
    md.push('\n');
}

fn response(md: &mut String, r: &Report) {
    let _ = writeln!(md, "## Detection\n");
    match &r.detection {
        Some(d) => {
            let _ = writeln!(
                md,
                "Detected by: {}.\n\nTime to detect: {:.1} s after the change or first error.\n",
                d.signal,
                d.after_ms as f64 / 1000.0
            );
        }
        None => {
            let _ = writeln!(md, "Unknown: neither an alert nor a canary verdict was recorded.\n");
        }
    }
    let _ = writeln!(md, "## Mitigation and resolution\n");
    match &r.mitigation {
        Some(m) => {
            let _ = writeln!(
                md,
                "{} ({}): {}.\n\nTime to mitigate: {:.1} s.\n",
                m.how.as_str(),
                ts(m.time_ms),
                m.message,
                m.after_ms as f64 / 1000.0
            );
        }
        None => {
            let _ = writeln!(
                md,
                "No rollback was recorded; the incident resolved when its alerts did.\n"
            );
        }
    }
}
