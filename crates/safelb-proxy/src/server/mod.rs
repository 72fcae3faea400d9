//! Client-facing listeners: accept, serve HTTP/1.1 (keep-alive, upgrades) and h2c, drain on shutdown.
//!
//! [`serve`] takes a bound listener and a shutdown token (the shape of mini-redis's
//! `server::run`), so tests bind port 0 and own the lifetime. On shutdown it stops accepting;
//! every connection finishes the request it is serving and then closes. The caller waits on
//! the [`TaskTracker`] for at most its drain timeout.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::ClientBody;
use crate::client_io::{ClientIo, ConnState, Timeouts};
use crate::metrics::ListenerCounters;
use crate::proxy::Proxy;
use crate::transport::Lingering;

mod http1;

/// Binds a listening socket with a deep accept backlog (bursts of new connections are common
/// in front of a website) and address reuse (a restart must not wait for TIME_WAIT).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket(addr)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accept backlog of every listening socket.
const BACKLOG: u32 = 4096;

fn socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    Ok(socket)
}

/// Binds `workers` listening sockets on one address, one per worker thread, as plain
/// (non-async) listeners to register on each worker's runtime. With more than one, they share
/// the port with `SO_REUSEPORT` and the kernel spreads new connections over them; each worker
/// accepts on its own socket and no accept wakes a thread for nothing.
///
/// `SO_REUSEPORT` would also let this process join a port that another one (of the same user)
/// already listens on, and split its traffic silently: a plain bind of the address first fails
/// with "address in use" when anything listens there, as a single socket would.
pub fn bind_group(addr: SocketAddr, workers: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if workers <= 1 {
        return Ok(vec![bind(addr)?.into_std()?]);
    }
    if addr.port() != 0 {
        socket(addr)?.bind(addr)?;
    }
    let mut group = Vec::with_capacity(workers);
    let mut at = addr;
    for _ in 0..workers {
        let socket = socket(at)?;
        socket.set_reuseport(true)?;
        socket.bind(at)?;
        let listener = socket.listen(BACKLOG)?;
        // Port 0: the first socket picked the port, the others join it.
        at = listener.local_addr()?;
        group.push(listener.into_std()?);
    }
    Ok(group)
}

/// Accepts and serves connections until `shutdown` is cancelled. Connection tasks are spawned
/// on `tracker`, so the caller can wait for them to drain.
/// With `tls`, every connection is a TLS handshake first (within the header timeout).
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let counters = proxy.handle.metrics().listener(&proxy.listener);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Usually EMFILE or a connection reset before accept: back off a little
                    // rather than spin, and keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let max = proxy.handle.snapshot().config.limits.max_connections;
        if counters.open.load(Relaxed) >= max {
            counters.refused.fetch_add(1, Relaxed);
            tracker.spawn(refuse(stream, max, proxy.listener.clone(), tls.is_some()));
            continue;
        }
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::count(counters.clone());
        let conn = connection(stream, peer, proxy.clone(), tls.clone(), shutdown.clone());
        tracker.spawn(async move {
            conn.await;
            drop(open);
        });
    }
}

/// One open connection of a listener, counted until dropped.
struct OpenConnection(Arc<ListenerCounters>);

impl OpenConnection {
    fn count(c: Arc<ListenerCounters>) -> OpenConnection {
        c.open.fetch_add(1, Relaxed);
        OpenConnection(c)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
    }
}

/// A connection past the listener's limit: a short 503 on plain HTTP (a TLS one is closed, there
/// is no handshake to spend on it), then close. Bounded: one write with a one-second timeout,
/// then a lingering close of at most a second and 64 KiB (closing over unread bytes resets the
/// connection, and the client could lose the answer).
async fn refuse(stream: tokio::net::TcpStream, max: usize, listener: Arc<str>, tls: bool) {
    use tokio::io::AsyncWriteExt;
    if !tls {
        let body = format!("503 Service Unavailable: connection limit ({max}) of listener `{listener}` reached\n");
        let answer = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let second = std::time::Duration::from_secs(1);
        let mut stream = Lingering::with_limits(stream, second, 64 * 1024);
        let _ = tokio::time::timeout(second, stream.write_all(answer.as_bytes())).await;
        let _ = stream.shutdown().await;
    }
}

