//! Failures and bad input: every one answered with the right status and a short body, and a
//! backend that is down or hangs stops receiving requests once detected.

use std::time::{Duration, Instant};

use bytes::Bytes;
use safelb_testkit::{closed_port, Behavior, TestBackend};

use crate::common::*;

#[tokio::test]
async fn connect_failure_is_retried_on_another_backend() {
    let good = TestBackend::start("good").await;
    let dead = closed_port();
    // Outlier ejection off and a generous budget: every request that draws the dead backend
    // must be saved by the retry alone.
    let extra = "balance = \"round_robin\"\noutlier = { consecutive_failures = 0 }\nretry = { attempts = 1, budget_percent = 100 }";
    let lb = Lb::start(&pool_config(&[dead.to_string(), good.addr.to_string()], extra)).await;
    let report = load(lb.addr, "x", "/", 4, Duration::from_secs(3), 400).await;
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.ok, report.total());
    assert_eq!(report.by_backend.get("good").copied(), Some(report.ok));
}

/// A backend that dies with requests on its connections (kill -9: the kernel closes them
/// before any answer) must not cost a client an idempotent request while another backend is
/// healthy: the request comes back unanswered and goes elsewhere. Found by bench/chaos.sh.
#[tokio::test]
async fn a_get_whose_backend_closes_before_answering_goes_to_another_backend() {
    let good = TestBackend::start("good").await;
    // Reads each request head, then closes the connection without a byte of answer.
    let closer = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closer_addr = closer.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        for _ in 0..1000 {
            let Ok((mut s, _)) = closer.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
            });
        }
    });
    let lb = Lb::start(&pool_config(&[closer_addr.to_string(), good.addr.to_string()], "")).await;
    let mut client = Client::connect(lb.addr).await;
    for i in 0..20 {
        let r = client.get("x", "/").await.unwrap();
        assert_eq!(r.status, 200, "request {i}: {r:?}");
    }
}

#[tokio::test]
async fn the_retry_budget_stops_retries_from_flooding_a_sick_pool() {
    let good = TestBackend::start("good").await;
    let dead = closed_port();
    let extra = "balance = \"round_robin\"\noutlier = { consecutive_failures = 0 }\nretry = { attempts = 1, budget_percent = 10, min_per_second = 5 }";
    let lb = Lb::start(&pool_config(&[dead.to_string(), good.addr.to_string()], extra)).await;
    let mut client = Client::connect(lb.addr).await;
    let started = Instant::now();
    let mut failed = 0;
    for _ in 0..200 {
        if client.get("x", "/").await.unwrap().status == 502 {
            failed += 1;
        }
    }
    let seconds = started.elapsed().as_secs_f64().ceil() as u64;
    // About half the requests draw the dead backend; the budget grants at most
    // max(10% of requests, 5) retries per second, so most of those half fail.
    let max_retries = (20 + 5) * seconds.max(1);
    println!("retry budget: {failed} of 200 failed over {seconds}s");
    let floor = 100u64.saturating_sub(max_retries + 10).max(1);
    assert!(failed >= floor, "too many retries were granted: only {failed} failed");
}

#[tokio::test]
async fn backend_killed_under_load_costs_at_most_the_requests_in_flight() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let lb = Lb::start(&pool_config(
        &[a.addr.to_string(), b.addr.to_string()],
        "health = { path = \"/healthz\", interval = \"200ms\", timeout = \"100ms\", unhealthy = 1 }",
    ))
    .await;
    let addr = lb.addr;
    let concurrency = 8;
    let load = tokio::spawn(async move { load(addr, "x", "/", concurrency, Duration::from_secs(3), 20_000).await });
    tokio::time::sleep(Duration::from_millis(800)).await;
    b.stop();
    let killed_at = Instant::now();
    let report = load.await.unwrap();
    let backend_b = lb.handle.backend(&b.addr).unwrap();
    assert!(
        !backend_b.is_available(safelb_proxy::clock::now_ms()),
        "the dead backend is known down"
    );
    println!("kill under load: {report:?}, detected within {:?}", killed_at.elapsed());
    // Only requests already sent to b when it died may fail; new ones are retried elsewhere.
    assert!(report.failed() <= concurrency as u64, "{report:?}");
    assert!(report.ok > 1000, "{report:?}");
}

