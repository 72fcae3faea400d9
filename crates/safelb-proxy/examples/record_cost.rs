//! What recording one request's metrics costs: the same calls the request path makes when a
//! response ends (class counter, duration histogram, per-version stats, in-flight gauge), timed
//! over many iterations on two threads sharing the counters, as two workers would.
//!
//! `cargo run --release -p safelb-proxy --example record_cost`

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use safelb_proxy::metrics::Metrics;
use safelb_proxy::stats::Stats;
use safelb_proxy::Role;

fn main() {
    const N: u64 = 20_000_000;
    let metrics = Arc::new(Metrics::default());
    let stats = Arc::new(Stats::default());
    let (route, pool, backend) = ("api".into(), "api".into(), "127.0.0.1:9001".into());
    let counters = metrics.requests(&route, &pool, &backend);
    let durations = metrics.durations(&pool);
    let started = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let (metrics, stats, counters, durations) =
                (metrics.clone(), stats.clone(), counters.clone(), durations.clone());
            std::thread::spawn(move || {
                for i in 0..N {
                    let latency = Duration::from_micros(200 + (i % 1000));
                    metrics.in_flight.fetch_add(1, Relaxed);
                    counters.inc(if i % 100 == t { 502 } else { 200 }, Role::Stable);
                    durations[0].observe(latency);
                    stats.record(i % 100 == t, latency);
                    metrics.in_flight.fetch_sub(1, Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("worker thread");
    }
    let per = started.elapsed().as_nanos() as f64 / N as f64;
    println!("recording one request's metrics: {per:.1} ns per request per thread (2 threads, shared counters)");
    println!(
        "at 32,000 requests/s per core that is {:.3}% of a core",
        per * 32_000.0 / 1e9 * 100.0
    );
}
