//! The steady mixed load of `bench/chaos.sh`: keep-alive GETs, POSTs with and without an
//! `Idempotency-Key`, a WebSocket echo session and an HTTP/2 (h2c) client, all through one
//! safelb listener, for at most `--seconds` and `--max-requests`. Every request's outcome and
//! latency is kept; at the end one line sums them up:
//!
//! `requests=N failed=N avoidable=N p99_ms=X max_ms=Y`, then the failures by kind and cause.
//!
//! A request *failed* when it got a 5xx (made by safelb or relayed from a backend), a transport
//! error, a timeout or a body shorter than announced. It was *avoidable* when it failed, was
//! replayable (a GET, the WebSocket handshake, or a POST with an `Idempotency-Key`) and its
//! failure came before a response head the client could use: once a 2xx head has been relayed a
//! streaming proxy cannot send the request elsewhere. Whether a healthy backend existed is the
//! script's side: every fault it injects leaves two of the three backends healthy.
//! `--abort-clients` adds clients that leave mid-body; they are counted apart (`aborted=N`).
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The size of every GET's answer (`/bytes/N`) and every POST's body (echoed back).
const GET_BYTES: usize = 2048;
const POST_BYTES: usize = 512;
/// No single request may hang the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Get,
    PostKey,
    PostNoKey,
    H2Get,
    WsHandshake,
    WsMessage,
}

impl Kind {
    fn replayable(self) -> bool {
        !matches!(self, Kind::PostNoKey | Kind::WsMessage)
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Get => "get",
            Kind::PostKey => "post_key",
            Kind::PostNoKey => "post_nokey",
            Kind::H2Get => "h2_get",
            Kind::WsHandshake => "ws_handshake",
            Kind::WsMessage => "ws_message",
        }
    }
}

struct Outcome {
    kind: Kind,
    latency: Duration,
    /// `None` for a success, else why it failed.
    failure: Option<String>,
    /// The failure came after a usable response head (a cut body).
    after_head: bool,
}

struct Run {
    target: String,
    deadline: Instant,
    max_requests: u64,
    started: AtomicU64,
    stop: AtomicBool,
    pace: Duration,
    aborted: AtomicU64,
}

impl Run {
    /// Claims the next request, or says the run is over (by time or by count).
    fn next(&self) -> bool {
        if self.stop.load(Relaxed) || Instant::now() >= self.deadline {
            return false;
        }
        self.started.fetch_add(1, Relaxed) < self.max_requests
    }
}

#[tokio::main]
async fn main() {
    let mut target = "127.0.0.1:18480".to_string();
    let mut seconds = 10u64;
    let mut max_requests = 1_000_000u64;
    let mut pace_ms = 10u64;
    let mut abort_clients = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&a));
        match a.as_str() {
            "--target" => target = value(),
            "--seconds" => seconds = value().parse().unwrap_or_else(|_| usage("--seconds")),
            "--max-requests" => max_requests = value().parse().unwrap_or_else(|_| usage("--max-requests")),
            "--pace-ms" => pace_ms = value().parse().unwrap_or_else(|_| usage("--pace-ms")),
            "--abort-clients" => abort_clients = true,
            other => usage(other),
        }
    }
    let run = Arc::new(Run {
        target,
        deadline: Instant::now() + Duration::from_secs(seconds),
        max_requests,
        started: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        pace: Duration::from_millis(pace_ms),
        aborted: AtomicU64::new(0),
    });
    // SIGTERM from the script ends the run early but still prints what was measured.
    {
        let run = run.clone();
        tokio::spawn(async move {
            if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                term.recv().await;
                run.stop.store(true, Relaxed);
            }
        });
    }
    let mut workers = Vec::new();
    for i in 0..4 {
        workers.push(tokio::spawn(h1_worker(run.clone(), Kind::Get, i)));
    }
    for i in 0..2 {
        workers.push(tokio::spawn(h1_worker(run.clone(), Kind::PostKey, i)));
        workers.push(tokio::spawn(h1_worker(run.clone(), Kind::PostNoKey, i)));
    }
    workers.push(tokio::spawn(h2_client(run.clone())));
    workers.push(tokio::spawn(websocket(run.clone())));
    let aborter = abort_clients.then(|| tokio::spawn(aborting_clients(run.clone())));
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.unwrap_or_default());
    }
    run.stop.store(true, Relaxed);
    if let Some(a) = aborter {
        let _ = a.await;
    }
    report(&outcomes, run.aborted.load(Relaxed));
}

