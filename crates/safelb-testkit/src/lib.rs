//! Real HTTP backends on loopback for tests and for `safelb demo`: each answers, fails, hangs
//! or goes slow on command, counts what it served, and stops (closing every connection) when
//! told or dropped.
//!
//! Paths every backend serves: `/healthz` (follows the behaviour like any path), `/headers`
//! (echoes the request headers, one `name: value` per line), `/bytes/N` (a body of N bytes),
//! `/echo` (streams the request body back), `/ws` (a WebSocket echo that prefixes each message
//! with the backend's name); any other path answers `backend NAME`. [`etcd::Etcd`] runs a real
//! etcd for the fleet's tests.
#![forbid(unsafe_code)]

pub mod etcd;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How a backend answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// 200 with `backend NAME`.
    Ok,
    /// This status for every request.
    Status(u16),
    /// Reads the request and never answers: the failure mode that took the site down.
    Hang,
    /// Answers normally after this delay.
    Delay(Duration),
    /// `/healthz` answers 200, every other path this status: a backend that passes its health
    /// checks and breaks real requests.
    HealthyButFailing(u16),
    /// `/healthz` answers 200; every other request gets a 200 head announcing its whole body,
    /// half of that body, and then the connection is cut: a backend that dies mid-response.
    CloseMidBody,
}

struct Shared {
    name: String,
    behavior: Mutex<Behavior>,
    hits: AtomicU64,
    /// Requests marked `X-Safelb-Shadow` (safelb's shadow stage).
    shadow_hits: AtomicU64,
    connections: AtomicU64,
}

/// A running backend. Dropping it stops it.
pub struct TestBackend {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl TestBackend {
    /// Starts a backend on a free loopback port.
    pub async fn start(name: &str) -> TestBackend {
        Self::start_on("127.0.0.1:0".parse().expect("a valid address"), name)
            .await
            .expect("binding a free loopback port")
    }

    /// Starts a backend that speaks HTTP/2 with prior knowledge (for `protocol = "h2"` pools).
    /// Besides the usual paths it serves `/grpc`: a gRPC-style stream that answers every
    /// request data frame with one response frame, then ends with `grpc-status: 0` trailers.
    pub async fn start_h2(name: &str) -> TestBackend {
        Self::start_with("127.0.0.1:0".parse().expect("a valid address"), name, true)
            .await
            .expect("binding a free loopback port")
    }

    /// Starts a backend on a given address.
    pub async fn start_on(addr: SocketAddr, name: &str) -> std::io::Result<TestBackend> {
        Self::start_with(addr, name, false).await
    }

    async fn start_with(addr: SocketAddr, name: &str, h2: bool) -> std::io::Result<TestBackend> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            behavior: Mutex::new(Behavior::Ok),
            hits: AtomicU64::new(0),
            shadow_hits: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let cancel = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), cancel.clone(), h2));
        Ok(TestBackend { addr, shared, cancel })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn set(&self, behavior: Behavior) {
        *self.shared.behavior.lock().expect("behavior lock") = behavior;
    }

    /// Requests received (health checks included), whatever the answer.
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(Relaxed)
    }

    /// Requests that carried `X-Safelb-Shadow` (copies from safelb's shadow stage).
    pub fn shadow_hits(&self) -> u64 {
        self.shared.shadow_hits.load(Relaxed)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Relaxed)
    }

    /// Stops listening and closes every open connection: afterwards connects are refused.
    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// An address on loopback where nothing listens (bound, then released).
pub fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a free loopback port");
    l.local_addr().expect("a bound socket has an address")
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken, h2: bool) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        shared.connections.fetch_add(1, Relaxed);
        let shared = shared.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let conn_cancel = cancel.clone();
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let cancel = conn_cancel.clone();
                async move { Ok::<_, Infallible>(answer(req, &shared, &cancel).await) }
            });
            if h2 {
                let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = conn => {}
                    _ = cancel.cancelled() => {}
                }
            } else {
                let conn = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades();
                tokio::select! {
                    _ = conn => {}
                    _ = cancel.cancelled() => {}
                }
            }
        });
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A body error makes hyper cut the connection, which is how `CloseMidBody` ends a response.
type Body = BoxBody<Bytes, BoxError>;

fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

