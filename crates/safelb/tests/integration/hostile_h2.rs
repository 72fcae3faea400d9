//! Hostile HTTP/2 and slow clients, at the defaults unless a test is about a setting: rapid
//! reset (CVE-2023-44487), CONTINUATION floods, SETTINGS / PING / PRIORITY floods, an HPACK
//! bomb; slowloris (a head trickled a byte at a time) and a client that never reads its
//! response. Each attack must end with its connection closed (or its stream refused), nothing
//! of it reaching a backend it should not, and other clients served as usual meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

/// The client preface and an empty SETTINGS, then the ACK of the server's.
fn hello() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out.extend(frame(4, 1, 0, &[]));
    out
}

/// Reads frames until the server closes or `limit` passes: the frame types seen, and whether
/// it closed.
async fn read_frames(mut rd: impl AsyncReadExt + Unpin, limit: Duration) -> (Vec<u8>, bool) {
    let mut kinds = Vec::new();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => return (kinds, true),
            Err(_) => return (kinds, false),
        }
        while buf.len() >= 9 {
            let len = ((buf[0] as usize) << 16) | ((buf[1] as usize) << 8) | buf[2] as usize;
            if buf.len() < 9 + len {
                break;
            }
            kinds.push(buf[3]);
            buf.drain(..9 + len);
        }
    }
}

/// One HTTP/2 frame: length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Rapid reset (CVE-2023-44487): one h2c connection opens streams and cancels each at once, as
/// fast as it can. safelb must stop it (GOAWAY or close) after a bounded number of streams, the
/// backend must see a bounded number of requests, and another client must keep being served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_is_cut_off_and_others_keep_being_served() {
    // The attack's requests (host `attack`) go to a backend of their own, to be counted.
    let target = safelb_testkit::TestBackend::start("target").await;
    let other = safelb_testkit::TestBackend::start("other").await;
    let lb = Lb::start(&format!(
        "[[route]]\nname = \"attack\"\nhost = \"attack\"\npool = \"a\"\n[[route]]\nname = \"r\"\npool = \"p\"\n[pool.a]\nbackends = [\"{}\"]\n[pool.p]\nbackends = [\"{}\"]\n",
        target.addr, other.addr
    ))
    .await;
    // :method GET, :scheme http, :path / (HPACK static-table indices), :authority "attack".
    let headers = [0x82, 0x86, 0x84, 0x01, 0x06, b'a', b't', b't', b'a', b'c', b'k'];
    let hello = hello();
    // The control: one such request, not reset, reaches the attack's backend.
    let mut control = TcpStream::connect(lb.addr).await.unwrap();
    let mut once = hello.clone();
    once.extend(frame(1, 0x5, 1, &headers));
    control.write_all(&once).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || target.hits() == 1).await,
        "the control request did not reach its backend"
    );
    drop(control);
    let honest = SteadyLoad::start(lb.addr, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (rd, mut wr) = TcpStream::connect(lb.addr).await.unwrap().into_split();
    let reader = tokio::spawn(read_frames(rd, Duration::from_secs(10)));
    let mut out = hello;
    let streams = 20_000u32;
    let mut sent = 0u32;
    for i in 0..streams {
        let id = 1 + 2 * i;
        out.extend(frame(1, 0x5, id, &headers));
        out.extend(frame(3, 0, id, &8u32.to_be_bytes()));
        if out.len() > 64 * 1024 {
            if wr.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        sent = i + 1;
    }
    let _ = wr.write_all(&out).await;
    let (kinds, closed) = reader.await.unwrap();
    let report = honest.finish().await;
    let reached = target.hits() - 1;
    // The attack's requests were routed to `target`, not counted elsewhere.
    assert!(
        other.hits() <= report.total() + 10,
        "{} requests reached the other pool for {} honest ones",
        other.hits(),
        report.total()
    );
    eprintln!(
        "rapid reset: {sent} streams opened and reset; GOAWAY {}; closed {closed}; {reached} reached the backend; other clients: {} of {} failed, slowest {:?}",
        kinds.contains(&7),
        report.failed(),
        report.total(),
        report.slowest
    );
    assert!(kinds.contains(&7) || closed, "the flood was not cut off");
    assert!(
        reached < 2_000,
        "{reached} of {sent} reset requests reached the backend"
    );
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(report.slowest < Duration::from_secs(1), "{report:?}");
}

/// A CONTINUATION flood: a header block that never ends. safelb must close the connection once
/// the block passes its header limit, long before the attacker stops sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_continuation_flood_is_cut_off() {
    let backend = safelb_testkit::TestBackend::start("b").await;
    let lb = Lb::start(&pool_config(&[backend.addr.to_string()], "")).await;
    let mut stream = TcpStream::connect(lb.addr).await.unwrap();
    let mut out = hello();
    // HEADERS without END_HEADERS, then CONTINUATION frames of one 1,000-byte field each
    // (a literal without indexing: name `x-a`, value length 1000 as an HPACK integer).
    out.extend(frame(1, 0x1, 1, &[0x82, 0x86, 0x84]));
    let mut field = vec![0x00, 0x03, b'x', b'-', b'a', 0x7f, 0xe9, 0x06];
    field.extend(std::iter::repeat_n(b'v', 1000));
    let continuation = frame(9, 0, 1, &field);
    let mut sent = 0usize;
    let limit = 50 * 1024 * 1024;
    let cut_off = loop {
        for _ in 0..64 {
            out.extend_from_slice(&continuation);
        }
        match tokio::time::timeout(Duration::from_secs(5), stream.write_all(&out)).await {
            Ok(Ok(())) => sent += out.len(),
            _ => break true,
        }
        out.clear();
        if sent > limit {
            break false;
        }
    };
    // Whatever the server said before closing (a GOAWAY), then its end of the stream.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .is_ok();
    eprintln!("continuation flood: cut off after {sent} bytes; closed {closed}");
    assert!(cut_off || closed, "{sent} bytes of one header block were accepted");
    assert!(sent < 10 * 1024 * 1024, "{sent} bytes of one header block were read");
    assert_eq!(backend.hits(), 0);
}

