//! `least_request`: the backend with the fewest requests in flight per unit of weight.
//!
//! A full scan (pools are small; O(n) atomic loads), starting at a random offset so that ties
//! spread instead of piling on the first backend.

use super::Candidates;

#[derive(Debug)]
pub struct LeastRequest;

impl LeastRequest {
    pub fn pick(&self, c: &Candidates<'_>) -> Option<usize> {
        let n = c.backends.len();
        let start = fastrand::usize(..n.max(1));
        let mut best: Option<(usize, u64, u64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            let weight = c.weights[i] as u64;
            if weight == 0 || !(c.eligible)(i) {
                continue;
            }
            let load = c.backends[i].in_flight() as u64 + 1;
            // Compare load_i / weight_i < load_b / weight_b without division.
            match best {
                Some((_, bl, bw)) if load * bw >= bl * weight => {}
                _ => best = Some((i, load, weight)),
            }
        }
        best.map(|(i, _, _)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::backends;
    use super::super::{Balancer, Candidates};
    use super::*;

    #[test]
    fn picks_the_least_loaded_per_weight() {
        let bs = backends(3);
        for _ in 0..4 {
            bs[0].start_request();
        }
        bs[1].start_request();
        let b = Balancer::LeastRequest(LeastRequest);
        let all = |_: usize| true;
        let c = Candidates {
            backends: &bs,
            weights: &[1, 1, 1],
            eligible: &all,
        };
        assert_eq!(b.pick(&c, 0), Some(2));
        // Weight 4 makes 4 in flight on backend 0 cost (4+1)/4 < (0+1)/1.
        let c = Candidates {
            backends: &bs,
            weights: &[8, 1, 1],
            eligible: &all,
        };
        assert_eq!(b.pick(&c, 0), Some(0));
        let not2 = |i: usize| i != 2;
        let c = Candidates {
            backends: &bs,
            weights: &[1, 1, 1],
            eligible: &not2,
        };
        assert_eq!(b.pick(&c, 0), Some(1));
    }

    #[test]
    fn spreads_evenly_when_idle() {
        let bs = backends(4);
        let b = Balancer::LeastRequest(LeastRequest);
        let counts = super::super::testing::distribution(&b, &bs, &[1, 1, 1, 1], &|_| true, 4000);
        assert!(counts.iter().all(|&n| (800..1200).contains(&n)), "{counts:?}");
    }
}
