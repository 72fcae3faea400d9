//! Protocols beyond plain HTTP/1.1: h2c from a real client (curl), WebSocket through the proxy
//! and across a config swap.

use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use safelb_testkit::TestBackend;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge_reaches_http1_backends() {
    let be = TestBackend::start("be").await;
    let lb = Lb::start(&pool_config(&[be.addr.to_string()], "")).await;
    let url = lb.url("/headers");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "-s",
                "--http2-prior-knowledge",
                "-H",
                "x-trace: 7",
                "-w",
                "\n%{http_version} %{http_code}",
                &url,
            ])
            .output()
            .expect("curl is installed")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("\n2 200"), "curl saw: {text}");
    // The backend got HTTP/1.1 with a Host made from :authority and the forwarding headers.
    assert!(text.contains(&format!("host: {}\n", lb.addr)), "{text}");
    assert!(text.contains(&format!("x-forwarded-host: {}\n", lb.addr)), "{text}");
    assert!(text.contains("x-trace: 7\n"), "{text}");
}

pub(crate) async fn ws_connect(
    addr: std::net::SocketAddr,
) -> tokio_tungstenite::WebSocketStream<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (ws, response) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
        .await
        .expect("websocket handshake through safelb");
    assert_eq!(response.status(), 101);
    ws
}

pub(crate) async fn echo(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, text: &str) -> String {
    ws.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an echo within 5 s")
        .unwrap()
        .unwrap();
    reply.into_text().unwrap().to_string()
}

/// `limits.tunnel_idle_timeout` (the setting under test, set to 1 s): a WebSocket that talks
/// stays up past it; one that goes quiet for longer is closed by safelb.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_is_closed_and_a_talking_one_is_not() {
    let backend = TestBackend::start("ws").await;
    let lb = Lb::start(&format!(
        "[limits]\ntunnel_idle_timeout = \"1s\"\n{}",
        pool_config(&[backend.addr.to_string()], "")
    ))
    .await;
    let mut ws = ws_connect(lb.addr).await;
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            echo(&mut ws, &format!("m{i}")).await,
            format!("ws: m{i}"),
            "alive at {i}"
        );
    }
    let quiet = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next()).await;
    let closed = match end {
        Ok(None) | Ok(Some(Err(_))) => true,
        Ok(Some(Ok(Message::Close(_)))) => true,
        Ok(Some(Ok(other))) => panic!("unexpected message {other:?}"),
        Err(_) => false,
    };
    assert!(closed, "the idle tunnel was still open after 5 s");
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after < Duration::from_secs(3),
        "closed after {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_keeps_its_backend_across_a_config_swap() {
    let old = TestBackend::start("old").await;
    let new = TestBackend::start("new").await;
    let lb = Lb::start(&pool_config(&[old.addr.to_string()], "")).await;
    let mut ws = ws_connect(lb.addr).await;
    assert_eq!(echo(&mut ws, "hello").await, "old: hello");

    lb.handle
        .swap(config(&pool_config(&[new.addr.to_string()], "")), 2)
        .unwrap();
    // Quiet for longer than nothing in particular, then more messages: the tunnel is untouched.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..20 {
        assert_eq!(echo(&mut ws, &format!("m{i}")).await, format!("old: m{i}"));
    }
    // A new WebSocket follows the new config.
    let mut ws2 = ws_connect(lb.addr).await;
    assert_eq!(echo(&mut ws2, "hi").await, "new: hi");
    ws.close(None).await.unwrap();
    ws2.close(None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_is_not_cut_by_the_header_timeout() {
    let be = TestBackend::start("be").await;
    let lb = Lb::start(&format!(
        "[limits]\nheader_timeout = \"300ms\"\n{}",
        pool_config(&[be.addr.to_string()], "")
    ))
    .await;
    let mut ws = ws_connect(lb.addr).await;
    assert_eq!(echo(&mut ws, "a").await, "be: a");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(echo(&mut ws, "b").await, "be: b");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(echo(&mut ws, "c").await, "be: c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_style_streaming_with_trailers_through_an_h2_pool() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;

    let be = TestBackend::start_h2("grpc").await;
    let lb = Lb::start(&pool_config(&[be.addr.to_string()], "protocol = \"h2\"")).await;
    let tcp = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    // A streaming request: frames sent one by one while responses stream back.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<bytes::Bytes>, std::convert::Infallible>>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let body = StreamBody::new(Box::pin(stream));
    let req = http::Request::post(format!("http://{}/grpc", lb.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let response = tokio::spawn(async move { sender.send_request(req).await });
    let mut frames = Vec::new();
    for i in 0..5 {
        tx.send(Ok(Frame::data(bytes::Bytes::from(format!("m{i}")))))
            .await
            .unwrap();
    }
    drop(tx);
    let resp = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let mut body = resp.into_body();
    let mut trailers = None;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
    {
        let frame = frame.unwrap();
        if let Some(d) = frame.data_ref() {
            frames.push(String::from_utf8_lossy(d).into_owned());
        } else if let Ok(t) = frame.into_trailers() {
            trailers = Some(t);
        }
    }
    assert_eq!(frames.concat(), "grpc: m0grpc: m1grpc: m2grpc: m3grpc: m4");
    let trailers = trailers.expect("trailers reach the client");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-frames"], "5");
}

/// A load of multiplexed h2c streams from a real HTTP/2 client (h2load): every one answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_streams_all_succeed() {
    let be = TestBackend::start("be").await;
    let lb = Lb::start(&pool_config(&[be.addr.to_string()], "")).await;
    let url = lb.url("/");
    let out = tokio::task::spawn_blocking(move || {
        // 2,000 requests on 10 connections, 10 concurrent streams each; h2load stops by itself.
        Command::new("h2load")
            .args(["-n", "2000", "-c", "10", "-m", "10", &url])
            .output()
            .expect("h2load is installed (scripts/install-test-deps)")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored"),
        "h2load saw: {text}"
    );
    assert!(text.contains("status codes: 2000 2xx"), "h2load saw: {text}");
    assert_eq!(be.hits(), 2000);
}
