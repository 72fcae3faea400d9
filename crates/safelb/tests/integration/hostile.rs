//! Hostile clients and the limits that bound them. Hostile HTTP/1: request smuggling and desync cases (CL.TE, TE.CL, obfuscated
//! `Transfer-Encoding`, duplicate lengths, chunk extensions and oversized chunk sizes, bare LF,
//! obs-fold, control bytes, absolute form, `CONNECT`, a missing `Host`, an over-long target),
//! sent as raw bytes to safelb and, side by side, to nginx (Debian's, installed by
//! bench/install-peers; skipped if absent) in front of one recording backend. Each case is one
//! client connection carrying the hostile request and then an honest `GET /next`.
//!
//! The rules, for safelb: no request the backend receives has a target the client hid inside
//! another request's bytes (`/smuggled`); every refusal has the status the case calls for; the
//! backend parses every byte it got as whole requests. `cargo test hostile -- --nocapture`
//! prints the table (docs/reliability.md has a copy). Then a connection flood against
//! `limits.max_connections`, and `max_in_flight`; HTTP/2 floods and slow clients are in
//! `hostile_h2.rs`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

/// What the recording backend received on one connection: request lines, or a note that bytes
/// could not be parsed as requests.
#[derive(Clone, Debug, Default)]
struct Received {
    requests: Vec<String>,
    /// Bytes that were not whole requests (or a request with two framings), as text.
    garbage: Option<String>,
    /// Requests the proxy began and then abandoned by closing the connection (a client body
    /// that broke mid-way): harmless, the connection is never reused.
    cut: usize,
}

/// One thing the recorder saw on a connection.
enum Seen {
    Request(String),
    Garbage(String),
    Cut,
}

/// A backend that parses what arrives into requests (head with httparse, body by its
/// Content-Length or chunked framing) and answers each with 200 `ok`.
struct Recorder {
    addr: SocketAddr,
    /// By connection number; a connection kept alive across cases records into the case at hand.
    log: Arc<Mutex<std::collections::BTreeMap<u64, Received>>>,
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let log: Arc<Mutex<std::collections::BTreeMap<u64, Received>>> = Arc::default();
        let sink = log.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while let Ok((stream, _)) = listener.accept().await {
                n += 1;
                let (sink, index) = (sink.clone(), n);
                tokio::spawn(async move {
                    serve(stream, |seen: Seen| {
                        let mut l = sink.lock().unwrap();
                        let entry = l.entry(index).or_default();
                        match seen {
                            Seen::Request(line) => entry.requests.push(line),
                            Seen::Garbage(bytes) => entry.garbage = Some(bytes),
                            Seen::Cut => entry.cut += 1,
                        }
                    })
                    .await;
                });
            }
        });
        Recorder { addr, log }
    }

    /// Every request line received so far, and the bytes that were not requests, if any.
    fn take(&self) -> (Vec<String>, Option<String>) {
        let mut l = self.log.lock().unwrap();
        let all: Vec<String> = l.values().flat_map(|r| r.requests.clone()).collect();
        let garbage = l.values().find_map(|r| r.garbage.clone());
        l.clear();
        (all, garbage)
    }
}

async fn serve(mut stream: TcpStream, mut record: impl FnMut(Seen)) {
    let text = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(120)]).into_owned();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        // Parse every whole request in the buffer.
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            let head = match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => break,
                Err(_) => {
                    record(Seen::Garbage(text(&buf)));
                    return;
                }
            };
            let line = format!("{} {}", req.method.unwrap_or(""), req.path.unwrap_or(""));
            let header = |name: &str| {
                req.headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
                    .collect::<Vec<_>>()
            };
            let chunked = header("transfer-encoding").iter().any(|v| v.ends_with("chunked"));
            let lengths = header("content-length");
            if chunked && !lengths.is_empty() {
                // Two framings reached the backend: a desync waiting to happen.
                record(Seen::Garbage(text(&buf)));
                return;
            }
            let length = lengths.first().and_then(|v| v.parse::<usize>().ok());
            let body_end = if chunked {
                match chunked_end(&buf[head..]) {
                    Some(Ok(n)) => head + n,
                    Some(Err(())) => {
                        record(Seen::Garbage(text(&buf)));
                        return;
                    }
                    None => break,
                }
            } else {
                head + length.unwrap_or(0)
            };
            if buf.len() < body_end {
                break;
            }
            record(Seen::Request(line));
            buf.drain(..body_end);
            if stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
        }
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            // Closed by the proxy in the middle of a request: abandoned, never reused.
            Ok(_) if !buf.is_empty() => return record(Seen::Cut),
            // Left open in the middle of a request for 5 s: it could be reused out of step.
            Err(_) if !buf.is_empty() => return record(Seen::Garbage(text(&buf))),
            _ => return,
        }
    }
}

