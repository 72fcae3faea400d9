//! `round_robin` and `weighted`: a precomputed order walked by one atomic counter.
//!
//! The weighted order is nginx's smooth weighted round robin (each step adds every weight to
//! its backend's score, picks the highest and subtracts the total), computed once per snapshot
//! instead of under a lock per request. With weights 5,1,1 it yields a a b a c a a, not
//! a a a a a b c. A backend that may not be picked is skipped: its turn goes to the next entry.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::Candidates;

/// Longest order kept; larger weight sums are scaled down to fit (shares stay within 1/4096).
const MAX_LEN: u64 = 4096;

#[derive(Debug)]
pub struct Schedule {
    order: Vec<u32>,
    next: AtomicUsize,
}

impl Schedule {
    pub fn round_robin(n: usize) -> Schedule {
        Schedule {
            order: (0..n as u32).collect(),
            next: AtomicUsize::new(fastrand::usize(..n.max(1))),
        }
    }

    pub fn smooth_weighted(weights: &[u32]) -> Schedule {
        let weights = scale(weights);
        let total: i64 = weights.iter().map(|&w| w as i64).sum();
        let mut score = vec![0i64; weights.len()];
        let mut order = Vec::with_capacity(total as usize);
        for _ in 0..total {
            for (s, &w) in score.iter_mut().zip(&weights) {
                *s += w as i64;
            }
            let best = (0..weights.len())
                .max_by_key(|&i| (score[i], std::cmp::Reverse(i)))
                .expect("a pool has at least one backend");
            score[best] -= total;
            order.push(best as u32);
        }
        let start = fastrand::usize(..order.len().max(1));
        Schedule {
            order,
            next: AtomicUsize::new(start),
        }
    }

    pub fn pick(&self, c: &Candidates<'_>) -> Option<usize> {
        let len = self.order.len();
        if len == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Relaxed);
        let first = self.order[start % len] as usize;
        if (c.eligible)(first) {
            return Some(first);
        }
        // Hand a skipped turn to a random eligible entry, so the share of a backend that is out
        // spreads evenly over the others. Drawing entries until one is eligible is uniform over
        // them; walking on from a random point (the fallback, when most are out) would hand
        // every skipped turn's share to the entry after the skipped one.
        for _ in 0..8 {
            let i = self.order[fastrand::usize(..len)] as usize;
            if (c.eligible)(i) {
                return Some(i);
            }
        }
        let from = start + 1 + fastrand::usize(..len);
        (0..len)
            .map(|k| self.order[(from + k) % len] as usize)
            .find(|&i| (c.eligible)(i))
    }
}

/// Divides weights by their common divisor and scales them under `MAX_LEN`, keeping every
/// positive weight at least 1.
fn scale(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().fold(0u32, |g, &w| gcd(g, w)).max(1);
    let reduced: Vec<u64> = weights.iter().map(|&w| (w / g) as u64).collect();
    let total: u64 = reduced.iter().sum();
    if total <= MAX_LEN {
        return reduced.iter().map(|&w| w as u32).collect();
    }
    reduced
        .iter()
        .map(|&w| {
            if w == 0 {
                0
            } else {
                ((w * MAX_LEN) / total).max(1) as u32
            }
        })
        .collect()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{backends, distribution};
    use super::super::Balancer;
    use super::*;

    #[test]
    fn round_robin_is_even_and_skips_the_ineligible() {
        let bs = backends(3);
        let b = Balancer::Schedule(Schedule::round_robin(3));
        assert_eq!(distribution(&b, &bs, &[1, 1, 1], &|_| true, 300), vec![100, 100, 100]);
        let skipped = distribution(&b, &bs, &[1, 1, 1], &|i| i != 1, 3000);
        assert_eq!(skipped[1], 0);
        // The skipped share is spread evenly: 1,500 each (a walk from a random point gave the
        // successor of the skipped entry two thirds of it: 1,333 and 1,667).
        assert!(
            (1400..=1600).contains(&skipped[0]) && (1400..=1600).contains(&skipped[2]),
            "{skipped:?}"
        );
    }

    #[test]
    fn smooth_weighted_is_exact_and_interleaved() {
        let s = Schedule::smooth_weighted(&[5, 1, 1]);
        assert_eq!(s.order, vec![0, 0, 1, 0, 2, 0, 0]);
        let bs = backends(3);
        let b = Balancer::Schedule(Schedule::smooth_weighted(&[3, 2, 0]));
        assert_eq!(distribution(&b, &bs, &[3, 2, 0], &|_| true, 500), vec![300, 200, 0]);
    }

    #[test]
    fn huge_weights_are_scaled_not_dropped() {
        let w = scale(&[1000, 1000, 1, 999]);
        assert!(w.iter().all(|&x| x > 0));
        assert!(w.iter().map(|&x| x as u64).sum::<u64>() <= MAX_LEN);
        assert_eq!(scale(&[200, 100]), vec![2, 1]);
    }
}