/// The HTTP/2 connection preface: a plain connection that starts with it speaks h2c.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Which HTTP a connection speaks, when its first bytes or ALPN have told.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Speaks {
    Http1,
    Http2,
    /// Not decided yet (a partial preface, or TLS without ALPN): hyper-util's detector reads on.
    Unknown,
}

/// A connection's task holds only this small future until the client sends its first byte; the
/// HTTP machinery (a future of several KiB, plus hyper's buffers) is boxed then. The wait is a
/// `peek`, not `readable()`: tokio assumes an accepted socket readable, so `readable()` returns
/// at once and 10k silent connections would each hold the full machinery (measured: 4.7 KiB
/// per idle connection before, see docs/performance.md). The peeked bytes also tell HTTP/1.1
/// from h2c, so the request path skips hyper-util's version detector and its replay buffer.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let header_timeout = proxy.handle.snapshot().config.limits.header_timeout;
    let mut first = [0u8; H2_PREFACE.len()];
    let mut buf = tokio::io::ReadBuf::new(&mut first);
    // `poll_peek` in a closure: a few bytes, where the `peek` future is ten times that.
    let peek = std::future::poll_fn(|cx| stream.poll_peek(cx, &mut buf));
    let peeked = tokio::select! {
        peeked = peek => peeked.ok(),
        _ = tokio::time::sleep(header_timeout) => None,
        _ = shutdown.cancelled() => None,
    };
    // Nothing within the header timeout, an error, or a client that closed without a byte.
    let Some(n) = peeked.filter(|&n| n > 0) else {
        return;
    };
    match tls {
        None => {
            let speaks = if first[..n] != H2_PREFACE[..n] {
                Speaks::Http1
            } else if n == H2_PREFACE.len() {
                Speaks::Http2
            } else {
                Speaks::Unknown
            };
            Box::pin(serve_http(stream, peer, proxy, shutdown, speaks)).await
        }
        Some(acceptor) => Box::pin(serve_tls(stream, acceptor, header_timeout, peer, proxy, shutdown)).await,
    }
}

/// A TLS handshake (within the header timeout), then HTTP as ALPN chose. A separate boxed
/// future: the handshake state (a rustls connection) must not size every idle plain
/// connection's task.
async fn serve_tls(
    stream: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    header_timeout: std::time::Duration,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
) {
    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let speaks = match tls_stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => Speaks::Http2,
                Some(b"http/1.1") => Speaks::Http1,
                _ => Speaks::Unknown,
            };
            serve_http(tls_stream, peer, proxy, shutdown, speaks).await
        }
        Ok(Err(e)) => tracing::debug!(client = %peer, error = %e, "TLS handshake failed"),
        Err(_) => tracing::debug!(client = %peer, "TLS handshake timed out"),
    }
}

