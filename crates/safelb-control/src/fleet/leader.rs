//! The leader's part of a fleet rollout: assign the stages, judge each from its members'
//! reports, then move on, promote or roll back fleet-wide. [`decide`] is the pure decision;
//! [`drive`] carries it out with fenced writes and records it.

use std::sync::Arc;

use safelb_config::Rollout;
use safelb_proxy::stats::StatsSnapshot;

use super::{store::id_key, Fleet, FleetPhase, FleetRollout, InstanceRecord, Outcome, LEASE_TTL_S, ROLLOUT, RUNNING};
use crate::clock::unix_ms;
use crate::event::Event;
use crate::judge::{judge, Verdict};
use crate::store::Fate;
use crate::StoreHandle;

/// A stage that has not finished after this long is rolled back.
const STAGE_LIMIT_MS: i64 = 30 * 60 * 1000;

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Wait,
    /// Start the rollout with these stages (instance names per stage).
    Assign(Vec<Vec<String>>),
    /// Every live member of the current stage passed: go on to stage `.0`.
    NextStage(usize),
    /// The current stage has no live member left: these stages instead.
    Reassign(Vec<Vec<String>>),
    Promote,
    RollBack {
        reason: String,
        /// Refused before serving traffic anywhere (the fate is `rejected`).
        rejected: bool,
    },
}

/// Splits the live instances (sorted by name) into stages: `stages` are cumulative instance
/// counts, and a last stage takes the rest. `[1]`: one instance, then all the others.
pub fn assign(live: &[String], stages: &[u32]) -> Vec<Vec<String>> {
    let mut names = live.to_vec();
    names.sort();
    let mut out = Vec::new();
    let mut taken = 0usize;
    for &upto in stages {
        let upto = (upto as usize).min(names.len());
        if upto > taken {
            out.push(names[taken..upto].to_vec());
            taken = upto;
        }
    }
    if taken < names.len() {
        out.push(names[taken..].to_vec());
    }
    out
}

/// Instances whose heartbeat is fresh.
pub fn live(instances: &[InstanceRecord], now_ms: i64) -> Vec<&InstanceRecord> {
    instances
        .iter()
        .filter(|i| now_ms - i.heartbeat_ms <= (LEASE_TTL_S * 1000) as i64)
        .collect()
}

pub fn decide(r: &FleetRollout, instances: &[InstanceRecord], policy: &Rollout, now_ms: i64) -> Decision {
    let live = live(instances, now_ms);
    let names: Vec<String> = live.iter().map(|i| i.name.clone()).collect();
    match r.phase {
        FleetPhase::Pending if names.is_empty() => Decision::Wait,
        FleetPhase::Pending => Decision::Assign(assign(&names, &policy.fleet_stages)),
        FleetPhase::Running => running(r, &live, policy, now_ms),
        _ => Decision::Wait,
    }
}

fn running(r: &FleetRollout, live: &[&InstanceRecord], policy: &Rollout, now_ms: i64) -> Decision {
    let report = |i: &InstanceRecord| i.report.clone().filter(|rep| rep.version == r.version);
    let reached: Vec<&&InstanceRecord> = live.iter().filter(|i| r.has_reached(&i.name)).collect();
    if let Some((i, rep)) = reached.iter().find_map(|i| {
        report(i)
            .filter(|rep| matches!(rep.outcome, Outcome::Failed | Outcome::Rejected))
            .map(|rep| (i, rep))
    }) {
        let passed_anywhere = reached
            .iter()
            .any(|i| report(i).is_some_and(|p| p.outcome == Outcome::Passed));
        return Decision::RollBack {
            reason: format!(
                "instance {}: {}",
                i.name,
                rep.verdict.unwrap_or_else(|| "its canary failed".into())
            ),
            rejected: rep.outcome == Outcome::Rejected && !passed_anywhere,
        };
    }
    if now_ms - r.started_ms > STAGE_LIMIT_MS * r.stages.len().max(1) as i64 {
        return Decision::RollBack {
            reason: format!(
                "the rollout did not finish within {} minutes per stage",
                STAGE_LIMIT_MS / 60_000
            ),
            rejected: false,
        };
    }
    let Some(members) = r.stages.get(r.stage) else {
        return Decision::Promote;
    };
    let alive: Vec<&&InstanceRecord> = live.iter().filter(|i| members.contains(&i.name)).collect();
    if alive.is_empty() {
        // Its members are gone (killed, partitioned): the next instance of a later stage takes
        // their place, so that no stage passes without evidence.
        let mut stages = r.stages.clone();
        let later = stages.iter().enumerate().skip(r.stage + 1).find_map(|(s, names)| {
            names
                .iter()
                .position(|n| live.iter().any(|i| &i.name == n))
                .map(|p| (s, p))
        });
        return match later {
            Some((s, p)) => {
                let name = stages[s].remove(p);
                stages[r.stage] = vec![name];
                stages.retain(|names| !names.is_empty());
                Decision::Reassign(stages)
            }
            None if reached
                .iter()
                .any(|i| report(i).is_some_and(|p| p.outcome == Outcome::Passed)) =>
            {
                Decision::Promote
            }
            None => Decision::Wait,
        };
    }
    if !alive
        .iter()
        .all(|i| report(i).is_some_and(|p| p.outcome == Outcome::Passed))
    {
        return Decision::Wait;
    }
    // The fleet's candidate against its stable traffic, over every instance that ran it.
    let (mut candidate, mut stable) = (StatsSnapshot::default(), StatsSnapshot::default());
    for rep in reached.iter().filter_map(|i| report(i)) {
        candidate.requests += rep.candidate.requests;
        candidate.errors += rep.candidate.errors;
        stable.requests += rep.stable.requests;
        stable.errors += rep.stable.errors;
    }
    if let Verdict::Breach(why) = judge(&candidate, &stable, policy) {
        return Decision::RollBack {
            reason: format!("across the fleet's stage {}: {why}", r.stage + 1),
            rejected: false,
        };
    }
    if r.stage + 1 < r.stages.len() {
        Decision::NextStage(r.stage + 1)
    } else {
        Decision::Promote
    }
}

