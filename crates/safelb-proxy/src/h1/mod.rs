//! HTTP/1.1 on the wire, both ways: to backends on the request's own task for requests without a
//! body (this doc), and the client side's codec: plain request heads in wire form
//! (`request.rs`) and the responses written for them (`serve.rs`).
//!
//! A profile of a small proxied request (callgrind, docs/performance.md) put 39% of safelb's
//! instructions in hyper's client connection task: the request crosses a channel to that task,
//! the response crosses a oneshot back, and two tasks are scheduled per exchange. Most requests
//! through a load balancer have no body; for them the whole exchange is one write of the head
//! and a parse of the answer, done here on the task that serves the client. Requests with a
//! body keep hyper's client, which writes the body while it reads the response (a backend may
//! answer early, and both directions' buffers can fill).
//!
//! Response framing follows RFC 9112 §6.3: no body for HEAD, 1xx, 204 and 304; chunked; else
//! Content-Length; else until the backend closes. A connection goes back to its pool only when
//! the body ended exactly where its framing said and nothing followed it. Transfer codings other
//! than chunked are refused, as nginx does: Transfer-Encoding is hop-by-hop, so relaying the
//! decoded chunks without the other coding would hand the client a body it cannot read.

use std::fmt;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::TcpStream;

mod body;
mod conn;
mod head;
mod request;
mod serve;

pub use body::H1Body;
// Crate-wide (not only for `conn.rs`) so that `crate::fuzzing` can drive the parser and the
// body's framing without a backend.
pub(crate) use body::{Chunk, State};
pub(crate) use conn::{exchange, Conn, IdleConns};
pub use head::RawFields;
pub(crate) use head::{framing, parse_head, Fields, Head};
pub(crate) use request::{parse_request, read_back, Parsed, RequestHead};
pub(crate) use serve::{
    chunk_header, chunked_end, declared_length, encode_response_head, response_framing, says_close, Framing,
};

/// Longest response head (status line and headers) or trailer section accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Most header fields in one response head.
const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size and extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// What one read asks for while a body streams.
const READ_SIZE: usize = 64 * 1024;
/// Largest read buffer an idle pooled connection keeps.
const IDLE_BUFFER: usize = 8 * 1024;

/// Why an exchange failed.
#[derive(Debug)]
pub enum Error {
    /// The connection ended before a single byte of a response arrived. On a reused
    /// connection this is a backend that closed it while idle: the request may go out again.
    ClosedBeforeResponse,
    Io(io::Error),
    Protocol(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::ClosedBeforeResponse => f.write_str("the backend closed the connection before responding"),
            Error::Io(e) => write!(f, "upstream I/O failed: {e}"),
            Error::Protocol(what) => write!(f, "invalid response from the backend: {what}"),
        }
    }
}

impl std::error::Error for Error {}

