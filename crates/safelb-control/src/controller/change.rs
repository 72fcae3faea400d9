//! The changes: `apply` (freeze, validate, record, start the rollout), `rollback` (abort the
//! rollout, or put a known-good version back as a new version) and `plan` (what a change would do).

use super::*;

impl Controller {
    /// Validates and records a candidate, then starts its rollout in the background.
    pub async fn apply(&self, req: ApplyRequest) -> Result<Accepted, ApplyError> {
        let _serial = self.inner.serial.lock().await;
        if let Some(id) = self.running_rollout().or_else(|| self.fleet_rollout_in_progress()) {
            return Err(ApplyError::Busy(id));
        }
        let stable = self.inner.handle.snapshot();
        if !req.emergency {
            let now = unix_ms() / 1000;
            if let Some(f) = stable.config.change_freezes.iter().find(|f| f.covers(now)) {
                let until = safelb_proxy::clock::rfc3339(f.end, 0);
                self.event(Event::ChangeRefused {
                    author: req.author.clone(),
                    reason: req.reason.clone(),
                    freeze: f.reason.clone(),
                    until: until.clone(),
                })
                .await;
                return Err(ApplyError::Frozen {
                    reason: f.reason.clone(),
                    until,
                });
            }
        }
        let checked = self.check(&req.file_name, &req.source);
        let parent = Some(stable.version);
        let record = |fate| NewVersion {
            parent,
            author: req.author.clone(),
            reason: req.reason.clone(),
            source: req.source.clone(),
            origin: req.origin.clone(),
            skip_preflight: req.skip_preflight,
            emergency: req.emergency,
            fate,
        };
        let Some(candidate) = checked.config else {
            let rejected = record(Fate::Rejected);
            let version = self.inner.store.call(move |s| s.append_version(rejected)).await?;
            let rendered = checked.diagnostics.render();
            let diagnostics = serde_json::to_value(checked.diagnostics.located()).unwrap_or_default();
            self.event(Event::ChangeRejected {
                version,
                author: req.author.clone(),
                why: "it does not pass check".into(),
                diagnostics: Some(diagnostics.clone()),
            })
            .await;
            return Err(ApplyError::Invalid {
                version,
                rendered,
                diagnostics,
            });
        };
        if stable.config.listeners != candidate.listeners || stable.config.access_log != candidate.access_log {
            let message = "it changes listeners or the access log, which need a restart".to_string();
            let rejected = record(Fate::Rejected);
            let version = self.inner.store.call(move |s| s.append_version(rejected)).await?;
            self.event(Event::ChangeRejected {
                version,
                author: req.author.clone(),
                why: message.clone(),
                diagnostics: None,
            })
            .await;
            return Err(ApplyError::NotSwappable { version, message });
        }
        let version = match &self.inner.fleet {
            // The leader drives it; this instance's canary starts when its stage comes.
            Some(fleet) => {
                self.submit_to_fleet(fleet, &req, record(Fate::Pending), stable.version)
                    .await?
            }
            None => {
                let pending = record(Fate::Pending);
                self.inner.store.call(move |s| s.append_version(pending)).await?
            }
        };
        self.event(Event::ChangeSubmitted {
            version,
            author: req.author.clone(),
            reason: req.reason.clone(),
            origin: req.origin.clone(),
            skip_preflight: req.skip_preflight,
            skip_shadow: req.skip_shadow,
            emergency: req.emergency,
        })
        .await;
        if self.inner.fleet.is_none() {
            self.start_rollout(version, candidate, &stable, &req, false);
        }
        Ok(Accepted {
            version,
            rollout: version,
        })
    }