/// SETTINGS, PING and PRIORITY floods from a client that reads everything the server answers
/// (so backpressure alone would not stop it: each frame costs the server work). safelb closes
/// the connection once it is past its control-frame budget; honest clients never notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_control_frame_floods_are_cut_off_and_others_keep_being_served() {
    let backend = safelb_testkit::TestBackend::start("b").await;
    let lb = Lb::start(&pool_config(&[backend.addr.to_string()], "")).await;
    let honest = SteadyLoad::start(lb.addr, 2);
    for (name, kind, payload) in [
        ("SETTINGS", 4u8, vec![]),
        ("PING", 6, vec![0u8; 8]),
        ("PRIORITY", 2, vec![0, 0, 0, 0, 16]),
    ] {
        let (rd, mut wr) = TcpStream::connect(lb.addr).await.unwrap().into_split();
        let reader = tokio::spawn(read_frames(rd, Duration::from_secs(10)));
        wr.write_all(&hello()).await.unwrap();
        let one = frame(kind, 0, if kind == 2 { 1 } else { 0 }, &payload);
        let started = Instant::now();
        let mut sent = 0u64;
        let mut batch = Vec::new();
        // A million frames (9 to 17 MB): far past what socket buffers hold, so an attacker
        // that was not cut off would see every write succeed.
        while sent < 1_000_000 && started.elapsed() < Duration::from_secs(10) {
            batch.clear();
            for _ in 0..100 {
                batch.extend_from_slice(&one);
            }
            if wr.write_all(&batch).await.is_err() {
                break;
            }
            sent += 100;
        }
        let (kinds, closed) = reader.await.unwrap();
        let answered = kinds.iter().filter(|k| **k == kind).count();
        eprintln!(
            "{name} flood: {sent} frames written, {answered} answered, closed {closed} after {:?}",
            started.elapsed()
        );
        assert!(closed, "{name}: the flooding connection stays open");
        assert!(sent < 1_000_000, "{name}: all {sent} frames were taken");
        assert!(answered < 1_000, "{name}: {answered} frames answered");
    }
    let report = honest.finish().await;
    eprintln!(
        "meanwhile: {} requests, {} failed, slowest {:?}",
        report.total(),
        report.failed(),
        report.slowest
    );
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(report.slowest < Duration::from_secs(1), "{report:?}");
}

/// An HPACK bomb: one 4,000-byte field put in the dynamic table, then a header block that names
/// it 4,000 times (one byte each): 4 KB on the wire, 16 MB decoded. The stream is refused before
/// any of it reaches the backend, and the connection's next honest request still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hpack_bomb_is_refused_and_reaches_no_backend() {
    let backend = safelb_testkit::TestBackend::start("b").await;
    let lb = Lb::start(&pool_config(&[backend.addr.to_string()], "")).await;
    let (rd, mut wr) = TcpStream::connect(lb.addr).await.unwrap().into_split();
    let reader = tokio::spawn(read_frames(rd, Duration::from_secs(5)));
    let mut out = hello();
    // :method GET, :scheme http, :path /, :authority x; then a literal with incremental
    // indexing (`x-bomb`, 4,000 bytes) and 4,000 references to it (dynamic index 62).
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 0x01, b'x', 0x40, 0x06];
    block.extend_from_slice(b"x-bomb");
    block.extend_from_slice(&[0x7f, 0xa1, 0x1e]); // 4000 = 127 + 3873 as an HPACK integer
    block.extend(std::iter::repeat_n(b'b', 4000));
    block.extend(std::iter::repeat_n(0xbe, 4000));
    // HEADERS (END_STREAM) with the first part, CONTINUATION (END_HEADERS) with the rest.
    let (first, rest) = block.split_at(8000);
    out.extend(frame(1, 0x1, 1, first));
    out.extend(frame(9, 0x4, 1, rest));
    wr.write_all(&out).await.unwrap();
    let (kinds, closed) = reader.await.unwrap();
    eprintln!(
        "HPACK bomb ({} bytes sent): frames back {kinds:?}, closed {closed}",
        out.len()
    );
    assert_eq!(backend.hits(), 0, "the bomb reached the backend");
    // Refused: a reset of the stream, a GOAWAY, or a 431 response head.
    assert!(
        closed || kinds.iter().any(|k| matches!(k, 1 | 3 | 7)),
        "no refusal: {kinds:?}"
    );
    assert_eq!(get(lb.addr, "x", "/").await.status, 200, "safelb still serves");
}

