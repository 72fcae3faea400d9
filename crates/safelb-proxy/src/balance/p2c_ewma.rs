//! `p2c_ewma`: power of two random choices, scored by latency EWMA × (in flight + 1) / weight.
//!
//! Two random candidates avoid the herd that a global "best" attracts, and the score moves
//! load away from a backend as soon as it slows down (peak-EWMA, see `backend.rs`).

use super::Candidates;

#[derive(Debug)]
pub struct P2cEwma;

impl P2cEwma {
    pub fn pick(&self, c: &Candidates<'_>) -> Option<usize> {
        let n = c.backends.len();
        let ok = |i: usize| c.weights[i] > 0 && (c.eligible)(i);
        let (a, b) = match n {
            0 => return None,
            1 => return ok(0).then_some(0),
            _ => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                (a, b)
            }
        };
        let score = |i: usize| {
            let be = &c.backends[i];
            be.ewma_micros() * (be.in_flight() as f64 + 1.0) / c.weights[i] as f64
        };
        match (ok(a), ok(b)) {
            (true, true) => Some(if score(a) <= score(b) { a } else { b }),
            (true, false) => Some(a),
            (false, true) => Some(b),
            // Both draws unusable: fall back to the best eligible backend, so a mostly-down
            // pool still finds its last healthy member.
            (false, false) => (0..n).filter(|&i| ok(i)).min_by(|&x, &y| score(x).total_cmp(&score(y))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{backends, distribution};
    use super::super::Balancer;
    use super::*;

    #[test]
    fn slow_backend_gets_least_traffic() {
        let bs = backends(3);
        bs[0].observe_latency(Duration::from_millis(200), crate::clock::now_ms());
        bs[1].observe_latency(Duration::from_millis(2), crate::clock::now_ms());
        bs[2].observe_latency(Duration::from_millis(2), crate::clock::now_ms());
        let counts = distribution(&Balancer::P2cEwma(P2cEwma), &bs, &[1, 1, 1], &|_| true, 3000);
        // The slow one wins no comparison, so it is picked only when drawn... never: it loses both.
        assert_eq!(counts[0], 0, "{counts:?}");
        assert!(counts[1] > 1200 && counts[2] > 1200, "{counts:?}");
    }

    #[test]
    fn even_when_equal_and_finds_the_last_eligible() {
        let bs = backends(4);
        let counts = distribution(&Balancer::P2cEwma(P2cEwma), &bs, &[1, 1, 1, 1], &|_| true, 4000);
        assert!(counts.iter().all(|&n| (700..1300).contains(&n)), "{counts:?}");
        let only3 = |i: usize| i == 3;
        let counts = distribution(&Balancer::P2cEwma(P2cEwma), &bs, &[1, 1, 1, 1], &only3, 100);
        assert_eq!(counts, vec![0, 0, 0, 100]);
    }
}
