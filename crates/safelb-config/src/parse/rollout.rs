//! `[rollout]` (with its `shadow` and `hedge_after`) and `[[change_freeze]]`: the change policy.

use super::*;

pub(super) fn rollout(d: &mut Diagnostics, s: &Section<'_, '_>) -> Rollout {
    s.deny_unknown(
        d,
        &[
            "canary_steps",
            "step_bake",
            "max_error_rate",
            "max_error_ratio",
            "max_p99",
            "min_requests",
            "max_traffic_shift",
            "sticky",
            "preflight",
            "hedge_after",
            "shadow",
            "fleet_stages",
        ],
    );
    let def = Rollout::default();
    let hedge_after = match s.get("hedge_after").map(|v| v.get_ref()) {
        None => def.hedge_after,
        Some(DeValue::Boolean(false)) => None,
        Some(_) => hedge_after(d, s, "hedge_after", "`hedge_after` of [rollout]").or(def.hedge_after),
    };
    let canary_steps = match s.get("canary_steps") {
        None => def.canary_steps.clone(),
        Some(v) => {
            let steps: Vec<u8> = as_array(d, v, "`canary_steps` in [rollout]")
                .unwrap_or(&[])
                .iter()
                .filter_map(|i| as_uint(d, i, "a canary step", 100).map(|n| n as u8))
                .collect();
            let ascending = steps.windows(2).all(|w| w[0] < w[1]);
            if steps.is_empty() || !ascending || steps.last() != Some(&100) || steps[0] == 0 {
                d.error(
                    Rule::InvalidValue,
                    v.span(),
                    "`canary_steps` must be ascending percentages above 0 ending at 100",
                )
                .hint("e.g. canary_steps = [5, 25, 100]");
                def.canary_steps.clone()
            } else {
                steps
            }
        }
    };
    let fleet_stages = match s.get("fleet_stages") {
        None => def.fleet_stages.clone(),
        Some(v) => {
            let stages: Vec<u32> = as_array(d, v, "`fleet_stages` in [rollout]")
                .unwrap_or(&[])
                .iter()
                .filter_map(|i| as_uint(d, i, "a fleet stage", 100_000).map(|n| n as u32))
                .collect();
            if stages.is_empty() || stages[0] == 0 || !stages.windows(2).all(|w| w[0] < w[1]) {
                d.error(
                    Rule::InvalidValue,
                    v.span(),
                    "`fleet_stages` must be ascending instance counts above 0 (a last stage takes the rest)",
                )
                .hint("e.g. fleet_stages = [1, 3]: one instance, then two more, then the rest");
                def.fleet_stages.clone()
            } else {
                stages
            }
        }
    };
    let (probes, timeout) = match s.section(d, "preflight") {
        None => (def.preflight_probes, def.preflight_timeout),
        Some(p) => {
            p.deny_unknown(d, &["probes", "timeout"]);
            (
                p.uint(d, "probes", 20)
                    .map_or(def.preflight_probes, |n| n.max(1) as u32),
                p.duration(d, "timeout").unwrap_or(def.preflight_timeout),
            )
        }
    };
    Rollout {
        canary_steps,
        step_bake: s.duration(d, "step_bake").unwrap_or(def.step_bake),
        max_error_rate: s.float(d, "max_error_rate", 0.0, 1.0).unwrap_or(def.max_error_rate),
        max_error_ratio: s.float(d, "max_error_ratio", 1.0, 1e6).unwrap_or(def.max_error_ratio),
        max_p99: s.duration(d, "max_p99"),
        min_requests: s.uint(d, "min_requests", 1_000_000).unwrap_or(def.min_requests),
        max_traffic_shift: s
            .float(d, "max_traffic_shift", 0.0, 100.0)
            .unwrap_or(def.max_traffic_shift),
        sticky: s.bool(d, "sticky").unwrap_or(def.sticky),
        preflight_probes: probes,
        preflight_timeout: timeout,
        hedge_after,
        shadow: shadow(d, s),
        fleet_stages,
    }
}

/// `shadow = false`, or `shadow = { duration, share, min_requests, concurrency }`; on by default.
pub(super) fn shadow(d: &mut Diagnostics, s: &Section<'_, '_>) -> Option<ShadowPolicy> {
    let def = ShadowPolicy::default();
    let sh = match s.switch(d, "shadow") {
        Switch::Default => return Some(def),
        Switch::Off => return None,
        Switch::Table(sh) => sh,
    };
    sh.deny_unknown(d, &["duration", "share", "min_requests", "concurrency"]);
    let duration = sh.duration(d, "duration").unwrap_or(def.duration);
    if duration.is_zero() {
        d.error(
            Rule::InvalidValue,
            sh.key_span("duration"),
            "`shadow.duration` must be above zero",
        )
        .hint("`shadow = false` turns the stage off");
    }
    Some(ShadowPolicy {
        duration,
        share: sh.float(d, "share", 0.0, 1.0).unwrap_or(def.share),
        min_requests: sh.uint(d, "min_requests", 1_000_000).unwrap_or(def.min_requests),
        concurrency: sh
            .uint(d, "concurrency", 10_000)
            .map_or(def.concurrency, |n| n.max(1) as u32),
    })
}

/// `"auto"` or a duration above zero.
pub(super) fn hedge_after(d: &mut Diagnostics, s: &Section<'_, '_>, key: &str, what: &str) -> Option<HedgeAfter> {
    let v = s.get(key)?;
    if let DeValue::String(text) = v.get_ref() {
        if text.as_ref() == "auto" {
            return Some(HedgeAfter::Auto);
        }
    }
    let after = s.duration(d, key)?;
    if after.is_zero() {
        d.error(Rule::InvalidValue, v.span(), format!("{what} must be above zero"))
            .hint("\"auto\" derives it from the observed latency");
        return None;
    }
    Some(HedgeAfter::Fixed(after))
}

pub(super) fn change_freezes(d: &mut Diagnostics, top: &Section<'_, '_>) -> Vec<ChangeFreeze> {
    let Some(list) = top.get("change_freeze") else {
        return Vec::new();
    };
    let Some(items) = as_array(d, list, "`change_freeze`") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let Some(f) = as_section(d, item, format!("change_freeze #{}", i + 1)) else {
            continue;
        };
        f.deny_unknown(d, &["start", "end", "reason"]);
        f.require(d, "start", "2026-12-24T00:00:00Z");
        f.require(d, "end", "2026-12-27T00:00:00Z");
        let (Some(start), Some(end)) = (f.datetime(d, "start"), f.datetime(d, "end")) else {
            continue;
        };
        if end <= start {
            d.error(
                Rule::InvalidValue,
                f.key_span("end"),
                format!("change_freeze #{}: `end` must be after `start`", i + 1),
            );
            continue;
        }
        let reason = f
            .str(d, "reason")
            .map_or_else(|| "change freeze".to_string(), |r| r.get_ref().to_string());
        out.push(ChangeFreeze { reason, start, end });
    }
    out
}
