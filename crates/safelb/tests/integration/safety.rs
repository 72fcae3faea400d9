//! A bad change costs users nothing, at the settings a new user gets: no `response_timeout`
//! or health-check value is tightened here unless the test is about it. Rollout steps are
//! shortened only to keep the suite fast; they are not what these tests are about.

use std::time::Duration;

use safelb_testkit::{Behavior, TestBackend};

use crate::change_control::{addrs, backends, Deployment};
use crate::common::*;

const QUICK_ROLLOUT: &str = "canary_steps = [10, 50, 100]\nstep_bake = \"1s\"\nmin_requests = 10";

/// The seed outage in its smallest form: a change that only touches a health check. The hung
/// backend (accepts, never answers) was down before the change and stays down through the
/// checker's restart; no client request reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_only_change_keeps_a_down_backend_down() {
    let good = backends(1).await;
    let hung = TestBackend::start("hung").await;
    hung.set(Behavior::Hang);
    let mut pool = addrs(&good);
    pool.push(hung.addr.to_string());
    let before = "health = { path = \"/healthz\", interval = \"500ms\" }";
    let d = Deployment::start_with(&pool, QUICK_ROLLOUT, before).await;
    let load = SteadyLoad::start(d.addr(), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let after = "health = { path = \"/healthz\", interval = \"5s\" }";
    let file = d.write_pool("interval.toml", &pool, "", after);
    let (code, out, err, _) = d
        .cli_async(&["apply", file.to_str().unwrap(), "-m", "health checks less often"])
        .await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("1 of 2 healthy"),
        "preflight tells the truth per pool: {out}"
    );
    // Past the new checker's first probe (5 s interval, 1 s timeout) and then some.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let report = load.finish().await;
    println!("interval-only change: {report:?}");
    assert!(report.total() > 100, "{report:?}");
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.by_backend.get("hung").copied().unwrap_or(0), 0, "{report:?}");
    assert!(
        report.slowest < Duration::from_secs(1),
        "slowest request {:?}",
        report.slowest
    );
}