fn usage(arg: &str) -> ! {
    eprintln!("chaos-load: bad argument {arg}");
    eprintln!("usage: chaos-load [--target IP:PORT] [--seconds N] [--max-requests N] [--pace-ms N] [--abort-clients]");
    std::process::exit(2);
}

fn report(outcomes: &[Outcome], aborted: u64) {
    let mut latencies: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    let failed = outcomes.iter().filter(|o| o.failure.is_some()).count();
    let avoidable_count = outcomes.iter().filter(|o| avoidable(o)).count();
    println!(
        "requests={} failed={} avoidable={} p99_ms={:.1} max_ms={:.1} aborted={}",
        outcomes.len(),
        failed,
        avoidable_count,
        pick(0.99),
        pick(1.0),
        aborted
    );
    let mut by_kind: BTreeMap<Kind, (u64, u64, u64)> = BTreeMap::new();
    let mut causes: BTreeMap<(Kind, String), u64> = BTreeMap::new();
    for o in outcomes {
        let e = by_kind.entry(o.kind).or_default();
        e.0 += 1;
        if let Some(why) = &o.failure {
            e.1 += 1;
            if avoidable(o) {
                e.2 += 1;
            }
            *causes.entry((o.kind, why.clone())).or_default() += 1;
        }
    }
    let kinds: Vec<String> = by_kind
        .iter()
        .map(|(k, (n, f, a))| format!("{}={n}/{f}/{a}", k.name()))
        .collect();
    println!("by kind (requests/failed/avoidable): {}", kinds.join(" "));
    for ((kind, why), n) in causes {
        println!("  {} x{n}: {why}", kind.name());
    }
}

fn avoidable(o: &Outcome) -> bool {
    o.failure.is_some() && o.kind.replayable() && !o.after_head
}

fn failed(kind: Kind, started: Instant, why: String, after_head: bool) -> Outcome {
    Outcome {
        kind,
        latency: started.elapsed(),
        failure: Some(why),
        after_head,
    }
}

/// Names a 5xx: made by safelb, or a backend's answer it relayed (test backends mark theirs).
fn status_failure(status: StatusCode, headers: &http::HeaderMap) -> Option<String> {
    status.is_server_error().then(|| {
        let from = if headers.contains_key("x-backend") {
            "backend"
        } else {
            "safelb"
        };
        format!("status {} ({from})", status.as_u16())
    })
}

