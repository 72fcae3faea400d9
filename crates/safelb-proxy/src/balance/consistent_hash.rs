//! `consistent_hash`: a hash ring with virtual nodes (ketama style).
//!
//! Each backend owns points derived from its own address only, so adding or removing one
//! backend moves only the keys of that backend. When a key's owner may not be picked, the
//! walk continues clockwise to the next eligible backend: keys of the other backends stay put.

use std::sync::Arc;

use xxhash_rust::xxh3::xxh3_64;

use super::Candidates;
use crate::backend::BackendState;

/// Virtual nodes per unit of weight; weight is capped so a ring stays small.
const POINTS_PER_WEIGHT: u32 = 100;
const MAX_POINTS_PER_BACKEND: u32 = 2_000;

#[derive(Debug)]
pub struct Ring {
    /// (point, backend index), sorted by point.
    points: Vec<(u64, u32)>,
}

impl Ring {
    pub fn new(backends: &[Arc<BackendState>], weights: &[u32]) -> Ring {
        let mut points = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            let count = (weights[i].saturating_mul(POINTS_PER_WEIGHT)).min(MAX_POINTS_PER_BACKEND);
            for v in 0..count {
                let key = format!("{}#{v}", b.addr);
                points.push((xxh3_64(key.as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    pub fn pick(&self, c: &Candidates<'_>, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let start = self.points.partition_point(|&(p, _)| p < hash);
        let len = self.points.len();
        // Worst case (every backend out) walks the ring once: at most 2,000 points a backend.
        let mut last = u32::MAX;
        for k in 0..len {
            let (_, i) = self.points[(start + k) % len];
            if i != last && (c.eligible)(i as usize) {
                return Some(i as usize);
            }
            last = i;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{backends, distribution};
    use super::super::{Balancer, Candidates};
    use super::*;

    fn owner(
        ring: &Ring,
        bs: &[Arc<BackendState>],
        key: u64,
        eligible: &dyn Fn(usize) -> bool,
    ) -> std::net::SocketAddr {
        let w = vec![1; bs.len()];
        let c = Candidates {
            backends: bs,
            weights: &w,
            eligible,
        };
        bs[ring.pick(&c, key).unwrap()].addr
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let bs = backends(5);
        let ring = Ring::new(&bs, &[1; 5]);
        let fewer: Vec<_> = bs.iter().filter(|b| b.addr != bs[2].addr).cloned().collect();
        let ring_fewer = Ring::new(&fewer, &[1; 4]);
        let mut moved = 0;
        for k in 0..10_000u64 {
            let key = xxh3_64(&k.to_le_bytes());
            let before = owner(&ring, &bs, key, &|_| true);
            let after = owner(&ring_fewer, &fewer, key, &|_| true);
            if before == bs[2].addr {
                moved += 1;
            } else {
                assert_eq!(before, after, "key {k} moved though its backend stayed");
            }
        }
        assert!(
            (1400..2600).contains(&moved),
            "the removed backend owned {moved} of 10000 keys"
        );
    }

    #[test]
    fn an_ineligible_owner_hands_over_only_its_keys() {
        let bs = backends(4);
        let ring = Ring::new(&bs, &[1; 4]);
        for k in 0..2_000u64 {
            let key = xxh3_64(&k.to_le_bytes());
            let before = owner(&ring, &bs, key, &|_| true);
            let after = owner(&ring, &bs, key, &|i| i != 1);
            assert!(before == bs[1].addr || before == after);
            assert_ne!(after, bs[1].addr);
        }
    }

    #[test]
    fn distribution_follows_weights_roughly() {
        let bs = backends(3);
        let b = Balancer::ConsistentHash(Ring::new(&bs, &[1, 1, 2]));
        let counts = distribution(&b, &bs, &[1, 1, 2], &|_| true, 20_000);
        assert!(counts[2] > counts[0] && counts[2] > counts[1], "{counts:?}");
        assert!(counts.iter().all(|&n| n > 3_000), "{counts:?}");
    }
}
