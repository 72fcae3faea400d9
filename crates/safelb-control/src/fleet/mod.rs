//! Fleet mode: many safelb instances, one history in etcd, rollouts staged across them.
//!
//! Everything of a cluster lives under `/safelb/<cluster>/`: the history ([`store::EtcdStore`]:
//! versions, events, incidents), and the keys of `state/` every instance watches:
//! `state/running` (the version the fleet serves), `state/rollout` (the one rollout in progress,
//! a [`FleetRollout`]) and `state/leader` (held under the leader's lease). Each instance writes
//! its [`InstanceRecord`] under `instances/<name>` with its own lease once a second: what it
//! serves, its part in the rollout and its counters.
//!
//! Who does what: any instance accepts a change (`submit`: the version and the rollout record in
//! one transaction, so of two at once one wins and one is `Busy`); the leader
//! ([`leader`]) assigns the rollout's stages and judges each stage from the members' reports;
//! every member ([`crate::controller`]'s fleet loop) runs its own traffic canary when its stage
//! comes, and otherwise serves what `state/running` names, after validating it. The leader's
//! writes are fenced: each compares the leader key's creation revision, so a leader that lost
//! its lease cannot write.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::clock::unix_ms;
use crate::judge::WindowView;
use crate::store::{content_hash, Fate, StoreResult, VersionRecord};

pub mod cache;
pub mod gateway;
pub mod leader;
pub mod store;

use gateway::{err, Gateway};

/// The running pointer (shared with [`store::EtcdStore`]).
pub(crate) const RUNNING: &str = "state/running";
pub(crate) const ROLLOUT: &str = "state/rollout";
pub(crate) const LEADER: &str = "state/leader";
/// The instance records' directory.
const INSTANCES: &str = "instances/";

/// Seconds of an instance's lease: its record and, if it leads, the leader key go this long
/// after its last heartbeat.
pub const LEASE_TTL_S: u64 = 3;
/// How often an instance reconciles, heartbeats and (as leader) drives the rollout.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(500);

pub fn prefix(cluster: &str) -> String {
    format!("/safelb/{cluster}/")
}

/// Where a fleet rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FleetPhase {
    /// Submitted; the leader has not assigned its stages yet.
    Pending,
    Running,
    Promoted,
    RolledBack,
    Rejected,
}

impl FleetPhase {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            FleetPhase::Promoted | FleetPhase::RolledBack | FleetPhase::Rejected
        )
    }
}

/// `state/rollout`: the cluster's one rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FleetRollout {
    pub version: u64,
    pub from: u64,
    pub author: String,
    #[serde(default)]
    pub confirm: bool,
    #[serde(default)]
    pub skip_preflight: bool,
    #[serde(default)]
    pub skip_shadow: bool,
    pub phase: FleetPhase,
    /// Instance names per stage, fixed by the leader when it starts the rollout.
    #[serde(default)]
    pub stages: Vec<Vec<String>>,
    /// Index of the current stage in `stages`.
    #[serde(default)]
    pub stage: usize,
    #[serde(default)]
    pub verdict: Option<String>,
    /// The leader's steps, for people.
    #[serde(default)]
    pub progress: Vec<String>,
    pub started_ms: i64,
    #[serde(default)]
    pub finished_ms: Option<i64>,
}

impl FleetRollout {
    /// Whether `instance` is in the current stage or an earlier one.
    pub fn has_reached(&self, instance: &str) -> bool {
        self.phase == FleetPhase::Running && self.stages.iter().take(self.stage + 1).flatten().any(|n| n == instance)
    }
}

/// What an instance's own canary of a fleet rollout came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Running,
    Passed,
    /// Rolled back on this instance: the candidate broke a limit here.
    Failed,
    /// Refused before any traffic (preflight, shadow).
    Rejected,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MemberReport {
    pub version: u64,
    pub outcome: Outcome,
    #[serde(default)]
    pub verdict: Option<String>,
    /// The candidate's and the stable version's requests on this instance since its canary began.
    #[serde(default)]
    pub candidate: WindowView,
    #[serde(default)]
    pub stable: WindowView,
}

