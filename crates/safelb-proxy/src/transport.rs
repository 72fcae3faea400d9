//! Transport wrappers shared by the data plane and the admin API: [`Lingering`] (the admin
//! API's connections, the data plane's refusals at the connection limit), and the forwarding
//! of writes that every wrapper repeats.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Inside an `impl AsyncWrite`: `poll_write`, `poll_write_vectored`, `is_write_vectored` and
/// `poll_flush` passed to the wrapped transport in field `$io` (the wrapper writes
/// `poll_shutdown` itself).
macro_rules! forward_writes {
    ($io:ident) => {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.$io).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.$io).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.$io.is_write_vectored()
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.$io).poll_flush(cx)
        }
    };
}
pub(crate) use forward_writes;

/// By default, after its last answer a connection reads (and discards) what the client still
/// sends for at most this long, and at most [`LINGER_BYTES`].
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 8 << 20;

/// A connection that, when the server shuts it down, first ends its own side and then reads
/// what the client is still sending until the client closes, a time passes or a number of
/// bytes were read: the lingering close of HTTP servers (RFC 9112 §9.6). A server that answers
/// before reading the whole request (a 413, a 415, a 503 at the connection limit) and closes
/// over unread bytes resets the connection, and the reset can discard its answer before the
/// client reads it.
pub struct Lingering<T> {
    io: T,
    time: Duration,
    bytes: usize,
    linger: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

impl<T> Lingering<T> {
    /// Lingers for at most [`LINGER`] and [`LINGER_BYTES`].
    pub fn new(io: T) -> Lingering<T> {
        Lingering::with_limits(io, LINGER, LINGER_BYTES)
    }

    /// Lingers for at most `time` and `bytes`.
    pub fn with_limits(io: T, time: Duration, bytes: usize) -> Lingering<T> {
        Lingering {
            io,
            time,
            bytes,
            linger: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Lingering<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<T> {
    forward_writes!(io);

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = &mut *self;
        if me.linger.is_none() {
            ready!(Pin::new(&mut me.io).poll_shutdown(cx))?;
            me.linger = Some((Box::pin(tokio::time::sleep(me.time)), 0));
        }
        let (deadline, read) = me.linger.as_mut().expect("set above");
        let mut sink = [0u8; 16 * 1024];
        while *read < me.bytes {
            if deadline.as_mut().poll(cx).is_ready() {
                break;
            }
            let mut buf = ReadBuf::new(&mut sink);
            match ready!(Pin::new(&mut me.io).poll_read(cx, &mut buf)) {
                Ok(()) if !buf.filled().is_empty() => *read += buf.filled().len(),
                // The client closed its side (or the connection broke): nothing left to lose.
                _ => break,
            }
        }
        Poll::Ready(Ok(()))
    }
}
