//! The client connection's transport: header timeout (slowloris), keep-alive idle timeout, and
//! readable answers for requests the HTTP parser rejects.
//!
//! hyper closes a connection whose headers are late without a word, and answers a malformed
//! or oversized head with an empty 400/431. Operators and clients deserve the status, a short
//! body and an access-log line, so this wrapper watches the bytes:
//! - between requests it arms the keep-alive timer; the first byte of a request head arms the
//!   header timer; the service being called (a request in flight) disarms both;
//! - when the header timer fires it writes a 408 itself and ends the connection;
//! - when hyper writes one of its automatic error responses while a head is being read (no
//!   request in flight), the wrapper writes its own answer with the same status instead.
//!
//! An HTTP/2 connection (recognised by its preface) gets the idle timeout only, and its frame
//! headers are read on the way in: control frames that cost the server work and carry no
//! request (SETTINGS and PING without ACK, PRIORITY) are limited to a burst of
//! [`CONTROL_BURST`] and [`CONTROL_PER_SEC`] a second after it; past that the connection is a
//! flood (CVE-2019-9512, -9515) and is closed. An upgraded connection (WebSocket) is passed
//! through untouched, apart from the send timeout.
//!
//! Every connection has a send timeout: a client that accepts no byte of what safelb writes for
//! `limits.send_timeout` is disconnected, so a reader that stalls holds nothing for long.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::access_log::{AccessLog, LogEntry};
use crate::error::parser_answer;

/// Shared between the transport and the service of one client connection.
#[derive(Default)]
pub struct ConnState {
    /// Requests of this connection whose response has not finished.
    pub in_flight: AtomicU32,
    /// The connection was upgraded (WebSocket and the like): from now on bytes pass untouched.
    pub upgraded: std::sync::atomic::AtomicBool,
    /// The client's IP address as a header value (`X-Forwarded-For`), made once.
    pub client_ip: std::sync::OnceLock<http::HeaderValue>,
}

/// HTTP/2 control frames a connection may send at once, and per second after that.
pub const CONTROL_BURST: f64 = 100.0;
pub const CONTROL_PER_SEC: f64 = 10.0;
const PREFACE_LEN: usize = 24;

/// Where the reader is in an HTTP/2 byte stream, and the control-frame budget.
struct H2Frames {
    preface_left: usize,
    /// Bytes of the current frame's header seen so far, and the header.
    head: [u8; 9],
    head_len: usize,
    /// Payload bytes of the current frame still to pass.
    payload_left: usize,
    tokens: f64,
    refilled: tokio::time::Instant,
}

impl H2Frames {
    fn new() -> H2Frames {
        H2Frames {
            preface_left: PREFACE_LEN,
            head: [0; 9],
            head_len: 0,
            payload_left: 0,
            tokens: CONTROL_BURST,
            refilled: tokio::time::Instant::now(),
        }
    }

    /// Follows the frames in `bytes`; false when they exceed the control-frame budget.
    fn scan(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            let skip = if self.preface_left > 0 {
                &mut self.preface_left
            } else if self.payload_left > 0 {
                &mut self.payload_left
            } else {
                let k = (9 - self.head_len).min(bytes.len());
                self.head[self.head_len..self.head_len + k].copy_from_slice(&bytes[..k]);
                self.head_len += k;
                bytes = &bytes[k..];
                if self.head_len == 9 {
                    self.head_len = 0;
                    let h = self.head;
                    self.payload_left = (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize;
                    let (kind, ack) = (h[3], h[4] & 1 == 1);
                    let control = matches!(kind, 2) || (matches!(kind, 4 | 6) && !ack);
                    if control && !self.spend() {
                        return false;
                    }
                }
                continue;
            };
            let k = (*skip).min(bytes.len());
            *skip -= k;
            bytes = &bytes[k..];
        }
        true
    }

