//! One rollout: preflight, then canary steps each judged after its bake, then promotion — or
//! rejection before any traffic, or rollback the moment the candidate breaks a limit.
//!
//! The task owns every transition of its rollout; a manual rollback cancels it with a reason
//! and the task itself takes candidate traffic to zero and records the outcome.

use std::sync::{Arc, Mutex};
use std::time::Duration;

// tokio's clock, so that the rollout's timing runs under a paused clock in tests.
use tokio::time::Instant;

use safelb_config::ValidConfig;
use safelb_proxy::hedge::CanaryTotals;
use safelb_proxy::shadow::ShadowReport;
use safelb_proxy::ProxyHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::clock::unix_ms;
use crate::event::Event;
use crate::judge::{judge, Verdict, WindowView};
use crate::preflight::{self, PreflightReport};
use crate::store::Fate;
use crate::StoreHandle;

/// How often a step's window is judged; a clear breach rolls back within this much.
const JUDGE_EVERY: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Preflight,
    Shadow,
    Canary,
    Promoted,
    RolledBack,
    Rejected,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Promoted | Phase::RolledBack | Phase::Rejected)
    }
}

/// What `GET /api/v1/rollouts/{id}` shows.
#[derive(Clone, Debug, Serialize)]
pub struct RolloutStatus {
    /// The candidate version's id (one rollout per version).
    pub id: u64,
    pub from_version: u64,
    pub phase: Phase,
    pub steps: Vec<u8>,
    /// Index of the current (or last) step in `steps`.
    pub step: usize,
    pub percent: u8,
    pub step_bake_ms: u64,
    /// When the current canary step began (its bake ends `step_bake_ms` later).
    pub step_started_ms: Option<i64>,
    pub skip_preflight: bool,
    pub skip_shadow: bool,
    /// What the shadow stage found (once it ran).
    pub shadow: Option<ShadowReport>,
    /// The current step's window for the candidate and the stable version.
    pub candidate: WindowView,
    pub stable: WindowView,
    /// Both since the canary began (what a fleet's leader sums over its instances).
    pub candidate_total: WindowView,
    pub stable_total: WindowView,
    /// Why it ended as it did.
    pub verdict: Option<String>,
    pub preflight: Option<PreflightReport>,
    pub started_ms: i64,
    pub finished_ms: Option<i64>,
    /// One line per step taken, for people.
    pub progress: Vec<String>,
}

impl RolloutStatus {
    /// A rollout of version `id` replacing `from`, about to start its preflight.
    pub fn new(
        id: u64,
        from: u64,
        policy: &safelb_config::Rollout,
        skip_preflight: bool,
        skip_shadow: bool,
    ) -> RolloutStatus {
        RolloutStatus {
            id,
            from_version: from,
            phase: Phase::Preflight,
            steps: policy.canary_steps.clone(),
            step: 0,
            percent: 0,
            step_bake_ms: policy.step_bake.as_millis() as u64,
            step_started_ms: None,
            skip_preflight,
            skip_shadow,
            shadow: None,
            candidate: WindowView::default(),
            stable: WindowView::default(),
            candidate_total: WindowView::default(),
            stable_total: WindowView::default(),
            verdict: None,
            preflight: None,
            started_ms: unix_ms(),
            finished_ms: None,
            progress: Vec::new(),
        }
    }
}

pub(crate) struct RolloutTask {
    pub handle: ProxyHandle,
    pub store: StoreHandle,
    pub candidate: ValidConfig,
    pub running: ValidConfig,
    pub status: Arc<Mutex<RolloutStatus>>,
    pub cancel: CancellationToken,
    pub abort_reason: Arc<Mutex<Option<String>>>,
    pub confirm: bool,
    /// A member's canary in a fleet rollout: the leader records fates and moves the running
    /// pointer; a pass here only means this instance serves the candidate until the fleet's
    /// verdict.
    pub fleet_member: bool,
}

