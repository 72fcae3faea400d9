//! The action items a postmortem proposes, drawn from its report.

use super::{Fix, Report};

/// The action items a report calls for.
pub fn lessons(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(t) = r.trigger.as_ref().filter(|t| t.skip_preflight) {
        out.push(format!(
            "Preflight was skipped with --skip-preflight by {} for version {} (\"{}\"). Action: allow --skip-preflight only with a second approver, and fix whatever made skipping it tempting.",
            t.author, t.version, t.reason
        ));
    }
    if let Some(e) = &r.history_error {
        out.push(format!("The event history could not be read ({e}), so whether a change caused this is unknown: check the store (`safelb history`) before concluding anything."));
    } else if r.trigger.is_none() {
        out.push("No configuration change preceded the incident: look at the backends and their dependencies, not at safelb's config.".into());
    }
    match &r.mitigation {
        Some(m) if m.how == Fix::AutomaticRollback => out.push(format!(
            "The canary caught the change and safelb rolled it back automatically after {:.1}s. Action: keep the first canary step small so that such a change reaches few requests.",
            m.after_ms as f64 / 1000.0
        )),
        Some(m) => out.push(format!(
            "Mitigation needed a manual rollback after {:.1}s. Action: add an alert or a canary limit that would have rolled this change back by itself.",
            m.after_ms as f64 / 1000.0
        )),
        None => out.push("The incident ended without a rollback. Action: confirm what ended it and whether a rollback would have ended it sooner.".into()),
    }
    if r.alerts.is_empty() {
        out.push("No [[alert]] fired; detection relied on the canary verdict. Action: add an error_rate alert so problems outside rollouts are caught too.".into());
    }
    if let Some(after) = r.detection.as_ref().map(|d| d.after_ms).filter(|a| *a > 60_000) {
        out.push(format!(
            "Detection took {:.0}s. Action: shorten the alert's `window` or `for`.",
            after as f64 / 1000.0
        ));
    }
    if r.impact.budget.is_none() {
        out.push(
            "No SLO is configured, so the error budget burned is unknown. Action: add a burn_rate alert with `slo`."
                .into(),
        );
    }
    if r.impact.failed == 0 {
        out.push("No client request failed: failed candidate requests were answered by the stable version. Keep that protection: it covers bodiless idempotent requests only.".into());
    }
    out
}