/// At defaults (15 s response timeout, hedging on, outlier ejection after 5 failures): GETs to
/// a backend that accepts and never answers are hedged to the other backend after the hedge
/// delay, each lost hedge counts against the hung backend, and it is ejected.
#[tokio::test]
async fn hung_backend_costs_a_client_at_most_the_hedge_delay_and_is_ejected() {
    let good = TestBackend::start("good").await;
    let hung = TestBackend::start("hung").await;
    hung.set(Behavior::Hang);
    let lb = Lb::start(&pool_config(
        &[good.addr.to_string(), hung.addr.to_string()],
        "balance = \"round_robin\"",
    ))
    .await;
    let mut slowest = Duration::ZERO;
    let mut client = Client::connect(lb.addr).await;
    for _ in 0..40 {
        let started = Instant::now();
        let r = client.get("x", "/").await.unwrap();
        slowest = slowest.max(started.elapsed());
        assert_eq!(r.status, 200, "{}", r.body);
    }
    println!("hung backend: 40 of 40 answered, slowest {slowest:?}");
    assert!(
        slowest < Duration::from_millis(900),
        "one request paid more than the hedge delay: {slowest:?}"
    );
    let hits = hung.hits();
    for _ in 0..20 {
        assert_eq!(client.get("x", "/").await.unwrap().status, 200);
    }
    assert_eq!(hung.hits(), hits, "an ejected backend receives no new request");
}

#[tokio::test]
async fn hung_backend_is_caught_by_the_active_check_before_any_request() {
    let good = TestBackend::start("good").await;
    let hung = TestBackend::start("hung").await;
    hung.set(Behavior::Hang);
    let lb = Lb::start(&pool_config(
        &[good.addr.to_string(), hung.addr.to_string()],
        "health = { path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\" }",
    ))
    .await;
    let state = lb.handle.backend(&hung.addr).unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || state.active()
            == safelb_proxy::backend::Active::Down)
        .await
    );
    let report = load(lb.addr, "x", "/", 2, Duration::from_secs(2), 200).await;
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.by_backend.get("hung"), None);
}

#[tokio::test]
async fn a_5xx_storm_ejects_the_failing_backend() {
    let good = TestBackend::start("good").await;
    let bad = TestBackend::start("bad").await;
    bad.set(Behavior::Status(500));
    let lb = Lb::start(&pool_config(
        &[good.addr.to_string(), bad.addr.to_string()],
        "balance = \"round_robin\"\noutlier = { consecutive_failures = 3, base_ejection = \"30s\" }",
    ))
    .await;
    let report = load(lb.addr, "x", "/", 4, Duration::from_secs(3), 400).await;
    let errors = report.statuses.get(&500).copied().unwrap_or(0);
    println!("5xx storm: {report:?}");
    // Consecutive-failure counting races a little under concurrency: a handful of 500s at most.
    assert!((3..=8).contains(&errors), "500s relayed before ejection: {errors}");
    assert!(!lb
        .handle
        .backend(&bad.addr)
        .unwrap()
        .is_available(safelb_proxy::clock::now_ms()));
}