impl RolloutTask {
    fn update(&self, f: impl FnOnce(&mut RolloutStatus)) {
        f(&mut self.status.lock().expect("status lock is never poisoned"));
    }

    fn id(&self) -> u64 {
        self.status.lock().expect("status lock is never poisoned").id
    }

    async fn event(&self, event: Event) {
        self.update(|s| s.progress.push(event.message()));
        self.store.record(&event).await;
    }

    /// Records the version's fate, then publishes the final phase: whoever sees the rollout end
    /// finds its fate in the history and may apply the next change at once.
    async fn finish(&self, phase: Phase, fate: Fate, verdict: String) -> Phase {
        let id = self.id();
        if !self.fleet_member {
            if let Err(e) = self.store.call(move |s| s.set_fate(id, fate)).await {
                tracing::error!(error = %e, "recording a version's fate failed");
            }
        }
        self.update(|s| {
            s.phase = phase;
            s.verdict = Some(verdict);
            s.finished_ms = Some(unix_ms());
        });
        phase
    }

    pub async fn run(self) -> Phase {
        let policy = self.running.rollout.clone();
        let id = self.id();
        let skip = self.status.lock().expect("status lock").skip_preflight;
        let started = Instant::now();

        let mut probed = Vec::new();
        if skip {
            self.event(Event::PreflightSkipped { version: id }).await;
        } else {
            let samples = self.handle.samples().collect();
            let report = tokio::select! {
                r = preflight::run(&self.candidate, &self.running, &policy, &samples, self.confirm) => r,
                _ = self.cancel.cancelled() => {
                    let reason = self.abort_reason();
                    return self.finish(Phase::Rejected, Fate::Rejected, format!("aborted during preflight: {reason}")).await;
                }
            };
            self.update(|s| s.preflight = Some(report.clone()));
            if !report.passed {
                let why = report.problems.join("; ");
                self.event(Event::PreflightFailed {
                    version: id,
                    problems: report.problems.clone(),
                })
                .await;
                return self
                    .finish(Phase::Rejected, Fate::Rejected, format!("rejected at preflight: {why}"))
                    .await;
            }
            self.event(Event::PreflightPassed {
                version: id,
                summary: report.summary(),
                shift_percent: report.impact.shift_percent,
                pools: report.pool_counts(),
            })
            .await;
            probed = report.probed();
        }

        if let Some(phase) = self.shadow_stage(&policy, &probed).await {
            return phase;
        }

        let candidate = match self
            .handle
            .begin_canary(self.candidate.clone(), id, policy.sticky, &probed)
        {
            Ok(c) => c,
            Err(e) => {
                return self
                    .finish(Phase::Rejected, Fate::Rejected, format!("rejected: {e}"))
                    .await
            }
        };
        let stable = self.handle.snapshot();
        self.update(|s| s.phase = Phase::Canary);
        let steps = policy.canary_steps.clone();
        let (c_begin, s_begin) = (candidate.stats.read(), stable.stats.read());
        for (i, &percent) in steps.iter().enumerate() {
            if let Err(e) = self.handle.set_canary_percent(percent) {
                return self
                    .finish(Phase::RolledBack, Fate::RolledBack, format!("canary lost: {e}"))
                    .await;
            }
            self.update(|s| {
                s.step = i;
                s.percent = percent;
                s.step_started_ms = Some(unix_ms());
            });
            self.event(Event::CanaryStepStarted {
                version: id,
                step: i + 1,
                steps: steps.len(),
                percent,
            })
            .await;
            let (c0, s0) = (candidate.stats.read(), stable.stats.read());
            let step_start = Instant::now();
            let low_traffic_limit = policy.step_bake * 3;
            loop {
                tokio::select! {
                    _ = self.cancel.cancelled() => {
                        self.handle.abort_canary();
                        let reason = self.abort_reason();
                        let rescues = settled_rescues(&candidate).await;
                        self.event(Event::RolloutAborted { version: id, percent, reason: reason.clone(), rescues }).await;
                        return self.finish(Phase::RolledBack, Fate::RolledBack, format!("aborted by a manual rollback: {reason}")).await;
                    }
                    _ = tokio::time::sleep(JUDGE_EVERY) => {}
                }
                let (wc, ws) = (candidate.stats.read().since(&c0), stable.stats.read().since(&s0));
                self.update(|s| {
                    s.candidate = WindowView::from(&wc);
                    s.stable = WindowView::from(&ws);
                    s.candidate_total = WindowView::from(&candidate.stats.read().since(&c_begin));
                    s.stable_total = WindowView::from(&stable.stats.read().since(&s_begin));
                });
                let elapsed = step_start.elapsed();
                // A pool under min_healthy fails the candidate even without traffic to judge.
                let verdict = match unhealthy_pool(&candidate) {
                    Some(why) => Verdict::Breach(why),
                    None => judge(&wc, &ws, &policy),
                };
                match verdict {
                    Verdict::Breach(why) => {
                        self.handle.abort_canary();
                        let took = started.elapsed();
                        let rescues = settled_rescues(&candidate).await;
                        self.event(Event::RolloutRolledBack {
                            version: id,
                            reason: why.clone(),
                            at: Some((percent, i + 1)),
                            candidate: Some(WindowView::from(&wc)),
                            stable: Some(WindowView::from(&ws)),
                            elapsed_ms: took.as_millis() as u64,
                            rescues,
                        })
                        .await;
                        return self
                            .finish(Phase::RolledBack, Fate::RolledBack, format!("rolled back: {why}"))
                            .await;
                    }
                    Verdict::Pass if elapsed >= policy.step_bake => break,
                    Verdict::Wait if elapsed >= low_traffic_limit => {
                        self.event(Event::CanaryStepLowTraffic {
                            version: id,
                            step: i + 1,
                            requests: wc.requests,
                            elapsed_ms: elapsed.as_millis() as u64,
                            min_requests: policy.min_requests,
                        })
                        .await;
                        break;
                    }
                    _ => {}
                }
            }
            self.event(Event::CanaryStepPassed {
                version: id,
                step: i + 1,
                steps: steps.len(),
                percent,
                candidate: WindowView::from(&candidate.stats.read().since(&c0)),
            })
            .await;
        }

        if self.fleet_member {
            return self.member_passed(started).await;
        }
        // Store first, then traffic: a promotion the store did not record must not serve. A
        // crash between the two restarts on this version, which passed every step.
        let recorded = self.store.call(move |s| s.settle(id, Fate::KnownGood, id)).await;
        if let Err(e) = recorded {
            self.handle.abort_canary();
            let why = format!(
                "not promoted: recording version {id} as running failed ({e}); traffic stays on version {}",
                stable.version
            );
            self.event(Event::RolloutRolledBack {
                version: id,
                reason: why.clone(),
                at: None,
                candidate: None,
                stable: None,
                elapsed_ms: started.elapsed().as_millis() as u64,
                rescues: candidate.canary.read(),
            })
            .await;
            return self.finish(Phase::RolledBack, Fate::RolledBack, why).await;
        }
        if let Err(e) = self.handle.promote_canary() {
            let back = stable.version;
            if let Err(e) = self.store.call(move |s| s.settle(id, Fate::RolledBack, back)).await {
                tracing::error!(error = %e, version = back, "restoring the running version in the store failed");
            }
            return self
                .finish(Phase::RolledBack, Fate::RolledBack, format!("promotion failed: {e}"))
                .await;
        }
        let took = started.elapsed();
        let rescues = candidate.canary.read();
        self.event(Event::RolloutPromoted {
            version: id,
            elapsed_ms: took.as_millis() as u64,
            rescues,
        })
        .await;
        self.finish(
            Phase::Promoted,
            Fate::KnownGood,
            "promoted: every step passed its bake".into(),
        )
        .await
    }

