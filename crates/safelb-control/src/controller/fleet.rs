//! The controller as a fleet member: the loop that keeps this instance in step with etcd
//! (serve what `state/running` names, run this instance's canary when its stage comes, report
//! in a heartbeat, lead when elected), and the fleet sides of apply, rollback and the rollout
//! view.

use std::time::Duration;

use super::*;
use crate::fleet::{
    cache, leader, Busy, Fleet, FleetPhase, FleetRollout, InstanceRecord, MemberReport, Outcome, Seen, TICK,
};

/// What the fleet loop keeps between its steps.
#[derive(Default)]
struct Member {
    /// When etcd stopped answering (ms since the epoch).
    unreachable_since: Option<i64>,
    /// The version saved in the local cache.
    cached: Option<u64>,
    last_heartbeat: Option<std::time::Instant>,
    last_record: Option<InstanceRecord>,
}

impl Controller {
    /// Keeps this instance in step with its fleet until `stop`; then leaves it (revoking the
    /// lease, so its record and any leadership go at once).
    pub async fn run_fleet(self, stop: CancellationToken) {
        let Some(fleet) = self.inner.fleet.clone() else {
            return;
        };
        fleet.watch();
        let mut member = Member {
            cached: cache::load(&fleet.opts.cache_dir, &fleet.opts.cluster)
                .ok()
                .flatten()
                .map(|c| c.version),
            ..Member::default()
        };
        loop {
            self.fleet_step(&fleet, &mut member).await;
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = fleet.wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
        }
        let f = fleet.clone();
        let _ = tokio::task::spawn_blocking(move || f.leave()).await;
    }

    async fn fleet_step(&self, fleet: &Arc<Fleet>, member: &mut Member) {
        let f = fleet.clone();
        let seen = match tokio::task::spawn_blocking(move || f.read()).await {
            Ok(Ok(seen)) => seen,
            Ok(Err(e)) => {
                if fleet.note_contact(false) || member.unreachable_since.is_none() {
                    member.unreachable_since = Some(unix_ms());
                    tracing::error!(
                        error = %e,
                        version = self.inner.handle.snapshot().version,
                        "etcd cannot be reached: this instance keeps serving its running version"
                    );
                }
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "the etcd read task failed");
                return;
            }
        };
        fleet.note_contact(true);
        if let Some(since) = member.unreachable_since.take() {
            self.event(Event::EtcdReconnected {
                after_ms: unix_ms() - since,
            })
            .await;
        }
        self.reconcile(fleet, &seen, member).await;
        self.heartbeat(fleet, &seen, member).await;
        let f = fleet.clone();
        let was_leader = fleet.is_leader();
        match tokio::task::spawn_blocking(move || f.campaign()).await {
            Ok(Ok(true)) => {
                if !was_leader {
                    self.event(Event::LeaderElected {
                        instance: fleet.instance().to_owned(),
                    })
                    .await;
                    // Decide on what the state is now, not on what it was before the election.
                    let f = fleet.clone();
                    let _ = tokio::task::spawn_blocking(move || f.read()).await;
                }
                let policy = self.inner.handle.snapshot().config.rollout.clone();
                if let Some(note) = leader::drive(fleet.clone(), self.inner.store.clone(), policy).await {
                    note_rollback(&self.inner.rollbacks, note);
                }
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the leader election call failed"),
            Err(e) => tracing::error!(error = %e, "the leader election task failed"),
        }
    }