/// Where a chunked body ends in `b` (`None`: not yet all there; `Err`: not chunked framing).
fn chunked_end(b: &[u8]) -> Option<Result<usize, ()>> {
    let mut at = 0;
    loop {
        let line_end = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
        let size_text = std::str::from_utf8(&b[at..line_end]).ok()?;
        let size = match usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16) {
            Ok(s) => s,
            Err(_) => return Some(Err(())),
        };
        at = line_end + 2;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let end = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
                if end == at {
                    return Some(Ok(at + 2));
                }
                at = end + 2;
            }
        }
        if b.len() < at + size + 2 {
            return None;
        }
        at += size + 2;
    }
}

struct Case {
    name: &'static str,
    bytes: &'static [u8],
    /// Statuses safelb may answer the hostile request with (a refusal's status, or 200 when the
    /// request is well-formed enough to serve).
    allowed: &'static [u16],
    /// A 200 must close the connection (RFC 9112 §6.3: a request with both framings is
    /// forwarded with chunked only, and the client connection is not reused).
    close: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "CL.TE: Content-Length and chunked",
        bytes: b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 35\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        allowed: &[200, 400],
        close: true,
    },
    Case {
        name: "TE.CL: chunked, then a short Content-Length",
        bytes: b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n22\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n\r\n0\r\n\r\n",
        allowed: &[400],
        close: false,
    },
    Case {
        name: "TE: xchunked",
        bytes: b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\nhello",
        allowed: &[400, 501],
        close: false,
    },
    Case {
        name: "TE: chunked, identity",
        bytes: b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        allowed: &[400, 501],
        close: false,
    },
    Case {
        name: "TE with a space before the colon",
        bytes: b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        allowed: &[400],
        close: false,
    },
    Case {
        name: "TE value after a tab",
        bytes: b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding:\tchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        allowed: &[200, 400],
        close: false,
    },
    Case {
        name: "two Transfer-Encoding fields",
        bytes: b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        allowed: &[400, 501],
        close: false,
    },
    Case {
        name: "two different Content-Lengths",
        bytes: b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 38\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        allowed: &[400],
        close: false,
    },
    Case {
        name: "Content-Length with a sign",
        bytes: b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
        allowed: &[400],
        close: false,
    },
    Case {
        name: "chunk extension",
        bytes: b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n0\r\n\r\n",
        allowed: &[200],
        close: false,
    },
    Case {
        name: "oversized chunk size",
        bytes: b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\nhello\r\n0\r\n\r\n",
        allowed: &[400],
        close: false,
    },
    Case {
        name: "bare LF line ends",
        bytes: b"GET / HTTP/1.1\nHost: x\n\n",
        allowed: &[200, 400],
        close: false,
    },
    Case {
        name: "obs-fold in a field",
        bytes: b"GET / HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        allowed: &[400],
        close: false,
    },
    Case {
        name: "NUL in a field value",
        bytes: b"GET / HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
        allowed: &[400],
        close: false,
    },
    Case {
        name: "control byte in the target",
        bytes: b"GET /a\x01b HTTP/1.1\r\nHost: x\r\n\r\n",
        allowed: &[400],
        close: false,
    },
    Case {
        name: "absolute-form target",
        bytes: b"GET http://x/abs HTTP/1.1\r\nHost: x\r\n\r\n",
        allowed: &[200],
        close: false,
    },
    Case {
        name: "CONNECT",
        bytes: b"CONNECT backend.internal:22 HTTP/1.1\r\nHost: backend.internal:22\r\n\r\n",
        allowed: &[400, 405, 501],
        close: false,
    },
    Case {
        name: "HTTP/1.1 without Host",
        bytes: b"GET / HTTP/1.1\r\n\r\n",
        allowed: &[400],
        close: false,
    },
    Case {
        name: "two Host fields",
        bytes: b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        allowed: &[400],
        close: false,
    },
    Case {
        name: "request target of 70,000 bytes",
        bytes: b"",
        allowed: &[414],
        close: false,
    },
];

/// The status of the first response on the connection, and the whole text it got back.
async fn send(addr: SocketAddr, case: &Case) -> (u16, String) {
    let mut bytes = if case.bytes.is_empty() {
        format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000)).into_bytes()
    } else {
        case.bytes.to_vec()
    };
    bytes.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
    let text = raw(addr, &bytes, Duration::from_secs(3)).await;
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// nginx in front of `backend`, on a free port, stopped (by pid) when dropped.
struct Nginx {
    addr: SocketAddr,
    child: std::process::Child,
    _dir: std::path::PathBuf,
}

