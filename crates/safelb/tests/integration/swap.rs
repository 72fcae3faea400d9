//! Snapshot swaps under load: no request fails, health survives, listeners are refused by name.

use std::time::Duration;

use safelb_proxy::backend::Active;
use safelb_proxy::SwapError;
use safelb_testkit::{Behavior, TestBackend};

use crate::common::*;

fn two_pools(a: &str, b: &str, weight_a: u32) -> String {
    format!(
        r#"
[[route]]
name = "r"
pool = "p"
[pool.p]
balance = "weighted"
backends = [{{ addr = "{a}", weight = {weight_a} }}, {{ addr = "{b}", weight = 1 }}]
health = {{ path = "/healthz", interval = "100ms", timeout = "100ms" }}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_swaps_under_load_fail_no_request() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let (sa, sb) = (a.addr.to_string(), b.addr.to_string());
    let lb = Lb::start(&two_pools(&sa, &sb, 1)).await;
    let addr = lb.addr;
    let load = tokio::spawn(async move { load(addr, "x", "/", 6, Duration::from_secs(3), 1_000_000).await });
    for version in 2..=101u64 {
        let weight = 1 + (version % 4) as u32;
        lb.handle
            .swap(config(&two_pools(&sa, &sb, weight)), version)
            .expect("a swap with the same listeners");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(lb.handle.snapshot().version, 101);
    // The load is bounded (3 s): it outlasts the ~1.5 s of swaps and then ends by itself.
    let report = load.await.unwrap();
    println!("100 swaps under load: {report:?}");
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(report.ok > 1000, "{report:?}");
}

#[tokio::test]
async fn health_state_survives_a_swap() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    b.set(Behavior::Status(503));
    let (sa, sb) = (a.addr.to_string(), b.addr.to_string());
    let lb = Lb::start(&two_pools(&sa, &sb, 1)).await;
    let state = lb.handle.backend(&b.addr).unwrap();
    assert!(wait_until(Duration::from_secs(2), || state.active() == Active::Down).await);
    // A weight change must not forget that b is down (health is keyed by address only).
    lb.handle.swap(config(&two_pools(&sa, &sb, 5)), 2).unwrap();
    let after = lb.handle.backend(&b.addr).unwrap();
    assert_eq!(after.active(), Active::Down);
    let hits = b.hits();
    let report = load(lb.addr, "x", "/", 2, Duration::from_millis(500), 200).await;
    assert_eq!(report.failed(), 0);
    // Only health probes (at most one per 90 ms) reached b, no requests.
    assert!(b.hits() - hits <= 8, "b got {} requests", b.hits() - hits);
}

#[tokio::test]
async fn listener_changes_are_refused_by_name_and_change_nothing() {
    let a = TestBackend::start("a").await;
    let lb = Lb::start(&pool_config(&[a.addr.to_string()], "")).await;
    let moved = safelb_config::check(
        "t.toml",
        &format!("[listener.public]\nbind = \"127.0.0.1:2\"\n[access_log]\nenabled = false\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [\"{}\"]\n", a.addr),
    )
    .into_result()
    .unwrap();
    let err = lb.handle.swap(moved, 2).unwrap_err();
    assert!(matches!(err, SwapError::ListenersChanged { .. }));
    assert!(err.to_string().contains("public=127.0.0.1:1"), "{err}");
    assert_eq!(lb.handle.snapshot().version, 1);
    assert_eq!(get(lb.addr, "x", "/").await.status, 200);
}