/// `instances/<name>`, written by the instance under its lease.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InstanceRecord {
    pub name: String,
    /// Its admin API.
    pub admin: String,
    /// The stable version it serves.
    pub serving: u64,
    /// The candidate it splits traffic with, and its share.
    pub candidate: Option<u64>,
    pub percent: u8,
    pub report: Option<MemberReport>,
    /// A version from etcd it refused to serve, and why.
    pub refused: Option<(u64, String)>,
    pub heartbeat_ms: i64,
    pub started_ms: i64,
}

/// How an instance joins its fleet (from `serve`'s flags).
#[derive(Clone, Debug)]
pub struct FleetOptions {
    pub endpoints: String,
    pub cluster: String,
    pub instance: String,
    /// Where the last known-good version is kept on local disk.
    pub cache_dir: PathBuf,
}

/// The instance's link to its fleet: the etcd calls (blocking: run them on the blocking pool)
/// and what the last reconcile saw.
pub struct Fleet {
    pub opts: FleetOptions,
    pub gateway: Arc<Gateway>,
    prefix: String,
    reachable: AtomicBool,
    /// When etcd last answered (ms since the epoch).
    last_contact_ms: AtomicI64,
    lease: AtomicI64,
    leader: AtomicBool,
    /// The leader key's creation revision while this instance leads: the fence of its writes.
    fence: AtomicI64,
    seen: Mutex<Seen>,
    started_ms: i64,
    /// This instance's admin API, named in its record.
    admin: Mutex<String>,
    /// Woken by the watch on `state/`.
    pub wake: tokio::sync::Notify,
}

/// What the last read of the cluster's state found.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub running: Option<u64>,
    pub rollout: Option<(FleetRollout, i64)>,
    pub leader: Option<String>,
    pub instances: Vec<InstanceRecord>,
}

/// An apply that lost the race: this rollout is in progress.
#[derive(Debug)]
pub struct Busy(pub u64);

impl Fleet {
    pub fn new(opts: FleetOptions) -> StoreResult<Fleet> {
        Ok(Fleet {
            gateway: Arc::new(Gateway::new(&opts.endpoints)?),
            prefix: prefix(&opts.cluster),
            opts,
            reachable: AtomicBool::new(false),
            last_contact_ms: AtomicI64::new(0),
            lease: AtomicI64::new(0),
            leader: AtomicBool::new(false),
            fence: AtomicI64::new(0),
            seen: Mutex::new(Seen::default()),
            started_ms: unix_ms(),
            admin: Mutex::new(String::new()),
            wake: tokio::sync::Notify::new(),
        })
    }