    /// Brings what this instance serves in line with the fleet's state.
    async fn reconcile(&self, fleet: &Arc<Fleet>, seen: &Seen, member: &mut Member) {
        let me = fleet.instance().to_owned();
        let local = {
            let current = self.inner.current.lock().expect("current lock");
            current
                .as_ref()
                .filter(|c| c.running())
                .map(|c| (c.id, c.abort.clone()))
        };
        let rollout = seen.rollout.as_ref().map(|(r, _)| r);
        if let Some((id, abort)) = &local {
            let over = rollout.is_none_or(|r| r.version != *id || r.phase.is_final());
            if over {
                let verdict = rollout
                    .filter(|r| r.version == *id)
                    .and_then(|r| r.verdict.clone())
                    .unwrap_or_else(|| format!("the fleet's rollout of version {id} ended"));
                abort.now(verdict);
            }
            return;
        }
        if let Some(r) = rollout.filter(|r| r.has_reached(&me)) {
            let started = self
                .inner
                .rollouts
                .lock()
                .expect("rollouts lock")
                .contains_key(&r.version);
            if !started {
                self.start_member_canary(fleet, r).await;
                return;
            }
        }
        let served = self.inner.handle.snapshot().version;
        // A candidate this instance passed serves here until the fleet's verdict.
        if rollout.is_some_and(|r| r.phase == FleetPhase::Running && r.version == served) {
            return;
        }
        let Some(target) = seen.running else {
            return;
        };
        if target != served {
            self.adopt(fleet, target, rollout).await;
        }
        let served = self.inner.handle.snapshot().version;
        if served == target {
            // A refusal is reported until the fleet runs a version this instance serves.
            self.inner.refused.lock().expect("refused lock").take();
        }
        if served == target && member.cached != Some(served) {
            let source = self.inner.handle.snapshot().config.source.clone();
            let cached = cache::Cached {
                cluster: fleet.opts.cluster.clone(),
                version: served,
                source,
                saved_ms: unix_ms(),
            };
            let dir = fleet.opts.cache_dir.clone();
            match tokio::task::spawn_blocking(move || cache::save(&dir, &cached)).await {
                Ok(Ok(())) => member.cached = Some(served),
                Ok(Err(e)) => tracing::error!(error = %e, "saving the last known-good version to local disk failed"),
                Err(e) => tracing::error!(error = %e, "the cache task failed"),
            }
        }
    }

