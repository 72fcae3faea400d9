//! Shared test helpers: a proxy on a loopback port, HTTP clients, bounded load loops, waits.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use safelb_config::ValidConfig;
use safelb_proxy::{server, AccessLog, Proxy, ProxyHandle};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The listener section every in-process test config starts with. The proxy under test binds
/// its own port 0; this address only has to stay the same across swaps.
pub const HEADER: &str = "[listener.public]\nbind = \"127.0.0.1:1\"\n\n[access_log]\nenabled = false\n\n";

pub fn config(body: &str) -> ValidConfig {
    let source = format!("{HEADER}{body}");
    match safelb_config::check("test.toml", &source).into_result() {
        Ok(c) => c,
        Err(d) => panic!("test config is invalid:\n{}\n{source}", d.render()),
    }
}

/// One route to one pool `p` of `backends`, with `extra` lines inside `[pool.p]`.
pub fn pool_config(backends: &[String], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[[route]]\nname = \"r\"\npool = \"p\"\n[pool.p]\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

/// A proxy serving on a free loopback port, stopped when dropped.
pub struct Lb {
    pub addr: SocketAddr,
    pub handle: ProxyHandle,
    shutdown: CancellationToken,
    pub tracker: TaskTracker,
}

impl Lb {
    pub async fn start(body: &str) -> Lb {
        Self::start_with(config(body)).await
    }

    pub async fn start_with(config: ValidConfig) -> Lb {
        Self::start_logged(config, AccessLog::disabled()).await
    }

    pub async fn start_logged(config: ValidConfig, log: AccessLog) -> Lb {
        Self::start_on(config, log, "public").await
    }

    /// A proxy for the listener named `listener` (routes with a `listener` condition see it).
    pub async fn start_on(config: ValidConfig, log: AccessLog, name: &str) -> Lb {
        let handle = ProxyHandle::new(config, 1);
        let listener = server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let proxy = Proxy::for_listener(handle.clone(), log, name, false);
        tokio::spawn(server::serve(listener, proxy, None, shutdown.clone(), tracker.clone()));
        Lb {
            addr,
            handle,
            shutdown,
            tracker,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.handle.shutdown();
    }
}

/// One response, body collected.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn backend(&self) -> &str {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// A keep-alive HTTP/1.1 client connection.
pub struct Client {
    sender: http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Client::try_connect(addr).await.expect("connecting to the proxy")
    }

    /// A connection, or why there is none (a proxy that is down refuses it).
    pub async fn try_connect(addr: SocketAddr) -> Result<Client, String> {
        let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client { sender })
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Reply, String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let resp = self.sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply, String> {
        self.send(request("GET", host, path, Bytes::new())).await
    }
}

pub fn request(method: &str, host: &str, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .body(Full::new(body))
        .unwrap()
}

/// One request on a new connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    Client::connect(addr).await.get(host, path).await.expect("a response")
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    /// Responses by status (all of them, 2xx included).
    pub statuses: BTreeMap<u16, u64>,
    /// Transport errors (no response at all).
    pub errors: u64,
    pub by_backend: BTreeMap<String, u64>,
    pub slowest: Duration,
}

impl LoadReport {
    pub fn failed(&self) -> u64 {
        self.errors
            + self
                .statuses
                .iter()
                .filter(|(s, _)| **s >= 500)
                .map(|(_, n)| n)
                .sum::<u64>()
    }
    pub fn total(&self) -> u64 {
        self.errors + self.statuses.values().sum::<u64>()
    }
}

/// Runs `concurrency` keep-alive clients doing GETs until `duration` passes or `max` requests
/// were made. Bounded in time and count; stops by itself.
pub async fn load(
    addr: SocketAddr,
    host: &str,
    path: &str,
    concurrency: usize,
    duration: Duration,
    max: u64,
) -> LoadReport {
    load_until(addr, host, path, concurrency, duration, max, CancellationToken::new()).await
}

/// Load in the background that stops when `finish` is called (or after 60 s at most).
pub struct SteadyLoad {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<LoadReport>,
}

impl SteadyLoad {
    pub fn start(addr: SocketAddr, concurrency: usize) -> SteadyLoad {
        let stop = CancellationToken::new();
        let task = tokio::spawn(load_until(
            addr,
            "x",
            "/",
            concurrency,
            Duration::from_secs(60),
            2_000_000,
            stop.clone(),
        ));
        SteadyLoad { stop, task }
    }

    pub async fn finish(self) -> LoadReport {
        self.stop.cancel();
        self.task.await.expect("load task")
    }
}

/// `load` that also stops early when `stop` is cancelled.
pub async fn load_until(
    addr: SocketAddr,
    host: &str,
    path: &str,
    concurrency: usize,
    duration: Duration,
    max: u64,
    stop: CancellationToken,
) -> LoadReport {
    let deadline = Instant::now() + duration;
    let per_client = max / concurrency as u64;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let host = host.to_string();
        let path = path.to_string();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut report = LoadReport::default();
            let mut client = None;
            for _ in 0..per_client {
                if Instant::now() >= deadline || stop.is_cancelled() {
                    break;
                }
                let started = Instant::now();
                let c = match client.as_mut() {
                    Some(c) => c,
                    None => match Client::try_connect(addr).await {
                        Ok(c) => client.insert(c),
                        Err(_) => {
                            // A proxy that is down: a failed request, and a pause before the next.
                            report.errors += 1;
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                match c.get(&host, &path).await {
                    Ok(r) => {
                        *report.statuses.entry(r.status).or_default() += 1;
                        if r.status < 400 {
                            report.ok += 1;
                            *report.by_backend.entry(r.backend().to_string()).or_default() += 1;
                        }
                        if r.headers.get("connection").is_some_and(|v| v == "close") {
                            client = None;
                        }
                    }
                    Err(_) => {
                        report.errors += 1;
                        client = None;
                    }
                }
                report.slowest = report.slowest.max(started.elapsed());
            }
            report
        }));
    }
    let mut total = LoadReport::default();
    for t in tasks {
        let r = t.await.expect("load task");
        total.ok += r.ok;
        total.errors += r.errors;
        total.slowest = total.slowest.max(r.slowest);
        for (s, n) in r.statuses {
            *total.statuses.entry(s).or_default() += n;
        }
        for (b, n) in r.by_backend {
            *total.by_backend.entry(b).or_default() += n;
        }
    }
    total
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// Sends raw bytes on a new connection and reads until the proxy closes it (bounded).
pub async fn raw(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn shared<T>(t: T) -> Arc<T> {
    Arc::new(t)
}

/// Path of the built `safelb` binary.
pub fn safelb_bin() -> &'static str {
    env!("CARGO_BIN_EXE_safelb")
}

/// One admin API call (`/api/v1` + `path`) with a bearer token: status and JSON body (a body
/// that is not JSON comes back as a string), or why there was no answer.
pub async fn admin_call(
    admin: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), String> {
    let body = body.map_or(Bytes::new(), |b| Bytes::from(b.to_string()));
    let mut req = request(method, "admin", &format!("/api/v1{path}"), body);
    req.headers_mut()
        .insert("authorization", format!("Bearer {}", token.trim()).parse().unwrap());
    req.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    let reply = Client::try_connect(admin).await?.send(req).await?;
    let value = serde_json::from_str(&reply.body).unwrap_or(serde_json::Value::String(reply.body));
    Ok((reply.status, value))
}
