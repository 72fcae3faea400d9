//! Recent traffic, kept for the impact preview of `safelb plan`: a ring of the last requests'
//! listener, method, host and path, replayed through a candidate's route table to show which share of
//! traffic a change would move.
//!
//! One request in [`EVERY`] is sampled; a slot that another thread holds is skipped rather than
//! waited for, so sampling never blocks a request.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

pub const CAPACITY: usize = 10_000;
pub const EVERY: usize = 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The listener the request arrived on (routes may match on it).
    pub listener: String,
    pub method: String,
    pub host: String,
    pub path: String,
    /// When it was seen ([`crate::clock::now_ms`]), for rates.
    pub ms: u64,
}

pub struct Samples {
    slots: Vec<Mutex<Option<Sample>>>,
    seen: AtomicUsize,
}

impl Default for Samples {
    fn default() -> Self {
        Samples {
            slots: (0..CAPACITY).map(|_| Mutex::new(None)).collect(),
            seen: AtomicUsize::new(0),
        }
    }
}

impl Samples {
    pub fn record(&self, listener: &str, method: &str, host: &str, path: &str) {
        let n = self.seen.fetch_add(1, Relaxed);
        if n % EVERY != 0 {
            return;
        }
        if let Ok(mut slot) = self.slots[(n / EVERY) % CAPACITY].try_lock() {
            match slot.as_mut() {
                // Once the ring is full, overwrite in place: no allocation on the request path.
                Some(old) => {
                    let fields = [
                        (&mut old.listener, listener),
                        (&mut old.method, method),
                        (&mut old.host, host),
                        (&mut old.path, path),
                    ];
                    for (to, from) in fields {
                        to.clear();
                        to.push_str(from);
                    }
                    old.ms = crate::clock::now_ms();
                }
                None => {
                    *slot = Some(Sample {
                        listener: listener.to_owned(),
                        method: method.to_owned(),
                        host: host.to_owned(),
                        path: path.to_owned(),
                        ms: crate::clock::now_ms(),
                    })
                }
            }
        }
    }

    /// The samples currently held (order not significant).
    pub fn collect(&self) -> Vec<Sample> {
        self.slots
            .iter()
            .filter_map(|s| s.lock().ok().and_then(|g| g.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_one_in_every_n_up_to_capacity() {
        let s = Samples::default();
        for i in 0..(EVERY * 10) {
            s.record("public", "GET", "h", &format!("/{i}"));
        }
        assert_eq!(s.collect().len(), 10);
        for _ in 0..(EVERY * CAPACITY * 2) {
            s.record("public", "GET", "h", "/");
        }
        assert_eq!(s.collect().len(), CAPACITY);
    }
}
