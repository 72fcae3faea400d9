//! Alert rules on live traffic: counters sampled once a second into windows, each rule's
//! condition, and the pending -> firing -> resolved state machine.

use std::collections::VecDeque;
use std::time::Duration;

use safelb_config::{AlertKind, AlertRule};
use safelb_proxy::metrics::p99_seconds;

/// Samples kept per scope: six hours at one a second covers the longest burn-rate window.
const KEEP: usize = 6 * 3600 + 10;

/// Cumulative counters of one scope at one moment.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub ms: i64,
    pub requests: u64,
    pub errors: u64,
    /// Non-cumulative latency buckets (only for scopes a latency rule watches).
    pub latency: Option<Vec<u64>>,
}

/// The samples of one scope (all traffic, one route or one pool).
#[derive(Default, Debug)]
pub struct Series {
    samples: VecDeque<Sample>,
}

/// What happened in a window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    pub latency: Option<Vec<u64>>,
    /// How much time the window really covers (less than asked right after start).
    pub covered: Duration,
}

impl Window {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

impl Series {
    pub fn push(&mut self, s: Sample) {
        if self.samples.len() >= KEEP {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    /// The change over the last `span` (or over what is kept, if less).
    pub fn window(&self, span: Duration) -> Window {
        let Some(last) = self.samples.back() else {
            return Window::default();
        };
        let since = last.ms - span.as_millis() as i64;
        let first = self.samples.iter().find(|s| s.ms >= since).unwrap_or(last);
        Window {
            requests: last.requests.saturating_sub(first.requests),
            errors: last.errors.saturating_sub(first.errors),
            latency: match (&last.latency, &first.latency) {
                (Some(a), Some(b)) => Some(a.iter().zip(b).map(|(x, y)| x.saturating_sub(*y)).collect()),
                _ => None,
            },
            covered: Duration::from_millis((last.ms - first.ms).max(0) as u64),
        }
    }

    /// Samples between two times, oldest first.
    pub fn between(&self, from_ms: i64, to_ms: i64) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.ms >= from_ms && s.ms <= to_ms)
    }

