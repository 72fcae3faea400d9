//! Streaming bodies in both directions, never buffered whole.
//!
//! [`RequestBody`] forwards the client's body upstream and enforces the size limit as bytes
//! pass. [`ResponseBody`] relays the backend's body (or carries a short local answer) and,
//! when it ends or is dropped, runs the request's [`Completion`]: the upstream connection goes
//! back to its pool only if the body was read to the end, and the access-log line is written.

use std::error::Error as StdError;
use std::fmt;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::h1::H1Body;
use crate::proxy::Completion;
use crate::upstream::UpstreamBody;

/// Why a request body stopped.
#[derive(Debug)]
pub enum RequestBodyError {
    TooLarge { limit: u64 },
    Client(hyper::Error),
}

impl fmt::Display for RequestBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestBodyError::TooLarge { limit } => write!(f, "request body exceeds {limit} bytes"),
            RequestBodyError::Client(e) => write!(f, "reading the request body failed: {e}"),
        }
    }
}

impl StdError for RequestBodyError {}

/// Finds a [`RequestBodyError`] in the cause chain of an upstream send error.
pub(crate) fn request_body_error<'e>(e: &'e (dyn StdError + 'static)) -> Option<&'e RequestBodyError> {
    let mut cur: Option<&'e (dyn StdError + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<RequestBodyError>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

pub struct RequestBody {
    /// `None` for a request without a streaming body: none at all, or one buffered in `buffered`.
    inner: Option<Incoming>,
    /// A replayable request's body, read whole before sending (`Idempotency-Key`).
    buffered: Option<Bytes>,
    remaining: u64,
    limit: u64,
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming, limit: u64) -> Self {
        RequestBody {
            inner: Some(inner),
            buffered: None,
            remaining: limit,
            limit,
        }
    }

    pub(crate) fn empty() -> Self {
        RequestBody {
            inner: None,
            buffered: None,
            remaining: 0,
            limit: 0,
        }
    }

    /// A body already read whole (its size was checked against the limits when it was read).
    pub(crate) fn buffered(data: Bytes) -> Self {
        RequestBody {
            inner: None,
            buffered: (!data.is_empty()).then_some(data),
            remaining: 0,
            limit: 0,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(this.buffered.take().map(|data| Ok(Frame::data(data))));
        };
        match ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        return Poll::Ready(Some(Err(RequestBodyError::TooLarge { limit: this.limit })));
                    }
                    this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(RequestBodyError::Client(e)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.buffered.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, &self.buffered) {
            (Some(b), _) => b.size_hint(),
            (None, Some(data)) => SizeHint::with_exact(data.len() as u64),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

enum Source {
    Upstream(Incoming),
    Inline(H1Body),
    Local(Option<Bytes>),
}

/// What a response body fails with: hyper's error or the inline client's.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// The body sent to the client.
pub struct ResponseBody {
    source: Source,
    bytes: u64,
    completion: Option<Box<Completion>>,
}

impl ResponseBody {
    pub(crate) fn upstream(body: UpstreamBody, completion: Box<Completion>) -> Self {
        ResponseBody {
            source: match body {
                UpstreamBody::Hyper(b) => Source::Upstream(b),
                UpstreamBody::Inline(b) => Source::Inline(b),
            },
            bytes: 0,
            completion: Some(completion),
        }
    }

    pub(crate) fn local(text: Bytes, completion: Option<Box<Completion>>) -> Self {
        ResponseBody {
            source: Source::Local(Some(text)),
            bytes: 0,
            completion,
        }
    }

    fn complete(&mut self, fully_read: bool) {
        if let Some(c) = self.completion.take() {
            c.finish(self.bytes, fully_read);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match &mut this.source {
            Source::Local(text) => Poll::Ready(text.take().map(|t| Ok(Frame::data(t)))),
            Source::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            Source::Inline(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
        };
        match ready!(polled) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.complete(false);
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.complete(true);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Local(text) => text.is_none(),
            Source::Upstream(body) => body.is_end_stream(),
            Source::Inline(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Local(Some(t)) => SizeHint::with_exact(t.len() as u64),
            Source::Local(None) => SizeHint::with_exact(0),
            Source::Upstream(body) => body.size_hint(),
            Source::Inline(body) => body.size_hint(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // hyper may skip polling a body that reports its end up front (HEAD, 204, length 0).
        let ended = self.is_end_stream();
        self.complete(ended);
    }
}
