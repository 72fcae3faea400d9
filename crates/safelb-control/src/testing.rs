//! Helpers for the control plane's unit tests: a config from text, a store in a temporary
//! directory that is removed when the test ends.

use std::path::PathBuf;

use safelb_config::ValidConfig;

use crate::sqlite::SqliteStore;
use crate::StoreHandle;

/// One listener, route `r` to pool `p` with one backend (which nothing answers), no shadow.
pub const RUNNING: &str = "[listener.public]\nbind = \"127.0.0.1:1\"\n[rollout]\nshadow = false\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [\"127.0.0.1:9\"]\n";

pub fn config(source: &str) -> ValidConfig {
    safelb_config::check("t.toml", source)
        .into_result()
        .expect("a valid test config")
}

/// A temporary store directory, removed when dropped.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fresh store in its own temporary directory.
pub fn store(name: &str) -> (StoreHandle, TempDir) {
    let dir = std::env::temp_dir().join(format!(
        "safelb-{name}-test-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    let store = StoreHandle::new(SqliteStore::open(&dir).expect("a store in a temp dir"));
    (store, TempDir(dir))
}

/// What every [`VersionStore`](crate::store::VersionStore) must do, for any implementation (the
/// embedded SQLite store now; the etcd one of fleet mode must pass the same). `open` opens the
/// store under test afresh each call, on the same data: what was written before a reopen must be
/// there after it.
pub fn store_contract(open: &dyn Fn() -> Box<dyn crate::store::VersionStore>) {
    use crate::store::{Fate, NewEvent, NewVersion};
    let version = |parent: Option<u64>, source: &str, fate: Fate| NewVersion {
        parent,
        author: "ana".into(),
        reason: format!("make it {source}"),
        source: source.into(),
        origin: "apply".into(),
        skip_preflight: source.contains("skip"),
        emergency: false,
        fate,
    };
    {
        let mut s = open();
        assert_eq!(s.running().unwrap(), None, "a new store runs nothing");
        assert!(s.versions(10).unwrap().is_empty());
        assert_eq!(s.version(1).unwrap().map(|v| v.id), None);
        let a = s.append_version(version(None, "a", Fate::KnownGood)).unwrap();
        let b = s.append_version(version(Some(a), "b skip", Fate::Pending)).unwrap();
        let c = s.append_version(version(Some(b), "c", Fate::Pending)).unwrap();
        assert_eq!((a, b, c), (1, 2, 3), "ids are allocated in order from 1");
        s.set_running(a).unwrap();
        s.set_fate(b, Fate::RolledBack).unwrap();
        s.settle(c, Fate::KnownGood, c).unwrap();
        let e1 = s
            .append_event(NewEvent {
                kind: "ChangeSubmitted",
                version: Some(b),
                message: "one".into(),
                data: serde_json::json!({ "n": 1 }),
            })
            .unwrap();
        let e2 = s
            .append_event(NewEvent {
                kind: "RolloutRolledBack",
                version: None,
                message: "two".into(),
                data: serde_json::json!({}),
            })
            .unwrap();
        assert!(e2 > e1, "event ids ascend");
        let i = s.open_incident(1_000, "it broke").unwrap();
        let j = s.open_incident(2_000, "again").unwrap();
        assert!(j > i);
        s.resolve_incident(i, 1_500, &serde_json::json!({ "incident": i }))
            .unwrap();
    }
    // Everything above is durable: read it back through a new handle.
    let s = open();
    assert_eq!(s.running().unwrap(), Some(3));
    let all = s.versions(10).unwrap();
    assert_eq!(
        all.iter().map(|v| (v.id, v.fate)).collect::<Vec<_>>(),
        [(3, Fate::KnownGood), (2, Fate::RolledBack), (1, Fate::KnownGood)],
        "newest first, fates as set"
    );
    assert!(all.iter().all(|v| v.source.is_none()), "lists come without sources");
    assert_eq!(s.versions(1).unwrap().len(), 1, "the limit holds");
    let b = s.version(2).unwrap().expect("version 2");
    assert_eq!(
        (b.parent, b.source.as_deref(), b.author.as_str(), b.skip_preflight),
        (Some(1), Some("b skip"), "ana", true)
    );
    assert_eq!(
        s.known_good_before(3).unwrap(),
        Some(1),
        "the rolled-back one is skipped"
    );
    assert_eq!(s.known_good_before(4).unwrap(), Some(3));
    assert_eq!(s.known_good_before(1).unwrap(), None);
    let events = s.events(0, 10).unwrap();
    assert_eq!(
        events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(),
        ["ChangeSubmitted", "RolloutRolledBack"]
    );
    assert_eq!((events[0].version, events[0].data["n"].as_i64()), (Some(2), Some(1)));
    assert_eq!(s.events(events[0].id, 10).unwrap().len(), 1, "`after` is exclusive");
    assert_eq!(s.events(0, 1).unwrap().len(), 1, "the limit holds");
    let (from, to) = (events[0].time_ms, events[1].time_ms);
    assert_eq!(s.events_between(from, to).unwrap().len(), 2, "both ends are inclusive");
    assert!(s.events_between(to + 1, to + 1_000).unwrap().is_empty());
    let incidents = s.incidents(10).unwrap();
    assert_eq!(
        incidents.iter().map(|i| i.title.as_str()).collect::<Vec<_>>(),
        ["again", "it broke"]
    );
    let first = s.incident(incidents[1].id).unwrap().expect("the first incident");
    assert_eq!((first.opened_ms, first.resolved_ms), (1_000, Some(1_500)));
    assert_eq!(first.report["incident"].as_u64(), Some(first.id));
    assert_eq!(s.incident(incidents[0].id).unwrap().unwrap().resolved_ms, None);
    assert!(s.incident(999).unwrap().is_none());
}

pub use safelb_testkit::etcd::Etcd;