    pub fn at_or_before(&self, ms: i64) -> Option<&Sample> {
        self.samples.iter().rev().find(|s| s.ms <= ms).or(self.samples.front())
    }
}

/// The SRE workbook's multiwindow pairs: (long window, short window, burn-rate factor).
pub const BURN_WINDOWS: [(Duration, Duration, f64); 2] = [
    (Duration::from_secs(3600), Duration::from_secs(300), 14.4),
    (Duration::from_secs(6 * 3600), Duration::from_secs(1800), 6.0),
];

/// Whether a rule's condition holds now, with a one-line description of the value.
pub fn condition(
    rule: &AlertRule,
    series: &Series,
    no_healthy: &[String],
    last_rollback_age: Option<Duration>,
) -> (bool, String) {
    match &rule.kind {
        AlertKind::ErrorRate { threshold } => {
            let w = series.window(rule.window);
            let active = w.requests >= rule.min_requests && w.error_rate() > *threshold;
            (
                active,
                format!(
                    "error rate {:.1}% ({} of {} requests in {:.0}s), threshold {:.1}%",
                    w.error_rate() * 100.0,
                    w.errors,
                    w.requests,
                    w.covered.as_secs_f64(),
                    threshold * 100.0
                ),
            )
        }
        AlertKind::LatencyP99 { threshold } => {
            let w = series.window(rule.window);
            let p99 = w.latency.as_deref().and_then(p99_seconds);
            let active = w.requests >= rule.min_requests && p99.is_some_and(|p| p > threshold.as_secs_f64());
            (
                active,
                format!(
                    "p99 latency {}, threshold {:?}",
                    p99.map_or("unknown".into(), |p| format!("{:.0}ms", p * 1000.0)),
                    threshold
                ),
            )
        }
        AlertKind::NoHealthyBackends => {
            let active = !no_healthy.is_empty();
            (
                active,
                if active {
                    format!("no healthy backend in pool(s) {}", no_healthy.join(", "))
                } else {
                    "every pool has a healthy backend".into()
                },
            )
        }
        AlertKind::BurnRate { slo } => {
            let budget = 1.0 - slo;
            let mut worst = (false, String::new());
            for (long, short, factor) in BURN_WINDOWS {
                let (l, s) = (series.window(long), series.window(short));
                let (bl, bs) = (l.error_rate() / budget, s.error_rate() / budget);
                let active = s.requests >= rule.min_requests && bl > factor && bs > factor;
                let text = format!(
                    "burn rate {bl:.1}x over {} and {bs:.1}x over {} (threshold {factor}x, SLO {:.3}%)",
                    human(long),
                    human(short),
                    slo * 100.0
                );
                if active || worst.1.is_empty() {
                    worst = (active, text);
                }
                if active {
                    break;
                }
            }
            worst
        }
        AlertKind::Rollback { hold } => match last_rollback_age {
            Some(age) if age < *hold => (true, format!("a rollout was rolled back {:.0}s ago", age.as_secs_f64())),
            _ => (false, "no recent rollback".into()),
        },
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else {
        format!("{}m", s / 60)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Inactive,
    Pending { since_ms: i64 },
    Firing { since_ms: i64 },
}

/// What a tick did to one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    BecamePending,
    Fired,
    Resolved {
        fired_ms: i64,
    },
    /// The condition cleared while pending: no notification, just an event.
    Cleared,
}

/// How much earlier than `for` a pending rule may fire. Rules are evaluated on the monitor's
/// one-second ticks, whose timestamps wander by a few milliseconds: without this, a `for` of
/// 3 s held through four ticks would fire on the fifth whenever the fourth came 1 ms early.
const TICK_SLACK_MS: i64 = 100;

/// Steps a rule's state machine.
pub fn step(state: State, active: bool, for_: Duration, now_ms: i64) -> (State, Transition) {
    match (state, active) {
        (State::Inactive, true) if for_.is_zero() => (State::Firing { since_ms: now_ms }, Transition::Fired),
        (State::Inactive, true) => (State::Pending { since_ms: now_ms }, Transition::BecamePending),
        (State::Pending { since_ms }, true) if now_ms - since_ms + TICK_SLACK_MS >= for_.as_millis() as i64 => {
            (State::Firing { since_ms: now_ms }, Transition::Fired)
        }
        (State::Pending { .. }, false) => (State::Inactive, Transition::Cleared),
        (State::Firing { since_ms }, false) => (State::Inactive, Transition::Resolved { fired_ms: since_ms }),
        (s, _) => (s, Transition::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(points: &[(i64, u64, u64)]) -> Series {
        let mut s = Series::default();
        for &(ms, requests, errors) in points {
            s.push(Sample {
                ms,
                requests,
                errors,
                latency: None,
            });
        }
        s
    }

    #[test]
    fn windows_take_deltas() {
        let s = series(&[(0, 0, 0), (1000, 100, 0), (2000, 200, 50), (3000, 300, 100)]);
        let w = s.window(Duration::from_secs(2));
        assert_eq!((w.requests, w.errors), (200, 100));
        assert_eq!(w.covered, Duration::from_secs(2));
        assert_eq!(s.window(Duration::from_secs(60)).requests, 300);
    }

    #[test]
    fn pending_then_firing_then_resolved() {
        let f = Duration::from_secs(2);
        let (s, t) = step(State::Inactive, true, f, 0);
        assert_eq!(t, Transition::BecamePending);
        let (s, t) = step(s, true, f, 1000);
        assert_eq!(t, Transition::None);
        // A tick that comes a millisecond early still fires; one 200 ms early does not.
        assert_eq!(step(s, true, f, 1800).1, Transition::None);
        let (s, t) = step(s, true, f, 1999);
        assert_eq!((s, t), (State::Firing { since_ms: 1999 }, Transition::Fired));
        let (s, t) = step(s, false, f, 5000);
        assert_eq!((s, t), (State::Inactive, Transition::Resolved { fired_ms: 1999 }));
        assert_eq!(step(State::Pending { since_ms: 0 }, false, f, 1).1, Transition::Cleared);
        assert_eq!(step(State::Inactive, true, Duration::ZERO, 7).1, Transition::Fired);
    }

    #[test]
    fn burn_rate_needs_both_windows() {
        let rule = AlertRule {
            name: "b".into(),
            kind: AlertKind::BurnRate { slo: 0.99 },
            route: None,
            pool: None,
            window: Duration::from_secs(60),
            for_: Duration::ZERO,
            severity: "page".into(),
            labels: vec![],
            min_requests: 10,
        };
        // 50% errors over the last 5 minutes, nothing before: both the 1h and 5m windows burn
        // far above 14.4x of a 1% budget.
        let s = series(&[(0, 0, 0), (300_000, 1000, 500)]);
        let (active, text) = condition(&rule, &s, &[], None);
        assert!(active, "{text}");
        // 2% errors: 2x burn, below both factors.
        let s = series(&[(0, 0, 0), (300_000, 1000, 20)]);
        assert!(!condition(&rule, &s, &[], None).0);
    }
}