/// One step of the leader: decides on the rollout in progress and carries the decision out.
/// Returns what a fleet-wide rollback it made was, for the incident it opens.
pub async fn drive(fleet: Arc<Fleet>, store: StoreHandle, policy: Rollout) -> Option<String> {
    let seen = fleet.seen();
    let (mut r, rev) = seen.rollout.clone()?;
    if r.phase.is_final() {
        return None;
    }
    let now = unix_ms();
    let decision = decide(&r, &seen.instances, &policy, now);
    let version = r.version;
    let mut puts = Vec::new();
    let event = match decision.clone() {
        Decision::Wait => return None,
        Decision::Assign(stages) | Decision::Reassign(stages) => {
            let first = r.phase == FleetPhase::Pending;
            r.phase = FleetPhase::Running;
            r.stages = stages;
            let names = r.stages[r.stage].clone();
            let line = format!(
                "fleet stage {}/{}: version {version} on {}{}",
                r.stage + 1,
                r.stages.len(),
                names.join(", "),
                if first { "" } else { " (its members are gone)" }
            );
            r.progress.push(line);
            Event::FleetStageStarted {
                version,
                stage: r.stage + 1,
                stages: r.stages.len(),
                instances: names,
            }
        }
        Decision::NextStage(next) => {
            r.stage = next;
            let names = r.stages[next].clone();
            r.progress.push(format!(
                "fleet stage {}/{}: version {version} on {}",
                next + 1,
                r.stages.len(),
                names.join(", ")
            ));
            Event::FleetStageStarted {
                version,
                stage: next + 1,
                stages: r.stages.len(),
                instances: names,
            }
        }
        Decision::Promote | Decision::RollBack { .. } => {
            let promote = decision == Decision::Promote;
            let fleet2 = fleet.clone();
            let record = match tokio::task::spawn_blocking(move || fleet2.store_version(version)).await {
                Ok(Ok(Some(v))) => v,
                other => {
                    tracing::error!(version, ?other, "cannot read the rollout's version to finish it");
                    return None;
                }
            };
            let mut record = record;
            let reached: Vec<String> = r.stages.iter().take(r.stage + 1).flatten().cloned().collect();
            let elapsed_ms = (now - r.started_ms).max(0) as u64;
            r.finished_ms = Some(now);
            let event = if promote {
                record.fate = Fate::KnownGood;
                r.phase = FleetPhase::Promoted;
                r.verdict = Some("promoted: every fleet stage passed".into());
                puts.push((RUNNING.to_string(), version.to_string().into_bytes()));
                Event::FleetRolloutPromoted {
                    version,
                    instances: reached,
                    elapsed_ms,
                }
            } else {
                let Decision::RollBack { reason, rejected } = decision else {
                    unreachable!()
                };
                record.fate = if rejected { Fate::Rejected } else { Fate::RolledBack };
                r.phase = if rejected {
                    FleetPhase::Rejected
                } else {
                    FleetPhase::RolledBack
                };
                r.verdict = Some(format!("rolled back fleet-wide: {reason}"));
                Event::FleetRolloutRolledBack {
                    version,
                    reason,
                    instances: reached,
                    elapsed_ms,
                }
            };
            r.progress.push(event.message());
            puts.push((
                id_key("versions", version),
                serde_json::to_vec(&record).unwrap_or_default(),
            ));
            event
        }
    };
    puts.push((ROLLOUT.to_string(), serde_json::to_vec(&r).unwrap_or_default()));
    let fleet2 = fleet.clone();
    match tokio::task::spawn_blocking(move || fleet2.fenced(rev, puts)).await {
        Ok(Ok(true)) => {
            store.record(&event).await;
            fleet.wake.notify_one();
            if let Event::FleetRolloutRolledBack { reason, .. } = &event {
                return Some(format!("fleet rollout of version {version} rolled back: {reason}"));
            }
        }
        Ok(Ok(false)) => tracing::info!(
            version,
            "the rollout record moved on, or leadership was lost; deciding again"
        ),
        Ok(Err(e)) => tracing::warn!(error = %e, version, "the leader's write failed; deciding again"),
        Err(e) => tracing::error!(error = %e, "the leader's write task failed"),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::MemberReport;
    use crate::judge::WindowView;

    fn instance(name: &str, report: Option<(Outcome, u64, u64)>) -> InstanceRecord {
        InstanceRecord {
            name: name.into(),
            heartbeat_ms: 1_000,
            report: report.map(|(outcome, requests, errors)| MemberReport {
                version: 2,
                outcome,
                verdict: Some(format!("{outcome:?}")),
                candidate: WindowView {
                    requests,
                    errors,
                    ..WindowView::default()
                },
                stable: WindowView {
                    requests: 1_000,
                    ..WindowView::default()
                },
            }),
            ..InstanceRecord::default()
        }
    }

    fn rollout(stage: usize) -> FleetRollout {
        FleetRollout {
            version: 2,
            from: 1,
            author: "t".into(),
            confirm: false,
            skip_preflight: false,
            skip_shadow: false,
            phase: FleetPhase::Running,
            stages: vec![vec!["a".into()], vec!["b".into(), "c".into()]],
            stage,
            verdict: None,
            progress: vec![],
            started_ms: 0,
            finished_ms: None,
        }
    }

    #[test]
    fn stages_are_one_instance_then_the_rest_by_default() {
        let names: Vec<String> = ["c", "a", "b"].iter().map(|s| s.to_string()).collect();
        let policy = Rollout::default();
        assert_eq!(assign(&names, &policy.fleet_stages), [vec!["a"], vec!["b", "c"]]);
        assert_eq!(assign(&names, &[1, 2]), [vec!["a"], vec!["b"], vec!["c"]]);
        assert_eq!(assign(&names[..1], &[1]), [vec!["c"]]);
        assert_eq!(assign(&names, &[5]), [vec!["a", "b", "c"]]);
    }

    #[test]
    fn a_stage_moves_on_only_when_every_live_member_passed() {
        let p = Rollout::default();
        let running = [instance("a", Some((Outcome::Running, 0, 0))), instance("b", None)];
        assert_eq!(decide(&rollout(0), &running, &p, 1_000), Decision::Wait);
        let passed = [instance("a", Some((Outcome::Passed, 100, 0))), instance("b", None)];
        assert_eq!(decide(&rollout(0), &passed, &p, 1_000), Decision::NextStage(1));
        let last = [
            instance("a", Some((Outcome::Passed, 100, 0))),
            instance("b", Some((Outcome::Passed, 100, 0))),
            instance("c", Some((Outcome::Running, 10, 0))),
        ];
        assert_eq!(decide(&rollout(1), &last, &p, 1_000), Decision::Wait);
        let done = [
            instance("a", Some((Outcome::Passed, 100, 0))),
            instance("b", Some((Outcome::Passed, 100, 0))),
            instance("c", Some((Outcome::Passed, 100, 0))),
        ];
        assert_eq!(decide(&rollout(1), &done, &p, 1_000), Decision::Promote);
    }

    #[test]
    fn one_failed_member_rolls_the_fleet_back_and_a_stale_one_is_not_live() {
        let p = Rollout::default();
        let failed = [instance("a", Some((Outcome::Failed, 100, 90))), instance("b", None)];
        match decide(&rollout(0), &failed, &p, 1_000) {
            Decision::RollBack { reason, rejected } => {
                assert!(reason.starts_with("instance a: Failed"), "{reason}");
                assert!(!rejected);
            }
            d => panic!("{d:?}"),
        }
        // The only member of stage 1 stopped heartbeating: the next live instance takes over.
        let mut gone = instance("a", Some((Outcome::Running, 0, 0)));
        gone.heartbeat_ms = -10_000;
        let others = [gone, instance("b", None), instance("c", None)];
        assert_eq!(
            decide(&rollout(0), &others, &p, 1_000),
            Decision::Reassign(vec![vec!["b".into()], vec!["c".into()]])
        );
    }

    #[test]
    fn the_fleet_judges_the_sum_of_its_members() {
        let p = Rollout::default();
        // Each member alone passed its own canary; together the candidate fails 5% of requests.
        let members = [
            instance("a", Some((Outcome::Passed, 100, 5))),
            instance("b", Some((Outcome::Passed, 100, 5))),
            instance("c", Some((Outcome::Passed, 100, 5))),
        ];
        assert!(matches!(
            decide(&rollout(1), &members, &p, 1_000),
            Decision::RollBack { rejected: false, .. }
        ));
    }
}