    fn spend(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * CONTROL_PER_SEC;
        self.tokens = (self.tokens + earned).min(CONTROL_BURST);
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    /// Between requests: the keep-alive timer runs.
    Idle,
    /// Part of a request head has arrived: the header timer runs.
    Head,
    /// A request is in flight: no timer here (the proxy's own timeouts apply).
    Busy,
}

pub struct ClientIo<S> {
    stream: S,
    state: Arc<ConnState>,
    phase: Phase,
    /// Decided by the first bytes: HTTP/2 has no "request head" between frames, so only the
    /// idle timeout applies, and no HTTP/1 answer may ever be written into its framing.
    h2: Option<bool>,
    frames: Option<Box<H2Frames>>,
    head_bytes: usize,
    /// Where the request line of the head being read ends, once seen: hyper answers 431 for
    /// any head over the limit; one that is mostly its request line gets 414 instead.
    head_line: Option<usize>,
    /// Fires at or before `deadline`; moved only when the deadline comes earlier than it (see `arm`).
    timer: Pin<Box<Sleep>>,
    /// The current phase's deadline, once the connection has waited in it (see `arm`).
    deadline: Option<tokio::time::Instant>,
    /// The current phase's timeout.
    after: Duration,
    header_timeout: Duration,
    keepalive_timeout: Duration,
    send_timeout: Duration,
    /// Runs while a write waits for the client to take bytes; reset by any progress.
    stall: Option<Pin<Box<Sleep>>>,
    peer: SocketAddr,
    log: AccessLog,
    version: u64,
}

/// The timeouts of one client connection.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub header: Duration,
    pub keepalive: Duration,
    pub send: Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ClientIo<S> {
    pub fn new(
        stream: S,
        state: Arc<ConnState>,
        peer: SocketAddr,
        timeouts: Timeouts,
        log: AccessLog,
        version: u64,
    ) -> Self {
        ClientIo {
            stream,
            state,
            // A new connection must send its first head within the header timeout.
            phase: Phase::Head,
            h2: None,
            frames: None,
            head_bytes: 0,
            head_line: None,
            timer: Box::pin(tokio::time::sleep(timeouts.header)),
            deadline: None,
            after: timeouts.header,
            header_timeout: timeouts.header,
            keepalive_timeout: timeouts.keepalive,
            send_timeout: timeouts.send,
            stall: None,
            peer,
            log,
            version,
        }
    }

    /// A write's outcome, with the send timeout applied: a write that waits on the client
    /// longer than `send_timeout` since the last byte it took fails.
    fn sent<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stall = None;
            return poll;
        }
        let after = self.send_timeout;
        let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
        if stall.as_mut().poll(cx).is_ready() {
            tracing::debug!(client = %self.peer, "client took no byte for the send timeout; disconnected");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no byte of its response within limits.send_timeout",
            )));
        }
        Poll::Pending
    }

    /// A request head is complete and its request is being served (safelb's own HTTP/1 loop,
    /// which does not read while it serves): no header or idle timer runs until the next read
    /// after the request ended.
    pub fn request_started(&mut self) {
        self.phase = Phase::Busy;
    }

    /// The connection goes to hyper with `buffered` (read, not yet parsed) as the start of the
    /// next head: the header timer runs for it (it keeps its deadline if one already ran), and
    /// a parse failure hyper answers is recognised as such.
    pub fn resume_head(&mut self, buffered: &[u8]) {
        if self.phase != Phase::Head {
            let after = self.header_timeout;
            self.arm(Phase::Head, after);
        }
        self.head_bytes = buffered.len();
        self.head_line = buffered.iter().position(|&b| b == b'\n');
    }

    /// Starts `phase` with its timeout. Lazily, twice over. The deadline is fixed only when the
    /// connection first waits in the phase (the read after a head's first bytes comes
    /// microseconds later; a head that arrives whole never waits, and never reads the clock).
    /// And the timer is moved only when that deadline is earlier than where it is set (moving a
    /// registered timer earlier takes the timer driver's lock); when it fires early, `expired`
    /// sets it again for the real deadline.
    fn arm(&mut self, phase: Phase, after: Duration) {
        self.phase = phase;
        self.after = after;
        self.deadline = None;
    }

    /// Whether the current phase's deadline has passed; registers for a wake-up if not.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = *self.deadline.get_or_insert_with(|| {
            let at = tokio::time::Instant::now() + self.after;
            if at < self.timer.deadline() {
                self.timer.as_mut().reset(at);
            }
            at
        });
        while self.timer.as_mut().poll(cx).is_ready() {
            if tokio::time::Instant::now() >= deadline {
                return true;
            }
            self.timer.as_mut().reset(deadline);
        }
        false
    }

    /// When `buf` is hyper's own answer to a request head it could not parse, writes ours
    /// instead (414 for a head that is mostly its request line, where hyper says 431); whether
    /// it did.
    fn replace_automatic_answer(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> bool {
        if self.h2 != Some(false)
            || self.phase != Phase::Head
            || self.state.in_flight.load(Relaxed) != 0
            || self.state.upgraded.load(Relaxed)
        {
            return false;
        }
        let Some(status) = automatic_error_status(buf) else {
            return false;
        };
        let long_line = self.head_line.is_none_or(|line| line * 2 > self.head_bytes);
        self.answer(cx, if status == 431 && long_line { 414 } else { status })
    }

    /// Writes a complete local answer directly to the transport. Small enough for the socket
    /// buffer of a connection that is about to close; a client that does not read loses it.
    fn answer(&mut self, cx: &mut Context<'_>, status: u16) -> bool {
        let Some((code, cause, text)) = parser_answer(status) else {
            return false;
        };
        let reason = code.canonical_reason().unwrap_or("");
        let body = format!("{status} {reason}: {text}\n");
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let written = match Pin::new(&mut self.stream).poll_write(cx, response.as_bytes()) {
            Poll::Ready(Ok(n)) if n == response.len() => {
                let _ = Pin::new(&mut self.stream).poll_flush(cx);
                true
            }
            _ => false,
        };
        self.log.write(&LogEntry::parser_error(
            self.peer,
            status,
            cause,
            body.len() as u64,
            self.version,
        ));
        written
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.state.upgraded.load(Relaxed) {
            return Pin::new(&mut this.stream).poll_read(cx, buf);
        }
        if this.state.in_flight.load(Relaxed) > 0 {
            this.phase = Phase::Busy;
        } else if this.phase == Phase::Busy {
            let after = this.keepalive_timeout;
            this.arm(Phase::Idle, after);
        }
        let before = buf.filled().len();
        if let Poll::Ready(result) = Pin::new(&mut this.stream).poll_read(cx, buf) {
            let n = buf.filled().len() - before;
            if this.h2.is_none() && n > 0 {
                let h2 = buf.filled()[before..].starts_with(b"PRI * HTTP/2.0");
                this.h2 = Some(h2);
                if h2 {
                    this.frames = Some(Box::new(H2Frames::new()));
                }
            }
            if this.h2 == Some(true) {
                if let Some(frames) = this.frames.as_mut() {
                    if !frames.scan(&buf.filled()[before..]) {
                        tracing::warn!(client = %this.peer, "HTTP/2 control frame flood (SETTINGS, PING or PRIORITY); connection closed");
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "HTTP/2 control frame flood",
                        )));
                    }
                }
                if n > 0 && this.phase != Phase::Busy {
                    let after = this.keepalive_timeout;
                    this.arm(Phase::Idle, after);
                }
                return Poll::Ready(result);
            }
            if n > 0 && this.phase == Phase::Idle {
                this.head_bytes = 0;
                this.head_line = None;
                let after = this.header_timeout;
                this.arm(Phase::Head, after);
            }
            if this.phase == Phase::Head {
                if this.head_line.is_none() {
                    let at = buf.filled()[before..].iter().position(|&b| b == b'\n');
                    this.head_line = at.map(|i| this.head_bytes + i);
                }
                this.head_bytes += n;
            }
            return Poll::Ready(result);
        }
        if this.phase != Phase::Busy && this.expired(cx) {
            if this.phase == Phase::Head && this.head_bytes > 0 && this.h2 != Some(true) {
                this.answer(cx, 408);
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "request head not received in time",
                )));
            }
            // Idle keep-alive connection (or one that never sent a byte): close quietly.
            return Poll::Ready(Ok(()));
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replace_automatic_answer(cx, buf) {
            // The connection closes after this; hyper's own bytes are replaced.
            return Poll::Ready(Ok(buf.len()));
        }
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.sent(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            if this.replace_automatic_answer(cx, first) {
                return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
            }
        }
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.sent(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.sent(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The status of one of hyper's automatic parse-error responses, recognised by its exact
/// status line.
fn automatic_error_status(buf: &[u8]) -> Option<u16> {
    const LINES: [(&[u8], u16); 3] = [
        (b"HTTP/1.1 400 Bad Request\r\n", 400),
        (b"HTTP/1.1 431 Request Header Fields Too Large\r\n", 431),
        (b"HTTP/1.1 414 URI Too Long\r\n", 414),
    ];
    LINES.iter().find(|(line, _)| buf.starts_with(line)).map(|&(_, s)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags, 0, 0, 0, 0];
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test(start_paused = true)]
    async fn control_frames_past_the_budget_are_a_flood_wherever_reads_split_them() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // Data and ACKs are free: a PING ACK whose payload looks like frame headers, DATA.
        stream.extend(frame(6, 1, &frame(6, 0, &[])[..8]));
        stream.extend(frame(0, 0, &[6; 300]));
        for _ in 0..CONTROL_BURST as usize {
            stream.extend(frame(6, 0, &[0; 8]));
        }
        let mut f = H2Frames::new();
        // Fed in pieces of 7 bytes: headers and payloads straddle reads.
        assert!(stream.chunks(7).all(|c| f.scan(c)), "the burst itself is allowed");
        assert!(!f.scan(&frame(4, 0, &[])), "one more SETTINGS is a flood");
        let mut f = H2Frames::new();
        assert!(f.scan(&stream));
        tokio::time::advance(Duration::from_secs(1)).await;
        for i in 0..CONTROL_PER_SEC as usize {
            assert!(f.scan(&frame(2, 0, &[0; 5])), "PRIORITY {i} within the refill");
        }
        assert!(!f.scan(&frame(2, 0, &[0; 5])));
    }
}