impl Nginx {
    fn start(backend: SocketAddr) -> Option<Nginx> {
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let dir = crate::lifecycle::tempdir();
        let port = crate::lifecycle::free_port();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n access_log off;\n client_body_temp_path {d};\n proxy_temp_path {d};\n fastcgi_temp_path {d};\n uwsgi_temp_path {d};\n scgi_temp_path {d};\n upstream b {{ server {backend}; keepalive 4; }}\n server {{\n  listen 127.0.0.1:{port};\n  location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n }}\n}}\n",
            d = dir.display()
        );
        std::fs::write(dir.join("nginx.conf"), conf).ok()?;
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Some(Nginx { addr, child, _dir: dir });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its worker and exits. SIGKILL would leave the worker behind,
        // orphaned and still listening; it is the fallback only for a master that hangs.
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_and_desync_cases_never_reach_the_backend_as_requests() {
    let backend = Recorder::start().await;
    let lb = Lb::start(&pool_config(&[backend.addr.to_string()], "")).await;
    let nginx = Nginx::start(backend.addr);
    let mut table = vec![
        "| case | safelb | backend got (safelb) | nginx | backend got (nginx) |".to_string(),
        "| --- | --- | --- | --- | --- |".to_string(),
    ];
    let mut broken = Vec::new();
    for case in CASES {
        let (status, text) = send(lb.addr, case).await;
        // The recorder's connections may still be reading; give them a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (got, garbage) = backend.take();
        let smuggled = got.iter().any(|l| l.contains("/smuggled"));
        if !case.allowed.contains(&status) {
            broken.push(format!(
                "{}: answered {status}, expected one of {:?}: {}",
                case.name,
                case.allowed,
                text.lines().next().unwrap_or("")
            ));
        }
        if smuggled || garbage.is_some() {
            broken.push(format!("{}: the backend got {got:?} and {garbage:?}", case.name));
        }
        if status == 200
            && case.close
            && (text.matches("HTTP/1.1 ").count() != 1 || !text.contains("connection: close"))
        {
            broken.push(format!(
                "{}: the connection was kept for another request: {text}",
                case.name
            ));
        }
        let (n_status, n_got) = match &nginx {
            Some(n) => {
                let (s, _) = send(n.addr, case).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
                let (got, garbage) = backend.take();
                (
                    s.to_string(),
                    format!(
                        "{}{}",
                        got.join(", "),
                        if garbage.is_some() {
                            " + bytes that are not requests"
                        } else {
                            ""
                        }
                    ),
                )
            }
            None => ("not installed".into(), String::new()),
        };
        table.push(format!(
            "| {} | {status} | {} | {n_status} | {n_got} |",
            case.name,
            got.join(", ")
        ));
    }
    eprintln!("{}", table.join("\n"));
    assert!(broken.is_empty(), "{broken:#?}\n{}", table.join("\n"));
}

/// A flood of connections meets `limits.max_connections` (the setting under test, set low):
/// past it, a new connection is answered 503 at once, saying why, and counted; the open ones are
/// untouched, and a closed one frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_listener_limit_get_503_at_once() {
    let backend = safelb_testkit::TestBackend::start("b").await;
    let lb = Lb::start(&format!(
        "[limits]\nmax_connections = 5\n{}",
        pool_config(&[backend.addr.to_string()], "")
    ))
    .await;
    let counters = lb.handle.metrics().listener(&std::sync::Arc::from("public"));
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(TcpStream::connect(lb.addr).await.unwrap());
    }
    assert!(
        wait_until(Duration::from_secs(2), || counters
            .open
            .load(std::sync::atomic::Ordering::Relaxed)
            == 5)
        .await,
        "five connections are counted open"
    );
    let started = std::time::Instant::now();
    let refused = raw(lb.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Duration::from_secs(3)).await;
    assert!(refused.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{refused}");
    assert!(refused.contains("retry-after: 1\r\n"), "{refused}");
    assert!(
        refused.contains("connection limit (5) of listener `public` reached"),
        "{refused}"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(counters.refused.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(backend.hits(), 0);
    let mut e = safelb_proxy::exposition::Exposition::default();
    safelb_proxy::exposition::render(&lb.handle, &mut e);
    let text = e.finish();
    assert!(
        text.contains("safelb_connections_refused_total{listener=\"public\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains("safelb_connections_open{listener=\"public\"} 5\n"),
        "{text}"
    );

    // An open connection is still served; closing one frees a place for a new one.
    let mut first = idle.remove(0);
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(3), first.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        wait_until(Duration::from_secs(2), || counters
            .open
            .load(std::sync::atomic::Ordering::Relaxed)
            == 4)
        .await,
        "the closed connection is no longer counted"
    );
    assert_eq!(get(lb.addr, "x", "/").await.status, 200);
}

/// Circuit breaking: a pool's `max_in_flight` (the setting under test) bounds the requests one
/// backend carries; past it the pool answers 503 at once, saying why, rather than queueing on a
/// backend that is already slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_backend_takes_no_more_requests_and_the_pool_says_so() {
    let slow = safelb_testkit::TestBackend::start("slow").await;
    slow.set(safelb_testkit::Behavior::Delay(Duration::from_millis(1500)));
    let lb = Lb::start(&pool_config(&[slow.addr.to_string()], "max_in_flight = 2")).await;
    let held: Vec<_> = (0..2)
        .map(|_| {
            let addr = lb.addr;
            tokio::spawn(async move { get(addr, "x", "/").await.status })
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(2), || slow.hits() == 2).await,
        "two requests reach the slow backend"
    );
    let started = std::time::Instant::now();
    let third = get(lb.addr, "x", "/").await;
    assert_eq!(third.status, 503, "{third:?}");
    assert!(
        third.body.contains("pool `p` is at its max_in_flight"),
        "{}",
        third.body
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow.hits(), 2, "the full backend got no third request");
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(
        get(lb.addr, "x", "/").await.status,
        200,
        "room again once they finished"
    );
}
