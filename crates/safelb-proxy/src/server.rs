//! Client-facing listeners: accept, serve HTTP/1.1 (keep-alive, upgrades) and h2c, drain on shutdown.
//!
//! [`serve`] takes a bound listener and a shutdown token (the shape of mini-redis's
//! `server::run`), so tests bind port 0 and own the lifetime. On shutdown it stops accepting;
//! every connection finishes the request it is serving and then closes. The caller waits on
//! the [`TaskTracker`] for at most its drain timeout.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpSocket};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::client_io::{ClientIo, ConnState};
use crate::proxy::Proxy;

/// Binds a listening socket with a deep accept backlog (bursts of new connections are common
/// in front of a website) and address reuse (a restart must not wait for TIME_WAIT).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
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
        let _ = stream.set_nodelay(true);
        tracker.spawn(connection(stream, peer, proxy.clone(), tls.clone(), shutdown.clone()));
    }
}

/// A connection's task holds only this small future until the client sends its first byte; the
/// HTTP machinery (a future of a few KiB) is boxed then. Measured with 10k idle connections.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let header_timeout = proxy.handle.snapshot().config.limits.header_timeout;
    let ready = tokio::select! {
        ready = stream.readable() => ready.is_ok(),
        _ = tokio::time::sleep(header_timeout) => false,
        _ = shutdown.cancelled() => false,
    };
    if !ready {
        return;
    }
    match tls {
        None => Box::pin(serve_http(stream, peer, proxy, shutdown)).await,
        Some(acceptor) => {
            let handshake = Box::pin(tokio::time::timeout(header_timeout, acceptor.accept(stream)));
            match handshake.await {
                Ok(Ok(tls_stream)) => Box::pin(serve_http(tls_stream, peer, proxy, shutdown)).await,
                Ok(Err(e)) => tracing::debug!(client = %peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(client = %peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn serve_http<S>(stream: S, peer: SocketAddr, proxy: Arc<Proxy>, shutdown: CancellationToken)
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
        limits.header_timeout,
        limits.keepalive_timeout,
        proxy.log.clone(),
        snapshot.version,
    );
    drop(snapshot);
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        let state = state.clone();
        async move { Ok::<_, Infallible>(proxy.serve(req, peer, state).await) }
    });
    // HTTP/1.1, and HTTP/2 with prior knowledge (h2c), told apart by the connection preface.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        // Past this the request head cannot be parsed: hyper answers 431 (see client_io.rs).
        .max_buf_size(limits.max_header_bytes)
        .header_read_timeout(None);
    builder
        .http2()
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_concurrent_streams(256);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
