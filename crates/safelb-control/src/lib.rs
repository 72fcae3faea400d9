//! safelb's control plane: which config version serves, and how a new one gets there.
//!
//! Start at [`controller::Controller`]: `apply` records a candidate in the [`store`] and runs its
//! [`rollout`] (`preflight` -> canary steps judged by [`judge`] -> promote or roll back);
//! `rollback` puts a known-good version back at once; [`controller::recover`] picks the version to
//! serve at start. [`impact`] previews the traffic a change moves; [`diff`] shows it as text.
//!
//! Architecture Invariant: traffic is touched only through `safelb_proxy::ProxyHandle`; SQL
//! stays inside `sqlite.rs` behind the [`store::VersionStore`] trait.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod clock;
pub mod controller;
pub mod diff;
pub mod event;
pub mod fleet;
pub mod impact;
pub mod judge;
pub mod live;
pub mod monitor;
pub mod notify;
pub mod postmortem;
pub mod preflight;
pub mod rollout;
pub mod sqlite;
pub mod store;
#[cfg(test)]
mod testing;

use std::sync::{Arc, Mutex};

pub use controller::{ApplyError, ApplyRequest, Controller, RollbackError};
use store::{StoreError, StoreResult, VersionStore};

/// A shared store whose blocking calls (SQLite with fsync) run on tokio's blocking pool, never
/// on a worker thread that also serves requests.
#[derive(Clone)]
pub struct StoreHandle {
    inner: Arc<Mutex<Box<dyn VersionStore>>>,
    live: Arc<live::LiveFeed>,
    /// Fleet mode: the instance that records, named in each event's row.
    instance: Option<Arc<str>>,
}

impl StoreHandle {
    pub fn new(store: impl VersionStore + 'static) -> StoreHandle {
        StoreHandle {
            inner: Arc::new(Mutex::new(Box::new(store))),
            live: Arc::default(),
            instance: None,
        }
    }

    /// Fleet mode: every event this handle records names `instance` (in its data, and at the
    /// start of its message), so the cluster's one history says where each thing happened.
    pub fn for_instance(mut self, instance: &str) -> StoreHandle {
        self.instance = Some(Arc::from(instance));
        self
    }

    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn VersionStore) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut store = inner
                .lock()
                .map_err(|_| StoreError::Failed("store lock poisoned".into()))?;
            f(store.as_mut())
        })
        .await
        .map_err(|e| StoreError::Failed(format!("store task failed: {e}")))?
    }

    /// Records an event and writes its log line: the one way the control plane records what it
    /// did. A store failure is logged as such (the event's line is still in the log).
    pub async fn record(&self, event: &event::Event) {
        let mut row = event.record();
        if let Some(name) = &self.instance {
            if let Some(data) = row.data.as_object_mut() {
                data.insert("instance".into(), serde_json::Value::from(name.as_ref()));
            }
            row.message = format!("{name}: {}", row.message);
        }
        tracing::info!(event = row.kind, version = row.version, "{}", row.message);
        self.live.event(serde_json::json!({
            "time_ms": clock::unix_ms(),
            "kind": row.kind,
            "version": row.version,
            "message": row.message,
            "data": row.data,
        }));
        let kind = row.kind;
        if let Err(err) = self.call(move |s| s.append_event(row)).await {
            tracing::error!(error = %err, event = kind, "recording an event in the store failed");
        }
    }

    /// The live feed: events as they are recorded, and the monitor's stats frames.
    pub fn live(&self) -> &Arc<live::LiveFeed> {
        &self.live
    }

    /// For start-up, before the runtime serves traffic.
    pub fn blocking<T>(&self, f: impl FnOnce(&mut dyn VersionStore) -> T) -> T {
        let mut store = self.inner.lock().expect("store lock is not poisoned at start-up");
        f(store.as_mut())
    }
}
