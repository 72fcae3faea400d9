//! safelb's own HTTP/1.1 server loop, for the requests most connections carry: plain heads
//! without a body (`h1::parse_request` says which).
//!
//! hyper's server dispatch cost more instructions per small request than the upstream exchange it
//! drove (docs/performance.md): a proxy needs less of it. Here one task reads heads into one
//! per-connection buffer, serves each request in wire form (`h1::RequestHead`) through
//! `Proxy::serve_wire` and writes the response
//! head with the start of its body in one write, reusing one output buffer. The first head this
//! loop declines (a body, an upgrade, `Expect`, anything malformed or too large) ends it: the
//! connection goes to hyper, bytes already read included, for the rest of its life, so those
//! cases keep the code the test suite pins down.
//!
//! The timeouts are `ClientIo`'s (header, idle keep-alive, send), as on hyper's path.

use std::io;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Method, Response, Version};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use crate::client_io::{ClientIo, ConnState};
use crate::clock::http_date_now;
use crate::h1::{self, Framing, Parsed, RawFields};
use crate::proxy::{BoxError, Proxy, ResponseBody};

/// What one read asks room for while a head is read.
const READ_SIZE: usize = 8 * 1024;
/// Largest buffer for the backend's head a connection keeps between requests.
const KEPT_HEAD: usize = 16 * 1024;
/// Body bytes gathered behind the head before they are written; larger frames go out as they are.
const COALESCE: usize = 16 * 1024;

/// How the loop ended.
// Once per connection, taken apart at once.
#[allow(clippy::large_enum_variant)]
pub(super) enum Ended<S> {
    /// The connection is done (closed by either side, timed out, or shut down).
    Closed,
    /// A head the loop does not serve: hyper takes the connection, starting with `buffered`.
    HandOff(ClientIo<S>, BytesMut),
}

/// Serves plain HTTP/1 requests on `io` until the connection ends or a head needs hyper.
pub(super) async fn serve<S>(
    mut io: ClientIo<S>,
    peer: SocketAddr,
    proxy: &Proxy,
    state: &Arc<ConnState>,
    shutdown: &CancellationToken,
    max_head: usize,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(READ_SIZE);
    let mut out = Vec::with_capacity(1024);
    // The request head's field list and the backend's head, kept from one request to the next.
    let mut fields = Vec::new();
    let mut upstream = Vec::new();
    // The response timer of every request on this connection, moved from one to the next.
    let mut timer = pin!(tokio::time::sleep(std::time::Duration::ZERO));
    let mut stop = pin!(shutdown.cancelled());
    loop {
        let head = match h1::parse_request(&mut buf, max_head, &mut fields) {
            Parsed::Request(head) => head,
            Parsed::Declined => {
                io.resume_head(&buf);
                return Ended::HandOff(io, buf);
            }
            Parsed::Partial => {
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(READ_SIZE);
                }
                let read = tokio::select! {
                    biased;
                    read = io.read_buf(&mut buf) => read,
                    _ = &mut stop => return Ended::Closed,
                };
                match read {
                    Ok(n) if n > 0 => continue,
                    // The client closed (or the keep-alive timer did), or the read failed
                    // (the header timer answered 408 itself).
                    _ => return Ended::Closed,
                }
            }
        };
        io.request_started();
        let response = proxy
            .serve_wire(&head, peer, state.clone(), &mut upstream, timer.as_mut())
            .await;
        let keep_alive = head.keep_alive && !shutdown.is_cancelled() && !h1::says_close(response.headers());
        let reply = Reply {
            version: head.version,
            head_request: head.method == Method::HEAD,
            trailers: head.trailers,
            keep_alive,
        };
        fields = head.into_fields();
        if upstream.capacity() > KEPT_HEAD {
            // One client's large head is not kept for the connection's life.
            upstream = Vec::new();
        }
        match write_response(&mut io, &mut out, response, reply).await {
            Ok(true) => {}
            _ => {
                let _ = io.shutdown().await;
                return Ended::Closed;
            }
        }
    }
}