/// One keep-alive HTTP/1.1 connection, one request at a time; reconnects after a failure.
async fn h1_worker(run: Arc<Run>, kind: Kind, worker: usize) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    let mut sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> = None;
    let mut n = 0u64;
    while run.next() {
        n += 1;
        let started = Instant::now();
        // A connection safelb closed while idle is replaced before the request is timed: the
        // request has not been sent, so it is no outcome.
        if let Some(s) = sender.as_mut() {
            if s.ready().await.is_err() {
                sender = None;
            }
        }
        if sender.is_none() {
            match connect_h1(&run.target).await {
                Ok(s) => sender = Some(s),
                Err(e) => {
                    outcomes.push(failed(kind, started, format!("connect: {e}"), false));
                    tokio::time::sleep(run.pace).await;
                    continue;
                }
            }
        }
        let s = sender.as_mut().expect("connected above");
        let started = Instant::now();
        let req = match kind {
            Kind::Get => Request::get(format!("/bytes/{GET_BYTES}"))
                .header("host", "chaos")
                .body(Full::new(Bytes::new())),
            _ => {
                let mut b = Request::post("/echo").header("host", "chaos");
                if kind == Kind::PostKey {
                    b = b.header("idempotency-key", format!("w{worker}-{n}"));
                }
                b.body(Full::new(Bytes::from(vec![b'p'; POST_BYTES])))
            }
        }
        .expect("a valid request");
        let expect = if kind == Kind::Get { GET_BYTES } else { POST_BYTES };
        let outcome = match tokio::time::timeout(REQUEST_TIMEOUT, exchange(s.send_request(req), expect)).await {
            Ok(Ok(())) => Outcome {
                kind,
                latency: started.elapsed(),
                failure: None,
                after_head: false,
            },
            Ok(Err((why, after_head))) => failed(kind, started, why, after_head),
            Err(_) => failed(kind, started, "timeout (30 s)".into(), false),
        };
        if outcome.failure.is_some() {
            sender = None;
        }
        outcomes.push(outcome);
        tokio::time::sleep(run.pace).await;
    }
    outcomes
}

/// Sends one request and reads its whole answer; a failure says whether a usable head came.
async fn exchange(
    sent: impl std::future::Future<Output = hyper::Result<http::Response<hyper::body::Incoming>>>,
    expect: usize,
) -> Result<(), (String, bool)> {
    let response = sent.await.map_err(|e| (format!("transport: {}", short(&e)), false))?;
    if let Some(why) = status_failure(response.status(), response.headers()) {
        return Err((why, false));
    }
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| (format!("body cut after {status}: {}", short(&e)), true))?
        .to_bytes();
    if body.len() != expect {
        return Err((format!("body of {} bytes, {expect} expected", body.len()), true));
    }
    Ok(())
}

/// An error and its causes on one line, without the per-request parts.
fn short(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

async fn connect_h1(target: &str) -> std::io::Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(target).await?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// One h2c connection with two streams at a time; a new connection after the old one fails.
async fn h2_client(run: Arc<Run>) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    while run.next() {
        let started = Instant::now();
        let sender = match TcpStream::connect(&run.target).await {
            Ok(stream) => hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await,
            Err(e) => {
                outcomes.push(failed(Kind::H2Get, started, format!("connect: {e}"), false));
                tokio::time::sleep(run.pace).await;
                continue;
            }
        };
        let (sender, conn) = match sender {
            Ok(pair) => pair,
            Err(e) => {
                outcomes.push(failed(
                    Kind::H2Get,
                    started,
                    format!("h2 handshake: {}", short(&e)),
                    false,
                ));
                tokio::time::sleep(run.pace).await;
                continue;
            }
        };
        let conn = tokio::spawn(conn);
        let streams: Vec<_> = (0..2)
            .map(|_| {
                let run = run.clone();
                let mut sender = sender.clone();
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    // The first claim was made by the loop above for the connection.
                    while run.next() {
                        if sender.ready().await.is_err() {
                            break;
                        }
                        let started = Instant::now();
                        let req = Request::get(format!("http://chaos/bytes/{GET_BYTES}"))
                            .body(Empty::<Bytes>::new())
                            .expect("a valid request");
                        let outcome =
                            match tokio::time::timeout(REQUEST_TIMEOUT, exchange(sender.send_request(req), GET_BYTES))
                                .await
                            {
                                Ok(Ok(())) => Outcome {
                                    kind: Kind::H2Get,
                                    latency: started.elapsed(),
                                    failure: None,
                                    after_head: false,
                                },
                                Ok(Err((why, after_head))) => failed(Kind::H2Get, started, why, after_head),
                                Err(_) => failed(Kind::H2Get, started, "timeout (30 s)".into(), false),
                            };
                        outcomes.push(outcome);
                        tokio::time::sleep(run.pace).await;
                    }
                    outcomes
                })
            })
            .collect();
        drop(sender);
        for s in streams {
            outcomes.extend(s.await.unwrap_or_default());
        }
        conn.abort();
    }
    outcomes
}

