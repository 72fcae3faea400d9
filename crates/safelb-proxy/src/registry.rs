//! The long-lived records snapshots attach to: for each backend address what is known about it
//! (its [`BackendState`]) and its connections ([`Conns`]); for each rate-limited route its
//! limiter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::backend::BackendState;
use crate::ratelimit::RateLimiters;
use crate::upstream::Conns;

/// The long-lived map from address to backend state that snapshots attach to.
/// One backend address: what is known about it and its connections.
type Entry = (Arc<BackendState>, Arc<Conns>);

#[derive(Default)]
pub(crate) struct Registry {
    backends: Mutex<HashMap<SocketAddr, Entry>>,
    /// Rate limiters by route, kept across swaps that leave a route's rule unchanged.
    pub(crate) limiters: RateLimiters,
}

impl Registry {
    /// The address's state and connections, created on first use.
    pub(crate) fn get_or_insert(&self, addr: SocketAddr) -> Entry {
        let mut map = self
            .backends
            .lock()
            .expect("registry lock is never poisoned: no panics under it");
        map.entry(addr)
            .or_insert_with(|| (Arc::new(BackendState::new(addr)), Arc::new(Conns::new(addr))))
            .clone()
    }

    pub(crate) fn get(&self, addr: &SocketAddr) -> Option<Arc<BackendState>> {
        self.backends
            .lock()
            .expect("registry lock is never poisoned")
            .get(addr)
            .map(|(state, _)| state.clone())
    }

    /// Forgets addresses no live snapshot names any more.
    pub(crate) fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        self.backends
            .lock()
            .expect("registry lock is never poisoned")
            .retain(|a, _| keep(a));
    }

    pub(crate) fn all(&self) -> Vec<Arc<BackendState>> {
        let mut v: Vec<_> = self
            .backends
            .lock()
            .expect("registry lock is never poisoned")
            .values()
            .map(|(state, _)| state.clone())
            .collect();
        v.sort_by_key(|b| b.addr);
        v
    }
}
