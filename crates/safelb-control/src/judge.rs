//! The canary verdict: the candidate's window against the stable version's window.

use safelb_config::Rollout;
use safelb_proxy::shadow::ShadowReport;
use safelb_proxy::stats::StatsSnapshot;

/// One side of a verdict, as events, the API and the postmortem show it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct WindowView {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p99_ms: Option<u64>,
}

impl From<&StatsSnapshot> for WindowView {
    fn from(s: &StatsSnapshot) -> Self {
        WindowView {
            requests: s.requests,
            errors: s.errors,
            error_rate: s.error_rate(),
            p99_ms: s.p99().map(|d| d.as_millis() as u64),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Within every limit, with enough requests to say so.
    Pass,
    /// Too few candidate requests for a verdict.
    Wait,
    /// A limit was broken; the text names it with the numbers.
    Breach(String),
}

/// Below this absolute difference the ratio rule does not fire: 0.3% against 0.1% is a ratio
/// of 3 but not a reason to roll back.
const RATIO_FLOOR: f64 = 0.005;

pub fn judge(candidate: &StatsSnapshot, stable: &StatsSnapshot, policy: &Rollout) -> Verdict {
    let rate = candidate.error_rate();
    let pct = |r: f64| r * 100.0;
    // A clear breach needs no minimum count: enough errors alone exceed the ceiling at any
    // request count from `min_requests / 4` on, so a failing candidate is cut early.
    let early_floor = (policy.min_requests / 4).max(3);
    if candidate.requests >= early_floor && rate > policy.max_error_rate {
        return Verdict::Breach(format!(
            "candidate error rate {:.1}% ({} of {} requests) exceeds max_error_rate {:.1}% (stable: {:.1}% of {})",
            pct(rate),
            candidate.errors,
            candidate.requests,
            pct(policy.max_error_rate),
            pct(stable.error_rate()),
            stable.requests
        ));
    }
    if candidate.requests < policy.min_requests {
        return Verdict::Wait;
    }
    let stable_rate = stable.error_rate();
    if stable.requests > 0 && rate > stable_rate * policy.max_error_ratio && rate - stable_rate > RATIO_FLOOR {
        return Verdict::Breach(format!(
            "candidate error rate {:.2}% is {:.1}x the stable version's {:.2}% (max_error_ratio {:.1})",
            pct(rate),
            if stable_rate > 0.0 {
                rate / stable_rate
            } else {
                f64::INFINITY
            },
            pct(stable_rate),
            policy.max_error_ratio
        ));
    }
    if let (Some(max), Some(p99)) = (policy.max_p99, candidate.p99()) {
        if p99 > max {
            return Verdict::Breach(format!("candidate p99 latency {p99:?} exceeds max_p99 {max:?}"));
        }
    }
    Verdict::Pass
}

/// Routes with fewer bad comparisons than this never fail the shadow stage: one slow answer
/// is not a verdict.
const SHADOW_MIN_BAD: u64 = 3;

/// The shadow stage's verdict: `Some(why)` when a route's candidate answers were worse than
/// stable's (5xx or no answer where stable was fine, 404 where stable had a route, much slower)
/// in more than `max_error_rate` of its comparisons; the text names routes, statuses and counts.
pub fn judge_shadow(report: &ShadowReport, policy: &Rollout) -> Option<String> {
    let breaches: Vec<String> = report
        .routes
        .iter()
        .filter(|(_, r)| r.bad() >= SHADOW_MIN_BAD && r.bad() as f64 > r.compared as f64 * policy.max_error_rate)
        .map(|(name, r)| {
            let pairs: Vec<String> = r.mismatches.iter().map(|(k, n)| format!("{k} x{n}")).collect();
            format!(
                "route `{name}`: {} of {} copies worse than stable ({} failed, {} not found, {} much slower, {} answered by a new untested redirect or fixed answer; {})",
                r.bad(),
                r.compared,
                r.failed,
                r.not_found,
                r.slow,
                r.answered,
                if pairs.is_empty() {
                    "same status classes".to_string()
                } else {
                    pairs.join(", ")
                }
            )
        })
        .collect();
    (!breaches.is_empty()).then(|| breaches.join("; "))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use safelb_proxy::stats::Stats;

    use super::*;

    fn window(requests: u64, errors: u64, latency_ms: u64) -> StatsSnapshot {
        let s = Stats::default();
        for i in 0..requests {
            s.record(i < errors, Duration::from_millis(latency_ms));
        }
        s.read()
    }

    #[test]
    fn verdicts() {
        let p = Rollout {
            min_requests: 20,
            max_p99: Some(Duration::from_millis(100)),
            ..Rollout::default()
        };
        assert_eq!(judge(&window(10, 0, 1), &window(100, 0, 1), &p), Verdict::Wait);
        assert_eq!(judge(&window(40, 0, 1), &window(100, 0, 1), &p), Verdict::Pass);
        // Clear breach before min_requests.
        assert!(matches!(judge(&window(6, 6, 1), &window(100, 0, 1), &p), Verdict::Breach(m) if m.contains("6 of 6")));
        // Ratio: 1.5% against 0.1% (below the absolute ceiling of 2%).
        assert!(
            matches!(judge(&window(200, 3, 1), &window(1000, 1, 1), &p), Verdict::Breach(m) if m.contains("x the stable"))
        );
        // Ratio under the absolute floor does not fire: 0.4% against 0.1%.
        assert_eq!(judge(&window(1000, 4, 1), &window(1000, 1, 1), &p), Verdict::Pass);
        assert!(matches!(judge(&window(40, 0, 400), &window(100, 0, 1), &p), Verdict::Breach(m) if m.contains("p99")));
    }

    fn route(compared: u64, failed: u64, not_found: u64, slow: u64) -> safelb_proxy::shadow::RouteShadow {
        safelb_proxy::shadow::RouteShadow {
            compared,
            failed,
            not_found,
            slow,
            answered: 0,
            mismatches: [("stable 200 / candidate 500".to_string(), failed)]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn shadow_verdicts_name_the_routes_that_got_worse() {
        let p = Rollout::default();
        let report = |routes: Vec<(&str, safelb_proxy::shadow::RouteShadow)>| ShadowReport {
            compared: routes.iter().map(|(_, r)| r.compared).sum(),
            routes: routes.into_iter().map(|(n, r)| (n.to_string(), r)).collect(),
            dropped: 0,
            in_flight: 0,
        };
        assert_eq!(judge_shadow(&report(vec![("api", route(100, 0, 0, 0))]), &p), None);
        // Two bad copies are not a verdict, whatever the share.
        assert_eq!(judge_shadow(&report(vec![("api", route(2, 2, 0, 0))]), &p), None);
        // 3 of 200 (1.5%) is under max_error_rate (2%).
        assert_eq!(judge_shadow(&report(vec![("api", route(200, 3, 0, 0))]), &p), None);
        let why = judge_shadow(
            &report(vec![("api", route(100, 0, 0, 0)), ("shop", route(40, 30, 5, 1))]),
            &p,
        )
        .expect("a breach");
        assert!(why.contains("route `shop`: 36 of 40 copies worse"), "{why}");
        assert!(why.contains("stable 200 / candidate 500 x30"), "{why}");
        assert!(!why.contains("`api`"), "{why}");
    }
}