#[tokio::test]
async fn statuses_for_each_failure() {
    let hung = TestBackend::start("hung").await;
    hung.set(Behavior::Hang);
    let dead = closed_port();
    let down = closed_port();
    let lb = Lb::start(&format!(
        r#"
[limits]
max_body_bytes = 1024
[[route]]
name = "dead"
path_prefix = "/dead"
pool = "dead"
[[route]]
name = "hung"
path_prefix = "/hung"
pool = "hung"
[[route]]
name = "closed"
path_prefix = "/closed"
pool = "closed"
[pool.dead]
backends = ["{dead}"]
outlier = {{ consecutive_failures = 0 }}
[pool.hung]
backends = ["{hung}"]
response_timeout = "200ms"
outlier = {{ consecutive_failures = 0 }}
[pool.closed]
backends = ["{down}"]
panic_threshold = 50
health = {{ kind = "tcp", interval = "100ms", timeout = "100ms" }}
"#,
        dead = dead,
        down = down,
        hung = hung.addr
    ))
    .await;
    let expect = |r: Reply, status: u16, fragment: &str| {
        assert_eq!(r.status, status, "{r:?}");
        assert!(r.body.contains(fragment), "{:?} lacks {fragment:?}", r.body);
        assert!(r.headers.contains_key("x-request-id"));
    };
    expect(get(lb.addr, "x", "/nowhere").await, 404, "no route");
    expect(
        get(lb.addr, "x", "/dead").await,
        502,
        "could not connect to a backend of pool `dead`",
    );
    expect(
        get(lb.addr, "x", "/hung").await,
        504,
        "pool `hung` did not answer in time",
    );
    let closed = lb.handle.backend(&down).unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || closed.active()
            == safelb_proxy::backend::Active::Down)
        .await
    );
    expect(
        get(lb.addr, "x", "/closed").await,
        503,
        "pool `closed` is below its panic threshold",
    );
    let mut client = Client::connect(lb.addr).await;
    let big = client
        .send(request("POST", "x", "/dead", Bytes::from(vec![b'x'; 4096])))
        .await
        .unwrap();
    expect(big, 413, "exceeds the configured limit");
}

#[tokio::test]
async fn no_healthy_backend_is_503_naming_the_pool() {
    let be = TestBackend::start("be").await;
    be.set(Behavior::Status(500));
    let lb = Lb::start(&pool_config(
        &[be.addr.to_string()],
        "health = { path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\" }",
    ))
    .await;
    let state = lb.handle.backend(&be.addr).unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || !state
            .is_available(safelb_proxy::clock::now_ms()))
        .await
    );
    let r = get(lb.addr, "x", "/").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("no healthy backend in pool `p`"), "{}", r.body);
    // It comes back once healthy again (2 consecutive passes by default).
    be.set(Behavior::Ok);
    assert!(
        wait_until(Duration::from_secs(3), || state
            .is_available(safelb_proxy::clock::now_ms()))
        .await
    );
    assert_eq!(get(lb.addr, "x", "/").await.status, 200);
}