/// What the response's head and framing depend on, from its request.
#[derive(Clone, Copy)]
struct Reply {
    version: Version,
    head_request: bool,
    trailers: bool,
    keep_alive: bool,
}

/// The next thing a response body has for the writer.
enum Next {
    Frame(Option<Result<http_body::Frame<Bytes>, BoxError>>),
    /// Nothing ready now: write what is gathered before waiting.
    Flush,
}

/// Writes one response; whether the connection may carry another request (the request allows
/// it, and the body was framed by length or chunks and ended where its framing said).
async fn write_response<S>(
    io: &mut ClientIo<S>,
    out: &mut Vec<u8>,
    response: Response<ResponseBody>,
    reply: Reply,
) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (parts, mut body) = response.into_parts();
    // A backend's fields may still be in wire form: they are copied out of its head.
    let raw = body.raw_fields();
    let declared = h1::declared_length(&parts.headers).or_else(|| raw.and_then(RawFields::content_length));
    let framing = h1::response_framing(
        reply.head_request,
        parts.status,
        declared,
        body.size_hint().exact(),
        reply.version,
    );
    let keep_alive = reply.keep_alive && framing != Framing::Close;
    out.clear();
    h1::encode_response_head(out, &parts, raw, reply.version, framing, keep_alive, &http_date_now());
    drop(parts);
    if let Framing::Empty(_) = framing {
        // A body is never sent here (HEAD, 204, 304): dropping it ends the request.
        drop(body);
        io.write_all(out).await?;
        io.flush().await?;
        return Ok(keep_alive);
    }
    let chunked = framing == Framing::Chunked;
    let mut sent: u64 = 0;
    let mut trailers: Option<HeaderMap> = None;
    loop {
        let next = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
            Poll::Pending if !out.is_empty() => Poll::Ready(Next::Flush),
            Poll::Pending => Poll::Pending,
            Poll::Ready(frame) => Poll::Ready(Next::Frame(frame)),
        })
        .await;
        let frame = match next {
            Next::Flush => {
                io.write_all(out).await?;
                io.flush().await?;
                out.clear();
                continue;
            }
            Next::Frame(None) => break,
            // The backend's body broke off: the client must see a cut, not an end.
            Next::Frame(Some(Err(e))) => return Err(io::Error::other(e)),
            Next::Frame(Some(Ok(frame))) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(fields) = frame.into_trailers() {
                    trailers = Some(fields);
                }
                continue;
            }
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        if let Framing::Length(n) = framing {
            if sent > n {
                return Err(io::Error::other("response body longer than its Content-Length"));
            }
        }
        if chunked {
            h1::chunk_header(out, data.len());
        }
        if data.len() <= COALESCE {
            out.extend_from_slice(&data);
        } else {
            write_two(io, out, &data).await?;
            out.clear();
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
        if out.len() >= COALESCE {
            io.write_all(out).await?;
            out.clear();
        }
    }
    drop(body);
    match framing {
        Framing::Chunked => h1::chunked_end(out, trailers.as_ref().filter(|_| reply.trailers)),
        Framing::Length(n) if sent != n => {
            return Err(io::Error::other("response body shorter than its Content-Length"))
        }
        _ => {}
    }
    if !out.is_empty() {
        io.write_all(out).await?;
    }
    io.flush().await?;
    Ok(keep_alive)
}

/// Writes `a` then `b`, with vectored writes where the transport has them (a head and a large
/// body frame go out in one system call).
async fn write_two<S: AsyncWrite + Unpin>(io: &mut S, mut a: &[u8], mut b: &[u8]) -> io::Result<()> {
    while !a.is_empty() {
        let n = io.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    io.write_all(b).await
}

/// A transport whose first bytes were already read: hyper reads `head` before the transport.
pub(super) struct Prefixed<S> {
    pub(super) head: BytesMut,
    pub(super) io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.head.is_empty() {
            let n = this.head.len().min(buf.remaining());
            buf.put_slice(&this.head[..n]);
            this.head.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    crate::transport::forward_writes!(io);

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
