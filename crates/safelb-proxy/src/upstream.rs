//! Upstream connections: connect with a timeout, keep idle connections per backend, hand them
//! out again. Three kinds: plain HTTP/1.1 connections for bodiless requests (exchanged inline,
//! `h1/`), hyper HTTP/1.1 connections for requests with a body, and one multiplexed hyper
//! HTTP/2 connection per backend for `protocol = "h2"` pools. Each kind is kept per worker
//! thread ([`crate::worker`]): a request uses connections its own runtime opened.
//!
//! [`Conns`] holds one backend address's connections; the [`crate::registry::Registry`] keeps
//! it beside the address's [`BackendState`](crate::backend::BackendState), which knows nothing
//! of connections.
//!
//! The pools are ours rather than hyper-util's client because a retry must happen *before* the
//! request body is consumed: we obtain a connection first, and only then give the request away.
//! A stale keep-alive connection that the backend closed is recognised without losing the
//! request (the reactor's hang-up readiness for inline connections; `try_send_request` handing
//! it back for hyper's), and the request goes out on a fresh one.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use safelb_config::Protocol;
use tokio::net::TcpStream;

use crate::body::RequestBody;
use crate::error::ErrorKind;
use crate::h1;
use crate::worker::PerWorker;

/// Idle connections older than this are closed instead of reused: many servers close theirs
/// after a few seconds, and reusing one that is being closed costs a round trip.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per backend and worker; more are closed when returned.
const MAX_IDLE_PER_BACKEND: usize = 512;

/// The connections to one backend address, shared by every snapshot that names it.
pub(crate) struct Conns {
    addr: SocketAddr,
    /// Idle connections of hyper's client (requests with a body), per worker: a connection's
    /// task runs on the runtime that opened it.
    idle: PerWorker<Mutex<Vec<IdleConn>>>,
    /// Idle connections for bodiless requests, exchanged on the request's task (`h1/`).
    inline: Arc<h1::IdleConns>,
    /// The multiplexed connection of pools that speak HTTP/2 to this backend, one per worker.
    h2: PerWorker<Mutex<Option<http2::SendRequest<RequestBody>>>>,
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conns")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

struct IdleConn {
    sender: SendRequest<RequestBody>,
    /// Idle since ([`crate::clock::now_ms`]).
    since_ms: u64,
}

/// A connection to send one request on.
pub(crate) enum Sender {
    /// Owned for this request; back to its home's idle list once the response body ends.
    H1(SendRequest<RequestBody>, Arc<Conns>),
    /// A clone of the backend's one multiplexed connection.
    H2(http2::SendRequest<RequestBody>),
    /// For a bodiless request: exchanged on the request's own task; the response body puts it
    /// back in the pool when it ends.
    Inline(Option<(h1::Conn, Arc<h1::IdleConns>)>),
}

/// A response body as it comes from a backend.
pub(crate) enum UpstreamBody {
    Hyper(Incoming),
    Inline(h1::H1Body),
}

/// A failed send.
pub(crate) struct SendError {
    /// The request is back in the caller's slot and may go out again on another connection:
    /// never written, or (for an idempotent request on a reused connection) closed by the
    /// backend before any answer.
    pub(crate) unsent: bool,
    pub(crate) error: Box<dyn std::error::Error + Send + Sync>,
}

impl Sender {
    /// Sends the request in `slot`, or on an inline connection its head already in wire form
    /// (`head`, with its method; `slot` may then be empty). The request stays in `slot` while a
    /// bodiless request is exchanged inline, and goes back there when it may be sent again;
    /// otherwise it is consumed.
    pub(crate) async fn send(
        &mut self,
        slot: &mut Option<http::Request<RequestBody>>,
        head: Option<(&[u8], &http::Method)>,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        let hyper_error = |mut e: hyper::client::conn::TrySendError<http::Request<RequestBody>>,
                           slot: &mut Option<http::Request<RequestBody>>| {
            *slot = e.take_message();
            SendError {
                unsent: slot.is_some(),
                error: Box::new(e.into_error()),
            }
        };
        match self {
            // hyper's send futures are boxed: requests with a body and h2 pools pay one
            // allocation, so that bodiless HTTP/1.1 requests (most) do not carry their size.
            Sender::H1(s, _) => {
                let req = slot.take().expect("send is given a request");
                match Box::pin(s.try_send_request(req)).await {
                    Ok(r) => Ok(r.map(UpstreamBody::Hyper)),
                    Err(e) => Err(hyper_error(e, slot)),
                }
            }
            Sender::H2(s) => {
                let req = slot.take().expect("send is given a request");
                match Box::pin(s.try_send_request(req)).await {
                    Ok(r) => Ok(r.map(UpstreamBody::Hyper)),
                    Err(e) => Err(hyper_error(e, slot)),
                }
            }
            Sender::Inline(_) => {
                let encoded;
                let (head, method) = match head {
                    Some(wire) => wire,
                    None => {
                        let req = slot.as_ref().expect("send is given a request");
                        encoded = (
                            h1::encode_head(req.method(), req.uri(), req.headers()),
                            req.method().clone(),
                        );
                        (&encoded.0[..], &encoded.1)
                    }
                };
                let sent = self.send_head(head, method).await;
                if !matches!(&sent, Err(e) if e.unsent) {
                    slot.take();
                }
                sent
            }
        }
    }