/// The head of a bodiless request in wire form: origin-form target, the headers as given (the
/// proxy has already removed hop-by-hop ones and added its own).
pub(crate) fn encode_head(method: &Method, uri: &http::Uri, headers: &HeaderMap) -> Vec<u8> {
    let target = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let size = method.as_str().len()
        + target.len()
        + 16
        + headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        put_field(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Appends one field line, `name: value` and CRLF (request heads, response heads, trailers).
pub(crate) fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A head of `start` (its first line) and `n` fields `x: y`, for the limits' tests.
#[cfg(test)]
pub(crate) fn head_with_fields(start: &[u8], n: usize) -> Vec<u8> {
    [start]
        .into_iter()
        .chain(std::iter::repeat_n(&b"x: y\r\n"[..], n))
        .chain([&b"\r\n"[..]])
        .flatten()
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::net::SocketAddr;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A backend on loopback that, for one connection, answers each request head with the next
    /// response, written in the given pieces (a pause between them, so reads split there), and
    /// closes the connection after the last one when `close` is set.
    async fn backend(responses: Vec<Vec<&'static [u8]>>, close: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            for pieces in responses {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                for piece in pieces {
                    stream.write_all(piece).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            if !close {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        addr
    }

    async fn get(addr: SocketAddr, method: Method) -> (Result<http::Response<H1Body>, Error>, Arc<IdleConns>) {
        let home = Arc::new(IdleConns::default());
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let mut req = http::Request::new(());
        *req.method_mut() = method.clone();
        req.headers_mut().insert("host", HeaderValue::from_static("test"));
        let head = encode_head(req.method(), req.uri(), req.headers());
        // As the proxy's hyper side sees it: fields in wire form moved to the header map.
        let response = exchange(conn, &head, &method, home.clone()).await.map(|mut r| {
            if let Some(raw) = r.body_mut().raw.take() {
                *r.headers_mut() = raw.into_map();
            }
            r
        });
        (response, home)
    }

    fn parsed(head: &[u8]) -> Head {
        parse_head(&mut BytesMut::from(head)).unwrap().expect("a whole head")
    }

    fn kept(head: &Head) -> Vec<String> {
        let Fields::Raw(raw) = &head.fields else {
            panic!("not in wire form");
        };
        raw.kept()
            .map(|(n, v)| format!("{}: {}", String::from_utf8_lossy(n), String::from_utf8_lossy(v)))
            .collect()
    }

    #[test]
    fn a_small_head_keeps_its_fields_in_wire_form_without_the_hop_by_hop_ones() {
        let head = parsed(
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
              Set-Cookie: a=1\r\nContent-Length: 2\r\nset-cookie: b=2\r\nDate: then\r\n\r\n",
        );
        assert_eq!(
            kept(&head),
            [
                "Server: nginx",
                "Set-Cookie: a=1",
                "Content-Length: 2",
                "set-cookie: b=2",
                "Date: then"
            ]
        );
        let Fields::Raw(raw) = &head.fields else { unreachable!() };
        assert!(raw.has_date());
        assert_eq!(raw.content_length(), Some(2));
        let map = raw.map(false);
        assert_eq!(map.get_all("set-cookie").iter().count(), 2);
        assert!(!map.contains_key("keep-alive") && !map.contains_key("connection"));

        // Chunked beats a length: the length is never kept.
        let head = parsed(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\nx-a: 1\r\n\r\n");
        assert_eq!(kept(&head), ["x-a: 1"]);
        assert!(head.chunked && head.content_length.is_none() && !head.keep_alive);
    }

    #[test]
    fn a_connection_value_that_is_not_text_says_nothing() {
        // Found by the fuzz target `h1_head`: options are read from visible text only.
        let head = parsed(b"HTTP/1.0 200 OK\r\nconnection: ,\xc7,keep-alive\r\n\r\n");
        assert!(!head.keep_alive, "HTTP/1.0 kept alive on an unreadable Connection");
        assert!(matches!(&head.fields, Fields::Map(_)));
    }

    #[test]
    fn large_heads_and_connection_named_fields_keep_the_header_map() {
        // `Connection: x-secret` names a field to drop: the header map's rules drop it later.
        let head = parsed(b"HTTP/1.1 200 OK\r\nConnection: x-secret\r\nx-secret: 1\r\nx-a: 2\r\n\r\n");
        assert!(matches!(&head.fields, Fields::Map(m) if m.contains_key("x-secret")));
        let many = head_with_fields(b"HTTP/1.1 200 OK\r\n", 25);
        assert!(matches!(&parsed(&many).fields, Fields::Map(m) if m.len() == 25));
        let mut exactly = many.clone();
        exactly.drain(17..23);
        assert_eq!(kept(&parsed(&exactly)).len(), 24);
    }

    fn pooled(home: &IdleConns) -> usize {
        home.len()
    }

    #[tokio::test]
    async fn content_length_body_split_across_reads_and_the_connection_is_reused() {
        let addr = backend(
            vec![vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nx-a: 1\r\n\r\nhel",
                b"lo wo",
                b"rld",
            ]],
            false,
        )
        .await;
        let (response, home) = get(addr, Method::GET).await;
        let response = response.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-a"], "1");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello world");
        assert_eq!(pooled(&home), 1);
        let conn = home.take(Duration::MAX, crate::clock::now_ms()).expect("pooled");
        assert!(!conn.closed_while_idle(), "an open connection is not closed");
    }

    #[tokio::test]
    async fn chunked_body_with_extensions_and_trailers() {
        let addr = backend(
            vec![vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;name=val",
                b"ue\r\nhello\r",
                b"\n6\r\n world\r\n0\r\nx-checksum: abc\r\n",
                b"\r\n",
            ]],
            false,
        )
        .await;
        let (response, home) = get(addr, Method::GET).await;
        let collected = response.unwrap().into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-checksum"], "abc");
        assert_eq!(&collected.to_bytes()[..], b"hello world");
        assert_eq!(pooled(&home), 1);
    }

    #[tokio::test]
    async fn interim_responses_are_skipped() {
        let addr = backend(
            vec![vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
                b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n",
            ]],
            false,
        )
        .await;
        let (response, home) = get(addr, Method::GET).await;
        let response = response.unwrap();
        assert_eq!(response.status(), 201);
        assert!(response.body().is_end_stream());
        drop(response);
        assert_eq!(
            pooled(&home),
            1,
            "an empty body that is never polled still returns the connection"
        );
    }

    #[tokio::test]
    async fn head_204_and_304_have_no_body_whatever_their_headers_say() {
        for (method, status_line) in [
            (Method::HEAD, &b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"[..]),
            (
                Method::GET,
                &b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"[..],
            ),
            (
                Method::GET,
                &b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n"[..],
            ),
        ] {
            let addr = backend(vec![vec![status_line]], false).await;
            let (response, home) = get(addr, method).await;
            let response = response.unwrap();
            assert_eq!(response.headers()["content-length"], "5");
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(body.is_empty());
            assert_eq!(pooled(&home), 1);
        }
    }

    #[tokio::test]
    async fn a_body_delimited_by_close_ends_with_the_connection() {
        let addr = backend(vec![vec![b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the end"]], true).await;
        let (response, home) = get(addr, Method::GET).await;
        let body = response.unwrap().into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"until the end");
        assert_eq!(pooled(&home), 0);
    }

    #[tokio::test]
    async fn connection_close_and_http10_are_not_reused() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
            &b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
        ] {
            let addr = backend(vec![vec![head]], false).await;
            let (response, home) = get(addr, Method::GET).await;
            let body = response.unwrap().into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"ok");
            assert_eq!(pooled(&home), 0);
        }
    }

    #[tokio::test]
    async fn a_connection_closed_before_any_answer_is_reported_as_such() {
        let addr = backend(vec![vec![]], true).await;
        let (response, _) = get(addr, Method::GET).await;
        assert!(matches!(response, Err(Error::ClosedBeforeResponse)));
    }

    #[tokio::test]
    async fn bad_framing_is_an_error_not_a_silent_truncation() {
        let addr = backend(
            vec![vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            ]],
            false,
        )
        .await;
        assert!(matches!(get(addr, Method::GET).await.0, Err(Error::Protocol(_))));

        let addr = backend(
            vec![vec![b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"]],
            false,
        )
        .await;
        let (response, home) = get(addr, Method::GET).await;
        assert!(response.unwrap().into_body().collect().await.is_err());
        assert_eq!(pooled(&home), 0);

        let addr = backend(vec![vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"]], true).await;
        let (response, home) = get(addr, Method::GET).await;
        assert!(response.unwrap().into_body().collect().await.is_err());
        assert_eq!(pooled(&home), 0);
    }

    #[tokio::test]
    async fn transfer_codings_other_than_chunked_are_refused_and_chunked_beats_a_length() {
        for head in [
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n"[..],
        ] {
            let addr = backend(vec![vec![head]], false).await;
            assert!(matches!(get(addr, Method::GET).await.0, Err(Error::Protocol(_))));
        }
        let addr = backend(
            vec![vec![
                b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            ]],
            false,
        )
        .await;
        let (response, home) = get(addr, Method::GET).await;
        let response = response.unwrap();
        assert!(!response.headers().contains_key("content-length"));
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"ok");
        assert_eq!(pooled(&home), 0, "a message with both framings closes its connection");
    }

    #[tokio::test]
    async fn an_idle_connection_the_backend_closed_is_recognised_without_a_read() {
        let addr = backend(vec![vec![b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]], true).await;
        let (response, home) = get(addr, Method::GET).await;
        response.unwrap().into_body().collect().await.unwrap();
        let conn = home.take(Duration::MAX, crate::clock::now_ms()).expect("pooled");
        let mut closed = false;
        for _ in 0..100 {
            // The reactor sees the hang-up on its next turn.
            tokio::time::sleep(Duration::from_millis(10)).await;
            if conn.closed_while_idle() {
                closed = true;
                break;
            }
        }
        assert!(closed, "the backend's close was not noticed");
        home.put(conn);
        assert!(
            home.take(Duration::MAX, crate::clock::now_ms()).is_none(),
            "a closed idle connection is handed out"
        );
        assert_eq!(pooled(&home), 0);
    }
}