    pub fn store(&self) -> store::EtcdStore {
        store::EtcdStore::on(self.gateway.clone(), &self.opts.cluster)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub fn set_admin(&self, addr: String) {
        *self.admin.lock().expect("admin lock") = addr;
    }

    /// The running version and its source, if the cluster has one.
    pub fn running_source(&self) -> StoreResult<Option<(u64, String)>> {
        let Some(kv) = self.gateway.get(&self.key(RUNNING))? else {
            return Ok(None);
        };
        let id: u64 = String::from_utf8_lossy(&kv.value).parse().map_err(err)?;
        let v = self
            .store_version(id)?
            .ok_or_else(|| err(format!("state/running names version {id}, which does not exist")))?;
        Ok(Some((id, v.source.unwrap_or_default())))
    }

    pub fn instance(&self) -> &str {
        &self.opts.instance
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
    }

    pub fn last_contact_ms(&self) -> i64 {
        self.last_contact_ms.load(Ordering::Relaxed)
    }

    /// Notes whether etcd answered; returns the previous state.
    pub fn note_contact(&self, ok: bool) -> bool {
        if ok {
            self.last_contact_ms.store(unix_ms(), Ordering::Relaxed);
        }
        self.reachable.swap(ok, Ordering::Relaxed)
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().expect("seen lock").clone()
    }

    /// Reads the cluster's state: the running pointer, the rollout, the leader, the instances.
    pub fn read(&self) -> StoreResult<Seen> {
        let (state, _) = self.gateway.range(&self.key("state/"), &self.key("state0"), false, 0)?;
        let mut seen = Seen::default();
        for kv in state {
            match kv.key.strip_prefix(&self.prefix) {
                Some(RUNNING) => seen.running = String::from_utf8_lossy(&kv.value).parse().ok(),
                Some(ROLLOUT) => match serde_json::from_slice(&kv.value) {
                    Ok(r) => seen.rollout = Some((r, kv.mod_revision)),
                    Err(e) => tracing::error!(error = %e, "state/rollout in etcd is not a rollout record; ignored"),
                },
                Some(LEADER) => seen.leader = Some(String::from_utf8_lossy(&kv.value).into_owned()),
                _ => {}
            }
        }
        let (instances, _) = self.gateway.range(
            &self.key(INSTANCES),
            &gateway::prefix_end(&self.key(INSTANCES)),
            false,
            0,
        )?;
        seen.instances = instances
            .iter()
            .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
            .collect();
        *self.seen.lock().expect("seen lock") = seen.clone();
        Ok(seen)
    }

    /// Writes this instance's record under its lease, renewing (or replacing) the lease.
    pub fn heartbeat(&self, mut record: InstanceRecord) -> StoreResult<()> {
        let mut lease = self.lease.load(Ordering::Relaxed);
        if lease == 0 || !self.gateway.lease_keepalive(lease)? {
            if lease != 0 {
                tracing::warn!("the instance's etcd lease expired; taking a new one");
                self.step_down("its lease expired");
            }
            lease = self.gateway.lease_grant(LEASE_TTL_S)?;
            self.lease.store(lease, Ordering::Relaxed);
        }
        record.name = self.opts.instance.clone();
        record.admin = self.admin.lock().expect("admin lock").clone();
        record.heartbeat_ms = unix_ms();
        record.started_ms = self.started_ms;
        let body = serde_json::to_vec(&record).map_err(err)?;
        self.gateway.put(
            &self.key(&format!("{INSTANCES}{}", self.opts.instance)),
            &body,
            Some(lease),
        )
    }

    /// Tries to become the leader (a key created under this instance's lease); whether it leads.
    pub fn campaign(&self) -> StoreResult<bool> {
        let lease = self.lease.load(Ordering::Relaxed);
        if lease == 0 {
            return Ok(false);
        }
        let key = self.key(LEADER);
        if self.is_leader() {
            // Still ours? The key's creation revision is the fence.
            let still = self
                .gateway
                .get(&key)?
                .is_some_and(|kv| kv.create_revision == self.fence.load(Ordering::Relaxed));
            if !still {
                self.step_down("the leader key is gone or someone else's");
            }
            return Ok(still);
        }
        let won = self.gateway.txn(
            vec![gateway::created_at(&key, 0)],
            vec![gateway::put(&key, self.opts.instance.as_bytes(), Some(lease))],
        )?;
        if won {
            let kv = self
                .gateway
                .get(&key)?
                .ok_or_else(|| err("the leader key vanished right after it was created"))?;
            if kv.value != self.opts.instance.as_bytes() {
                return Ok(false);
            }
            self.fence.store(kv.create_revision, Ordering::Relaxed);
            self.leader.store(true, Ordering::Relaxed);
        }
        Ok(won)
    }

    fn step_down(&self, why: &str) {
        if self.leader.swap(false, Ordering::Relaxed) {
            tracing::warn!(why, "no longer the fleet's leader");
        }
    }

    /// Gives up the lease (and with it leadership and the instance record) at shutdown.
    pub fn leave(&self) {
        let lease = self.lease.swap(0, Ordering::Relaxed);
        self.step_down("shutting down");
        if lease != 0 {
            let _ = self.gateway.lease_revoke(lease);
        }
    }

    /// A write by the leader: `puts` happen only if this instance still holds the leader key and
    /// the rollout record is still at `rollout_rev`. Whether they happened.
    pub fn fenced(&self, rollout_rev: i64, puts: Vec<(String, Vec<u8>)>) -> StoreResult<bool> {
        if !self.is_leader() {
            return Ok(false);
        }
        let compare = vec![
            gateway::created_at(&self.key(LEADER), self.fence.load(Ordering::Relaxed)),
            gateway::mod_is(&self.key(ROLLOUT), rollout_rev),
        ];
        let ops = puts.iter().map(|(k, v)| gateway::put(&self.key(k), v, None)).collect();
        self.gateway.txn(compare, ops)
    }

    /// Records a new version and its rollout in one transaction, unless another rollout is in
    /// progress; the new version's id.
    pub fn submit(&self, mut version: VersionRecord, rollout: FleetRollout) -> StoreResult<Result<u64, Busy>> {
        let counter = "next/versions";
        for _ in 0..50 {
            // One read gives both the verdict and the revision the transaction compares: a
            // rollout created after it makes the transaction fail, never slip through.
            let rollout_rev = match self.read_rollout()? {
                Some((r, _)) if !r.phase.is_final() => return Ok(Err(Busy(r.version))),
                Some((_, rev)) => rev,
                None => 0,
            };
            let (id, counter_rev) = store::next_id(&self.gateway, &self.key(counter))?;
            version.id = id;
            let record = FleetRollout {
                version: id,
                ..rollout.clone()
            };
            let won = self.gateway.txn(
                vec![
                    gateway::mod_is(&self.key(counter), counter_rev),
                    gateway::mod_is(&self.key(ROLLOUT), rollout_rev),
                ],
                vec![
                    gateway::put(&self.key(counter), id.to_string().as_bytes(), None),
                    gateway::put(
                        &self.key(&store::id_key("versions", id)),
                        &serde_json::to_vec(&version).map_err(err)?,
                        None,
                    ),
                    gateway::put(&self.key(ROLLOUT), &serde_json::to_vec(&record).map_err(err)?, None),
                ],
            )?;
            if won {
                return Ok(Ok(id));
            }
        }
        Err(err("could not submit the change: 50 attempts lost the race"))
    }

    pub fn read_rollout(&self) -> StoreResult<Option<(FleetRollout, i64)>> {
        match self.gateway.get(&self.key(ROLLOUT))? {
            Some(kv) => Ok(Some((serde_json::from_slice(&kv.value).map_err(err)?, kv.mod_revision))),
            None => Ok(None),
        }
    }

    /// Ends the rollout in progress as `phase` with `verdict`, recording the version's fate in
    /// the same transaction (an operator's abort: any instance may do it). The rollout ended, or
    /// `None` when none was in progress.
    pub fn abort(&self, verdict: &str) -> StoreResult<Option<u64>> {
        for _ in 0..50 {
            let Some((mut r, rev)) = self.read_rollout()? else {
                return Ok(None);
            };
            if r.phase.is_final() {
                return Ok(None);
            }
            let Some(mut version) = self.store_version(r.version)? else {
                return Err(err(format!("version {} of the rollout does not exist", r.version)));
            };
            version.fate = Fate::RolledBack;
            r.phase = FleetPhase::RolledBack;
            r.verdict = Some(verdict.to_string());
            r.finished_ms = Some(unix_ms());
            r.progress.push(verdict.to_string());
            let won = self.gateway.txn(
                vec![gateway::mod_is(&self.key(ROLLOUT), rev)],
                vec![
                    gateway::put(&self.key(ROLLOUT), &serde_json::to_vec(&r).map_err(err)?, None),
                    gateway::put(
                        &self.key(&store::id_key("versions", r.version)),
                        &serde_json::to_vec(&version).map_err(err)?,
                        None,
                    ),
                ],
            )?;
            if won {
                return Ok(Some(r.version));
            }
        }
        Err(err("could not abort the rollout: 50 attempts lost the race"))
    }

    /// A version with its source.
    pub fn store_version(&self, id: u64) -> StoreResult<Option<VersionRecord>> {
        use crate::store::VersionStore;
        self.store().version(id)
    }

    /// On a first start of the cluster: records `source` as version 1, known-good and running,
    /// unless another instance got there first. The running version either way.
    pub fn seed(&self, file_name: &str, source: &str) -> StoreResult<u64> {
        let running = self.key(RUNNING);
        if let Some(kv) = self.gateway.get(&running)? {
            return String::from_utf8_lossy(&kv.value).parse().map_err(err);
        }
        let counter = self.key("next/versions");
        let (id, counter_rev) = store::next_id(&self.gateway, &counter)?;
        let record = VersionRecord {
            id,
            parent: None,
            author: "safelb".into(),
            reason: format!("first start of the cluster, from {file_name} on {}", self.opts.instance),
            created_ms: unix_ms(),
            hash: content_hash(source),
            origin: "startup".into(),
            skip_preflight: false,
            emergency: false,
            fate: Fate::KnownGood,
            source: Some(source.to_owned()),
        };
        let won = self.gateway.txn(
            vec![gateway::created_at(&running, 0), gateway::mod_is(&counter, counter_rev)],
            vec![
                gateway::put(&counter, id.to_string().as_bytes(), None),
                gateway::put(
                    &self.key(&store::id_key("versions", id)),
                    &serde_json::to_vec(&record).map_err(err)?,
                    None,
                ),
                gateway::put(&running, id.to_string().as_bytes(), None),
            ],
        )?;
        if won {
            return Ok(id);
        }
        // Another instance seeded at the same moment: serve what it recorded.
        let kv = self
            .gateway
            .get(&running)?
            .ok_or_else(|| err("lost the race to seed the cluster, and nothing is running"))?;
        String::from_utf8_lossy(&kv.value).parse().map_err(err)
    }

    /// Watches `state/` on a thread of its own for as long as the process runs, waking the
    /// fleet loop on every change; resumes from the last revision after a disconnect, and on a
    /// compacted revision starts again from now (the loop re-reads everything on each wake).
    pub fn watch(self: &Arc<Self>) {
        let fleet = Arc::downgrade(self);
        let prefix = self.key("state/");
        let gateway = self.gateway.clone();
        let spawned = std::thread::Builder::new()
            .name("safelb-etcd-watch".into())
            .spawn(move || {
                let mut next = 0i64;
                loop {
                    if fleet.upgrade().is_none() {
                        return;
                    }
                    let result = gateway.watch(&prefix, next, |event| {
                        let Some(f) = fleet.upgrade() else { return false };
                        match event {
                            gateway::WatchEvent::Changed(rev) => next = rev + 1,
                            gateway::WatchEvent::Compacted(rev) => {
                                tracing::warn!(rev, "the watch's revision was compacted; reading the state again");
                                next = 0;
                            }
                        }
                        f.wake.notify_one();
                        true
                    });
                    if let Some(f) = fleet.upgrade() {
                        // Whatever happened while the watch was down is read on this wake.
                        f.wake.notify_one();
                    }
                    if result.is_err() {
                        std::thread::sleep(std::time::Duration::from_millis(250));
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the etcd watch thread; changes are seen on the next tick");
        }
    }
}

/// The fleet as the API and `safelb status` show it.
#[derive(Clone, Debug, Serialize)]
pub struct FleetStatus {
    pub cluster: String,
    pub instance: String,
    pub leader: Option<String>,
    pub etcd_reachable: bool,
    pub last_contact_ms: i64,
    pub running: Option<u64>,
    pub rollout: Option<FleetRollout>,
    pub instances: Vec<InstanceView>,
}

#[derive(Clone, Debug, Serialize)]
pub struct InstanceView {
    #[serde(flatten)]
    pub record: InstanceRecord,
    pub leader: bool,
    /// How long ago its last heartbeat reached etcd.
    pub heartbeat_age_ms: i64,
}

impl Fleet {
    pub fn status(&self) -> FleetStatus {
        let seen = self.seen();
        let now = unix_ms();
        FleetStatus {
            cluster: self.opts.cluster.clone(),
            instance: self.opts.instance.clone(),
            leader: seen.leader.clone(),
            etcd_reachable: self.reachable(),
            last_contact_ms: self.last_contact_ms(),
            running: seen.running,
            rollout: seen.rollout.map(|(r, _)| r),
            instances: seen
                .instances
                .into_iter()
                .map(|record| InstanceView {
                    leader: seen.leader.as_deref() == Some(record.name.as_str()),
                    heartbeat_age_ms: now - record.heartbeat_ms,
                    record,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(url: &str, instance: &str) -> Fleet {
        Fleet::new(FleetOptions {
            endpoints: url.to_string(),
            cluster: "t".into(),
            instance: instance.into(),
            cache_dir: std::env::temp_dir(),
        })
        .unwrap()
    }

    fn change(n: usize) -> (VersionRecord, FleetRollout) {
        let version = VersionRecord {
            id: 0,
            parent: Some(1),
            author: format!("writer {n}"),
            reason: "race".into(),
            created_ms: 0,
            hash: String::new(),
            origin: "apply".into(),
            skip_preflight: false,
            emergency: false,
            fate: Fate::Pending,
            source: Some(String::new()),
        };
        let rollout = FleetRollout {
            version: 0,
            from: 1,
            author: format!("writer {n}"),
            confirm: false,
            skip_preflight: false,
            skip_shadow: false,
            phase: FleetPhase::Pending,
            stages: Vec::new(),
            stage: 0,
            verdict: None,
            progress: Vec::new(),
            started_ms: 0,
            finished_ms: None,
        };
        (version, rollout)
    }

    /// Of many applies at once on many instances, one starts a rollout; the others are told
    /// which one is running, and record nothing.
    #[test]
    fn concurrent_submits_start_one_rollout() {
        const ROUNDS: usize = 60;
        const WRITERS: usize = 6;
        let etcd = crate::testing::Etcd::start();
        for round in 0..ROUNDS {
            let barrier = Arc::new(std::sync::Barrier::new(WRITERS));
            let results: Vec<Result<u64, Busy>> = (0..WRITERS)
                .map(|n| {
                    let (url, barrier) = (etcd.url.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        let f = fleet(&url, &format!("i{n}"));
                        let (v, r) = change(n);
                        barrier.wait();
                        f.submit(v, r).unwrap()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            let won: Vec<u64> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
            assert_eq!(won.len(), 1, "round {round}: {results:?}");
            assert!(
                results
                    .iter()
                    .all(|r| r.as_ref().err().is_none_or(|Busy(id)| *id == won[0])),
                "the losers name the winner: {results:?}"
            );
            let f = fleet(&etcd.url, "check");
            let (r, _) = f.read_rollout().unwrap().unwrap();
            assert_eq!(r.version, won[0]);
            assert_eq!(f.abort("next round").unwrap(), Some(won[0]));
        }
        let f = fleet(&etcd.url, "check");
        use crate::store::VersionStore;
        assert_eq!(
            f.store().versions(1_000).unwrap().len(),
            ROUNDS,
            "one version per round, no more"
        );
    }
}
