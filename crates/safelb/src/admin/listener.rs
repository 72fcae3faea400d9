//! The admin API's listener: plain TCP on loopback, or TLS. TLS handshakes run in tasks of
//! their own (bounded in time), so a client that opens a connection and stalls its handshake
//! delays nobody; finished connections queue for the HTTP server.
//!
//! Every connection closes lingering (`safelb_proxy::transport::Lingering`): an answer given
//! before the request body was read (a 415 for a body without a JSON content type, a 413) must
//! reach the client, and a socket closed over unread bytes resets the connection, which can
//! discard the answer before the client reads it. The data plane's refusals linger too.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use safelb_proxy::transport::Lingering;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;

/// A handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshaken connections waiting for the server at most (then handshakes wait).
const QUEUE: usize = 64;

pub type AdminIo = Lingering<Either<TcpStream, TlsStream<TcpStream>>>;

pub enum AdminListener {
    Plain(TcpListener),
    Tls {
        local: SocketAddr,
        ready: mpsc::Receiver<(AdminIo, SocketAddr)>,
    },
}

impl AdminListener {
    pub fn new(tcp: TcpListener, tls: Option<TlsAcceptor>) -> io::Result<AdminListener> {
        let Some(acceptor) = tls else {
            return Ok(AdminListener::Plain(tcp));
        };
        let local = tcp.local_addr()?;
        let (send, ready) = mpsc::channel(QUEUE);
        // Ends when the server drops the receiver (shutdown): the next send fails.
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors, most often: pause rather than spin.
                        tracing::warn!(error = %e, "admin API: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if send.is_closed() {
                    return;
                }
                let (acceptor, send) = (acceptor.clone(), send.clone());
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = send.send((Lingering::new(Either::Right(tls)), peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(client = %peer, error = %e, "admin API: TLS handshake failed"),
                        Err(_) => tracing::debug!(client = %peer, "admin API: TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(AdminListener::Tls { local, ready })
    }
}

impl axum::serve::Listener for AdminListener {
    type Io = AdminIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (AdminIo, SocketAddr) {
        match self {
            AdminListener::Plain(tcp) => {
                // axum's own accept for TCP, which rides out accept errors.
                let (stream, peer) = axum::serve::Listener::accept(tcp).await;
                let _ = stream.set_nodelay(true);
                (Lingering::new(Either::Left(stream)), peer)
            }
            AdminListener::Tls { ready, .. } => match ready.recv().await {
                Some(conn) => conn,
                // The accept task ended, which it only does once the server is gone.
                None => std::future::pending().await,
            },
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            AdminListener::Plain(tcp) => tcp.local_addr(),
            AdminListener::Tls { local, .. } => Ok(*local),
        }
    }
}
