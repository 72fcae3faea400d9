//! Upstream connections: connect with a timeout, keep idle connections per backend, hand them
//! out again. Three kinds: plain HTTP/1.1 connections for bodiless requests (exchanged inline,
//! `h1/`), hyper HTTP/1.1 connections for requests with a body, and one multiplexed hyper
//! HTTP/2 connection per backend for `protocol = "h2"` pools.
//!
//! The pools are ours rather than hyper-util's client because a retry must happen *before* the
//! request body is consumed: we obtain a connection first, and only then give the request away.
//! A stale keep-alive connection that the backend closed is recognised without losing the
//! request (the reactor's hang-up readiness for inline connections; `try_send_request` handing
//! it back for hyper's), and the request goes out on a fresh one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::client::conn::http2;
use hyper_util::rt::TokioExecutor;
use hyper_util::rt::TokioIo;
use safelb_config::Protocol;
use tokio::net::TcpStream;

use crate::backend::BackendState;
use crate::body::RequestBody;
use crate::error::ErrorKind;
use crate::h1;

/// Idle connections older than this are closed instead of reused: many servers close theirs
/// after a few seconds, and reusing one that is being closed costs a round trip.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per backend; more are closed when returned.
const MAX_IDLE_PER_BACKEND: usize = 512;

pub(crate) struct IdleConn {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

/// A connection to send one request on.
pub(crate) enum Sender {
    /// Owned for this request; back to the idle list once the response body ends.
    H1(SendRequest<RequestBody>),
    /// A clone of the backend's one multiplexed connection.
    H2(http2::SendRequest<RequestBody>),
    /// For a bodiless request: exchanged on the request's own task; the response body puts it
    /// back in the pool when it ends.
    Inline(Option<h1::Conn>),
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
    /// Sends the request in `slot`. It stays there while a bodiless request is exchanged
    /// inline, and goes back there when it may be sent again; otherwise it is consumed.
    pub(crate) async fn send(
        &mut self,
        slot: &mut Option<http::Request<RequestBody>>,
        head: Option<&[u8]>,
        backend: &Arc<BackendState>,
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
            Sender::H1(s) => {
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
                let req = slot.as_ref().expect("send is given a request");
                let encoded;
                let head = match head {
                    Some(h) => h,
                    None => {
                        encoded = h1::encode_head(req.method(), req.uri(), req.headers());
                        &encoded
                    }
                };
                let method = req.method().clone();
                let sent = self.send_head(head, &method, backend).await;
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
        backend: &Arc<BackendState>,
    ) -> Result<http::Response<UpstreamBody>, SendError> {
        let Sender::Inline(conn) = self else {
            unreachable!("send_head is used with inline connections only");
        };
        let conn = conn.take().expect("a connection carries one request at a time");
        match h1::exchange(conn, head, method, backend.clone()).await {
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

/// A ready connection to `backend` in the pool's protocol: reused when possible, else new.
/// Bodiless HTTP/1.1 requests get a connection of their own kind (see `h1/`).
pub(crate) async fn checkout(
    backend: &BackendState,
    connect_timeout: Duration,
    protocol: Protocol,
    bodiless: bool,
) -> Result<(Sender, bool), ErrorKind> {
    if protocol == Protocol::H2 {
        // Boxed, like the handshakes below: a future's size is paid (copied) on every request
        // that awaits it, taken or not, and these are the rare paths.
        return Box::pin(checkout_h2(backend, connect_timeout)).await;
    }
    if bodiless {
        loop {
            let idle = backend
                .inline_idle
                .lock()
                .expect("idle list lock is never poisoned")
                .pop();
            match idle {
                Some((conn, since)) if since.elapsed() <= IDLE_TIMEOUT && !conn.closed_while_idle() => {
                    return Ok((Sender::Inline(Some(conn)), true))
                }
                Some(_) => continue,
                None => break,
            }
        }
        let stream = connect_tcp(backend, connect_timeout).await?;
        return Ok((Sender::Inline(Some(h1::Conn::new(stream))), false));
    }
    while let Some(mut idle) = pop_idle(backend) {
        if idle.sender.is_closed() || idle.since.elapsed() > IDLE_TIMEOUT {
            continue;
        }
        if idle.sender.is_ready() {
            return Ok((Sender::H1(idle.sender), true));
        }
        // Returned right at end of body: the connection task may not have marked it idle yet.
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), idle.sender.ready()).await {
            return Ok((Sender::H1(idle.sender), true));
        }
    }
    Box::pin(connect(backend, connect_timeout))
        .await
        .map(|s| (Sender::H1(s), false))
}

async fn checkout_h2(backend: &BackendState, timeout: Duration) -> Result<(Sender, bool), ErrorKind> {
    if let Some(s) = backend
        .h2
        .lock()
        .expect("h2 lock is never poisoned")
        .as_ref()
        .filter(|s| !s.is_closed())
    {
        return Ok((Sender::H2(s.clone()), true));
    }
    let stream = connect_tcp(backend, timeout).await?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| ErrorKind::ConnectRefused)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::trace!(error = %e, "upstream h2 connection ended with an error");
        }
    });
    *backend.h2.lock().expect("h2 lock is never poisoned") = Some(sender.clone());
    Ok((Sender::H2(sender), false))
}

fn pop_idle(backend: &BackendState) -> Option<IdleConn> {
    backend.idle.lock().expect("idle list lock is never poisoned").pop()
}

/// Returns a connection whose last response was read to the end (HTTP/2 connections are shared
/// and never leave the backend).
pub(crate) fn checkin(backend: &BackendState, sender: Sender) {
    let Sender::H1(sender) = sender else { return };
    if sender.is_closed() {
        return;
    }
    let mut idle = backend.idle.lock().expect("idle list lock is never poisoned");
    if idle.len() < MAX_IDLE_PER_BACKEND {
        idle.push(IdleConn {
            sender,
            since: Instant::now(),
        });
    }
}

/// A bodiless request's connection, back once its response ended cleanly.
pub(crate) fn checkin_inline(backend: &BackendState, conn: h1::Conn) {
    let mut idle = backend.inline_idle.lock().expect("idle list lock is never poisoned");
    if idle.len() < MAX_IDLE_PER_BACKEND {
        idle.push((conn, Instant::now()));
    }
}

/// A TCP connection to the backend. Connect errors are classified for retries and outlier
/// detection.
async fn connect_tcp(backend: &BackendState, timeout: Duration) -> Result<TcpStream, ErrorKind> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(backend.addr)).await {
        Err(_) => return Err(ErrorKind::ConnectTimeout),
        Ok(Err(e)) => {
            tracing::debug!(backend = %backend.addr, error = %e, "upstream connect failed");
            return Err(ErrorKind::ConnectRefused);
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Opens a new connection for hyper's client.
pub(crate) async fn connect(backend: &BackendState, timeout: Duration) -> Result<SendRequest<RequestBody>, ErrorKind> {
    let stream = connect_tcp(backend, timeout).await?;
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
    backend: &BackendState,
    timeout: Duration,
) -> Result<SendRequest<RequestBody>, ErrorKind> {
    let stream = connect_tcp(backend, timeout).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|_| ErrorKind::ConnectRefused)?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    Ok(sender)
}

/// Drops every idle connection of a backend (it was removed or ejected).
pub(crate) fn clear_idle(backend: &Arc<BackendState>) {
    backend.idle.lock().expect("idle list lock is never poisoned").clear();
    backend
        .inline_idle
        .lock()
        .expect("idle list lock is never poisoned")
        .clear();
    backend.h2.lock().expect("h2 lock is never poisoned").take();
}
