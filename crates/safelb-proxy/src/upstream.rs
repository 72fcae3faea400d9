//! Upstream connections: connect with a timeout, keep idle HTTP/1.1 connections per backend,
//! hand them out again.
//!
//! The pool is ours rather than hyper-util's client because a retry must happen *before* the
//! request body is consumed: we obtain a connection first, and only then give the request away.
//! A stale keep-alive connection that the backend closed is detected by hyper without losing
//! the request (`try_send_request` hands it back), and the request goes out on a fresh one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::backend::BackendState;
use crate::body::RequestBody;
use crate::error::ErrorKind;

/// Idle connections older than this are closed instead of reused: many servers close theirs
/// after a few seconds, and reusing one that is being closed costs a round trip.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per backend; more are closed when returned.
const MAX_IDLE_PER_BACKEND: usize = 512;

pub(crate) struct IdleConn {
    sender: SendRequest<RequestBody>,
    since: Instant,
}

pub(crate) type Sender = SendRequest<RequestBody>;

/// A ready connection to `backend`: a pooled one if any is usable, else a new one.
pub(crate) async fn checkout(backend: &BackendState, connect_timeout: Duration) -> Result<(Sender, bool), ErrorKind> {
    while let Some(mut idle) = pop_idle(backend) {
        if idle.sender.is_closed() || idle.since.elapsed() > IDLE_TIMEOUT {
            continue;
        }
        if idle.sender.is_ready() {
            return Ok((idle.sender, true));
        }
        // Returned right at end of body: the connection task may not have marked it idle yet.
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_millis(50), idle.sender.ready()).await {
            return Ok((idle.sender, true));
        }
    }
    connect(backend, connect_timeout).await.map(|s| (s, false))
}

fn pop_idle(backend: &BackendState) -> Option<IdleConn> {
    backend.idle.lock().expect("idle list lock is never poisoned").pop()
}

/// Returns a connection whose last response was read to the end.
pub(crate) fn checkin(backend: &BackendState, sender: Sender) {
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

/// Opens a new connection. Connect errors are classified for retries and outlier detection.
pub(crate) async fn connect(backend: &BackendState, timeout: Duration) -> Result<Sender, ErrorKind> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(backend.addr)).await {
        Err(_) => return Err(ErrorKind::ConnectTimeout),
        Ok(Err(e)) => {
            tracing::debug!(backend = %backend.addr, error = %e, "upstream connect failed");
            return Err(ErrorKind::ConnectRefused);
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
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
pub(crate) async fn connect_upgradable(backend: &BackendState, timeout: Duration) -> Result<Sender, ErrorKind> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(backend.addr)).await {
        Err(_) => return Err(ErrorKind::ConnectTimeout),
        Ok(Err(_)) => return Err(ErrorKind::ConnectRefused),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
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
}
