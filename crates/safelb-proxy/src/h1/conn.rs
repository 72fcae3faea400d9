//! The connection: a backend socket with its read buffer, the idle list of one backend address,
//! and the exchange of one bodiless request on it.

use std::sync::Mutex;
use std::time::Duration;

use super::*;
use crate::worker::PerWorker;

/// An upstream HTTP/1.1 connection with its read buffer.
pub(crate) struct Conn {
    pub(super) io: TcpStream,
    pub(crate) buf: BytesMut,
}

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
    pub(super) fn poll_fill(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        self.buf.reserve(want.clamp(1024, READ_SIZE));
        loop {
            match self.io.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(self.io.poll_read_ready(cx))?,
                result => return Poll::Ready(result),
            }
        }
    }
}

/// Most idle connections kept per backend address and worker; more are closed when returned.
const MAX_IDLE: usize = 512;

/// The idle connections to one backend address, newest last, one list per worker (a worker
/// reuses the connections it opened: see [`crate::worker`]).
#[derive(Default)]
pub(crate) struct IdleConns {
    /// Each connection with the time it went idle ([`crate::clock::now_ms`]).
    lists: PerWorker<Mutex<Vec<(Conn, u64)>>>,
}

impl IdleConns {
    /// The newest idle connection of this worker that is younger than `max_age` at `now`
    /// ([`crate::clock::now_ms`]) and that the backend has not closed; older or closed ones are
    /// dropped on the way.
    pub(crate) fn take(&self, max_age: Duration, now: u64) -> Option<Conn> {
        let list = self.lists.local();
        let max_age = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
        loop {
            let (conn, since) = list.lock().expect("idle list lock is never poisoned").pop()?;
            if now.saturating_sub(since) <= max_age && !conn.closed_while_idle() {
                return Some(conn);
            }
        }
    }

    /// A connection whose last response ended cleanly, ready for the next request.
    pub(crate) fn put(&self, conn: Conn) {
        let mut list = self.lists.local().lock().expect("idle list lock is never poisoned");
        if list.len() < MAX_IDLE {
            list.push((conn, crate::clock::now_ms()));
        }
    }

    /// Closes every idle connection (the backend was ejected or removed).
    pub(crate) fn clear(&self) {
        for list in self.lists.all() {
            list.lock().expect("idle list lock is never poisoned").clear();
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lists
            .all()
            .map(|l| l.lock().expect("idle list lock is never poisoned").len())
            .sum()
    }
}

/// Writes a request head and reads the response head; the body follows in [`H1Body`], which
/// returns the connection to `home` when it ends cleanly.
pub(crate) async fn exchange(
    mut conn: Conn,
    head: &[u8],
    method: &Method,
    home: Arc<IdleConns>,
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
                let (headers, raw) = match head.fields {
                    Fields::Raw(raw) => (HeaderMap::new(), Some(raw)),
                    Fields::Map(map) => (map, None),
                };
                let mut response = http::Response::new(H1Body {
                    conn: Some(conn),
                    state,
                    keep_alive,
                    home,
                    raw,
                });
                *response.status_mut() = head.status;
                *response.version_mut() = head.version;
                *response.headers_mut() = headers;
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
