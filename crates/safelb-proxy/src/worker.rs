//! Which data-plane worker a thread is, and state kept once per worker.
//!
//! `safelb serve --threads N` runs N workers, each a thread with its own current-thread runtime
//! (worker 0 is the main thread) and its own listening socket per listener (`SO_REUSEPORT`, see [`crate::server::bind_group`]).
//! A connection to a backend is registered with the reactor of the runtime that opened it, and a
//! hyper client connection's task lives there too; handed to a request on another worker, every
//! read would cross threads. So idle upstream connections are kept per worker ([`PerWorker`]):
//! a request takes one opened on its own thread.
//!
//! Threads that are not workers (the control plane, the blocking pool, tests) share one extra
//! slot.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Workers the process runs (set once at start; 1 until then).
static WORKERS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Declares how many workers the process runs, before any backend state is built.
pub fn set_workers(n: usize) {
    WORKERS.store(n.max(1), Relaxed);
}

/// Marks the calling thread as worker `index` (0-based), for the rest of its life.
pub fn enter(index: usize) {
    INDEX.with(|i| i.set(index));
}

/// One `T` per worker, and one shared by every other thread.
pub(crate) struct PerWorker<T> {
    slots: Box<[T]>,
}

impl<T: Default> Default for PerWorker<T> {
    fn default() -> PerWorker<T> {
        let n = WORKERS.load(Relaxed) + 1;
        PerWorker {
            slots: (0..n).map(|_| T::default()).collect(),
        }
    }
}

impl<T> PerWorker<T> {
    /// The calling thread's slot.
    pub(crate) fn local(&self) -> &T {
        let last = self.slots.len() - 1;
        &self.slots[INDEX.with(Cell::get).min(last)]
    }

    /// Every slot, for what concerns them all (closing every idle connection of a backend).
    pub(crate) fn all(&self) -> impl Iterator<Item = &T> {
        self.slots.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_gets_its_own_slot_and_others_share_the_last() {
        set_workers(2);
        let slots: PerWorker<AtomicUsize> = PerWorker::default();
        assert_eq!(slots.all().count(), 3);
        std::thread::scope(|s| {
            for worker in [Some(0), Some(1), None, Some(7)] {
                let slots = &slots;
                s.spawn(move || {
                    if let Some(w) = worker {
                        enter(w);
                    }
                    slots.local().fetch_add(1, Relaxed);
                });
            }
        });
        let counts: Vec<usize> = slots.all().map(|c| c.load(Relaxed)).collect();
        // Worker 7 does not exist in a two-worker process: it shares the last slot.
        assert_eq!(counts, [1, 1, 2]);
    }
}
