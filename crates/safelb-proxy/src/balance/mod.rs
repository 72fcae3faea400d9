//! Backend selection: one file per policy family, one enum to dispatch.
//!
//! A policy sees the pool's backends, their weights and a predicate saying which may be picked
//! (available and not already tried by this request). It never looks at health itself, so the
//! same code serves normal routing, retries and a fail-open panic pool.

mod consistent_hash;
mod least_request;
mod p2c_ewma;
mod schedule;

use std::sync::Arc;

use safelb_config::Balance;

use crate::backend::BackendState;

pub use consistent_hash::Ring;
pub use least_request::LeastRequest;
pub use p2c_ewma::P2cEwma;
pub use schedule::Schedule;

/// The selection state of one pool in one snapshot.
#[derive(Debug)]
pub enum Balancer {
    /// `round_robin` and `weighted` (smooth weighted round robin as nginx does it).
    Schedule(Schedule),
    LeastRequest(LeastRequest),
    P2cEwma(P2cEwma),
    ConsistentHash(Ring),
}

/// What a policy may look at for one pick.
pub struct Candidates<'a> {
    pub backends: &'a [Arc<BackendState>],
    pub weights: &'a [u32],
    /// May backend `i` be picked?
    pub eligible: &'a dyn Fn(usize) -> bool,
}

impl Balancer {
    pub fn new(policy: Balance, backends: &[Arc<BackendState>], weights: &[u32]) -> Balancer {
        match policy {
            Balance::RoundRobin => Balancer::Schedule(Schedule::round_robin(backends.len())),
            Balance::Weighted => Balancer::Schedule(Schedule::smooth_weighted(weights)),
            Balance::LeastRequest => Balancer::LeastRequest(LeastRequest),
            Balance::P2cEwma => Balancer::P2cEwma(P2cEwma),
            Balance::ConsistentHash => Balancer::ConsistentHash(Ring::new(backends, weights)),
        }
    }

    /// The index of the chosen backend, or `None` when no candidate is eligible.
    /// `hash` is the request's key for `consistent_hash`; other policies ignore it.
    pub fn pick(&self, c: &Candidates<'_>, hash: u64) -> Option<usize> {
        match self {
            Balancer::Schedule(s) => s.pick(c),
            Balancer::LeastRequest(l) => l.pick(c),
            Balancer::P2cEwma(p) => p.pick(c),
            Balancer::ConsistentHash(r) => r.pick(c, hash),
        }
    }

    pub fn needs_hash(&self) -> bool {
        matches!(self, Balancer::ConsistentHash(_))
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn backends(n: usize) -> Vec<Arc<BackendState>> {
        (0..n)
            .map(|i| Arc::new(BackendState::new(format!("127.0.0.1:{}", 10_000 + i).parse().unwrap())))
            .collect()
    }

    /// How many of `rounds` picks each backend gets.
    pub fn distribution(
        b: &Balancer,
        backends: &[Arc<BackendState>],
        weights: &[u32],
        eligible: &dyn Fn(usize) -> bool,
        rounds: usize,
    ) -> Vec<usize> {
        let mut counts = vec![0; backends.len()];
        let c = Candidates {
            backends,
            weights,
            eligible,
        };
        for i in 0..rounds {
            let picked = b
                .pick(&c, xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()))
                .expect("some backend is eligible");
            counts[picked] += 1;
        }
        counts
    }
}
