//! The client side's HTTP/1 on the wire: safelb's own server loop for plain requests, the hand-off
//! to hyper on one connection, and the framing of responses as each client needs it. Raw sockets
//! on both sides, so every byte is the one a client or backend would see.

use std::net::SocketAddr;
use std::time::Duration;

use safelb_testkit::TestBackend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

/// One response read off a connection: its head (lowercased) and body, framed by its head.
struct Answer {
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn status_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    fn field(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A raw client connection with its read buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        Conn {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more bytes; false at the end of the stream. Bounded: a test waits 5 s at most.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => false,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(_) => panic!("no answer within 5 s; so far: {:?}", String::from_utf8_lossy(&self.buf)),
        }
    }

    /// The next response; `head_request` when it answers a HEAD (no body whatever the head says).
    async fn answer(&mut self, head_request: bool) -> Answer {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(self.fill().await, "connection closed inside a head");
        };
        let head = String::from_utf8(self.buf.drain(..end).collect()).unwrap();
        let mut answer = Answer { head, body: Vec::new() };
        if head_request {
            return answer;
        }
        if answer.field("transfer-encoding") == Some("chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    assert!(self.fill().await, "connection closed inside a chunk size");
                };
                let size = usize::from_str_radix(std::str::from_utf8(&self.buf[..line_end]).unwrap(), 16).unwrap();
                self.buf.drain(..line_end + 2);
                if size == 0 {
                    // Trailer fields, then the empty line.
                    loop {
                        if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                            if line.len() == 2 {
                                return answer;
                            }
                            answer.head.push_str(&String::from_utf8_lossy(&line));
                        } else {
                            assert!(self.fill().await, "connection closed inside the trailers");
                        }
                    }
                }
                while self.buf.len() < size + 2 {
                    assert!(self.fill().await, "connection closed inside a chunk");
                }
                answer.body.extend(self.buf.drain(..size));
                self.buf.drain(..2);
            }
        }
        match answer.field("content-length") {
            Some(n) => {
                let n: usize = n.parse().unwrap();
                while self.buf.len() < n {
                    assert!(self.fill().await, "connection closed inside a body");
                }
                answer.body = self.buf.drain(..n).collect();
            }
            None => {
                while self.fill().await {}
                answer.body = std::mem::take(&mut self.buf);
            }
        }
        answer
    }

    /// Whether the proxy closed the connection (within 5 s) with nothing more to read.
    async fn closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill().await
    }
}

#[tokio::test]
async fn one_connection_carries_pipelined_gets_then_a_body_then_gets_again() {
    let be = TestBackend::start("be").await;
    let lb = Lb::start(&pool_config(&[be.addr.to_string()], "")).await;
    let mut c = Conn::open(lb.addr).await;
    // Two requests in one write: both answered, in order.
    c.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    for target in ["/a", "/b?q=1"] {
        let a = c.answer(false).await;
        assert_eq!(a.status_line(), "HTTP/1.1 200 OK");
        assert_eq!(a.field("x-seen-target"), Some(target));
        assert_eq!(a.body, b"backend be\n");
        assert!(a.field("date").is_some(), "{}", a.head);
    }
    // A request with a body on the same connection, then plain ones again: the connection went
    // to hyper at the POST and keeps working.
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        .await;
    let a = c.answer(false).await;
    assert_eq!((a.status_line(), &a.body[..]), ("HTTP/1.1 200 OK", &b"hello"[..]));
    for _ in 0..3 {
        c.send(b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let a = c.answer(false).await;
        assert_eq!(
            (a.status_line(), &a.body[..]),
            ("HTTP/1.1 200 OK", &b"backend be\n"[..])
        );
    }
    // A plain request pipelined right behind one that needs hyper is not lost in the hand-off.
    let mut c = Conn::open(lb.addr).await;
    c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhiGET /d HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    assert_eq!(c.answer(false).await.body, b"hi");
    assert_eq!(c.answer(false).await.field("x-seen-target"), Some("/d"));
}

#[tokio::test]
async fn http10_head_and_close_are_framed_as_each_client_needs() {
    let be = TestBackend::start("be").await;
    let lb = Lb::start(&pool_config(&[be.addr.to_string()], "")).await;

    // HTTP/1.0 without keep-alive: a 1.0 answer, then the proxy closes.
    let mut c = Conn::open(lb.addr).await;
    c.send(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    let a = c.answer(false).await;
    assert!(a.status_line().starts_with("HTTP/1.0 200"), "{}", a.head);
    assert_eq!(a.body, b"backend be\n");
    assert!(c.closed().await, "an HTTP/1.0 connection without keep-alive stays open");

    // HTTP/1.0 with keep-alive: said in the answer, and the connection carries another request.
    let mut c = Conn::open(lb.addr).await;
    for _ in 0..2 {
        c.send(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
            .await;
        let a = c.answer(false).await;
        assert_eq!(a.field("connection"), Some("keep-alive"), "{}", a.head);
        assert_eq!(a.body, b"backend be\n");
    }

    // HEAD: the length of the GET's body, and no body byte (the next answer parses cleanly).
    let mut c = Conn::open(lb.addr).await;
    c.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let head = c.answer(true).await;
    assert_eq!(head.field("content-length"), Some("11"), "{}", head.head);
    let get = c.answer(false).await;
    assert_eq!(
        (get.status_line(), &get.body[..]),
        ("HTTP/1.1 200 OK", &b"backend be\n"[..])
    );

    // `Connection: close` from an HTTP/1.1 client: said back, then closed.
    let mut c = Conn::open(lb.addr).await;
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.field("connection"), Some("close"));
    assert!(c.closed().await);

    // A local answer (no route) is framed and dated like a relayed one.
    let lb2 = Lb::start(&format!(
        "[[route]]\nname = \"only\"\nhost = \"only.example\"\npool = \"p\"\n[pool.p]\nbackends = [\"{}\"]\n",
        be.addr
    ))
    .await;
    let mut c = Conn::open(lb2.addr).await;
    c.send(b"GET / HTTP/1.1\r\nHost: other.example\r\n\r\n").await;
    let a = c.answer(false).await;
    assert!(a.status_line().starts_with("HTTP/1.1 404"), "{}", a.head);
    assert!(
        a.field("date").is_some() && a.field("content-length").is_some(),
        "{}",
        a.head
    );
}

/// A backend that answers every request with a chunked body and a trailer field.
async fn chunked_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    head.clear();
                    let answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-sum\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 42\r\n\r\n";
                    if stream.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_body_of_unknown_length_is_chunked_for_http11_and_closed_for_http10() {
    let be = chunked_backend().await;
    let lb = Lb::start(&pool_config(&[be.to_string()], "")).await;
    let mut c = Conn::open(lb.addr).await;
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.field("transfer-encoding"), Some("chunked"), "{}", a.head);
    assert_eq!(a.body, b"hello world");
    assert_eq!(
        a.field("x-sum"),
        Some("42"),
        "trailers go to a client that asked: {}",
        a.head
    );
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.body, b"hello world");
    assert_eq!(a.field("x-sum"), None, "trailers only for `TE: trailers`: {}", a.head);

    let mut c = Conn::open(lb.addr).await;
    c.send(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        .await;
    let a = c.answer(false).await;
    assert!(a.status_line().starts_with("HTTP/1.0 200"), "{}", a.head);
    assert_eq!(a.field("transfer-encoding"), None);
    assert_eq!(a.field("connection"), None, "an HTTP/1.0 body until close: {}", a.head);
    assert_eq!(a.body, b"hello world");
}