/// A forced bad change (preflight skipped) to a backend that accepts and never answers, at the
/// default response timeout (15 s): candidate requests are hedged to the stable version after
/// the hedge delay, and those still waiting when the canary is rolled back are rescued, so no
/// client waits on the rolled-back version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_change_to_a_silent_backend_costs_no_client_a_failure_or_a_wait() {
    let good = backends(2).await;
    let hung = TestBackend::start("hung").await;
    hung.set(Behavior::Hang);
    let d = Deployment::start_with(&addrs(&good), QUICK_ROLLOUT, "").await;
    let load = SteadyLoad::start(d.addr(), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bad = d.write_pool("hang.toml", &[hung.addr.to_string()], "", "");
    let (code, out, err, took) = d.force(&bad, "forced").await;
    assert_eq!(code, 4, "{out}\n{err}");
    println!("forced change rolled back after {took:?}:\n{out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = load.finish().await;
    println!("forced change to a silent backend: {report:?}");
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(
        report.slowest < Duration::from_millis(1500),
        "slowest request {:?}",
        report.slowest
    );
    assert!(hung.hits() > 0, "the candidate's backend was tried");
}

/// POSTs carry an `Idempotency-Key` (replayable, body buffered) or not. During a forced bad
/// change the keyed ones all succeed; the others fail at most at the canary share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_posts_survive_a_forced_bad_change_and_unkeyed_ones_fail_at_most_at_the_canary_share() {
    let good = backends(2).await;
    let broken = TestBackend::start("broken").await;
    broken.set(Behavior::Status(500));
    let d = Deployment::start_with(&addrs(&good), QUICK_ROLLOUT, "").await;
    let addr = d.addr();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut posters = Vec::new();
    for keyed in [true, false] {
        for _ in 0..2 {
            let stop = stop.clone();
            posters.push(tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut client = Client::connect(addr).await;
                for i in 0..20_000u64 {
                    if stop.is_cancelled() {
                        break;
                    }
                    let mut req = request("POST", "x", "/orders", bytes::Bytes::from_static(b"{\"item\":1}"));
                    if keyed {
                        req.headers_mut()
                            .insert("idempotency-key", format!("k-{i}").parse().unwrap());
                    }
                    match client.send(req).await {
                        Ok(r) if r.status < 500 => ok += 1,
                        Ok(_) => failed += 1,
                        Err(_) => {
                            failed += 1;
                            client = Client::connect(addr).await;
                        }
                    }
                }
                (keyed, ok, failed)
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bad = d.write_pool("broken.toml", &[broken.addr.to_string()], "", "");
    let (code, out, err, _) = d.force(&bad, "forced").await;
    assert_eq!(code, 4, "{out}\n{err}");
    stop.cancel();
    let (mut keyed_failed, mut unkeyed) = (0, (0, 0));
    for p in posters {
        let (keyed, ok, failed) = p.await.unwrap();
        if keyed {
            keyed_failed += failed;
            assert!(ok > 0);
        } else {
            unkeyed = (unkeyed.0 + ok, unkeyed.1 + failed);
        }
    }
    println!("keyed POSTs failed: {keyed_failed}; unkeyed POSTs ok/failed: {unkeyed:?}");
    assert_eq!(keyed_failed, 0);
    // The first canary step is 10%; allow for the noise of a short window.
    assert!(unkeyed.1 * 100 <= (unkeyed.0 + unkeyed.1) * 15, "{unkeyed:?}");
    assert!(broken.hits() > 0, "the broken candidate was tried");
}

/// A backend that starts hanging under load, at defaults (no health check, 15 s response
/// timeout): GETs are hedged to the other backend after the hedge delay, the hung one is
/// ejected after a few lost hedges, and no client request fails or waits the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_starts_hanging_costs_get_clients_nothing() {
    let pool = backends(2).await;
    let lb = Lb::start(&pool_config(&addrs(&pool), "")).await;
    let load = SteadyLoad::start(lb.addr, 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    pool[1].set(Behavior::Hang);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let report = load.finish().await;
    println!("one backend started hanging: {report:?}");
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(report.slowest < Duration::from_secs(1), "slowest {:?}", report.slowest);
    let counters = lb.handle.metrics().hedging_counters();
    let (_, h) = counters.iter().find(|(p, _)| &**p == "p").expect("pool p hedges");
    let hedges = h.hedges.load(std::sync::atomic::Ordering::Relaxed);
    println!("hedges: {hedges} of {} requests", report.total());
    assert!(hedges > 0);
    assert!(
        hedges <= report.total() / 10 + safelb_proxy::hedge::BURST,
        "hedges {hedges} exceed the 10% budget of {} requests",
        report.total()
    );
}

/// `hedge = false`, everything else at its defaults: a request that reaches a hung backend is
/// sent once and waits (the response timeout is 15 s), where a hedged pool answers it from the
/// other backend within the hedge delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedge_false_sends_every_request_once() {
    let pool = backends(2).await;
    let lb = Lb::start(&pool_config(&addrs(&pool), "hedge = false")).await;
    pool[1].set(Behavior::Hang);
    // Round robin over two backends: two of these four reach the hung one.
    let requests: Vec<_> = (0..4)
        .map(|_| {
            let addr = lb.addr;
            tokio::spawn(async move { tokio::time::timeout(Duration::from_millis(1500), get(addr, "x", "/")).await })
        })
        .collect();
    let mut answered = 0;
    let mut waiting = 0;
    for r in requests {
        match r.await.unwrap() {
            Ok(reply) => {
                assert_eq!((reply.status, reply.backend()), (200, "b0"));
                answered += 1;
            }
            Err(_) => waiting += 1,
        }
    }
    println!("hedge = false: {answered} answered, {waiting} still waiting after 1.5 s");
    assert_eq!((answered, waiting), (2, 2));
    let hedges: u64 = lb
        .handle
        .metrics()
        .hedging_counters()
        .iter()
        .map(|(_, h)| h.hedges.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(hedges, 0);
}

/// A candidate whose backend passes its health check (`/healthz` 200) and answers 500 to real
/// requests gets past preflight; the shadow stage (defaults: 3 s, 25% of safe requests) sees
/// its copies fail where stable answered 200 and rejects it: exit 3, no client served by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_but_broken_candidate_is_rejected_by_the_shadow_stage() {
    let good = backends(2).await;
    let broken = TestBackend::start("broken").await;
    broken.set(Behavior::HealthyButFailing(500));
    let health = "health = { path = \"/healthz\" }";
    let d = Deployment::start_with(&addrs(&good), QUICK_ROLLOUT, health).await;
    let load = SteadyLoad::start(d.addr(), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bad = d.write_pool("broken.toml", &[broken.addr.to_string()], "", health);
    let (code, out, err, took) = d.cli_async(&["apply", bad.to_str().unwrap(), "-m", "release v2"]).await;
    println!("healthy-but-broken candidate, apply returned after {took:?}:\n{out}");
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(out.contains("rejected at the shadow stage"), "{out}");
    assert!(
        out.contains("route `r`") && out.contains("stable 200 / candidate 500"),
        "{out}"
    );
    let report = load.finish().await;
    println!(
        "load during the shadow stage: {report:?}; shadow copies at the broken backend: {}",
        broken.shadow_hits()
    );
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(
        report.by_backend.get("broken").copied().unwrap_or(0),
        0,
        "no client was served by it"
    );
    assert!(
        broken.shadow_hits() >= 3,
        "the candidate's backend received shadow copies"
    );
    let (_, history, _, _) = d.cli(&["history"]);
    assert!(history.contains("rejected"), "{history}");
}

/// `shadow = false`: the candidate goes from preflight straight to the canary (no copies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_false_goes_straight_to_the_canary() {
    let good = backends(2).await;
    let next = TestBackend::start("next").await;
    let rollout = format!("{QUICK_ROLLOUT}\nshadow = false");
    let d = Deployment::start_with(&addrs(&good), &rollout, "").await;
    let load = SteadyLoad::start(d.addr(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let file = d.write_pool("next.toml", &[next.addr.to_string()], "", "");
    let (code, out, err, _) = d.cli_async(&["apply", file.to_str().unwrap(), "-m", "move"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains("shadow"), "{out}");
    let report = load.finish().await;
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(next.shadow_hits(), 0);
}

/// A promoted version whose only backend starts hanging, rolled back by hand: requests waiting
/// on it (nothing to hedge to in a pool of one, 15 s response timeout) are sent again through the
/// version put back the moment the rollback lands; none waits for its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_rollback_rescues_requests_waiting_on_the_rolled_back_version() {
    let good = backends(2).await;
    let single = TestBackend::start("single").await;
    let d = Deployment::start_with(&addrs(&good), QUICK_ROLLOUT, "").await;
    let file = d.write_pool("single.toml", &[single.addr.to_string()], "", "");
    let (code, out, err, _) = d
        .cli_async(&["apply", file.to_str().unwrap(), "-m", "one server"])
        .await;
    assert_eq!(code, 0, "{out}\n{err}");
    let load = SteadyLoad::start(d.addr(), 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    single.set(Behavior::Hang);
    let hung_at = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, out, err, _) = d.cli_async(&["rollback", "-m", "the new server hangs"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let rolled_back_after = hung_at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.finish().await;
    println!("rolled back {rolled_back_after:?} after the backend hung: {report:?}");
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(
        report.slowest < rolled_back_after + Duration::from_millis(500),
        "a request waited {:?}, past the rollback at {rolled_back_after:?}",
        report.slowest
    );
}

/// A change that starts redirecting the site's traffic (meant for the plain listener only, the
/// `listener` line forgotten) is rejected at the shadow stage, at the defaults, before any client
/// is redirected; the same redirect with a route test saying it is intended goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_accidental_catch_all_redirect_is_rejected_before_it_serves_a_client() {
    let good = backends(2).await;
    let d = Deployment::start_with(&addrs(&good), QUICK_ROLLOUT, "").await;
    let load = SteadyLoad::start(d.addr(), 4);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let redirect = "[[route]]\nname = \"to-https\"\nhost = \"x\"\nredirect = { scheme = \"https\", port = 8443 }\n";
    let accident = d.write("redirect.toml", &addrs(&good), redirect);
    // Preflight sees every sampled request move to the redirect.
    let (code, out, err, _) = d.cli_async(&["apply", accident.to_str().unwrap(), "-m", "https"]).await;
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(out.contains("rejected at preflight"), "{out}");
    assert!(out.contains("moves 100.0% of recent traffic"), "{out}");
    // Confirmed by an operator who believes it is intended: the shadow stage still rejects it.
    let (code, out, err, _) = d
        .cli_async(&["apply", accident.to_str().unwrap(), "-m", "https", "--confirm"])
        .await;
    println!("accidental redirect, confirmed:\n{out}");
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(out.contains("rejected at the shadow stage"), "{out}");
    assert!(out.contains("answered by a new untested redirect"), "{out}");
    let report = load.finish().await;
    println!("load during the shadow stage: {report:?}");
    assert_eq!(report.failed(), 0, "{report:?}");
    let redirected: u64 = report
        .statuses
        .iter()
        .filter(|(s, _)| (300..400).contains(*s))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(redirected, 0, "no client was redirected: {report:?}");

    let intended =
        format!("{redirect}[[test]]\nrequest = \"GET http://x/cart\"\nexpect_redirect = \"https://x:8443/cart\"\n");
    let deliberate = d.write("redirect-tested.toml", &addrs(&good), &intended);
    let (code, out, err, _) = d
        .cli_async(&[
            "apply",
            deliberate.to_str().unwrap(),
            "-m",
            "https, tested",
            "--confirm",
        ])
        .await;
    assert_eq!(code, 0, "a tested redirect is a deliberate change:\n{out}\n{err}");
    let r = get(d.addr(), "x", "/cart").await;
    assert_eq!(
        (r.status, r.headers["location"].to_str().unwrap()),
        (302, "https://x:8443/cart")
    );
}