/// One WebSocket echo session: a message every pace, its echo awaited; after a broken session,
/// a new handshake.
async fn websocket(run: Arc<Run>) -> Vec<Outcome> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let mut outcomes = Vec::new();
    let mut n = 0u64;
    while run.next() {
        let started = Instant::now();
        let url = format!("ws://{}/ws", run.target);
        let handshake = async {
            let stream = TcpStream::connect(&run.target).await.map_err(|e| e.to_string())?;
            tokio_tungstenite::client_async(url.as_str(), stream)
                .await
                .map_err(|e| e.to_string())
        };
        let mut ws = match tokio::time::timeout(REQUEST_TIMEOUT, handshake).await {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => {
                outcomes.push(failed(Kind::WsHandshake, started, format!("handshake: {e}"), false));
                tokio::time::sleep(run.pace).await;
                continue;
            }
            Err(_) => {
                outcomes.push(failed(Kind::WsHandshake, started, "handshake timeout".into(), false));
                continue;
            }
        };
        outcomes.push(Outcome {
            kind: Kind::WsHandshake,
            latency: started.elapsed(),
            failure: None,
            after_head: false,
        });
        while run.next() {
            n += 1;
            let started = Instant::now();
            let text = format!("m{n}");
            let echoed = async {
                ws.send(Message::text(text.clone())).await.map_err(|e| e.to_string())?;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.ends_with(&format!(": {text}")) => return Ok(()),
                        Some(Ok(Message::Text(t))) => return Err(format!("wrong echo {t}")),
                        Some(Ok(_)) => continue,
                        Some(Err(e)) => return Err(e.to_string()),
                        None => return Err("session closed".to_string()),
                    }
                }
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, echoed).await {
                Ok(Ok(())) => outcomes.push(Outcome {
                    kind: Kind::WsMessage,
                    latency: started.elapsed(),
                    failure: None,
                    after_head: false,
                }),
                Ok(Err(e)) => {
                    outcomes.push(failed(Kind::WsMessage, started, format!("session: {e}"), false));
                    break;
                }
                Err(_) => {
                    outcomes.push(failed(Kind::WsMessage, started, "echo timeout".into(), false));
                    break;
                }
            }
            tokio::time::sleep(run.pace).await;
        }
        let _ = ws.close(None).await;
    }
    outcomes
}

/// Clients that leave mid-body, in turn: a POST that announces 100,000 bytes and sends 1,000, and
/// a GET of a large answer read for its first bytes only. Not counted as requests: their
/// outcome is theirs; what counts is what they do to everyone else's.
async fn aborting_clients(run: Arc<Run>) {
    let mut i = 0u64;
    while !run.stop.load(Relaxed) && Instant::now() < run.deadline {
        i += 1;
        let target = run.target.clone();
        let leave = async move {
            let mut s = TcpStream::connect(&target).await.ok()?;
            if i % 2 == 0 {
                let head = "POST /echo HTTP/1.1\r\nhost: chaos\r\ncontent-length: 100000\r\n\r\n";
                s.write_all(head.as_bytes()).await.ok()?;
                s.write_all(&[b'a'; 1000]).await.ok()?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            } else {
                s.write_all(b"GET /bytes/1000000 HTTP/1.1\r\nhost: chaos\r\n\r\n")
                    .await
                    .ok()?;
                let mut buf = [0u8; 4096];
                // Whatever arrived first (a head, perhaps some body) is all it reads.
                if s.read(&mut buf).await.ok()? == 0 {
                    return None;
                }
            }
            Some(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), leave).await;
        run.aborted.fetch_add(1, Relaxed);
        tokio::time::sleep(run.pace).await;
    }
}
