//! Routing actions end to end against real backends that report what they received: redirects,
//! rewrites, header edits, fixed answers, rate limits and slow start.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use safelb_proxy::AccessLog;
use safelb_testkit::TestBackend;

use crate::common::*;

#[tokio::test]
async fn a_redirect_keeps_the_query_and_names_only_what_it_changes() {
    let web = TestBackend::start("web").await;
    let body = format!(
        r#"
[[route]]
name = "to-https"
listener = "public"
redirect = {{ scheme = "https", port = 8443, status = 308 }}
[[route]]
name = "moved"
path_prefix = "/old-shop"
redirect = {{ prefix = "/shop" }}
[[route]]
name = "web"
path_prefix = "/site"
pool = "web"
[pool.web]
backends = ["{}"]
"#,
        web.addr
    );
    let lb = Lb::start_on(config(&body), AccessLog::disabled(), "public").await;
    let r = get(lb.addr, "shop.example:8080", "/cart?item=3&x=%20").await;
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(r.headers["location"], "https://shop.example:8443/cart?item=3&x=%20");
    assert_eq!(r.body, "Redirecting to https://shop.example:8443/cart?item=3&x=%20\n");
    // curl, a real client, reads the redirect the same way (without following it).
    let url = lb.url("/cart?item=3");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-H",
                "Host: shop.example",
                "-w",
                "%{http_code} %{redirect_url}",
                &url,
            ])
            .output()
            .expect("curl is installed by scripts/install-test-deps")
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "308 https://shop.example:8443/cart?item=3"
    );
    // The same config on another listener: the listener-scoped route does not match there.
    let other = Lb::start_on(config(&body), AccessLog::disabled(), "secure").await;
    let r = get(other.addr, "shop.example", "/old-shop/shoes?size=42").await;
    assert_eq!(r.status, 302, "{r:?}");
    assert_eq!(r.headers["location"], "http://shop.example/shop/shoes?size=42");
    assert_eq!(get(other.addr, "shop.example", "/site/x").await.backend(), "web");
    assert_eq!(web.hits(), 1, "redirects never reach a backend");
    let counters = other.handle.metrics().route_actions(&Arc::from("moved"));
    assert_eq!(counters.redirect.load(Relaxed), 1);
    assert_eq!(counters.proxied.load(Relaxed), 0);
}

#[tokio::test]
async fn a_rewrite_and_header_edits_are_what_the_backend_and_the_client_see() {
    let api = TestBackend::start("api").await;
    let lb = Lb::start(&format!(
        r#"
[[route]]
name = "api"
path_prefix = "/api"
pool = "api"
rewrite = {{ prefix = "/v2", host = "api.internal" }}
request_headers = {{ set = {{ "X-Env" = "prod" }}, remove = ["X-Debug"] }}
response_headers = {{ set = {{ "Strict-Transport-Security" = "max-age=63072000" }}, remove = ["X-Backend"] }}
[[route]]
name = "echo"
path_prefix = "/echo-headers"
pool = "api"
rewrite = {{ prefix = "/headers", host = "api.internal" }}
request_headers = {{ set = {{ "X-Env" = "prod" }}, remove = ["X-Debug"] }}
[pool.api]
backends = ["{}"]
"#,
        api.addr
    ))
    .await;
    let mut client = Client::connect(lb.addr).await;
    let mut req = request("GET", "shop.example", "/api/cart?id=3", Bytes::new());
    req.headers_mut().insert("x-debug", "1".parse().unwrap());
    let r = client.send(req).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.headers["x-seen-target"], "/v2/cart?id=3");
    assert_eq!(r.headers["strict-transport-security"], "max-age=63072000");
    assert!(!r.headers.contains_key("x-backend"), "{r:?}");

    let mut req = request("GET", "shop.example", "/echo-headers", Bytes::new());
    req.headers_mut().insert("x-debug", "1".parse().unwrap());
    let seen = client.send(req).await.unwrap().body;
    assert!(seen.contains("host: api.internal\n"), "{seen}");
    assert!(seen.contains("x-env: prod\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: shop.example\n"), "{seen}");
    assert!(!seen.contains("x-debug"), "{seen}");
}

