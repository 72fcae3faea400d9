//! HTTP/1.1 to backends on the request's own task, for requests without a body.
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

use crate::backend::BackendState;

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

/// An upstream HTTP/1.1 connection with its read buffer.
pub(crate) struct Conn {
    io: TcpStream,
    buf: BytesMut,
}

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

impl Conn {
    pub(crate) fn new(io: TcpStream) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Whether the backend closed or reset this idle connection, as the reactor last saw it
    /// (its hang-up event): no system call, so it costs nothing on every reuse.
    pub(crate) fn closed_while_idle(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match pin!(self.io.ready(Interest::READABLE)).poll(&mut cx) {
            Poll::Ready(Ok(ready)) => ready.is_read_closed() || ready.is_error(),
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        }
    }

    /// Reads more bytes into the buffer, with room for about `want`; `Ok(0)` is the end of the
    /// stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.buf.reserve(want.clamp(1024, READ_SIZE));
        loop {
            match self.io.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(self.io.poll_read_ready(cx))?,
                result => return Poll::Ready(result),
            }
        }
    }
}

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
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Writes a request head and reads the response head; the body follows in [`H1Body`], which
/// returns the connection to `home`'s pool when it ends cleanly.
pub(crate) async fn exchange(
    mut conn: Conn,
    head: &[u8],
    method: &Method,
    home: Arc<BackendState>,
) -> Result<http::Response<H1Body>, Error> {
    if let Err(e) = conn.io.write_all(head).await {
        return Err(match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => Error::ClosedBeforeResponse,
            _ => Error::Io(e),
        });
    }
    let mut received = false;
    loop {
        if !conn.buf.is_empty() {
            if let Some(head) = parse_head(&mut conn.buf)? {
                // Interim answers (100 Continue, 103 Early Hints) are not relayed; 101 is never
                // asked for on this path (Upgrade requests get their own connection).
                if head.status.is_informational() {
                    if head.status == StatusCode::SWITCHING_PROTOCOLS {
                        return Err(Error::Protocol("101 Switching Protocols without an Upgrade request"));
                    }
                    continue;
                }
                let state = framing(&head, method);
                let keep_alive = head.keep_alive && !matches!(state, State::Close);
                let mut response = http::Response::new(H1Body {
                    conn: Some(conn),
                    state,
                    keep_alive,
                    home,
                });
                *response.status_mut() = head.status;
                *response.version_mut() = head.version;
                *response.headers_mut() = head.headers;
                return Ok(response);
            }
            if conn.buf.len() > MAX_HEAD {
                return Err(Error::Protocol("response head larger than 64 KiB"));
            }
        }
        conn.buf.reserve(4096);
        match conn.io.read_buf(&mut conn.buf).await {
            Ok(0) if !received => return Err(Error::ClosedBeforeResponse),
            Ok(0) => return Err(Error::Protocol("connection closed inside the response head")),
            Ok(_) => received = true,
            Err(e) if !received && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(Error::ClosedBeforeResponse)
            }
            Err(e) => return Err(Error::Io(e)),
        }
    }
}

struct Head {
    status: StatusCode,
    version: Version,
    headers: HeaderMap,
    keep_alive: bool,
    content_length: Option<u64>,
    /// `Transfer-Encoding: chunked` (the only transfer coding accepted).
    chunked: bool,
}