    /// Sends a bodiless request already in wire form on an inline connection. The head can be
    /// shared by several attempts (retries, a hedge), so it is encoded once per request.
    pub(crate) async fn send_head(
        &mut self,
        head: &[u8],
        method: &http::Method,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        let Sender::Inline(conn) = self else {
            unreachable!("send_head is used with inline connections only");
        };
        let (conn, home) = conn.take().expect("a connection carries one request at a time");
        match h1::exchange(conn, head, method, home).await {
            Ok(response) => Ok(response.map(UpstreamBody::Inline)),
            Err(e) => {
                let again = matches!(e, h1::Error::ClosedBeforeResponse) && method.is_idempotent();
                Err(SendError {
                    unsent: again,
                    error: Box::new(e),
                })
            }
        }
    }
}

impl Conns {
    pub(crate) fn new(addr: SocketAddr) -> Conns {
        Conns {
            addr,
            idle: PerWorker::default(),
            inline: Arc::default(),
            h2: PerWorker::default(),
        }
    }

    /// A ready connection in the pool's protocol: reused when possible, else new. Bodiless
    /// HTTP/1.1 requests get a connection of their own kind (see `h1/`). `now`
    /// ([`crate::clock::now_ms`]) ages the idle ones.
    pub(crate) async fn checkout(
        self: &Arc<Self>,
        connect_timeout: Duration,
        protocol: Protocol,
        bodiless: bool,
        now: u64,
    ) -> Result<(Sender, bool), ErrorKind> {
        if protocol == Protocol::H2 {
            // Boxed, like the handshakes below: a future's size is paid (copied) on every
            // request that awaits it, taken or not, and these are the rare paths.
            return Box::pin(self.checkout_h2(connect_timeout)).await;
        }
        if bodiless {
            if let Some(conn) = self.inline.take(IDLE_TIMEOUT, now) {
                return Ok((Sender::Inline(Some((conn, self.inline.clone()))), true));
            }
            let stream = connect_tcp(self.addr, connect_timeout).await?;
            return Ok((
                Sender::Inline(Some((h1::Conn::new(stream), self.inline.clone()))),
                false,
            ));
        }
        while let Some(mut idle) = self.pop_idle() {
            if idle.sender.is_closed() || now.saturating_sub(idle.since_ms) > IDLE_TIMEOUT.as_millis() as u64 {
                continue;
            }
            if idle.sender.is_ready() {
                return Ok((Sender::H1(idle.sender, self.clone()), true));
            }
            // Returned right at end of body: the connection task may not have marked it idle.
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), idle.sender.ready()).await {
                return Ok((Sender::H1(idle.sender, self.clone()), true));
            }
        }
        Box::pin(connect(self.addr, connect_timeout))
            .await
            .map(|s| (Sender::H1(s, self.clone()), false))
    }

    async fn checkout_h2(&self, timeout: Duration) -> Result<(Sender, bool), ErrorKind> {
        if let Some(s) = self
            .h2
            .local()
            .lock()
            .expect("h2 lock is never poisoned")
            .as_ref()
            .filter(|s| !s.is_closed())
        {
            return Ok((Sender::H2(s.clone()), true));
        }
        let stream = connect_tcp(self.addr, timeout).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|_| ErrorKind::ConnectRefused)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "upstream h2 connection ended with an error");
            }
        });
        *self.h2.local().lock().expect("h2 lock is never poisoned") = Some(sender.clone());
        Ok((Sender::H2(sender), false))
    }

    fn pop_idle(&self) -> Option<IdleConn> {
        self.idle
            .local()
            .lock()
            .expect("idle list lock is never poisoned")
            .pop()
    }

    /// Drops every idle connection (the backend was ejected).
    pub(crate) fn clear(&self) {
        for idle in self.idle.all() {
            idle.lock().expect("idle list lock is never poisoned").clear();
        }
        self.inline.clear();
        for h2 in self.h2.all() {
            h2.lock().expect("h2 lock is never poisoned").take();
        }
    }
}

impl Sender {
    /// Returns a hyper connection whose last response was read to the end to its idle list.
    /// Inline connections go back from their response body; HTTP/2 ones are shared and never
    /// leave.
    pub(crate) fn checkin(self) {
        let Sender::H1(sender, home) = self else { return };
        if sender.is_closed() {
            return;
        }
        let mut idle = home.idle.local().lock().expect("idle list lock is never poisoned");
        if idle.len() < MAX_IDLE_PER_BACKEND {
            idle.push(IdleConn {
                sender,
                since_ms: crate::clock::now_ms(),
            });
        }
    }
}

/// A TCP connection to a backend. Connect errors are classified for retries and outlier
/// detection.
async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ErrorKind> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ErrorKind::ConnectTimeout),
        Ok(Err(e)) => {
            tracing::debug!(backend = %addr, error = %e, "upstream connect failed");
            return Err(ErrorKind::ConnectRefused);
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens a new connection for hyper's client.
async fn connect(addr: SocketAddr, timeout: Duration) -> Result<SendRequest<RequestBody>, ErrorKind> {
    let stream = connect_tcp(addr, timeout).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| ErrorKind::ConnectRefused)?;
    // The task ends when the sender is dropped or the backend closes the connection.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::trace!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// A new connection for an Upgrade request: never pooled, since a 101 hands it to the tunnel.
pub(crate) async fn connect_upgradable(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<SendRequest<RequestBody>, ErrorKind> {
    let stream = connect_tcp(addr, timeout).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| ErrorKind::ConnectRefused)?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}