/// Slowloris at the default header timeout (10 s): 200 connections each trickle a request
/// head, one byte every 500 ms. Each gets 408 and is closed about 10 s after its first byte,
/// however slowly it keeps sending; honest clients are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_at_the_default_header_timeout() {
    let backend = safelb_testkit::TestBackend::start("b").await;
    let lb = Lb::start(&pool_config(&[backend.addr.to_string()], "")).await;
    let honest = SteadyLoad::start(lb.addr, 2);
    let head = b"GET / HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut attackers = Vec::new();
    for _ in 0..200 {
        let addr = lb.addr;
        attackers.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let started = Instant::now();
            for b in head.iter() {
                if s.write_all(&[*b]).await.is_err() || started.elapsed() > Duration::from_secs(20) {
                    break;
                }
                // Stops trickling once the server has answered or closed.
                let mut peek = [0u8; 1];
                match tokio::time::timeout(Duration::from_millis(500), s.peek(&mut peek)).await {
                    Ok(_) => break,
                    Err(_) => continue,
                }
            }
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
            (started.elapsed(), String::from_utf8_lossy(&answer).into_owned())
        }));
    }
    let mut slowest = Duration::ZERO;
    let mut fastest = Duration::MAX;
    for a in attackers {
        let (took, answer) = a.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{answer}");
        slowest = slowest.max(took);
        fastest = fastest.min(took);
    }
    let report = honest.finish().await;
    eprintln!(
        "slowloris: 200 connections closed with 408 after {fastest:?} to {slowest:?}; meanwhile {} requests, {} failed, slowest {:?}",
        report.total(),
        report.failed(),
        report.slowest
    );
    assert!(fastest >= Duration::from_secs(9), "{fastest:?}");
    assert!(slowest < Duration::from_secs(13), "{slowest:?}");
    assert_eq!(backend.hits() as u64, report.ok, "no trickled head reached the backend");
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(report.slowest < Duration::from_secs(1), "{report:?}");
}

/// A client that asks for a large response and never reads it (`limits.send_timeout`, the
/// setting under test, set to 2 s): safelb reads the backend only as fast as the client takes
/// bytes (memory stays bounded by socket buffers), disconnects the client once it has taken
/// nothing for 2 s, and lets go of the backend connection too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_bounded_in_memory_and_time() {
    // A backend that streams a 256 MiB body as fast as it is taken, counting what it wrote.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let ended = Arc::new(AtomicU64::new(0));
    let (w, e) = (written.clone(), ended.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (w, e) = (w.clone(), e.clone());
            tokio::spawn(async move {
                let mut head = [0u8; 4096];
                let n = s.read(&mut head).await.unwrap_or(0);
                if !String::from_utf8_lossy(&head[..n]).starts_with("GET /big") {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    return;
                }
                let total = 256u64 << 20;
                let _ = s
                    .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n").as_bytes())
                    .await;
                let chunk = vec![b'z'; 64 * 1024];
                let mut sent = 0;
                while sent < total {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                    sent += chunk.len() as u64;
                    w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                }
                e.store(1, Ordering::Relaxed);
            });
        }
    });
    let lb = Lb::start(&format!(
        "[limits]\nsend_timeout = \"2s\"\n{}",
        pool_config(&[backend.to_string()], "")
    ))
    .await;
    let mut client = TcpStream::connect(lb.addr).await.unwrap();
    client.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let started = Instant::now();
    // Not reading: the backend's writes stall once the buffers between are full.
    assert!(
        wait_until(Duration::from_secs(15), || ended.load(Ordering::Relaxed) == 1).await,
        "the backend connection is still held after 15 s ({} bytes written)",
        written.load(Ordering::Relaxed)
    );
    let took = started.elapsed();
    let buffered = written.load(Ordering::Relaxed);
    // The client's socket was closed by safelb: reading drains what was buffered, then ends.
    let mut drained = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => drained += n as u64,
            Err(_) => break false,
        }
    };
    eprintln!(
        "never-reading client: backend wrote {buffered} bytes of 256 MiB before it was let go after {took:?}; the client's socket held {drained} bytes, then closed {closed}"
    );
    assert!(closed, "the stalled client was not disconnected");
    assert!(
        buffered < 32 << 20,
        "{buffered} bytes were read from the backend for a client that reads nothing"
    );
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
    assert_eq!(get(lb.addr, "x", "/").await.status, 200, "safelb still serves");
}