/// Parses one response head off the front of `buf`; `None` until it is complete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Error> {
    // Uninitialised slots: zeroing 128 of them per response showed in the profile.
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let len =
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut response, buf, &mut fields) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::Protocol("more than 128 header fields")),
            Err(_) => return Err(Error::Protocol("malformed response head")),
        };
    let status = response
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Error::Protocol("invalid status code"))?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    // Positions of each name and value in the head, so that values can share its bytes.
    let base = buf.as_ptr() as usize;
    let count = response.headers.len();
    let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
    for (span, field) in spans.iter_mut().zip(response.headers.iter()) {
        // The head is at most MAX_HEAD plus one read: u32 offsets hold it.
        let name = (field.name.as_ptr() as usize - base) as u32;
        let value = (field.value.as_ptr() as usize - base) as u32;
        *span = (
            name,
            name + field.name.len() as u32,
            value,
            value + field.value.len() as u32,
        );
    }
    let head = buf.split_to(len).freeze();
    let mut parsed = Head {
        status,
        version,
        headers: HeaderMap::with_capacity(count),
        keep_alive: version == Version::HTTP_11,
        content_length: None,
        chunked: false,
    };
    for &(ns, ne, vs, ve) in &spans[..count] {
        let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
        let name = HeaderName::from_bytes(&head[ns..ne]).map_err(|_| Error::Protocol("invalid header name"))?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(vs..ve)).map_err(|_| Error::Protocol("invalid header value"))?;
        if name == CONTENT_LENGTH {
            let n = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(Error::Protocol("invalid Content-Length"))?;
            if parsed.content_length.is_some_and(|prior| prior != n) {
                return Err(Error::Protocol("conflicting Content-Length values"));
            }
            parsed.content_length = Some(n);
        } else if name == TRANSFER_ENCODING {
            let only_chunked = value.to_str().is_ok_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
            if !only_chunked || parsed.chunked {
                return Err(Error::Protocol("unsupported Transfer-Encoding"));
            }
            parsed.chunked = true;
        } else if name == CONNECTION {
            for option in value.to_str().unwrap_or("").split(',').map(str::trim) {
                if option.eq_ignore_ascii_case("close") {
                    parsed.keep_alive = false;
                } else if option.eq_ignore_ascii_case("keep-alive") && version == Version::HTTP_10 {
                    parsed.keep_alive = true;
                }
            }
        }
        parsed.headers.append(name, value);
    }
    if parsed.chunked && parsed.content_length.take().is_some() {
        // Both: chunked wins, the length must not travel on (RFC 9112 §6.3), and a backend that
        // sends such a message does not get to carry another on this connection.
        parsed.headers.remove(CONTENT_LENGTH);
        parsed.keep_alive = false;
    }
    Ok(Some(parsed))
}

/// How the body of a response is delimited (RFC 9112 §6.3).
fn framing(head: &Head, method: &Method) -> State {
    if *method == Method::HEAD || head.status == StatusCode::NO_CONTENT || head.status == StatusCode::NOT_MODIFIED {
        return State::Length(0);
    }
    match (head.chunked, head.content_length) {
        (true, _) => State::Chunked(Chunk::Size),
        (false, Some(n)) => State::Length(n),
        (false, None) => State::Close,
    }
}

enum State {
    /// Bytes of the body still to come.
    Length(u64),
    Chunked(Chunk),
    /// Until the backend closes the connection.
    Close,
    /// Ended; the connection went back to its pool or was closed.
    Done,
}

enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    Trailers(HeaderMap, usize),
}

/// A response body read straight off the backend connection.
pub struct H1Body {
    conn: Option<Conn>,
    state: State,
    keep_alive: bool,
    home: Arc<BackendState>,
}

impl H1Body {
    /// The body ended where its framing said: the connection may carry the next request.
    fn finish(&mut self) {
        self.state = State::Done;
        if let Some(mut conn) = self.conn.take() {
            if self.keep_alive && conn.buf.is_empty() {
                // An idle connection keeps a head-sized buffer, not the last body's 64 KiB reads.
                if conn.buf.capacity() > IDLE_BUFFER {
                    conn.buf = BytesMut::new();
                }
                crate::upstream::checkin_raw(&self.home, conn);
            }
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.state = State::Done;
        self.conn = None;
        Poll::Ready(Some(Err(e)))
    }
}

/// Reads a CRLF-terminated line off the front of `buf`, without its line end.
fn take_line(buf: &mut BytesMut) -> Option<Bytes> {
    let end = buf.iter().position(|&b| b == b'\n')?;
    let mut line = buf.split_to(end + 1).freeze();
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.truncate(end - 1);
    }
    Some(line)
}

fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.split(|&b| b == b';').next()?;
    let digits = std::str::from_utf8(digits)
        .ok()?
        .trim_matches(|c| c == ' ' || c == '\t');
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

