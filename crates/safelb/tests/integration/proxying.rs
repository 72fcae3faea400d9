//! Routing, balancing through the proxy, headers and streaming bodies.

use std::time::Duration;

use bytes::Bytes;
use safelb_testkit::TestBackend;

use crate::common::*;

#[tokio::test]
async fn routes_by_host_then_longest_prefix() {
    let api = TestBackend::start("api").await;
    let web = TestBackend::start("web").await;
    let admin = TestBackend::start("admin").await;
    let lb = Lb::start(&format!(
        r#"
[[route]]
name = "api"
host = "shop.example"
path_prefix = "/api"
pool = "api"
[[route]]
name = "admin"
host = "*.shop.example"
path_prefix = "/api"
pool = "admin"
[[route]]
name = "web"
pool = "web"
[pool.api]
backends = ["{}"]
[pool.web]
backends = ["{}"]
[pool.admin]
backends = ["{}"]
"#,
        api.addr, web.addr, admin.addr
    ))
    .await;
    assert_eq!(get(lb.addr, "shop.example", "/api/cart").await.backend(), "api");
    assert_eq!(get(lb.addr, "SHOP.example:8080", "/api").await.backend(), "api");
    assert_eq!(get(lb.addr, "shop.example", "/apix").await.backend(), "web");
    assert_eq!(get(lb.addr, "eu.shop.example", "/api/x").await.backend(), "admin");
    assert_eq!(get(lb.addr, "other.example", "/").await.backend(), "web");
}

#[tokio::test]
async fn weighted_and_round_robin_distribute_as_configured() {
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let lb = Lb::start(&format!(
        r#"
[[route]]
name = "w"
host = "w.example"
pool = "w"
[[route]]
name = "rr"
pool = "rr"
[pool.w]
balance = "weighted"
backends = [{{ addr = "{a}", weight = 3 }}, {{ addr = "{b}", weight = 1 }}]
[pool.rr]
balance = "round_robin"
backends = ["{a}", "{b}"]
"#,
        a = a.addr,
        b = b.addr
    ))
    .await;
    let mut client = Client::connect(lb.addr).await;
    let mut w = (0, 0);
    let mut rr = (0, 0);
    for _ in 0..400 {
        match client.get("w.example", "/").await.unwrap().backend() {
            "a" => w.0 += 1,
            _ => w.1 += 1,
        }
        match client.get("rr.example", "/").await.unwrap().backend() {
            "a" => rr.0 += 1,
            _ => rr.1 += 1,
        }
    }
    assert_eq!(w, (300, 100), "smooth weighted 3:1 is exact over whole cycles");
    assert_eq!(rr, (200, 200));
}

#[tokio::test]
async fn consistent_hash_keeps_a_key_on_one_backend() {
    let backends = [
        TestBackend::start("a").await,
        TestBackend::start("b").await,
        TestBackend::start("c").await,
    ];
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let lb = Lb::start(&format!(
        "[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbalance = \"consistent_hash\"\nhash_on = \"header:x-user\"\nbackends = [{}]\n",
        list.join(", ")
    ))
    .await;
    let mut client = Client::connect(lb.addr).await;
    let mut seen = std::collections::HashSet::new();
    for user in 0..30 {
        let mut owners = std::collections::HashSet::new();
        for _ in 0..5 {
            let mut req = request("GET", "x", "/", Bytes::new());
            req.headers_mut()
                .insert("x-user", format!("user-{user}").parse().unwrap());
            owners.insert(client.send(req).await.unwrap().backend().to_string());
        }
        assert_eq!(owners.len(), 1, "user-{user} moved between backends: {owners:?}");
        seen.extend(owners);
    }
    assert_eq!(seen.len(), 3, "30 keys should land on all three backends");
}

#[tokio::test]
async fn forwarding_headers_and_request_id_are_added() {
    let be = TestBackend::start("be").await;
    let lb = Lb::start(&pool_config(&[be.addr.to_string()], "")).await;
    let mut client = Client::connect(lb.addr).await;
    let mut req = request("GET", "shop.example", "/headers", Bytes::new());
    req.headers_mut()
        .insert("connection", "keep-alive, x-hop".parse().unwrap());
    req.headers_mut().insert("x-hop", "secret".parse().unwrap());
    req.headers_mut()
        .insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
    let reply = client.send(req).await.unwrap();
    let seen = reply.body;
    assert!(seen.contains("host: shop.example\n"), "{seen}");
    assert!(seen.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\n"), "{seen}");
    assert!(seen.contains("x-forwarded-proto: http\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: shop.example\n"), "{seen}");
    assert!(
        !seen.contains("x-hop"),
        "a header named by Connection must not be forwarded: {seen}"
    );
    let id_line = seen
        .lines()
        .find(|l| l.starts_with("x-request-id: "))
        .expect("a request id is added");
    assert_eq!(id_line.len(), "x-request-id: ".len() + 32);
    // A client's own id is kept.
    let mut req = request("GET", "shop.example", "/headers", Bytes::new());
    req.headers_mut().insert("x-request-id", "trace-123".parse().unwrap());
    assert!(client
        .send(req)
        .await
        .unwrap()
        .body
        .contains("x-request-id: trace-123\n"));
}

#[tokio::test]
async fn bodies_stream_both_ways_and_connections_are_reused() {
    let be = TestBackend::start("be").await;
    let lb = Lb::start(&format!(
        "[limits]\nmax_body_bytes = 8388608\n{}",
        pool_config(&[be.addr.to_string()], "")
    ))
    .await;
    let mut client = Client::connect(lb.addr).await;
    let payload: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let reply = client
        .send(request("POST", "x", "/echo", Bytes::from(payload.clone())))
        .await
        .unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), String::from_utf8_lossy(&payload).len());
    let big = client.get("x", "/bytes/1048576").await.unwrap();
    assert_eq!(big.body.len(), 1_048_576);
    // Keep-alive upstream: many requests, few upstream connections (one idle connection reused).
    for _ in 0..50 {
        assert_eq!(client.get("x", "/").await.unwrap().status, 200);
    }
    assert!(
        be.connections() <= 2,
        "52 sequential requests used {} upstream connections",
        be.connections()
    );
    let backend = lb.handle.backend(&be.addr).unwrap();
    assert!(wait_until(Duration::from_secs(2), || backend.in_flight() == 0).await);
}

/// Many servers close keep-alive connections after a short idle time. A pooled connection the
/// backend has closed must never cost a client request: the proxy sees the hang-up and opens
/// a fresh connection.
#[tokio::test]
async fn a_backend_that_closes_idle_connections_costs_clients_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    let backend = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                // A keep-alive answer, then the server's idle timeout closes the connection.
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
        }
    });
    let lb = Lb::start(&pool_config(&[addr.to_string()], "")).await;
    let mut client = Client::connect(lb.addr).await;
    for i in 0..10 {
        let reply = client.get("x", "/").await.unwrap();
        assert_eq!((i, reply.status, reply.body.as_str()), (i, 200, "ok"));
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        10,
        "each request needed a fresh connection"
    );
    backend.abort();
}