    /// Serves version `target` from etcd, unless it fails validation, removes every route
    /// without `--confirm`, or cannot replace the running version: then it is refused, once,
    /// and the running version keeps serving.
    async fn adopt(&self, fleet: &Arc<Fleet>, target: u64, rollout: Option<&FleetRollout>) {
        if self
            .inner
            .refused
            .lock()
            .expect("refused lock")
            .as_ref()
            .is_some_and(|(v, _)| *v == target)
        {
            return;
        }
        let f = fleet.clone();
        let record = match tokio::task::spawn_blocking(move || f.store_version(target)).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => {
                return self
                    .refuse(target, "etcd names it as running, but has no such version".into())
                    .await
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, version = target, "reading the running version from etcd failed");
                return;
            }
            Err(_) => return,
        };
        let stable = self.inner.handle.snapshot();
        let config = match self
            .check(&format!("version {target}"), record.source.as_deref().unwrap_or(""))
            .into_result()
        {
            Ok(c) => c,
            Err(d) => {
                return self
                    .refuse(target, format!("it does not pass check:\n{}", d.render()))
                    .await
            }
        };
        let confirmed = rollout.is_some_and(|r| r.version == target && r.confirm);
        if config.routes.is_empty() && !stable.config.routes.is_empty() && !confirmed {
            return self
                .refuse(
                    target,
                    "it has no routes (every request would get a 404) and the change did not carry --confirm".into(),
                )
                .await;
        }
        let back = target < stable.version || record.origin == "rollback";
        let swapped = if back {
            self.inner.handle.roll_back_to(config, target)
        } else {
            self.inner.handle.swap(config, target)
        };
        match swapped {
            Ok(_) => tracing::info!(
                version = target,
                from = stable.version,
                "serving the fleet's running version"
            ),
            Err(e) => self.refuse(target, e.to_string()).await,
        }
    }

    async fn refuse(&self, version: u64, why: String) {
        *self.inner.refused.lock().expect("refused lock") = Some((version, why.clone()));
        tracing::error!(version, %why, "refused a version from etcd; the running version keeps serving");
        self.event(Event::VersionRefused { version, why }).await;
    }

    /// Starts this instance's canary of the fleet's rollout `r`.
    async fn start_member_canary(&self, fleet: &Arc<Fleet>, r: &FleetRollout) {
        let id = r.version;
        let f = fleet.clone();
        let record = match tokio::task::spawn_blocking(move || f.store_version(id)).await {
            Ok(Ok(Some(v))) => v,
            other => {
                tracing::warn!(version = id, ?other, "cannot read the rollout's version from etcd yet");
                return;
            }
        };
        let stable = self.inner.handle.snapshot();
        let req = ApplyRequest {
            source: record.source.clone().unwrap_or_default(),
            file_name: format!("version {id}"),
            author: record.author.clone(),
            reason: record.reason.clone(),
            origin: record.origin.clone(),
            skip_preflight: r.skip_preflight,
            skip_shadow: r.skip_shadow,
            confirm: r.confirm,
            emergency: record.emergency,
        };
        match self.check(&req.file_name, &req.source).into_result() {
            Ok(candidate) => {
                tracing::info!(version = id, "this instance's stage came: starting its canary");
                self.start_rollout(id, candidate, &stable, &req, true);
            }
            Err(d) => {
                // Recorded as this instance's rejection: the leader rolls the fleet back.
                let mut status = RolloutStatus::new(id, stable.version, &stable.config.rollout, true, true);
                status.phase = Phase::Rejected;
                status.verdict = Some(format!("it does not pass check here:\n{}", d.render()));
                self.inner.remember_rollout(id, Arc::new(Mutex::new(status)));
            }
        }
    }

    /// Writes this instance's record (at least once a second, and at once when it changed).
    async fn heartbeat(&self, fleet: &Arc<Fleet>, seen: &Seen, member: &mut Member) {
        let routing = self.inner.handle.routing();
        let canary = self.inner.handle.canary();
        let report = seen
            .rollout
            .as_ref()
            .and_then(|(r, _)| self.rollout(r.version))
            .map(|s| MemberReport {
                version: s.id,
                outcome: match s.phase {
                    Phase::Promoted => Outcome::Passed,
                    Phase::RolledBack => Outcome::Failed,
                    Phase::Rejected => Outcome::Rejected,
                    _ => Outcome::Running,
                },
                verdict: s.verdict.clone(),
                candidate: s.candidate_total.clone(),
                stable: s.stable_total.clone(),
            });
        let record = InstanceRecord {
            serving: routing.stable.version,
            candidate: canary.as_ref().map(|c| c.candidate.version),
            percent: canary.as_ref().map_or(0, |c| c.percent),
            report,
            refused: self.inner.refused.lock().expect("refused lock").clone(),
            ..InstanceRecord::default()
        };
        drop(routing);
        let due = member
            .last_heartbeat
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(900));
        if !due && member.last_record.as_ref() == Some(&record) {
            return;
        }
        let f = fleet.clone();
        let sent = record.clone();
        match tokio::task::spawn_blocking(move || f.heartbeat(sent)).await {
            Ok(Ok(())) => {
                member.last_heartbeat = Some(std::time::Instant::now());
                member.last_record = Some(record);
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "the heartbeat to etcd failed"),
            Err(e) => tracing::error!(error = %e, "the heartbeat task failed"),
        }
    }

    /// The version of the fleet rollout in progress, as the last read saw it.
    pub(super) fn fleet_rollout_in_progress(&self) -> Option<u64> {
        let seen = self.inner.fleet.as_ref()?.seen();
        seen.rollout
            .filter(|(r, _)| !r.phase.is_final())
            .map(|(r, _)| r.version)
    }

    /// Fleet mode's apply: the version and its rollout record in one transaction.
    pub(super) async fn submit_to_fleet(
        &self,
        fleet: &Arc<Fleet>,
        req: &ApplyRequest,
        v: NewVersion,
        from: u64,
    ) -> Result<u64, ApplyError> {
        let record = VersionRecord {
            id: 0,
            parent: v.parent,
            author: v.author,
            reason: v.reason,
            created_ms: unix_ms(),
            hash: content_hash(&v.source),
            origin: v.origin,
            skip_preflight: v.skip_preflight,
            emergency: v.emergency,
            fate: Fate::Pending,
            source: Some(v.source),
        };
        let rollout = FleetRollout {
            version: 0,
            from,
            author: req.author.clone(),
            confirm: req.confirm,
            skip_preflight: req.skip_preflight,
            skip_shadow: req.skip_shadow,
            phase: FleetPhase::Pending,
            stages: Vec::new(),
            stage: 0,
            verdict: None,
            progress: vec![format!(
                "submitted on instance {}; the fleet's leader assigns the stages",
                fleet.instance()
            )],
            started_ms: unix_ms(),
            finished_ms: None,
        };
        let f = fleet.clone();
        let submitted = tokio::task::spawn_blocking(move || f.submit(record, rollout))
            .await
            .map_err(|e| StoreError::Failed(format!("the submit task failed: {e}")))??;
        fleet.wake.notify_one();
        submitted.map_err(|Busy(id)| ApplyError::Busy(id))
    }

    /// Fleet mode's rollback of a rollout in progress: ends it fleet-wide; each member's canary
    /// stops on its next step. `None` when no fleet rollout was in progress.
    pub(super) async fn abort_fleet_rollout(
        &self,
        fleet: &Arc<Fleet>,
        author: &str,
        reason: &str,
        started: std::time::Instant,
    ) -> Result<Option<RollbackDone>, RollbackError> {
        let f = fleet.clone();
        let verdict = format!("aborted by a manual rollback: {reason} (by {author})");
        let aborted = tokio::task::spawn_blocking(move || f.abort(&verdict))
            .await
            .map_err(|e| StoreError::Failed(format!("the abort task failed: {e}")))??;
        let Some(id) = aborted else {
            return Ok(None);
        };
        fleet.wake.notify_one();
        // This instance's own canary, if it has one, stops on the loop's next step.
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while self.inner.handle.canary().is_some_and(|c| c.candidate.version == id)
            && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Some(RollbackDone {
            version: None,
            target: self.inner.handle.snapshot().version,
            aborted_rollout: Some(id),
            took_ms: started.elapsed().as_millis() as u64,
        }))
    }

    /// A rollout as the API shows it: in fleet mode, the fleet's phase and verdict with this
    /// instance's own canary (if it ran one) for the numbers.
    pub fn rollout_view(&self, id: u64) -> Option<RolloutStatus> {
        let local = self.rollout(id);
        let Some(fleet) = self.inner.fleet.as_ref() else {
            return local;
        };
        let Some((r, _)) = fleet.seen().rollout.filter(|(r, _)| r.version == id) else {
            return local;
        };
        let stable = self.inner.handle.snapshot();
        let seen = fleet.seen();
        let mut s = local.unwrap_or_else(|| {
            // No canary here (yet): the numbers are the fleet's, from the members' reports.
            let mut s = RolloutStatus::new(id, r.from, &stable.config.rollout, r.skip_preflight, r.skip_shadow);
            for i in &seen.instances {
                if let Some(rep) = i.report.as_ref().filter(|rep| rep.version == id) {
                    s.candidate.requests += rep.candidate.requests;
                    s.candidate.errors += rep.candidate.errors;
                }
                if i.candidate == Some(id) {
                    s.percent = s.percent.max(i.percent);
                }
            }
            if s.candidate.requests > 0 {
                s.candidate.error_rate = s.candidate.errors as f64 / s.candidate.requests as f64;
            }
            s
        });
        s.phase = match r.phase {
            FleetPhase::Pending => Phase::Preflight,
            FleetPhase::Running if s.phase.is_final() => Phase::Canary,
            FleetPhase::Running => s.phase,
            FleetPhase::Promoted => Phase::Promoted,
            FleetPhase::RolledBack => Phase::RolledBack,
            FleetPhase::Rejected => Phase::Rejected,
        };
        if r.phase.is_final() {
            s.verdict = r.verdict.clone();
            s.finished_ms = r.finished_ms;
        }
        s.started_ms = r.started_ms;
        s.progress = r.progress.clone();
        Some(s)
    }
}