fn trailer_field(line: &[u8]) -> Option<(HeaderName, HeaderValue)> {
    let colon = line.iter().position(|&b| b == b':')?;
    let name = HeaderName::from_bytes(&line[..colon]).ok()?;
    let value = std::str::from_utf8(&line[colon + 1..]).ok()?.trim();
    Some((name, HeaderValue::from_str(value).ok()?))
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Each arm returns a frame, or falls through to read more bytes.
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                State::Length(remaining) => {
                    if !conn.buf.is_empty() {
                        let n = (*remaining).min(conn.buf.len() as u64);
                        *remaining -= n;
                        let data = conn.buf.split_to(n as usize).freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Close => {
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                State::Chunked(chunk) => match chunk {
                    Chunk::Size => match take_line(&mut conn.buf) {
                        Some(line) => match chunk_size(&line) {
                            Some(0) => *chunk = Chunk::Trailers(HeaderMap::new(), 0),
                            Some(n) => *chunk = Chunk::Data(n),
                            None => return this.fail(Error::Protocol("invalid chunk size")),
                        },
                        None if conn.buf.len() > MAX_CHUNK_LINE => {
                            return this.fail(Error::Protocol("chunk size line too long"));
                        }
                        None => {}
                    },
                    Chunk::Data(remaining) => {
                        if !conn.buf.is_empty() {
                            let n = (*remaining).min(conn.buf.len() as u64);
                            *remaining -= n;
                            if *remaining == 0 {
                                *chunk = Chunk::DataEnd;
                            }
                            let data = conn.buf.split_to(n as usize).freeze();
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        }
                    }
                    Chunk::DataEnd => {
                        if conn.buf.len() >= 2 {
                            if &conn.buf[..2] != b"\r\n" {
                                return this.fail(Error::Protocol("chunk data longer than its size"));
                            }
                            conn.buf.advance(2);
                            *chunk = Chunk::Size;
                        }
                    }
                    Chunk::Trailers(fields, size) => match take_line(&mut conn.buf) {
                        Some(line) if line.is_empty() => {
                            let fields = std::mem::take(fields);
                            this.finish();
                            if fields.is_empty() {
                                return Poll::Ready(None);
                            }
                            return Poll::Ready(Some(Ok(Frame::trailers(fields))));
                        }
                        Some(line) => {
                            *size += line.len();
                            match trailer_field(&line) {
                                Some((name, value)) if *size <= MAX_HEAD => {
                                    fields.append(name, value);
                                }
                                _ => return this.fail(Error::Protocol("invalid trailer section")),
                            }
                        }
                        None if conn.buf.len() > MAX_HEAD => {
                            return this.fail(Error::Protocol("trailer section too long"))
                        }
                        None => {}
                    },
                },
            }
            // Progress was made without a frame (a chunk boundary): go round again before reading.
            let need_bytes = match &this.state {
                State::Chunked(Chunk::Size) | State::Chunked(Chunk::Trailers(..)) => {
                    this.conn.as_ref().is_some_and(|c| !c.buf.contains(&b'\n'))
                }
                State::Chunked(Chunk::DataEnd) => this.conn.as_ref().is_some_and(|c| c.buf.len() < 2),
                State::Chunked(Chunk::Data(0)) => false,
                State::Length(0) | State::Done => false,
                State::Chunked(Chunk::Data(_)) | State::Length(_) | State::Close => {
                    this.conn.as_ref().is_some_and(|c| c.buf.is_empty())
                }
            };
            if !need_bytes {
                continue;
            }
            // Room for what is known to come (a length, a chunk), else a modest read.
            let want = match this.state {
                State::Length(n) | State::Chunked(Chunk::Data(n)) => usize::try_from(n).unwrap_or(READ_SIZE),
                _ => 8 * 1024,
            };
            let conn = this.conn.as_mut().expect("checked above");
            match ready!(conn.poll_fill(cx, want)) {
                Ok(0) if matches!(this.state, State::Close) => {
                    // The backend closed: that is the end of this body, and of the connection.
                    this.state = State::Done;
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(Error::Protocol("connection closed inside the body")),
                Ok(_) => {}
                Err(e) => return this.fail(Error::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done | State::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            State::Length(n) => SizeHint::with_exact(n),
            State::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        // hyper does not poll a body that reports its end up front (HEAD, 204, length 0).
        if matches!(self.state, State::Length(0)) {
            self.finish();
        }
    }
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

    async fn get(addr: SocketAddr, method: Method) -> (Result<http::Response<H1Body>, Error>, Arc<BackendState>) {
        let home = Arc::new(BackendState::new(addr));
        let conn = Conn::new(TcpStream::connect(addr).await.unwrap());
        let mut req = http::Request::new(());
        *req.method_mut() = method.clone();
        req.headers_mut().insert("host", HeaderValue::from_static("test"));
        let head = encode_head(req.method(), req.uri(), req.headers());
        (exchange(conn, &head, &method, home.clone()).await, home)
    }

    fn pooled(home: &BackendState) -> usize {
        home.inline_idle.lock().unwrap().len()
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
        let (conn, _) = home.inline_idle.lock().unwrap().pop().expect("pooled");
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
        let (conn, _) = home.inline_idle.lock().unwrap().pop().expect("pooled");
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
    }
}