#[tokio::test]
async fn chunked_body_over_the_limit_is_413() {
    let be = TestBackend::start("be").await;
    let lb = Lb::start(&format!(
        "[limits]\nmax_body_bytes = 1000\n{}",
        pool_config(&[be.addr.to_string()], "")
    ))
    .await;
    let mut chunked = b"POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(b"200\r\n");
        chunked.extend_from_slice(&[b'a'; 0x200]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let out = raw(lb.addr, &chunked, Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
}

#[tokio::test]
async fn malformed_oversized_and_slow_requests() {
    let be = TestBackend::start("be").await;
    let lb = Lb::start(&format!(
        "[limits]\nheader_timeout = \"300ms\"\nmax_header_bytes = 8192\n{}",
        pool_config(&[be.addr.to_string()], "")
    ))
    .await;
    let out = raw(lb.addr, b"THIS IS NOT HTTP\r\n\r\n", Duration::from_secs(2)).await;
    assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
    assert!(out.ends_with("400 Bad Request: malformed HTTP request\n"), "{out}");

    let mut huge = b"GET / HTTP/1.1\r\nhost: x\r\n".to_vec();
    for i in 0..400 {
        huge.extend_from_slice(format!("x-filler-{i}: {}\r\n", "y".repeat(40)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    let out = raw(lb.addr, &huge, Duration::from_secs(2)).await;
    assert!(
        out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{out}"
    );
    assert!(out.contains("request headers exceed the configured limit"), "{out}");

    // Slowloris: half a head, then nothing. 408 at the header timeout, and the connection closes.
    let started = Instant::now();
    let out = raw(
        lb.addr,
        b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: ",
        Duration::from_secs(3),
    )
    .await;
    let took = started.elapsed();
    assert!(out.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{out}");
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "closed after {took:?}"
    );
    assert_eq!(be.hits(), 0, "no bad request reached the backend");
}

#[tokio::test]
async fn fail_open_panic_routes_to_every_backend() {
    let up = TestBackend::start("up").await;
    let down = TestBackend::start("down").await;
    down.set(Behavior::Status(503));
    // Health says `down` is out, but the pool is under its 75% threshold and fails open: the
    // operator chose "some answers beat none", so both backends get traffic.
    let lb = Lb::start(&pool_config(
        &[up.addr.to_string(), down.addr.to_string()],
        "balance = \"round_robin\"\npanic_threshold = 75\npanic_policy = \"fail_open\"\noutlier = { consecutive_failures = 0 }\nhealth = { path = \"/healthz\", interval = \"100ms\", timeout = \"100ms\" }",
    ))
    .await;
    let state = lb.handle.backend(&down.addr).unwrap();
    assert!(
        wait_until(Duration::from_secs(2), || state.active()
            == safelb_proxy::backend::Active::Down)
        .await
    );
    let report = load(lb.addr, "x", "/", 1, Duration::from_secs(2), 100).await;
    assert!(lb.handle.snapshot().pools[0].in_panic());
    assert!(report.statuses.get(&503).copied().unwrap_or(0) > 20, "{report:?}");
    assert!(report.by_backend.get("up").copied().unwrap_or(0) > 20, "{report:?}");
}

#[tokio::test]
async fn every_answer_has_an_access_log_line() {
    let be = TestBackend::start("be").await;
    let dead = closed_port();
    let path = crate::lifecycle::tempdir().join("access.log");
    let config = config(&format!(
        "[[route]]\nname = \"ok\"\npath_prefix = \"/ok\"\npool = \"ok\"\n[[route]]\nname = \"dead\"\npath_prefix = \"/dead\"\npool = \"dead\"\n[pool.ok]\nbackends = [\"{}\"]\n[pool.dead]\nbackends = [\"{dead}\"]\n",
        be.addr
    ));
    let lb = Lb::start_logged(config, safelb_proxy::AccessLog::file(&path).unwrap()).await;
    assert_eq!(get(lb.addr, "shop.example", "/ok/x?q=1").await.status, 200);
    assert_eq!(get(lb.addr, "shop.example", "/dead").await.status, 502);
    assert_eq!(get(lb.addr, "shop.example", "/none").await.status, 404);
    assert!(raw(lb.addr, b"NOT HTTP\r\n\r\n", Duration::from_secs(2))
        .await
        .starts_with("HTTP/1.1 400"));
    let read = || std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(2), || read().lines().count() == 4).await,
        "{}",
        read()
    );
    let lines: Vec<serde_json::Value> = read().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let find = |status: u64| {
        lines
            .iter()
            .find(|l| l["status"] == status)
            .unwrap_or_else(|| panic!("no {status} line in {lines:?}"))
    };
    let ok = find(200);
    assert_eq!(
        (ok["route"].as_str(), ok["pool"].as_str(), ok["path"].as_str()),
        (Some("ok"), Some("ok"), Some("/ok/x"))
    );
    assert_eq!(ok["backend"], be.addr.to_string());
    assert_eq!(ok["request_id"].as_str().map(str::len), Some(32));
    assert_eq!(find(502)["error"], "connect_failed");
    assert_eq!(find(404)["error"], "no_route");
    assert_eq!(find(400)["error"], "malformed_request");
}
