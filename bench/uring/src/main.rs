//! The same minimal HTTP/1.1 relay twice, to measure what io_uring changes on this machine's
//! kernel for safelb's commonest exchange (small bodiless requests, keep-alive both sides): one
//! on tokio's epoll reactor (safelb's I/O today), one on io_uring (tokio-uring: completions, owned
//! buffers). Both do the same work per request: read a client head, write it to the client
//! connection's own backend connection, read the response head and its `Content-Length` body,
//! write it to the client. No routing, no headers edited: only the I/O interface differs.
//!
//! Usage: uring-relay epoll|uring LISTEN_ADDR BACKEND_ADDR

use std::net::SocketAddr;

/// Where a whole message ends in `buf` (a head, and the body its `Content-Length` says), if it is there.
fn message_end(buf: &[u8], response: bool) -> Option<usize> {
    let mut fields = [httparse::EMPTY_HEADER; 32];
    let head = if response {
        let mut r = httparse::Response::new(&mut fields);
        match r.parse(buf).ok()? {
            httparse::Status::Complete(n) => (n, content_length(r.headers)),
            httparse::Status::Partial => return None,
        }
    } else {
        let mut r = httparse::Request::new(&mut fields);
        match r.parse(buf).ok()? {
            httparse::Status::Complete(n) => (n, content_length(r.headers)),
            httparse::Status::Partial => return None,
        }
    };
    let end = head.0 + head.1;
    (buf.len() >= end).then_some(end)
}

fn content_length(fields: &[httparse::Header<'_>]) -> usize {
    fields
        .iter()
        .find(|f| f.name.eq_ignore_ascii_case("content-length"))
        .and_then(|f| std::str::from_utf8(f.value).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

mod epoll {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    pub fn run(listen: SocketAddr, backend: SocketAddr) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = TcpListener::bind(listen).await.expect("bind");
            loop {
                let (client, _) = listener.accept().await.expect("accept");
                tokio::spawn(serve(client, backend));
            }
        });
    }

    async fn serve(mut client: TcpStream, backend: SocketAddr) {
        let _ = client.set_nodelay(true);
        let Ok(mut up) = TcpStream::connect(backend).await else {
            return;
        };
        let _ = up.set_nodelay(true);
        let (mut req, mut resp) = (Vec::with_capacity(8192), Vec::with_capacity(8192));
        loop {
            let Some(n) = read_message(&mut client, &mut req, false).await else {
                return;
            };
            if up.write_all(&req[..n]).await.is_err() {
                return;
            }
            req.drain(..n);
            let Some(m) = read_message(&mut up, &mut resp, true).await else {
                return;
            };
            if client.write_all(&resp[..m]).await.is_err() {
                return;
            }
            resp.drain(..m);
        }
    }

    async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>, response: bool) -> Option<usize> {
        loop {
            if let Some(n) = message_end(buf, response) {
                return Some(n);
            }
            buf.reserve(4096);
            if s.read_buf(buf).await.ok()? == 0 {
                return None;
            }
        }
    }
}

mod uring {
    use super::*;
    use tokio_uring::buf::BoundedBuf;
    use tokio_uring::net::{TcpListener, TcpStream};

    pub fn run(listen: SocketAddr, backend: SocketAddr) {
        tokio_uring::start(async move {
            let listener = TcpListener::bind(listen).expect("bind");
            loop {
                let (client, _) = listener.accept().await.expect("accept");
                tokio_uring::spawn(serve(client, backend));
            }
        });
    }

    async fn serve(client: TcpStream, backend: SocketAddr) {
        let _ = client.set_nodelay(true);
        let Ok(up) = TcpStream::connect(backend).await else {
            return;
        };
        let _ = up.set_nodelay(true);
        let (mut req, mut resp) = (Vec::with_capacity(8192), Vec::with_capacity(8192));
        loop {
            let Some((n, buf)) = read_message(&client, req, false).await else {
                return;
            };
            let (sent, buf) = up.write_all(buf.slice(..n)).await;
            if sent.is_err() {
                return;
            }
            req = buf.into_inner();
            req.drain(..n);
            let Some((m, buf)) = read_message(&up, resp, true).await else {
                return;
            };
            let (sent, buf) = client.write_all(buf.slice(..m)).await;
            if sent.is_err() {
                return;
            }
            resp = buf.into_inner();
            resp.drain(..m);
        }
    }

    async fn read_message(s: &TcpStream, mut buf: Vec<u8>, response: bool) -> Option<(usize, Vec<u8>)> {
        loop {
            if let Some(n) = message_end(&buf, response) {
                return Some((n, buf));
            }
            let len = buf.len();
            buf.reserve(4096);
            let cap = buf.capacity();
            let (read, slice) = s.read(buf.slice(len..cap)).await;
            buf = slice.into_inner();
            match read {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, listen, backend] = &args[..] else {
        eprintln!("usage: uring-relay epoll|uring LISTEN_ADDR BACKEND_ADDR");
        std::process::exit(2);
    };
    let listen: SocketAddr = listen.parse().expect("LISTEN_ADDR");
    let backend: SocketAddr = backend.parse().expect("BACKEND_ADDR");
    match mode.as_str() {
        "epoll" => epoll::run(listen, backend),
        "uring" => uring::run(listen, backend),
        _ => {
            eprintln!("mode is epoll or uring");
            std::process::exit(2);
        }
    }
}
