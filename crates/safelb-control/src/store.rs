//! The version store: numbered immutable config versions, the running pointer, and an
//! append-only event log. One small trait so the pipeline never sees SQL or files; the
//! embedded implementation is [`crate::sqlite::SqliteStore`], an etcd one can follow for fleets.

use serde::Serialize;

/// What became of a version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// Submitted; its rollout has not finished.
    #[default]
    Pending,
    /// Refused before serving a request (validation, preflight, freeze, listeners).
    Rejected,
    /// Served canary traffic and was rolled back, or its rollout was interrupted.
    RolledBack,
    /// Serves all traffic without having completed a bake (a manual rollback, the first start).
    Promoted,
    /// Completed its bake: an automatic rollback target.
    KnownGood,
}

impl Fate {
    pub fn as_str(self) -> &'static str {
        match self {
            Fate::Pending => "pending",
            Fate::Rejected => "rejected",
            Fate::RolledBack => "rolled_back",
            Fate::Promoted => "promoted",
            Fate::KnownGood => "known_good",
        }
    }

    pub fn parse(s: &str) -> Fate {
        match s {
            "rejected" => Fate::Rejected,
            "rolled_back" => Fate::RolledBack,
            "promoted" => Fate::Promoted,
            "known_good" => Fate::KnownGood,
            _ => Fate::Pending,
        }
    }
}

/// A version to append.
#[derive(Clone, Debug)]
pub struct NewVersion {
    pub parent: Option<u64>,
    pub author: String,
    pub reason: String,
    pub source: String,
    /// How it came: `apply`, `rollback`, `sighup`, `startup`.
    pub origin: String,
    pub skip_preflight: bool,
    pub emergency: bool,
    pub fate: Fate,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct VersionRecord {
    pub id: u64,
    pub parent: Option<u64>,
    pub author: String,
    pub reason: String,
    pub created_ms: i64,
    /// Hex of a 64-bit content hash of the source.
    pub hash: String,
    pub origin: String,
    pub skip_preflight: bool,
    pub emergency: bool,
    pub fate: Fate,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

#[derive(Clone, Debug)]
pub struct NewEvent {
    /// `<Noun><PastVerb>`, e.g. `RolloutRolledBack`.
    pub kind: &'static str,
    pub version: Option<u64>,
    pub message: String,
    pub data: serde_json::Value,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct EventRecord {
    pub id: u64,
    pub time_ms: i64,
    pub kind: String,
    pub version: Option<u64>,
    pub message: String,
    pub data: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("version store: {0}")]
    Failed(String),
    /// The filesystem under the store has no room: nothing was written. Callers answer this
    /// apart (HTTP 507), because freeing space is the fix, not a retry.
    #[error(
        "version store: the disk is full ({0}); nothing was recorded or changed: free space on it, then try again"
    )]
    Full(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

pub trait VersionStore: Send {
    /// Appends a version and makes it durable before returning its id.
    fn append_version(&mut self, v: NewVersion) -> StoreResult<u64>;
    fn set_fate(&mut self, id: u64, fate: Fate) -> StoreResult<()>;
    /// Moves the running pointer (durably).
    fn set_running(&mut self, id: u64) -> StoreResult<()>;
    /// Sets version `id`'s fate and moves the running pointer to `running` as one durable step,
    /// so a crash leaves both or neither: a promotion is never recorded without the version it
    /// made run. A store that cannot do both at once writes the pointer last.
    fn settle(&mut self, id: u64, fate: Fate, running: u64) -> StoreResult<()> {
        self.set_fate(id, fate)?;
        self.set_running(running)
    }
    fn running(&self) -> StoreResult<Option<u64>>;
    /// One version with its source.
    fn version(&self, id: u64) -> StoreResult<Option<VersionRecord>>;
    /// Newest first, without sources.
    fn versions(&self, limit: usize) -> StoreResult<Vec<VersionRecord>>;
    /// The newest known-good version with an id below `before`.
    fn known_good_before(&self, before: u64) -> StoreResult<Option<u64>>;
    fn append_event(&mut self, e: NewEvent) -> StoreResult<u64>;
    /// Events with an id above `after`, oldest first.
    fn events(&self, after: u64, limit: usize) -> StoreResult<Vec<EventRecord>>;
    /// Events whose time is within `[from_ms, to_ms]`, oldest first.
    fn events_between(&self, from_ms: i64, to_ms: i64) -> StoreResult<Vec<EventRecord>>;
    fn open_incident(&mut self, opened_ms: i64, title: &str) -> StoreResult<u64>;
    /// Records the incident's end and its report data.
    fn resolve_incident(&mut self, id: u64, resolved_ms: i64, report: &serde_json::Value) -> StoreResult<()>;
    /// Newest first.
    fn incidents(&self, limit: usize) -> StoreResult<Vec<IncidentRecord>>;
    fn incident(&self, id: u64) -> StoreResult<Option<IncidentRecord>>;
}

#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct IncidentRecord {
    pub id: u64,
    pub opened_ms: i64,
    pub resolved_ms: Option<i64>,
    pub title: String,
    /// The facts the postmortem is written from (set when the incident resolves).
    pub report: serde_json::Value,
}

/// Stable content hash of a config source (for "is this file what is running?").
pub fn content_hash(source: &str) -> String {
    format!("{:016x}", fnv1a(source.as_bytes()))
}

/// FNV-1a 64: stable across versions and platforms, and enough to tell configs apart.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