async fn serve_http<S>(stream: S, peer: SocketAddr, proxy: Arc<Proxy>, shutdown: CancellationToken, speaks: Speaks)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let snapshot = proxy.handle.snapshot();
    let limits = snapshot.config.limits.clone();
    let state = Arc::new(ConnState::default());
    let io = ClientIo::new(
        stream,
        state.clone(),
        peer,
        Timeouts {
            header: limits.header_timeout,
            keepalive: limits.keepalive_timeout,
            send: limits.send_timeout,
        },
        proxy.log.clone(),
        snapshot.version,
    );
    drop(snapshot);
    let max_header_list = limits.max_header_bytes as u32;
    if speaks != Speaks::Http2 {
        // Plain requests are served by safelb's own loop; the first head it declines takes the
        // connection to hyper, with the bytes already read. A connection whose protocol is not
        // known (TLS without ALPN: most load generators and scripts) starts there too: an h2
        // preface is a head the loop declines, and hyper-util's detector then finds h2.
        let (io, head) = match http1::serve(io, peer, &proxy, &state, &shutdown, limits.max_header_bytes).await {
            http1::Ended::Closed => return,
            http1::Ended::HandOff(io, head) => (io, head),
        };
        let io = TokioIo::new(http1::Prefixed { head, io });
        let service = service(proxy, state, peer);
        if speaks == Speaks::Http1 {
            let conn = http1_builder(limits.max_header_bytes)
                .serve_connection(io, service)
                .with_upgrades();
            return drive(conn, peer, &shutdown, |c| c.graceful_shutdown()).await;
        }
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .keep_alive(true)
            .max_buf_size(limits.max_header_bytes)
            .header_read_timeout(None);
        builder
            .http2()
            .max_header_list_size(max_header_list)
            .max_concurrent_streams(256);
        let conn = builder.serve_connection_with_upgrades(io, service);
        return drive(conn, peer, &shutdown, |c| c.graceful_shutdown()).await;
    }
    let io = TokioIo::new(io);
    let service = service(proxy, state, peer);
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .max_header_list_size(max_header_list)
        .max_concurrent_streams(256);
    let conn = builder.serve_connection(io, service);
    drive(conn, peer, &shutdown, |c| c.graceful_shutdown()).await
}

/// hyper's service for one connection: every request goes to [`Proxy::serve`].
fn service(
    proxy: Arc<Proxy>,
    state: Arc<ConnState>,
    peer: SocketAddr,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<crate::proxy::ResponseBody>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<crate::proxy::ResponseBody>, Infallible>> + Send,
> + Clone {
    service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        let state = state.clone();
        async move {
            // Boxed: hyper moves each HTTP/2 stream's future into a task of its own (several
            // copies of it per request), and the proxy's future is 3 KiB. On hyper's HTTP/1
            // connections (bodies, upgrades) the box is one allocation a request.
            let mut response = Box::pin(proxy.serve(req.map(ClientBody::Hyper), peer, state)).await;
            // hyper writes the header map only.
            crate::proxy::fields_to_map(&mut response);
            Ok::<_, Infallible>(response)
        }
    })
}

fn http1_builder(max_header_bytes: usize) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        // Past this the request head cannot be parsed: hyper answers 431 (see client_io.rs).
        .max_buf_size(max_header_bytes)
        // ClientIo keeps the header timeout itself (with a 408 answer).
        .header_read_timeout(None);
    builder
}

/// Runs a connection to its end; on shutdown, lets it finish the request in flight and close.
async fn drive<C, E>(conn: C, peer: SocketAddr, shutdown: &CancellationToken, graceful: fn(Pin<&mut C>))
where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            graceful(conn.as_mut());
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::AccessLog;
    use crate::handle::ProxyHandle;

    const CONFIG: &str = r#"
[listener.public]
bind = "127.0.0.1:0"
[[route]]
name = "r"
pool = "p"
[pool.p]
backends = ["127.0.0.1:9"]
"#;

    /// Every silent connection holds one of these: it must stay far below the HTTP machinery
    /// (which is boxed only when the first byte arrives).
    #[tokio::test]
    async fn an_idle_connection_holds_a_small_future() {
        let checked = safelb_config::check("t.toml", CONFIG).into_result().expect("valid");
        let proxy = Proxy::new(ProxyHandle::new(checked, 1), AccessLog::disabled());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let idle = connection(stream, peer, proxy.clone(), None, CancellationToken::new());
        let size = std::mem::size_of_val(&idle);
        println!("idle connection future: {size} bytes");
        assert!(size <= 512, "the idle connection future grew to {size} bytes");
    }
}