#[tokio::test]
async fn a_fixed_answer_is_given_without_a_backend() {
    let web = TestBackend::start("web").await;
    let lb = Lb::start(&format!(
        r#"
[[route]]
name = "maintenance"
path_prefix = "/old-shop"
respond = {{ status = 503, body = "Down for maintenance\n", headers = {{ "Retry-After" = "120" }} }}
response_headers = {{ set = {{ "Cache-Control" = "no-store" }} }}
[[route]]
name = "web"
pool = "web"
[pool.web]
backends = ["{}"]
"#,
        web.addr
    ))
    .await;
    let r = get(lb.addr, "shop.example", "/old-shop/cart").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.body, "Down for maintenance\n");
    assert_eq!(r.headers["retry-after"], "120");
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(web.hits(), 0);
    assert_eq!(get(lb.addr, "shop.example", "/").await.backend(), "web");
}

#[tokio::test]
async fn a_rate_limit_answers_429_past_the_burst_and_recovers_and_survives_a_swap() {
    let api = TestBackend::start("api").await;
    let route = |rate: &str, extra: &str| {
        format!(
            "[[route]]\nname = \"api\"\npool = \"api\"\nrate_limit = {{ rate = \"{rate}\", burst = 3 }}\n{extra}\n[pool.api]\nbackends = [\"{}\"]\n",
            api.addr
        )
    };
    let lb = Lb::start(&route("2/s", "")).await;
    let mut client = Client::connect(lb.addr).await;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(client.get("shop.example", "/").await.unwrap());
    }
    let ok = statuses.iter().filter(|r| r.status == 200).count();
    assert_eq!(ok, 3, "the burst passes, the rest is limited: {statuses:?}");
    let limited = statuses.iter().find(|r| r.status == 429).expect("a 429");
    assert_eq!(limited.headers["retry-after"], "1");
    assert_eq!(
        limited.body,
        "429 Too Many Requests: route `api` is rate limited; retry in 1 s\n"
    );
    let counters = lb.handle.metrics().route_actions(&Arc::from("api"));
    assert_eq!(counters.rate_limited.load(Relaxed), 7);
    assert_eq!(api.hits(), 3);

    // A swap that leaves the rule alone keeps the empty bucket; one that changes it starts full.
    lb.handle
        .swap(
            config(&route("2/s", "response_headers = { set = { \"X-V\" = \"2\" } }")),
            2,
        )
        .unwrap();
    assert_eq!(client.get("shop.example", "/").await.unwrap().status, 429);
    lb.handle.swap(config(&route("3/s", "")), 3).unwrap();
    assert_eq!(client.get("shop.example", "/").await.unwrap().status, 200);

    // At 3/s a token comes back every third of a second.
    for _ in 0..5 {
        client.get("shop.example", "/").await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        client.get("shop.example", "/").await.unwrap().status,
        200,
        "a token came back"
    );
}

/// Slow start measured as a new backend's share of a steady load, second by second, with the
/// default policy (round robin) and `slow_start = "5s"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_added_under_load_ramps_up_over_slow_start() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let pool = |backends: &str| {
        format!("[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [{backends}]\nslow_start = \"5s\"\n")
    };
    let lb = Lb::start(&pool(&format!("\"{}\"", a.addr))).await;
    let addr = lb.addr;
    let stop = Instant::now() + Duration::from_secs(8);
    let swapped = Instant::now() + Duration::from_millis(500);
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(Duration, String)>::new()));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let seen = seen.clone();
        workers.push(tokio::spawn(async move {
            let mut client = Client::connect(addr).await;
            while Instant::now() < stop {
                if let Ok(r) = client.get("shop.example", "/").await {
                    if Instant::now() >= swapped {
                        seen.lock().unwrap().push((swapped.elapsed(), r.backend().to_string()));
                    }
                }
            }
        }));
    }
    tokio::time::sleep_until(swapped.into()).await;
    lb.handle
        .swap(config(&pool(&format!("\"{}\", \"{}\"", a.addr, b.addr))), 2)
        .unwrap();
    for w in workers {
        w.await.unwrap();
    }
    let seen = seen.lock().unwrap();
    let mut per_second: HashMap<u64, (u64, u64)> = HashMap::new();
    for (t, backend) in seen.iter() {
        let e = per_second.entry(t.as_secs()).or_default();
        e.0 += 1;
        if backend == "b" {
            e.1 += 1;
        }
    }
    let share = |s: u64| {
        per_second
            .get(&s)
            .map_or(0.0, |(all, b)| *b as f64 / (*all).max(1) as f64)
    };
    let curve: Vec<String> = (0..7).map(|s| format!("{s}s: {:.0}%", share(s) * 100.0)).collect();
    println!("slow start share of the new backend: {}", curve.join(", "));
    assert!(share(0) > 0.0 && share(0) < 0.2, "first second {curve:?}");
    assert!(share(2) > share(0), "{curve:?}");
    assert!(share(6) > 0.4, "full share after slow_start: {curve:?}");
}
