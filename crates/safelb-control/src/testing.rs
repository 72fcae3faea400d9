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