async fn answer(req: Request<Incoming>, shared: &Shared, cancel: &CancellationToken) -> Response<Body> {
    shared.hits.fetch_add(1, Relaxed);
    if req.headers().contains_key("x-safelb-shadow") {
        shared.shadow_hits.fetch_add(1, Relaxed);
    }
    let mut behavior = *shared.behavior.lock().expect("behavior lock");
    if req.uri().path() == "/healthz" && matches!(behavior, Behavior::HealthyButFailing(_) | Behavior::CloseMidBody) {
        behavior = Behavior::Ok;
    }
    if let Behavior::HealthyButFailing(code) = behavior {
        behavior = Behavior::Status(code);
    }
    match behavior {
        Behavior::Hang => {
            cancel.cancelled().await;
            return Response::new(full(""));
        }
        Behavior::Delay(d) => tokio::time::sleep(d).await,
        Behavior::Status(code) => {
            let mut r = Response::new(full(format!("backend {} failing with {code}\n", shared.name)));
            *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            r.headers_mut()
                .insert("x-backend", shared.name.parse().expect("names are header-safe"));
            return r;
        }
        Behavior::Ok | Behavior::HealthyButFailing(_) | Behavior::CloseMidBody => {}
    }
    let path = req.uri().path().to_string();
    let target = req.uri().path_and_query().map_or("/".to_string(), |pq| pq.to_string());
    if path == "/ws" {
        return websocket(req, shared.name.clone(), cancel.clone());
    }
    if path == "/grpc" {
        return grpc_stream(req, shared.name.clone());
    }
    let mut response = if path == "/headers" {
        let mut text = String::new();
        for (k, v) in req.headers() {
            text.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
        }
        Response::new(full(text))
    } else if let Some(n) = path.strip_prefix("/bytes/").and_then(|n| n.parse::<usize>().ok()) {
        Response::new(full(vec![b'x'; n.min(64 << 20)]))
    } else if path == "/echo" {
        Response::new(req.into_body().map_err(BoxError::from).boxed())
    } else {
        Response::new(full(format!("backend {}\n", shared.name)))
    };
    if behavior == Behavior::CloseMidBody {
        response = cut_in_half(response).await;
    }
    response
        .headers_mut()
        .insert("x-backend", shared.name.parse().expect("names are header-safe"));
    // What the backend was asked for, so tests can see a rewrite.
    if let Ok(v) = target.parse() {
        response.headers_mut().insert("x-seen-target", v);
    }
    response
}

/// The same answer with `Content-Length` of its whole body, but only the first half sent before
/// the body fails (hyper then closes the connection without finishing the response).
async fn cut_in_half(response: Response<Body>) -> Response<Body> {
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    let (mut parts, body) = response.into_parts();
    let Ok(whole) = body.collect().await.map(|c| c.to_bytes()) else {
        return Response::from_parts(parts, full(""));
    };
    parts.headers.insert(http::header::CONTENT_LENGTH, whole.len().into());
    let half = whole.slice(..whole.len() / 2);
    // The pause lets hyper flush the head and the half before the error cuts the connection:
    // without it both may still sit in its buffer, and the proxy sees no answer at all.
    let frames = futures_util::stream::unfold(Some(half), |half| async move {
        match half {
            Some(half) => Some((Ok(Frame::data(half)), None)),
            None => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let cut: Result<Frame<Bytes>, BoxError> = Err("the backend stops mid-body (CloseMidBody)".into());
                Some((cut, None))
            }
        }
    });
    Response::from_parts(parts, StreamBody::new(frames).boxed())
}

/// Accepts a WebSocket handshake and echoes every text or binary message as `NAME: message`.
fn websocket(mut req: Request<Incoming>, name: String, cancel: CancellationToken) -> Response<Body> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::{Message, Role};

    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut r = Response::new(full("missing sec-websocket-key\n"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut ws =
            tokio_tungstenite::WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return,
                m = ws.next() => m,
            };
            match msg {
                Some(Ok(Message::Text(t))) => {
                    if ws.send(Message::text(format!("{name}: {t}"))).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Binary(b))) => {
                    if ws.send(Message::binary(b)).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    });
    let mut r = Response::new(full(""));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert("upgrade", "websocket".parse().expect("a valid header"));
    h.insert("connection", "upgrade".parse().expect("a valid header"));
    h.insert(
        "sec-websocket-accept",
        derive_accept_key(key.as_bytes())
            .parse()
            .expect("base64 is a valid header"),
    );
    r
}

/// A gRPC-style bidirectional stream: one response frame per request frame, as soon as it
/// arrives, then trailers with `grpc-status: 0` and the number of frames seen.
fn grpc_stream(req: Request<Incoming>, name: String) -> Response<Body> {
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        let mut frames = 0u32;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            // An empty DATA frame only carries END_STREAM.
            if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                frames += 1;
                let reply = format!("{name}: {}", String::from_utf8_lossy(data));
                if tx.send(Ok(Frame::data(Bytes::from(reply)))).await.is_err() {
                    return;
                }
            }
        }
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().expect("a valid header"));
        trailers.insert(
            "x-frames",
            frames.to_string().parse().expect("a number is a valid header"),
        );
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let mut r = Response::new(StreamBody::new(stream).boxed());
    r.headers_mut()
        .insert("content-type", "application/grpc".parse().expect("a valid header"));
    r
}