    /// Starts the rollout of `version` in the background, replacing `stable`: the whole
    /// pipeline, or a fleet member's part of it (its own canary, no store writes).
    pub(super) fn start_rollout(
        &self,
        version: u64,
        candidate: ValidConfig,
        stable: &safelb_proxy::Snapshot,
        req: &ApplyRequest,
        fleet_member: bool,
    ) {
        let policy = &stable.config.rollout;
        let status = Arc::new(Mutex::new(RolloutStatus::new(
            version,
            stable.version,
            policy,
            req.skip_preflight,
            req.skip_shadow,
        )));
        let cancel = CancellationToken::new();
        let abort_reason = Arc::new(Mutex::new(None));
        let (done_tx, done_rx) = tokio::sync::watch::channel(false);
        let task = RolloutTask {
            handle: self.inner.handle.clone(),
            store: self.inner.store.clone(),
            candidate,
            running: stable.config.clone(),
            status: status.clone(),
            cancel: cancel.clone(),
            abort_reason: abort_reason.clone(),
            confirm: req.confirm,
            fleet_member,
        };
        self.inner.remember_rollout(version, status.clone());
        *self.inner.current.lock().expect("current lock") = Some(Current {
            id: version,
            abort: Abort {
                cancel,
                reason: abort_reason,
            },
            done: done_rx,
            status,
        });
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let phase = task.run().await;
            tracing::info!(version, ?phase, "rollout finished");
            let name = match phase {
                Phase::Promoted => "promoted",
                Phase::Rejected => "rejected",
                _ => "rolled_back",
            };
            *inner.verdicts.lock().expect("verdicts lock").entry(name).or_default() += 1;
            if phase == Phase::RolledBack {
                note_rollback(&inner.rollbacks, format!("rollout of version {version} rolled back"));
            }
            let _ = done_tx.send(true);
        });
    }

    /// Aborts the running rollout, or puts a known-good version back for all traffic at once.
    pub async fn rollback(&self, to: Option<u64>, author: &str, reason: &str) -> Result<RollbackDone, RollbackError> {
        let started = std::time::Instant::now();
        let _serial = self.inner.serial.lock().await;
        if let Some(fleet) = &self.inner.fleet {
            if let Some(done) = self.abort_fleet_rollout(fleet, author, reason, started).await? {
                return Ok(done);
            }
        }
        let running_rollout = {
            let current = self.inner.current.lock().expect("current lock");
            current
                .as_ref()
                .filter(|c| c.running())
                .map(|c| (c.id, c.abort.clone(), c.done.clone()))
        };
        if let Some((id, abort, mut done)) = running_rollout {
            abort.now(format!("{reason} (by {author})"));
            while !*done.borrow() {
                if done.changed().await.is_err() {
                    break;
                }
            }
            let target = self.inner.handle.snapshot().version;
            return Ok(RollbackDone {
                version: None,
                target,
                aborted_rollout: Some(id),
                took_ms: started.elapsed().as_millis() as u64,
            });
        }
        let running = self.inner.handle.snapshot().version;
        let target = match to {
            Some(t) => t,
            None => self
                .inner
                .store
                .call(move |s| s.known_good_before(running))
                .await?
                .ok_or(RollbackError::NoTarget(running))?,
        };
        let record = self
            .inner
            .store
            .call(move |s| s.version(target))
            .await?
            .ok_or(RollbackError::UnknownVersion(target))?;
        let source = record.source.unwrap_or_default();
        let config = self
            .check(&format!("version {target}"), &source)
            .into_result()
            .map_err(|d| RollbackError::Unservable(target, d.render()))?;
        let new = NewVersion {
            parent: Some(running),
            author: author.to_owned(),
            reason: reason.to_owned(),
            source,
            origin: "rollback".into(),
            skip_preflight: false,
            emergency: false,
            fate: Fate::Pending,
        };
        let version = self.inner.store.call(move |s| s.append_version(new)).await?;
        // Store first, then traffic: the history says what serves before it serves.
        self.inner
            .store
            .call(move |s| s.settle(version, Fate::Promoted, version))
            .await?;
        if let Err(e) = self.inner.handle.roll_back_to(config, version) {
            self.inner
                .store
                .call(move |s| s.settle(version, Fate::Rejected, running))
                .await?;
            return Err(RollbackError::Unservable(target, e.to_string()));
        }
        let took = started.elapsed();
        note_rollback(
            &self.inner.rollbacks,
            format!("manual rollback by {author} to the content of version {target}"),
        );
        self.event(Event::RollbackApplied {
            version,
            from: running,
            target,
            author: author.to_owned(),
            reason: reason.to_owned(),
            took_ms: took.as_millis() as u64,
        })
        .await;
        Ok(RollbackDone {
            version: Some(version),
            target,
            aborted_rollout: None,
            took_ms: took.as_millis() as u64,
        })
    }

    /// What applying `source` would do, without changing anything.
    pub async fn plan(&self, file_name: &str, source: &str, confirm: bool) -> PlanReport {
        let stable = self.inner.handle.snapshot();
        let checked = self.check(file_name, source);
        let diff = unified(
            &stable.config.source,
            source,
            &format!("version {} (running)", stable.version),
            file_name,
        );
        let diagnostics = serde_json::to_value(checked.diagnostics.located()).unwrap_or_default();
        let rendered = if checked.diagnostics.is_empty() {
            String::new()
        } else {
            checked.diagnostics.render()
        };
        let (impact, preflight) = match &checked.config {
            Some(candidate) => {
                let samples = self.inner.handle.samples().collect();
                let impact = preview(&samples, &stable.config, candidate);
                let report = preflight::run(candidate, &stable.config, &stable.config.rollout, &samples, confirm).await;
                (Some(impact), Some(report))
            }
            None => (None, None),
        };
        PlanReport {
            valid: checked.config.is_some(),
            diagnostics,
            rendered,
            running_version: stable.version,
            diff,
            impact,
            preflight,
        }
    }
}