    /// A fleet member's canary passed: it serves the candidate (the store is the leader's to
    /// write) and reports the pass in its heartbeat.
    async fn member_passed(&self, started: Instant) -> Phase {
        let id = self.id();
        if let Err(e) = self.handle.promote_canary() {
            return self
                .finish(Phase::RolledBack, Fate::RolledBack, format!("promotion failed: {e}"))
                .await;
        }
        self.event(Event::InstanceCanaryPassed {
            version: id,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
        .await;
        self.finish(
            Phase::Promoted,
            Fate::KnownGood,
            "passed on this instance: every step passed its bake".into(),
        )
        .await
    }

    /// The shadow stage: copies of live safe requests through the candidate, judged per route
    /// against stable's answers. Returns the final phase when it ends the rollout (rejected or
    /// aborted), `None` to go on to the canary.
    async fn shadow_stage(&self, policy: &safelb_config::Rollout, probed: &[safelb_proxy::Probed]) -> Option<Phase> {
        let id = self.id();
        let skip = self.status.lock().expect("status lock").skip_shadow;
        if skip {
            self.event(Event::ShadowSkipped { version: id }).await;
            return None;
        }
        let sp = policy.shadow.clone()?;
        self.update(|s| s.phase = Phase::Shadow);
        let shadow = match self.handle.begin_shadow(self.candidate.clone(), id, probed, &sp) {
            Ok(s) => s,
            Err(e) => {
                return Some(
                    self.finish(Phase::Rejected, Fate::Rejected, format!("rejected: {e}"))
                        .await,
                )
            }
        };
        self.event(Event::ShadowStarted {
            version: id,
            share: sp.share,
            duration_ms: sp.duration.as_millis() as u64,
        })
        .await;
        let stage = async {
            tokio::time::sleep(sp.duration).await;
            let live = shadow.report().compared;
            if live < sp.min_requests {
                // Too little live traffic to judge: recent requests stand in for it.
                let want = (sp.min_requests - live) as usize;
                shadow
                    .replay(self.handle.snapshot(), self.handle.samples().collect(), want)
                    .await;
            }
            // Copies still out are bounded by their own timeouts; give them that long.
            let settle = Instant::now();
            while shadow.report().in_flight > 0 && settle.elapsed() < Duration::from_secs(3) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            _ = stage => {}
            _ = self.cancel.cancelled() => {
                self.handle.end_shadow();
                let reason = self.abort_reason();
                return Some(self.finish(Phase::Rejected, Fate::Rejected, format!("aborted during the shadow stage: {reason}")).await);
            }
        }
        let report = shadow.report();
        self.update(|s| s.shadow = Some(report.clone()));
        match crate::judge::judge_shadow(&report, policy) {
            Some(why) => {
                self.handle.end_shadow();
                self.event(Event::ShadowFailed {
                    version: id,
                    why: why.clone(),
                    report: report.clone(),
                })
                .await;
                Some(
                    self.finish(
                        Phase::Rejected,
                        Fate::Rejected,
                        format!("rejected at the shadow stage: {why}"),
                    )
                    .await,
                )
            }
            None => {
                self.event(Event::ShadowPassed {
                    version: id,
                    report: report.clone(),
                })
                .await;
                None
            }
        }
    }

    fn abort_reason(&self) -> String {
        self.abort_reason
            .lock()
            .expect("reason lock")
            .clone()
            .unwrap_or_else(|| "aborted".into())
    }
}

/// What the stable version did for the candidate's requests, read once the requests that were
/// waiting at the rollback have been rescued (each does so on its own task, at once).
async fn settled_rescues(candidate: &safelb_proxy::Snapshot) -> CanaryTotals {
    let mut last = candidate.canary.read();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = candidate.canary.read();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// The first pool of the candidate with fewer available backends than its `min_healthy`.
fn unhealthy_pool(candidate: &safelb_proxy::Snapshot) -> Option<String> {
    candidate.pools.iter().find_map(|p| {
        let min = candidate.pool_config(p).min_healthy;
        let available = p.available();
        (available < min).then(|| {
            format!(
                "pool `{}` has {available} of {} backends available, below min_healthy {min}",
                p.name,
                p.backends.len()
            )
        })
    })
}

#[cfg(test)]
mod tests {
    //! Rollouts end to end on a paused clock: real snapshots and a real SQLite store, no
    //! traffic and no sockets; default step bakes (10 s) pass in milliseconds of real time.

    use super::*;
    use crate::store::NewVersion;
    use crate::testing::{self, config, TempDir, RUNNING};

    /// A rollout task for a candidate pointing pool `p` at another address, preflight skipped.
    fn task(handle: &ProxyHandle) -> (RolloutTask, Arc<Mutex<RolloutStatus>>, TempDir) {
        let (store, dir) = testing::store("rollout");
        let candidate_source = RUNNING.replace("127.0.0.1:9\"", "127.0.0.1:10\"");
        let id = store
            .blocking(|s| {
                s.append_version(NewVersion {
                    parent: None,
                    author: "test".into(),
                    reason: "test".into(),
                    source: candidate_source.clone(),
                    origin: "apply".into(),
                    skip_preflight: true,
                    emergency: false,
                    fate: Fate::Pending,
                })
            })
            .expect("appending a version");
        let running = config(RUNNING);
        let status = Arc::new(Mutex::new(RolloutStatus::new(id, 1, &running.rollout, true, false)));
        let task = RolloutTask {
            handle: handle.clone(),
            store,
            candidate: config(&candidate_source),
            running,
            status: status.clone(),
            cancel: CancellationToken::new(),
            abort_reason: Arc::new(Mutex::new(None)),
            confirm: false,
            fleet_member: false,
        };
        (task, status, dir)
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_candidate_goes_through_every_step_and_is_promoted() {
        let handle = ProxyHandle::new(config(RUNNING), 1);
        let (task, status, _dir) = task(&handle);
        let started = Instant::now();
        assert_eq!(task.run().await, Phase::Promoted);
        let s = status.lock().unwrap().clone();
        // Three steps, each waiting 3 x step_bake for traffic that never comes.
        assert!(started.elapsed() >= Duration::from_secs(90), "{:?}", started.elapsed());
        assert_eq!(
            s.progress.iter().filter(|l| l.contains("below min_requests")).count(),
            3
        );
        assert!(s.progress.last().unwrap().contains("promoted"), "{:?}", s.progress);
        assert_eq!(handle.snapshot().version, s.id);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_candidate_is_rolled_back_mid_step() {
        let handle = ProxyHandle::new(config(RUNNING), 1);
        let (task, status, _dir) = task(&handle);
        let run = tokio::spawn(task.run());
        while handle.canary().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        let candidate = handle.canary().expect("a canary").candidate;
        for _ in 0..10 {
            candidate.stats.record(true, Duration::from_millis(1));
        }
        assert_eq!(run.await.unwrap(), Phase::RolledBack);
        // Judged every 200 ms: the breach is seen on the next judgement, not at the step's end.
        assert!(
            started.elapsed() <= Duration::from_millis(400),
            "{:?}",
            started.elapsed()
        );
        let s = status.lock().unwrap().clone();
        assert!(
            s.verdict.as_deref().unwrap().contains("10 of 10 requests"),
            "{:?}",
            s.verdict
        );
        assert_eq!(handle.snapshot().version, 1, "the stable version serves everything");
        assert!(handle.canary().is_none());
        assert!(
            candidate.retired.is_cancelled(),
            "requests still waiting on it are rescued"
        );
    }
}
