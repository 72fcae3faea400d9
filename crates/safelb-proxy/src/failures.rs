//! The record of failed (5xx) requests kept for incident reports: when, and from which client.
//!
//! Written on the request path of every 5xx, so it takes no lock: a ring of slots claimed by one
//! atomic counter, each slot three atomics. A slot is written time-last and read time-twice, so a
//! reader skips a slot that a writer is filling. Chunks of the ring are allocated on first use:
//! a process that never fails never pays for it.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Failed requests remembered (the most recent ones).
pub const KEPT: usize = CHUNK * CHUNKS;
const CHUNK: usize = 4096;
const CHUNKS: usize = 48;

#[derive(Default)]
struct Slot {
    /// Unix milliseconds; 0 while the slot is empty or being written.
    time_ms: AtomicU64,
    ip_hi: AtomicU64,
    ip_lo: AtomicU64,
}

/// Failures between two times: how many, from how many distinct clients, first and last time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FailureSpan {
    pub failed: usize,
    pub clients: usize,
    pub first_ms: Option<u64>,
    pub last_ms: Option<u64>,
}

pub struct FailedClients {
    next: AtomicUsize,
    chunks: Box<[OnceLock<Box<[Slot]>>]>,
}

impl Default for FailedClients {
    fn default() -> Self {
        FailedClients {
            next: AtomicUsize::new(0),
            chunks: (0..CHUNKS).map(|_| OnceLock::new()).collect(),
        }
    }
}

impl FailedClients {
    pub fn record(&self, time_ms: u64, ip: IpAddr) {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % KEPT;
        let chunk = self.chunks[n / CHUNK].get_or_init(|| (0..CHUNK).map(|_| Slot::default()).collect());
        let slot = &chunk[n % CHUNK];
        let bits = match ip {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().to_bits(),
            IpAddr::V6(v6) => v6.to_bits(),
        };
        slot.time_ms.store(0, Ordering::Release);
        slot.ip_hi.store((bits >> 64) as u64, Ordering::Relaxed);
        slot.ip_lo.store(bits as u64, Ordering::Relaxed);
        slot.time_ms.store(time_ms.max(1), Ordering::Release);
    }

    /// Failures with `from_ms <= time <= to_ms`.
    pub fn between(&self, from_ms: u64, to_ms: u64) -> FailureSpan {
        let mut span = FailureSpan::default();
        let mut clients: HashSet<u128> = HashSet::new();
        for chunk in self.chunks.iter().filter_map(|c| c.get()) {
            for slot in chunk.iter() {
                let t = slot.time_ms.load(Ordering::Acquire);
                if t == 0 || t < from_ms || t > to_ms {
                    continue;
                }
                let ip =
                    ((slot.ip_hi.load(Ordering::Relaxed) as u128) << 64) | slot.ip_lo.load(Ordering::Relaxed) as u128;
                if slot.time_ms.load(Ordering::Acquire) != t {
                    // Rewritten while read: the failure it held is gone from the record.
                    continue;
                }
                span.failed += 1;
                clients.insert(ip);
                span.first_ms = Some(span.first_ms.map_or(t, |f| f.min(t)));
                span.last_ms = Some(span.last_ms.map_or(t, |l| l.max(t)));
            }
        }
        span.clients = clients.len();
        span
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_failures_and_distinct_clients_in_a_window() {
        let f = FailedClients::default();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "::1".parse().unwrap();
        for t in 100..110 {
            f.record(t, if t % 2 == 0 { a } else { b });
        }
        f.record(500, a);
        let s = f.between(100, 109);
        assert_eq!(
            (s.failed, s.clients, s.first_ms, s.last_ms),
            (10, 2, Some(100), Some(109))
        );
        assert_eq!(f.between(200, 400), FailureSpan::default());
        assert_eq!(f.between(0, 1000).failed, 11);
    }

    #[test]
    fn keeps_the_most_recent_failures() {
        let f = FailedClients::default();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        for t in 1..=(KEPT as u64 + 10) {
            f.record(t, a);
        }
        let s = f.between(0, u64::MAX);
        assert_eq!(s.failed, KEPT);
        assert_eq!(s.first_ms, Some(11));
    }
}
